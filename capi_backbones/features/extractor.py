"""FeatureExtractor: images in, CAPI features out. In memory here; sharded on disk through
``capi_backbones.features.disk`` (``FeatureExtractor.extract_to_disk``)."""

import contextlib
import copy
import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from capi_backbones.constants import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_SHARD_FORMAT,
    DEFAULT_SHARD_SIZE,
    DEFAULT_STORAGE_DTYPE,
    PATCH_SIZE,
)
from capi_backbones.features.images import ImageSource, expand_inputs, to_rgb_tensor
from capi_backbones.features.output import FeatureOutput
from capi_backbones.features.preprocessing import Preprocessor
from capi_backbones.images import file_stamp
from capi_backbones.models import CapiModel
from capi_backbones.runtime.devices import resolve_device
from capi_backbones.runtime.precision import autocast_dtype, resolve_precision

if TYPE_CHECKING:
    from capi_backbones.features.disk import ExtractionSummary

__all__ = ["FeatureExtractor", "resolve_model", "weights_fingerprint"]

logger = logging.getLogger(__name__)

MAX_PENDING_BATCHES = 4  # decoded images waiting for a full batch of their size, in batches; then the largest runs


def resolve_model(
    model: "CapiModel | str | None", weights: "str | os.PathLike | None", *, dtype: torch.dtype | None = None
) -> tuple[CapiModel, str]:
    """Turn the FeatureExtractor's ``model``/``weights`` arguments into a model and a short description.

    - a ``CapiModel``: used as is (``weights`` must be None);
    - an architecture name (``capi_vits14``, ...) with ``weights`` = a local file or directory:
      ``from_pretrained(weights, arch=name)``;
    - any other name or source (``capi_vitl14_lvd``, a path, ``hf-hub:owner/repo``): ``from_pretrained(model)``;
    - ``None`` with ``weights``: ``from_pretrained(weights)`` (the architecture is read off the checkpoint).

    ``dtype`` (default float32) is the dtype weights are loaded in, tensor by tensor (no float32 copy of the model
    in between); a given ``CapiModel`` is returned as it is, in its own dtype.
    """
    from capi_backbones.pretrained import LoadOptions, resolve_model_spec  # the loader sits below features

    spec = resolve_model_spec(model, weights, LoadOptions(dtype=dtype))
    return spec.load(), spec.description


def _low_precision_copy(model: CapiModel, dtype: torch.dtype, device: torch.device) -> CapiModel:
    """A copy of ``model`` (same class, attributes and hooks) whose floating weights are ``dtype`` on ``device``,
    in eval mode; ``model`` is not changed. The weights are converted one tensor at a time into the copy (a deep
    copy whose memo maps each floating tensor to its converted one), so the extra memory is the copy itself:
    half the float32 model for bf16 (0.6 GB for ViT-L/14), never a second float32 model."""
    memo: dict[int, object] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point() and id(tensor) not in memo:
            converted = tensor.detach().to(device=device, dtype=dtype)
            memo[id(tensor)] = (
                nn.Parameter(converted, requires_grad=False) if isinstance(tensor, nn.Parameter) else converted
            )
    return copy.deepcopy(model, memo).to(device).eval()


