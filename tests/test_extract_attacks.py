"""Extraction under the second round of attacks (issue 20): links named as given, images replaced in place,
checksummed shards, output paths that are not ours, unreadable folders, damaged indexes, full disks."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from capi_backbones.cli.main import main
from capi_backbones.features import FeatureExtractor, load_index, load_saved_features, verify_output
from capi_backbones.models import CapiConfig, CapiModel

TINY = CapiConfig(embed_dim=64, depth=2, num_heads=2, pred_embed_dim=48, pred_depth=2, pred_num_heads=2)


def tiny_extractor(**kwargs) -> FeatureExtractor:
    torch.manual_seed(0)
    return FeatureExtractor(CapiModel(TINY), image_size=28, **kwargs)


def tiny_weights(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.manual_seed(0)
    torch.save({f"backbone.{k}": v for k, v in CapiModel(TINY).state_dict().items()}, path)
    return path


def cli_extract(images, out, weights, *extra) -> int:
    args = ["extract", images, "--out", out, "--weights", weights, "--image-size", "28", "--workers", "0"]
    return main([*map(str, args), "--no-progress", *extra])


def rows_by_name(out_dir) -> dict[str, torch.Tensor]:
    return {name: shard.patch_features[i].clone() for shard in load_saved_features(out_dir) for i, name in
            enumerate(shard.files)}  # fmt: skip


def save(path, pixels) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    save(folder / "astronaut.png", data.astronaut()[::8, ::8])
    save(folder / "sub" / "chelsea.png", data.chelsea()[::6, ::6])
    return folder


# ---- item 5: links are recorded under the names the user gave -----------------------------------------------------
def test_links_are_recorded_under_their_own_names_and_each_is_an_entry(tmp_path):
    blobs = tmp_path / "cache" / "blobs"
    save(blobs / "3f2a", data.chelsea()[::6, ::6])  # content-addressed, as in Hugging Face caches and git-annex
    save(blobs / "9b1c", data.astronaut()[::8, ::8])
    root = tmp_path / "cache" / "data"
    (root / "cats").mkdir(parents=True)
    (root / "people").mkdir()
    os.symlink("../../blobs/3f2a", root / "cats" / "cat1.png")
    os.symlink("../../blobs/3f2a", root / "cats" / "cat2.png")  # a second link to the same file
    os.symlink("../../blobs/9b1c", root / "people" / "astronaut.png")
    out = tmp_path / "out"
    summary = tiny_extractor().extract_to_disk(root, out, progress=False)
    assert summary.n_written == 3
    saved = rows_by_name(out)
    assert sorted(saved) == ["cats/cat1.png", "cats/cat2.png", "people/astronaut.png"]
    assert torch.equal(saved["cats/cat1.png"], saved["cats/cat2.png"])  # same pixels, two entries
    assert verify_output(out).ok
    again = tiny_extractor().extract_to_disk(root, out, progress=False)  # links are recognised as done on resume
    assert (again.n_written, again.n_skipped) == (0, 3)


# ---- item 10: an unreadable sub-folder is named and the run ends with exit code 1 ---------------------------------


def test_an_unreadable_sub_folder_is_named_and_gives_exit_code_1(images, tmp_path, lock_folders_named, capsys):
    save(images / "locked" / "hidden_from_us.png", data.camera()[::8, ::8])
    lock_folders_named("locked")
    weights = tiny_weights(tmp_path)
    assert cli_extract(images, tmp_path / "out", weights) == 1
    err = capsys.readouterr().err
    assert "failed: locked/: Cannot list the folder (Permission denied)" in err
    assert "Traceback" not in err
    assert sorted(rows_by_name(tmp_path / "out")) == ["astronaut.png", "sub/chelsea.png"]


# ---- item 9: nothing the package did not write is deleted --------------------------------------------------------
def test_an_empty_output_path_is_refused_before_anything_happens(images, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shard_00001").mkdir()
    (tmp_path / "shard_00001" / "notes.txt").write_text("my notes")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli_extract(images, "", tiny_weights(tmp_path)) == 2
    assert "The output folder is an empty path" in capsys.readouterr().err
    with pytest.raises(ValueError, match="empty path"):
        tiny_extractor().extract_to_disk(images, "", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "tiny.pth"])
    assert (tmp_path / "shard_00001" / "notes.txt").read_text() == "my notes"


def test_a_folder_extract_did_not_write_is_refused_and_left_alone(images, tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "shard_00001").mkdir(parents=True)
    (mine / "shard_00001" / "notes.txt").write_text("my notes")
    (mine / "shard_00002.safetensors").write_text("my file, named like a shard")
    with pytest.raises(ValueError, match=r"holds shard_00001 but no index\.json: it was not written by extract"):
        tiny_extractor().extract_to_disk(images, mine, progress=False)
    assert cli_extract(images, mine, tiny_weights(tmp_path)) == 2
    assert "not written by extract" in capsys.readouterr().err
    assert (mine / "shard_00001" / "notes.txt").read_text() == "my notes"
    assert (mine / "shard_00002.safetensors").read_text() == "my file, named like a shard"
    assert sorted(p.name for p in mine.iterdir()) == ["shard_00001", "shard_00002.safetensors"]


def test_a_users_file_inside_an_unlisted_npy_shard_folder_is_kept(images, tmp_path, caplog):
    out = tmp_path / "out"
    tiny_extractor().extract_to_disk(images, out, format="npy", progress=False)
    (out / "shard_00007").mkdir()
    (out / "shard_00007" / "notes.txt").write_text("my notes")  # put there by hand, after the run
    tiny_extractor().extract_to_disk(images, out, format="npy", progress=False)
    assert (out / "shard_00007" / "notes.txt").read_text() == "my notes"
    assert "Keeping" in caplog.text and "notes.txt" in caplog.text


# ---- item 10 / issue 18: a truncated listed shard is named for what it is -------------------------------------------
def test_a_truncated_listed_shard_is_not_called_a_leftover(images, tmp_path, caplog):
    out = tmp_path / "out"
    tiny_extractor().extract_to_disk(images, out, shard_size=1, progress=False)
    first = load_index(out)["shards"][0]["name"]
    content = (out / first).read_bytes()
    (out / first).write_bytes(content[: len(content) // 2])
    caplog.clear()
    summary = tiny_extractor().extract_to_disk(images, out, shard_size=1, progress=False)
    assert summary.n_written == 1
    assert f"Deleting the listed shard {out / first}: {len(content) // 2} bytes on disk" in caplog.text
    assert "left over" not in caplog.text
    assert verify_output(out).ok


# ---- item 10: a damaged index or rank manifest is one line that blames the right file ------------------------------
def _no_failed(d):
    del d["failed"]


def _no_files(d):
    del d["shards"][0]["files"]


def _no_count(d):
    del d["shards"][0]["count"]


def _null_shards(d):
    d["shards"] = None


def _settings_list(d):
    d["settings"] = ["not", "an", "object"]


DAMAGES = {  # (which file, damage, what the message says)
    "index without failed": ("index.json", _no_failed, "'failed' is missing"),
    "index entry without files": ("index.json", _no_files, "shard entry 0: 'files' is missing"),
    "index entry without count": ("index.json", _no_count, "shard entry 0: 'count' is missing"),
    "index with shards null": ("index.json", _null_shards, "'shards' is null, not a list"),
    "index with settings a list": ("index.json", _settings_list, "'settings' is a list, not an object"),
    "manifest without failed": ("index.rank00001.json", _no_failed, "'failed' is missing"),
    "manifest with shards null": ("index.rank00001.json", _null_shards, "'shards' is null, not a list"),
}


@pytest.mark.parametrize("case", sorted(DAMAGES))
def test_a_damaged_index_or_manifest_is_one_line_naming_it(images, tmp_path, capsys, case):
    name, damage, says = DAMAGES[case]
    weights = tiny_weights(tmp_path)
    out = tmp_path / "out"
    assert cli_extract(images, out, weights) == 0
    if name != "index.json":  # the manifest an interrupted 2-rank run leaves for rank 1
        (out / name).write_text(json.dumps({"shards": [], "failed": []}))
    document = json.loads((out / name).read_text())
    damage(document)
    (out / name).write_text(json.dumps(document))
    capsys.readouterr()
    for command in (lambda: cli_extract(images, out, weights), lambda: main(["verify", str(out)])):
        code = command()
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err
        if name == "index.json" or code == 2:
            assert code == 2 and len(err.splitlines()) == 1, err
        else:  # verify lists a damaged manifest among the problems of the folder
            assert code == 1, err
        line = next(line for line in err.splitlines() if says in line)
        assert f"'{out / name}'" in line and "is damaged" in line
        if name != "index.json":
            assert f"'{out / 'index.json'}'" not in line


def test_verify_names_a_swapped_shard_for_what_it_is(images, tmp_path):
    out = tmp_path / "out"
    save(images / "sub" / "chelsea2.png", data.chelsea()[::6, ::6])  # same size as chelsea.png: one shard each
    tiny_extractor().extract_to_disk(images / "sub", out, shard_size=1, progress=False)
    first, second = (entry["name"] for entry in load_index(out)["shards"])
    (out / first).rename(out / "swap")
    (out / second).rename(out / first)
    (out / "swap").rename(out / second)
    problems = verify_output(out).problems
    assert len(problems) == 2
    assert problems[0] == (
        f"{first}: holds other images than the index lists (row 0: 'chelsea2.png' in the shard, 'chelsea.png' in the "
        "index): the shard was renamed, swapped or edited"
    )


# ---- item 6: an image replaced in place is extracted again, never "already done" -----------------------------------
def test_an_image_replaced_in_place_is_extracted_again(images, tmp_path):
    out = tmp_path / "out"
    tiny_extractor().extract_to_disk(images, out, shard_size=10, progress=False)
    before = rows_by_name(out)
    save(images / "astronaut.png", data.coffee()[::8, ::8])  # same name, new content, size and mtime
    summary = tiny_extractor().extract_to_disk(images, out, shard_size=10, progress=False)
    assert (summary.n_written, summary.n_skipped) == (1, 1)
    after = rows_by_name(out)
    fresh_dir = tmp_path / "fresh"
    tiny_extractor().extract_to_disk(images, fresh_dir, shard_size=10, progress=False)
    assert sorted(after) == ["astronaut.png", "sub/chelsea.png"]  # one entry each, no stale duplicate
    assert torch.equal(after["astronaut.png"], rows_by_name(fresh_dir)["astronaut.png"])
    assert not torch.equal(after["astronaut.png"], before["astronaut.png"])
    assert torch.equal(after["sub/chelsea.png"], before["sub/chelsea.png"])  # kept, not recomputed
    assert verify_output(out).ok


def test_a_same_size_replacement_is_caught_by_the_content_hash_and_a_touch_is_not(images, tmp_path):
    out = tmp_path / "out"
    path = images / "astronaut.png"
    tiny_extractor().extract_to_disk(images, out, progress=False)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))  # touched: same content
    assert tiny_extractor().extract_to_disk(images, out, progress=False).n_written == 0
    pixels = np.asarray(Image.open(path)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    other = tmp_path / "other.png"
    Image.fromarray(pixels).save(other, format="PNG", compress_level=0)  # stored: any pixels give the same size
    Image.fromarray(np.asarray(Image.open(path))).save(path, format="PNG", compress_level=0)
    tiny_extractor().extract_to_disk(images, out, progress=False)
    assert os.path.getsize(other) == os.path.getsize(path)
    mtime = os.stat(path).st_mtime_ns
    os.replace(other, path)
    os.utime(path, ns=(mtime + 5 * 10**9, mtime + 5 * 10**9))
    summary = tiny_extractor().extract_to_disk(images, out, progress=False)
    assert (summary.n_written, summary.n_skipped) == (1, 1)
    assert verify_output(out).ok


def test_a_same_size_file_fixed_after_failing_is_retried(images, tmp_path):
    """issue 14: a behaviour no test pinned."""
    out = tmp_path / "out"
    good = (images / "astronaut.png").read_bytes()
    (images / "broken.png").write_bytes(b"\x00" * len(good))
    first = tiny_extractor().extract_to_disk(images, out, progress=False)
    assert list(first.failed) == ["broken.png"]
    (images / "broken.png").write_bytes(good)  # fixed, same size
    second = tiny_extractor().extract_to_disk(images, out, progress=False)
    assert (second.n_written, second.failed, second.failed_before) == (1, {}, {})


# ---- item 7: verify checks the shards' checksums ------------------------------------------------------------------
@pytest.mark.parametrize("format", ["safetensors", "npy"])
def test_one_flipped_byte_in_a_shard_fails_verify(images, tmp_path, format):
    out = tmp_path / "out"
    tiny_extractor().extract_to_disk(images, out, format=format, progress=False)
    assert verify_output(out).ok
    entry = load_index(out)["shards"][0]
    target = out / entry["name"] if format == "safetensors" else out / entry["name"] / "patch_features.npy"
    content = bytearray(target.read_bytes())
    content[-3] ^= 0x7F  # inside the last float of the data: its exponent bits, which can make it NaN
    target.write_bytes(bytes(content))
    report = verify_output(out)
    assert report.problems == [
        f"{entry['name']}: its data differs from what was written (checksum mismatch): damaged on disk"
    ]


# ---- item 10: a full disk during an npy extraction is one line, exit code 3, nothing half-written ------------------
def test_a_full_disk_while_writing_npy_shards_is_one_line_with_exit_code_3(images, tmp_path, monkeypatch, capsys):
    """numpy's writer reports a full disk as "N requested and M written", an OSError without errno or file name
    (seen on a 300 KiB tmpfs); the shard files go through Python's file I/O instead."""
    import capi_backbones.features.shards as shards_module

    real_save = np.save

    def save_on_a_full_disk(file, array, *args, **kwargs):
        if not hasattr(file, "getvalue"):  # a real file: what numpy does on a full disk
            raise OSError(f"{array.nbytes} requested and {array.nbytes // 3} written")
        return real_save(file, array, *args, **kwargs)

    monkeypatch.setattr(shards_module.np, "save", save_on_a_full_disk)
    real_write = shards_module.write_bytes
    written = []

    def write_until_full(path, data):
        if written:
            raise OSError(28, os.strerror(28))  # ENOSPC, as write() reports it: no file name
        written.append(path.name)
        return real_write(path, data)

    monkeypatch.setattr(shards_module, "write_bytes", write_until_full)
    out = tmp_path / "out"
    assert cli_extract(images, out, tiny_weights(tmp_path), "--format", "npy") == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and str(out) in err
    assert sorted(p.name for p in out.iterdir()) == ["index.json"]  # no shard folder, no temporary left
    assert load_index(out)["shards"] == []


