"""The attacks of issue 20, rebuilt: bad inputs and faults through every door, each outcome classified by machine.

    OMP_NUM_THREADS=1 python benchmarks/attacks/run_attacks.py [--workdir DIR] [--json attacks.json] [--jobs 2]
        [--only CATEGORY,...]

Categories: pickle (malicious pickles through 8 API doors and 9 CLI doors), weights (damaged or hostile checkpoint
files), images (damaged and odd images, FIFOs, links, unreadable files and folders), index (damaged index.json and
shards under `verify` and a resumed `extract`), args (bad command lines), faults (full disk on a real small tmpfs,
kill -9, SIGINT, a second Ctrl-C, concurrent runs, inputs changed between runs, two URLs sharing a file name).

Every CLI case is the real command (`python -m capi_backbones ...`) in a subprocess, with a time limit, run without
the capabilities that let root read any file (setpriv), so that unreadable files are unreadable as for any user.
API cases share one worker process per group (api_worker.py). Outcomes:

    CLEAN          one-line error, no traceback, the documented exit code; or the correct success
    TRACEBACK      a traceback (CLI), or an exception the package does not map to an exit code (API: a bug)
    WRONG_EXIT     another exit code than documented; or a bad input accepted
    NOT_ONE_LINE   the error took more than one line (no traceback)
    HANG           the time limit passed
    CODE_RAN       the marker file a malicious pickle writes exists
    LOST_OR_MIXED  a file the user had is changed or gone, a previous good output destroyed, stale or mixed results

Full disk: a real tmpfs of a few hundred KiB mounted for the case (needs root: `mount -t tmpfs`); where mounting is
not allowed the case falls back to RLIMIT_FSIZE (write() fails with EFBIG instead of ENOSPC) and says so.
"""

import argparse
import contextlib
import hashlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

KINDS = ("CLEAN", "TRACEBACK", "WRONG_EXIT", "NOT_ONE_LINE", "HANG", "CODE_RAN", "LOST_OR_MIXED")
DROP_CAPS = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]
LOG_PREFIXES = ("INFO ", "WARNING ", "--random-init", "DEBUG ", "building the page")  # logs and progress lines


@dataclass
class Case:
    category: str
    name: str
    argv: list[str] | None = None  # CLI arguments after `python -m capi_backbones`
    expect: tuple[int, ...] = (2,)  # documented exit codes
    setup: Callable[[Path], None] | None = None  # prepares the case folder (cwd of the command)
    check: Callable[[Path, subprocess.CompletedProcess], str | None] | None = None  # a fault kind with its reason
    run: Callable[[Path], dict] | None = None  # a custom runner (faults): returns an outcome dict
    marker: Path | None = None
    timeout: float = 90
    door: str | None = None  # API cases: the door and path for api_worker.py
    path: str | None = None
    must_fail: bool = True
    result: dict = field(default_factory=dict)


# ---- helpers ------------------------------------------------------------------------------------------------------
def env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(PACKAGE_ROOT),
        "PYTHONDONTWRITEBYTECODE": "1",
        "TORCH_HOME": str(WORK / "torch_home"),
    }


def cli(argv, cwd, timeout=90, preexec=None, drop_caps=True):
    command = [*(DROP_CAPS if drop_caps and HAVE_SETPRIV else []), sys.executable, "-m", "capi_backbones", *argv]
    try:
        done = subprocess.run(
            command, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout, preexec_fn=preexec
        )
        return done
    except subprocess.TimeoutExpired as expired:
        text = [
            x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (expired.stdout, expired.stderr)
        ]
        return subprocess.CompletedProcess(command, 124, *text)


