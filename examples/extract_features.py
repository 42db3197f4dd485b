"""Extract CAPI features of a few images and print their shapes.

python examples/extract_features.py                          # released ViT-L/14 (LVD-142M), downloads once
python examples/extract_features.py --weights capi_vitl14_lvd.pth   # a local copy of the checkpoint
python examples/extract_features.py --random-init --model capi_vits14  # offline, random weights
python examples/extract_features.py my_photo.jpg my_folder/  # your own images
"""

import argparse

import torch
from PIL import Image
from skimage import data

import capi_backbones
from capi_backbones.features import FeatureExtractor, expand_inputs

PHOTOS = ("astronaut", "coffee", "chelsea")  # from skimage.data


def build_extractor(args: argparse.Namespace) -> FeatureExtractor:
    options = dict(device=args.device, image_size=args.image_size)
    if args.random_init:  # offline demo: the official random init, no download
        torch.manual_seed(0)
        return FeatureExtractor(capi_backbones.create_model(args.model, pretrained=False), **options)
    if args.weights:  # a local checkpoint; the architecture is read off its tensor shapes
        arch = args.model if args.model in capi_backbones.ARCHITECTURES else None
        return FeatureExtractor(arch, weights=args.weights, **options)
    return FeatureExtractor(args.model, **options)  # registered weights, downloaded once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", help="image files or folders (default: skimage sample photos)")
    parser.add_argument("--model", default="capi_vitl14_lvd", help="weights name, or architecture with --weights")
    parser.add_argument("--weights", default=None, help="local checkpoint (.pth / .safetensors)")
    parser.add_argument("--random-init", action="store_true", help="random weights of --model's architecture")
    parser.add_argument("--image-size", type=int, default=224, help="shorter side, a multiple of 14")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    args = parser.parse_args()

    if args.images:
        images = expand_inputs(args.images)  # folders -> their image files
        names = [str(path) for path in images]
    else:
        images = [Image.fromarray(getattr(data, name)()) for name in PHOTOS]
        names = list(PHOTOS)
    extractor = build_extractor(args)
    model = f"{args.model} (random init)" if args.random_init else extractor.model_description
    print(f"model: {model}, device: {extractor.device}")
    for name, out in zip(names, extractor.extract(images), strict=True):  # one FeatureOutput per image
        print(
            f"{name}: image {out.image_size} -> patch grid {out.grid_size}; "
            f"patch_features {tuple(out.patch_features.shape)}, pooled {tuple(out.pooled.shape)}, "
            f"registers {tuple(out.registers.shape)}"
        )


if __name__ == "__main__":
    main()
