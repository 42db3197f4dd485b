"""Run-time settings of the package: precision (see ``capi_backbones.runtime.precision``)."""
