"""Downloads without the internet: refused local ports, a local HTTP server in a thread, monkeypatched
downloaders, and Hugging Face Hub in offline mode. Every failure must come within seconds and leave no
half-written file in the cache."""

import dataclasses
import hashlib
import http.server
import threading
import time

import huggingface_hub
import pytest
import torch
from checkpoint_files import TINY_CONFIG, tiny_model, write_official_checkpoint
from huggingface_hub import constants as hf_constants

import capi_backbones.pretrained.sources as sources
from capi_backbones import from_pretrained
from capi_backbones.hub import capi_vitl14, capi_vitl14_in1k, capi_vitl14_in22k, capi_vitl14_lvd, capi_vitl14_p205
from capi_backbones.pretrained import (
    CapiHubModel,
    CheckpointError,
    DownloadError,
    download_url,
    loading_interface,
    parse_hub_source,
)
from capi_backbones.pretrained.download import cache_file_name

REFUSED_URL = "http://127.0.0.1:9/capi_vitl14_lvd.pth"  # discard port: nothing listens, connection refused


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """torch.hub.get_dir() -> a temporary folder."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch_hub"))
    return tmp_path / "torch_hub" / "checkpoints"


@pytest.fixture
def server(tmp_path):
    """Local HTTP server: /good.pth (a tiny checkpoint), /short.pth (announces more bytes than it sends), 404."""
    path = tmp_path / "served.pth"
    write_official_checkpoint(tiny_model(), path)
    body = path.read_bytes()
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server API)
            hits.append(self.path)
            if self.path == "/good.pth":
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path == "/nolength.pth":  # cut short, and no Content-Length to tell
                self.send_response(200)
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
            elif self.path == "/html.pth":  # a login or error page served with 200
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(b"<!DOCTYPE html><html><body>Please sign in</body></html>")
            elif self.path == "/trickle.pth":  # one byte every 0.1 s: no single read ever times out
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    for i in range(100):
                        self.wfile.write(body[i : i + 1])
                        self.wfile.flush()
                        time.sleep(0.1)
                except OSError:
                    pass
                self.close_connection = True
            elif self.path == "/short.pth":
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 3])
                self.close_connection = True
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    httpd.shutdown()
    httpd.server_close()


def test_no_network_fails_fast_with_local_alternative(hub_cache):
    start = time.monotonic()
    with pytest.raises(DownloadError) as info:
        from_pretrained(REFUSED_URL)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert REFUSED_URL in message and 'from_pretrained("/path/to/capi_vitl14_lvd.pth")' in message
    assert not hub_cache.exists() or list(hub_cache.iterdir()) == []


def test_download_into_torch_hub_cache_once(hub_cache, server):
    base, hits = server
    model = from_pretrained(f"{base}/good.pth")
    assert model.config == TINY_CONFIG
    assert [p.name for p in hub_cache.iterdir()] == [cache_file_name(f"{base}/good.pth")]
    from_pretrained(f"{base}/good.pth")  # second time from the cache
    assert hits == ["/good.pth"]


def test_interrupted_download_leaves_nothing(hub_cache, server):
    base, _ = server
    with pytest.raises(DownloadError, match="stopped after|IncompleteRead"):
        download_url(f"{base}/short.pth")
    assert list(hub_cache.iterdir()) == []  # no partial file, no temporary file


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nolength.pth", "did not send a whole checkpoint .*cut-off or damaged zip"),
        ("html.pth", "did not send a whole checkpoint .*an HTML page"),
    ],
)
def test_bad_body_is_never_cached(hub_cache, server, name, message):
    base, hits = server
    for _ in range(2):  # the second try downloads again: nothing poisoned the cache
        with pytest.raises(DownloadError, match=message) as info:
            from_pretrained(f"{base}/{name}")
        assert 'from_pretrained("/path/to/' in str(info.value)
        assert list(hub_cache.iterdir()) == []
    assert hits == [f"/{name}"] * 2


def test_sha256_is_checked_before_the_rename(tmp_path, server):
    base, _ = server
    good = hashlib.sha256((tmp_path / "served.pth").read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match=f"SHA-256 is {good}, expected {'0' * 64}"):
        download_url(f"{base}/good.pth", cache_dir=cache, sha256="0" * 64)
    assert list(cache.iterdir()) == []
    cached = download_url(f"{base}/good.pth", cache_dir=cache, sha256=good.upper())
    assert cached == cache / cache_file_name(f"{base}/good.pth") and cached.name.startswith("good-")
    assert [p.name for p in cache.iterdir()] == [cached.name]


def test_trickling_server_fails_by_the_overall_deadline(tmp_path, server):
    base, _ = server
    start = time.monotonic()
    with pytest.raises(DownloadError, match="passed its 0.5 s deadline"):
        download_url(f"{base}/trickle.pth", cache_dir=tmp_path / "cache", deadline_s=0.5)
    assert time.monotonic() - start < 2
    assert list((tmp_path / "cache").iterdir()) == []


def test_registered_weights_pass_their_sha256(monkeypatch, tmp_path):
    write_official_checkpoint(tiny_model(), tmp_path / "tiny.pth")
    calls = []
    monkeypatch.setattr(sources, "download_url", lambda url, **kw: calls.append(kw) or tmp_path / "tiny.pth")
    weights = sources.get_weights("capi_vitl14_lvd")
    monkeypatch.setitem(sources.WEIGHTS, weights.name, dataclasses.replace(weights, sha256="ab" * 32))
    from_pretrained("capi_vitl14_lvd", arch=TINY_CONFIG)
    assert calls[0]["sha256"] == "ab" * 32


@pytest.mark.parametrize(
    ("interface", "hint"),
    [
        ("python", 'from_pretrained("/path/to/capi_vitl14_lvd.pth")'),
        ("cli", "--weights /path/to/capi_vitl14_lvd.pth"),
        ("torch.hub", 'torch.hub.load(..., weights="/path/to/capi_vitl14_lvd.pth")'),
        ("timm", 'pretrained_cfg_overlay=dict(file="/path/to/capi_vitl14_lvd.pth")'),
    ],
)
def test_offline_hint_names_the_fix_of_the_interface(hub_cache, interface, hint):
    with loading_interface(interface), pytest.raises(DownloadError) as info:
        from_pretrained(REFUSED_URL)
    assert hint in str(info.value)
    assert sum(h in str(info.value) for h in ("from_pretrained(", "--weights", "weights=", "pretrained_cfg")) == 1


def test_hub_entry_point_hint_names_weights_path(hub_cache):
    with pytest.raises(DownloadError, match=r'torch.hub.load\(\.\.\., weights="/path/to/capi_vitl14_lvd.pth"\)'):
        capi_vitl14(weights=REFUSED_URL)


def test_http_error(tmp_path, server):
    base, _ = server
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_url(f"{base}/missing.pth", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


def test_corrupt_cached_file_says_delete(hub_cache):
    hub_cache.mkdir(parents=True)
    (hub_cache / "capi_vitl14_lvd.pth").write_bytes(b"PK\x03\x04" + b"\0" * 100)  # a cut-off download
    with pytest.raises(CheckpointError, match=f"delete {hub_cache / 'capi_vitl14_lvd.pth'} and download it again"):
        from_pretrained("capi_vitl14_lvd")


@pytest.fixture
def recorded_downloads(tmp_path, monkeypatch):
    """Replace the downloader: record (url, file_name) and hand back a tiny official-layout checkpoint."""
    path = tmp_path / "tiny.pth"
    write_official_checkpoint(tiny_model(), path)
    calls = []

    def fake_download(url, *, file_name=None, **kwargs):
        calls.append((url, file_name))
        return path

    monkeypatch.setattr(sources, "download_url", fake_download)
    return calls


@pytest.mark.parametrize(
    ("name", "file_name"),
    [
        ("capi_vitl14", "capi_vitl14_lvd.pth"),
        ("capi_vitl14_lvd", "capi_vitl14_lvd.pth"),
        ("capi_vitl14_p205", "capi_vitl14_p205.pth"),
        ("capi_vitl14_in22k", "capi_vitl14_i22k.pth"),  # the file name differs from the hub name
        ("capi_vitl14_in1k", "capi_vitl14_in1k.pth"),
        ("capi_vitl14.in1k", "capi_vitl14_in1k.pth"),
    ],
)
def test_registered_names_download_the_right_url(recorded_downloads, name, file_name):
    model = from_pretrained(name, arch=TINY_CONFIG)  # arch given: the tiny stand-in file loads
    assert recorded_downloads == [(f"https://dl.fbaipublicfiles.com/capi/{file_name}", file_name)]
    assert model.pretrained_weights is not None and model.pretrained_weights.file_name == file_name


def test_registered_name_uses_vitl14_arch(recorded_downloads):
    with pytest.raises(CheckpointError, match=r"registers: \(1, 16, 64\) vs \(1, 16, 1024\)"):
        from_pretrained("capi_vitl14_p205")


@pytest.mark.parametrize(
    ("entry", "kwargs", "file_name"),
    [
        (capi_vitl14, {}, "capi_vitl14_lvd.pth"),
        (capi_vitl14, {"weights": "p205"}, "capi_vitl14_p205.pth"),
        (capi_vitl14_lvd, {}, "capi_vitl14_lvd.pth"),
        (capi_vitl14_p205, {}, "capi_vitl14_p205.pth"),
        (capi_vitl14_in22k, {}, "capi_vitl14_i22k.pth"),
        (capi_vitl14_in1k, {}, "capi_vitl14_in1k.pth"),
    ],
)
def test_hub_entry_points_download_the_right_url(recorded_downloads, entry, kwargs, file_name):
    with pytest.raises(CheckpointError):  # the tiny stand-in does not fit ViT-L: the URL is what is checked
        entry(**kwargs)
    assert recorded_downloads == [(f"https://dl.fbaipublicfiles.com/capi/{file_name}", file_name)]


@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))


def test_hf_hub_offline_is_fast_and_clear(hf_offline):
    start = time.monotonic()
    with pytest.raises(DownloadError) as info:
        from_pretrained("hf-hub:someone/capi-vitl14@v1")
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "someone/capi-vitl14@v1" in message and "HF_HUB_OFFLINE" in message
    assert "hf download someone/capi-vitl14 --local-dir DIR" in message and 'from_pretrained("DIR")' in message


def test_hf_hub_unreachable_is_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(DownloadError, match="Cannot reach the Hugging Face Hub for someone/capi"):
        CapiHubModel.from_pretrained("someone/capi")
    assert time.monotonic() - start < 5


def test_hf_hub_source_loads_the_fetched_folder(tmp_path, monkeypatch):
    """The hub path, with huggingface_hub's downloader replaced by a local save_pretrained folder."""
    model = CapiHubModel(TINY_CONFIG).eval()
    model.save_pretrained(tmp_path / "snapshot")
    requests = []

    def fake_hf_hub_download(repo_id, filename, *, revision=None, local_files_only=False, **kwargs):
        requests.append((repo_id, filename, revision, local_files_only))
        return str(tmp_path / "snapshot" / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    loaded = from_pretrained("hf-hub:someone/capi@abc123")
    assert requests[0] == ("someone/capi", "model.safetensors", "abc123", True)  # the cache is tried first
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x)[0], loaded(x)[0])


