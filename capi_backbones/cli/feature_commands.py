"""``capi-backbones extract``: features of image files and folders, written to resumable shards."""

import argparse
import logging
import sys

from capi_backbones.cli.errors import USER_ERRORS, CliError
from capi_backbones.cli.model_options import add_model_options, build_extractor

__all__ = ["register"]

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    """Add this module's subcommands to ``subparsers``."""
    parser = subparsers.add_parser(
        "extract",
        help="extract features of images into shards on disk",
        description=(
            "Extract CAPI features (patch features, predictor-pooled embedding, registers) of image files and "
            "folders (searched recursively) into safetensors or .npy shards with an index.json. Re-running into "
            "the same --out folder skips the images already done; unreadable images are reported and skipped."
        ),
        epilog="Exit status: 0 all images done, 1 some images could not be read (listed), 2 usage error.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGES", help="image files and/or folders")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created; resumed if it exists)")
    add_model_options(parser)
    parser.add_argument("--square", action="store_true", help="resize every image to an IMAGE_SIZE square instead")
    parser.add_argument("--format", choices=("safetensors", "npy"), default="safetensors", help="shard format")
    parser.add_argument("--shard-size", type=int, default=256, help="images per shard (default 256)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="storage dtype")
    parser.add_argument("--workers", type=int, default=2, help="image decoding processes (default 2; 0: none)")
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="auto: bf16 autocast on CUDA, fp32 on CPU; bf16/fp16 need CUDA",
    )
    parser.add_argument("--no-pooled", action="store_true", help="skip the predictor: patch features and registers")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=run_extract)


def run_extract(args: argparse.Namespace) -> int:
    from capi_backbones.features import expand_inputs

    try:
        expand_inputs(args.images)  # fail on missing or non-image paths before loading a model
        extractor = build_extractor(
            args,
            keep_aspect=not args.square,
            precision=args.precision,
            num_workers=args.workers,
        )
        summary = extractor.extract_to_disk(
            args.images,
            args.out,
            format=args.format,
            shard_size=args.shard_size,
            pooled=not args.no_pooled,
            dtype=args.dtype,
            progress=not args.no_progress,
        )
    except USER_ERRORS as error:
        logger.debug("extract failed", exc_info=True)  # the traceback, with --verbose
        raise CliError.from_exception(error) from error
    print(
        f"{summary.n_written} images written in {len(summary.shards)} shard(s), {summary.n_skipped} already done, "
        f"{len(summary.failed)} failed; index: {summary.index_path}",
        file=sys.stderr,
    )
    for name, message in summary.failed.items():
        print(f"failed: {name}: {message}", file=sys.stderr)
    return 1 if summary.failed else 0
