"""Pretraining data: image discovery, unreadable files, seeded crops, the rank-sharded restorable order, masks."""

import logging
import math
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from capi_backbones.constants import IMAGENET_MEAN, IMAGENET_STD
from capi_backbones.train.data import (
    ImageStream,
    PositionMaskingCollate,
    StepBatchSampler,
    TrainTransform,
    build_loader,
    find_images,
    random_resized_crop_box,
)
from capi_backbones.train.masking import MaskingCollator


def write_images(folder, names=("astronaut", "coffee", "chelsea", "rocket"), size=96):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        image = Image.fromarray(getattr(skdata, name)()).convert("RGB").resize((size + 8 * i, size))
        image.save(folder / f"{i}_{name}.{'png' if i % 2 else 'jpg'}")
    return folder


@pytest.fixture()
def image_dir(tmp_path):
    return write_images(tmp_path / "images")


def test_find_images_is_recursive_sorted_and_filtered(tmp_path):
    write_images(tmp_path / "a" / "b", names=("coffee",))
    write_images(tmp_path / "c", names=("chelsea", "rocket"))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "UPPER.JPG").write_bytes((tmp_path / "a" / "b" / "0_coffee.jpg").read_bytes())
    found = find_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == sorted(
        ["a/b/0_coffee.jpg", "c/0_chelsea.jpg", "c/1_rocket.png", "UPPER.JPG"]
    )


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(FileNotFoundError, match="No images found under .*empty"):
        find_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_images(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="set data.root"):
        find_images("")


def test_crop_box_matches_the_random_resized_crop_law():
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        box = random_resized_crop_box(120, 200, (0.6, 1.0), generator=generator)
        assert box.top >= 0 and box.top + box.height <= 120 and box.left >= 0 and box.left + box.width <= 200
        area = box.height * box.width / (120 * 200)
        # rounding of the sides moves the area by at most a few percent; the fallback is the full-height crop
        assert 0.55 <= area <= 1.0
        assert 3 / 4 - 0.05 <= box.width / box.height <= 4 / 3 + 0.05


def test_transform_is_seeded_normalised_and_flips(image_dir):
    image = Image.open(sorted(image_dir.iterdir())[0]).convert("RGB")
    transform = TrainTransform(56, crop_scale=(1.0, 1.0), hflip=True)
    a = transform(image, torch.Generator().manual_seed(3))
    b = transform(image, torch.Generator().manual_seed(3))
    assert a.shape == (3, 56, 56) and a.dtype == torch.float32 and torch.equal(a, b)
    # undo the normalisation: pixel values back in [0, 1]
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    pixels = a * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    # the same draws with the flip disabled give the mirror image, or the same image when no flip was drawn
    flips = 0
    for seed in range(8):
        with_flip = TrainTransform(56, crop_scale=(1.0, 1.0), hflip=True)(image, torch.Generator().manual_seed(seed))
        without = TrainTransform(56, crop_scale=(1.0, 1.0), hflip=False)(image, torch.Generator().manual_seed(seed))
        flipped = torch.equal(with_flip, without.flip(-1))
        assert flipped or torch.equal(with_flip, without)
        flips += flipped
    assert 0 < flips < 8


def test_stream_epochs_are_permutations_and_reproducible(image_dir):
    paths = find_images(image_dir)
    stream = ImageStream(paths, TrainTransform(56), seed=1)
    n = len(paths)
    for epoch in range(3):
        order = [stream.image_index(epoch * n + i) for i in range(n)]
        assert sorted(order) == list(range(n))
    epochs = [[stream.image_index(e * n + i) for i in range(n)] for e in range(4)]
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled
    other = ImageStream(paths, TrainTransform(56), seed=1)
    image, position = other[7]
    assert position == 7 and torch.equal(image, stream[7][0])


