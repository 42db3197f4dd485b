"""``capi-backbones pca``: PCA pictures of CAPI feature maps (one row per image)."""

import argparse
import logging
import sys
from pathlib import Path

from capi_backbones.cli.checks import check_output_file, check_weights_file, plural, progress_wanted
from capi_backbones.cli.errors import USER_ERRORS, CliError
from capi_backbones.cli.model_options import add_model_options, build_extractor
from capi_backbones.constants import (
    DEFAULT_RESAMPLE,
    MAX_ASPECT_RATIO,
    N_RGB,
    PCA_MIN_TILE_HEIGHT,
    PCA_TILE_HEIGHT,
    PCA_VALUE_RANGE,
    RESAMPLE_NAMES,
)
from capi_backbones.runtime.precision import PRECISIONS  # no torch

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
            f"are comparable) and write a PNG grid: per image, the input | the first {N_RGB} components as RGB | each "
            "component as a coolwarm heatmap. Components are whitened and their signs fixed so that each has "
            f"positive skewness; values in [-{PCA_VALUE_RANGE}, {PCA_VALUE_RANGE}] standard deviations fill the colour "
            f"range. Files that cannot be used (unreadable, or more than {MAX_ASPECT_RATIO} times longer than wide) "
            "are reported and left out."
        ),
        epilog="Exit status: 0 all images drawn, 1 some images could not be used (listed), 2 usage error.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGES", help="image files and/or folders (searched recursively)")
    parser.add_argument("--out", required=True, metavar="FILE.png", help="output PNG (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--joint", action="store_true", help="one PCA over all images instead of one per image")
    parser.add_argument(
        "--components",
        type=int,
        default=N_RGB,
        metavar="K",
        help=f"heatmap columns, 1..{MAX_COMPONENTS} (default %(default)s)",
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
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: bf16 autocast where native (CUDA, CPUs with AVX512-BF16 or AMX), else fp32; fp16 needs CUDA",
    )
    parser.add_argument(
        "--square", action="store_true", help="resize every image to an IMAGE_SIZE square instead of keeping its shape"
    )
    parser.add_argument(
        "--tile-height",
        type=int,
        default=PCA_TILE_HEIGHT,
        help="height of each picture in pixels (default %(default)s)",
    )
    parser.add_argument(
        "--resample",
        choices=RESAMPLE_NAMES,
        default=DEFAULT_RESAMPLE,
        help="upsampling of the maps: nearest keeps patches crisp (default), bilinear/bicubic look smoother",
    )
    parser.add_argument("--no-labels", action="store_true", help="leave out the column titles and file names")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar (shown on terminals only)")
    parser.set_defaults(handler=run_pca, check=_check_args)


def _check_args(args: argparse.Namespace) -> Path:
    """Everything that can be checked before torch is imported (the shared options: see cli.checks)."""
    out = check_output_file(args.out, (".png",), flag="--out", overwrite=args.overwrite)
    if not 1 <= args.components <= MAX_COMPONENTS:
        raise CliError(f"--components must be between 1 and {MAX_COMPONENTS}, got {args.components}.")
    if args.tile_height < PCA_MIN_TILE_HEIGHT:
        raise CliError(f"--tile-height must be at least {PCA_MIN_TILE_HEIGHT} pixels, got {args.tile_height}.")
    check_weights_file(args.weights)
    return out


def _row_label(source) -> str:
    return Path(source).name if isinstance(source, str | Path) else str(source)


def _features(args: argparse.Namespace, sources: list) -> tuple[list, list, list[str], dict[str, str]]:
    """Read and run the model on the images, a batch at a time with a progress bar.

    Returns (images, (h, w, D) feature maps, row labels, failed) where failed maps each unreadable path to why.
    """
    from tqdm.auto import tqdm

    from capi_backbones.features import load_image

    extractor = build_extractor(args, keep_aspect=not args.square, precision=args.precision)
    images, maps, labels, failed = [], [], [], {}
    with tqdm(total=len(sources), desc="pca", unit="img", disable=not progress_wanted(args)) as bar:
        for start in range(0, len(sources), args.batch_size):
            batch, batch_labels = [], []
            for source in sources[start : start + args.batch_size]:
                try:
                    image = load_image(source)
                except OSError as error:  # load_image names the file and the decoder's complaint
                    failed[str(source)] = str(error)
                    continue
                try:
                    extractor.preprocessor.check_size(image.height, image.width)  # the size cap extract applies
                except ValueError:
                    failed[str(source)] = (
                        f"{image.width}x{image.height} pixels, more than {MAX_ASPECT_RATIO} times longer than wide; "
                        "crop it, or add --square"
                    )
                    continue
                batch.append(image)
                batch_labels.append(_row_label(source))
            if batch:
                outputs = extractor.extract(batch, pooled=False)
                maps.extend(output.patch_features[0].numpy() for output in outputs)  # (h, w, D) each
                images.extend(batch)
                labels.extend(batch_labels)
            bar.update(len(sources[start : start + args.batch_size]))
    return images, maps, labels, failed


def run_pca(args: argparse.Namespace) -> int:
    out = _check_args(args)
    from capi_backbones.cli.checks import unreadable_folders
    from capi_backbones.features import expand_inputs
    from capi_backbones.viz import joint_pca_maps, pca_grid, pca_map, save_png

    try:
        unreadable = []  # sub-folders that cannot be listed: named and left out, exit 1 (as extract does)
        sources = expand_inputs(args.images, unreadable=unreadable)  # missing or non-image paths fail first
        images, maps, labels, failed = _features(args, sources)
        failed |= unreadable_folders(unreadable)
        for name, message in failed.items():
            print(f"failed: {name}: {message}", file=sys.stderr)
        if not images:
            print(f"none of the {plural(len(sources), 'image')} could be used; nothing written", file=sys.stderr)
            return 1
        options = dict(n_components=args.components, foreground_threshold=args.foreground_threshold)
        results = joint_pca_maps(maps, **options) if args.joint else [pca_map(m, **options) for m in maps]
        grid = pca_grid(
            images,
            results,
            tile_height=args.tile_height,
            resample=args.resample,
            labels=not args.no_labels,
            row_labels=labels,
        )
        save_png(grid, out)
    except USER_ERRORS as error:
        logger.debug("pca failed", exc_info=True)  # the traceback, with --verbose
        raise CliError.from_exception(error) from error
    kind = "joint PCA" if args.joint else "per-image PCA"
    print(
        f"wrote {out} ({plural(len(images), 'image')}, {kind}, {grid.width}x{grid.height} px), {len(failed)} failed",
        file=sys.stderr,
    )
    return 1 if failed else 0
