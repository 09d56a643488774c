"""The hub client (pretrained/hub.py) against a fake hub on 127.0.0.1, written from HTTP's rules (Range,
redirects, ETags) rather than from the code under test."""
import hashlib
import http.server
import io
import json
import re
import socket
import threading
import urllib.error

import pytest
import torch

from pretrained import hub as hub_client
from pretrained import encoder, files
from references import BERT, encoder_reference, encoder_weights, safetensors_bytes, write_by_hand

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------ hub


class HubHandler(http.server.BaseHTTPRequestHandler):
    """A fake hub (or a foreign host) on 127.0.0.1, written from HTTP's rules rather than from pretrained.py.

    Serves server.files by path with a strong ETag (the body's sha256, as the hub gives LFS files), honours
    'Range: bytes=N-' and If-Range (a stale ETag gets the whole file, 200). Per-path faults and extras:
    truncate (promise the whole body, send half, hang up, once), no_length (no Content-Length: the body ends when
    the connection closes), chunked / chunked_cut (a chunked body, complete or cut before its end), bad_range
    (answer a resume with the wrong Content-Range), redirect (302 to another URL), headers (extra headers)."""

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
        if rng and self.headers.get("If-Range", etag) == etag:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                return self.send_error(416)
            self.send_response(206)
            first = start + 1 if self.path in srv.bad_range else start
            self.send_header("Content-Range", f"bytes {first}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
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
        self.wfile.write(rest)

    def log_message(self, *args):
        pass


def start_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    server.files, server.log, server.gated, server.redirect, server.headers = {}, [], set(), {}, {}
    server.truncate, server.no_length, server.chunked, server.chunked_cut, server.bad_range = (set() for _ in range(5))
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