@pytest.mark.parametrize("bad", ["hf-hub:nodomain", "hf-hub:a/b/c", "hf-hub:/repo"])
def test_invalid_hub_source(bad):
    with pytest.raises(ValueError, match="expected 'hf-hub:owner/repo"):
        parse_hub_source(bad)


def test_timm_and_cli_callers_name_their_own_fix(hub_cache, monkeypatch):
    """The callers owned elsewhere set their interface: timm's released-weights download, the CLI's extractor."""
    import argparse

    import timm

    import capi_backbones.pretrained.download as download
    import capi_backbones.timm  # noqa: F401  (registers the capi names with timm)
    from capi_backbones.cli.model_options import build_extractor

    def unreachable(url, timeout=None):
        raise OSError("no route to host")

    monkeypatch.setattr(download, "check_reachable", unreachable)
    with pytest.raises(DownloadError, match=r'pretrained_cfg_overlay=dict\(file="/path/to/capi_vitl14_lvd.pth"\)'):
        timm.create_model("capi_vitl14.lvd", pretrained=True)
    args = argparse.Namespace(
        model=REFUSED_URL, weights=None, random_init=False, device="cpu", image_size=224, batch_size=1
    )
    with pytest.raises(DownloadError, match="--weights /path/to/capi_vitl14_lvd.pth"):
        build_extractor(args)
