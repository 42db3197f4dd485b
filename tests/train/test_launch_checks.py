"""train's launcher refuses what it can before torch is imported (the CLI's fail-fast rule)."""

import subprocess
import sys

PROGRAM = """
import sys
import capi_backbones.train.launch as launch
launch.cuda_is_certainly_missing = lambda: True  # a machine without any GPU driver
code = launch.run("tiny", ["train.device=cuda", "data.root=photos"])
print(code, "torch" in sys.modules)
"""


def test_cuda_asked_on_a_machine_without_a_driver_fails_before_torch_is_imported():
    done = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [
        "capi-backbones train: error: train.device=cuda was asked for, but CUDA is not available here; "
        "use train.device=cpu."
    ]
