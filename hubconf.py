"""torch.hub configuration: ``torch.hub.load("<owner>/capi-backbones", "capi_vitl14")``.

The entry points are generated from the weights registry by ``capi_backbones.hub`` (one per architecture and one
per registered weights, so a new release needs no edit here); ``torch.hub.list`` and ``torch.hub.load`` find them
through this module's ``__dir__`` and ``__getattr__`` (PEP 562).
"""

dependencies = ["torch", "safetensors", "tqdm"]  # what the entry points import (huggingface_hub: only for hf-hub:)

from capi_backbones.hub import entry_point as __getattr__  # noqa: E402, F401
from capi_backbones.hub import hubconf_dir as __dir__  # noqa: E402, F401
