"""Export a CAPI backbone as one graph that runs at any resolution: ``torch.export`` programs (.pt2) and ONNX.

CAPI's RoPE makes the model resolution-free, and so is the artifact: the batch size and the image height and width
are symbolic (H and W any multiples of the patch size, 1 patch included). The graph takes ``images`` (B, 3, H, W),
normalised as for the eager model, and returns the chosen outputs, in this order and under these names:

- ``pooled`` (B, D_pred): the official global representation (predictor pooling);
- ``registers`` (B, R, D): the ``enc_norm``-ed register tokens;
- ``patch_features`` (B, H/14, W/14, D): the ``enc_norm``-ed patch map.

Leaving out ``pooled`` ("dense only") leaves the predictor out of the graph. The numbers are those of
``CapiModel.forward_features`` in eval mode, up to float rounding (the patch coordinates of a symbolic size use
``linspace``'s formula written out, see ``models.coordinates.unit_interval``).

    from capi_backbones import create_model
    from capi_backbones.export import export_onnx, export_torch
    model = create_model("capi_vitl14_lvd")
    export_torch(model, "capi_vitl14.pt2")      # torch.export.load("capi_vitl14.pt2").module()(images)
    export_onnx(model, "capi_vitl14.onnx", outputs=("patch_features",))  # needs onnx and onnxscript

The size rule is part of the graphs: the images are first viewed as (B, C, H/14, 14, W/14, 14) patches, which fails
for sides that are not multiples of 14 (onnxruntime names the node ``check_size_multiple_of_14``; the .pt2 module
also checks its input shapes). The dynamic dimensions of the ONNX graph are named: ``batch``, ``height``, ``width``
(the input) and ``height_patches``, ``width_patches`` (the patch map).

Files are written under a temporary name, checked (an ONNX file by ``onnx.checker`` and its declared opset), and
renamed only then: a failed export never replaces a good file. ONNX files hold their weights inline (one file,
under protobuf's 2 GB: ViT-L/14 in fp32 is 1.8 GB).
"""

import contextlib
import io
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram

from capi_backbones.atomic_files import atomic_path
from capi_backbones.constants import EXPORT_OUTPUTS as OUTPUTS
from capi_backbones.constants import MIN_ONNX_OPSET as MIN_OPSET
from capi_backbones.models import CapiModel

__all__ = [
    "INPUT_NAME",
    "MIN_OPSET",
    "OUTPUTS",
    "ExportedBackbone",
    "check_opset",
    "check_outputs",
    "export_onnx",
    "export_program",
    "export_torch",
    "max_difference",
]

logger = logging.getLogger(__name__)

INPUT_NAME = "images"
SIZE_CHECK_NODE = "check_size_multiple_of_14"  # the graph's size rule, as onnxruntime names it in its error
_SYMBOL = re.compile(r"\bs\d+\b")  # torch's symbolic sizes in ONNX dim names ("s34", "14*s53")


def check_opset(opset_version: int | None) -> int | None:
    """``opset_version`` if the exporter can write it (``MIN_OPSET`` up to the installed onnx's newest), else
    ``ValueError``. None (torch's default) passes."""
    if opset_version is None:
        return None
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset_version <= newest:
        raise ValueError(
            f"ONNX opset {opset_version} cannot be exported: use an opset from {MIN_OPSET} to {newest} (the newest "
            "the installed onnx knows), or leave it out for torch's default."
        )
    return opset_version


def check_outputs(outputs: str | Sequence[str]) -> tuple[str, ...]:
    """The chosen outputs in the canonical order; raises on unknown, repeated or no names."""
    names = (outputs,) if isinstance(outputs, str) else tuple(outputs)
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(
            f"outputs must be distinct names among {', '.join(OUTPUTS)}, got {list(names)}. "
            "Leave out 'pooled' for a dense-only graph without the predictor."
        )
    return tuple(n for n in OUTPUTS if n in names)


