"""extract_to_disk integrity (issue 10): concurrent runs, fingerprint of all weights, resume that checks the shards,
images that must not stall or kill a run, interrupts, disk full, index names, file modes, ``verify``."""

import errno
import json
import os
import signal
import stat
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from capi_backbones.cli.main import main
from capi_backbones.features import (
    ExtractionInterrupted,
    FeatureExtractor,
    FolderBusyError,
    load_index,
    load_saved_features,
    verify_output,
)
from capi_backbones.features import shards as shards_module
from capi_backbones.features.folder_lock import FolderLock
from capi_backbones.models import CapiConfig, CapiModel

TINY = CapiConfig(embed_dim=64, depth=2, num_heads=2, pred_embed_dim=48, pred_depth=2, pred_num_heads=2)
IMAGES = {  # name -> (H, W, 3) uint8; two processed sizes at image_size 28
    "astronaut.png": data.astronaut()[::8, ::8],
    "coffee.jpg": data.coffee()[::8, ::8],
    "sub/chelsea.png": data.chelsea()[::6, ::6],
    "rocket.jpg": data.rocket()[::8, ::8],
}


def tiny_model(seed: int = 0) -> CapiModel:
    torch.manual_seed(seed)
    return CapiModel(TINY)


def tiny_extractor(model: CapiModel | None = None, **kwargs) -> FeatureExtractor:
    return FeatureExtractor(model if model is not None else tiny_model(), image_size=28, **kwargs)


def write_images(folder, names=IMAGES) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(IMAGES[name]).save(folder / name, quality=95)


def saved_by_name(out_dir) -> dict[str, dict[str, torch.Tensor]]:
    saved = {}
    for shard in load_saved_features(out_dir):
        for row, name in enumerate(shard.files):
            saved[name] = {
                "patch_features": shard.patch_features[row].clone(),
                "registers": shard.registers[row].clone(),
            }
            if shard.pooled is not None:  # clones: safetensors maps the file, which a test may then truncate
                saved[name]["pooled"] = shard.pooled[row].clone()
    return saved


