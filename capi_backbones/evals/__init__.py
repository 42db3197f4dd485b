"""Frozen-feature evaluation: the paper's probes (k-NN, linear and attentive classification; k-NN and logistic
regression segmentation) on tensors from any backbone, and the protocols behind ``capi-backbones eval``.

Not imported by ``import capi_backbones``; scikit-learn is imported by the segmentation's
logistic regression (and, for its version number, by the results report).
"""

from capi_backbones.evals.knn import knn_classify, knn_top1
from capi_backbones.evals.metrics import miou, pixel_accuracy, topk_accuracy
from capi_backbones.evals.probe_grid import (
    OFFICIAL_LEARNING_RATES,
    OFFICIAL_WEIGHT_DECAYS,
    CachedBatches,
    ProbeGrid,
    ProbeTrainingConfig,
    predict_grid,
    probe_lr_schedule,
    train_probe_grid,
)
from capi_backbones.evals.probes import AttentiveProbe, LinearProbe
from capi_backbones.evals.representations import REPRESENTATIONS, make_representations
from capi_backbones.evals.segmentation import (
    Standardizer,
    knn_segment,
    logistic_segment,
    patch_mode_labels,
    patch_pixel_labels,
)

__all__ = [
    "OFFICIAL_LEARNING_RATES",
    "OFFICIAL_WEIGHT_DECAYS",
    "REPRESENTATIONS",
    "AttentiveProbe",
    "CachedBatches",
    "LinearProbe",
    "ProbeGrid",
    "ProbeTrainingConfig",
    "Standardizer",
    "knn_classify",
    "knn_segment",
    "knn_top1",
    "logistic_segment",
    "make_representations",
    "miou",
    "patch_mode_labels",
    "patch_pixel_labels",
    "pixel_accuracy",
    "predict_grid",
    "probe_lr_schedule",
    "topk_accuracy",
    "train_probe_grid",
]