class ExportedBackbone(nn.Module):
    """What gets traced: ``images`` -> the chosen outputs of ``CapiModel.forward_features``, as a tuple.

    The backbone sits under ``model.``, so no graph output shares a name with a parameter (``registers``)."""

    def __init__(self, model: CapiModel, outputs: Sequence[str] = OUTPUTS) -> None:
        super().__init__()
        if not isinstance(model, CapiModel):
            wrapped = isinstance(getattr(model, "model", None), CapiModel)
            hint = " (a timm CapiTimmModel holds it as .model)" if wrapped else ""
            raise TypeError(f"Expected a CapiModel, got {type(model).__name__}{hint}.")
        self.model = model
        self.outputs = check_outputs(outputs)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        b, c, h, w = images.shape
        p = self.model.patch_size
        # the size rule inside the graph: this view of the patches fails unless H and W are multiples of p
        images = images.reshape(b, c, h // p, p, w // p, p).reshape(b, c, h, w)
        out = self.model.forward_features(images, pooled="pooled" in self.outputs)
        return tuple(getattr(out, name) for name in self.outputs)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Trace the inference graph (no stochastic depth), then give the model back in its own mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _example_input(model: CapiModel) -> Tensor:
    """A (2, C, 4p, 3p) example: sizes other than 1, and distinct, so that tracing keeps every size symbolic."""
    p, param = model.patch_size, model.patch_embed.weight
    return torch.zeros(2, model.config.in_chans, 4 * p, 3 * p, device=param.device, dtype=param.dtype)


def export_program(model: CapiModel, outputs: Sequence[str] = OUTPUTS) -> ExportedProgram:
    """``torch.export`` program of ``model`` with a symbolic batch, height and width (multiples of the patch
    size, from one patch up). Runs on the model's device and dtype."""
    wrapper = ExportedBackbone(model, outputs)
    p = model.patch_size
    dynamic = {INPUT_NAME: {0: Dim("batch", min=1), 2: p * Dim("h_patches", min=1), 3: p * Dim("w_patches", min=1)}}
    # size-oblivious reasoning: without it, tracing assumes every size is >= 2 and the graph refuses a 1-patch side
    with _eval_mode(model), torch.fx.experimental._config.patch(backed_size_oblivious=True):
        return torch.export.export(wrapper, (_example_input(model),), dynamic_shapes=dynamic)


def _check_target(path: str | os.PathLike, suffix: str, overwrite: bool) -> Path:
    path = Path(path)
    if path.suffix != suffix:
        raise ValueError(f"{path}: the file name must end in {suffix}, e.g. {path.with_suffix(suffix).name}.")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name ending in {suffix}.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    return path


def export_torch(
    model: CapiModel, path: str | os.PathLike, outputs: Sequence[str] = OUTPUTS, *, overwrite: bool = False
) -> Path:
    """Write ``torch.export.save`` of ``export_program(model, outputs)`` to ``path`` (.pt2). Load it with
    ``torch.export.load(path).module()``, a module that takes ``images`` and returns the outputs as a tuple."""
    path = _check_target(path, ".pt2", overwrite)
    program = export_program(model, outputs)
    buffer = io.BytesIO()  # torch's C++ writer aborts the process when the disk fills: write the bytes from Python
    torch.export.save(program, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())
    logger.info("Wrote %s (outputs: %s)", path, ", ".join(check_outputs(outputs)))
    return path


def export_onnx(
    model: CapiModel,
    path: str | os.PathLike,
    outputs: Sequence[str] = OUTPUTS,
    *,
    opset_version: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an ONNX graph of ``export_program(model, outputs)`` to ``path`` (.onnx): input ``images``
    (batch, C, H, W) with symbolic batch, H and W; outputs named as chosen. Needs ``onnx`` and ``onnxscript``."""
    path = _check_target(path, ".onnx", overwrite)
    missing = [name for name in ("onnx", "onnxscript") if not _importable(name)]
    if missing:
        raise ImportError(f"ONNX export needs {' and '.join(missing)}: pip install {' '.join(missing)}.")
    check_opset(opset_version)
    names = check_outputs(outputs)
    program = export_program(model, names)
    with atomic_path(path) as tmp:
        torch.onnx.export(
            program,
            (_example_input(model),),
            tmp,
            input_names=[INPUT_NAME],
            output_names=list(names),
            opset_version=opset_version,
            dynamo=True,
            external_data=False,  # one file: an external .data file would keep the temporary name
            verbose=False,  # no progress prints
        )
        _finish_onnx(tmp, path, opset_version)
    logger.info("Wrote %s (outputs: %s)", path, ", ".join(names))
    return path


def _finish_onnx(tmp: Path, path: Path, opset_version: int | None) -> None:
    """Name the dynamic dimensions and the size check of the ONNX file ``tmp``, then check it: valid ONNX, at the
    opset asked for. Raises ``ValueError`` (the caller's temporary file is then deleted, ``path`` untouched)."""
    import onnx

    proto = onnx.load(str(tmp))
    declared = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset_version is not None and declared != opset_version:
        raise ValueError(f"ONNX export at opset {opset_version} gave opset {declared}; {path} was not written.")
    dims = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    names = {}
    for dim, name in zip((dims[0], dims[2], dims[3]), ("batch", "height", "width"), strict=True):
        names[dim] = name
        symbols = _SYMBOL.findall(dim)
        if name != "batch" and len(symbols) == 1:
            names[symbols[0]] = f"{name}_patches"
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = names.get(d.dim_param) or _SYMBOL.sub(
                    lambda m: names.get(m.group(), m.group()), d.dim_param
                )
    guard = next((n for n in proto.graph.node if n.op_type == "Reshape" and INPUT_NAME in n.input), None)
    if guard is not None:
        guard.name = SIZE_CHECK_NODE
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as error:
        reason = str(error).strip().splitlines()[0]
        raise ValueError(f"ONNX export gave an invalid graph ({reason}); {path} was not written.") from None
    onnx.save(proto, str(tmp))


def max_difference(
    model: CapiModel,
    artifact: Callable[[Tensor], Sequence[Tensor]],
    outputs: Sequence[str] = OUTPUTS,
    grids: Sequence[tuple[int, int, int]] = ((1, 4, 6), (2, 3, 3)),
) -> float:
    """Largest absolute difference between ``artifact(images)`` and the eager model over random images of each
    (batch, h patches, w patches) in ``grids`` (by default other sizes than the traced example's)."""
    names = check_outputs(outputs)
    param, p = model.patch_embed.weight, model.patch_size
    worst = 0.0
    with _eval_mode(model), torch.no_grad():
        for batch, h, w in grids:
            images = torch.randn(batch, model.config.in_chans, h * p, w * p, device=param.device, dtype=param.dtype)
            out = model.forward_features(images, pooled="pooled" in names)
            for name, got in zip(names, artifact(images), strict=True):
                worst = max(worst, float((got.to(param.device) - getattr(out, name)).abs().max()))
    return worst


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
