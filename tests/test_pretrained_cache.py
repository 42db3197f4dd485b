"""The download cache, against a real HTTP server on 127.0.0.1: entries keyed by the whole URL (never the file
name alone), temporaries of failed or killed downloads removed (and nothing else), the download deadline set by a
keyword or $CAPI_DOWNLOAD_TIMEOUT."""

import http.server
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from checkpoint_files import tiny_model, write_official_checkpoint

import capi_backbones.pretrained.download as download
from capi_backbones.pretrained import DownloadError, LoadOptions, from_pretrained
from capi_backbones.pretrained.download import cache_file_name, download_url


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch_hub"))
    monkeypatch.delenv("CAPI_DOWNLOAD_TIMEOUT", raising=False)
    return tmp_path / "torch_hub" / "checkpoints"


@pytest.fixture
def server(tmp_path):
    """/a/model.pth and /b/model.pth: two different checkpoints under one file name; /slow/model.pth trickles."""
    bodies = {}
    for seed, name in enumerate("ab"):
        path = tmp_path / f"{name}.pth"
        write_official_checkpoint(tiny_model(seed=seed), path)
        bodies[f"/{name}/model.pth"] = path.read_bytes()
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server API)
            hits.append(self.path)
            body = bodies.get(self.path.replace("/slow/", "/a/").split("?")[0])
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                if self.path.startswith("/slow/"):  # a byte every 0.05 s: no single read times out
                    for i in range(200):
                        self.wfile.write(body[i : i + 1])
                        self.wfile.flush()
                        time.sleep(0.05)
                else:
                    self.wfile.write(body)
            except OSError:
                pass
            self.close_connection = True

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    httpd.shutdown()
    httpd.server_close()


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_two_urls_sharing_a_file_name_never_share_a_cache_entry(hub_cache, server):
    base, hits = server
    a = from_pretrained(f"{base}/a/model.pth")
    b = from_pretrained(f"{base}/b/model.pth")
    assert same_weights(a, tiny_model(seed=0)) and same_weights(b, tiny_model(seed=1))
    assert not same_weights(a, b)
    assert hits == ["/a/model.pth", "/b/model.pth"]  # b was downloaded, not taken from a's entry
    assert same_weights(from_pretrained(f"{base}/a/model.pth"), a) and len(hits) == 2  # the cache still serves
    assert sorted(p.name for p in hub_cache.iterdir()) == sorted(
        cache_file_name(f"{base}/{name}/model.pth") for name in "ab"
    )


def test_cache_name_keeps_the_file_name_and_depends_on_the_whole_url():
    url = "https://huggingface.co/o/r/resolve/main/model.safetensors"
    name = cache_file_name(url)
    assert name.startswith("model-") and name.endswith(".safetensors")
    assert cache_file_name(url.replace("/main/", "/v2/")) != name  # another revision, another entry
    assert cache_file_name(url + "?download=true") != name
    assert cache_file_name("https://host/") == cache_file_name("https://host/")


def test_registered_urls_keep_their_official_file_names():
    from capi_backbones.weights_registry import WEIGHTS

    for weights in WEIGHTS.values():  # the same entry for from_pretrained, timm and the official hubconf
        assert cache_file_name(weights.url) == weights.file_name
    assert len({w.file_name for w in WEIGHTS.values()}) == len(WEIGHTS)  # unique, so keyed by source too


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temporaries_of_killed_downloads_are_removed_and_nothing_else(hub_cache, server):
    base, _ = server
    hub_cache.mkdir(parents=True)
    old = time.time() - 3600
    stale = hub_cache / f".model-0123456789abcdef.pth.{_dead_pid()}.0badf00d.tmp"  # killed an hour ago
    recent = hub_cache / f".model-0123456789abcdef.pth.{_dead_pid()}.1badf00d.tmp"  # maybe another machine, busy
    live = hub_cache / f".model-0123456789abcdef.pth.{os.getpid()}.2badf00d.tmp"  # a live process of this machine
    mine = hub_cache / "notes.tmp"  # not a name the package writes
    for path in (stale, recent, live, mine):
        path.write_bytes(b"partial")
    for path in (stale, live, mine):
        os.utime(path, (old, old))
    from_pretrained(f"{base}/a/model.pth")
    assert not stale.exists()
    assert recent.exists() and live.exists() and mine.exists()


def test_interrupted_download_leaves_no_temporary(hub_cache, server, monkeypatch):
    base, _ = server

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(download, "_verify", interrupt)  # Ctrl-C once the body has arrived, before the rename
    with pytest.raises(KeyboardInterrupt):
        from_pretrained(f"{base}/a/model.pth")
    assert list(hub_cache.iterdir()) == []


def test_deadline_from_the_environment(hub_cache, server, monkeypatch):
    base, _ = server
    monkeypatch.setenv("CAPI_DOWNLOAD_TIMEOUT", "0.5")
    start = time.monotonic()
    with pytest.raises(DownloadError, match="passed its 0.5 s deadline"):
        from_pretrained(f"{base}/slow/model.pth")
    assert time.monotonic() - start < 3
    assert list(hub_cache.iterdir()) == []


def test_deadline_keyword_wins_over_the_environment(hub_cache, server, monkeypatch):
    base, _ = server
    monkeypatch.setenv("CAPI_DOWNLOAD_TIMEOUT", "3600")
    with pytest.raises(DownloadError, match="passed its 0.3 s deadline"):
        from_pretrained(f"{base}/slow/model.pth", options=LoadOptions(download_timeout=0.3))


@pytest.mark.parametrize("bad", ["soon", "0", "-5", "inf", "nan"])
def test_bad_deadline_is_one_line(hub_cache, monkeypatch, bad):
    monkeypatch.setenv("CAPI_DOWNLOAD_TIMEOUT", bad)
    with pytest.raises(ValueError, match=r"CAPI_DOWNLOAD_TIMEOUT") as info:
        download_url("http://127.0.0.1:9/model.pth")
    assert "\n" not in str(info.value)
