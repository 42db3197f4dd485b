"""`capi-backbones eval classify|segment` on small synthetic datasets (random ViT-S/14 weights at 56 px):
results, resuming, pictures, and one-line errors for bad inputs."""

import contextlib
import json
import os
import signal

import numpy as np
import pytest
from PIL import Image
from test_segmentation import textured_scene

from capi_backbones.cli.main import main
from capi_backbones.evals import miou

MODEL = ["--random-init", "--model", "capi_vits14", "--image-size", "56", "--workers", "0", "--no-progress",
         "--device", "cpu"]  # fmt: skip
COLOURS = ((200, 40, 40), (40, 40, 200), (40, 200, 40))


def write_classification(root, n_train=12, n_test=4, classes=COLOURS):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, colour in enumerate(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.normal(colour, 40, (60, 76, 3)).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def write_segmentation(root, n_train=16, n_test=6):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(n):
            image, mask = textured_scene(rng)
            mask[:2] = 255  # an ignored border
            Image.fromarray(image).save(root / split / "images" / f"{i:03d}.jpg", quality=95)
            Image.fromarray(mask.astype(np.uint8)).save(root / split / "masks" / f"{i:03d}.png")
    return root


@contextlib.contextmanager
def fails_after(seconds: int):
    def alarm(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_segment_beats_a_constant_prediction_and_resumes(tmp_path, capsys):
    data = write_segmentation(tmp_path / "seg")
    out = tmp_path / "out"
    argv = ["eval", "segment", str(data), "--out", str(out), *MODEL, "--ks", "1,3,10", "--ignore-labels", "255"]
    code, table, _ = run(capsys, *argv)
    assert code == 0, table
    results = json.loads((out / "results.json").read_text())
    knn = next(r for r in results["results"] if r["classifier"] == "knn")
    # the constant prediction: the most common train label everywhere
    import torch

    masks = [np.asarray(Image.open(p)) for p in sorted((data / "train" / "masks").glob("*.png"))]
    labels, counts = np.unique(np.concatenate([m[m != 255] for m in masks]), return_counts=True)
    test = torch.from_numpy(np.stack([np.asarray(Image.open(p)) for p in sorted((data / "test" / "masks").glob("*"))]))
    constant = miou(test, torch.full_like(test, int(labels[counts.argmax()])), (255,))
    print(f"k-NN mIoU {knn['miou']:.3f} vs constant {constant:.3f}")  # seen: about 0.45 vs 0.29
    assert knn["miou"] > constant + 0.1  # official mIoU: predicted 255 (the border) is a class with IoU 0
    assert knn["pixel_accuracy"] > 0.85
    assert knn["selected"] and knn["miou"] == round(knn["raw"]["miou"], 4) and knn["val_miou"] is not None
    assert results["dataset"]["counts"] == {"train": 16, "test": 6, "fitted_images": 15, "selection_images": 1}
    assert results["settings"]["knn_dtype_used"] in ("bfloat16", "float32") and results["wall_time_s"] > 0
    assert results["settings"]["feature_precision"] == _auto_precision()  # what --precision auto ran
    assert {"knn", "logreg"} == {r["classifier"] for r in results["results"]}
    assert results["versions"]["torch"] and results["config"]["ks"] == [1, 3, 10]
    assert Image.open(out / "segmentation_examples.png").size == (3 * 56, 4 * 56)
    assert "mIoU" in table and "knn" in table

    shards = {p: p.stat().st_mtime_ns for p in (out / "features").rglob("shard_*")}
    scores = (out / "selection_scores.json").stat().st_mtime_ns
    code, _, _ = run(capsys, *argv)
    assert code == 0 and {p: p.stat().st_mtime_ns for p in (out / "features").rglob("shard_*")} == shards
    assert (out / "selection_scores.json").stat().st_mtime_ns == scores  # no hyper-parameter was tried again
    assert json.loads((out / "results.json").read_text())["results"] == results["results"]


def test_classify_reports_every_probe_skips_a_corrupt_image_and_resumes(tmp_path, capsys):
    data = write_classification(tmp_path / "cls")
    (data / "train" / "class0" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    argv = ["eval", "classify", str(data), "--out", str(out), *MODEL, "--iters", "30", "--learning-rates", "1e-3,1e-2",
            "--weight-decays", "5e-4,1e-3", "--probe-batch-size", "16"]  # fmt: skip
    code, table, err = run(capsys, *argv)
    assert code == 1  # one image could not be read: reported, skipped
    assert "broken.png" in err and "Traceback" not in err
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"]["counts"] == {"train": 36, "test": 12, "fitted": 32, "selection": 4}
    seen = {(r["probe"], r["representation"]) for r in results["results"]}
    assert seen == {("knn", r) for r in ("pooled", "avg_patch", "pooled+avg_patch")} | {
        ("linear", r) for r in ("pooled", "avg_patch", "pooled+avg_patch")} | {
        ("attentive", "patch"), ("attentive", "registers")}  # fmt: skip
    assert all(0 <= r["top1"] <= r["top5"] <= 1 for r in results["results"])
    assert max(r["top1"] for r in results["results"] if r["probe"] == "knn") > 0.9  # colours are easy
    assert results["settings"]["probe_training_data"] == "cached center-crop features"
    assert results["settings"]["feature_precision"] == _auto_precision()
    assert "attentive" in table and "top-5" in table and "<<" in table

    # at a glance: one selected setting per probe and representation, with its validation score
    for probe, rep in seen:
        chosen = [r for r in results["results"] if (r["probe"], r["representation"]) == (probe, rep) and r["selected"]]
        assert len(chosen) == 1 and chosen[0]["val_top1"] is not None, (probe, rep)
        for key, value in chosen[0]["raw"].items():
            assert chosen[0][key] == round(value, 4)
    training = results["probe_training"]
    assert training["protocol"].startswith("NOT the official protocol") and "batch 16 (official 1024)" in training[
        "protocol"]  # fmt: skip
    assert training["global_batch_size"] == 16 and training["lr_scale"] == 16 / 256
    linear = next(r for r in results["results"] if r["probe"] == "linear")
    assert linear["effective_lr"] in (1e-3 * 16 / 256, 1e-2 * 16 / 256)
    grid = results["selection_grids"]["attentive"]["patch"]
    assert len(grid["val_top1"]) == 2 and len(grid["val_top1"][0]) == 2  # lr x wd
    assert results["wall_time_s"] > 0
    assert Image.open(out / "results.png").size[0] > 100

    checkpoint = out / "probes" / "attentive.pt"
    stamp = checkpoint.stat().st_mtime_ns
    code, _, _ = run(capsys, *argv)
    assert code == 1 and checkpoint.stat().st_mtime_ns == stamp  # finished probes are reused, not retrained
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["results"] == results["results"]

    # the unreadable image is fixed: the probes learn from 40 images now, the old probes must not be reused
    Image.fromarray(np.full((60, 76, 3), COLOURS[0], dtype=np.uint8)).save(data / "train" / "class0" / "broken.png")
    code, _, _ = run(capsys, *argv)
    assert code == 0 and checkpoint.stat().st_mtime_ns != stamp
    fixed = json.loads((out / "results.json").read_text())
    assert fixed["dataset"]["counts"]["train"] == 37
    fresh_out = tmp_path / "fresh"
    assert run(capsys, *[a if a != str(out) else str(fresh_out) for a in argv])[0] == 0
    assert json.loads((fresh_out / "results.json").read_text())["results"] == fixed["results"]


@pytest.mark.parametrize(("native", "expected"), [(True, "bfloat16"), (False, "float32")])
def test_probe_dtype_auto_trains_in_bfloat16_where_native_and_records_it(tmp_path, capsys, monkeypatch, native,
                                                                         expected):  # fmt: skip
    from capi_backbones.evals import classification_protocol, probe_grid

    monkeypatch.setattr(probe_grid, "native_bf16", lambda device: native)
    seen = []
    train = classification_protocol.train_probe_grid
    monkeypatch.setattr(classification_protocol, "train_probe_grid", lambda grid, batches, config, **kw:
                        seen.append(config.dtype) or train(grid, batches, config, **kw))  # fmt: skip
    data = write_classification(tmp_path / "cls", n_train=6, n_test=2)
    out = tmp_path / "out"
    code, _, _ = run(capsys, "eval", "classify", str(data), "--out", str(out), *MODEL, "--probes", "linear",
                     "--iters", "4", "--probe-batch-size", "8", "--probe-dtype", "auto")  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert seen == [expected]
    assert results["probe_training"]["dtype"] == expected
    assert results["settings"]["training"]["dtype"] == expected
    assert results["config"]["probe_dtype"] == "auto"  # what was asked, beside what ran


def test_a_second_classify_into_a_busy_out_folder_is_refused_before_it_deletes_anything(tmp_path, capsys):
    from capi_backbones.features.folder_lock import FolderLock

    data = write_classification(tmp_path / "cls", n_train=2, n_test=1)
    out = tmp_path / "out"
    crops = out / "features" / "train" / "crops.tmp"
    crops.mkdir(parents=True)
    (crops / "00000000.png").write_bytes(b"a crop the first run is extracting")
    with FolderLock(out):  # the first run holds the folder
        message = one_line_error(capsys, "eval", "classify", str(data), "--out", str(out), *MODEL, "--iters", "1")
    assert "used by another evaluation run" in message
    assert (crops / "00000000.png").read_bytes() == b"a crop the first run is extracting"


def test_classify_refuses_unknown_representations_before_extracting(tmp_path, capsys):
    data = write_classification(tmp_path / "cls", n_train=2, n_test=1)
    message = one_line_error(capsys, "eval", "classify", str(data), "--out", str(tmp_path / "o"), *MODEL,
                             "--representations", "cls")  # fmt: skip
    assert "--representations cls: unknown; choose from pooled" in message
    message = one_line_error(capsys, "eval", "classify", str(data), "--out", str(tmp_path / "o"), *MODEL,
                             "--knn-k", "0,20")  # fmt: skip
    assert "--knn-k, --head-dim and --probe-micro-batch must be positive" in message
    assert not (tmp_path / "o").exists()


def test_an_all_unreadable_test_split_is_named(tmp_path, capsys):
    data = write_classification(tmp_path / "cls", n_train=2, n_test=1)
    for image in (data / "test").rglob("*.png"):
        image.write_bytes(b"broken")
    message = one_line_error(
        capsys, "eval", "classify", str(data), "--out", str(tmp_path / "o"), *MODEL, "--iters", "1"
    )
    assert "None of the 3 images of the test split could be read" in message


def one_line_error(capsys, *argv):
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("--random-init: ")]
    assert len(lines) == 1 and lines[0].startswith("capi-backbones eval: error: "), err
    return lines[0]


def test_bad_classification_inputs_get_one_line(tmp_path, capsys):
    one = write_classification(tmp_path / "one", n_train=2, n_test=1, classes=COLOURS[:1])
    assert "at least 2 classes" in one_line_error(capsys, "eval", "classify", str(one), "--out", str(tmp_path / "o"))
    empty = write_classification(tmp_path / "empty", n_train=2, n_test=1)
    for image in (empty / "test").rglob("*.png"):
        image.unlink()
    assert "holds no images" in one_line_error(capsys, "eval", "classify", str(empty), "--out", str(tmp_path / "o"))
    good = write_classification(tmp_path / "good", n_train=3, n_test=1)
    message = one_line_error(capsys, "eval", "classify", str(good), "--out", str(tmp_path / "o"), *MODEL,
                             "--probes", "attentive", "--head-dim", "100", "--iters", "1")  # fmt: skip
    assert "not a multiple of the head size 100" in message
    assert "Unknown probe" in one_line_error(capsys, "eval", "classify", str(good), "--out", str(tmp_path / "o2"),
                                             *MODEL, "--probes", "svm")  # fmt: skip
    assert "does not exist" in one_line_error(capsys, "eval", "classify", str(tmp_path / "nope"), "--out", "x")


def test_bad_segmentation_inputs_get_one_line(tmp_path, capsys):
    data = write_segmentation(tmp_path / "seg", n_train=4, n_test=2)
    (data / "test" / "masks" / "001.png").unlink()
    assert "have no mask" in one_line_error(capsys, "eval", "segment", str(data), "--out", str(tmp_path / "o"))
    data = write_segmentation(tmp_path / "seg2", n_train=4, n_test=2)
    message = one_line_error(capsys, "eval", "segment", str(data), "--out", str(tmp_path / "o2"), *MODEL,
                             "--num-classes", "2")  # fmt: skip
    assert "label 2, outside the 2 classes" in message
    data = write_segmentation(tmp_path / "seg3", n_train=4, n_test=2)
    Image.new("L", (20, 20)).save(data / "train" / "masks" / "000.png")
    assert "is 20x20 but its image is 56x56" in one_line_error(
        capsys, "eval", "segment", str(data), "--out", str(tmp_path / "o3"), *MODEL
    )
    data = write_segmentation(tmp_path / "seg4", n_train=4, n_test=2)
    (data / "test" / "masks" / "001.png").unlink()
    os.mkfifo(data / "test" / "masks" / "001.png")
    with fails_after(60):  # reading the FIFO would hang forever
        message = one_line_error(capsys, "eval", "segment", str(data), "--out", str(tmp_path / "o4"), *MODEL)
    assert "001.png' is not a regular file" in message


@pytest.mark.parametrize("protocol", ["classify", "segment"])
def test_help_lists_the_protocol_options(protocol, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", protocol, "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--random-init" in help_text and "%%" not in help_text
    assert "20%" in " ".join(help_text.split())


def _auto_precision() -> str:
    """What ``--precision auto`` runs on this machine's CPU: bf16 where native, fp32 elsewhere."""
    import torch

    from capi_backbones.runtime.precision import native_bf16

    return "bf16" if native_bf16(torch.device("cpu")) else "fp32"
