"""Fine-tune a CAPI backbone through timm on sklearn's handwritten digits, against a linear probe.

The model comes from ``timm.create_model`` (after ``import capi_backbones.timm``), the optimizer from timm with
layer-wise lr decay (``create_optimizer_v2(..., layer_decay=0.75)``: one group per encoder block, through the
model's ``group_matcher``; no weight decay where the pretraining recipe has none, ``no_weight_decay``) and a
cosine schedule with warm-up. The baseline is a logistic-regression probe on the frozen features of the same
model (its ``forward_head(..., pre_logits=True)``, predictor pooling) on the same split. Fine-tuning starts from
that probe as the classifier (LP-FT, Kumar et al. 2022, https://arxiv.org/abs/2202.10054), so it begins at the
probe's accuracy and the backbone is not disturbed by a random head. Digits are 8x8 grey
images, upsampled to --image-size pixels and repeated to RGB.

    python examples/finetune_timm.py                                                   # released ViT-L/14
    python examples/finetune_timm.py --weights capi_vitl14_lvd.pth --model capi_vitl14
    python examples/finetune_timm.py --random-init --model capi_vits14 --image-size 28 --steps 300  # offline
"""

import argparse
import math
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F
from example_models import add_model_arguments
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

import capi_backbones
import capi_backbones.timm  # noqa: F401  (registers capi_vit*14 with timm)
from capi_backbones.pretrained import WEIGHTS


def create_timm_model(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    """The model as a timm user gets it: released weights by their timm name, a local file, or random weights."""
    options = dict(num_classes=num_classes, drop_path_rate=args.drop_path, **dict(args.model_kwarg))
    if args.random_init:
        arch = WEIGHTS[args.model].arch if args.model in WEIGHTS else args.model
        torch.manual_seed(0)
        return timm.create_model(arch, pretrained=False, **options)
    if args.weights:
        arch = args.model if args.model in capi_backbones.ARCHITECTURES else WEIGHTS[args.model].arch
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=args.weights), **options)
    return timm.create_model(WEIGHTS[args.model].full_name, pretrained=True, **options)  # downloads once


def model_kwarg(text: str) -> tuple[str, int | float]:
    key, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = None
    if not sep or not key.isidentifier() or number is None:
        raise argparse.ArgumentTypeError(f"expected KEY=NUMBER such as depth=2, got {text!r}")
    return key, int(number) if number.is_integer() and "." not in value else number


def digit_tensors(size: int, mean, std) -> tuple[torch.Tensor, np.ndarray]:
    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # (N, 8, 8), values 0..16 -> 0..255
    images = np.stack(
        [np.asarray(Image.fromarray(p).resize((size, size), Image.Resampling.BICUBIC).convert("RGB")) for p in pixels]
    )
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # (N, 3, S, S)
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return x, digits.target


@torch.no_grad()
def frozen_features(model, x: torch.Tensor, batch: int) -> np.ndarray:
    model.eval()
    return torch.cat([model.forward_head(model.forward_features(c), pre_logits=True) for c in x.split(batch)]).numpy()


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: np.ndarray, batch: int) -> float:
    model.eval()
    predictions = torch.cat([model(c).argmax(dim=1) for c in x.split(batch)]).numpy()
    return float((predictions == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, image_size=112, image_size_help="digit size in pixels, a multiple of 14")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-4, help="peak lr of the head (blocks get layer decay)")
    parser.add_argument("--layer-decay", type=float, default=0.75)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth while fine-tuning")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute activations (saves memory)")
    parser.add_argument(
        "--model-kwarg",
        nargs="+",
        type=model_kwarg,
        default=[],
        metavar="KEY=VALUE",
        help="more timm.create_model keyword arguments, e.g. depth=2 embed_dim=64 for a small random model",
    )
    args = parser.parse_args()
    if args.image_size % 14 or args.image_size < 14:
        parser.error(f"--image-size must be a positive multiple of 14, got {args.image_size}.")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    labels = load_digits().target
    model = create_timm_model(args, num_classes=int(labels.max()) + 1).to(device)
    config = timm.data.resolve_data_config({}, model=model)
    x, y = digit_tensors(args.image_size, config["mean"], config["std"])
    train, test = train_test_split(np.arange(len(y)), test_size=0.5, stratify=y, random_state=0)
    x_train, x_test = x[train].to(device), x[test].to(device)
    name = f"{args.model} ({'random init' if args.random_init else 'pretrained'})"
    print(f"{name}: {len(train)} training and {len(test)} test digits at {args.image_size} px")

    # baseline: a linear probe on the frozen features of the same model
    probe = LogisticRegression(max_iter=2000).fit(frozen_features(model, x_train, 256), y[train])
    probe_accuracy = float((probe.predict(frozen_features(model, x_test, 256)) == y[test]).mean())
    print(f"linear probe on frozen features: accuracy {probe_accuracy:.4f}")

    # fine-tuning with timm's optimizer factory and layer decay, from the probe as the classifier (LP-FT)
    head = model.get_classifier()
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(probe.coef_).to(head.weight))
        head.bias.copy_(torch.from_numpy(probe.intercept_).to(head.bias))
    if args.grad_checkpointing:
        model.set_grad_checkpointing()
    optimizer = create_optimizer_v2(
        model, "adamw", lr=args.lr, weight_decay=args.weight_decay, layer_decay=args.layer_decay
    )
    warmup = max(args.steps // 10, 1)
    scheduler = CosineLRScheduler(optimizer, t_initial=args.steps, warmup_t=warmup, warmup_lr_init=args.lr / 100)
    generator = torch.Generator().manual_seed(0)
    y_train = torch.from_numpy(y[train]).to(device)
    start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        batch = torch.randint(len(train), (args.batch_size,), generator=generator).to(device)
        loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
        if not math.isfinite(loss.item()):
            raise SystemExit(f"step {step}: the loss is {loss.item()}; lower --lr.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step_update(step + 1)
        if (step + 1) % max(args.steps // 5, 1) == 0:
            print(f"step {step + 1}/{args.steps}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    tuned_accuracy = accuracy(model, x_test, y[test], 256)
    print(f"fine-tuned ({args.steps} steps, layer decay {args.layer_decay}): accuracy {tuned_accuracy:.4f}")
    verdict = "beats" if tuned_accuracy > probe_accuracy else "does NOT beat"
    print(f"fine-tuning {verdict} the linear probe ({tuned_accuracy:.4f} vs {probe_accuracy:.4f})")


if __name__ == "__main__":
    main()
