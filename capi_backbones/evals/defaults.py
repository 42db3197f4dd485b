"""The evaluation protocols' defaults, the official settings of the CAPI paper unless a line says otherwise.

One home for each: the protocols' dataclasses and functions take their defaults from here, and so do the options
of ``capi-backbones eval``, whose ``--help`` must not import torch (this module imports nothing).
"""

__all__ = [
    "ATTENTION_HEAD_DIM",
    "CLASSIFIERS",
    "DEFAULT_IGNORE_LABELS",
    "DEFAULT_KNN_DTYPE",
    "DEFAULT_KNN_KS",
    "DEFAULT_PROBE_SEED",
    "DEFAULT_SEGMENTATION_KS",
    "DISTANCES",
    "KNN_DTYPES",
    "KNN_TEMPERATURE",
    "LR_REFERENCE_BATCH",
    "N_PICTURES",
    "OFFICIAL_BATCH_SIZE",
    "OFFICIAL_ITERATIONS",
    "OFFICIAL_LEARNING_RATES",
    "OFFICIAL_WARMUP_ITERATIONS",
    "OFFICIAL_WEIGHT_DECAYS",
    "PROBES",
    "SELECTION_FRACTION",
    "TEST_FRACTION",
]

# Splits (evals.datasets)
SELECTION_FRACTION = 0.1  # share of train held out to choose hyper-parameters (official: 10%)
TEST_FRACTION = 0.2  # share held out as test when a folder has no split subfolders (not a setting of the paper)

# Classification (evals.classification_protocol, evals.knn, evals.probes, evals.probe_grid)
PROBES = ("knn", "linear", "attentive")
DEFAULT_KNN_KS = (10, 20)
KNN_TEMPERATURE = 0.07  # votes weighted by exp(similarity / T)
ATTENTION_HEAD_DIM = 64  # the official head size: heads = D // 64
OFFICIAL_LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2)
OFFICIAL_WEIGHT_DECAYS = (5e-4, 1e-3, 5e-2)
OFFICIAL_BATCH_SIZE = 1024  # 8 processes x 128 in the official launcher
OFFICIAL_ITERATIONS = 12_500
OFFICIAL_WARMUP_ITERATIONS = 1_250
LR_REFERENCE_BATCH = 256  # lr = grid lr * batch / 256
DEFAULT_PROBE_SEED = 0  # probe initialisation and data order (not a setting of the paper)
PROBE_DTYPES = ("float32", "bfloat16")  # what ProbeTrainingConfig.dtype takes; resolve_probe_dtype also takes "auto"
DEFAULT_PROBE_DTYPE = "float32"  # the official probes train without autocast

# Segmentation (evals.segmentation_protocol, evals.segmentation, evals.metrics)
CLASSIFIERS = ("knn", "logreg")
DEFAULT_SEGMENTATION_KS = (1, 3, 10, 30)
DISTANCES = ("cosine", "L2")
KNN_DTYPES = ("auto", "bfloat16", "float32")  # auto: bfloat16 where native (the official ADE20K setting), else float32
DEFAULT_KNN_DTYPE = "auto"
DEFAULT_IGNORE_LABELS = (0, 255)  # the official ADE20K setting (0: 'other', 255: unlabelled)
N_PICTURES = 4  # test images drawn in segmentation_examples.png (not a setting of the paper)
