"""Every ```python block of README.md runs, in a fresh namespace in an empty folder, as a user would paste it.

Convention: a block whose first line starts with ``# needs the network`` downloads released weights; it is
compiled (so it is valid Python) but not run, since tests never use the network. Every other block must run
offline. Blocks that read the output of the README's shell commands find it prepared by the ``workdir`` fixture.
"""

import re
from pathlib import Path

import pytest
from checkpoint_files import tiny_model
from PIL import Image
from sklearn.datasets import load_sample_images

README = Path(__file__).parents[1] / "README.md"
NETWORK_MARK = "# needs the network"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _blocks(language: str) -> list[tuple[int, str]]:
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(2)) for m in BLOCK.finditer(text) if m.group(1) == language]


PYTHON_BLOCKS = _blocks("python")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """An empty folder plus what the README's shell commands leave there: `features/` from `extract`."""
    from capi_backbones.features import FeatureExtractor

    root = tmp_path_factory.mktemp("readme")
    photos = root / "photos"
    photos.mkdir()
    for i, array in enumerate(load_sample_images().images):
        Image.fromarray(array).resize((64, 48)).save(photos / f"photo{i}.jpg")
    FeatureExtractor(tiny_model(), device="cpu", image_size=28).extract_to_disk(
        photos, root / "features", progress=False
    )
    return root


def test_readme_is_written_for_users_first():
    text = README.read_text(encoding="utf-8")
    first_command = _blocks("bash")[0][1]
    assert first_command.strip() == "pip install capi-backbones"
    assert (
        text.index("pip install capi-backbones") < text.index("## Development") < text.index('pip install -e ".[dev]"')
    )
    assert "https://pytorch.org/get-started/locally/" in text and "download.pytorch.org/whl/cpu" in text
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert images and all(url.startswith("https://") for url in images), images  # renders on the package index
    assert "python -m pytest" in text  # the test command .ci/run runs


@pytest.mark.parametrize("line,code", PYTHON_BLOCKS, ids=[f"README.md:{line}" for line, _ in PYTHON_BLOCKS])
def test_python_snippet_runs(line, code, workdir, monkeypatch):
    compiled = compile(code, f"README.md:{line}", "exec")
    if code.startswith(NETWORK_MARK):
        return  # downloads: compiled only (see the module docstring)
    monkeypatch.chdir(workdir)
    exec(compiled, {"__name__": "__readme__"})


def test_most_snippets_run_offline():
    network = [line for line, code in PYTHON_BLOCKS if code.startswith(NETWORK_MARK)]
    assert len(network) <= 4, f"README.md lines {network}: prefer snippets that run offline (random weights, files)"
