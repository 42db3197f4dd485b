"""Cosine similarity of one patch's CAPI feature to every patch of the same or another image.

Writes a PNG: the source image with the chosen patch framed | the similarity map over the target image | the
map alone. Colours (coolwarm) span the map's own range: blue = its lowest similarity, red = its highest.
With --interactive (needs matplotlib) click a patch to update the map.

    python examples/patch_similarity.py --image chelsea --row 6 --col 7 --out similarity.png
    python examples/patch_similarity.py --image chelsea --other cat --weights capi_vitl14_lvd.pth
    python examples/patch_similarity.py --random-init --model capi_vits14 --out similarity.png   # offline
Images are skimage.data names (astronaut, coffee, chelsea, cat, rocket, ...) or file paths.
"""

import argparse
from pathlib import Path

import numpy as np
from example_models import add_model_arguments, build_extractor
from PIL import Image, ImageDraw
from skimage import data

from capi_backbones.features import load_image
from capi_backbones.viz import coolwarm, save_png, upsample

PADDING = 8


def open_image(name_or_path: str) -> Image.Image:
    if Path(name_or_path).is_file():
        return load_image(name_or_path)
    if not hasattr(data, name_or_path):
        raise SystemExit(f"'{name_or_path}' is neither an image file nor a skimage.data photo (e.g. chelsea).")
    return Image.fromarray(getattr(data, name_or_path)()).convert("RGB")


def similarity(source: np.ndarray, target: np.ndarray, row: int, col: int) -> np.ndarray:
    """Cosine similarity (h2, w2) of source[row, col] (D,) to every patch of target (h2, w2, D)."""
    query = source[row, col] / np.linalg.norm(source[row, col])
    return (target / np.linalg.norm(target, axis=-1, keepdims=True)) @ query


def similarity_picture(source_img, target_img, sim, row, col, patch: int) -> Image.Image:
    """source with the patch framed | map blended over target | map alone, all at the processed size."""
    scaled = (sim - sim.min()) / max(sim.max() - sim.min(), 1e-12)  # the map's range -> [0, 1]
    heat = Image.fromarray(coolwarm(upsample(scaled, target_img.size[::-1])))
    framed = source_img.copy()
    ImageDraw.Draw(framed).rectangle(
        (col * patch, row * patch, (col + 1) * patch - 1, (row + 1) * patch - 1), outline=(255, 0, 0), width=2
    )
    panels = [framed, Image.blend(target_img, heat, 0.6), heat]
    width = sum(p.width for p in panels) + PADDING * (len(panels) + 1)
    height = max(p.height for p in panels) + 2 * PADDING
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    x = PADDING
    for panel in panels:
        canvas.paste(panel, (x, PADDING))
        x += panel.width + PADDING
    return canvas


def interactive(source_img, target_img, source, target, patch: int) -> None:
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(
            "--interactive needs matplotlib (pip install matplotlib); without it a PNG is written."
        ) from None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 5))
    left.imshow(source_img)
    left.set_title("click a patch")
    right.imshow(target_img)
    shown = right.imshow(
        similarity(source, target, 0, 0),
        cmap="coolwarm",
        vmin=-1,
        vmax=1,
        alpha=0.6,
        extent=(0, target_img.width, target_img.height, 0),
        interpolation="nearest",
    )
    fig.colorbar(shown, ax=right, label="cosine similarity")

    def on_click(event):
        if event.inaxes is left and event.xdata is not None:
            row, col = int(event.ydata) // patch, int(event.xdata) // patch
            sim = similarity(source, target, row, col)
            shown.set_data(sim)
            shown.set_clim(sim.min(), sim.max())
            right.set_title(f"similarity to patch ({row}, {col})")
            fig.canvas.draw_idle()

    fig.canvas.mpl_connect("button_press_event", on_click)
    plt.show()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default="chelsea", help="source image: skimage.data name or path")
    parser.add_argument("--other", default=None, help="target image (default: the source image)")
    parser.add_argument("--row", type=int, default=None, help="patch row in the source grid (default: centre)")
    parser.add_argument("--col", type=int, default=None, help="patch column in the source grid (default: centre)")
    parser.add_argument("--out", default="similarity.png", help="output PNG")
    parser.add_argument("--interactive", action="store_true", help="click patches in a matplotlib window")
    add_model_arguments(parser, image_size=224, image_size_help="shorter side, a multiple of 14")
    args = parser.parse_args()

    extractor = build_extractor(args)
    patch = extractor.model.patch_size
    images = [open_image(args.image), open_image(args.other or args.image)]
    outputs = extractor.extract(images, pooled=False)
    source, target = (out.patch_features[0].numpy() for out in outputs)  # (h, w, D) each
    # show the images as the model saw them: resized to the processed size, patch (r, c) at (c * 14, r * 14)
    source_img, target_img = (img.resize(out.image_size[::-1]) for img, out in zip(images, outputs, strict=True))
    if args.interactive:
        interactive(source_img, target_img, source, target, patch)
        return
    h, w = source.shape[:2]
    row = h // 2 if args.row is None else args.row
    col = w // 2 if args.col is None else args.col
    if not (0 <= row < h and 0 <= col < w):
        parser.error(
            f"patch ({row}, {col}) is outside the source grid of {h} x {w} patches; use 0..{h - 1}, 0..{w - 1}"
        )
    sim = similarity(source, target, row, col)
    print(f"patch ({row}, {col}) of a {h} x {w} grid: similarity min {sim.min():.3f}, max {sim.max():.3f}")
    save_png(similarity_picture(source_img, target_img, sim, row, col, patch), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
