"""The options shared by commands that run a model on images: --model, --weights, --random-init, --device,
--batch-size, --image-size; and --download-timeout, for every command that may download weights."""

import argparse
import sys
from pathlib import Path

from capi_backbones.cli.checks import SMALLEST_ARCHITECTURE, architecture_of
from capi_backbones.cli.errors import USER_ERRORS, CliError
from capi_backbones.constants import DEFAULT_BATCH_SIZE, DEFAULT_IMAGE_SIZE, DOWNLOAD_DEADLINE_S, DOWNLOAD_TIMEOUT_ENV

__all__ = [
    "DEFAULT_MODEL",
    "RANDOM_INIT_SEED",
    "add_download_options",
    "add_model_options",
    "add_weights_options",
    "build_extractor",
    "load_model",
    "model_source",
]

DEFAULT_MODEL = "capi_vitl14_lvd"
RANDOM_INIT_SEED = 0  # --random-init gives the same weights on every run


def add_download_options(parser: argparse.ArgumentParser) -> None:
    """--download-timeout: the deadline of a whole download of weights named by name, URL or hf-hub: (checked by
    ``cli.checks.check_common_options`` before torch is imported; ``main`` hands it to every load)."""
    parser.add_argument(
        "--download-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"give up a download of weights that takes longer than this (default ${DOWNLOAD_TIMEOUT_ENV}, else "
        f"{DOWNLOAD_DEADLINE_S:.0f})",
    )


def add_weights_options(parser: argparse.ArgumentParser) -> None:
    """--model, --weights and --random-init: which weights a command uses (and --download-timeout)."""
    parser.add_argument(
        "--model",
        default=None,
        help=f"pretrained weights name (default {DEFAULT_MODEL} unless --weights is given), or an architecture "
        "name such as capi_vits14 to go with --weights or --random-init",
    )
    parser.add_argument(
        "--weights", default=None, metavar="PATH", help="local checkpoint (.pth/.safetensors); architecture inferred"
    )
    parser.add_argument(
        "--random-init",
        action="store_true",
        help=f"use seeded random weights (the --model architecture, default {SMALLEST_ARCHITECTURE}) instead of "
        "loading any: to try the command offline; the features mean nothing",
    )
    add_download_options(parser)


def add_model_options(parser: argparse.ArgumentParser, *, image_size_note: str = "") -> None:
    """The weights options, plus --device, --batch-size and --image-size: for commands that run images through
    a FeatureExtractor (see :func:`build_extractor`)."""
    add_weights_options(parser)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per forward pass (default %(default)s)"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="shorter side in pixels, a multiple of 14 (default: the size the model was trained at when its file "
        f"records it, else {DEFAULT_IMAGE_SIZE}); the longer side keeps the aspect ratio, rounded to a multiple of "
        f"14{image_size_note}",
    )


def model_source(args: argparse.Namespace) -> str | None:
    """What to pass to FeatureExtractor as the model: --model, or the default weights when neither --model nor
    --weights is given."""
    return args.model if args.model is not None or args.weights is not None else DEFAULT_MODEL


def _device(args: argparse.Namespace) -> str:
    """--device checked here, so that errors name the option rather than the Python argument."""
    import torch

    if args.device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise CliError(f"--device {args.device} is not a device; use --device cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {args.device} was asked for, but CUDA is not available here; use --device cpu.")
    return args.device


def _random_model(args: argparse.Namespace):
    """--random-init: the architecture of --model (or of the default weights) with seeded random weights."""
    import torch

    from capi_backbones.pretrained import resolve_model_spec

    if args.weights is not None:
        raise CliError("--random-init uses random weights; leave out --weights PATH (or leave out --random-init).")
    name = args.model or SMALLEST_ARCHITECTURE
    try:
        arch = resolve_model_spec(name, random_init=True).random_init
    except ValueError:
        raise CliError(f"--model {name} is unknown; with --random-init use e.g. --model capi_vits14.") from None
    chosen = "; the smallest architecture, as no --model was given" if getattr(args, "model_by_default", False) else ""
    print(
        f"--random-init: {arch} with random weights (seed {RANDOM_INIT_SEED}), not pretrained{chosen}", file=sys.stderr
    )
    torch.manual_seed(RANDOM_INIT_SEED)
    return resolve_model_spec(arch, random_init=True).load()


def _check_weights_match_model(args: argparse.Namespace) -> None:
    """--weights with --model: the file must hold that architecture (said in CLI words, before building a model)."""
    expected = architecture_of(args.model)
    if args.weights is None or expected is None or not Path(args.weights).exists():
        return  # (a URL or hf-hub: source is checked by the load itself, rather than downloaded twice)
    from capi_backbones.pretrained import inspect_checkpoint, loading_interface

    try:
        with loading_interface("cli"):
            found = inspect_checkpoint(args.weights).architecture
    except USER_ERRORS:
        return  # an unreadable file: the load reports it
    if found is not None and found != expected:
        raise CliError(
            f"--weights {args.weights} holds {found} weights, but --model {args.model} is {expected}; leave out "
            f"--model (the architecture is read from the file) or give --model {found}."
        )


def _model_and_weights(args: argparse.Namespace):
    """FeatureExtractor's ``model`` and ``weights`` arguments from the weights options."""
    if args.random_init:
        return _random_model(args), None
    _check_weights_match_model(args)
    return model_source(args), args.weights


def load_model(args: argparse.Namespace):
    """(CapiModel, description) from the weights options, for commands that use the model itself."""
    from capi_backbones.features.extractor import resolve_model
    from capi_backbones.pretrained import loading_interface

    model, weights = _model_and_weights(args)
    if args.random_init:
        return model, "random weights, --random-init"
    with loading_interface("cli"):  # offline hints name --weights PATH
        return resolve_model(model, weights)


def build_extractor(args: argparse.Namespace, *, precision: str = "auto", **options):
    """A FeatureExtractor from the shared options, plus command-specific keyword ``options``.

    Without --image-size the FeatureExtractor's default applies (the model's recorded training size, else 224).
    """
    from capi_backbones.features import FeatureExtractor
    from capi_backbones.pretrained import loading_interface

    device = _device(args)
    if precision == "fp16" and not device.startswith("cuda"):
        raise CliError(
            f"--precision fp16 is only allowed on CUDA (device is {device}): fp16 is very slow on CPUs; use "
            "--precision bf16, fp32 or auto."
        )
    if args.image_size is not None:
        options["image_size"] = args.image_size
    model, weights = _model_and_weights(args)
    with loading_interface("cli"):  # offline hints name --weights PATH
        return FeatureExtractor(
            model, weights=weights, device=device, batch_size=args.batch_size, precision=precision, **options
        )
