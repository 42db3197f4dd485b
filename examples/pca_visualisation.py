"""PCA of CAPI feature maps of real photos (the paper's Fig. 7, 12, 13), written as a PNG grid.

Per photo: the input | components 1-3 as RGB | each component as a coolwarm heatmap. Components are whitened and
sign-fixed (positive skewness); --joint fits one PCA on all photos so that colours mean the same thing everywhere.

    python examples/pca_visualisation.py --out pca.png --joint                # released ViT-L/14 (LVD-142M)
    python examples/pca_visualisation.py --weights capi_vitl14_lvd.pth --image-size 448 --out pca.png
    python examples/pca_visualisation.py --random-init --model capi_vits14 --out pca.png   # offline
"""

import argparse

from example_models import add_model_arguments, build_extractor
from PIL import Image
from skimage import data

from capi_backbones.viz import joint_pca_maps, pca_grid, pca_map, save_png

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")  # from skimage.data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="pca.png", help="output PNG")
    parser.add_argument("--photos", nargs="+", default=PHOTOS, help=f"skimage.data names (default {PHOTOS})")
    parser.add_argument("--joint", action="store_true", help="one PCA over all photos")
    parser.add_argument("--components", type=int, default=3, help="heatmap columns")
    parser.add_argument("--foreground-threshold", type=float, default=None, help="mask: component 1 above T (std)")
    add_model_arguments(parser, image_size=448, image_size_help="shorter side, a multiple of 14 (448: 32 patches)")
    parser.add_argument("--tile-height", type=int, default=224, help="height of each picture in the grid")
    args = parser.parse_args()

    photos = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in args.photos]
    extractor = build_extractor(args)
    maps = [out.patch_features[0].numpy() for out in extractor.extract(photos, pooled=False)]  # (h, w, D) each
    options = dict(n_components=args.components, foreground_threshold=args.foreground_threshold)
    results = joint_pca_maps(maps, **options) if args.joint else [pca_map(m, **options) for m in maps]
    for name, result in zip(args.photos, results, strict=True):
        ratios = ", ".join(f"{r:.2f}" for r in result.explained_variance_ratio)
        print(f"{name}: grid {result.grid_size}, explained variance ratio {ratios}")
    save_png(pca_grid(photos, results, tile_height=args.tile_height), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
