"""torch.hub configuration: ``torch.hub.load("<owner>/capi-backbones", "capi_vitl14")``."""

dependencies = ["torch", "safetensors", "tqdm"]  # what the entry points import (huggingface_hub: only for hf-hub:)

from capi_backbones.hub import (  # noqa: E402, F401
    capi_vitb14,
    capi_vitl14,
    capi_vitl14_in1k,
    capi_vitl14_in22k,
    capi_vitl14_lvd,
    capi_vitl14_p205,
    capi_vits14,
)
