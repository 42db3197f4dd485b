"""Feature extraction: image loading, the size policy, the FeatureExtractor and sharded writing to disk."""

from capi_backbones.features.disk import ExtractionInterrupted, ExtractionSummary
from capi_backbones.features.extractor import FeatureExtractor, resolve_model
from capi_backbones.features.folder_lock import FolderBusyError
from capi_backbones.features.images import expand_inputs, find_image_files, load_image, pil_to_rgb, to_rgb_tensor
from capi_backbones.features.index import load_index, load_saved_features
from capi_backbones.features.output import FeatureOutput
from capi_backbones.features.preprocessing import Preprocessor, resize_and_normalize
from capi_backbones.features.shards import SavedShard, read_shard
from capi_backbones.features.verification import VerificationReport, verify_output
from capi_backbones.features.writer import ShardWriter

__all__ = [
    "ExtractionInterrupted",
    "ExtractionSummary",
    "FeatureExtractor",
    "FeatureOutput",
    "FolderBusyError",
    "Preprocessor",
    "SavedShard",
    "ShardWriter",
    "expand_inputs",
    "find_image_files",
    "load_image",
    "load_index",
    "load_saved_features",
    "pil_to_rgb",
    "read_shard",
    "resize_and_normalize",
    "resolve_model",
    "to_rgb_tensor",
    "VerificationReport",
    "verify_output",
]