def assert_same_features(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    write_images(folder)
    return folder


# ---- two runs into one folder -------------------------------------------------------------------------------------
def test_a_second_run_into_a_busy_folder_refuses_and_changes_nothing(images, tmp_path):
    out = tmp_path / "out"
    tiny_extractor().extract_to_disk([images / "astronaut.png", images / "sub"], out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    busy = pytest.raises(FolderBusyError, match="being written by another extract run")
    with FolderLock(out), busy:  # the lock held as by a concurrent run
        tiny_extractor().extract_to_disk(images, out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    tiny_extractor().extract_to_disk(images, out, shard_size=1, progress=False)  # once free, both runs' data
    assert sorted(saved_by_name(out)) == sorted(IMAGES)


def test_runs_of_different_inputs_into_one_folder_keep_both(images, tmp_path):
    out = tmp_path / "out"
    tiny_extractor().extract_to_disk([images / "astronaut.png", images / "coffee.jpg"], out, progress=False)
    tiny_extractor().extract_to_disk([images / "rocket.jpg", images / "coffee.jpg"], out, progress=False)
    assert sorted(saved_by_name(out)) == ["astronaut.png", "coffee.jpg", "rocket.jpg"]
    assert verify_output(out).ok


# ---- the fingerprint ----------------------------------------------------------------------------------------------
def test_resume_refuses_a_model_that_differs_only_outside_the_patch_embedding(images, tmp_path):
    out = tmp_path / "out"
    tiny_extractor().extract_to_disk([images / "astronaut.png", images / "sub"], out, progress=False)
    tuned = tiny_model()
    with torch.no_grad():
        tuned.encoder.blocks[-1].residual2.fn.fc1.weight.add_(1e-3)  # a "fine-tuned" last block, same patch embedding
    with pytest.raises(ValueError, match="weights_fingerprint"):
        tiny_extractor(tuned).extract_to_disk(images, out, progress=False)
    assert sorted(f for s in load_index(out)["shards"] for f in s["files"]) == ["astronaut.png", "sub/chelsea.png"]
    tiny_extractor(tiny_model()).extract_to_disk(images, out, progress=False)  # the same weights resume


# ---- one image cannot stall or kill a run -------------------------------------------------------------------------
def test_elongated_image_fifo_and_model_error_are_failed_and_skipped_next_time(images, tmp_path, monkeypatch):
    Image.fromarray(np.zeros((20, 2000, 3), np.uint8)).save(images / "strip.png")  # 100:1
    os.mkfifo(images / "pipe.jpg")  # opening it would block forever
    white = np.full_like(IMAGES["coffee.jpg"], 255)  # same size as coffee.jpg: batched with it
    Image.fromarray(white).save(images / "white.png")
    real_forward = FeatureExtractor.forward
    calls = []

    def forward(self, batch, *, pooled=True):  # the white image "runs out of memory", whatever its batch
        calls.append(batch.shape[0])
        if (batch.flatten(1).amin(1) > 2.2).any():
            raise RuntimeError("CUDA out of memory. Tried to allocate 7.50 GiB\nmore details")
        return real_forward(self, batch, pooled=pooled)

    monkeypatch.setattr(FeatureExtractor, "forward", forward)
    out = tmp_path / "out"

    def hung(signum, frame):
        raise TimeoutError("extraction hung (opened the FIFO?)")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)  # a regression must fail, not hang the suite
    try:
        summary = tiny_extractor(batch_size=4).extract_to_disk(images, out, progress=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert sorted(summary.failed) == ["pipe.jpg", "strip.png", "white.png"]
    assert "FIFO" in summary.failed["pipe.jpg"] and "more than 10 times" in summary.failed["strip.png"]
    assert summary.failed["white.png"] == "RuntimeError in the model: CUDA out of memory. Tried to allocate 7.50 GiB"
    assert sorted(saved_by_name(out)) == sorted(IMAGES)  # coffee.jpg, batched with the white image, is saved
    assert {f["file"] for f in load_index(out)["failed"]} == set(summary.failed)

    calls.clear()
    again = tiny_extractor().extract_to_disk(images, out, progress=False)  # failures are not fed to the model again
    assert calls == [] and again.failed == {} and sorted(again.failed_before) == sorted(summary.failed)
    retried = tiny_extractor().extract_to_disk(images, out, progress=False, retry_failed=True)
    assert calls and sorted(retried.failed) == sorted(summary.failed)


def test_non_finite_pixels_are_refused():
    extractor = tiny_extractor()
    pixels = torch.rand(3, 28, 28)
    for bad in (float("nan"), float("inf")):
        pixels[0, 3, 4] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            extractor(pixels)


# ---- resume does not trust the index ------------------------------------------------------------------------------
def test_resume_redoes_missing_and_truncated_shards_and_deletes_leftovers(images, tmp_path, caplog):
    out = tmp_path / "out"
    tiny_extractor(batch_size=1).extract_to_disk(images, out, shard_size=1, progress=False)
    reference = saved_by_name(out)
    shards = [s["name"] for s in load_index(out)["shards"]]
    (out / shards[0]).unlink()
    data_ = (out / shards[1]).read_bytes()
    (out / shards[1]).write_bytes(data_[: len(data_) // 2])
    with pytest.raises(ValueError, match="damaged shards"):
        load_saved_features(out)
    (out / "shard_00099.safetensors").write_bytes(b"orphan")  # renamed into place, never listed
    (out / ".shard_00100.safetensors.123.abcdef01.tmp").write_bytes(b"half")
    (out / "notes.txt").write_text("mine")  # not ours: kept
    assert verify_output(out).problems and not verify_output(out).ok

    summary = tiny_extractor(batch_size=1).extract_to_disk(images, out, shard_size=1, progress=False)
    assert summary.n_written == 2 and summary.n_skipped == 2
    assert shards[0] in caplog.text and shards[1] in caplog.text and "extracted again" in caplog.text
    assert_same_features(saved_by_name(out), reference)
    names = sorted(p.name for p in out.iterdir())
    assert "shard_00099.safetensors" not in names and not [n for n in names if n.endswith(".tmp")]
    assert "notes.txt" in names and verify_output(out).ok


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/shard_00000.safetensors"])
def test_index_names_outside_the_folder_are_refused(images, tmp_path, name):
    out = tmp_path / "out"
    tiny_extractor().extract_to_disk(images / "sub", out, progress=False)
    index = load_index(out)
    index["shards"][0]["name"] = name
    (out / "index.json").write_text(json.dumps(index))
    for call in (load_saved_features, verify_output):
        with pytest.raises(ValueError, match="refusing to read outside the folder"):
            call(out)
    with pytest.raises(ValueError, match="refusing to read outside the folder"):
        tiny_extractor().extract_to_disk(images / "sub", out, progress=False)


# ---- interrupts ---------------------------------------------------------------------------------------------------
def interrupt_on_call(monkeypatch, n: int, action) -> None:
    real_forward = FeatureExtractor.forward
    calls = []

    def forward(self, batch, *, pooled=True):
        calls.append(1)
        if len(calls) == n:
            action()
        return real_forward(self, batch, pooled=pooled)

    monkeypatch.setattr(FeatureExtractor, "forward", forward)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupt_saves_the_finished_images_and_resume_completes(images, tmp_path, monkeypatch, how):
    assert threading.current_thread() is threading.main_thread()

    def ctrl_c():
        raise KeyboardInterrupt

    def sigterm():
        os.kill(os.getpid(), signal.SIGTERM)

    interrupt_on_call(monkeypatch, 3, ctrl_c if how == "ctrl-c" else sigterm)
    out = tmp_path / "out"
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ExtractionInterrupted if how == "sigterm" else KeyboardInterrupt):
        tiny_extractor(batch_size=1).extract_to_disk(images, out, shard_size=10, progress=False)  # all in memory
    assert signal.getsignal(signal.SIGTERM) is handler  # restored
    assert len(load_index(out)["shards"]) == 2  # the two finished images, one shard per processed size
    assert sum(s["count"] for s in load_index(out)["shards"]) == 2
    monkeypatch.undo()
    summary = tiny_extractor(batch_size=1).extract_to_disk(images, out, shard_size=10, progress=False)
    assert summary.n_skipped == 2 and summary.n_written == 2 and sorted(saved_by_name(out)) == sorted(IMAGES)


# ---- disk full, permissions, exit codes ---------------------------------------------------------------------------
def tiny_weights(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save({f"backbone.{k}": v for k, v in tiny_model().state_dict().items()}, path)
    return path


def cli_extract(images, out, weights, *extra) -> int:
    args = ["extract", images, "--out", out, "--weights", weights, "--image-size", "28", "--workers", "0"]
    return main([*map(str, args), "--no-progress", *extra])


def test_disk_full_is_one_line_naming_the_path_with_exit_code_3(images, tmp_path, monkeypatch, capsys):
    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(shards_module, "write_bytes", full)
    weights = tiny_weights(tmp_path)
    assert cli_extract(images, tmp_path / "out", weights) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and str(tmp_path / "out") in err
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary file left


def test_a_failed_write_without_a_file_name_names_the_output_folder(images, tmp_path, monkeypatch, capsys):
    def full(path, text):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))  # as write() reports it: no file name

    monkeypatch.setattr("capi_backbones.features.writer.atomic_write_text", full)
    assert cli_extract(images, tmp_path / "out", tiny_weights(tmp_path)) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and os.strerror(errno.EDQUOT) in err and f"'{tmp_path / 'out'}'" in err


def test_a_bug_is_not_disguised_as_a_usage_error(images, tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        raise KeyError("patch_features")

    monkeypatch.setattr(shards_module, "write_shard", bug)
    monkeypatch.setattr("capi_backbones.features.writer.write_shard", bug)
    with pytest.raises(KeyError):  # a traceback, not "error: 'patch_features'" with exit code 2
        cli_extract(images, tmp_path / "out", tiny_weights(tmp_path))


def test_exit_codes_for_failed_images_and_a_busy_folder(images, tmp_path, capsys):
    weights = tiny_weights(tmp_path)
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    assert cli_extract(images, tmp_path / "out", weights) == 1
    assert cli_extract(images, tmp_path / "out", weights) == 1  # still unreadable: named again, not retried
    assert "failed before (unchanged, skipped" in capsys.readouterr().err
    with FolderLock(tmp_path / "out"):
        assert cli_extract(images, tmp_path / "out", weights) == 2
    assert "being written by another extract run" in capsys.readouterr().err


def test_files_share_one_mode_under_umask_002(images, tmp_path):
    previous = os.umask(0o002)
    try:
        tiny_extractor().extract_to_disk(images, tmp_path / "out", shard_size=2, progress=False)
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert set(modes.values()) == {0o664}, modes


# ---- verify -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("format", ["safetensors", "npy"])
def test_verify_reports_an_intact_folder_and_names_a_damaged_shard(images, tmp_path, capsys, format):
    out = tmp_path / "out"
    tiny_extractor().extract_to_disk(images, out, format=format, shard_size=2, progress=False)
    assert main(["verify", str(out)]) == 0
    assert "OK; 3 shard(s), 4 images" in capsys.readouterr().err
    index = load_index(out)
    index["shards"][0]["files"][0] = "other.png"  # the shard holds a different image than listed
    (out / "index.json").write_text(json.dumps(index))
    assert main(["verify", str(out)]) == 1
    assert f"problem: {index['shards'][0]['name']}: holds" in capsys.readouterr().err
    assert main(["verify", str(tmp_path)]) == 2


def test_a_failed_download_is_an_environment_failure(images, tmp_path, monkeypatch, capsys):
    from capi_backbones.pretrained.errors import DownloadError

    def offline(*args, **kwargs):
        raise DownloadError("Could not download https://example.invalid/w.pth: network unreachable\ndetails")

    monkeypatch.setattr("capi_backbones.cli.feature_commands.build_extractor", offline)
    assert main(["extract", str(images), "--out", str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err.strip()
    assert err == "capi-backbones extract: error: Could not download https://example.invalid/w.pth: network unreachable"


def test_a_second_ctrl_c_while_the_decoding_workers_stop_is_ignored(images, tmp_path, monkeypatch):
    """After the first Ctrl-C the finished images are saved and the worker processes stopped with every stop signal
    ignored: a second Ctrl-C then (people press it twice) raises nowhere, not even inside a ``__del__``."""
    from torch.utils.data import dataloader

    real_shutdown = dataloader._MultiProcessingDataLoaderIter._shutdown_workers
    sent = []

    def shutdown_with_second_ctrl_c(self):
        if not sent and not self._shutdown:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGINT)  # the impatient second Ctrl-C
        real_shutdown(self)

    monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "_shutdown_workers", shutdown_with_second_ctrl_c)

    def ctrl_c():
        raise KeyboardInterrupt

    interrupt_on_call(monkeypatch, 2, ctrl_c)
    unraisable = []
    monkeypatch.setattr("sys.unraisablehook", unraisable.append)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        tiny_extractor(batch_size=1, num_workers=1).extract_to_disk(images, out, shard_size=10, progress=False)
    import gc

    gc.collect()
    assert sent and not unraisable, [u.exc_value for u in unraisable]
    assert sum(s["count"] for s in load_index(out)["shards"]) == 1
