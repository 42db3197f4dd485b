"""extract_to_disk: shard contents against in-memory features, resume without recomputation, failing images,
atomic shards and refusing to mix settings."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from capi_backbones.features import FeatureExtractor, load_index, load_saved_features, read_shard
from capi_backbones.features import shards as shards_module
from capi_backbones.models import CapiConfig, CapiModel

TINY = CapiConfig(embed_dim=64, depth=2, num_heads=2, pred_embed_dim=48, pred_depth=2, pred_num_heads=2)
IMAGES = {  # name -> (H, W, 3) uint8, two processed sizes at image_size 28
    "astronaut.png": data.astronaut()[::8, ::8],
    "sub/coffee.jpg": data.coffee()[::8, ::8],
    "sub/deeper/chelsea.png": data.chelsea()[::6, ::6],
    "camera.png": np.repeat(data.camera()[::8, ::8, None], 3, axis=2),
    "rocket.jpg": data.rocket()[::8, ::8],
}


def tiny_extractor(**kwargs) -> FeatureExtractor:
    torch.manual_seed(0)
    return FeatureExtractor(CapiModel(TINY), image_size=28, **kwargs)


def write_images(folder, names=IMAGES) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(IMAGES[name]).save(folder / name, quality=95)


def count_images(extractor: FeatureExtractor) -> list[int]:
    """Batch sizes of the model calls."""
    calls = []
    extractor.model.patch_embed.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    return calls


def saved_by_name(out_dir) -> dict[str, dict[str, torch.Tensor]]:
    saved = {}
    for shard in load_saved_features(out_dir):
        for row, name in enumerate(shard.files):
            saved[name] = {"patch_features": shard.patch_features[row], "registers": shard.registers[row]}
            if shard.pooled is not None:
                saved[name]["pooled"] = shard.pooled[row]
    return saved


@pytest.mark.parametrize("format", ["safetensors", "npy"])
def test_shards_hold_the_in_memory_features_under_relative_names(tmp_path, format):
    images = tmp_path / "images"
    write_images(images)
    extractor = tiny_extractor(batch_size=2)
    summary = extractor.extract_to_disk(images, tmp_path / "out", format=format, shard_size=2, progress=False)
    assert summary.n_written == 5 and summary.n_skipped == 0 and not summary.failed
    index = load_index(tmp_path / "out")
    assert index["root"] == str(images.resolve()) and index["format"] == format
    assert sum(s["count"] for s in index["shards"]) == 5 and all(s["count"] <= 2 for s in index["shards"])
    assert {s["name"] for s in index["shards"]} == set(summary.shards)
    saved = saved_by_name(tmp_path / "out")
    assert sorted(saved) == sorted(IMAGES)
    for name in IMAGES:
        expected = extractor(images / name)
        for key in ("patch_features", "pooled", "registers"):
            torch.testing.assert_close(saved[name][key], getattr(expected, key)[0], rtol=1e-4, atol=1e-5)
    for entry in index["shards"]:  # one processed size per shard, recorded in the shard itself too
        shard = read_shard(tmp_path / "out" / entry["name"])
        assert shard.files == entry["files"] and list(shard.image_size) == entry["image_size"]
        assert shard.patch_features.shape[1:3] == tuple(entry["grid_size"])


def test_rerun_skips_done_images_and_new_images_alone_are_processed(tmp_path):
    images = tmp_path / "images"
    write_images(images, list(IMAGES)[:3])
    out = tmp_path / "out"
    first = tiny_extractor()
    calls = count_images(first)
    first.extract_to_disk(images, out, shard_size=10, progress=False)
    assert sum(calls) == 3
    files_before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    again = tiny_extractor()
    calls = count_images(again)
    summary = again.extract_to_disk(images, out, shard_size=10, progress=False)
    assert sum(calls) == 0 and summary.n_skipped == 3 and summary.n_written == 0 and not summary.shards
    shard_files = {name: t for name, t in files_before.items() if name.startswith("shard_")}
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name.startswith("shard_")} == shard_files

    write_images(images, list(IMAGES)[3:])  # two new images
    more = tiny_extractor()
    calls = count_images(more)
    summary = more.extract_to_disk(images, out, shard_size=10, progress=False)
    assert sum(calls) == 2 and summary.n_skipped == 3 and summary.n_written == 2
    assert sorted(saved_by_name(out)) == sorted(IMAGES)
    for name, mtime in shard_files.items():  # old shards untouched
        assert (out / name).stat().st_mtime_ns == mtime


def test_failing_images_are_reported_and_skipped(tmp_path, caplog):
    images = tmp_path / "images"
    write_images(images)
    (images / "sub" / "truncated.jpg").write_bytes((images / "sub" / "coffee.jpg").read_bytes()[:300])
    (images / "text.png").write_text("this is not a png")
    extractor = tiny_extractor(num_workers=1)  # errors happen in a worker process
    summary = extractor.extract_to_disk(images, tmp_path / "out", shard_size=2, progress=False)
    assert summary.n_written == 5 and sorted(summary.failed) == ["sub/truncated.jpg", "text.png"]
    assert "text.png" in caplog.text and "truncated.jpg" in caplog.text
    index = load_index(tmp_path / "out")
    assert [f["file"] for f in index["failed"]] == ["sub/truncated.jpg", "text.png"]
    assert "Cannot read image" in index["failed"][0]["error"]
    assert sorted(saved_by_name(tmp_path / "out")) == sorted(IMAGES)  # every other image was written
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary leftovers

    (images / "text.png").unlink()  # fixed by the user: the failure is tried again, then forgotten
    Image.fromarray(IMAGES["rocket.jpg"]).save(images / "sub" / "truncated.jpg")
    summary = tiny_extractor().extract_to_disk(images, tmp_path / "out", progress=False)
    assert summary.n_written == 1 and summary.n_skipped == 5
    assert [f["file"] for f in load_index(tmp_path / "out")["failed"]] == ["text.png"]  # still listed, not re-run


def test_a_failed_shard_write_leaves_no_partial_shard(tmp_path, monkeypatch):
    images = tmp_path / "images"
    write_images(images)
    real_write = shards_module.write_bytes
    writes = []

    def failing_write(path, data):
        writes.append(path)
        if len(writes) == 2:  # the second shard dies half way
            with open(path, "wb") as handle:
                handle.write(b"partial")
            raise OSError("disk full")
        real_write(path, data)

    monkeypatch.setattr(shards_module, "write_bytes", failing_write)
    extractor = tiny_extractor(batch_size=1)
    with pytest.raises(OSError, match="disk full"):
        extractor.extract_to_disk(images, tmp_path / "out", shard_size=1, progress=False)
    out_files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert out_files == ["index.json", "shard_00000.safetensors"]  # no partial shard, no temporary file
    index = load_index(tmp_path / "out")
    assert [s["name"] for s in index["shards"]] == ["shard_00000.safetensors"]

    monkeypatch.setattr(shards_module, "write_bytes", real_write)  # resume after the crash
    summary = tiny_extractor().extract_to_disk(images, tmp_path / "out", shard_size=1, progress=False)
    assert summary.n_skipped == 1 and summary.n_written == 4
    assert sorted(saved_by_name(tmp_path / "out")) == sorted(IMAGES)


def test_resume_refuses_other_settings_or_model(tmp_path):
    images = tmp_path / "images"
    write_images(images, ["astronaut.png"])
    tiny_extractor().extract_to_disk(images, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="image_size: 28 vs 42"):
        torch.manual_seed(0)
        FeatureExtractor(CapiModel(TINY), image_size=42).extract_to_disk(images, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="weights_fingerprint"):
        torch.manual_seed(1)
        FeatureExtractor(CapiModel(TINY), image_size=28).extract_to_disk(images, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="format: 'safetensors' vs 'npy'"):
        tiny_extractor().extract_to_disk(images, tmp_path / "out", format="npy", progress=False)
    with pytest.raises(ValueError, match="pooled: True vs False"):
        tiny_extractor().extract_to_disk(images, tmp_path / "out", pooled=False, progress=False)


def test_patch_only_float16_shards(tmp_path):
    images = tmp_path / "images"
    write_images(images, ["astronaut.png", "camera.png"])
    extractor = tiny_extractor()
    extractor.extract_to_disk(images, tmp_path / "out", pooled=False, dtype="float16", progress=False)
    (shard,) = load_saved_features(tmp_path / "out")
    assert shard.pooled is None and shard.patch_features.dtype == torch.float16
    expected = extractor(images / "camera.png", pooled=False).patch_features[0]
    row = shard.files.index("camera.png")
    torch.testing.assert_close(shard.patch_features[row].float(), expected, rtol=1e-2, atol=1e-2)


def test_disk_inputs_must_be_files(tmp_path):
    extractor = tiny_extractor()
    with pytest.raises(TypeError, match="needs image files or directories"):
        extractor.extract_to_disk([data.astronaut()], tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="No image files found"):
        (tmp_path / "empty").mkdir()
        extractor.extract_to_disk(tmp_path / "empty", tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="shard_size"):
        write_images(tmp_path, ["astronaut.png"])
        extractor.extract_to_disk(tmp_path / "astronaut.png", tmp_path / "out", shard_size=0, progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    (tmp_path / "out2").mkdir()
    (tmp_path / "out2" / "index.json").write_text(json.dumps({"version": 99}))
    with pytest.raises(ValueError, match="index version 99"):
        extractor.extract_to_disk(tmp_path / "astronaut.png", tmp_path / "out2", progress=False)


def test_writer_bounds_memory_with_many_sizes(tmp_path):
    from pathlib import Path

    from capi_backbones.features import FeatureOutput, ShardWriter

    def fake(size: int) -> FeatureOutput:
        grid = (1, size)
        return FeatureOutput(torch.zeros(1, *grid, 4), torch.zeros(1, 4), torch.zeros(1, 16, 4), grid, (14, 14 * size))

    writer = ShardWriter(tmp_path / "out", format="npy", shard_size=3, dtype="float32", settings={}, root=tmp_path)
    for i, size in enumerate([1, 2, 1, 2, 3, 4]):  # 6 = 2 shards' worth waiting: the fullest bucket is written
        writer.add(Path(tmp_path / f"{i}.png"), fake(size))
    assert len(writer.shards_written) == 1
    assert load_index(tmp_path / "out")["shards"][0]["files"] == ["0.png", "2.png"]
    writer.finish()
    assert sum(s["count"] for s in load_index(tmp_path / "out")["shards"]) == 6


def test_resume_accepts_the_same_weights_given_another_way(tmp_path):
    images = tmp_path / "images"
    write_images(images, ["astronaut.png"])
    extractor = tiny_extractor()
    extractor.extract_to_disk(images, tmp_path / "out", progress=False)
    path = tmp_path / "same.pth"
    torch.save({f"backbone.{k}": v for k, v in extractor.model.state_dict().items()}, path)
    summary = FeatureExtractor(weights=path, image_size=28).extract_to_disk(images, tmp_path / "out", progress=False)
    assert summary.n_skipped == 1 and summary.n_written == 0


def test_the_on_disk_format_has_one_module_and_no_import_cycle():
    """writer and verification both read the format from features.index; neither imports the other (issue 14)."""
    import ast
    import importlib

    def imports_of(module: str) -> set[str]:
        tree = ast.parse(Path(importlib.import_module(module).__file__).read_text())
        found = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        return found | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    package = "capi_backbones.features."
    assert package + "verification" not in imports_of(package + "writer")
    assert package + "writer" not in imports_of(package + "verification")
    assert not {package + m for m in ("writer", "verification", "extractor", "disk")} & imports_of(package + "index")
