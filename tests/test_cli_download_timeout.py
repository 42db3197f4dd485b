"""--download-timeout: every command that loads weights by name or URL takes it, checks it before torch is imported,
and a download from a server that stalls stops within the deadline with one line and exit 3 (a real HTTP server on
127.0.0.1 that sends a byte every 0.1 s: no single read times out, only the whole-download deadline can stop it)."""

import http.server
import os
import subprocess
import sys
import threading
import time

import pytest

from capi_backbones.cli.main import build_parser


@pytest.fixture
def stalling_server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server API)
            self.send_response(200)
            self.send_header("Content-Length", str(10_000_000))
            self.end_headers()
            try:
                for _ in range(600):  # a minute of trickle, far beyond the deadlines below
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _cli(args, tmp_path, timeout=120):
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch_home"), "OMP_NUM_THREADS": "1"}
    env.pop("CAPI_DOWNLOAD_TIMEOUT", None)
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "capi_backbones", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=timeout,
    )
    return result, time.monotonic() - start


@pytest.mark.parametrize(
    "command",
    [
        ["info", "URL"],
        ["convert", "URL", "out.safetensors"],
        ["extract", "photos", "--out", "features", "--model", "URL"],
        ["pca", "photos", "--out", "pca.png", "--model", "URL"],
        ["export-onnx", "m.onnx", "--model", "URL"],
        ["export-torch", "m.pt2", "--model", "URL"],
        ["eval", "classify", "data", "--out", "o", "--model", "URL"],
        ["explore", "photos", "--out", "page.html", "--model", "URL"],
    ],
    ids=lambda c: c[0] if c[0] != "eval" else "eval-classify",
)
def test_every_loading_command_takes_the_flag(command):
    args = build_parser([command[0]]).parse_args([*command, "--download-timeout", "2.5"])
    assert args.download_timeout == 2.5


@pytest.mark.parametrize("bad", ["0", "-1", "inf", "nan"])
def test_a_bad_deadline_is_refused_before_torch(tmp_path, bad):
    result, _ = _cli(["info", "http://127.0.0.1:9/model.pth", f"--download-timeout={bad}"], tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--download-timeout must be a positive number of seconds" in lines[0]


def test_stalled_download_stops_at_the_deadline(tmp_path, stalling_server):
    url = f"{stalling_server}/a/model.pth"
    result, elapsed = _cli(["info", url, "--download-timeout", "2"], tmp_path)
    assert result.returncode == 3, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]  # (an INFO line names the download)
    assert len(errors) == 1 and errors[0].startswith("capi-backbones info: error: Download of"), result.stderr
    assert "passed its 2 s deadline" in errors[0]
    assert "Traceback" not in result.stderr
    assert elapsed < 45  # the interpreter and torch start in a few seconds; without the flag: a minute of trickle
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    assert not checkpoints.exists() or list(checkpoints.iterdir()) == []  # no partial download left behind


def test_extract_with_a_stalled_model_url_stops_at_the_deadline(tmp_path, stalling_server):
    from PIL import Image

    (tmp_path / "photos").mkdir()
    Image.new("RGB", (32, 32), "red").save(tmp_path / "photos" / "a.png")
    url = f"{stalling_server}/b/model.pth"
    result, elapsed = _cli(
        ["extract", "photos", "--out", "features", "--model", url, "--device", "cpu", "--download-timeout", "2"],
        tmp_path,
    )
    assert result.returncode == 3, result.stderr
    assert "passed its 2 s deadline" in result.stderr and "Traceback" not in result.stderr
    assert elapsed < 45
