"""What every long-running command shares: ranks, stop signals, seeds, devices and exit codes.

One home per mechanism, used by extraction, training and evaluation alike (no command imports another command's
package for it):

- :mod:`~capi_backbones.runtime.ranks`: rank and world size as torchrun announces them (no torch);
- :mod:`~capi_backbones.runtime.distributed`: the process group's rank and world size, joining and leaving
  torchrun's process group, the collective helpers (imports torch);
- :mod:`~capi_backbones.runtime.signals`: SIGINT, SIGTERM and SIGUSR1 as a clean stop, signals ignored while
  finished work is saved, quiet DataLoader workers;
- :mod:`~capi_backbones.runtime.seeding`: the one derivation of well-mixed seeds from ``(seed, tag, value)``;
- :mod:`~capi_backbones.runtime.devices`: ``auto``/``cpu``/``cuda[:N]`` to a ``torch.device``, with a one-line error
  when CUDA is asked for and absent;
- :mod:`~capi_backbones.runtime.exit_codes`: the exit codes of every command and the error -> code mapping;
- :mod:`~capi_backbones.runtime.hardware`: what can be told of the accelerators without torch;
- :mod:`~capi_backbones.runtime.logs`: the package's messages at INFO on stderr, other libraries at WARNING;
- :mod:`~capi_backbones.runtime.precision`: native bf16 detection and the ``auto``/``fp32``/``bf16`` choice.

Importing this package imports none of them (and no torch): import the submodule you need.
"""

__all__: list[str] = []
