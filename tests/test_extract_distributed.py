"""Multi-process extraction (2 gloo CPU processes, forked): the result equals a 1-process run bit for bit, and a
2-rank run that is interrupted resumes with 1 process (and a 1-process run with 2 ranks)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_extract_integrity import assert_same_features, saved_by_name, tiny_extractor, write_images

from capi_backbones.features import FeatureExtractor, load_index, verify_output

WORLD_SIZE = 2
SHARD_SIZE = 2


def extract(images, out, **kwargs):
    return tiny_extractor(batch_size=1).extract_to_disk(images, out, shard_size=SHARD_SIZE, progress=False, **kwargs)


def stop_after_forwards(n: int) -> None:
    """Raise KeyboardInterrupt in the (n+1)-th forward of this process."""
    real_forward = FeatureExtractor.forward
    calls = []

    def forward(self, batch, *, pooled=True):
        calls.append(1)
        if len(calls) > n:
            raise KeyboardInterrupt
        return real_forward(self, batch, pooled=pooled)

    FeatureExtractor.forward = forward  # the forked child's own copy of the class


def rank_main(rank: int, store: str, images, out, interrupt_after: tuple[int, ...] | None, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    try:
        if interrupt_after is not None:
            stop_after_forwards(interrupt_after[rank])
            try:
                extract(images, out)
            except KeyboardInterrupt:
                return
            raise AssertionError("not interrupted")
        summary = extract(images, out)
        results.put((rank, summary.n_written, sorted(summary.failed)))
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path, images, out, name, interrupt_after=None) -> list:
    results = mp.get_context("fork").SimpleQueue()
    store = tmp_path / f"store_{name}"
    mp.start_processes(
        rank_main, args=(str(store), images, out, interrupt_after, results), nprocs=WORLD_SIZE, start_method="fork"
    )
    return sorted(results.get() for _ in range(WORLD_SIZE)) if interrupt_after is None else []


@pytest.fixture
def images(tmp_path):
    from test_extract_integrity import IMAGES

    folder = tmp_path / "images"
    write_images(folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return folder, sorted(IMAGES)


def test_two_ranks_equal_one_process_and_an_interrupted_run_resumes_with_another_count(tmp_path, images):
    folder, names = images
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    extract(folder, tmp_path / "single")
    reference = saved_by_name(tmp_path / "single")
    assert sorted(reference) == names

    ranks = run_ranks(tmp_path, folder, tmp_path / "two", "full")
    assert [r[1] for r in ranks] == [4, 4]  # every rank returns the summary of the whole run
    assert all(r[2] == ["broken.jpg"] for r in ranks)
    assert_same_features(saved_by_name(tmp_path / "two"), reference)
    index = load_index(tmp_path / "two")
    assert {s["name"].split(".")[0][-5:] for s in index["shards"]} == {"r0000", "r0001"}  # both ranks wrote shards
    assert [f["file"] for f in index["failed"]] == ["broken.jpg"]
    assert verify_output(tmp_path / "two").ok and not verify_output(tmp_path / "two").unmerged_ranks

    # rank 0 saves astronaut.png, rank 1 only records broken.jpg as failed; then both stop
    run_ranks(tmp_path, folder, tmp_path / "cut", "cut", interrupt_after=(1, 0))
    assert len(verify_output(tmp_path / "cut").unmerged_ranks) == WORLD_SIZE
    summary = extract(folder, tmp_path / "cut")  # one process finishes it
    assert summary.n_skipped == 1 and summary.n_written == 3 and list(summary.failed_before) == ["broken.jpg"]
    assert_same_features(saved_by_name(tmp_path / "cut"), reference)
    assert verify_output(tmp_path / "cut").ok and not verify_output(tmp_path / "cut").unmerged_ranks

    with pytest.MonkeyPatch.context() as patch:  # a 1-process run cut after 1 image, finished by 2 ranks
        real_forward = FeatureExtractor.forward
        calls = []

        def forward(self, batch, *, pooled=True):
            calls.append(1)
            if len(calls) > 1:
                raise KeyboardInterrupt
            return real_forward(self, batch, pooled=pooled)

        patch.setattr(FeatureExtractor, "forward", forward)
        with pytest.raises(KeyboardInterrupt):
            extract(folder, tmp_path / "grow")
    assert sum(s["count"] for s in load_index(tmp_path / "grow")["shards"]) == 1
    ranks = run_ranks(tmp_path, folder, tmp_path / "grow", "grow")
    assert sum(r[1] for r in ranks) == 2 * 3  # the 3 images left, counted by both ranks' summaries
    assert_same_features(saved_by_name(tmp_path / "grow"), reference)
