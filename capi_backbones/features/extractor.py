"""FeatureExtractor: images in, CAPI features out (in memory or sharded on disk)."""

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from capi_backbones.constants import PATCH_SIZE
from capi_backbones.features.folder_lock import FolderBusyError, FolderLock
from capi_backbones.features.images import ImageSource, expand_inputs, iter_file_paths, to_rgb_tensor
from capi_backbones.features.output import FeatureOutput
from capi_backbones.features.preprocessing import Preprocessor
from capi_backbones.features.writer import (
    DEFAULT_SHARD_SIZE,
    ShardWriter,
    check_writer_options,
    load_index,
    make_folder,
    merge_rank_manifests,
    prepare_folder,
)
from capi_backbones.models import CapiModel
from capi_backbones.runtime.devices import resolve_device
from capi_backbones.runtime.distributed import process_group
from capi_backbones.runtime.precision import autocast_dtype, resolve_precision
from capi_backbones.runtime.signals import Interrupted, interrupt_on_stop_signals, stop_signals_ignored

__all__ = ["ExtractionInterrupted", "ExtractionSummary", "FeatureExtractor", "FolderBusyError", "resolve_model"]

logger = logging.getLogger(__name__)

MAX_PENDING_BATCHES = 4  # decoded images waiting for a full batch of their size, in batches; then the largest runs


@dataclass
class ExtractionSummary:
    """What :meth:`FeatureExtractor.extract_to_disk` did."""

    out_dir: Path
    index_path: Path  # out_dir / "index.json"
    n_written: int  # images whose features were written in this run
    n_skipped: int  # images already in the index (resumed), not recomputed
    failed: dict[str, str] = field(default_factory=dict)  # recorded name -> error message, for this run
    shards: list[str] = field(default_factory=list)  # shard names written in this run
    failed_before: dict[str, str] = field(default_factory=dict)  # unchanged images that failed in an earlier run,
    # skipped (name -> recorded error); retry_failed=True tries them again


