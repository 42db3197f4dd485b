"""``capi-backbones pca``: PCA pictures of CAPI feature maps (one row per image)."""

import argparse
import logging
import sys
from pathlib import Path

from capi_backbones.cli.errors import USER_ERRORS, CliError
from capi_backbones.cli.model_options import add_model_options, build_extractor
from capi_backbones.models import ARCHITECTURES

__all__ = ["register"]

logger = logging.getLogger(__name__)

MAX_COMPONENTS = 12  # heatmap columns; more make an unreadably wide picture


def register(subparsers) -> None:
    """Add this module's subcommands to ``subparsers``."""
    parser = subparsers.add_parser(
        "pca",
        help="PCA picture of the feature maps of images",
        description=(
            "Fit a PCA on the patch features of each image (or, with --joint, one PCA on all images so that colours "
            "are comparable) and write a PNG grid: per image, the input | the first 3 components as RGB | each "
            "component as a coolwarm heatmap. Components are whitened and their signs fixed so that each has "
            "positive skewness; values in [-2.3, 2.3] standard deviations fill the colour range."
        ),
    )
    parser.add_argument("images", nargs="+", metavar="IMAGES", help="image files and/or folders (searched recursively)")
    parser.add_argument("--out", required=True, metavar="FILE.png", help="output PNG (written atomically)")
    parser.add_argument("--joint", action="store_true", help="one PCA over all images instead of one per image")
    parser.add_argument(
        "--components", type=int, default=3, metavar="K", help=f"heatmap columns, 1..{MAX_COMPONENTS} (default 3)"
    )
    parser.add_argument(
        "--foreground-threshold",
        type=float,
        default=None,
        metavar="T",
        help="keep patches whose whitened first component is above T (in standard deviations; 0 = the mean), "
        "refit the PCA on them and show the rest black. Look at the component 1 column of a run without it "
        "to choose T",
    )
    add_model_options(parser, image_size_note=". Larger sizes give finer maps (448: 32 patches on the shorter side)")
    parser.add_argument("--tile-height", type=int, default=224, help="height of each picture in pixels (default 224)")
    parser.add_argument(
        "--resample",
        choices=("nearest", "bilinear", "bicubic"),
        default="nearest",
        help="upsampling of the maps: nearest keeps patches crisp (default), bilinear/bicubic look smoother",
    )
    parser.add_argument("--no-labels", action="store_true", help="leave out the column titles")
    parser.set_defaults(handler=run_pca)


def _check_args(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise CliError(f"--out must be a .png file, got '{args.out}'.")
    if out.is_dir():
        raise CliError(f"--out '{args.out}' is a folder; give a file name ending in .png.")
    if not 1 <= args.components <= MAX_COMPONENTS:
        raise CliError(f"--components must be between 1 and {MAX_COMPONENTS}, got {args.components}.")
    if args.tile_height < 16:
        raise CliError(f"--tile-height must be at least 16 pixels, got {args.tile_height}.")
    if args.model in ARCHITECTURES and args.weights is None:
        raise CliError(
            f"--model {args.model} is an architecture without weights; add --weights PATH, or name released "
            "weights such as --model capi_vitl14_lvd (see 'capi-backbones list')."
        )
    return out


def run_pca(args: argparse.Namespace) -> int:
    out = _check_args(args)
    from capi_backbones.features import expand_inputs, load_image
    from capi_backbones.viz import joint_pca_maps, pca_grid, pca_map, save_png

    try:
        sources = expand_inputs(args.images)  # fail on missing or non-image paths before loading a model
        images = [load_image(source) for source in sources]
        extractor = build_extractor(args)
        outputs = extractor.extract(images, pooled=False)
        maps = [output.patch_features[0].numpy() for output in outputs]  # (h, w, D) each
        options = dict(n_components=args.components, foreground_threshold=args.foreground_threshold)
        results = joint_pca_maps(maps, **options) if args.joint else [pca_map(m, **options) for m in maps]
        grid = pca_grid(
            images, results, tile_height=args.tile_height, resample=args.resample, labels=not args.no_labels
        )
        save_png(grid, out)
    except USER_ERRORS as error:
        logger.debug("pca failed", exc_info=True)  # the traceback, with --verbose
        raise CliError.from_exception(error) from error
    kind = "joint PCA" if args.joint else "per-image PCA"
    print(f"wrote {out} ({len(images)} images, {kind}, {grid.width}x{grid.height} px)", file=sys.stderr)
    return 0