def test_unreadable_image_is_logged_and_replaced_deterministically(image_dir, caplog):
    (image_dir / "broken.jpg").write_bytes(b"this is not a jpeg")
    paths = find_images(image_dir)
    stream = ImageStream(paths, TrainTransform(56), seed=0)
    broken = paths.index(image_dir / "broken.jpg")
    position = next(p for p in range(50) if stream.image_index(p) == broken)
    with caplog.at_level(logging.WARNING, logger="capi_backbones.train.data"):
        image, got = stream[position]
    assert got == position and image.shape == (3, 56, 56) and torch.isfinite(image).all()
    assert any("broken.jpg" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    again = ImageStream(paths, TrainTransform(56), seed=0)[position][0]
    assert torch.equal(image, again)


def test_all_images_unreadable_is_an_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"y")
    stream = ImageStream(find_images(tmp_path), TrainTransform(56))
    with pytest.raises(RuntimeError, match="None of the 2 images"):
        stream[0]


def test_sampler_shards_the_global_batch_and_resumes():
    single = StepBatchSampler(12, rank=0, world_size=1, start_step=0, total_steps=5)
    ranks = [StepBatchSampler(12, rank=r, world_size=3, start_step=0, total_steps=5) for r in range(3)]
    full = list(single)
    assert len(full) == 5 and all(len(b) == 12 for b in full)
    for step, batches in enumerate(zip(*ranks, strict=True)):
        assert [p for b in batches for p in b] == full[step]  # rank slices, in rank order, tile the global batch
    resumed = list(StepBatchSampler(12, rank=0, world_size=1, start_step=3, total_steps=5))
    assert resumed == full[3:]
    with pytest.raises(ValueError, match="not divisible by the 5 ranks"):
        StepBatchSampler(12, rank=0, world_size=5, start_step=0, total_steps=1)


def test_masks_depend_only_on_the_sample_position(image_dir):
    masking = MaskingCollator((4, 4), mask_ratio=0.65, prediction_ratio=0.3)
    collate = PositionMaskingCollate(masking, seed=0)
    stream = ImageStream(find_images(image_dir), TrainTransform(56))
    items = [stream[p] for p in range(5)]
    together = collate(items)
    alone = collate(items[3:4])
    assert together.visible_indices.shape == (5, 16 - math.floor(16 * 0.65))
    assert together.predict_indices.shape == (5, int(int(16 * 0.65) * 0.3))
    assert torch.equal(together.visible_indices[3:4], alone.visible_indices)
    assert torch.equal(together.predict_indices[3:4], alone.predict_indices)
    assert len({tuple(v.tolist()) for v in together.visible_indices}) > 1  # masks differ across samples
    for visible, predict in zip(together.visible_indices, together.predict_indices, strict=True):
        assert not set(visible.tolist()) & set(predict.tolist())  # predicted patches are masked ones
    other_seed = PositionMaskingCollate(masking, seed=1)(items)
    assert not torch.equal(other_seed.visible_indices, together.visible_indices)


def test_loader_output_does_not_depend_on_workers(image_dir):
    masking = MaskingCollator((4, 4), mask_ratio=0.65, prediction_ratio=0.3)
    stream = ImageStream(find_images(image_dir), TrainTransform(56), seed=5)

    def batches(workers):
        sampler = StepBatchSampler(3, rank=0, world_size=1, start_step=1, total_steps=4)
        return list(build_loader(stream, sampler, PositionMaskingCollate(masking, seed=5), num_workers=workers))

    serial, parallel = batches(0), batches(2)
    assert len(serial) == 3
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.visible_indices, b.visible_indices)
        assert torch.equal(a.predict_indices, b.predict_indices)
    assert not np.allclose(serial[0].images.numpy(), serial[1].images.numpy())


def test_workers_survive_a_stop_signal_sent_to_the_process_group(image_dir):
    masking = MaskingCollator((4, 4), mask_ratio=0.65, prediction_ratio=0.3)
    stream = ImageStream(find_images(image_dir), TrainTransform(56))
    sampler = StepBatchSampler(2, rank=0, world_size=1, start_step=0, total_steps=4)
    iterator = iter(build_loader(stream, sampler, PositionMaskingCollate(masking, seed=0), num_workers=1))
    first = next(iterator)
    for worker in iterator._workers:  # what a scheduler's SIGTERM to every process of the job does
        os.kill(worker.pid, signal.SIGTERM)
    rest = list(iterator)
    assert len(rest) == 3 and first.images.shape == rest[-1].images.shape
