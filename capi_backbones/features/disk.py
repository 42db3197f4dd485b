"""Extraction to disk: image files and folders in, resumable shards and an index out.

This module holds the orchestration (finding the inputs, the run lock, the ranks of a torchrun launch, resume,
interrupts, failures); the model side is :class:`~capi_backbones.features.extractor.FeatureExtractor`, the shards and
the index are written by :class:`~capi_backbones.features.writer.ShardWriter`, the folder's format is
``capi_backbones.features.index``.
"""

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from capi_backbones.constants import DEFAULT_SHARD_FORMAT, DEFAULT_SHARD_SIZE, DEFAULT_STORAGE_DTYPE
from capi_backbones.features.folder_lock import FolderLock
from capi_backbones.features.images import expand_inputs, iter_file_paths
from capi_backbones.features.index import check_output_path, load_index
from capi_backbones.features.writer import (
    ShardWriter,
    check_writer_options,
    make_folder,
    merge_rank_manifests,
    prepare_folder,
)
from capi_backbones.images import UnreadableFolder
from capi_backbones.runtime.distributed import process_group
from capi_backbones.runtime.signals import Interrupted, interrupt_on_stop_signals, stop_signals_ignored

__all__ = ["ExtractionInterrupted", "ExtractionSummary", "extract_to_disk"]

logger = logging.getLogger(__name__)


@dataclass
class ExtractionSummary:
    """What :func:`extract_to_disk` did."""

    out_dir: Path
    index_path: Path  # out_dir / "index.json"
    n_written: int  # images whose features were written in this run
    n_skipped: int  # images already in the index (resumed), not recomputed
    failed: dict[str, str] = field(default_factory=dict)  # recorded name -> error message, for this run
    shards: list[str] = field(default_factory=list)  # shard names written in this run
    failed_before: dict[str, str] = field(default_factory=dict)  # unchanged images that failed in an earlier run,
    # skipped (name -> recorded error); retry_failed=True tries them again


class ExtractionInterrupted(Interrupted):
    """SIGTERM or SIGUSR1 during ``extract_to_disk``, handled like Ctrl-C (finished images saved).
    ``exit_code`` = 128 + signal."""


def extract_to_disk(
    extractor: Any,  # a FeatureExtractor (not imported: the extractor imports this module)
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    format: str = DEFAULT_SHARD_FORMAT,
    shard_size: int = DEFAULT_SHARD_SIZE,
    pooled: bool = True,
    dtype: str = DEFAULT_STORAGE_DTYPE,
    progress: bool = True,
    retry_failed: bool = False,
) -> ExtractionSummary:
    """Extract features of image files and directories into shards under ``out_dir`` with ``extractor``; resumable.

    Writes ``out_dir/index.json`` and shards ``shard_00000.safetensors`` (or ``shard_00000/`` folders of
    ``.npy`` files with ``format="npy"``), each holding up to ``shard_size`` images of one processed size
    (see ``capi_backbones.features.index`` for the layout and ``capi_backbones.features.writer`` for the rules
    below). Each shard is written to a temporary name and renamed, and the index is rewritten the same way after
    each shard, so no partial shard ever appears. Ctrl-C, SIGTERM and SIGUSR1 write the finished images into a last
    shard and the index, then raise KeyboardInterrupt (:class:`ExtractionInterrupted` for the signals).

    A re-run into the same ``out_dir`` skips the images already listed in the index (and refuses to mix in
    features made with other settings or another model; it first checks that the listed shards are intact and
    redoes the images of missing, truncated or damaged ones). A second run into a folder that a run is writing raises
    :class:`FolderBusyError`. An image that cannot be read, is too elongated, or makes the model fail (out of
    memory, ...) is logged with its name, recorded under ``failed`` in the index, and skipped; the run goes on.
    Later runs skip it too (listed in ``failed_before``) until the file changes, or with ``retry_failed=True``.
    ``dtype`` is the storage dtype, ``"float32"`` or ``"float16"``.

    Many processes: when ``torch.distributed`` is initialised (e.g. under ``torchrun``), every rank calls this
    with the same arguments; rank ``r`` of ``N`` extracts every N-th remaining image and writes its own shards,
    and one index results. Each rank returns the summary of the whole run. An interrupted run resumes with
    any number of ranks.
    """
    out_dir = check_output_path(out_dir)  # the folder itself is checked by make_folder (rank 0), before any deletion
    unreadable: list[UnreadableFolder] = []
    # Named as given, links not resolved: two links to one file are two images, and a link's folder and name are
    # what the index records. A path given twice is done once.
    paths = list(dict.fromkeys(_absolute(p) for p in iter_file_paths(expand_inputs(inputs, unreadable=unreadable))))
    root = _common_root(inputs)
    options = {"format": format, "dtype": dtype, "settings": extractor._settings(pooled), "root": root}
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
        summary = _extract_into(extractor, writer, paths, pooled=pooled, progress=progress, retry_failed=retry_failed)
        summary.out_dir = out_dir
        for folder, reason in unreadable:  # named, and the run ends with "some inputs could not be used"
            message = f"Cannot list the folder ({reason}); its images were not extracted"
            logger.warning("Skipping the folder %s: %s", folder, reason)
            summary.failed[writer.name_of(folder) + "/"] = message
        if world_size > 1:
            torch.distributed.barrier()  # every rank's manifest is complete
            if rank == 0:
                merge_rank_manifests(out_dir, load_index(out_dir))
            summaries = [None] * world_size
            torch.distributed.all_gather_object(summaries, summary)  # also waits for the merge
            summary = _combine(summaries)
    return summary


def _extract_into(
    extractor: Any,  # a FeatureExtractor (not imported: the extractor imports this module)
    writer: ShardWriter,
    paths: list[Path],
    *,
    pooled: bool,
    progress: bool,
    retry_failed: bool,
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
    decoded = extractor._decoded(todo, stamps=True)  # starts the decoding workers
    bar = tqdm(total=len(todo), unit="img", desc="extract", disable=not progress)
    stamps: dict[int, dict] = {}  # input index -> identity of the file its features were made from
    try:
        batches = extractor._iter_batches(
            todo, pooled=pooled, single_size=False, failures=failed, decoded=decoded, stamps=stamps
        )
        n_written = 0
        for indices, output in batches:
            for k, i in enumerate(indices):
                writer.add(todo[i], output.select(k), stamp=stamps.pop(i, None))
            n_written += len(indices)
            bar.update(n_written + len(failed) - bar.n)  # written and failed images so far
            bar.set_postfix(failed=len(failed), refresh=False)
        bar.update(n_written + len(failed) - bar.n)
    except KeyboardInterrupt:
        with stop_signals_ignored():  # a second Ctrl-C would lose the finished images or end in a traceback
            _record_failures(writer, failed)
            writer.finish()  # keep the finished images
            _stop_workers(decoded)
        raise
    finally:
        bar.close()
    _record_failures(writer, failed)
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


def _record_failures(writer: ShardWriter, failed: dict[str, str]) -> None:
    for name, message in failed.items():
        writer.add_failure(Path(name), message)


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


def _absolute(path: str | os.PathLike) -> Path:
    """The absolute, normalised path, links not resolved (``os.path.abspath``)."""
    return Path(os.path.abspath(path))


def _common_root(inputs) -> Path:
    """The deepest folder holding every input (a directory counts as itself, a file as its parent); links are not
    resolved, so names stay those the user sees."""
    items = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
    folders = [p if p.is_dir() else p.parent for p in (_absolute(i) for i in items)]
    return Path(os.path.commonpath(folders))
