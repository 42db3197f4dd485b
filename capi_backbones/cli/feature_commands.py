"""``capi-backbones extract``: features of image files and folders, written to resumable shards; ``capi-backbones
verify``: check such a folder against its index."""

import argparse
import logging
import sys

from capi_backbones.cli.checks import progress_wanted
from capi_backbones.cli.errors import USER_ERRORS, CliError
from capi_backbones.cli.model_options import add_model_options, build_extractor
from capi_backbones.constants import (
    CLI_DECODE_WORKERS,
    DEFAULT_SHARD_FORMAT,
    DEFAULT_SHARD_SIZE,
    DEFAULT_STORAGE_DTYPE,
    SHARD_FORMATS,
    STORAGE_DTYPE_NAMES,
)
from capi_backbones.runtime.precision import PRECISIONS  # no torch

__all__ = ["register"]

logger = logging.getLogger(__name__)

EXIT_STATUS = (
    "Exit status: 0 all images done; 1 finished, but some images could not be used (listed); 2 usage or input "
    "error (also: another run is writing --out); 3 environment failure (disk full, no permission), naming the path; "
    "128+N stopped by signal N after saving the finished images (Ctrl-C: 130, SIGTERM: 143)."
)


def register(subparsers) -> None:
    """Add this module's subcommands to ``subparsers``."""
    parser = subparsers.add_parser(
        "extract",
        help="extract features of images into shards on disk",
        description=(
            "Extract CAPI features (patch features, predictor-pooled embedding, registers) of image files and "
            "folders (searched recursively) into safetensors or .npy shards with an index.json. Re-running into "
            "the same --out folder checks the shards listed there and skips the images already done; unreadable "
            "images are reported and skipped (and skipped by later runs until the file changes). One run writes a "
            "folder at a time. Many processes: torchrun --nproc_per_node N -m capi_backbones.cli.main extract ... "
            "splits the images between the ranks and writes one index; an interrupted run resumes with any number "
            "of processes."
        ),
        epilog=EXIT_STATUS,
    )
    parser.add_argument("images", nargs="+", metavar="IMAGES", help="image files and/or folders")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created; resumed if it exists)")
    add_model_options(parser)
    parser.add_argument("--square", action="store_true", help="resize every image to an IMAGE_SIZE square instead")
    parser.add_argument("--format", choices=SHARD_FORMATS, default=DEFAULT_SHARD_FORMAT, help="shard format")
    parser.add_argument(
        "--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="images per shard (default %(default)s)"
    )
    parser.add_argument("--dtype", choices=STORAGE_DTYPE_NAMES, default=DEFAULT_STORAGE_DTYPE, help="storage dtype")
    parser.add_argument(
        "--workers",
        type=int,
        default=CLI_DECODE_WORKERS,
        help="image decoding processes (default %(default)s; 0: none)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: bf16 autocast where native (CUDA, CPUs with AVX512-BF16 or AMX), else fp32; fp16 needs CUDA",
    )
    parser.add_argument("--no-pooled", action="store_true", help="skip the predictor: patch features and registers")
    parser.add_argument("--retry-failed", action="store_true", help="try again images that failed in earlier runs")
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the progress bar (shown only when stderr is a terminal)"
    )
    parser.set_defaults(handler=run_extract, check=check_extract_arguments)

    verify = subparsers.add_parser(
        "verify",
        help="check an extraction folder against its index",
        description=(
            "Check a folder written by extract against its index.json: every listed shard is present, has the size "
            "recorded when it was written, can be read, and holds the listed images and counts."
        ),
        epilog="Exit status: 0 intact; 1 problems found (each named); 2 not an extraction folder.",
    )
    verify.add_argument("folder", metavar="DIR", help="output folder of extract")
    verify.set_defaults(handler=run_verify)


def check_extract_arguments(args: argparse.Namespace) -> None:
    """extract's own checks, run by ``main`` before torch is imported (after ``cli.checks.check_common_options``,
    which checks the image paths and the shared numbers, --image-size among them): the output folder (an empty
    path, a file, or a folder extract did not write are refused before anything is created or deleted)."""
    from capi_backbones.features.index import check_output_folder

    try:
        check_output_folder(args.out)
    except ValueError as error:
        raise CliError.from_exception(error) from error


def run_extract(args: argparse.Namespace) -> int:
    from capi_backbones.features import FolderBusyError

    context = _join_process_group(args)
    try:
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
            progress=progress_wanted(args),  # terminals only: no bars written into logs
            retry_failed=args.retry_failed,
        )
    except (*USER_ERRORS, FolderBusyError) as error:
        logger.debug("extract failed", exc_info=True)  # the traceback, with --verbose
        raise CliError.from_exception(error) from error
    except OSError as error:  # disk full or no permission (exit 3, see cli.errors): name at least the folder
        if error.filename is None and error.errno is not None:
            raise OSError(error.errno, error.strerror, args.out) from error
        raise
    except KeyboardInterrupt:  # the finished images are saved: a further Ctrl-C ends the exit at once, quietly
        from capi_backbones.runtime.signals import quiet_after_stop

        quiet_after_stop()
        raise
    finally:
        if context is not None:
            from capi_backbones.runtime.distributed import shutdown_distributed

            shutdown_distributed(context)
    if context is not None and context.rank != 0:
        return 1 if summary.failed or summary.failed_before else 0  # rank 0 reports for the whole run
    print(
        f"{summary.n_written} images written in {len(summary.shards)} shard(s), {summary.n_skipped} already done, "
        f"{len(summary.failed)} failed, {len(summary.failed_before)} skipped as failed before; "
        f"index: {summary.index_path}",
        file=sys.stderr,
    )
    for name, message in summary.failed.items():
        print(f"failed: {name}: {message}", file=sys.stderr)
    for name, message in summary.failed_before.items():
        print(f"failed before (unchanged, skipped; --retry-failed to retry): {name}: {message}", file=sys.stderr)
    return 1 if summary.failed or summary.failed_before else 0


def _join_process_group(args: argparse.Namespace):
    """Under torchrun (WORLD_SIZE > 1): join the process group and pick this rank's device. Else None."""
    from capi_backbones.runtime.ranks import env_world_size

    if env_world_size() <= 1:
        return None
    from capi_backbones.runtime.distributed import init_distributed

    context = init_distributed("cpu" if args.device == "cpu" else "auto", option="--device ")
    if args.device is None or args.device == "cuda":
        args.device = str(context.device)  # one GPU per rank
    return context


def run_verify(args: argparse.Namespace) -> int:
    from capi_backbones.features import verify_output

    try:
        report = verify_output(args.folder)
    except USER_ERRORS as error:
        raise CliError.from_exception(error) from error
    for problem in report.problems:
        print(f"problem: {problem}", file=sys.stderr)
    for name in report.unmerged_ranks:
        print(f"note: {name} is the manifest of an interrupted multi-rank run; extract merges it", file=sys.stderr)
    for name in report.leftovers:
        print(f"note: {name} is not listed in the index; the next extract deletes it", file=sys.stderr)
    state = "OK" if report.ok else f"{len(report.problems)} problem(s)"
    print(
        f"{report.out_dir}: {state}; {report.n_shards} shard(s), {report.n_images} images, {report.n_failed} failed",
        file=sys.stderr,
    )
    return 0 if report.ok else 1
