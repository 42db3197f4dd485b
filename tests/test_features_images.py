"""Image inputs: every accepted input type, PIL mode conversions against hand-computed RGB, EXIF orientation,
file discovery and the errors for bad inputs."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from capi_backbones.features import expand_inputs, find_image_files, load_image, pil_to_rgb, to_rgb_tensor


def rgb_of(image) -> np.ndarray:
    """(H, W, 3) uint8 array of what the library decodes."""
    return to_rgb_tensor(image).permute(1, 2, 0).numpy()


def test_rgb_inputs_of_every_type_agree():
    rgb = data.astronaut()[::8, ::8]  # (64, 64, 3)
    as_pil = Image.fromarray(rgb)
    for image in (rgb, as_pil, torch.from_numpy(rgb).permute(2, 0, 1)):
        assert np.array_equal(rgb_of(image), rgb)
    float_tensor = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    assert torch.equal(to_rgb_tensor(float_tensor), float_tensor)  # floats in [0, 1] are kept as floats


def test_rgba_array_drops_alpha_and_grayscale_array_is_replicated():
    logo = data.logo()  # (500, 500, 4) RGBA
    assert np.array_equal(rgb_of(logo), logo[:, :, :3])
    gray = data.camera()[::8, ::8]
    expected = np.repeat(gray[:, :, None], 3, axis=2)
    assert np.array_equal(rgb_of(gray), expected)
    assert np.array_equal(rgb_of(gray[:, :, None]), expected)
    assert np.array_equal(rgb_of(torch.from_numpy(gray)[None]), expected)  # (1, H, W) tensor


def test_batched_tensor_and_directory_expand_in_order(tmp_path):
    batch = torch.rand(3, 3, 28, 42)
    assert [t.shape for t in expand_inputs(batch)] == [(3, 28, 42)] * 3
    (tmp_path / "b" / "c").mkdir(parents=True)
    for name in ("b/c/z.png", "b/a.JPG", "a.jpeg", ".hidden.png", "notes.txt"):
        Image.fromarray(data.astronaut()[:16, :16]).save(tmp_path / name, format="PNG")
    found = [p.relative_to(tmp_path).as_posix() for p in find_image_files(tmp_path)]
    assert found == ["a.jpeg", "b/a.JPG", "b/c/z.png"]  # recursive, sorted, by extension, hidden skipped
    expanded = expand_inputs([str(tmp_path / "b"), tmp_path / "a.jpeg"])
    assert [p.name for p in expanded] == ["a.JPG", "z.png", "a.jpeg"]


def test_grayscale_image_becomes_equal_rgb_channels():
    gray = data.camera()[::8, ::8]
    assert np.array_equal(rgb_of(Image.fromarray(gray, mode="L")), np.repeat(gray[:, :, None], 3, axis=2))


def test_rgba_image_keeps_colours_and_drops_alpha():
    rgba = data.logo()[::4, ::4]
    assert np.array_equal(rgb_of(Image.fromarray(rgba, mode="RGBA")), rgba[:, :, :3])


def test_palette_image_maps_through_its_palette():
    quantized = Image.fromarray(data.coffee()[::8, ::8]).quantize(colors=16)
    assert quantized.mode == "P"
    palette = np.array(quantized.getpalette(), dtype=np.uint8).reshape(-1, 3)
    expected = palette[np.asarray(quantized)]  # look up each index by hand
    assert np.array_equal(rgb_of(quantized), expected)


def test_palette_image_with_transparency_drops_alpha(tmp_path):
    quantized = Image.fromarray(data.coffee()[::8, ::8]).quantize(colors=8)
    quantized.info["transparency"] = 0
    path = tmp_path / "p.png"
    quantized.save(path, transparency=0)
    palette = np.array(quantized.getpalette(), dtype=np.uint8).reshape(-1, 3)
    assert np.array_equal(rgb_of(path), palette[np.asarray(quantized)])


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path, dtype):
    values = np.array([[0, 257, 1000], [32896, 60000, 65535]], dtype=dtype)
    image = Image.fromarray(values)
    assert image.mode == ("I;16" if dtype == np.uint16 else "I")
    expected = np.round(values.astype(np.float64) / 257).astype(np.uint8)  # 65535 -> 255, 32896 -> 128
    assert expected.tolist() == [[0, 1, 4], [128, 233, 255]]
    assert np.array_equal(rgb_of(image), np.repeat(expected[:, :, None], 3, axis=2))
    path = tmp_path / "deep.png"  # a 16-bit PNG round trip (Pillow opens it as I;16 or I)
    Image.fromarray(values.astype(np.uint16)).save(path)
    assert np.array_equal(rgb_of(path), np.repeat(expected[:, :, None], 3, axis=2))


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((40, 60, 3), dtype=np.uint8)  # landscape as stored in the file
    stored[:20, :30] = (255, 0, 0)  # red top-left quadrant
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation 6: display rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    decoded = np.asarray(load_image(path))
    assert decoded.shape == (60, 40, 3)  # portrait once rotated
    raw = np.asarray(Image.open(path).convert("RGB"))  # the same pixels without the orientation
    assert np.array_equal(decoded, np.rot90(raw, k=-1))  # clockwise
    assert decoded[5, -5, 0] > 200 and decoded[5, 5, 0] < 50  # red moved to the top-right corner
    assert np.array_equal(rgb_of(path), decoded)
    assert np.array_equal(rgb_of(Image.open(path)), decoded)  # an opened PIL image still carries the tag


def test_pil_to_rgb_refuses_out_of_range_32_bit_values():
    with pytest.raises(ValueError, match="outside the supported range"):
        pil_to_rgb(Image.fromarray(np.array([[0, 70000]], dtype=np.int32)))


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (np.zeros((8, 8, 3), dtype=np.float32), TypeError, "uint8"),
        (np.zeros((3, 8, 8), dtype=np.uint8), ValueError, "HWC"),
        (np.zeros((8, 8, 2), dtype=np.uint8), ValueError, r"\(H, W, 3\)"),
        (torch.zeros(8, 8, 3), ValueError, "Channels go first"),
        (torch.full((3, 8, 8), 2.0), ValueError, "un-normalised"),
        (torch.zeros(3, 8, 8, dtype=torch.int64), TypeError, "uint8 or floating"),
    ],
)
def test_bad_arrays_and_tensors_are_refused(bad, error, match):
    with pytest.raises(error, match=match):
        to_rgb_tensor(bad)


def test_bad_paths_are_refused_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        expand_inputs(tmp_path / "missing.jpg")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No image files found"):
        expand_inputs(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not an image file"):
        expand_inputs(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="No images given"):
        expand_inputs([])
    with pytest.raises(TypeError, match="Unsupported image input of type int"):
        expand_inputs([3])


def test_corrupt_file_error_names_the_file(tmp_path):
    path = tmp_path / "broken.jpg"
    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[:200])  # truncated JPEG
    with pytest.raises(OSError, match="broken.jpg"):
        load_image(path)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(OSError, match="text.png"):
        to_rgb_tensor(tmp_path / "text.png")
