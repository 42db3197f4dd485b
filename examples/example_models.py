"""The model options every example shares: --model, --weights, --random-init, --image-size, --device."""

import argparse

import torch

import capi_backbones
from capi_backbones.features import FeatureExtractor


def add_model_arguments(parser: argparse.ArgumentParser, *, image_size: int, image_size_help: str) -> None:
    parser.add_argument("--model", default="capi_vitl14_lvd", help="weights name, or architecture with --weights")
    parser.add_argument("--weights", default=None, help="local checkpoint (.pth / .safetensors)")
    parser.add_argument("--random-init", action="store_true", help="random weights of --model's architecture")
    parser.add_argument("--image-size", type=int, default=image_size, help=image_size_help)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")


def build_extractor(args: argparse.Namespace, **options) -> FeatureExtractor:
    options = dict(device=args.device, image_size=args.image_size, **options)
    if args.random_init:  # offline demo: the official random init, no download
        torch.manual_seed(0)
        return FeatureExtractor(capi_backbones.create_model(args.model, pretrained=False), **options)
    if args.weights:  # a local checkpoint; the architecture is read off its tensor shapes
        arch = args.model if args.model in capi_backbones.ARCHITECTURES else None
        return FeatureExtractor(arch, weights=args.weights, **options)
    return FeatureExtractor(args.model, **options)  # registered weights, downloaded once
