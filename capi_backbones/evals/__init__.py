"""Frozen-feature evaluation: the paper's probes (k-NN, linear and attentive classification; k-NN and logistic
regression segmentation) on tensors from any backbone, and the protocols behind ``capi-backbones eval``.

Not imported by ``import capi_backbones``. The names below are imported on first use (PEP 562), so that the
command line checks its arguments (``capi_backbones.evals.representations``) before torch is imported.
scikit-learn is imported by the segmentation's logistic regression (and, for its version, by the results report).
"""

from capi_backbones.lazy_exports import lazy_exports

# public name -> the module that defines it
_LAZY = {
    "knn_classify": "capi_backbones.evals.knn",
    "knn_top1": "capi_backbones.evals.knn",
    "miou": "capi_backbones.evals.metrics",
    "pixel_accuracy": "capi_backbones.evals.metrics",
    "topk_accuracy": "capi_backbones.evals.metrics",
    "OFFICIAL_LEARNING_RATES": "capi_backbones.evals.defaults",
    "OFFICIAL_WEIGHT_DECAYS": "capi_backbones.evals.defaults",
    "CachedBatches": "capi_backbones.evals.probe_grid",
    "ProbeGrid": "capi_backbones.evals.probe_grid",
    "ProbeTrainingConfig": "capi_backbones.evals.probe_grid",
    "predict_grid": "capi_backbones.evals.probe_grid",
    "probe_lr_schedule": "capi_backbones.schedules",
    "train_probe_grid": "capi_backbones.evals.probe_grid",
    "AttentiveProbe": "capi_backbones.evals.probes",
    "LinearProbe": "capi_backbones.evals.probes",
    "REPRESENTATIONS": "capi_backbones.evals.representations",
    "make_representations": "capi_backbones.evals.representations",
    "Standardizer": "capi_backbones.evals.segmentation",
    "knn_segment": "capi_backbones.evals.segmentation",
    "logistic_segment": "capi_backbones.evals.segmentation",
    "patch_mode_labels": "capi_backbones.evals.segmentation",
    "patch_pixel_labels": "capi_backbones.evals.segmentation",
}

TYPE_CHECKING = False
if TYPE_CHECKING:  # static type checkers and IDEs see the real objects
    from capi_backbones.evals.defaults import OFFICIAL_LEARNING_RATES, OFFICIAL_WEIGHT_DECAYS
    from capi_backbones.evals.knn import knn_classify, knn_top1
    from capi_backbones.evals.metrics import miou, pixel_accuracy, topk_accuracy
    from capi_backbones.evals.probe_grid import (
        CachedBatches,
        ProbeGrid,
        ProbeTrainingConfig,
        predict_grid,
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
    from capi_backbones.schedules import probe_lr_schedule


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


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
