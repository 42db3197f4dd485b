"""The README and the docs pages work as written.

Every ```python and ```bash block of README.md and docs/*.md runs, in the order of its page, in one empty folder per
page, as a user would paste it: Python blocks in a fresh namespace, shell blocks with ``bash -e``. A block whose first
line starts with ``# needs`` (``# needs the network``, ``# needs GPUs``, ...) cannot run here, and a shell block that
starts with ``pip install`` installs (the README's install and development blocks): these are only compiled
(Python) or syntax-checked (``bash -n``). Every dotted ``capi_backbones.…`` name written in the pages must resolve.
"""

import contextlib
import io
import os
import re
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
NEEDS_MARK = "# needs"  # first line of a block that needs the network, a GPU, ...: compiled only
INSTALL = "pip install"  # first line of a shell block that installs: syntax-checked only
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SHELLS = ("bash", "sh", "shell", "console")
BLOCK_TIMEOUT = 600  # seconds: a block that starts a server or waits for input fails instead of hanging
DOTTED_NAME = re.compile(r"\bcapi_backbones(?:\.[A-Za-z_]\w*)+")


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def blocks(page: Path, languages=("python", *SHELLS)) -> list[tuple[int, str, str]]:
    """(line, language, code) of each fenced block of ``page`` in one of ``languages``."""
    text = page.read_text(encoding="utf-8")
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2))
        for m in BLOCK.finditer(text)
        if m.group(1) in languages
    ]