def error_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` that are not log lines; argparse's usage block before its one error line is
    argparse's documented form and counts as that one line."""
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith(LOG_PREFIXES)]
    if lines and lines[0].startswith("usage: ") and ": error: " in lines[-1]:
        return lines[-1:]
    return lines


def digest(path: Path) -> str | None:
    if path.is_symlink():
        return "link:" + os.readlink(path)
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if path.is_dir():
        return "dir:" + ",".join(sorted(p.name for p in path.iterdir()))
    return None


def snapshot(folder: Path) -> dict[str, str | None]:
    """The user's files in a case folder: every file whose name starts with ``user_`` (and everything below a folder
    named so), by content."""
    files = {}
    for path in folder.rglob("user_*"):
        files[str(path.relative_to(folder))] = digest(path)
        if path.is_dir() and not path.is_symlink():
            for inner in path.rglob("*"):
                files[str(inner.relative_to(folder))] = digest(inner)
    return files


def classify_cli(case: Case, folder: Path, done: subprocess.CompletedProcess, before: dict) -> dict:
    errors = error_lines(done.stderr)
    outcome = {"exit": done.returncode, "stderr": "\n".join(errors[-3:])[-600:]}
    after = {name: digest(folder / name) for name in before}
    lost = [name for name in before if before[name] != after[name]]
    if case.marker is not None and case.marker.exists():
        kind, why = "CODE_RAN", f"{case.marker.name} was written"
    elif lost:
        kind, why = "LOST_OR_MIXED", f"user files changed or gone: {', '.join(lost[:3])}"
    elif done.returncode == 124:
        kind, why = "HANG", f"no end within {case.timeout:.0f} s"
    elif "Traceback (most recent call last)" in done.stderr or done.returncode in (134, 139, -6, -11):
        kind, why = "TRACEBACK", (errors[-1] if errors else f"exit {done.returncode}")
    elif done.returncode not in case.expect:
        kind, why = "WRONG_EXIT", f"exit {done.returncode}, expected {case.expect}"
    elif done.returncode not in (0, 1) and len(errors) != 1:  # exit 1 lists each failed input, then a summary
        kind, why = "NOT_ONE_LINE", f"{len(errors)} error lines"
    else:
        kind, why = "CLEAN", ""
    if kind == "CLEAN" and case.check is not None:
        found = case.check(folder, done)
        if found:
            kind, why = found.split(":", 1)[0], found.split(":", 1)[1].strip() if ":" in found else found
    return outcome | {"kind": kind, "why": why}


def run_cli_case(case: Case) -> None:
    folder = WORK / "cases" / f"{case.category}-{case.name}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "user_notes.txt").write_text("a file the user wrote\n")
    start = time.monotonic()
    try:
        if case.setup is not None:
            case.setup(folder)
        before = snapshot(folder)
        if case.run is not None:
            case.result = case.run(folder) | {"seconds": round(time.monotonic() - start, 1)}
            return
        done = cli(case.argv, folder, case.timeout)
        case.result = classify_cli(case, folder, done, before)
    except Exception as error:  # noqa: BLE001 (a harness failure is reported, not hidden)
        case.result = {"kind": "HARNESS_ERROR", "why": f"{type(error).__name__}: {error}"}
    case.result["seconds"] = round(time.monotonic() - start, 1)
    case.result["argv"] = case.argv


def run_api_group(cases: list[Case]) -> None:
    """All ``cases`` in one worker; a worker that dies is restarted after the case it was running."""
    pending = list(cases)
    by_id = {f"{c.category}-{c.name}": c for c in cases}
    while pending:
        with tempfile.TemporaryDirectory(dir=WORK) as tmp:
            spec, results = Path(tmp) / "cases.json", Path(tmp) / "results.jsonl"
            spec.write_text(json.dumps([{"id": f"{c.category}-{c.name}", "door": c.door, "path": c.path,
                                         "timeout": c.timeout} for c in pending]))  # fmt: skip
            limit = sum(c.timeout for c in pending) + 120
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run([*(DROP_CAPS if HAVE_SETPRIV else []), sys.executable, str(HERE / "api_worker.py"),
                                str(spec), str(results)], env=env(), cwd=WORK, timeout=limit,
                               capture_output=True)  # fmt: skip
            lines = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
        finished, started = set(), None
        for line in lines:
            if "start" in line:
                started = line["start"]
                continue
            finished.add(line["id"])
            by_id[line["id"]].result = classify_api(by_id[line["id"]], line)
        crashed = started if started is not None and started not in finished else None
        if crashed is not None:
            by_id[crashed].result = {"kind": "TRACEBACK", "why": "the process died (killed, out of memory?)"}
            finished.add(crashed)
        if not finished:  # the worker could not start at all
            for case in pending:
                case.result = {"kind": "HARNESS_ERROR", "why": "api worker did not start"}
            return
        pending = [c for c in pending if f"{c.category}-{c.name}" not in finished]


def classify_api(case: Case, line: dict) -> dict:
    outcome = {"door": case.door, **{k: line[k] for k in ("type", "line", "exit_code", "seconds") if k in line}}
    if case.marker is not None and case.marker.exists():
        return outcome | {"kind": "CODE_RAN", "why": f"{case.marker.name} was written"}
    if line.get("hang"):
        return outcome | {"kind": "HANG", "why": f"no end within {case.timeout:.0f} s"}
    if line.get("ok"):
        if case.must_fail:
            return outcome | {"kind": "WRONG_EXIT", "why": "the bad input was accepted"}
        return outcome | {"kind": "CLEAN", "why": ""}
    if case.door == "timm_checkpoint_path" and (
        "weights_only" in line.get("line", "") or "SafetensorError" in line.get("type", "")
    ):  # timm's own reader (not the package's): its weights-only refusal, no code run (see tests/test_timm_doors.py)
        return outcome | {"kind": "CLEAN", "why": "refused by timm's own weights-only reader"}
    if line.get("exit_code") is None:
        return outcome | {"kind": "TRACEBACK", "why": f"{line['type']}: {line['line']}"}
    if line.get("exit_code") == 1:
        return outcome | {"kind": "WRONG_EXIT", "why": f"exit code 1 for a bad file: {line['line']}"}
    return outcome | {"kind": "CLEAN", "why": ""}


# ---- the workspace ------------------------------------------------------------------------------------------------
def build_workspace() -> None:
    import torch
    from payloads import TINY, save_good, tiny_state

    from capi_backbones.pretrained import save_safetensors
    from capi_backbones.pretrained.hub_model import CapiHubModel

    (WORK / "markers").mkdir(parents=True, exist_ok=True)
    state = tiny_state()
    torch.save({f"backbone.{k}": v for k, v in state.items()}, WORK / "tiny.pth")
    model = CapiHubModel(TINY)
    model.load_state_dict(state)
    save_safetensors(model, WORK / "tiny.safetensors")
    for split, offset in (("train", 0), ("test", 100)):
        for label in ("cats", "dogs"):
            for i in range(3):
                save_good(
                    WORK / "data" / split / label / f"{label}{i}.png", offset + i + (50 if label == "dogs" else 0)
                )
    for i in range(3):
        save_good(WORK / "photos" / f"photo{i}.png", 200 + i)
    good = cli(["extract", "photos", "--out", "features", "--weights", "tiny.pth", *FAST], WORK)
    assert good.returncode == 0, good.stderr


FAST = ["--image-size", "28", "--device", "cpu", "--no-progress", "--workers", "0"]
EVAL_FAST = ["--image-size", "28", "--device", "cpu", "--no-progress", "--iters", "20", "--probes", "knn,linear",
             "--learning-rates", "0.001", "--weight-decays", "0.0"]  # fmt: skip


def copy_in(*names):
    def setup(folder: Path) -> None:
        for name in names:
            source = WORK / name
            if source.is_dir():
                shutil.copytree(source, folder / name, symlinks=True)
            else:
                shutil.copy2(source, folder / name)

    return setup


def chain(*setups):
    def setup(folder: Path) -> None:
        for step in setups:
            if step is not None:
                step(folder)

    return setup


# ---- categories ---------------------------------------------------------------------------------------------------
API_DOORS = ("from_pretrained", "inspect_checkpoint", "CapiHubModel.from_pretrained", "hub_entry_point",
             "torch.hub.load", "timm_overlay_file", "timm_checkpoint_path", "FeatureExtractor")  # fmt: skip


def cli_doors(path: str) -> dict[str, list[str]]:
    """Every command that loads weights, given ``path`` (relative to the case folder)."""
    return {
        "info": ["info", path],
        "convert": ["convert", path, "out.safetensors"],
        "extract": ["extract", "photos", "--out", "out", "--weights", path, *FAST],
        "extract_model": ["extract", "photos", "--out", "out", "--model", path, *FAST],
        "pca": ["pca", "photos", "--out", "pca.png", "--weights", path, *FAST[:-2]],
        "export-torch": ["export-torch", "m.pt2", "--weights", path, "--no-verify"],
        "export-onnx": ["export-onnx", "m.onnx", "--weights", path, "--no-verify"],
        "eval": ["eval", "classify", "data", "--out", "ev", "--weights", path, *EVAL_FAST],
        "explore": [
            "explore",
            "photos",
            "--out",
            "page.html",
            "--weights",
            path,
            "--image-size",
            "28",
            "--device",
            "cpu",
            "--no-progress",
        ],  # fmt: skip
    }


def pickle_cases() -> tuple[list[Case], list[Case]]:
    from payloads import PICKLE_KINDS, malicious_checkpoint

    api, commands = [], []
    for kind in PICKLE_KINDS:
        for door in API_DOORS:
            marker = WORK / "markers" / f"api-{kind}-{door}"
            path = malicious_checkpoint(kind, WORK / "pickles" / f"{kind}-{door}", marker)
            api.append(Case("pickle", f"{kind}-{door}", door=door, path=str(path), marker=marker))
        for command, argv_of in cli_doors("PAYLOAD").items():
            marker = WORK / "markers" / f"cli-{kind}-{command}"

            def setup(folder, kind=kind, marker=marker):
                malicious_checkpoint(kind, folder / "payload", marker)
                copy_in("photos", "data")(folder)

            name = malicious_name(kind)
            argv = [name if a == "PAYLOAD" else a for a in argv_of]
            commands.append(Case("pickle", f"{kind}-{command}", argv=argv, setup=setup, marker=marker))
    # the URL door: malicious files served over HTTP, through from_pretrained
    for kind in ("zip_open", "legacy_torch", "raw_pickle_p2", "zip_named_safetensors"):
        marker = WORK / "markers" / f"url-{kind}"
        path = malicious_checkpoint(kind, SERVED / f"evil-{kind}", marker)
        url = f"{SERVER_URL}/{path.relative_to(SERVED).as_posix()}"
        api.append(Case("pickle", f"{kind}-url", door="from_pretrained", path=url, marker=marker))
    return api, commands


def malicious_name(kind: str) -> str:
    return {
        "zip_open": "payload/evil.pth",
        "zip_exec": "payload/evil.pth",
        "legacy_torch": "payload/evil_legacy.pth",
        "raw_pickle_p2": "payload/evil_raw.pth",
        "raw_pickle_p5_system": "payload/evil_raw5.pth",
        "zip_named_safetensors": "payload/evil.safetensors",
        "zip_wrapped_state_dict": "payload/evil_wrapped.pth",
        "folder_pytorch_model_bin": "payload/evil_folder",
    }[kind]


def weights_cases() -> tuple[list[Case], list[Case]]:
    from payloads import WEIGHT_KINDS, damaged_weights

    api, commands = [], []
    for kind in WEIGHT_KINDS:
        path = damaged_weights(kind, WORK / "damaged")
        for door in ("from_pretrained", "inspect_checkpoint", "FeatureExtractor", "timm_overlay_file"):
            # inspect_checkpoint describes a file: it may succeed on any file it can read, without loading it
            lenient = door == "inspect_checkpoint" and kind not in ("cut_in_length", "cut_in_header", "zero_bytes")
            lenient = lenient or kind == "fp8_weights"  # a real floating dtype: loaded, upcast to float32
            api.append(Case("weights", f"{kind}-{door}", door=door, path=str(path), must_fail=not lenient, timeout=60))
        for command in ("info", "extract"):
            argv = cli_doors(f"w/{path.name}")[command]
            expect = (1, 2) if command == "info" else (2,)  # info: exit 1 "a strict load would fail"
            expect = (0, *expect) if kind == "fp8_weights" else expect

            def setup(folder, path=path):
                (folder / "w").mkdir()
                target = folder / "w" / path.name
                shutil.copytree(path, target) if path.is_dir() else shutil.copy2(path, target)
                copy_in("photos")(folder)

            commands.append(Case("weights", f"{kind}-{command}", argv=argv, expect=expect, setup=setup, timeout=60))
    return api, commands


def image_cases() -> list[Case]:
    from payloads import IMAGE_KINDS, odd_image

    cases = []
    for kind in IMAGE_KINDS:
        for command in ("extract", "pca"):
            expected: dict[str, list[str]] = {}

            def setup(folder, kind=kind, expected=expected):
                copy_in("photos", "tiny.pth")(folder)
                expected["names"] = odd_image(kind, folder / "photos")

            def check(folder, done, kind=kind, expected=expected, command=command):
                if command != "extract" or done.returncode not in (0, 1):
                    return None
                index = json.loads((folder / "out" / "index.json").read_text())
                names = [n for shard in index["shards"] for n in shard["files"]]
                wanted = sorted([f"photo{i}.png" for i in range(3)] + expected["names"])
                if sorted(names) != wanted:
                    return f"LOST_OR_MIXED: recorded {sorted(names)}, expected {wanted}"
                if not expected["names"] and kind not in ("hidden_file",) and done.returncode != 1:
                    return "WRONG_EXIT: a skipped input, but exit 0"
                return None

            argv = (["extract", "photos", "--out", "out", "--weights", "tiny.pth", *FAST] if command == "extract"
                    else ["pca", "photos", "--out", "pca.png", "--weights", "tiny.pth", *FAST[:-2]])  # fmt: skip
            cases.append(Case("images", f"{kind}-{command}", argv=argv, expect=(0, 1), setup=setup, check=check,
                              timeout=60))  # fmt: skip
    return cases


def _index_mutations() -> list[tuple[str, Callable[[dict, Path], None]]]:
    mutations = []
    for key in ("version", "format", "dtype", "settings", "root", "shards", "failed"):
        mutations.append((f"{key}-missing", lambda d, f, k=key: d.pop(k)))
        mutations.append((f"{key}-null", lambda d, f, k=key: d.__setitem__(k, None)))
        mutations.append((f"{key}-list", lambda d, f, k=key: d.__setitem__(k, [1, "x"])))
    for key in ("name", "count", "grid_size", "image_size", "bytes", "sha256", "files", "stamps"):
        mutations.append((f"shard.{key}-missing", lambda d, f, k=key: d["shards"][0].pop(k)))
        mutations.append((f"shard.{key}-string", lambda d, f, k=key: d["shards"][0].__setitem__(k, "12")))
    mutations.append(("shard-entry-null", lambda d, f: d["shards"].__setitem__(0, None)))
    mutations.append(("shard-name-escapes", lambda d, f: d["shards"][0].__setitem__("name", "../user_notes.txt")))
    return mutations


def _shard_mutations() -> list[tuple[str, Callable[[Path], None]]]:
    def flip(path: Path, where: float):
        data = bytearray(path.read_bytes())
        data[int(len(data) * where)] ^= 0x40
        path.write_bytes(bytes(data))

    return [
        ("shard-flipped-byte-data", lambda p: flip(p, 0.8)),
        ("shard-flipped-byte-header", lambda p: flip(p, 0.01)),
        ("shard-truncated", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
        ("shard-removed", lambda p: p.unlink()),
        ("shard-renamed", lambda p: p.rename(p.with_name("shard_00009.safetensors"))),
        ("shard-zero-bytes", lambda p: p.write_bytes(b"")),
        ("index-not-json", lambda p: (p.parent / "index.json").write_text("{not json")),
        ("index-zero-bytes", lambda p: (p.parent / "index.json").write_text("")),
        ("index-is-a-folder", lambda p: ((p.parent / "index.json").unlink(), (p.parent / "index.json").mkdir())),
    ]


def index_cases() -> list[Case]:
    cases = []
    variants: list[tuple[str, Callable[[Path], None]]] = []
    for name, mutate in _index_mutations():

        def apply(out: Path, mutate=mutate):
            index = json.loads((out / "index.json").read_text())
            mutate(index, out)
            (out / "index.json").write_text(json.dumps(index))

        variants.append((name, apply))
    for name, mutate in _shard_mutations():
        variants.append((name, lambda out, mutate=mutate: mutate(out / "shard_00000.safetensors")))
    for name, apply in variants:

        def setup(folder, apply=apply):
            copy_in("photos", "tiny.pth", "features")(folder)
            index = json.loads((folder / "features" / "index.json").read_text())
            index["root"] = str(folder / "photos")  # as if extracted here
            (folder / "features" / "index.json").write_text(json.dumps(index))
            apply(folder / "features")

        optional = name in ("shard.bytes-missing", "shard.sha256-missing", "shard.stamps-missing")  # older indexes
        expect = (0, 1, 2) if optional else (1, 2)  # lack them; verify checks what is recorded
        cases.append(Case("index", f"{name}-verify", argv=["verify", "features"], expect=expect, setup=setup))
        cases.append(Case("index", f"{name}-extract", argv=["extract", "photos", "--out", "features", "--weights",
                                                           "tiny.pth", *FAST], expect=(0, 2), setup=setup,
                          check=_resumed_extraction_is_whole))  # fmt: skip
    return cases


def _resumed_extraction_is_whole(folder: Path, done) -> str | None:
    """After a resumed extract that says it succeeded, `verify` passes and every photo is listed exactly once."""
    if done.returncode != 0:
        return None
    verify = cli(["verify", "features"], folder, 60)
    if verify.returncode != 0:
        return f"LOST_OR_MIXED: verify after the resumed run: {error_lines(verify.stderr)[-1:]}"
    index = json.loads((folder / "features" / "index.json").read_text())
    names = sorted(n for shard in index["shards"] for n in shard["files"])
    if names != [f"photo{i}.png" for i in range(3)]:
        return f"LOST_OR_MIXED: the index lists {names}"
    return None


def args_cases() -> list[Case]:
    w = ["--weights", "tiny.pth"]
    setup = copy_in("photos", "tiny.pth", "data")
    table = [
        ("image-size-0", ["extract", "photos", "--out", "o", *w, "--image-size", "0"], (2,)),
        ("image-size-negative", ["extract", "photos", "--out", "o", *w, "--image-size", "-14"], (2,)),
        ("image-size-13", ["extract", "photos", "--out", "o", *w, "--image-size", "13"], (2,)),
        ("image-size-99999998", ["extract", "photos", "--out", "o", *w, "--image-size", "99999998"], (2,)),
        ("image-size-text", ["extract", "photos", "--out", "o", *w, "--image-size", "big"], (2,)),
        ("pca-image-size-huge", ["pca", "photos", "--out", "p.png", *w, "--image-size", "7182"], (2,)),
        ("batch-size-0", ["extract", "photos", "--out", "o", *w, "--batch-size", "0"], (2,)),
        ("shard-size-0", ["extract", "photos", "--out", "o", *w, "--shard-size", "0"], (2,)),
        ("workers-negative", ["extract", "photos", "--out", "o", *w, "--workers", "-1"], (2,)),
        ("device-bogus", ["extract", "photos", "--out", "o", *w, "--device", "gpu0"], (2,)),
        ("device-cuda", ["extract", "photos", "--out", "o", *w, "--device", "cuda"], (2,)),
        ("fp16-on-cpu", ["extract", "photos", "--out", "o", *w, "--device", "cpu", "--precision", "fp16"], (2,)),
        ("model-unknown", ["extract", "photos", "--out", "o", "--model", "capi_vitz14"], (2,)),
        ("weights-missing", ["extract", "photos", "--out", "o", "--weights", "nope.pth"], (2,)),
        ("weights-and-random", ["extract", "photos", "--out", "o", *w, "--random-init"], (2,)),
        ("model-mismatch", ["extract", "photos", "--out", "o", *w, "--model", "capi_vitl14_lvd"], (2,)),
        ("images-missing", ["extract", "nowhere", "--out", "o", *w], (2,)),
        ("images-empty-folder", ["extract", "empty", "--out", "o", *w], (2,)),
        ("out-empty-string", ["extract", "photos", "--out", "", *w, *FAST], (2,)),
        ("out-dot-with-user-shards", ["extract", "photos", "--out", ".", *w, *FAST], (2,)),
        ("out-is-user-file", ["extract", "photos", "--out", "user_notes.txt", *w], (2,)),
        ("out-user-folder-with-shards", ["extract", "photos", "--out", "user_dir", *w, *FAST], (2,)),
        ("out-proc", ["extract", "photos", "--out", "/proc/capi_out", *w, *FAST], (2, 3)),
        ("pca-out-user-file", ["pca", "photos", "--out", "user_picture.png", *w], (2,)),
        ("pca-out-not-png", ["pca", "photos", "--out", "picture.txt", *w], (2,)),
        ("export-torch-proc", ["export-torch", "/proc/capi.pt2", *w], (3,)),
        ("export-torch-user-file", ["export-torch", "user_model.pt2", *w], (2,)),
        ("export-onnx-opset-3", ["export-onnx", "m.onnx", *w, "--opset", "3"], (2,)),
        ("export-onnx-opset-99", ["export-onnx", "m.onnx", *w, "--opset", "99"], (2,)),
        ("export-onnx-opset-negative", ["export-onnx", "m.onnx", *w, "--opset", "-1"], (2,)),
        (
            "export-onnx-overwrite-opset-99",
            ["export-onnx", "user_model.onnx", *w, "--opset", "99", "--overwrite"],
            (2,),
        ),
        ("export-onnx-user-file", ["export-onnx", "user_model.onnx", *w], (2,)),
        ("export-onnx-folder", ["export-onnx", "user_dir", *w], (2,)),
        ("convert-same-path", ["convert", "tiny.pth", "tiny.pth", "--overwrite"], (2,)),
        ("convert-user-file", ["convert", "tiny.pth", "user_notes.txt"], (2,)),
        ("convert-unknown-model", ["convert", "tiny.pth", "o.safetensors", "--model", "capi_vitz14"], (2,)),
        ("info-missing", ["info", "nope.pth"], (2,)),
        ("info-folder-without-weights", ["info", "empty"], (2,)),
        ("verify-missing", ["verify", "nowhere"], (2,)),
        ("verify-not-an-extraction", ["verify", "user_dir"], (2,)),
        ("eval-no-train-split", ["eval", "classify", "photos", "--out", "ev", *w, *EVAL_FAST], (2,)),
        ("eval-out-user-file", ["eval", "classify", "data", "--out", "user_notes.txt", *w, *EVAL_FAST], (2,)),
        ("eval-probes-bogus", ["eval", "classify", "data", "--out", "ev", *w, *EVAL_FAST, "--probes", "svm"], (2,)),
        ("eval-iters-0", ["eval", "classify", "data", "--out", "ev", *w, *EVAL_FAST, "--iters", "0"], (2,)),
        ("eval-lr-inf", ["eval", "classify", "data", "--out", "ev", *w, *EVAL_FAST, "--learning-rates", "inf"], (2,)),
        ("eval-lr-nan", ["eval", "classify", "data", "--out", "ev", *w, *EVAL_FAST, "--learning-rates", "nan"], (2,)),
        (
            "eval-wd-negative",
            ["eval", "classify", "data", "--out", "ev", *w, *EVAL_FAST, "--weight-decays", "-1"],
            (2,),
        ),
        (
            "eval-segment-fifo-mask",
            ["eval", "segment", "seg", "--out", "ev", *w, "--image-size", "28", "--device", "cpu", "--no-progress"],
            (1, 2),
        ),  # fmt: skip
        ("train-lr-inf", ["train", "tiny", "optim.lr=inf", "data.root=photos", "train.output_dir=run"], (2,)),
        ("train-no-readable-image", ["train", "tiny", "data.root=unreadable", "train.output_dir=run"], (2,)),
        ("download-timeout-0", ["info", "http://127.0.0.1:9/m.pth", "--download-timeout", "0"], (2,)),
        ("hub-unknown-url-host", ["info", "http://127.0.0.1:9/m.pth", "--download-timeout", "5"], (3,)),
    ]

    def extra(folder: Path) -> None:
        setup(folder)
        (folder / "empty").mkdir()
        (folder / "user_dir" / "shard_00001").mkdir(parents=True)
        (folder / "user_dir" / "shard_00001" / "user_notes.md").write_text("mine")
        (folder / "user_dir" / "shard_00000.safetensors").write_bytes(b"my own file")
        (folder / "shard_00001").mkdir()
        (folder / "shard_00001" / "user_notes.md").write_text("mine too")
        (folder / "user_picture.png").write_bytes(b"my picture")
        (folder / "user_model.pt2").write_bytes(b"my model")
        (folder / "user_model.onnx").write_bytes(b"my onnx")
        from payloads import save_good

        for i in range(3):  # DATA/{images,masks}: one mask is a FIFO (reading it would wait forever)
            save_good(folder / "seg" / "images" / f"a{i}.png", i)
            (folder / "seg" / "masks").mkdir(parents=True, exist_ok=True)
            if i == 1:
                os.mkfifo(folder / "seg" / "masks" / f"a{i}.png")
            else:
                from PIL import Image

                Image.new("L", (56, 40), 1).save(folder / "seg" / "masks" / f"a{i}.png")
        (folder / "unreadable").mkdir()
        save_good(folder / "unreadable" / "a.png", 2)
        (folder / "unreadable" / "a.png").chmod(0)

    cases = []
    for name, argv, expect in table:
        check = _shards_of_user_kept if name.startswith("out-") else None
        cases.append(Case("args", name, argv=argv, expect=expect, setup=extra, check=check, timeout=120))
    return cases


def _shards_of_user_kept(folder: Path, done) -> str | None:
    if not (folder / "shard_00001" / "user_notes.md").exists():
        return "LOST_OR_MIXED: shard_00001/user_notes.md in the working folder was deleted"
    return None


# ---- faults -------------------------------------------------------------------------------------------------------
def _mount_tmpfs(folder: Path, size_kib: int) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(folder)],
                          capture_output=True)  # fmt: skip
    return done.returncode == 0


def _unmount(folder: Path) -> None:
    subprocess.run(["umount", str(folder)], capture_output=True)


def _fsize_limit(kib: int):
    def limit():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (kib << 10, kib << 10))

    return limit


def full_disk_case(name: str, argv_of: Callable[[str], list[str]], size_kib: int, previous: str | None,
                   expect=(3,)) -> Case:  # fmt: skip
    """``argv_of(out)`` writes into a full disk. With ``previous``, a file of that name is in the output place
    first (and --overwrite is in the arguments): it must survive."""

    def run(folder: Path) -> dict:
        copy_in("photos", "tiny.pth", "data")(folder)
        disk = folder / "disk"
        mounted = _mount_tmpfs(disk, size_kib)
        method = "tmpfs (ENOSPC)" if mounted else "RLIMIT_FSIZE (EFBIG)"
        try:
            if previous is not None:
                (disk / previous).parent.mkdir(parents=True, exist_ok=True)
                (disk / previous).write_bytes(b"user_previous_output")
            if mounted:  # fill what is left but a little, so that the command fails in the middle of its write
                filler = disk / "filler"
                with open(filler, "wb") as handle, contextlib.suppress(OSError):
                    handle.write(b"\0" * ((size_kib - 4) << 10))
            before = snapshot(folder)
            case = Case("faults", name, expect=expect, timeout=180)
            done = cli(argv_of("disk/out"), folder, 180, preexec=None if mounted else _fsize_limit(48))
            outcome = classify_cli(case, folder, done, before)
            if previous is not None and outcome["kind"] == "CLEAN":
                kept = (disk / previous).read_bytes() == b"user_previous_output"
                if not kept:
                    outcome |= {"kind": "LOST_OR_MIXED", "why": "the previous output was replaced by a failed one"}
            if outcome["kind"] == "CLEAN":
                leftovers = [p.name for p in disk.rglob("*.tmp")]
                if leftovers:
                    outcome |= {"kind": "LOST_OR_MIXED", "why": f"temporaries left: {leftovers[:3]}"}
            return outcome | {"method": method, "argv": argv_of("disk/out")}
        finally:
            if mounted:
                _unmount(disk)

    return Case("faults", name, run=run)


def _extract_argv(out: str, *extra: str) -> list[str]:
    return ["extract", "photos", "--out", out, "--weights", "tiny.pth", *FAST, *extra]


def _features(folder: Path) -> dict[str, str]:
    """{image name: hash of its features} of an extraction folder."""
    from safetensors.numpy import load_file

    index = json.loads((folder / "index.json").read_text())
    rows = {}
    for shard in index["shards"]:
        arrays = load_file(str(folder / shard["name"]))
        for i, name in enumerate(shard["files"]):
            rows[name] = hashlib.sha256(b"".join(arrays[k][i].tobytes() for k in sorted(arrays))).hexdigest()[:16]
    return rows


def _many_photos(folder: Path, count: int = 40) -> None:
    from payloads import save_good

    for i in range(count):
        save_good(folder / "photos" / f"many{i:03d}.png", 500 + i, (84, 112))


def kill_case(sig: int, name: str, second_sig: bool = False) -> Case:
    """Start an extraction of 43 images, send ``sig`` once the first shard is written, then resume: every image
    once, features equal to an uninterrupted run's."""

    def run(folder: Path) -> dict:
        copy_in("photos", "tiny.pth")(folder)
        _many_photos(folder)
        argv = _extract_argv("out", "--shard-size", "4", "--batch-size", "2")
        command = [sys.executable, "-m", "capi_backbones", *argv]
        process = subprocess.Popen(command, cwd=folder, env=env(), stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True)  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if len(list((folder / "out").glob("shard_*"))) >= 2:
                break
            time.sleep(0.05)
        process.send_signal(sig)
        if second_sig:
            time.sleep(0.05)
            process.send_signal(sig)
        try:
            _, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            return {"kind": "HANG", "why": "no exit within 60 s of the signal"}
        code = process.returncode
        if "Traceback (most recent call last)" in stderr:
            return {"kind": "TRACEBACK", "why": error_lines(stderr)[-1:], "exit": code}
        # a process ended by the signal itself (-N here) is what a shell reports as 128 + N
        wanted = {signal.SIGKILL: (-9,), signal.SIGINT: (130, 0, -2), signal.SIGTERM: (143, 0, -15)}[sig]
        if code not in wanted:
            return {"kind": "WRONG_EXIT", "why": f"exit {code} after the signal, expected {wanted}", "exit": code}
        resumed = cli(argv, folder, 180, drop_caps=False)
        if resumed.returncode != 0:
            return {
                "kind": "WRONG_EXIT",
                "why": f"resume: exit {resumed.returncode}: {error_lines(resumed.stderr)[-1:]}",
            }
        fresh = cli(_extract_argv("fresh", "--shard-size", "4", "--batch-size", "2"), folder, 180, drop_caps=False)
        if fresh.returncode != 0:
            return {"kind": "HARNESS_ERROR", "why": "the uninterrupted run failed"}
        if _features(folder / "out") != _features(folder / "fresh"):
            return {"kind": "LOST_OR_MIXED", "why": "the resumed features differ from an uninterrupted run's"}
        return {"kind": "CLEAN", "why": "", "exit": code}

    return Case("faults", name, run=run)


def concurrent_case() -> Case:
    """Two extractions into one --out at once: one runs, the other is refused (exit 2) without touching the first's
    files; the finished folder verifies."""

    def run(folder: Path) -> dict:
        copy_in("photos", "tiny.pth")(folder)
        _many_photos(folder, 20)
        argv = _extract_argv("out", "--shard-size", "4", "--batch-size", "2")
        command = [sys.executable, "-m", "capi_backbones", *argv]
        first = subprocess.Popen(
            command, cwd=folder, env=env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list((folder / "out").glob("shard_*")) and first.poll() is None:
            time.sleep(0.05)
        second = cli(argv, folder, 120, drop_caps=False)
        _, stderr = first.communicate(timeout=180)
        if first.returncode != 0 or "Traceback" in stderr:
            return {"kind": "LOST_OR_MIXED", "why": f"the first run failed (exit {first.returncode})"}
        if second.returncode not in (0, 2) or "Traceback" in second.stderr:
            return {"kind": "WRONG_EXIT", "why": f"second run: exit {second.returncode}"}
        verify = cli(["verify", "out"], folder, 60, drop_caps=False)
        if verify.returncode != 0:
            return {"kind": "LOST_OR_MIXED", "why": f"verify: {error_lines(verify.stderr)[-1:]}"}
        return {"kind": "CLEAN", "why": "", "second_exit": second.returncode}

    return Case("faults", "concurrent-extract-one-out", run=run)


def concurrent_eval_case() -> Case:
    """A second `eval classify` into the --out of a running one must not disturb the first (issue 20, item 4)."""

    def run(folder: Path) -> dict:
        copy_in("data", "tiny.pth")(folder)
        argv = ["eval", "classify", "data", "--out", "ev", "--weights", "tiny.pth", *EVAL_FAST]
        command = [sys.executable, "-m", "capi_backbones", *argv]
        first = subprocess.Popen(
            command, cwd=folder, env=env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (folder / "ev").exists() and first.poll() is None:
            time.sleep(0.02)
        second = cli(argv, folder, 120, drop_caps=False)
        _, stderr = first.communicate(timeout=180)
        if first.returncode != 0 or "Traceback" in stderr:
            return {"kind": "LOST_OR_MIXED", "why": f"the first run failed (exit {first.returncode})"}
        if "Traceback" in second.stderr or second.returncode not in (0, 2):
            return {"kind": "WRONG_EXIT", "why": f"second run: exit {second.returncode}"}
        results = json.loads((folder / "ev" / "results.json").read_text())
        text = json.dumps(results)
        if '"skipped": 0' not in text.replace(" ", "").replace('"skipped":0', '"skipped": 0') and "unreadable" in text:
            return {"kind": "LOST_OR_MIXED", "why": "the first run scored good images as unreadable"}
        return {"kind": "CLEAN", "why": "", "second_exit": second.returncode}

    return Case("faults", "concurrent-eval-one-out", run=run)


def replaced_image_case() -> Case:
    """An image replaced in place (same name, new content) is extracted again, never reused."""

    def run(folder: Path) -> dict:
        from payloads import save_good

        copy_in("photos", "tiny.pth")(folder)
        argv = _extract_argv("out")
        first = cli(argv, folder, 120, drop_caps=False)
        if first.returncode != 0:
            return {"kind": "HARNESS_ERROR", "why": "first run failed"}
        before = _features(folder / "out")
        save_good(folder / "photos" / "photo1.png", 999)
        again = cli(argv, folder, 120, drop_caps=False)
        fresh = cli(_extract_argv("fresh"), folder, 120, drop_caps=False)
        if again.returncode != 0 or fresh.returncode != 0:
            return {"kind": "WRONG_EXIT", "why": f"rerun exit {again.returncode}"}
        after, wanted = _features(folder / "out"), _features(folder / "fresh")
        if after != wanted:
            same = after.get("photo1.png") == before.get("photo1.png")
            return {"kind": "LOST_OR_MIXED", "why": "stale features kept" if same else "features differ"}
        return {"kind": "CLEAN", "why": ""}

    return Case("faults", "image-replaced-between-runs", run=run)


def fixed_image_eval_case() -> Case:
    """One unreadable train image, fixed, then `eval classify` again into the same --out: the results equal a fresh
    run's (no probe trained on the old features is reused)."""

    def run(folder: Path) -> dict:
        from payloads import save_good

        copy_in("data", "tiny.pth")(folder)
        broken = folder / "data" / "train" / "cats" / "cats0.png"
        good = broken.read_bytes()
        broken.write_bytes(good[:100])
        argv = ["eval", "classify", "data", "--out", "ev", "--weights", "tiny.pth", *EVAL_FAST]
        first = cli(argv, folder, 180, drop_caps=False)
        if first.returncode not in (0, 1):
            return {"kind": "WRONG_EXIT", "why": f"first run exit {first.returncode}"}
        broken.write_bytes(good)
        again = cli(argv, folder, 180, drop_caps=False)
        fresh = cli([*argv[:4], "fresh", *argv[5:]], folder, 180, drop_caps=False)
        if again.returncode != 0 or fresh.returncode != 0:
            return {"kind": "WRONG_EXIT", "why": f"rerun exit {again.returncode}, fresh {fresh.returncode}"}

        def scores(name):
            results = json.loads((folder / name / "results.json").read_text())
            return json.dumps(results.get("results", results.get("rows", results)), sort_keys=True)

        if _strip_times(scores("ev")) != _strip_times(scores("fresh")):
            return {"kind": "LOST_OR_MIXED", "why": "the rerun's results differ from a fresh run's"}
        del save_good
        return {"kind": "CLEAN", "why": ""}

    return Case("faults", "fixed-image-then-eval-again", run=run)


def _strip_times(text: str) -> str:
    data = json.loads(text)

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if "time" not in k and "second" not in k and k != "out"
                    and "path" not in k and "dir" not in k}  # fmt: skip
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(data), sort_keys=True)


def same_file_name_urls_case() -> Case:
    """Two URLs that share a file name give two different models, never the cached first."""

    def run(folder: Path) -> dict:
        import torch
        from payloads import tiny_state

        for seed, name in enumerate("ab"):
            (SERVED / name).mkdir(exist_ok=True)
            torch.save({f"backbone.{k}": v for k, v in tiny_state(seed).items()}, SERVED / name / "model.pth")
        outputs = []
        for name in "ab":
            done = cli(["convert", f"{SERVER_URL}/{name}/model.pth", f"{name}.safetensors"], folder, 120,
                       drop_caps=False)  # fmt: skip
            if done.returncode != 0:
                return {"kind": "WRONG_EXIT", "why": f"convert of /{name}/model.pth: exit {done.returncode}"}
            outputs.append(hashlib.sha256((folder / f"{name}.safetensors").read_bytes()).hexdigest())
        if outputs[0] == outputs[1]:
            return {"kind": "LOST_OR_MIXED", "why": "the second URL gave the first URL's cached weights"}
        return {"kind": "CLEAN", "why": ""}

    return Case("faults", "two-urls-one-file-name", run=run)


def moved_project_case() -> Case:
    """A project folder (images and their extraction) moved elsewhere, then the same command again: the index must
    not end up listing every image twice, under the old names and again as '../../new/photos/...'."""

    def run(folder: Path) -> dict:
        old, new = folder / "old", folder / "new"
        old.mkdir()
        copy_in("photos", "tiny.pth")(old)
        argv = _extract_argv("features")
        if cli(argv, old, 120, drop_caps=False).returncode != 0:
            return {"kind": "HARNESS_ERROR", "why": "first run failed"}
        old.rename(new)
        again = cli(argv, new, 120, drop_caps=False)
        if "Traceback" in again.stderr:
            return {"kind": "TRACEBACK", "why": error_lines(again.stderr)[-1:]}
        if again.returncode == 0:
            index = json.loads((new / "features" / "index.json").read_text())
            names = sorted(n for shard in index["shards"] for n in shard["files"])
            if names != [f"photo{i}.png" for i in range(3)]:
                return {"kind": "LOST_OR_MIXED", "why": f"the index lists {names}"}
        elif again.returncode != 2 or len(error_lines(again.stderr)) != 1:
            return {"kind": "WRONG_EXIT", "why": f"exit {again.returncode}"}
        return {"kind": "CLEAN", "why": ""}

    return Case("faults", "project-folder-moved-then-rerun", run=run)


def second_ctrl_c_case() -> Case:
    return kill_case(signal.SIGINT, "second-ctrl-c", second_sig=True)


def fault_cases() -> list[Case]:
    cases = [
        full_disk_case("full-disk-extract-safetensors", lambda o: _extract_argv(o), 96, None),
        full_disk_case("full-disk-extract-npy", lambda o: _extract_argv(o, "--format", "npy"), 96, None),
        full_disk_case(
            "full-disk-convert-safetensors",
            lambda o: ["convert", "tiny.pth", f"{o}/m.safetensors", "--overwrite"],
            512,
            "out/m.safetensors",
        ),
        full_disk_case(
            "full-disk-convert-pth", lambda o: ["convert", "tiny.pth", f"{o}/m.pth", "--overwrite"], 512, "out/m.pth"
        ),
        full_disk_case("full-disk-convert-folder", lambda o: ["convert", "tiny.pth", f"{o}/folder"], 512, None),
        full_disk_case(
            "full-disk-export-torch",
            lambda o: ["export-torch", f"{o}/m.pt2", "--weights", "tiny.pth", "--overwrite"],
            512,
            "out/m.pt2",
        ),
        full_disk_case(
            "full-disk-export-onnx",
            lambda o: ["export-onnx", f"{o}/m.onnx", "--weights", "tiny.pth", "--overwrite"],
            512,
            "out/m.onnx",
        ),
        full_disk_case(
            "full-disk-pca",
            lambda o: [
                "pca",
                "photos",
                "--out",
                f"{o}/p.png",
                "--weights",
                "tiny.pth",
                *FAST[:-2],
                "--image-size",
                "224",
            ],
            64,
            None,
        ),
        full_disk_case(
            "full-disk-eval-classify",
            lambda o: ["eval", "classify", "data", "--out", o, "--weights", "tiny.pth", *EVAL_FAST],
            96,
            None,
        ),
        full_disk_case(
            "full-disk-explore",
            lambda o: [
                "explore",
                "photos",
                "--out",
                f"{o}/page.html",
                "--weights",
                "tiny.pth",
                "--image-size",
                "28",
                "--device",
                "cpu",
                "--no-progress",
            ],
            64,
            None,
        ),  # fmt: skip
        kill_case(signal.SIGKILL, "kill-9-extract"),
        kill_case(signal.SIGINT, "ctrl-c-extract"),
        kill_case(signal.SIGTERM, "sigterm-extract"),
        second_ctrl_c_case(),
        concurrent_case(),
        concurrent_eval_case(),
        replaced_image_case(),
        fixed_image_eval_case(),
        same_file_name_urls_case(),
        moved_project_case(),
    ]
    return cases


# ---- main ---------------------------------------------------------------------------------------------------------
class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def start_server(root: Path) -> str:
    handler = lambda *a, **k: _Quiet(*a, directory=str(root), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def main() -> int:
    global WORK, SERVED, SERVER_URL, HAVE_SETPRIV, PACKAGE_ROOT
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None, help="folder for the cases (default: a new temporary folder)")
    parser.add_argument("--json", default="attacks.json", help="every case's outcome (default attacks.json)")
    parser.add_argument("--jobs", type=int, default=2, help="CLI cases run at once (default 2)")
    parser.add_argument("--only", default=None, help="comma-separated categories")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--package-root", default=str(REPO), help="the checkout whose capi_backbones is attacked "
                        "(default: this one), e.g. an older commit's, for counts before a fix")  # fmt: skip
    args = parser.parse_args()
    PACKAGE_ROOT = Path(args.package_root).resolve()
    sys.path.insert(0, str(PACKAGE_ROOT))
    os.environ["OMP_NUM_THREADS"] = "1"
    WORK = Path(args.workdir or tempfile.mkdtemp(prefix="capi_attacks_")).resolve()
    WORK.mkdir(parents=True, exist_ok=True)
    SERVED = WORK / "served"
    SERVED.mkdir(exist_ok=True)
    SERVER_URL = start_server(SERVED)
    HAVE_SETPRIV = shutil.which("setpriv") is not None and os.geteuid() == 0
    started = time.monotonic()
    build_workspace()
    wanted = set(args.only.split(",")) if args.only else None
    api: list[Case] = []
    commands: list[Case] = []
    builders = {"pickle": pickle_cases, "weights": weights_cases, "images": lambda: ([], image_cases()),
                "index": lambda: ([], index_cases()), "args": lambda: ([], args_cases()),
                "faults": lambda: ([], fault_cases())}  # fmt: skip
    for name, build in builders.items():
        if wanted is None or name in wanted:
            a, c = build()
            api += a
            commands += c
    print(f"{len(api)} API cases, {len(commands)} CLI cases; work folder {WORK}", flush=True)
    faults = [c for c in commands if c.run is not None]
    plain = [c for c in commands if c.run is None]
    groups = defaultdict(list)
    for case in api:
        groups[case.category].append(case)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run_api_group, g) for g in groups.values()]
        futures += [pool.submit(run_cli_case, c) for c in plain]
        for done_count, future in enumerate(futures, 1):
            future.result()
            if done_count % 25 == 0:
                print(f"  {done_count}/{len(futures)} done, {time.monotonic() - started:.0f} s", flush=True)
    for case in faults:  # one at a time: they time things and mount file systems
        run_cli_case(case)
    report(api + commands, args.json, time.monotonic() - started)
    if not args.keep and args.workdir is None:
        subprocess.run(["chmod", "-R", "u+rwx", str(WORK)], capture_output=True)
        shutil.rmtree(WORK, ignore_errors=True)
    return 0


def report(cases: list[Case], json_path: str, seconds: float) -> None:
    table: dict[str, Counter] = defaultdict(Counter)
    for case in cases:
        table[case.category][case.result.get("kind", "HARNESS_ERROR")] += 1
    kinds = [k for k in (*KINDS, "HARNESS_ERROR") if any(t[k] for t in table.values()) or k in KINDS]
    header = f"{'category':<10}{'cases':>7}" + "".join(f"{k:>15}" for k in kinds)
    print("\n" + header)
    total: Counter = Counter()
    for category, counts in table.items():
        total.update(counts)
        print(f"{category:<10}{sum(counts.values()):>7}" + "".join(f"{counts[k]:>15}" for k in kinds))
    print(f"{'total':<10}{sum(total.values()):>7}" + "".join(f"{total[k]:>15}" for k in kinds))
    faults = [c for c in cases if c.result.get("kind") != "CLEAN"]
    if faults:
        print("\nNot clean:")
        for case in faults:
            door = f" [{case.door}]" if case.door else ""
            print(f"  {case.result.get('kind'):<14} {case.category}/{case.name}{door}: {case.result.get('why')}")
    print(f"\n{len(cases)} cases in {seconds:.0f} s; details in {json_path}")
    Path(json_path).write_text(json.dumps(
        [{"category": c.category, "name": c.name, **c.result} for c in cases], indent=1, default=str))  # fmt: skip


WORK = SERVED = Path()
PACKAGE_ROOT = REPO
SERVER_URL = ""
HAVE_SETPRIV = False

if __name__ == "__main__":
    sys.exit(main())
