"""Faults found by benchmarks/attacks/run_attacks.py (issue 20's attacks, rebuilt), each pinned by a test."""

import math
import os

import numpy as np
import pytest
from PIL import Image

from capi_backbones.cli.main import main


@pytest.mark.parametrize("option", ["--learning-rates", "--weight-decays"])
@pytest.mark.parametrize("bad", ["inf", "nan", "-0.1", "0.001,-inf"])
def test_eval_refuses_a_grid_that_is_not_finite_or_negative(tmp_path, capsys, option, bad):
    """`--learning-rates inf` used to train for minutes and report scores of diverged probes with exit 0."""
    out = tmp_path / "out"
    code = main(["eval", "classify", str(tmp_path), "--out", str(out), "--random-init", option, bad])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert option in err[0] and "finite" in err[0]
    assert not out.exists()


def test_a_zero_learning_rate_is_refused_but_a_zero_weight_decay_is_not(tmp_path, capsys):
    assert main(["eval", "classify", str(tmp_path), "--out", str(tmp_path / "o"), "--random-init",
                 "--learning-rates", "0"]) == 2  # fmt: skip
    assert "--learning-rates" in capsys.readouterr().err


@pytest.mark.parametrize("field", ["learning_rates", "weight_decays"])
def test_the_probe_config_refuses_non_finite_grids(field):
    from capi_backbones.evals.probe_grid import ProbeTrainingConfig

    with pytest.raises(ValueError, match="finite"):
        ProbeTrainingConfig(**{field: (1e-3, math.inf)})
    with pytest.raises(ValueError, match="finite"):
        ProbeTrainingConfig(**{field: (math.nan,)})


@pytest.mark.parametrize("command", ["pca", "explore"])
def test_pca_and_explore_name_an_unreadable_sub_folder_and_exit_1(tmp_path, lock_folders_named, capsys, command):
    """As extract does (issue 20, item 10): pca used to stop with exit 3 ("Permission denied: 'photos/locked'")."""
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "locked/c.png"):
        (tmp_path / "photos" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "photos" / name)
    lock_folders_named("locked")
    out = tmp_path / ("pca.png" if command == "pca" else "page.html")
    argv = [command, str(tmp_path / "photos"), "--out", str(out), "--random-init", "--image-size", "28", "--device",
            "cpu", "--no-progress"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"failed: {tmp_path / 'photos' / 'locked'}/: Cannot list the folder (Permission denied)" in err, err
    assert f"wrote {out} (2 " in err


def test_a_protocol_5_checkpoint_is_one_line_without_torch_s_two_line_warning(tmp_path, recwarn):
    """torch's weights-only reader warns about pickle protocol 5 in two lines of stderr (its UserWarning and the
    source line) before the package's own one-line refusal."""
    import torch
    from checkpoint_files import tiny_model

    from capi_backbones import from_pretrained
    from capi_backbones.pretrained import CheckpointError

    path = tmp_path / "protocol5.pth"
    state = {f"backbone.{k}": v for k, v in tiny_model().state_dict().items()}
    torch.save(state, path, pickle_protocol=5, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="not unpickled for safety"):
        from_pretrained(path)
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


def test_a_moved_project_resumes_instead_of_listing_every_image_twice(tmp_path, monkeypatch, capsys):
    """Images and their extraction moved together (mv project elsewhere), then the same command: the index used to
    keep the old absolute root, so every image was extracted again and listed twice, the second time as
    '../../new/photos/a.png' (exit 0, no word)."""
    import json

    old = tmp_path / "old"
    rng = np.random.default_rng(1)
    for name in ("a.png", "sub/b.png"):
        (old / "photos" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(old / "photos" / name)
    argv = ["--out", "features", "--random-init", "--image-size", "28", "--device", "cpu", "--no-progress",
            "--workers", "0"]  # fmt: skip
    monkeypatch.chdir(old)
    assert main(["extract", "photos", *argv]) == 0
    first = json.loads((old / "features" / "index.json").read_text())
    new = tmp_path / "new"
    old.rename(new)
    monkeypatch.chdir(new)
    capsys.readouterr()
    assert main(["extract", "photos", *argv]) == 0
    err = capsys.readouterr().err
    assert "0 images written" in err and "2 already done" in err, err
    index = json.loads((new / "features" / "index.json").read_text())
    assert [entry["files"] for entry in index["shards"]] == [entry["files"] for entry in first["shards"]]
    assert index["root"] == str(new / "photos")
    assert main(["verify", "features"]) == 0


def test_eval_on_a_full_disk_is_exit_3_not_unreadable_images(tmp_path, monkeypatch, capsys):
    """The cached center crops could not be written (disk full): eval said "None of the 6 images of the train split
    could be read (... No space left on device)" with exit 2, as if the images were broken."""
    import errno

    rng = np.random.default_rng(2)
    for split in ("train", "test"):
        for label in ("cats", "dogs"):
            for i in range(3):
                path = tmp_path / "data" / split / label / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
    real_save = Image.Image.save

    def save(self, fp, *args, **kwargs):
        if "crops" in os.fspath(fp):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() reports it: no file name
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    argv = ["eval", "classify", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--random-init",
            "--image-size", "28", "--device", "cpu", "--no-progress", "--workers", "0", "--iters", "2", "--probes",
            "knn"]  # fmt: skip
    assert main(argv) == 3
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "--random-init" not in line]
    assert len(err) == 1 and "No space left on device" in err[0] and "could be read" not in err[0], err
