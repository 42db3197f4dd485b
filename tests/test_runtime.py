"""The runtime layer: rank and world size, stop signals, seeds, devices and exit codes, each in one place."""

import errno
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from capi_backbones.atomic_files import WriteError
from capi_backbones.runtime import devices, distributed, exit_codes, ranks, seeding, signals


def test_importing_the_runtime_layer_imports_no_torch():
    code = (
        "import sys\n"
        "import capi_backbones.runtime, capi_backbones.runtime.signals, capi_backbones.runtime.ranks\n"
        "import capi_backbones.runtime.seeding, capi_backbones.runtime.exit_codes\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"


def test_ranks_come_from_torchrun_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert (ranks.env_rank(), ranks.env_world_size()) == (0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (ranks.env_rank(), ranks.env_world_size(), ranks.env_local_rank()) == (3, 4, 1)
    assert distributed.process_group() == (0, 1)  # no process group joined


def test_single_process_context_needs_no_process_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    context = distributed.init_distributed("cpu")
    assert (context.rank, context.world_size, context.device, context.initialized_here) == (
        0,
        1,
        torch.device("cpu"),
        False,
    )
    assert distributed.reducers(context) == (None, None)


def test_derive_seed_is_numpy_seed_sequence_hashing():
    for seed, tag, value in [(0, 0, 0), (7, 2, 123), (2**40, 1, 5)]:
        high, low = np.random.SeedSequence([seed, tag, value]).generate_state(2, dtype=np.uint32)
        assert seeding.derive_seed(seed, tag, value) == ((int(high) & 0x7FFFFFFF) << 32) | int(low)
    assert seeding.derive_seed(0, 0, 1) != seeding.derive_seed(0, 1, 0)  # tags and values do not mix
    a, b = seeding.seeded_generator(1, 2, 3), seeding.seeded_generator(1, 2, 3)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


def test_training_derives_seeds_from_the_runtime():
    from capi_backbones.train import build, checkpointing, data

    for module in (checkpointing, build):
        assert module.rank_seed is seeding.rank_seed, module.__name__
    assert data.seeded_generator is seeding.seeded_generator


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("device=", "device=cuda was asked for, but CUDA is not available here; use device=cpu."),
        ("--device ", "--device cuda was asked for, but CUDA is not available here; use --device cpu."),
        ("train.device=", "train.device=cuda was asked for, but CUDA is not available here; use train.device=cpu."),
    ],
)
def test_cuda_without_cuda_is_one_line_naming_the_setting(monkeypatch, option, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(devices.DeviceUnavailableError) as caught:
        devices.resolve_device("cuda", option=option)
    assert str(caught.value) == expected
    assert exit_codes.exit_code_for(caught.value) == exit_codes.EXIT_USAGE
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert devices.resolve_device(None) == torch.device("cpu")


def test_training_device_errors_name_train_device(monkeypatch):
    from capi_backbones.train.config import load_config
    from capi_backbones.train.trainer import Trainer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match=r"^train\.device=cuda was asked for, but CUDA is not available here"):
        Trainer(load_config("tiny", ["train.device=cuda"]))


def test_unknown_device_is_refused_in_one_line():
    with pytest.raises(ValueError) as caught:
        devices.resolve_device("gpu", option="--device ")
    assert str(caught.value) == "--device gpu is not a device; use --device cpu, --device cuda or --device cuda:N."


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGUSR1, 138)])
def test_stop_signals_raise_interrupted_with_their_exit_code_then_are_restored(signum, code):
    before = signal.getsignal(signum)
    with pytest.raises(signals.Interrupted) as caught, signals.interrupt_on_stop_signals():
        os.kill(os.getpid(), signum)
    assert isinstance(caught.value, KeyboardInterrupt)
    assert caught.value.exit_code == code and exit_codes.exit_code_for(caught.value) == code
    assert signal.getsignal(signum) is before


def test_stop_signals_are_ignored_while_work_is_saved():
    # Python's own Ctrl-C handler to start from, whatever this process inherited (a job started in the background
    # with nohup or & inherits SIGINT ignored)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = {signum: signal.getsignal(signum) for signum in signals.STOP_SIGNALS}
        with signals.stop_signals_ignored():
            for signum in signals.STOP_SIGNALS:
                os.kill(os.getpid(), signum)  # would end or interrupt the process if not ignored
        assert {signum: signal.getsignal(signum) for signum in signals.STOP_SIGNALS} == before
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_handler_style_routes_signals_to_a_flag():
    seen = []
    with signals.handle_stop_signals(lambda signum, frame: seen.append(signum)):
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
    assert seen == [signal.SIGUSR1, signal.SIGTERM]


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (KeyboardInterrupt(), 130),
        (ValueError("bad"), 2),
        (FileNotFoundError(errno.ENOENT, "No such file", "x"), 2),
        (FileExistsError(errno.EEXIST, "exists", "x"), 2),
        (OSError(errno.ENOSPC, "No space left on device", "x"), 3),
        (PermissionError(errno.EACCES, "Permission denied", "x"), 3),
        (WriteError("out/x", OSError(errno.EROFS, "Read-only file system")), 3),
        (ConnectionError("refused"), 3),
        (ImportError("no onnx"), 3),
        (KeyError("bug"), None),
        (TypeError("bug"), None),
        (OSError(errno.EBADF, "Bad file descriptor"), None),
    ],
)
def test_exit_code_for_each_kind_of_error(error, code):
    assert exit_codes.exit_code_for(error) == code


def test_an_error_can_state_its_own_exit_code():
    class Stopped(RuntimeError):
        exit_code = 1

    assert exit_codes.exit_code_for(Stopped()) == 1
    assert exit_codes.one_line(ValueError("first line\nsecond")) == "first line"
    assert exit_codes.one_line(ValueError("")) == "ValueError"
