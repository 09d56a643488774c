"""The hub client (pretrained/hub.py) against a fake hub on 127.0.0.1, written from HTTP's rules (Range,
redirects, ETags) rather than from the code under test."""
import errno
import hashlib
import http.server
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
from pathlib import Path

import pytest
import torch

from pretrained import hub as hub_client
from pretrained import encoder, files
from references import BERT, encoder_reference, encoder_weights, safetensors_bytes, write_by_hand

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------ hub


class HubHandler(http.server.BaseHTTPRequestHandler):
    """A fake hub (or a foreign host) on 127.0.0.1, written from HTTP's rules rather than from pretrained.py.

    Serves server.files by path with a strong ETag (the body's sha256, as the hub gives LFS files), honours
    'Range: bytes=N-' and If-Range (a stale ETag gets the whole file, 200). Per-path faults and extras:
    truncate (promise the whole body, send half, hang up, once), no_length (no Content-Length: the body ends when
    the connection closes), chunked / chunked_cut (a chunked body, complete or cut before its end), bad_range
    (answer a resume with the wrong Content-Range), redirect (302 to another URL), headers (extra headers),
    ignore_if_range (answer any Range with 206, whatever the version), no_etag (no ETag header), stall (path ->
    (n, event): send n bytes, then wait for the event before the rest, once)."""

    def do_GET(self):
        srv = self.server
        srv.log.append((self.path, self.headers.get("Range"), self.headers.get("Authorization"),
                        self.headers.get("If-Range")))
        if self.path in srv.gated and self.headers.get("Authorization") != "Bearer secret":
            return self.send_error(401)
        if self.path in srv.redirect:
            self.send_response(302)
            self.send_header("Location", srv.redirect[self.path])
            for k, v in srv.headers.get(self.path, {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            return self.end_headers()
        body = srv.files.get(self.path)
        if body is None:
            return self.send_error(404)
        etag = f'"{hashlib.sha256(body).hexdigest()}"'
        start, rng = 0, self.headers.get("Range")
        if rng and (self.path in srv.ignore_if_range or self.headers.get("If-Range", etag) == etag):
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                return self.send_error(416)
            self.send_response(206)
            first = start + 1 if self.path in srv.bad_range else start
            self.send_header("Content-Range", f"bytes {first}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        if self.path not in srv.no_etag:
            self.send_header("ETag", etag)
        for k, v in srv.headers.get(self.path, {}).items():
            self.send_header(k, v)
        rest = body[start:]
        if self.path in srv.chunked or self.path in srv.chunked_cut:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            half = rest[:len(rest) // 2]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(half), half))
            if self.path in srv.chunked_cut:
                return  # no further chunk and no terminating 0-chunk: the connection just closes
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest) - len(half), rest[len(half):]))
            return
        if self.path not in srv.no_length:
            self.send_header("Content-Length", str(len(rest)))
        self.end_headers()
        if self.path in srv.truncate:
            srv.truncate.discard(self.path)
            rest = rest[:len(rest) // 2]
        if self.path in srv.stall:
            n, event = srv.stall.pop(self.path)
            self.wfile.write(rest[:n])
            self.wfile.flush()
            event.wait(30)  # a test that fails before setting it must not hang forever
            rest = rest[n:]
        self.wfile.write(rest)

    def log_message(self, *args):
        pass


def start_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    server.files, server.log, server.gated, server.redirect, server.headers = {}, [], set(), {}, {}
    server.truncate, server.no_length, server.chunked, server.chunked_cut, server.bad_range = (set() for _ in range(5))
    server.ignore_if_range, server.no_etag, server.stall = set(), set(), {}
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    server.stop = lambda: (server.shutdown(), server.server_close())
    server.thread = thread
    return server


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = start_server()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("HF_HUB_CACHE", "HF_TOKEN", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    yield server
    if server.thread.is_alive():
        server.stop()


@pytest.fixture
def foreign():
    """Another origin (same host, another port): a CDN, a dataset host. It must never see the token."""
    server = start_server()
    yield server
    server.stop()


def test_token_goes_to_the_hub_origin_only(hub, foreign, tmp_path, monkeypatch):
    body = b"weights" * 100
    hub.files["/org/m/resolve/main/config.json"] = foreign.files["/data/test.jsonl"] = body
    foreign.files["/cdn/blob"] = body
    hub_client.download(hub.url + "/org/m/resolve/main/config.json", tmp_path / "a", token="secret")
    assert hub.log[-1][2] == "Bearer secret"  # the hub itself gets it
    hub_client.download(foreign.url + "/data/test.jsonl", tmp_path / "b", token="secret")  # a caller passing it anyway
    assert foreign.log[-1][2] is None
    # the hub redirects a big file to its CDN: the hub sees the token, the CDN never does
    hub.redirect["/org/m/resolve/main/model.safetensors"] = foreign.url + "/cdn/blob"
    assert hub_client.download(hub.url + "/org/m/resolve/main/model.safetensors", tmp_path / "c",
                      token="secret").read_bytes() == body
    assert hub.log[-1] == ("/org/m/resolve/main/model.safetensors", None, "Bearer secret", None)
    # a redirect that stays on the hub's origin (a renamed repo) keeps it
    hub.redirect["/old/m/resolve/main/config.json"] = hub.url + "/org/m/resolve/main/config.json"
    hub_client.download(hub.url + "/old/m/resolve/main/config.json", tmp_path / "d", token="secret")
    assert [a for _, _, a, _ in hub.log[-2:]] == ["Bearer secret", "Bearer secret"]
    # resolve() with $HF_TOKEN, weights served by the CDN
    monkeypatch.setenv("HF_TOKEN", "secret")
    tiny_bert_repo(hub, "org/tiny")
    hub.files["/cdn/tiny"] = hub.files.pop("/org/tiny/resolve/main/model.safetensors")
    foreign.files["/cdn/tiny"] = hub.files["/cdn/tiny"]
    hub.redirect["/org/tiny/resolve/main/model.safetensors"] = foreign.url + "/cdn/tiny"
    assert (hub_client.resolve("org/tiny") / "model.safetensors").read_bytes() == foreign.files["/cdn/tiny"]
    assert [p for p, _, _, _ in foreign.log] == ["/data/test.jsonl", "/cdn/blob", "/cdn/tiny"]
    assert [a for _, _, a, _ in foreign.log] == [None, None, None]
    assert {a for _, _, a, _ in hub.log} == {"Bearer secret"}
    # the token saved by `huggingface-cli login` is scoped the same way
    monkeypatch.delenv("HF_TOKEN")
    (tmp_path / "hf/token").write_text("saved\n")
    hub.log.clear()
    tiny_bert_repo(hub, "org/tiny2")
    hub.redirect["/org/tiny2/resolve/main/model.safetensors"] = foreign.url + "/cdn/tiny"
    hub_client.resolve("org/tiny2")
    assert {a for _, _, a, _ in hub.log} == {"Bearer saved"} and foreign.log[-1][2] is None
    hub.redirect["/org/m/resolve/main/x.bin"] = "ftp://127.0.0.1/x.bin"  # only http(s) redirects are followed
    with pytest.raises(urllib.error.HTTPError, match="non-HTTP URL refused"):
        hub_client.download(hub.url + "/org/m/resolve/main/x.bin", tmp_path / "x", token="secret")


def test_same_origin_compares_scheme_host_and_port():
    assert hub_client.same_origin("https://huggingface.co/a/b", "https://HuggingFace.co:443")
    assert hub_client.same_origin("http://127.0.0.1:8000/x", "http://127.0.0.1:8000")
    for other in ("http://huggingface.co/a", "https://cdn-lfs.huggingface.co/a", "https://huggingface.co:8443/a",
                  "https://huggingface.co.evil.com/a", "https://evil.com/huggingface.co", "https://x@evil.com/",
                  "https://huggingface.co:bad/"):
        assert not hub_client.same_origin(other, "https://huggingface.co"), other


def test_download_resumes_only_the_version_it_started(hub, tmp_path):
    body = bytes(range(256)) * 40
    hub.files["/f.bin"] = body
    hub.truncate.add("/f.bin")
    with pytest.raises(ConnectionError, match="run again to resume"):  # cut mid-file: the partial is kept
        hub_client.download(hub.url + "/f.bin", tmp_path / "f.bin")
    assert not (tmp_path / "f.bin").exists() and (tmp_path / "f.bin.incomplete").stat().st_size == len(body) // 2
    etag = f'"{hashlib.sha256(body).hexdigest()}"'
    assert hub_client.download(hub.url + "/f.bin", tmp_path / "f.bin").read_bytes() == body
    assert hub.log[-1][1:] == (f"bytes={len(body) // 2}-", None, etag)  # Range with If-Range on its ETag
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]  # no partial, no ETag file left
    n = len(hub.log)
    hub_client.download(hub.url + "/f.bin", tmp_path / "f.bin")  # already there: no request at all
    assert len(hub.log) == n
    # the remote file changes between the two attempts: the result is the new file, never a mix of both
    hub.files["/g.bin"] = body
    hub.truncate.add("/g.bin")
    with pytest.raises(ConnectionError):
        hub_client.download(hub.url + "/g.bin", tmp_path / "g.bin")
    new = bytes(reversed(body))
    hub.files["/g.bin"] = new
    assert hub_client.download(hub.url + "/g.bin", tmp_path / "g.bin").read_bytes() == new
    assert hub.log[-1][3] == etag  # it asked for the old version; the server sent the new one whole
    # a partial without the ETag it came from (e.g. an older client's) is not trusted: start from zero
    (tmp_path / "h.bin.incomplete").write_bytes(b"\0" * 1000)
    hub.files["/h.bin"] = body
    assert hub_client.download(hub.url + "/h.bin", tmp_path / "h.bin").read_bytes() == body
    assert hub.log[-1][1] is None
    with pytest.raises(Exception) as e:
        hub_client.download(hub.url + "/missing.bin", tmp_path / "missing.bin")
    assert getattr(e.value, "code", None) == 404 and not (tmp_path / "missing.bin").exists()


def test_download_rejects_a_wrong_content_range(hub, tmp_path):
    body = bytes(range(256)) * 8
    hub.files["/r.bin"] = body
    hub.truncate.add("/r.bin")
    with pytest.raises(ConnectionError):
        hub_client.download(hub.url + "/r.bin", tmp_path / "r.bin")
    hub.bad_range.add("/r.bin")  # the server answers the resume with bytes that start one too late
    with pytest.raises(ConnectionError, match=r"Content-Range 'bytes 1025-2047/2048'.*discarded"):
        hub_client.download(hub.url + "/r.bin", tmp_path / "r.bin")
    assert list(tmp_path.iterdir()) == []
    assert hub_client.download(hub.url + "/r.bin", tmp_path / "r.bin").read_bytes() == body  # a fresh start is whole


def test_download_never_marks_a_short_file_complete(hub, foreign, tmp_path):
    body = bytes(range(256)) * 8
    foreign.files["/n.bin"] = body
    foreign.no_length.add("/n.bin")  # no Content-Length, and not the hub: nothing states the size or a checksum
    with pytest.raises(ConnectionError, match="states no length or checksum"):
        hub_client.download(foreign.url + "/n.bin", tmp_path / "n.bin")
    assert list(tmp_path.iterdir()) == []
    hub.files["/n.bin"] = body
    hub.no_length.add("/n.bin")
    hub.headers["/n.bin"] = {"X-Linked-Size": str(len(body))}  # the hub's size header makes it checkable
    hub.truncate.add("/n.bin")
    with pytest.raises(ConnectionError, match=f"stopped at {len(body) // 2} of {len(body)} bytes"):
        hub_client.download(hub.url + "/n.bin", tmp_path / "n.bin")
    assert not (tmp_path / "n.bin").exists()
    assert hub_client.download(hub.url + "/n.bin", tmp_path / "n.bin").read_bytes() == body  # resumed, then complete
    hub.files["/c.bin"] = body
    hub.chunked_cut.add("/c.bin")  # a chunked body that stops before its final chunk
    with pytest.raises(ConnectionError, match="broke off"):
        hub_client.download(hub.url + "/c.bin", tmp_path / "c.bin")
    assert not (tmp_path / "c.bin").exists()
    hub.chunked_cut.clear()
    hub.chunked.add("/c.bin")  # chunked and complete: its terminating chunk proves the end
    assert hub_client.download(hub.url + "/c.bin", tmp_path / "c.bin").read_bytes() == body


def test_download_checks_the_sha256_the_hub_states(hub, foreign, tmp_path):
    body, other = b"a" * 3000, b"b" * 3000
    foreign.files["/cdn/x"] = body
    foreign.no_length.add("/cdn/x")  # the CDN sends no length: the hub's size and sha256 must suffice
    hub.redirect["/org/m/resolve/main/w.safetensors"] = foreign.url + "/cdn/x"
    hub.headers["/org/m/resolve/main/w.safetensors"] = {"X-Linked-Etag": f'"{hashlib.sha256(body).hexdigest()}"',
                                                        "X-Linked-Size": str(len(body))}
    assert hub_client.download(hub.url + "/org/m/resolve/main/w.safetensors", tmp_path / "w").read_bytes() == body
    foreign.files["/cdn/x"] = other  # the CDN now serves other bytes of the same length
    with pytest.raises(ConnectionError, match="has sha256 .* the hub states .* discarded"):
        hub_client.download(hub.url + "/org/m/resolve/main/w.safetensors", tmp_path / "w2")
    assert not (tmp_path / "w2").exists() and not (tmp_path / "w2.incomplete").exists()
    hub.files["/y.bin"] = body  # an LFS file served by the hub itself: its ETag is the sha256, and it is checked
    hub.headers["/y.bin"] = {"X-Linked-Etag": hashlib.sha256(other).hexdigest()}
    with pytest.raises(ConnectionError, match="headers contradict"):
        hub_client.download(hub.url + "/y.bin", tmp_path / "y")
    foreign.files["/z"] = other  # another origin's ETag means nothing: not taken for a checksum
    foreign.headers["/z"] = {"X-Linked-Etag": hashlib.sha256(body).hexdigest()}
    assert hub_client.download(foreign.url + "/z", tmp_path / "z").read_bytes() == other


def test_a_resume_needs_the_partials_etag_in_the_answer(hub, tmp_path, capsys):
    old = bytes(range(256)) * 16
    new = bytes(reversed(old))
    etag = f'"{hashlib.sha256(old).hexdigest()}"'
    for name in ("/v.bin", "/w.bin"):
        hub.files[name] = old
        hub.truncate.add(name)
        with pytest.raises(ConnectionError):  # half of the old version stays, with its ETag
            hub_client.download(hub.url + name, tmp_path / name[1:])
        hub.files[name] = new  # then the file changes, on a server that honours Range but ignores If-Range
        hub.ignore_if_range.add(name)
    capsys.readouterr()
    hub.no_etag.add("/v.bin")  # its 206 states no version at all: nothing proves the bytes continue the old ones
    assert hub_client.download(hub.url + "/v.bin", tmp_path / "v.bin").read_bytes() == new
    assert [(path, rng) for path, rng, _, _ in hub.log[-2:]] == [("/v.bin", "bytes=2048-"), ("/v.bin", None)]
    assert capsys.readouterr().err == (f"{hub.url}/v.bin: the server sent the rest of the file with no ETag, not the "
                                       f"partial download's ETag {etag}: starting over from zero\n")
    new_etag = f'"{hashlib.sha256(new).hexdigest()}"'  # its 206 states the new version: not the partial's either
    assert hub_client.download(hub.url + "/w.bin", tmp_path / "w.bin").read_bytes() == new
    assert [(path, rng) for path, rng, _, _ in hub.log[-2:]] == [("/w.bin", "bytes=2048-"), ("/w.bin", None)]
    assert capsys.readouterr().err == (f"{hub.url}/w.bin: the server sent the rest of the file with ETag {new_etag}, "
                                       f"not the partial download's ETag {etag}: starting over from zero\n")
    assert sorted(os.listdir(tmp_path)) == ["v.bin", "w.bin"]


CHILD = "import sys; from pretrained import hub; hub.download(sys.argv[1], sys.argv[2])"


def start_download(url, dest):
    """hub.download in a process of its own, as another job sharing the cache runs it."""
    return subprocess.Popen([sys.executable, "-c", CHILD, url, str(dest)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, what):
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def test_two_processes_downloading_one_file_share_one_transfer(hub, tmp_path):
    body = bytes(range(256)) * 4096
    hub.files["/big.bin"] = body
    release = threading.Event()
    hub.stall["/big.bin"] = (len(body) // 2, release)  # the first transfer pauses halfway until the test says so
    dest = tmp_path / "cache/big.bin"
    procs = []
    try:
        procs.append(start_download(hub.url + "/big.bin", dest))
        wait_for(lambda: hub.log, "the first process's request")  # it holds the lock from before its request
        procs.append(start_download(hub.url + "/big.bin", dest))
        assert procs[1].stderr.readline() == ("waiting for another process to finish downloading big.bin (it holds "
                                              f"{dest}.lock)\n")
        release.set()
        outputs = [p.communicate(timeout=60) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs
    finally:
        release.set()
        for p in procs:
            p.kill()
            p.communicate()
    assert dest.read_bytes() == body
    assert [path for path, *_ in hub.log] == ["/big.bin"]  # one transfer: the second process used its result
    assert sorted(os.listdir(dest.parent)) == ["big.bin"]  # no partial, ETag or lock left behind
    assert hub_client.download(hub.url + "/big.bin", dest).read_bytes() == body and len(hub.log) == 1


def test_a_killed_downloads_lock_is_taken_over_and_its_partial_resumed(hub, tmp_path, capsys):
    body = bytes(range(256)) * 6144  # 1.5 MiB: the download writes its first MiB, then the server stalls
    hub.files["/big.bin"] = body
    release = threading.Event()
    hub.stall["/big.bin"] = (1 << 20, release)
    dest, part = tmp_path / "big.bin", tmp_path / "big.bin.incomplete"
    first = start_download(hub.url + "/big.bin", dest)
    try:
        wait_for(lambda: part.exists() and part.stat().st_size == 1 << 20, "the first MiB")
    finally:
        first.kill()  # -9: no cleanup runs, the lock file stays
        first.communicate()
        release.set()
    assert sorted(os.listdir(tmp_path)) == ["big.bin.incomplete", "big.bin.incomplete.etag", "big.bin.lock"]
    assert hub_client.download(hub.url + "/big.bin", dest).read_bytes() == body
    assert "waiting" not in capsys.readouterr().err  # the dead holder's lock died with it
    assert hub.log[-1][1] == f"bytes={1 << 20}-"  # its partial was resumed
    assert sorted(os.listdir(tmp_path)) == ["big.bin"]


def test_a_cache_without_file_locks_is_named(hub, tmp_path, monkeypatch):
    def flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(hub_client.fcntl, "flock", flock)  # e.g. an NFS mount without its lock daemon
    hub.files["/x.bin"] = b"x" * 100
    with pytest.raises(OSError) as e:
        hub_client.download(hub.url + "/x.bin", tmp_path / "x.bin")
    assert str(e.value) == (f"cannot lock {tmp_path}/x.bin.lock (No locks available): the download cache's file "
                            "system has no file locks; pass cache_dir= on one that has (a local disk)")
    assert hub.log == [] and not (tmp_path / "x.bin").exists()


def tiny_bert_repo(hub, repo, weights="safetensors"):
    """Put a tiny BERT repo on the fake hub with its weights in one of the three formats."""
    sd = encoder_weights(BERT)
    base = f"/{repo}/resolve/main/"
    hub.files[base + "config.json"] = json.dumps(BERT).encode()
    hub.files[base + "tokenizer.json"] = b"{}"
    if weights == "safetensors":
        hub.files[base + "model.safetensors"] = safetensors_bytes(sd)
    elif weights == "sharded":
        names = sorted(sd)
        shards = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
        for shard, keys in shards.items():
            hub.files[base + shard] = safetensors_bytes({k: sd[k] for k in keys})
        hub.files[base + "model.safetensors.index.json"] = json.dumps(
            {"weight_map": {k: s for s, keys in shards.items() for k in keys}}).encode()
    else:
        buf = io.BytesIO()
        torch.save(sd, buf)
        hub.files[base + "pytorch_model.bin"] = buf.getvalue()
    return sd


def test_resolve_downloads_then_works_offline(hub, tmp_path):
    sd = tiny_bert_repo(hub, "org/tiny-bert")
    folder = hub_client.resolve("org/tiny-bert")
    assert folder == tmp_path / "hf/unilora/org--tiny-bert/main"
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json", ".complete"}
    requested = [path for path, *_ in hub.log]
    assert requested[0].endswith("/config.json") and "/org/tiny-bert/resolve/main/generation_config.json" in requested
    hub.stop()  # offline from here on: the cache must be enough
    model = encoder.Encoder.from_pretrained("org/tiny-bert")
    ids = torch.tensor([[2, 7, 9, 3]])
    ref = encoder_reference(sd, BERT, ids, torch.ones_like(ids))
    torch.testing.assert_close(model(ids), ref.float(), atol=1e-5, rtol=0)
    assert hub_client.resolve("org/tiny-bert", files=["config.json"]) == folder
    assert hub_client.resolve(str(folder)) == folder  # a local folder is used as is


@pytest.mark.parametrize("weights, expected",
                         [("sharded", "model-00002-of-00002.safetensors"), ("bin", "pytorch_model.bin")])
def test_resolve_falls_back_to_other_weight_formats(hub, weights, expected):
    sd = tiny_bert_repo(hub, "org/other", weights)
    folder = hub_client.resolve("org/other")
    assert (folder / expected).is_file() and not (folder / "model.safetensors").exists()
    assert files.load_state_dict(folder).keys() == sd.keys()


def test_resolve_errors_name_the_problem_and_the_fix(hub, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"org/nope/resolve/main/config.json: not found \(404\)"):
        hub_client.resolve("org/nope")
    tiny_bert_repo(hub, "org/gated")
    hub.gated.add("/org/gated/resolve/main/config.json")
    with pytest.raises(PermissionError, match="HF_TOKEN"):
        hub_client.resolve("org/gated")
    monkeypatch.setenv("HF_TOKEN", "secret")
    assert (hub_client.resolve("org/gated") / "config.json").is_file()
    assert hub.log[-1][2] == "Bearer secret"
    with pytest.raises(FileNotFoundError, match="neither an existing folder nor a hub repo id"):
        hub_client.resolve(str(tmp_path / "no/such/folder"))
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: the network is "down"
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(ConnectionError, match="unreachable.*pass its path instead of the repo id"):
        encoder.Encoder.from_pretrained("org/never-downloaded")
    cache = tmp_path / "fresh-cache"
    with pytest.raises(ConnectionError):
        hub_client.resolve("org/never-downloaded", cache_dir=cache)
    assert not cache.exists()  # the folders a failed first download made are gone again

def test_different_repos_and_revisions_never_share_a_cache_folder(hub, tmp_path):
    cases = [("org/m", "main", "org--m/main"), ("org/m", "0" * 40, "org--m/" + "0" * 40),  # where they always were
             ("org--m", "main", "org%2D%2Dm/main"), ("org/m", "refs/pr/1", "org--m/refs--pr--1"),
             ("org/m", "refs--pr--1", "org--m/refs%2D%2Dpr%2D%2D1"), ("a--b/c", "main", "a%2D%2Db--c/main"),
             ("a/b--c", "main", "a--b%2D%2Dc/main"), ("org-/m", "main", "org%2D--m/main"),
             ("org/m", "v-/-x", "org--m/v%2D--%2Dx"), ("org/m", "100%", "org--m/100%25")]
    for repo, revision, folder in cases:
        url_path = f"/{repo}/resolve/{urllib.parse.quote(revision, safe='')}/config.json"
        hub.files[url_path] = f"{repo} at {revision}".encode()
        assert hub_client.resolve(repo, ["config.json"], revision=revision) == tmp_path / "hf/unilora" / folder
    for repo, revision, folder in cases:
        assert (tmp_path / "hf/unilora" / folder / "config.json").read_bytes() == f"{repo} at {revision}".encode()


# ------------------------------------------------------------------------------------ hostile files

BAD_NAMES = ["/tmp/evil.safetensors", "../evil.safetensors", "../../../../../evil.safetensors", "a/../../evil.st",
             "a//b.safetensors", "", ".", "sub/", "C:evil.safetensors", "C:/evil.safetensors", "..\\evil.safetensors",
             "sub\\x.safetensors", "a\0b.safetensors", 7, None]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_names_from_an_index_or_a_caller_stay_inside_the_folder(hub, tmp_path, name):
    tiny_bert_repo(hub, "org/crafted", "sharded")
    base = "/org/crafted/resolve/main/"
    index = json.loads(hub.files[base + "model.safetensors.index.json"])
    index["weight_map"]["embeddings.LayerNorm.bias"] = name
    hub.files[base + "model.safetensors.index.json"] = json.dumps(index).encode()
    with pytest.raises(ValueError, match=f"model.safetensors.index.json: refusing file name {re.escape(repr(name))}"):
        hub_client.resolve("org/crafted")
    assert not [p for p, *_ in hub.log if "model-0000" in p]  # no shard was requested
    n = len(hub.log)
    if name is not None:
        with pytest.raises(ValueError, match=re.escape(repr(name))):
            hub_client.resolve("org/crafted2", files=["config.json", name])
        assert len(hub.log) == n  # refused before any request
    # a local folder whose index points outside it, at a valid file that the old reader would have loaded
    folder = tmp_path / "models/m"
    folder.mkdir(parents=True)
    write_by_hand(tmp_path / "models/evil.safetensors", {"w": torch.ones(2)})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": name}}))
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        files.load_state_dict(folder)
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if "evil" in p.name}
    assert written == {"models/evil.safetensors"}  # nothing else named evil anywhere


def test_nested_names_and_revisions_inside_the_folder_are_fine(hub):
    assert files.check_file_name("sub/dir/model-00001.safetensors", "test") == "sub/dir/model-00001.safetensors"
    with pytest.raises(ValueError, match="revision"):
        hub_client.resolve("org/x", revision="../../x")
    assert hub.log == []


@pytest.mark.parametrize("planted", ["config.json.incomplete", "config.json.lock", "config.json", "sub", "."])
def test_links_planted_in_the_cache_are_not_written_through(hub, tmp_path, planted):
    hub.files["/org/s/resolve/main/config.json"] = b"{}"
    hub.files["/org/s/resolve/main/sub/w.safetensors"] = b"w" * 100
    folder = tmp_path / "hf/unilora/org--s/main"
    folder.parent.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"mine")
    if planted != ".":
        folder.mkdir()
    # a folder redirected to another folder, a partial or lock to a file the user has, the file itself to a new one
    target = {"sub": outside, ".": outside, "config.json": outside / "new"}.get(planted, outside / "precious")
    (folder / planted).symlink_to(target)
    with pytest.raises(PermissionError) as e:
        hub_client.resolve("org/s", ["config.json", "sub/w.safetensors"])
    assert str(e.value) == (f"refusing to write through the symbolic link {folder / planted} in the download cache "
                            "(it could point anywhere); remove it, or pass another cache_dir=")
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == {"precious": b"mine"}
    assert "/org/s/resolve/main/sub/w.safetensors" not in [path for path, *_ in hub.log]


def test_a_link_planted_after_the_check_is_not_followed_either(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(hub_client, "_refuse_symlinks", lambda *args: None)  # as if planted just after the check
    (tmp_path / "precious").write_bytes(b"mine")
    (tmp_path / "c.bin.lock").symlink_to(tmp_path / "precious")
    hub.files["/c.bin"] = b"c" * 100
    with pytest.raises(PermissionError) as e:
        hub_client.download(hub.url + "/c.bin", tmp_path / "c.bin")
    assert str(e.value) == (f"refusing to write through the symbolic link {tmp_path}/c.bin.lock in the download "
                            "cache (it could point anywhere); remove it, or pass another cache_dir=")
    assert (tmp_path / "precious").read_bytes() == b"mine" and hub.log == []


def test_a_link_planted_as_the_complete_marker_is_replaced_not_followed(hub, tmp_path):
    tiny_bert_repo(hub, "org/tiny")
    folder = tmp_path / "hf/unilora/org--tiny/main"
    folder.mkdir(parents=True)
    (folder / ".complete").symlink_to(tmp_path / "elsewhere")  # dangling: a write through it would create that file
    assert hub_client.resolve("org/tiny") == folder
    assert not (tmp_path / "elsewhere").exists() and not (folder / ".complete").is_symlink()
    assert (folder / "config.json").read_bytes() == hub.files["/org/tiny/resolve/main/config.json"]


def test_download_into_a_cache_checks_the_file_is_inside_it(hub, tmp_path):
    with pytest.raises(ValueError) as e:
        hub_client.download(hub.url + "/x.bin", tmp_path / "x.bin", cache=tmp_path / "cache")
    assert str(e.value) == f"download(cache={str(tmp_path / 'cache')!r}): {tmp_path}/x.bin is not inside that folder"
    assert hub.log == [] and os.listdir(tmp_path) == []

# ------------------------------------------------------------------------------------ files.atomic_write


def test_atomic_write_removes_the_temps_of_dead_writers_only(tmp_path):
    host = os.uname().nodename
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # its pid belongs to no process now
    planted = {f".out.bin.{host}.{finished.pid}.k2j4_x9q.tmp": False,  # killed -9 mid-write on this machine: removed
               f".out.bin.{host}.{os.getppid()}.a8c3d0f1.tmp": True,  # a live writer's: kept
               f".out.bin.other-host.{finished.pid}.a8c3d0f1.tmp": True,  # another machine's pid means nothing here
               f".other.bin.{host}.{finished.pid}.a8c3d0f1.tmp": True,  # another file's
               ".out.bin.a8c3d0f1.tmp": True}  # an older version's, without a pid: nothing tells whether it is stale
    for name in planted:
        (tmp_path / name).write_bytes(b"partial")
    seen = []
    files.atomic_write(tmp_path / "out.bin", lambda f: (seen.extend(os.listdir(tmp_path)), f.write(b"new")))
    temp = re.compile(re.escape(f".out.bin.{host}.{os.getpid()}.") + r"\w+\.tmp")
    assert [name for name in seen if temp.fullmatch(name)]  # the writer's own temp carries its pid
    assert f".out.bin.{host}.{finished.pid}.k2j4_x9q.tmp" not in seen  # removed before the write began
    assert sorted(os.listdir(tmp_path)) == sorted(["out.bin", *(name for name, kept in planted.items() if kept)])
    assert (tmp_path / "out.bin").read_bytes() == b"new"