def weights_fingerprint(model: CapiModel) -> str:
    """SHA-256 over every tensor of the state dict (names, dtypes, shapes and bytes), to refuse resuming an
    extraction with other weights. Any changed value, even in one block of a fine-tuned model, changes it."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # raw bytes, any dtype (bf16 too)
    return "sha256:" + digest.hexdigest()


class _PreprocessedImages(Dataset):
    """Decodes and preprocesses one image per item; errors are returned (not raised) so a worker survives them.
    With ``stamps``, a file's identity (``capi_backbones.images.file_stamp``) is taken before it is decoded, so
    that it never describes newer content than the features (a file replaced meanwhile is redone next time)."""

    def __init__(self, sources: list[ImageSource], preprocessor: Preprocessor, stamps: bool = False) -> None:
        self.sources = sources
        self.preprocessor = preprocessor
        self.stamps = stamps

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> tuple[int, Tensor | None, Exception | None, dict | None]:
        source = self.sources[index]
        try:
            stamp = file_stamp(source) if self.stamps and isinstance(source, str | os.PathLike) else None
            return index, self.preprocessor(to_rgb_tensor(source)), None, stamp
        except (OSError, ValueError, TypeError) as error:
            return index, None, error, None


class FeatureExtractor:
    """Extract CAPI features (patch features, predictor pooling, registers) from images.

    Args:
        model: a ``CapiModel``; a pretrained weights name (``"capi_vitl14_lvd"``, see ``capi_backbones.list_models``)
            or any ``from_pretrained`` source (local file or directory, URL, ``"hf-hub:owner/repo"``); an architecture
            name (``"capi_vits14"``, ...) together with ``weights``; or None with ``weights`` (architecture read off the
            checkpoint). A bare architecture name without weights is an error: pass
            ``create_model(name, pretrained=False)`` to use random weights on purpose.
        weights: path to a local checkpoint, used with an architecture name or alone.
        device: where the model runs. None: the given model's device, or ``"cuda"`` if available else ``"cpu"`` for
            models loaded here. The model is moved there and put in eval mode (in fp32 and fp16; bf16: see
            ``precision``).
        image_size: target resolution, a multiple of 14: the shorter side with ``keep_aspect`` (the longer side is
            rounded to a multiple of 14), or the side of the square otherwise. See ``features.preprocessing``.
            None: the model's ``default_image_size``, the size it was trained at (224 for the released weights;
            what ``capi-backbones export`` recorded for retrained ones).
        batch_size: images per forward pass. Results do not depend on it.
        keep_aspect: True keeps the aspect ratio (images of different shapes get different patch grids);
            False resizes every image to an ``image_size`` square.
        precision: ``"auto"`` (bf16 where the device runs bf16 natively: CUDA with bf16, CPUs with AVX512-BF16 or
            AMX; fp32 elsewhere; logged once), ``"fp32"`` (the official numbers), ``"bf16"`` or ``"fp16"`` (see
            ``capi_backbones.runtime.precision``). bf16 runs bf16 weights (under bf16 autocast): a model loaded
            here from a name or path is loaded in bf16 directly; a ``CapiModel`` you pass is left as it is (not
            moved, not converted) and the extractor runs a bf16 copy of it (``extractor.model``; half the fp32
            model's memory, 0.6 GB for ViT-L/14). fp16 runs fp16 autocast over the fp32 weights. The index of
            ``extract_to_disk`` records the precision that ran, and the weights dtype when it is not float32.
        num_workers: DataLoader worker processes decoding and resizing images while the model runs (0: in the
            calling process).

    Outputs are float32 CPU tensors. Every forward pass runs under ``torch.inference_mode()``.

    Methods: ``extractor(images)`` -> one :class:`FeatureOutput` (all images must get the same processed size);
    ``extract(images)`` -> a list with one ``FeatureOutput`` (B = 1) per image; ``patch_features(images)`` -> the
    (B, h, w, D) tensor without running the predictor; ``extract_to_disk(inputs, out_dir)`` -> resumable shards.
    """

    def __init__(
        self,
        model: CapiModel | str | None = None,
        *,
        weights: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        image_size: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        keep_aspect: bool = True,
        precision: str = "auto",
        num_workers: int = 0,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}.")
        if isinstance(getattr(model, "model", None), CapiModel):  # a wrapper such as timm's CapiTimmModel
            model = model.model
        given_model = isinstance(model, CapiModel)
        if device is None and given_model:
            device = next(model.parameters()).device
        self.device = resolve_device(device)  # None: CUDA when available, else the CPU
        self.autocast_dtype = self._autocast_dtype(precision, self.device)
        self.precision = precision
        patch_size = model.patch_size if given_model else PATCH_SIZE
        if image_size is not None:
            Preprocessor(image_size=image_size, patch_size=patch_size)  # check the arguments before loading weights
        # bf16 runs bf16 weights: autocast over fp32 weights converts every weight at every forward pass.
        weights_dtype = torch.bfloat16 if self.autocast_dtype == torch.bfloat16 else None
        model, self.model_description = resolve_model(model, weights, dtype=weights_dtype)
        if image_size is None:
            image_size = model.default_image_size
        if weights_dtype is not None and given_model and next(model.parameters()).dtype != weights_dtype:
            self.model = _low_precision_copy(model, weights_dtype, self.device)  # the caller's model stays as it is
        else:
            self.model = model.to(self.device, dtype=weights_dtype).eval()  # weights_dtype None: dtype unchanged
        resolve_precision(precision, self.device)  # says once what "auto" chose (and warns of emulated bf16)
        self.preprocessor = Preprocessor(image_size=image_size, patch_size=model.patch_size, keep_aspect=keep_aspect)
        self.batch_size = batch_size
        self.num_workers = num_workers

    @staticmethod
    def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
        return autocast_dtype(resolve_precision(precision, device, announce=False))  # said once the model is loaded

    @property
    def precision_used(self) -> str:
        """The precision the forward runs in: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (what ``"auto"`` resolved to)."""
        return resolve_precision(self.precision, self.device, announce=False)

    @property
    def image_size(self) -> int:
        return self.preprocessor.image_size

    @property
    def keep_aspect(self) -> bool:
        return self.preprocessor.keep_aspect

    def processed_size(self, height: int, width: int) -> tuple[int, int]:
        """The (H, W) an image of (height, width) pixels is resized to."""
        return self.preprocessor.output_size(height, width)

    def preprocess(self, image: ImageSource) -> Tensor:
        """One image (not a directory) as the normalised model input (3, H, W), float32."""
        return self.preprocessor(to_rgb_tensor(image))

    # ---- in memory ----------------------------------------------------------------------------------------------
    def __call__(self, images: ImageSource | Sequence[ImageSource], *, pooled: bool = True) -> FeatureOutput:
        """Features of ``images`` as one batch, in input order.

        All images must get the same processed size (always true with ``keep_aspect=False``); otherwise a
        ValueError says which differ: use :meth:`extract` for a list with one output per image instead.
        An unreadable image raises an error naming it. ``pooled=False`` skips the predictor.
        """
        sources = expand_inputs(images)
        parts = list(self._iter_batches(sources, pooled=pooled, single_size=True))
        order = torch.tensor([i for indices, _ in parts for i in indices])
        return FeatureOutput.concatenate([output for _, output in parts]).select(order.argsort())

    def extract(self, images: ImageSource | Sequence[ImageSource], *, pooled: bool = True) -> list[FeatureOutput]:
        """One :class:`FeatureOutput` (batch size 1) per image, in input order. Images of different sizes are
        batched with others of the same processed size."""
        sources = expand_inputs(images)
        results: list[FeatureOutput | None] = [None] * len(sources)
        for indices, output in self._iter_batches(sources, pooled=pooled, single_size=False):
            for k, i in enumerate(indices):
                results[i] = output.select(k)
        return results

    def patch_features(self, images: ImageSource | Sequence[ImageSource]) -> Tensor:
        """The (B, h, w, D) patch features only; no predictor block runs. Same size rule as ``__call__``."""
        return self(images, pooled=False).patch_features

    # ---- on disk ------------------------------------------------------------------------------------------------
    def extract_to_disk(
        self,
        inputs: str | os.PathLike | Sequence[str | os.PathLike],
        out_dir: str | os.PathLike,
        *,
        format: str = DEFAULT_SHARD_FORMAT,
        shard_size: int = DEFAULT_SHARD_SIZE,
        pooled: bool = True,
        dtype: str = DEFAULT_STORAGE_DTYPE,
        progress: bool = True,
        retry_failed: bool = False,
    ) -> "ExtractionSummary":
        """Extract features of image files and directories into resumable shards under ``out_dir``: see
        :func:`capi_backbones.features.disk.extract_to_disk`, which this calls with this extractor."""
        from capi_backbones.features.disk import extract_to_disk

        return extract_to_disk(
            self,
            inputs,
            out_dir,
            format=format,
            shard_size=shard_size,
            pooled=pooled,
            dtype=dtype,
            progress=progress,
            retry_failed=retry_failed,
        )

    def _settings(self, pooled: bool) -> dict:
        weights_dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        return {
            **({} if weights_dtype == "float32" else {"weights_dtype": weights_dtype}),  # float32 was never recorded
            "model": self.model_description,
            "config": self.model.config.to_dict(),
            "weights_fingerprint": weights_fingerprint(self.model),
            "image_size": self.image_size,
            "keep_aspect": self.keep_aspect,
            "pooled": pooled,
            "precision": self.precision_used,
            "mean": list(self.preprocessor.mean),
            "std": list(self.preprocessor.std),
        }

    # ---- the loop -----------------------------------------------------------------------------------------------
    def _decoded(self, sources: list[ImageSource], *, stamps: bool = False) -> Iterator[tuple]:
        """``(index, preprocessed pixels or None, error or None, file stamp or None)`` per image, decoded in the
        worker processes (stamps of files only with ``stamps``)."""
        loader = DataLoader(
            _PreprocessedImages(sources, self.preprocessor, stamps),
            batch_size=None,  # one image per item: batches are formed here, by size
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 * self.batch_size if self.num_workers else None,
        )
        return iter(loader)

    def _iter_batches(
        self,
        sources: list[ImageSource],
        *,
        pooled: bool,
        single_size: bool,
        failures: dict[str, str] | None = None,
        decoded: Iterator | None = None,
        stamps: dict[int, dict] | None = None,
    ) -> Iterator[tuple[list[int], FeatureOutput]]:
        """Decode (in workers, or take ``decoded`` from :meth:`_decoded`), group by processed size, run the model.
        Yields (input indices, batch output).

        With ``stamps`` (a dict), the file stamps that ``decoded`` carries are stored there by input index.
        Errors: raised, unless ``failures`` is given, where ``str(source) -> message`` is recorded and the image
        skipped. With ``single_size`` a second processed size raises a ValueError right away.
        """
        pending: dict[tuple[int, int], list[tuple[int, Tensor]]] = {}
        for index, pixels, error, stamp in self._decoded(sources) if decoded is None else decoded:
            if stamps is not None and stamp is not None:
                stamps[index] = stamp  # the identity of the file these pixels came from
            if error is not None:
                if failures is None:
                    raise error
                failures[str(sources[index])] = str(error)
                logger.warning("Skipping %s: %s", sources[index], error)
                continue
            size = tuple(pixels.shape[-2:])
            if single_size and pending and size not in pending:
                (other,) = pending
                raise ValueError(
                    f"Images get different processed sizes ({other[0]}x{other[1]} and {size[0]}x{size[1]}, "
                    f"image {index}), so their features cannot form one batch. Use extractor.extract(images) for "
                    "one output per image, or keep_aspect=False for a fixed square size."
                )
            group = pending.setdefault(size, [])
            group.append((index, pixels))
            if len(group) == self.batch_size:
                yield from self._run_groups(pending.pop(size), pooled, sources, failures)
            elif sum(map(len, pending.values())) >= MAX_PENDING_BATCHES * self.batch_size:  # many sizes: bound memory
                largest = pending.pop(max(pending, key=lambda s: len(pending[s])))
                yield from self._run_groups(largest, pooled, sources, failures)
        for group in sorted(pending.values(), key=lambda g: g[0][0]):
            yield from self._run_groups(group, pooled, sources, failures)

    def _run_groups(
        self,
        group: list[tuple[int, Tensor]],
        pooled: bool,
        sources: list[ImageSource],
        failures: dict[str, str] | None,
    ) -> list[tuple[list[int], FeatureOutput]]:
        """Run one group. With ``failures``, a model error (RuntimeError such as out of memory, MemoryError) is
        retried image by image, and an image that fails alone is recorded and skipped: one image cannot end a run."""
        try:
            return [self._run_group(group, pooled)]
        except (RuntimeError, MemoryError) as error:
            if failures is None:
                raise
            message = f"{type(error).__name__} in the model: {(str(error).strip().splitlines() or [''])[0]}"
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(group) > 1:
            return [result for item in group for result in self._run_groups([item], pooled, sources, failures)]
        source = sources[group[0][0]]
        failures[str(source)] = message
        logger.warning("Skipping %s: %s", source, message)
        return []

    def _run_group(self, group: list[tuple[int, Tensor]], pooled: bool) -> tuple[list[int], FeatureOutput]:
        indices = [i for i, _ in group]
        batch = torch.stack([pixels for _, pixels in group])  # (B, 3, H, W)
        return indices, self.forward(batch, pooled=pooled)

    def forward(self, batch: Tensor, *, pooled: bool = True) -> FeatureOutput:
        """Run the model on an already preprocessed batch (B, 3, H, W). Outputs are float32 on the CPU."""
        dtype = next(self.model.parameters()).dtype
        batch = batch.to(self.device, dtype=dtype, non_blocking=True)
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            out = self.model.forward_features(batch, pooled=pooled)
        h, w = out.patch_features.shape[1:3]
        return FeatureOutput(
            patch_features=out.patch_features.float().cpu(),
            pooled=None if out.pooled is None else out.pooled.float().cpu(),
            registers=out.registers.float().cpu(),
            grid_size=(h, w),
            image_size=tuple(batch.shape[-2:]),
        )
