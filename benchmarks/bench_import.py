"""Start-up cost: ``import capi_backbones`` against ``import torch``, and ``capi-backbones --help`` against
``python -c pass``, each timed as wall clock of fresh processes (cold interpreter; the OS file cache is warm after
the first round, for both sides alike). Rounds alternate the commands so that machine load hits both; the figure is
the ratio of medians.

    python benchmarks/bench_import.py --rounds 7

Targets (issue 7): import ratio <= 1.15x; ``--help`` <= 3x of ``python -c pass``, with torch not imported.
The first line also times the realistic first use, ``from capi_backbones import CapiModel, FeatureExtractor,
from_pretrained``, which imports torch and the loaders, against ``import torch``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HELP = "import sys; sys.argv = ['capi-backbones', '--help']; from capi_backbones.cli.main import main; main()"
COMMANDS = {  # name -> python -c code (the --help line is what the console script runs)
    "python -c pass": "pass",
    "import torch": "import torch",
    "import capi_backbones": "import capi_backbones",
    "first use (models, loader, extractor)": "from capi_backbones import CapiModel, FeatureExtractor, from_pretrained",
    "capi-backbones --help": HELP,
}
PROBE = (
    "import contextlib, io, json, sys\n"
    "from capi_backbones.cli.main import main\n"
    "with contextlib.redirect_stdout(io.StringIO()):\n"
    "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
    "print(json.dumps(sorted(m for m in ('torch', 'numpy', 'timm', 'huggingface_hub', 'sklearn') if m in sys.modules)))"
)


def wall_time(code: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="fresh processes per command (default 7)")
    args = parser.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for code in COMMANDS.values():  # one untimed round: the file cache
        wall_time(code, env)
    for _ in range(args.rounds):
        for name, code in COMMANDS.items():
            times[name].append(wall_time(code, env))
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, value in median.items():
        print(f"{name:<40} median {value:6.3f} s   (min {min(times[name]):.3f}, max {max(times[name]):.3f})")
    probe = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    imported = json.loads(probe.stdout)
    ratios = {
        "import capi_backbones / import torch": (median["import capi_backbones"] / median["import torch"], "<= 1.15x"),
        "first use / import torch": (median["first use (models, loader, extractor)"] / median["import torch"], ""),
        "capi-backbones --help / python -c pass": (median["capi-backbones --help"] / median["python -c pass"], "<= 3x"),
    }
    print()
    for name, (ratio, target) in ratios.items():
        print(f"{name:<40} {ratio:6.2f}x" + (f"  (target {target})" if target else ""))
    print(f"heavy modules imported by --help: {', '.join(imported) or 'none'}")


if __name__ == "__main__":
    main()