def _shell_env() -> dict[str, str]:
    """The environment of shell blocks: this interpreter's ``python`` and ``capi-backbones`` first on PATH."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run_block(where: str, language: str, code: str, folder: Path) -> None:
    """Run one block in ``folder`` (or only check it when it is marked ``# needs ...``)."""
    marked = code.startswith(NEEDS_MARK) or (language in SHELLS and code.startswith(INSTALL))
    if language == "python":
        compiled = compile(code, where, "exec")
        if not marked:
            cwd, printed = os.getcwd(), io.StringIO()
            os.chdir(folder)
            try:
                with contextlib.redirect_stdout(printed):
                    exec(compiled, {"__name__": "__docs__"})
            finally:
                os.chdir(cwd)
            check_printed(where, code, printed.getvalue())
        return
    check = subprocess.run(["bash", "-n"], input=code, text=True, capture_output=True)
    assert check.returncode == 0, f"{where}: not valid bash:\n{check.stderr}"
    if marked:
        return
    try:
        result = subprocess.run(
            ["bash", "-e", "-o", "pipefail"],
            input=code,
            text=True,
            capture_output=True,
            cwd=folder,
            env=_shell_env(),
            timeout=BLOCK_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{where}: still running after {BLOCK_TIMEOUT} s (a block must finish; mark it '# needs ...')")
    assert result.returncode == 0, (
        f"{where}: exit status {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n"
        f"{result.stderr[-3000:]}"
    )


# print(x.shape)  # (1, 16, 384): note -- a comment that starts like an output: ( [ { or a digit
PRINT_WITH_OUTPUT = re.compile(r"^\s*print\(.*\)\s+#\s*([(\[{\d][^:]*)", re.M)


def check_printed(where: str, code: str, stdout: str) -> None:
    """What a ``print(...)  # output`` line of a block says it prints is what it printed (shapes as tuples)."""
    shown = re.sub(r"torch\.Size\(\[([^\]]*)\]\)", r"(\1)", stdout)
    for expected in PRINT_WITH_OUTPUT.findall(code):
        assert expected.strip() in shown, f"{where}: the comment says {expected.strip()!r}; it printed:\n{stdout}"


def _runs_commands(page: Path) -> bool:
    return any(lang in SHELLS and not code.startswith((NEEDS_MARK, INSTALL)) for _, lang, code in blocks(page))


@pytest.mark.parametrize(
    "page",
    [pytest.param(p, marks=[pytest.mark.slow] if _runs_commands(p) else []) for p in PAGES],
    ids=[_name(p) for p in PAGES],
)
def test_page_blocks_run(page, tmp_path):
    """The blocks of one page, in order, in one empty folder (later blocks may use what earlier ones wrote)."""
    for line, language, code in blocks(page):
        run_block(f"{_name(page)}:{line}", language, code, tmp_path)


def test_a_failing_block_is_reported(tmp_path):
    """The runner itself fails on a bad block (so a page cannot pass by running nothing)."""
    with pytest.raises(AssertionError, match="exit status 2"):
        run_block("x.md:1", "bash", "capi-backbones pca nothing --out x.png\n", tmp_path)
    with pytest.raises(ModuleNotFoundError):
        run_block("x.md:1", "python", "import capi_backbones.no_such_module\n", tmp_path)
    with pytest.raises(SyntaxError):
        run_block("x.md:1", "python", "# needs the network\nimport (\n", tmp_path)
    with pytest.raises(AssertionError, match="the comment says '\\(2, 3\\)'"):
        run_block("x.md:1", "python", "import torch\nprint(torch.zeros(2, 4).shape)  # (2, 3)\n", tmp_path)
    run_block("x.md:1", "python", "import torch\nprint(torch.zeros(2, 4).shape)  # (2, 4): a note\n", tmp_path)
    with pytest.raises(AssertionError, match="not valid bash"):
        run_block("x.md:1", "bash", "# needs GPUs\nif then\n", tmp_path)


def resolve(dotted: str) -> object:
    """The object a dotted name written in the docs stands for: modules imported, attributes looked up."""
    parts = dotted.split(".")
    obj = import_module(parts[0])
    for i in range(1, len(parts)):
        if hasattr(obj, parts[i]):
            obj = getattr(obj, parts[i])
            continue
        module = ".".join(parts[: i + 1])
        try:
            obj = import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise  # a real module that fails to import: not a wrong name in the docs
            raise AttributeError(f"{'.'.join(parts[:i])} has no {parts[i]!r}") from None
    return obj


def test_dotted_names_in_the_docs_resolve():
    unresolved = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in DOTTED_NAME.finditer(text):
            try:
                resolve(match.group())
            except AttributeError as error:
                line = text.count("\n", 0, match.start()) + 1
                unresolved.append(f"{_name(page)}:{line}: {match.group()} ({error})")
    assert not unresolved, "names in the docs that do not exist:\n" + "\n".join(unresolved)


def test_a_wrong_dotted_name_is_caught():
    pretrained = import_module("capi_backbones.pretrained")
    assert resolve("capi_backbones.pretrained.save_safetensors") is pretrained.save_safetensors
    assert DOTTED_NAME.findall("`capi_backbones.train.export.read_image_size(path)`") == [
        "capi_backbones.train.export.read_image_size"
    ]
    for wrong in ("capi_backbones.train.export.read_image_size", "capi_backbones.no_such_module.f"):
        with pytest.raises(AttributeError):
            resolve(wrong)


def test_readme_is_written_for_users_first():
    text = README.read_text(encoding="utf-8")
    assert 150 <= text.count("\n") <= 210, "README: about 150 to 200 lines; move details into docs/"
    first_command = blocks(README, SHELLS)[0][2]
    assert first_command.strip() == "pip install capi-backbones"
    assert "https://pytorch.org/get-started/locally/" in text and "download.pytorch.org/whl/cpu" in text
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert images and all(url.startswith("https://") for url in images), images  # renders on the package index
    python = blocks(README, ("python",))
    assert not python[0][2].startswith(NEEDS_MARK), "the first Python block of the README must run offline"
    assert sum(code.startswith(NEEDS_MARK) for _, _, code in python) <= 2, "prefer snippets that run offline"
    # CI (.ci/run) runs the test command the README gives: keep it the whole suite
    development = text[text.index("## Development") :]
    assert "\npython -m pytest\n" in blocks_of(development)[0]
    assert text.index("pip install capi-backbones") < text.index("## Development")


def blocks_of(text: str) -> list[str]:
    return [m.group(2) for m in BLOCK.finditer(text)]


REPOSITORY = "https://github.com/capi-backbones/capi-backbones/blob/main/"  # README links work on PyPI too


def test_readme_links_every_docs_page():
    text = README.read_text(encoding="utf-8")
    linked = set(re.findall(rf"\]\({re.escape(REPOSITORY)}(docs/[\w.-]+\.md)[#)]", text))
    on_disk = {_name(p) for p in PAGES[1:]}
    assert on_disk <= linked, f"docs pages missing from the README's docs map: {sorted(on_disk - linked)}"
    assert not re.search(r"\]\((?!https?://)", text), "README links must be absolute (relative ones break on PyPI)"


# pages written on other branches at the same time, linked from here before they are merged
PAGES_WRITTEN_ELSEWHERE = {"dinov2.md", "evaluation.md", "explorer.md"}


def test_links_point_at_files():
    broken = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8").replace(REPOSITORY, "/")
        for target in re.findall(r"\]\(([^)#:]+\.(?:md|png|py))(?:#[\w-]+)?\)", text):
            file = ROOT / target[1:] if target.startswith("/") else page.parent / target
            if not file.exists() and file.name not in PAGES_WRITTEN_ELSEWHERE:
                broken.append(f"{_name(page)}: {target}")
    assert not broken, broken


def test_every_extra_adds_something_the_readme_names():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    text = README.read_text(encoding="utf-8")
    core = {re.split(r"[<>=;\[ ]", r)[0].lower() for r in project["dependencies"]}
    for name, requirements in extras.items():
        if name == "dev":
            continue
        assert f"capi-backbones[{name}]" in text, f"README does not say what the [{name}] extra is for"
        added = {re.split(r"[<>=;\[ ]", r)[0].lower() for r in requirements} - core
        assert added, f"the [{name}] extra adds nothing to the core dependencies"
    user_extras = sorted(set(extras) - {"dev"})
    assert f"capi-backbones[{','.join(user_extras)}]" in extras["dev"], "dev must install every user extra"
