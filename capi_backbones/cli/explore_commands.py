"""``capi-backbones explore``: one self-contained HTML page to explore the features of photos (and compare two
models). See :mod:`capi_backbones.viz.explore`."""

import argparse
import copy
import logging
import sys
from pathlib import Path

from capi_backbones.cli.checks import check_output_file
from capi_backbones.cli.errors import USER_ERRORS, CliError
from capi_backbones.cli.model_options import add_model_options, build_extractor
from capi_backbones.constants import (
    EXPLORER_MAX_PATCHES,
    EXPLORER_MAX_PHOTOS,
    EXPLORER_MAX_STORED_VALUES,
    EXPLORER_TITLE,
)
from capi_backbones.models import ARCHITECTURES

__all__ = ["register"]

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    """Add this module's subcommand to ``subparsers``."""
    parser = subparsers.add_parser(
        "explore",
        help="interactive feature explorer: one self-contained HTML page",
        description=(
            "Write one HTML page (no server, no network: open it from disk in Chromium or Firefox, or send it) that "
            "shows the photos with their PCA maps (per image or joint, foreground threshold slider) and, for a "
            "clicked patch, its cosine similarity to every patch of every photo as heatmaps, with the photos ranked "
            "by the similarity of their pooled embeddings. With --compare-weights, --compare-model or "
            "--compare-random-init a second model is shown side by side. Limits per page: "
            f"{EXPLORER_MAX_PHOTOS} photos, {EXPLORER_MAX_PATCHES} patches per model, {EXPLORER_MAX_STORED_VALUES} "
            "stored feature values (patches x dimensions, both models): "
            "the page says what it stores and how exact the similarities are."
        ),
        epilog="Exit status: 0 page written, 1 page written but some images could not be read (listed), "
        "2 usage error or inputs over a limit.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGES", help="image files and/or folders (searched recursively)")
    parser.add_argument("--out", required=True, metavar="FILE.html", help="output page (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_model_options(parser, image_size_note=" (both models use the same size)")
    compare = parser.add_argument_group("second model, shown side by side")
    compare.add_argument("--compare-model", default=None, metavar="NAME", help="weights name or architecture")
    compare.add_argument("--compare-weights", default=None, metavar="PATH", help="local checkpoint")
    compare.add_argument(
        "--compare-random-init",
        action="store_true",
        help="random weights of the --compare-model architecture (default: the first model's), to see what "
        "pretraining changed",
    )
    parser.add_argument("--name", default=None, help="label of the first model on the page (default: its source)")
    parser.add_argument("--compare-name", default=None, help="label of the second model on the page")
    parser.add_argument(
        "--dims",
        type=int,
        default=None,
        metavar="K",
        help="store K dimensions per patch (a projection; the page states the error measured) instead of all: for "
        "pages over the stored-values limit",
    )
    parser.add_argument("--title", default=EXPLORER_TITLE, help="page title (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(handler=run_explore)


def _comparing(args: argparse.Namespace) -> bool:
    return args.compare_model is not None or args.compare_weights is not None or args.compare_random_init


def _check_args(args: argparse.Namespace) -> Path:
    out = check_output_file(args.out, (".html", ".htm"), flag="--out", overwrite=args.overwrite)
    if args.dims is not None and args.dims < 1:
        raise CliError(f"--dims must be a positive number of dimensions, got {args.dims}.")
    for prefix in ("", "compare_"):
        model, weights, random_init = (getattr(args, prefix + key) for key in ("model", "weights", "random_init"))
        option = "--" + prefix.replace("_", "-")
        if model in ARCHITECTURES and weights is None and not random_init:
            raise CliError(
                f"{option}model {model} is an architecture without weights; add {option}weights PATH (or "
                f"{option}random-init), or name released weights such as {option}model capi_vitl14_lvd."
            )
    if args.compare_random_init and args.compare_weights is not None:
        raise CliError("--compare-random-init uses random weights; leave out --compare-weights PATH.")
    if args.compare_name is not None and not _comparing(args):
        raise CliError(
            "--compare-name names a second model; add --compare-model, --compare-weights or --compare-random-init."
        )
    return out


def _second_model_args(args: argparse.Namespace, first_model=None) -> argparse.Namespace:
    """The first model's options with the --compare-* ones in their place. ``first_model`` (loaded) gives the
    architecture of --compare-random-init after --weights PATH."""
    second = copy.copy(args)
    second.random_init = args.compare_random_init
    second.weights = args.compare_weights
    if args.compare_model is not None:
        second.model = args.compare_model
    elif args.compare_random_init:
        second.model = args.model  # same architecture (the default weights' one when --model is not given)
        if args.weights is not None:
            second.model = None if first_model is None else _architecture_of(first_model)
    else:
        second.model = None  # --compare-weights alone: architecture read off the checkpoint
    return second


def _architecture_of(model) -> str:
    """The name of the architecture of a loaded model (for --compare-random-init after --weights PATH)."""
    wanted = {k: v for k, v in model.config.to_dict().items() if k != "drop_path_rate"}
    for name, config in ARCHITECTURES.items():
        if {k: v for k, v in config.to_dict().items() if k != "drop_path_rate"} == wanted:
            return name
    raise CliError(
        "--compare-random-init: the --weights checkpoint has an architecture of its own; name the random one with "
        f"--compare-model ({', '.join(ARCHITECTURES)})."
    )


def _name(model_args: argparse.Namespace, given: str | None) -> str:
    """A model's label on the page: --name/--compare-name, else where its weights come from."""
    from capi_backbones.cli.model_options import DEFAULT_MODEL

    if given:
        return given
    weights = model_args.weights
    source = Path(weights).name if weights is not None else model_args.model or DEFAULT_MODEL
    return f"{source} (random init)" if model_args.random_init else source


def _load_photos(sources: list) -> tuple[list, list[str], dict[str, str]]:
    from capi_backbones.features import load_image

    images, labels, failed = [], [], {}
    for source in sources:
        try:
            images.append(load_image(source))
            labels.append(Path(source).name)
        except OSError as error:  # load_image names the file and the decoder's complaint
            failed[str(source)] = str(error)
    return images, labels, failed


def _known_width(model: str | None, weights: str | None) -> int | None:
    """The feature dimension of --model NAME without loading it (None for --weights PATH: read off the file)."""
    from capi_backbones.cli.model_options import DEFAULT_MODEL
    from capi_backbones.weights_registry import get_weights

    if weights is not None:
        return None
    name = model or DEFAULT_MODEL
    try:
        return ARCHITECTURES[name if name in ARCHITECTURES else get_weights(name).arch].embed_dim
    except ValueError:
        return None  # an unknown name: the loader says so


def _check_before_loading(args: argparse.Namespace, images: list) -> None:
    """The page limits with the sizes known before any model loads: --image-size (else the default) and, for
    named models, their feature width."""
    from capi_backbones.constants import DEFAULT_IMAGE_SIZE
    from capi_backbones.features import Preprocessor
    from capi_backbones.viz.explore import check_limits

    preprocessor = Preprocessor(image_size=args.image_size or DEFAULT_IMAGE_SIZE)
    sizes = [preprocessor.output_size(image.height, image.width) for image in images]
    n_patches = sum(h * w for h, w in sizes) // preprocessor.patch_size**2
    check_limits(len(images), n_patches)
    widths = [_known_width(args.model, args.weights)]
    if _comparing(args):
        second = _second_model_args(args)
        widths.append(_known_width(second.model, second.weights))
    if args.dims is not None:
        widths = [args.dims] * len(widths)
    if None not in widths:
        check_limits(len(images), n_patches, n_patches * sum(widths))


def run_explore(args: argparse.Namespace) -> int:
    out = _check_args(args)
    from capi_backbones.cli.checks import unreadable_folders
    from capi_backbones.features import expand_inputs
    from capi_backbones.viz.explore import (
        build_explorer,
        check_extractor_limits,
        check_limits,
        extract_model_features,
    )

    try:
        unreadable = []  # sub-folders that cannot be listed: named and left out, exit 1 (as extract does)
        sources = expand_inputs(args.images, unreadable=unreadable)  # missing or non-image paths fail first
        check_limits(len(sources))
        images, labels, failed = _load_photos(sources)
        failed |= unreadable_folders(unreadable)
        for name, message in failed.items():
            print(f"failed: {name}: {message}", file=sys.stderr)
        if not images:
            print(f"none of the {len(sources)} images could be read; nothing written", file=sys.stderr)
            return 1
        _check_before_loading(args, images)
        extractors, names = [build_extractor(args)], [_name(args, args.name)]
        if _comparing(args):
            second = _second_model_args(args, extractors[0].model)
            second.image_size = extractors[0].image_size  # one patch grid for both
            extractors.append(build_extractor(second))
            names.append(_name(second, args.compare_name))
        check_extractor_limits(images, extractors, args.dims)  # with the model's default size and width
        models = []
        for extractor, name in zip(extractors, names, strict=True):
            models.append(extract_model_features(images, extractor, name=name, progress=not args.no_progress))
        print("building the page (PCA maps at every threshold, features as float16)", file=sys.stderr)
        page = build_explorer(images, models, labels=labels, dims=args.dims, title=args.title)
        from capi_backbones.atomic_files import atomic_write_text

        atomic_write_text(out, page)
    except USER_ERRORS as error:
        logger.debug("explore failed", exc_info=True)  # the traceback, with --verbose
        raise CliError.from_exception(error) from error
    size_mb = out.stat().st_size / 1e6
    print(
        f"wrote {out} ({len(images)} photos, {len(models)} model(s), {size_mb:.1f} MB), {len(failed)} failed",
        file=sys.stderr,
    )
    return 1 if failed else 0
