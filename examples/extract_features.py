"""Extract CAPI features of a few images and print their shapes.

python examples/extract_features.py                          # released ViT-L/14 (LVD-142M), downloads once
python examples/extract_features.py --weights capi_vitl14_lvd.pth   # a local copy of the checkpoint
python examples/extract_features.py --random-init --model capi_vits14  # offline, random weights
python examples/extract_features.py my_photo.jpg my_folder/  # your own images
"""

import argparse

from example_models import add_model_arguments, build_extractor
from PIL import Image
from skimage import data

from capi_backbones.features import expand_inputs

PHOTOS = ("astronaut", "coffee", "chelsea")  # from skimage.data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", help="image files or folders (default: skimage sample photos)")
    add_model_arguments(parser, image_size=224, image_size_help="shorter side, a multiple of 14")
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
