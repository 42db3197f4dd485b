"""Each seed scheme gives its values (written out here from their definitions, not taken from the package), the
callers draw from them, and no module outside ``runtime/seeding.py`` derives a seed inline."""

import ast
import importlib.util
import pkgutil
from pathlib import Path

import numpy as np
import torch

import capi_backbones
from capi_backbones.runtime import seeding

SEED_CALLS = {"manual_seed", "seed", "default_rng", "RandomState", "SeedSequence"}  # what takes a seed


def _mixed(seed: int, tag: int, value: int) -> int:
    high, low = np.random.SeedSequence([seed, tag, value]).generate_state(2, dtype=np.uint32)
    return ((int(high) & 0x7FFFFFFF) << 32) | int(low)


def test_the_training_scheme_and_its_tags():
    assert (seeding.EPOCH_ORDER_TAG, seeding.AUGMENTATION_TAG, seeding.MASK_TAG, seeding.RANK_TAG) == (0, 1, 2, 3)
    for seed, rank, step in [(0, 0, 0), (7, 3, 0), (7, 3, 250), (2**40, 4095, 9)]:
        assert seeding.rank_seed(seed, rank, step) == _mixed(seed, 3, step * 4096 + rank)
    assert seeding.rank_seed(5, 1) == _mixed(5, 3, 1)  # the start of a run is step 0


def test_the_probe_scheme_is_linear():
    for seed, epoch in [(0, 0), (0, 5), (3, 0), (3, 17), (2**33, 2)]:
        assert seeding.probe_order_seed(seed, epoch) == seed * 1_000_003 + epoch
    for seed, iteration, image in [(0, 0, 0), (1, 2, 3), (9, 12_499, 4095)]:
        assert seeding.probe_augmentation_seed(seed, iteration, image) == seed * 1_000_003 + iteration * 4096 + image


def test_the_probe_batches_draw_from_the_probe_scheme():
    from capi_backbones.evals.probe_grid import CachedBatches

    features, labels = {"x": torch.arange(40.0)[:, None]}, torch.arange(40)
    batches = CachedBatches(features, labels, batch_size=8, seed=3)
    for iteration, epoch, position in [(0, 0, 0), (4, 0, 4), (5, 1, 0), (13, 2, 3)]:
        order = torch.randperm(40, generator=torch.Generator().manual_seed(3 * 1_000_003 + epoch))
        assert batches(iteration)[1].tolist() == order[position * 8 : (position + 1) * 8].tolist()


def inline_derivations(source: str) -> list[str]:
    """Where ``source`` derives a seed by hand: the probes' stride, numpy's SeedSequence, or arithmetic in what is
    handed to a seeding call (``manual_seed(a * b + c)``, ``default_rng(seed + 1)``, ``f(..., seed=s + 1)``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and node.value == seeding.PROBE_SEED_STRIDE:
            found.append(f"line {node.lineno}: the probes' seed stride {node.value}")
        name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
        if name == "SeedSequence":
            found.append(f"line {node.lineno}: SeedSequence")
        if not isinstance(node, ast.Call):
            continue
        called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        seeds = [*node.args] if called in SEED_CALLS else []
        seeds += [k.value for k in node.keywords if k.arg and (k.arg == "seed" or k.arg.endswith("_seed"))]
        if any(isinstance(part, ast.BinOp) for arg in seeds for part in ast.walk(arg)):
            found.append(f"line {node.lineno}: arithmetic in the seed handed to {called}()")
    return found


def _package_sources() -> dict[str, Path]:
    """Every module of the installed package (found through importlib, as CI installs the wheel)."""
    sources = {"capi_backbones": Path(capi_backbones.__file__)}
    for info in pkgutil.walk_packages(capi_backbones.__path__, "capi_backbones."):
        sources[info.name] = Path(importlib.util.find_spec(info.name).origin)
    return sources


def test_no_module_outside_the_runtime_derives_seeds_inline():
    sources = _package_sources()
    assert "capi_backbones.evals.probe_grid" in sources and "capi_backbones.train.checkpointing" in sources
    found = {
        name: hits
        for name, path in sources.items()
        if name != "capi_backbones.runtime.seeding" and (hits := inline_derivations(path.read_text(encoding="utf-8")))
    }
    assert not found, f"derive these seeds with a function of capi_backbones.runtime.seeding: {found}"
    assert inline_derivations(Path(seeding.__file__).read_text(encoding="utf-8"))  # the scheme itself is found


def test_the_check_finds_each_kind_of_inline_derivation():
    planted = [
        "g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)",
        "g = torch.Generator().manual_seed(probe_seed(seed, 1000003))",
        "state = np.random.SeedSequence([seed, 3, rank]).generate_state(2)",
        "torch.manual_seed(seed + rank)",
        "rng = np.random.default_rng(seed ^ 5)",
        "split = held_out_split(10, 0.2, seed=SPLIT_SEED + 1)",
        "loader = build(stream, base_seed=seed * 2)",
    ]
    for line in planted:
        assert inline_derivations(line), line
    for line in ("torch.manual_seed(config.seed)", "torch.manual_seed(rank_seed(seed, rank, step))", "x = a * b + c"):
        assert not inline_derivations(line), line
