"""Run API cases of run_attacks.py in one process (torch is imported once): ``python api_worker.py CASES.json
RESULTS.jsonl``. Each case names a door and a path; the outcome (ok, or the exception's type, first line and the
exit code the package maps it to) is appended to RESULTS.jsonl as soon as it is known, after a ``start`` line, so
that the parent can tell which case a crashed worker was running."""

import json
import signal
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class Hang(BaseException):
    """Raised by the alarm: the case took longer than its limit."""


def _alarm(signum, frame):
    raise Hang()


def door(name: str, path: str):
    """Load ``path`` through the door ``name``; returns something small to describe the result."""
    from payloads import TINY_KWARGS

    if name == "from_pretrained":
        from capi_backbones import from_pretrained

        return from_pretrained(path)
    if name == "inspect_checkpoint":
        from capi_backbones.pretrained import inspect_checkpoint

        return inspect_checkpoint(path)
    if name == "CapiHubModel.from_pretrained":
        from capi_backbones.pretrained import CapiHubModel

        return CapiHubModel.from_pretrained(path)
    if name == "hub_entry_point":
        from capi_backbones.hub import entry_point

        return entry_point("capi_vits14")(weights=path, **TINY_KWARGS)
    if name == "torch.hub.load":
        import torch

        return torch.hub.load(str(REPO), "capi_vits14", source="local", weights=path, **TINY_KWARGS)
    if name == "timm_overlay_file":
        import timm

        import capi_backbones.timm  # noqa: F401

        return timm.create_model("capi_vits14", pretrained=True, pretrained_cfg_overlay=dict(file=path), **TINY_KWARGS)
    if name == "timm_checkpoint_path":
        import timm

        import capi_backbones.timm  # noqa: F401

        return timm.create_model("capi_vits14", checkpoint_path=path, **TINY_KWARGS)
    if name == "FeatureExtractor":
        from capi_backbones.features import FeatureExtractor

        return FeatureExtractor(None, weights=path, device="cpu", image_size=28)
    raise ValueError(f"unknown door {name}")


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    with open(sys.argv[2], "a", buffering=1) as results:
        run_cases(cases, results)


def run_cases(cases: list[dict], results) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    signal.signal(signal.SIGALRM, _alarm)
    warnings.simplefilter("ignore")
    from capi_backbones.runtime.exit_codes import exit_code_for, one_line

    for case in cases:
        results.write(json.dumps({"start": case["id"]}) + "\n")
        started = time.monotonic()
        signal.alarm(int(case.get("timeout", 60)))
        try:
            door(case["door"], case["path"])
            outcome = {"ok": True}
        except Hang:
            outcome = {"hang": True}
        except BaseException as error:  # noqa: BLE001 (the point is to see every kind)
            message = str(error).strip()
            outcome = {
                "ok": False,
                "type": f"{type(error).__module__}.{type(error).__qualname__}",
                "line": one_line(error),
                "lines": len(message.splitlines()),
                "exit_code": exit_code_for(error),
            }
        finally:
            signal.alarm(0)
        outcome |= {"id": case["id"], "seconds": round(time.monotonic() - started, 2)}
        results.write(json.dumps(outcome) + "\n")


if __name__ == "__main__":
    main()
