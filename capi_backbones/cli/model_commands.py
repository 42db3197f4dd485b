"""``capi-backbones list | info | convert``: the model zoo, checkpoint inspection and format conversion."""

import argparse
import json
import logging
from pathlib import Path

from capi_backbones.cli.checks import check_architecture, check_source
from capi_backbones.cli.errors import USER_ERRORS, CliError
from capi_backbones.cli.model_options import add_download_options

__all__ = ["register"]

logger = logging.getLogger(__name__)

_DTYPES = ("float32", "bfloat16", "float16")


def register(subparsers) -> None:
    """Add this module's subcommands to ``subparsers``."""
    parser = subparsers.add_parser(
        "list",
        help="list architectures and released weights",
        description="List the CAPI architectures (with parameter counts) and the released weights "
        "(pretraining data, paper metrics, URL).",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.set_defaults(handler=run_list)

    parser = subparsers.add_parser(
        "info",
        help="describe a checkpoint: architecture, parameters, keys, dtypes",
        description="Read a checkpoint without building the model and report its architecture (inferred from the "
        "tensor shapes unless stored or given), encoder/predictor parameter counts, number of keys, dtypes, "
        "the non-backbone keys a load drops, and whether a strict load would succeed. Exit code 1 if it would not.",
    )
    parser.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="a .pth/.safetensors file, a save_pretrained folder, a registered "
        "weights name, a URL or hf-hub:owner/repo",
    )
    parser.add_argument("--model", default=None, metavar="NAME", help="check against this architecture instead")
    add_download_options(parser)
    parser.set_defaults(handler=run_info, check=_check_info)

    parser = subparsers.add_parser(
        "convert",
        help="convert a checkpoint (e.g. an official .pth) to safetensors, a folder or the official layout",
        description="Load a checkpoint strictly and write it again: OUTPUT ending in .safetensors gives a "
        "safetensors file with the config in its metadata; .pth/.pt gives the official layout (backbone.-prefixed "
        "torch.save); anything else a save_pretrained folder (model.safetensors + config.json). The written file is "
        "read back and compared tensor by tensor.",
    )
    parser.add_argument("source", metavar="CHECKPOINT", help="input: file, folder, registered name, URL or hf-hub:")
    parser.add_argument("output", metavar="OUTPUT", help="output .safetensors / .pth file or folder")
    parser.add_argument("--model", default=None, metavar="NAME", help="architecture (default: stored or inferred)")
    parser.add_argument("--dtype", choices=_DTYPES, default="float32", help="stored dtype (default float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    parser.add_argument("--no-verify", action="store_true", help="skip reading OUTPUT back")
    add_download_options(parser)
    parser.set_defaults(handler=run_convert, check=_check_convert)


def _check_info(args: argparse.Namespace) -> None:
    check_source(args.checkpoint)
    check_architecture(args.model)


def _check_convert(args: argparse.Namespace) -> None:
    """Before torch is imported: the source exists, OUTPUT is new (or --overwrite) and is not the source."""
    check_source(args.source)
    check_architecture(args.model)
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise CliError(f"{output} already exists; add --overwrite to replace it, or choose another OUTPUT.")
    if Path(args.source).exists() and Path(args.source).resolve() == output.resolve():
        raise CliError("CHECKPOINT and OUTPUT are the same path; write to a new file.")


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def _block_size(dim: int, num_heads: int, context_dim: int, mlp_ratio: float) -> int:
    """Tensor elements of one transformer block: 2 RMSNorms, q/proj (dim x dim), k/v (dim x context_dim),
    RoPE frequencies (2 x head_dim), fc1/fc2 (dim x hidden); no biases."""
    return 2 * dim + 2 * dim * dim + 2 * dim * context_dim + 2 * (dim // num_heads) + 2 * dim * int(dim * mlp_ratio)


def parameter_counts(config) -> tuple[int, int]:
    """(encoder, predictor) tensor elements of a ``CapiModel(config)``, from the config alone (no torch, for
    ``list``); a test checks them against ``count_parameters`` of the built model."""
    c = config
    encoder = c.embed_dim * (c.in_chans * c.patch_size**2 + 1) + c.n_registers * c.embed_dim  # patch_embed, registers
    encoder += c.depth * _block_size(c.embed_dim, c.num_heads, c.embed_dim, c.mlp_ratio)
    predictor = c.pred_embed_dim + c.pred_depth * _block_size(  # mask_token, decoder blocks (cross-attend encoder)
        c.pred_embed_dim, c.pred_num_heads, c.embed_dim, c.mlp_ratio
    )
    return encoder, predictor


def run_list(args: argparse.Namespace) -> int:
    from capi_backbones.models import ARCHITECTURES  # plain data: `list` does not import torch
    from capi_backbones.weights_registry import WEIGHTS

    archs = []
    for name, config in ARCHITECTURES.items():
        encoder_params, predictor_params = parameter_counts(config)
        archs.append(
            {
                "name": name,
                **config.to_dict(),
                "encoder_params": encoder_params,
                "predictor_params": predictor_params,
                "weights": [w.name for w in WEIGHTS.values() if w.arch == name],
            }
        )
    weights = [
        {
            "name": w.name,
            "arch": w.arch,
            "data": w.pretraining_data,
            "knn_ade20k_miou": w.knn_ade20k_miou,
            "attentive_in1k_top1": w.attentive_in1k_top1,
            "url": w.url,
            "license": w.license,
        }
        for w in WEIGHTS.values()
    ]
    if args.json:
        print(json.dumps({"architectures": archs, "weights": weights}, indent=2))
        return 0
    print("Architectures (patch 14, 16 registers):")
    print(
        f"  {'name':<13} {'dim':>5} {'depth':>5} {'heads':>5} {'pred dim':>8} {'pred depth':>10} "
        f"{'encoder':>8} {'predictor':>9}  weights"
    )
    for a in archs:
        print(
            f"  {a['name']:<13} {a['embed_dim']:>5} {a['depth']:>5} {a['num_heads']:>5} {a['pred_embed_dim']:>8} "
            f"{a['pred_depth']:>10} {_millions(a['encoder_params']):>8} {_millions(a['predictor_params']):>9}  "
            f"{', '.join(a['weights']) or '-'}"
        )
    print("\nWeights (ViT-L/14, Apache-2.0; capi_vitl14 = capi_vitl14_lvd):")
    print(f"  {'name':<18} {'data':<13} {'k-NN ADE20K':>11} {'attn. IN1k':>10}  url")
    for w in weights:
        print(
            f"  {w['name']:<18} {w['data']:<13} {w['knn_ade20k_miou']:>11.1f} {w['attentive_in1k_top1']:>10.1f}  "
            f"{w['url']}"
        )
    return 0


def run_info(args: argparse.Namespace) -> int:
    from capi_backbones.pretrained import inspect_checkpoint, loading_interface

    try:
        with loading_interface("cli"):
            info = inspect_checkpoint(args.checkpoint, arch=args.model)
    except USER_ERRORS as error:
        raise CliError(str(error)) from error
    c = info.config
    arch = info.architecture or "custom (no registered architecture has these shapes)"
    print(f"checkpoint:   {info.path} ({info.format}, {info.file_bytes / 1e6:.1f} MB)")
    print(f"architecture: {arch} [{info.config_source}]")
    print(
        f"  encoder:    dim {c.embed_dim}, depth {c.depth}, heads {c.num_heads}, patch {c.patch_size}, "
        f"registers {c.n_registers}, mlp ratio {c.mlp_ratio:g}"
    )
    print(f"  predictor:  dim {c.pred_embed_dim}, depth {c.pred_depth}, heads {c.pred_num_heads}")
    p = info.parameters
    print(
        f"parameters:   encoder {_millions(p.encoder)}, predictor {_millions(p.predictor)}, "
        f"total {_millions(p.total)} ({p.total:,})"
    )
    prefix = " (backbone. prefix)" if info.has_backbone_prefix else ""
    print(f"keys:         {info.n_keys} in file, {info.n_backbone_keys} backbone{prefix}")
    dropped = ", ".join(f"{root}.* ({n})" for root, n in sorted(info.dropped.items())) or "none"
    print(f"dropped:      {dropped}")
    print(f"dtypes:       {', '.join(f'{d} ({n})' for d, n in sorted(info.dtypes.items()))}")
    if info.loads:
        print("strict load:  OK")
        return 0
    print("\n".join(["strict load:  FAILS", *info.problems, *([info.diff.describe()] if not info.diff.ok else [])]))
    return 1


def _remove(output: Path) -> None:
    import shutil

    if output.is_dir():
        shutil.rmtree(output)
    else:
        output.unlink(missing_ok=True)


def run_convert(args: argparse.Namespace) -> int:

    from capi_backbones.pretrained import from_pretrained, loading_interface, save_official_checkpoint, save_safetensors

    output = Path(args.output)  # checked by _check_convert
    try:
        with loading_interface("cli"):
            model = from_pretrained(args.source, arch=args.model, dtype=args.dtype)  # refuses NaN/Inf, int weights
        if output.suffix == ".safetensors":
            save_safetensors(model, output)
        elif output.suffix in (".pth", ".pt"):
            save_official_checkpoint(model, output)
        else:
            model.save_pretrained(output)
        print(f"wrote {output} ({len(model.state_dict())} tensors, {args.dtype})")
        if args.no_verify:
            return 0
        try:
            reloaded = from_pretrained(output, arch=model.config, dtype=args.dtype)
        except USER_ERRORS:
            _remove(output)
            raise
    except USER_ERRORS as error:
        raise CliError(str(error)) from error
    original, written = model.state_dict(), reloaded.state_dict()
    # bit-for-bit: NaN equals NaN there, unlike torch.equal
    different = [k for k in original if k not in written or not _same_bits(original[k], written[k])]
    if different or original.keys() != written.keys():
        _remove(output)
        raise CliError(f"Verification failed: {len(different)} tensors differ after reading {output} back; removed it.")
    print(f"verified: all {len(original)} tensors read back identical")
    return 0


def _same_bits(a, b) -> bool:
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))
