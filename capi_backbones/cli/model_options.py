"""The options shared by commands that run a model on images: --model, --weights, --device, --batch-size,
--image-size."""

import argparse

from capi_backbones.constants import DEFAULT_IMAGE_SIZE

__all__ = ["DEFAULT_MODEL", "add_model_options", "build_extractor", "model_source"]

DEFAULT_MODEL = "capi_vitl14_lvd"


def add_model_options(parser: argparse.ArgumentParser, *, image_size_note: str = "") -> None:
    parser.add_argument(
        "--model",
        default=None,
        help=f"pretrained weights name (default {DEFAULT_MODEL} unless --weights is given), or an architecture "
        "name such as capi_vits14 to go with --weights",
    )
    parser.add_argument(
        "--weights", default=None, metavar="PATH", help="local checkpoint (.pth/.safetensors); architecture inferred"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    parser.add_argument(
        "--image-size",
        type=int,
        default=DEFAULT_IMAGE_SIZE,
        help=f"shorter side in pixels, a multiple of 14 (default {DEFAULT_IMAGE_SIZE}); the longer side keeps the "
        f"aspect ratio, rounded to a multiple of 14{image_size_note}",
    )


def model_source(args: argparse.Namespace) -> str | None:
    """What to pass to FeatureExtractor as the model: --model, or the default weights when neither --model nor
    --weights is given."""
    return args.model if args.model is not None or args.weights is not None else DEFAULT_MODEL


def build_extractor(args: argparse.Namespace, **options):
    """A FeatureExtractor from the shared options, plus command-specific keyword ``options``."""
    from capi_backbones.features import FeatureExtractor
    from capi_backbones.pretrained import loading_interface

    with loading_interface("cli"):  # offline hints name --weights PATH
        return FeatureExtractor(
            model_source(args),
            weights=args.weights,
            device=args.device,
            image_size=args.image_size,
            batch_size=args.batch_size,
            **options,
        )
