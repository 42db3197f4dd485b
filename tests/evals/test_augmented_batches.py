"""The --augment path: RandomResizedCrop + flip through the frozen backbone, a function of the iteration."""

import numpy as np
import torch
from PIL import Image

from capi_backbones.evals import ProbeGrid, ProbeTrainingConfig, train_probe_grid
from capi_backbones.evals.classification_protocol import AugmentedBatches
from capi_backbones.features import FeatureExtractor
from capi_backbones.pretrained import create_model


def test_augmented_batches_are_reproducible_and_train_the_probes(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)).save(paths[-1])
    torch.manual_seed(0)
    extractor = FeatureExtractor(create_model("capi_vits14", depth=2, pred_depth=1), image_size=28,
                                 keep_aspect=False, device="cpu")  # fmt: skip
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    reps = ("pooled", "patch")
    batches = AugmentedBatches(paths, labels, extractor, reps, batch_size=4, seed=3)
    first, first_labels = batches(5)
    again, again_labels = AugmentedBatches(paths, labels, extractor, reps, batch_size=4, seed=3)(5)
    assert torch.equal(first["patch"], again["patch"]) and torch.equal(first_labels, again_labels)
    assert first["pooled"].shape == (4, 384) and first["patch"].shape == (4, 4, 384)
    assert not any(t.is_inference() for t in first.values())  # usable by autograd
    assert not torch.equal(batches(6)[0]["patch"], first["patch"])  # other crops at another step

    grid = ProbeGrid({"pooled": ("linear", 384), "patch": ("attentive", 384)}, 2, learning_rates=(1e-2,),
                     weight_decays=(0.0,))  # fmt: skip
    before = grid.probes[1].query_token.detach().clone()
    config = ProbeTrainingConfig(iterations=2, warmup_iterations=1, batch_size=4, learning_rates=(1e-2,),
                                 weight_decays=(0.0,))  # fmt: skip
    train_probe_grid(grid, batches, config, progress=False)
    assert not torch.equal(grid.probes[1].query_token, before)