def test_a_folder_with_only_our_temporary_index_is_ours(images, tmp_path):
    """A crash during the first index write leaves only ``.index.json.<pid>.<random>.tmp``, and a multi-rank run's
    other ranks can look while rank 0 writes it: such a folder is not taken for a foreign one."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".index.json.123.abcdef01.tmp").write_text("{half")
    summary = tiny_extractor().extract_to_disk(images, out, progress=False)
    assert summary.n_written == 2
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # the temporary deleted


@pytest.mark.parametrize("format", ["safetensors", "npy"])
def test_a_resume_redoes_a_shard_whose_bytes_changed(images, tmp_path, caplog, format):
    """A flipped byte inside a shard's data (same size) is caught by its checksum when the run is resumed: the
    shard is dropped and its images are extracted again, to the same features as a fresh run."""
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    tiny_extractor().extract_to_disk(images, fresh, shard_size=1, format=format, progress=False)
    tiny_extractor().extract_to_disk(images, out, shard_size=1, format=format, progress=False)
    entry = load_index(out)["shards"][0]
    target = out / entry["name"] if format == "safetensors" else out / entry["name"] / "patch_features.npy"
    content = bytearray(target.read_bytes())
    content[-3] ^= 0x7F
    target.write_bytes(bytes(content))
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_saved_features(out)
    caplog.clear()
    summary = tiny_extractor().extract_to_disk(images, out, shard_size=1, format=format, progress=False)
    assert summary.n_written == 1
    assert f"Deleting the listed shard {out / entry['name']}: its data differs" in caplog.text
    assert verify_output(out).ok
    expected, got = rows_by_name(fresh), rows_by_name(out)
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected)
