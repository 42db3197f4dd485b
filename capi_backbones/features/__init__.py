"""Feature extraction: image loading, the size policy, the FeatureExtractor and sharded writing to disk.

The names below are imported on first use (PEP 562), so the light modules of this package (``features.index``,
the on-disk format) can be imported, for example by the CLI's argument checks, without torch.
"""

from capi_backbones.lazy_exports import lazy_exports

# public name -> the module that defines it
_LAZY = {
    "ExtractionInterrupted": "disk",
    "ExtractionSummary": "disk",
    "FeatureExtractor": "extractor",
    "resolve_model": "extractor",
    "FolderBusyError": "folder_lock",
    "expand_inputs": "images",
    "find_image_files": "images",
    "load_image": "images",
    "pil_to_rgb": "images",
    "to_rgb_tensor": "images",
    "load_index": "index",
    "load_saved_features": "index",
    "FeatureOutput": "output",
    "Preprocessor": "preprocessing",
    "resize_and_normalize": "preprocessing",
    "SavedShard": "shards",
    "read_shard": "shards",
    "VerificationReport": "verification",
    "verify_output": "verification",
    "ShardWriter": "writer",
}

TYPE_CHECKING = False
if TYPE_CHECKING:  # static type checkers and IDEs see the real objects
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


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


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