def resolve_model(model: "CapiModel | str | None", weights: "str | os.PathLike | None") -> tuple[CapiModel, str]:
    """Turn the FeatureExtractor's ``model``/``weights`` arguments into a model and a short description.

    - a ``CapiModel``: used as is (``weights`` must be None);
    - an architecture name (``capi_vits14``, ...) with ``weights`` = a local file or directory:
      ``from_pretrained(weights, arch=name)``;
    - any other name or source (``capi_vitl14_lvd``, a path, ``hf-hub:owner/repo``): ``from_pretrained(model)``;
    - ``None`` with ``weights``: ``from_pretrained(weights)`` (the architecture is read off the checkpoint).
    """
    from capi_backbones.pretrained import resolve_model_spec  # the loader sits below features; it decides

    spec = resolve_model_spec(model, weights)
    return spec.load(), spec.description


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
    """Decodes and preprocesses one image per item; errors are returned (not raised) so a worker survives them."""

    def __init__(self, sources: list[ImageSource], preprocessor: Preprocessor) -> None:
        self.sources = sources
        self.preprocessor = preprocessor

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> tuple[int, Tensor | None, Exception | None]:
        try:
            return index, self.preprocessor(to_rgb_tensor(self.sources[index])), None
        except (OSError, ValueError, TypeError) as error:
            return index, None, error


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
            models loaded here. The model is moved there and put in eval mode.
        image_size: target resolution, a multiple of 14: the shorter side with ``keep_aspect`` (the longer side is
            rounded to a multiple of 14), or the side of the square otherwise. See ``features.preprocessing``.
            None: the model's ``default_image_size``, the size it was trained at (224 for the released weights;
            what ``capi-backbones export`` recorded for retrained ones).
        batch_size: images per forward pass. Results do not depend on it.
        keep_aspect: True keeps the aspect ratio (images of different shapes get different patch grids);
            False resizes every image to an ``image_size`` square.
        precision: ``"auto"`` (bf16 autocast where the device runs bf16 natively: CUDA with bf16, CPUs with
            AVX512-BF16 or AMX; fp32 elsewhere; logged once), ``"fp32"`` (the official numbers), ``"bf16"`` or
            ``"fp16"`` (autocast; see ``capi_backbones.runtime.precision``). The index of ``extract_to_disk``
            records the precision that ran.
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
        batch_size: int = 16,
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
        model, self.model_description = resolve_model(model, weights)
        if image_size is None:
            image_size = model.default_image_size
        self.model = model.to(self.device).eval()
        resolve_precision(precision, self.device)  # says once what "auto" chose (and warns of emulated bf16)
        self.preprocessor = Preprocessor(image_size=image_size, patch_size=model.patch_size, keep_aspect=keep_aspect)
        self.batch_size = batch_size
        self.num_workers = num_workers

    @staticmethod
    def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
        return autocast_dtype(resolve_precision(precision, device, announce=False))  # said once the model is loaded

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
        format: str = "safetensors",
        shard_size: int = DEFAULT_SHARD_SIZE,
        pooled: bool = True,
        dtype: str = "float32",
        progress: bool = True,
        retry_failed: bool = False,
    ) -> ExtractionSummary:
        """Extract features of image files and directories into shards under ``out_dir``; resumable.

        Writes ``out_dir/index.json`` and shards ``shard_00000.safetensors`` (or ``shard_00000/`` folders of
        ``.npy`` files with ``format="npy"``), each holding up to ``shard_size`` images of one processed size
        (see ``capi_backbones.features.writer`` for the layout and the rules below). Each shard is written to a
        temporary name and renamed, and the index is rewritten the same way after each shard, so no partial shard
        ever appears. Ctrl-C and SIGTERM write the finished images into a last shard and the index, then raise
        KeyboardInterrupt.

        A re-run into the same ``out_dir`` skips the images already listed in the index (and refuses to mix in
        features made with other settings or another model; it first checks that the listed shards are intact and
        redoes the images of missing or truncated ones). A second run into a folder that a run is writing raises
        :class:`FolderBusyError`. An image that cannot be read, is too elongated, or makes the model fail (out of
        memory, ...) is logged with its name, recorded under ``failed`` in the index, and skipped; the run goes on.
        Later runs skip it too (listed in ``failed_before``) until the file changes, or with ``retry_failed=True``.
        ``dtype`` is the storage dtype, ``"float32"`` or ``"float16"``.

        Many processes: when ``torch.distributed`` is initialised (e.g. under ``torchrun``), every rank calls this
        with the same arguments; rank ``r`` of ``N`` extracts every N-th remaining image and writes its own shards,
        and one index results. Each rank returns the summary of the whole run. An interrupted run resumes with
        any number of ranks.
        """
        paths = [p.resolve() for p in iter_file_paths(expand_inputs(inputs))]
        paths = list(dict.fromkeys(paths))  # a file given twice is done once
        out_dir = Path(out_dir)
        options = {"format": format, "dtype": dtype, "settings": self._settings(pooled), "root": _common_root(inputs)}
        rank, world_size = process_group()
        with contextlib.ExitStack() as stack:
            stack.enter_context(interrupt_on_stop_signals(ExtractionInterrupted))
            if world_size == 1:
                check_writer_options(format=format, shard_size=shard_size, dtype=dtype)
                make_folder(out_dir)
                stack.enter_context(FolderLock(out_dir))
                writer = ShardWriter(out_dir, shard_size=shard_size, **options)
            else:
                setup_error = None
                if rank == 0:
                    try:
                        check_writer_options(format=format, shard_size=shard_size, dtype=dtype)
                        make_folder(out_dir)
                        stack.enter_context(FolderLock(out_dir))
                        prepare_folder(out_dir, **options)
                    except Exception as error:  # every rank raises it, not only rank 0
                        setup_error = error
                shared = [setup_error]
                torch.distributed.broadcast_object_list(shared, src=0)
                if shared[0] is not None:
                    raise shared[0]
                writer = ShardWriter(out_dir, shard_size=shard_size, rank=rank, world_size=world_size, **options)
            summary = self._extract_into(writer, paths, pooled=pooled, progress=progress, retry_failed=retry_failed)
            summary.out_dir = out_dir
            if world_size > 1:
                torch.distributed.barrier()  # every rank's manifest is complete
                if rank == 0:
                    merge_rank_manifests(out_dir, load_index(out_dir))
                summaries = [None] * world_size
                torch.distributed.all_gather_object(summaries, summary)  # also waits for the merge
                summary = _combine(summaries)
        return summary

    def _extract_into(
        self, writer: ShardWriter, paths: list[Path], *, pooled: bool, progress: bool, retry_failed: bool
    ) -> ExtractionSummary:
        """Extract this rank's share of the images of ``paths`` not yet done into ``writer``."""
        remaining = [p for p in paths if p not in writer.done]
        n_skipped = len(paths) - len(remaining)
        failed_before = {}
        todo = []
        for path in remaining:
            error = None if retry_failed else writer.failed_before(path)
            if error is None:
                todo.append(path)
            else:
                failed_before[writer.name_of(path)] = error
        if n_skipped or failed_before:
            logger.info(
                "Resuming in %s: %d of %d images already done, %d failed before (unchanged, skipped).",
                writer.out_dir,
                n_skipped,
                len(paths),
                len(failed_before),
            )
        rank, world_size = process_group()
        todo = todo[rank::world_size]
        failed: dict[str, str] = {}
        decoded = self._decoded(todo)  # starts the decoding workers
        bar = tqdm(total=len(todo), unit="img", desc="extract", disable=not progress)
        try:
            batches = self._iter_batches(todo, pooled=pooled, single_size=False, failures=failed, decoded=decoded)
            n_written = 0
            for indices, output in batches:
                for k, i in enumerate(indices):
                    writer.add(todo[i], output.select(k))
                n_written += len(indices)
                bar.update(n_written + len(failed) - bar.n)  # written and failed images so far
                bar.set_postfix(failed=len(failed), refresh=False)
            bar.update(n_written + len(failed) - bar.n)
        except KeyboardInterrupt:
            with stop_signals_ignored():  # a second Ctrl-C would lose the finished images or end in a traceback
                self._record_failures(writer, failed)
                writer.finish()  # keep the finished images
                _stop_workers(decoded)
            raise
        finally:
            bar.close()
        self._record_failures(writer, failed)
        writer.finish()
        return ExtractionSummary(
            out_dir=writer.out_dir,
            index_path=writer.index_path,
            n_written=len(todo) - len(failed),
            n_skipped=n_skipped,
            failed={writer.name_of(Path(name)): message for name, message in failed.items()},
            shards=writer.shards_written,
            failed_before=failed_before,
        )

    @staticmethod
    def _record_failures(writer: ShardWriter, failed: dict[str, str]) -> None:
        for name, message in failed.items():
            writer.add_failure(Path(name), message)

    def _settings(self, pooled: bool) -> dict:
        return {
            "model": self.model_description,
            "config": self.model.config.to_dict(),
            "weights_fingerprint": weights_fingerprint(self.model),
            "image_size": self.image_size,
            "keep_aspect": self.keep_aspect,
            "pooled": pooled,
            "precision": resolve_precision(self.precision, self.device),
            "mean": list(self.preprocessor.mean),
            "std": list(self.preprocessor.std),
        }

    # ---- the loop -----------------------------------------------------------------------------------------------
    def _decoded(self, sources: list[ImageSource]) -> Iterator[tuple[int, Tensor | None, Exception | None]]:
        """``(index, preprocessed pixels or None, error or None)`` per image, decoded in the worker processes."""
        loader = DataLoader(
            _PreprocessedImages(sources, self.preprocessor),
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
    ) -> Iterator[tuple[list[int], FeatureOutput]]:
        """Decode (in workers, or take ``decoded`` from :meth:`_decoded`), group by processed size, run the model.
        Yields (input indices, batch output).

        Errors: raised, unless ``failures`` is given, where ``str(source) -> message`` is recorded and the image
        skipped. With ``single_size`` a second processed size raises a ValueError right away.
        """
        pending: dict[tuple[int, int], list[tuple[int, Tensor]]] = {}
        for index, pixels, error in self._decoded(sources) if decoded is None else decoded:
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


class ExtractionInterrupted(Interrupted):
    """SIGTERM or SIGUSR1 during ``extract_to_disk``, handled like Ctrl-C (finished images saved).
    ``exit_code`` = 128 + signal."""


def _stop_workers(decoded: Iterator) -> None:
    """Stop the decoding worker processes now (the DataLoader iterator's own clean-up, which would otherwise run
    whenever the iterator is collected, perhaps after the signals are restored)."""
    shutdown = getattr(decoded, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def _combine(summaries: list[ExtractionSummary]) -> ExtractionSummary:
    """The summary of a whole multi-rank run from the summaries of its ranks."""
    first = summaries[0]
    return ExtractionSummary(
        out_dir=first.out_dir,
        index_path=first.index_path,
        n_written=sum(s.n_written for s in summaries),
        n_skipped=first.n_skipped,
        failed={name: message for s in summaries for name, message in s.failed.items()},
        shards=[name for s in summaries for name in s.shards],
        failed_before=first.failed_before,
    )


def _common_root(inputs) -> Path:
    """The deepest folder holding every input (a directory counts as itself, a file as its parent)."""
    items = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
    folders = [p if p.is_dir() else p.parent for p in (Path(i).resolve() for i in items)]
    return Path(os.path.commonpath(folders))
