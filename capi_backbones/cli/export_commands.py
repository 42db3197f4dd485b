"""``capi-backbones export-onnx | export-torch``: one graph of a backbone that runs at any resolution."""

import argparse
import logging

from capi_backbones.cli.errors import USER_ERRORS, CliError
from capi_backbones.cli.model_options import add_weights_options, load_model

__all__ = ["register"]

logger = logging.getLogger(__name__)

OUTPUT_NAMES = ("pooled", "registers", "patch_features")  # capi_backbones.export.OUTPUTS, without importing torch
TOLERANCE = 1e-4  # fp32 graph against the eager model (the tests see ~3e-6 on small models)


def register(subparsers) -> None:
    """Add this module's subcommands to ``subparsers``."""
    for command, suffix, kind in (("export-onnx", ".onnx", "ONNX graph"), ("export-torch", ".pt2", "torch.export")):
        parser = subparsers.add_parser(
            command,
            help=f"export a backbone as one {kind} file that runs at any resolution",
            description=f"Export the backbone as a {kind} file ({suffix}) with a symbolic batch size, height and width "
            "(any multiples of 14). Input: images (B, 3, H, W), normalised as for the model; outputs, in this "
            "order: pooled (B, D), registers (B, 16, D), patch_features (B, H/14, W/14, D). The file is then run "
            "at two other sizes and compared with the model (skip with --no-verify).",
        )
        parser.add_argument("output", metavar="OUTPUT", help=f"file to write, ending in {suffix}")
        add_weights_options(parser)
        parser.add_argument(
            "--outputs",
            nargs="+",
            choices=OUTPUT_NAMES,
            default=list(OUTPUT_NAMES),
            help="outputs of the graph (default all); without pooled the predictor is left out (dense only)",
        )
        parser.add_argument(
            "--device", default="cpu", help="device the graph is traced for and runs on: cpu (default), cuda, ..."
        )
        if command == "export-onnx":
            parser.add_argument("--opset", type=int, default=None, help="ONNX opset version (default: torch's)")
        parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
        parser.add_argument("--no-verify", action="store_true", help="skip running the file against the model")
        parser.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    import torch

    from capi_backbones import export

    onnx = args.command == "export-onnx"
    try:
        model, description = load_model(args)
        model = model.to(torch.device(args.device)).eval()
        if onnx:
            path = export.export_onnx(
                model, args.output, args.outputs, opset_version=args.opset, overwrite=args.overwrite
            )
        else:
            path = export.export_torch(model, args.output, args.outputs, overwrite=args.overwrite)
    except (*USER_ERRORS, FileExistsError, ImportError) as error:  # ImportError: onnx / onnxscript not installed
        raise CliError.from_exception(error) from error
    print(f"wrote {path} ({description}; outputs: {', '.join(export.check_outputs(args.outputs))})")
    if args.no_verify:
        return 0
    artifact = _onnx_runner(path) if onnx else torch.export.load(path).module()
    if artifact is None:
        print("not verified: onnxruntime is not installed (pip install onnxruntime)")
        return 0
    difference = export.max_difference(model, artifact, args.outputs)
    if difference > TOLERANCE:
        raise CliError(f"{path} differs from the model by {difference:.2e} (> {TOLERANCE:g}); do not use it.")
    print(f"verified at two other sizes: largest difference from the model {difference:.2e}")
    return 0


def _onnx_runner(path):
    """``images -> outputs`` through onnxruntime on CPU, or None without onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        return None
    import torch

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(images):
        return [torch.from_numpy(a) for a in session.run(None, {"images": images.detach().cpu().numpy()})]

    return run
