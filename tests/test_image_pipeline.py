"""One image pipeline (issue 14): training, extraction and evaluation find the same files and see the same pixels
(EXIF orientation, colour modes), skip the same hidden files, and name unreadable folders."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from capi_backbones.features import expand_inputs, to_rgb_tensor
from capi_backbones.images import UnreadableFolderError, find_image_files, load_image
from capi_backbones.train.data import ImageStream, find_images


def exif_rotated_jpeg(path) -> np.ndarray:
    """A 20 x 60 (H x W) JPEG stored sideways with EXIF orientation 6; returns the stored pixels."""
    stored = np.zeros((20, 60, 3), dtype=np.uint8)
    stored[:, :30] = (250, 10, 10)  # left half red as stored: the top half once displayed upright
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, format="JPEG", exif=exif.tobytes(), quality=95)
    return stored


@pytest.fixture
def photo_folder(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    (root / ".cache").mkdir()
    exif_rotated_jpeg(root / "phone.jpg")
    Image.fromarray(np.full((30, 40, 3), 128, np.uint8)).save(root / "sub" / "plain.png")
    Image.fromarray(np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 50).save(root / "deep.png")  # 16-bit
    Image.fromarray(np.full((30, 40, 4), (0, 200, 0, 0), np.uint8)).convert("CMYK").save(root / "print.jpg")
    (root / "._phone.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble junk")  # what macOS copies leave
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / ".cache" / "thumb.jpg")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "UPPER.JPG")
    return root


def test_training_and_extraction_find_the_same_files(photo_folder):
    expected = {"phone.jpg", "sub/plain.png", "deep.png", "print.jpg", "UPPER.JPG"}
    extraction = {p.relative_to(photo_folder).as_posix() for p in expand_inputs(photo_folder)}
    training = {p.relative_to(photo_folder).as_posix() for p in find_images(photo_folder)}
    assert extraction == training == expected


def test_training_and_extraction_see_the_same_pixels(photo_folder):
    paths = find_images(photo_folder)
    stream = ImageStream(paths, transform=lambda image, generator: torch.from_numpy(np.array(image)), seed=0)
    order = stream.epoch_order(0)
    for position in range(len(paths)):
        seen_by_training, _ = stream[position]
        path = paths[int(order[position])]
        seen_by_extraction = to_rgb_tensor(path).permute(1, 2, 0)
        assert torch.equal(seen_by_training, seen_by_extraction), path.name
    upright = np.asarray(load_image(photo_folder / "phone.jpg"))
    assert upright.shape == (60, 20, 3)  # portrait once the orientation is applied
    assert upright[5, 10, 0] > 200 and upright[-5, 10, 0] < 60  # the red half is on top


def test_sixteen_bit_images_are_scaled_for_training_too(photo_folder):
    stream = ImageStream([photo_folder / "deep.png"], transform=lambda image, g: np.array(image), seed=0)
    pixels, _ = stream[0]
    values = np.arange(30 * 40, dtype=np.float64).reshape(30, 40) * 50
    assert np.array_equal(pixels[:, :, 0], np.round(values * 255 / 65535).astype(np.uint8))


def test_links_are_followed_and_named_as_given(tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    exif_rotated_jpeg(blobs / "3f2a")  # content-addressed, no extension
    root = tmp_path / "data"
    (root / "cats").mkdir(parents=True)
    os.symlink(blobs / "3f2a", root / "cats" / "cat1.jpg")
    os.symlink(blobs / "3f2a", root / "cats" / "cat2.jpg")
    os.symlink(root, root / "cats" / "loop")  # a cycle is searched once
    (tmp_path / "more").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "more" / "dog.png")
    os.symlink(tmp_path / "more", root / "dogs")  # a linked folder is searched
    found = [p.relative_to(root).as_posix() for p in find_image_files(root)]
    assert found == ["cats/cat1.jpg", "cats/cat2.jpg", "dogs/dog.png"]


def test_an_unreadable_sub_folder_is_named(tmp_path, lock_folders_named):
    root = tmp_path / "data"
    (root / "locked").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "a.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "locked" / "b.png")
    lock_folders_named("locked")
    with pytest.raises(UnreadableFolderError, match="Cannot list the folder '.*locked' \\(Permission denied\\)"):
        find_image_files(root)
    with pytest.raises(OSError, match="locked"):
        find_images(root)  # training names it too
    unreadable = []
    assert find_image_files(root, unreadable=unreadable) == [root / "a.png"]
    assert unreadable == [(root / "locked", "Permission denied")]


def test_a_fifo_named_like_an_image_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(OSError, match=r"it is a FIFO \(named pipe\), not a regular file\.$"):
        load_image(tmp_path / "pipe.jpg")


def test_an_oversized_image_is_refused_from_its_header(tmp_path, monkeypatch):
    import capi_backbones.images as images

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((100, 200, 3), np.uint8)).save(buffer, format="PNG")
    (tmp_path / "big.png").write_bytes(buffer.getvalue())
    monkeypatch.setattr(images, "MAX_PIXELS", 100 * 200 - 1)
    with pytest.raises(OSError, match=r"big\.png.*200 x 100 pixels, more than the 19,999 accepted"):
        load_image(tmp_path / "big.png")


def test_a_socket_named_like_an_image_is_named_once_for_what_it_is(tmp_path):
    import socket

    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "sock.jpg"))
        with pytest.raises(OSError) as caught:
            load_image(tmp_path / "sock.jpg")
    assert str(caught.value) == f"Cannot read image '{tmp_path / 'sock.jpg'}': it is a socket, not a regular file."
