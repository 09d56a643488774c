"""Pretrained Hugging Face models without `transformers`: checkpoint files, hub downloads, BERT/RoBERTa, Llama, Gemma.

Why this file exists: the project may depend only on torch, numpy and tqdm, yet its two training scripts
fine-tune real Hugging Face checkpoints (RoBERTa-style encoders on GLUE, Llama-family decoders on math).
This one module replaces the parts of `transformers`, `tokenizers`, `safetensors` and `huggingface_hub`
that they need:

  files   - config.json, our own safetensors reader/writer, sharded indexes, pytorch_model.bin
  hub     - resolve("FacebookAI/roberta-base") -> a local folder (download once, resumable, verified, cached, offline
            reuse; the token goes to the hub's own origin only)
  tokens  - Tokenizer.from_pretrained(folder): tokenizer.json read exactly like `tokenizers` (WordPiece,
            byte-level BPE, SentencePiece-style BPE; added tokens, pair templates, truncation, decode)
  encoder - BERT / RoBERTa returning hidden states             (Encoder.from_pretrained)
  decoder - Llama / Mistral / Qwen2 / SmolLM / Gemma, KV cache  (CausalLM.from_pretrained, greedy generate)
  export  - save_peft_lora: a trained adapter as a PEFT LoRA folder that loads onto the transformers model

Module and parameter names are Hugging Face's (`encoder.layer.0.attention.self.query`,
`model.layers.0.self_attn.q_proj`, `lm_head`), so adapters target the usual names and exported weights line up.
Outputs were checked equal to `transformers` (fp32, within 1e-5) outside the project, which may not depend on it.

Hub cache layout (our own, simple): <root>/<org>--<name>/<revision>/<files>, where <root> is `cache_dir` if given,
else $HF_HUB_CACHE/unilora, else $HF_HOME/unilora, else ~/.cache/huggingface/unilora. A `.complete` marker is written
once every file of a default fetch is in place, so later calls need no network at all.
"""
import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import re
import struct
import sys
import tempfile
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------------------- files
# Every name, size and offset read from a file or a server is checked before it is used: a crafted checkpoint or
# index must end in a ValueError that names the file, never in a huge allocation, a write outside the model folder
# or code run by an unpickler.

# Weights are F32/F16/BF16; the integer types are for buffers real checkpoints carry (e.g. BERT's I64 position_ids).
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
MAX_HEADER_BYTES = 100_000_000  # a real header is kilobytes; more means a corrupt file or not a safetensors file


def read_json(path, what="JSON file") -> dict:
    """A JSON object from a file; bad bytes, bad JSON or another top-level type -> ValueError naming the file."""
    path = Path(path)
    try:
        obj = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}); a {what} must be UTF-8 JSON") from None
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore the {what} from its source") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a JSON {type(obj).__name__}, not the object a {what} must be")
    return obj


def load_config(folder) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a model folder needs the config.json that came with its weights")
    return read_json(path, "config.json")


def require_config(config: dict, folder, sizes=(), keys=()) -> None:
    """Fail before building a model when config.json lacks a key or a size is not a positive integer."""
    for key in (*sizes, *keys):
        if key not in config:
            raise ValueError(f"{Path(folder) / 'config.json'} has no {key!r}; is it the config.json of this model?")
    for key in sizes:
        if type(config[key]) is not int or config[key] <= 0:
            raise ValueError(f"{Path(folder) / 'config.json'}: {key} is {config[key]!r}, not a positive integer")


def check_file_name(name, source) -> str:
    """A file name that came from a server or an index must be a relative path that stays inside its folder:
    otherwise `folder / name` could be any file the user can write (an absolute path, '..', a drive letter)."""
    bad = (not isinstance(name, str) or not name or "\0" in name or "\\" in name or name.startswith("/")
           or re.match(r"[A-Za-z]:", name) or any(part in ("", ".", "..") for part in name.split("/")))
    if bad:
        raise ValueError(f"{source}: refusing file name {name!r}; only relative paths inside the model folder are "
                         "allowed (no absolute paths, '..', empty parts, backslashes or drive letters)")
    return name


def atomic_write(path, write):
    """write(f) into a temp file in the same folder, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it the usual permissions
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _no_duplicates(pairs):
    names = [k for k, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate names in the header: {sorted({n for n in names if names.count(n) > 1})[:5]}")
    return dict(pairs)


def _safetensors_header(f, path, file_size) -> tuple[int, dict]:
    """(header length, header) of an open safetensors file, its length checked against the file's size first."""
    if file_size < 8:
        raise ValueError(f"{path} is not a safetensors file: {file_size} bytes, too short for the header length")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > min(file_size - 8, MAX_HEADER_BYTES):
        raise ValueError(f"{path} is not a safetensors file, or truncated: its header claims {n} bytes, the file "
                         f"has {file_size - 8} after the length field")
    try:
        header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, duplicate names, absurd nesting
        raise ValueError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is a JSON {type(header).__name__}, not an object")
    return n, header


def _tensor_entry(name, info, path, data_size) -> tuple:
    """(begin, end, dtype, shape) of one header entry, each field checked: nothing is allocated from an unchecked
    size, so a few hundred crafted bytes can never claim gigabytes."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise ValueError(f"{where} is not an object with dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"{where} has dtype {dtype}; this reader supports only {', '.join(SAFETENSORS_DTYPES)}. "
                         "Convert the checkpoint to one of those first.")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise ValueError(f"{where} has shape {shape!r}; a shape is a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"{where} has data_offsets {offsets!r}; they must be [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    if end > data_size:
        raise ValueError(f"{where} ends at byte {end} of the data, which has only {data_size} bytes: the file is "
                         "truncated or corrupt; download it again")
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
    if end - begin != nbytes:
        raise ValueError(f"{where} spans {end - begin} bytes, its shape {shape} needs {nbytes}")
    return begin, end, SAFETENSORS_DTYPES[dtype], shape


def load_safetensors(path) -> dict:
    """Read a .safetensors file: u64 little-endian header size, a JSON header, then raw little-endian tensor bytes.
    Every malformed file raises a ValueError naming it, before any tensor memory is allocated."""
    assert sys.byteorder == "little", "safetensors data is little-endian; big-endian hosts are not supported"
    path, tensors = Path(path), {}
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        n, header = _safetensors_header(f, path, file_size)
        if not isinstance(header.pop("__metadata__", {}), dict):
            raise ValueError(f"{path}: __metadata__ in the safetensors header is not an object")
        entries = sorted(((_tensor_entry(name, info, path, file_size - 8 - n), name) for name, info in header.items()),
                         key=lambda e: e[0][:2])
        for ((_, end, _, _), name), ((begin, _, _, _), other) in zip(entries, entries[1:]):
            if begin < end:
                raise ValueError(f"{path}: tensors {name!r} and {other!r} overlap in the data section")
        for (begin, end, dtype, shape), name in entries:  # in file order: one sequential read
            f.seek(8 + n + begin)
            buf = bytearray(end - begin)  # one writable buffer per tensor: tensors own their memory, no warning
            if f.readinto(buf) != len(buf):
                raise ValueError(f"{path} is truncated (tensor {name!r}); download it again")
            t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            tensors[name] = t.reshape(shape)
    return tensors


def save_safetensors(tensors: dict, path, metadata: dict | None = None):
    """Write a .safetensors file (readable by the `safetensors` library), atomically."""
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, arrays, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in names:
            raise ValueError(f"tensor {name!r} is {t.dtype}; supported: {', '.join(map(str, names))}")
        data = t.reshape(-1).view(torch.uint8).numpy()  # raw bytes; numpy itself has no bfloat16
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + data.size]}
        arrays.append(data)
        offset += data.size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # like the reference writer: pad so the data starts 8-byte aligned

    def write(f):
        f.write(struct.pack("<Q", len(blob)) + blob)
        for a in arrays:
            f.write(a)
    atomic_write(path, write)


def read_index(index_path) -> dict:
    """The weight_map (tensor name -> shard file) of a model.safetensors.index.json, every shard name checked to
    be a file inside its folder."""
    weight_map = read_json(index_path, "model.safetensors.index.json").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path} has no weight_map object (tensor name -> shard file)")
    for shard in weight_map.values():
        check_file_name(shard, index_path)
    return weight_map


def load_bin(path) -> dict:
    """pytorch_model.bin is a pickle: weights_only=True lets torch rebuild tensors and plain containers and
    refuses anything else, so a crafted file cannot run code on load."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # refused pickle, truncated or non-zip file: torch's many error types
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a plain tensor checkpoint ({first_line}); it was not loaded") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return sd


def load_state_dict(folder) -> dict:
    """All weights of a checkpoint folder: model.safetensors, a sharded safetensors index, or pytorch_model.bin."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return load_safetensors(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map, sd = read_index(index), {}
        for shard in sorted(set(weight_map.values())):
            tensors = load_safetensors(folder / shard)
            if twice := sorted(sd.keys() & tensors.keys()):
                raise ValueError(f"{folder / shard} holds tensors another shard of {index} holds too: {twice[:5]}")
            sd.update(tensors)
        if missing := sorted(set(weight_map) - set(sd)):
            raise ValueError(f"{index} lists tensors that no shard holds: {missing[:5]}")
        return sd
    if (folder / "pytorch_model.bin").is_file():
        return load_bin(folder / "pytorch_model.bin")
    raise FileNotFoundError(f"no weights in {folder}: expected model.safetensors, model.safetensors.index.json "
                            "with its shards, or pytorch_model.bin")

# ------------------------------------------------------------------------------------------------------------- hub

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")  # tried in this order
OPTIONAL_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")  # read per call: tests override it


def hub_token(token=None):
    """token argument, else $HF_TOKEN, else the file `huggingface-cli login` writes."""
    if token or os.environ.get("HF_TOKEN"):
        return token or os.environ["HF_TOKEN"]
    saved = Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "token"
    return saved.read_text().strip() if saved.is_file() else None


def cache_root(cache_dir=None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser() / "unilora"
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "unilora"


def same_origin(url: str, other: str) -> bool:
    """Equal scheme, host and port: the unit a credential belongs to (the hub's CDN is another origin)."""
    def origin(u):
        s = urllib.parse.urlsplit(u)
        try:
            port = s.port
        except ValueError:  # a malformed port matches nothing
            return None
        return s.scheme.lower(), (s.hostname or "").lower(), port or {"http": 80, "https": 443}.get(s.scheme.lower())
    return origin(url) is not None and origin(url) == origin(other)


class _ScopedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows http(s) redirects, re-attaching the token only while they stay on the hub's origin, and keeps each
    redirect's URL and headers: the hub states an LFS file's size and sha256 on its redirect to the CDN."""

    def __init__(self):
        self.hops = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, f"redirect to a non-HTTP URL refused: {newurl}", headers, fp)
        self.hops.append((req.full_url, headers))
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        auth = req.unredirected_hdrs.get("Authorization")  # unredirected: urllib itself never forwards it
        if new is not None and auth and same_origin(newurl, hub_endpoint()):
            new.add_unredirected_header("Authorization", auth)
        return new


def download(url: str, dest, *, token=None, timeout: float = 60.0) -> Path:
    """Fetch url to dest unless dest exists; verified, then renamed into place, so dest is always a complete file.

    The token goes only to the hub's own origin (HF_ENDPOINT), whatever URL it is passed with. An interrupted
    download stays in dest.incomplete and is resumed only with If-Range on the ETag it came from, so a remote file
    that changed in between is fetched again from zero instead of being mixed with the old bytes. The result must
    have every size the server states (Content-Length, Content-Range, the hub's X-Linked-Size) and the sha256 the
    hub states for LFS files; a body whose end cannot be checked at all is refused."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part, tag = dest.with_name(dest.name + ".incomplete"), dest.with_name(dest.name + ".incomplete.etag")
    start, etag = _resumable(part, tag)
    try:
        resp, hops = _request(url, token, start, etag, timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # range not satisfiable: the partial is no prefix of the file; start over
            _discard(part, tag)
            return download(url, dest, token=token, timeout=timeout)
        raise
    with resp:
        start = _resume_point(resp, url, part, tag, start, etag)
        size, sha256 = _expected(resp, hops, url)
        if size is None and sha256 is None and not resp.chunked:
            _discard(part, tag)
            raise ConnectionError(f"{url}: the server states no length or checksum, so a cut-off transfer cannot be "
                                  "told apart from a complete one; refusing it. Fetch the file another way and pass "
                                  "its local path.")
        _remember_etag(resp, tag)
        _receive(resp, part, start, size, url, dest.name)
    _verify(part, tag, size, sha256, url)
    os.replace(part, dest)
    tag.unlink(missing_ok=True)
    return dest


def _discard(part: Path, tag: Path):
    part.unlink(missing_ok=True)
    tag.unlink(missing_ok=True)


def _resumable(part: Path, tag: Path):
    """(bytes already here, the ETag they came from); (0, None) when a partial cannot be safely continued."""
    etag = tag.read_text().strip() if tag.is_file() else ""
    if part.is_file() and part.stat().st_size and etag:
        return part.stat().st_size, etag
    _discard(part, tag)  # without its ETag, nothing proves the rest of the file is the same version
    return 0, None


def _request(url, token, start, etag, timeout):
    req = urllib.request.Request(url, headers={"User-Agent": "unilora-pretrained"})
    if start:
        req.add_header("Range", f"bytes={start}-")
        req.add_header("If-Range", etag)  # the server sends the whole file (200) if it is no longer this version
    if token and same_origin(url, hub_endpoint()):
        req.add_unredirected_header("Authorization", f"Bearer {token}")
    redirects = _ScopedRedirects()
    try:
        return urllib.request.build_opener(redirects).open(req, timeout=timeout), redirects.hops
    except urllib.error.HTTPError:
        raise
    except OSError as e:  # URLError, refused connection, timeout, DNS
        raise ConnectionError(f"cannot reach {url}: {getattr(e, 'reason', e)}") from e


def _resume_point(resp, url, part, tag, start, etag) -> int:
    """Where the response's bytes go: 0 for a whole file, `start` for a 206 whose Content-Range says exactly that."""
    if resp.status != 206:
        if start:
            print(f"{url} changed since the partial download (or the server ignores ranges): starting over",
                  file=sys.stderr)
        return 0
    rng = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", resp.headers.get("Content-Range", "").strip())
    if not start or not rng or int(rng[1]) != start or int(rng[2]) != int(rng[3]) - 1 or \
            resp.headers.get("ETag", etag) != etag:
        _discard(part, tag)
        raise ConnectionError(f"{url}: asked for bytes {start}- of version {etag}, the server sent Content-Range "
                              f"{resp.headers.get('Content-Range')!r} (ETag {resp.headers.get('ETag')}); the partial "
                              "download was discarded, run again to start over")
    return start


def _header_int(value, name, url):
    if not re.fullmatch(r"\s*\d+\s*", value):
        raise ConnectionError(f"{url}: the server sent an invalid {name} header {value!r}")
    return int(value)


def _expected(resp, hops, url):
    """(size, sha256) the finished file must have, None where no header states it. Sizes come from the response
    (Content-Range total, else Content-Length); the hub's own headers add X-Linked-Size and the sha256 of LFS files
    (X-Linked-Etag, or an ETag of 64 hex digits). Other origins' X-/ETag headers mean something else, so are ignored."""
    sizes, shas = set(), set()
    if resp.status == 206:
        sizes.add(int(resp.headers["Content-Range"].rsplit("/", 1)[1]))
    elif resp.headers.get("Content-Length") is not None:
        sizes.add(_header_int(resp.headers["Content-Length"], "Content-Length", url))  # a 200: the whole file
    for hop_url, headers in [*hops, (resp.url, resp.headers)]:
        if not same_origin(hop_url, hub_endpoint()):
            continue
        if headers.get("X-Linked-Size") is not None:
            sizes.add(_header_int(headers["X-Linked-Size"], "X-Linked-Size", url))
        for value in (headers.get("X-Linked-Etag"), headers.get("ETag")):
            if value and (m := re.fullmatch(r'\s*(?:W/)?"?([0-9a-fA-F]{64})"?\s*', value)):
                shas.add(m[1].lower())
    if len(sizes) > 1 or len(shas) > 1:
        raise ConnectionError(f"{url}: the server's headers contradict each other (sizes {sorted(sizes)}, sha256 "
                              f"{sorted(shas)}); refusing the download")
    return next(iter(sizes), None), next(iter(shas), None)


def _remember_etag(resp, tag: Path):
    """Keep the ETag next to the partial file: the only safe way to resume it later. Weak ETags cannot be used in
    If-Range, so without a strong one an interrupted download starts over."""
    etag = (resp.headers.get("ETag") or "").strip()
    if etag and not etag.startswith("W/"):
        atomic_write(tag, lambda f: f.write(etag.encode()))
    else:
        tag.unlink(missing_ok=True)


def _receive(resp, part: Path, start, size, url, label):
    try:
        with open(part, "ab" if start else "wb") as f, tqdm(total=size, initial=start, unit="B", unit_scale=True,
                                                            unit_divisor=1024, desc=label, disable=None) as bar:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
                if size is not None and f.tell() > size:
                    break  # _verify reports it; an endless body must not fill the disk
    except (OSError, HTTPException) as e:  # a cut connection (chunked bodies raise IncompleteRead), a timeout
        raise ConnectionError(f"download of {url} broke off ({e!r}); run again to resume from {part}") from e


def _verify(part: Path, tag: Path, size, sha256, url):
    got = part.stat().st_size
    if size is not None and got < size:  # the partial is kept (with its ETag) and resumed by the next call
        raise ConnectionError(f"download of {url} stopped at {got} of {size} bytes; run again to resume from {part}")
    if size is not None and got > size:
        _discard(part, tag)
        raise ConnectionError(f"download of {url} sent {got} bytes where its headers state {size}; it was discarded, "
                              "run again")
    if sha256 is not None and (actual := _sha256(part)) != sha256:
        _discard(part, tag)
        raise ConnectionError(f"download of {url} has sha256 {actual}, the hub states {sha256}; it was discarded. "
                              "Run again; if it repeats, something between you and the hub alters the file.")


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def missing_dirs(path) -> list[Path]:
    """path and its ancestors that do not exist yet, outermost first: what mkdir(parents=True) would create."""
    path, out = Path(path).absolute(), []
    while not path.exists():
        out.insert(0, path)
        path = path.parent
    return out


def remove_if_empty(folders) -> None:
    """Remove those of `folders` (outermost first, as missing_dirs gives them) that are empty, innermost first."""
    for folder in reversed(folders):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def resolve(name_or_path, files=None, *, revision: str = "main", cache_dir=None, token=None) -> Path:
    """A local folder as is; otherwise a hub repo id, downloaded once into the cache and reused offline.

    files=None fetches config.json, the weights (model.safetensors, else the sharded index and its shards, else
    pytorch_model.bin) and the tokenizer/generation files the repo has. A list fetches exactly those files.
    Every file name (given, or read from the index) must be a relative path inside the model folder."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return local
    repo = str(name_or_path)
    if not REPO_ID.fullmatch(repo) or ".." in repo:
        raise FileNotFoundError(f"{repo!r} is neither an existing folder nor a hub repo id like "
                                "'FacebookAI/roberta-base'")
    check_file_name(revision, "revision")
    for filename in files or ():
        check_file_name(filename, "resolve(files=...)")
    folder = cache_root(cache_dir) / repo.replace("/", "--") / revision.replace("/", "--")
    token = hub_token(token)
    created = missing_dirs(folder)  # a failed first download leaves no empty cache folders behind

    def fetch(filename, optional=False):
        url = f"{hub_endpoint()}/{repo}/resolve/{urllib.parse.quote(revision, safe='')}/{urllib.parse.quote(filename)}"
        try:
            return download(url, folder / filename, token=token)
        except urllib.error.HTTPError as e:
            if e.code == 404 and optional:
                return None
            if e.code in (401, 403):
                raise PermissionError(f"{url}: HTTP {e.code}. {repo} may be gated or private: accept its terms on "
                                      "the hub and set HF_TOKEN (or pass token=...).") from None
            if e.code == 404:
                raise FileNotFoundError(f"{url}: not found (404); check the repo id and revision {revision!r} "
                                        "(if a local folder was meant: it does not exist)") from None
            raise ConnectionError(f"{url}: HTTP {e.code} {e.reason}") from None

    try:
        if files is not None:
            for filename in files:
                fetch(filename)
        elif not (folder / ".complete").exists():
            fetch("config.json")
            for filename in WEIGHT_FILES:  # 404 -> try the next format
                if path := fetch(filename, optional=True):
                    if filename.endswith(".index.json"):
                        for shard in sorted(set(read_index(path).values())):  # all names checked first
                            fetch(shard)
                    break
            else:
                raise FileNotFoundError(f"{repo} has none of {', '.join(WEIGHT_FILES)}")
            for filename in OPTIONAL_FILES:
                fetch(filename, optional=True)
            (folder / ".complete").touch()
    except BaseException as e:
        remove_if_empty(created)
        if not isinstance(e, ConnectionError):
            raise
        raise ConnectionError(f"{e}\nIf the hub is unreachable: the cache {folder} has no complete copy of {repo}. "
                              "Without network, copy the model files (config.json, model.safetensors, tokenizer.json, "
                              "...) into a folder and pass its path instead of the repo id, e.g. "
                              "Encoder.from_pretrained('/path/to/roberta-base').") from e
    return folder


def _load_weights(model: nn.Module, sd: dict, dtype, folder):
    """Strict load into a model built on the meta device: every parameter must come from the checkpoint, in the
    shape config.json implies."""
    sd = {k: v for k, v in sd.items() if not k.endswith(("position_ids", "rotary_emb.inv_freq"))}  # derived buffers
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint in {folder} does not fit {type(model).__name__}: missing keys {missing[:10]}, "
                         f"unexpected keys {unexpected[:10]}. Is it the right model folder?")
    for name, t in expected.items():
        if sd[name].shape != t.shape:
            raise ValueError(f"checkpoint in {folder}: {name} has shape {tuple(sd[name].shape)}, its config.json "
                             f"implies {tuple(t.shape)}; the weights and config.json do not belong together")
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, assign=True)


def build_on_meta(cls, config, folder, **kwargs):
    """cls(config) on the meta device: no memory and no random init, since every parameter comes from the
    checkpoint. A config the model refuses is named by its file."""
    try:
        with torch.device("meta"):
            return cls(config, **kwargs)
    except ValueError as e:
        raise ValueError(f"{Path(folder) / 'config.json'}: {e}") from None


def _dtype(dtype):
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype  # accept "bfloat16" too

# ------------------------------------------------------------------------------------------------------- tokenizer
# Pure-Python reader for Hugging Face ``tokenizer.json`` files.
#
# The project may not depend on ``tokenizers``/``transformers``, yet fine-tuning and evaluation must see
# exactly the ids the pretrained checkpoints were trained with. This section re-implements the parts of
# the ``tokenizers`` pipeline used by WordPiece (BERT), byte-level BPE (GPT-2, RoBERTa, Llama-3, Qwen2,
# SmolLM) and SentencePiece-style BPE (Llama-2, Mistral) with the standard library only, and raises a
# ValueError naming any component it does not know rather than tokenizing differently.

# --- Unicode character classes ------------------------------------------------------------------
# Python's `re` has no \p{..}, and its \s/\w differ from Oniguruma's (Python counts U+001C-U+001F as
# space), so every class that tokenizers' regexes use is spelled out from unicodedata.
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
_CLASSES = {"d": ("Nd",), "w": ("L", "M", "Nd", "Pc", "Nl"), "punct": ("P",), "Mn": ("Mn",), "Letter": ("L",),
            "Mark": ("M",), "Number": ("N",), "Punctuation": ("P",), "Symbol": ("S",), "Separator": ("Z",)}
# Oniguruma's \w is Alphabetic + marks + decimal digits + connectors + Join_Control, and Alphabetic adds
# circled/squared letters (category So) to the letters; Rust's ASCII punctuation includes symbols like $+<=>.
_WORD_EXTRA = "\u200c\u200d" + "".join(chr(c) for lo, hi in ((0x24B6, 0x24E9), (0x1F130, 0x1F149), (0x1F150, 0x1F169),
                                                            (0x1F170, 0x1F189)) for c in range(lo, hi + 1))
_EXTRA = {"s": _WS, "w": _WORD_EXTRA, "punct": "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"}


@functools.lru_cache(maxsize=None)
def _category_runs():
    """(first, last, category) runs over all code points: built once, and only if a class is needed."""
    runs, prev, cat = [], None, unicodedata.category
    for cp in range(0x110000):
        c = cat(chr(cp))
        if c != prev:
            runs.append([cp, cp, c])
            prev = c
        else:
            runs[-1][1] = cp
    return runs


@functools.lru_cache(maxsize=None)
def _class_body(name: str, negate: bool, bmp: bool) -> str:
    """Character-class body (no brackets) for a general category or an Oniguruma shorthand."""
    cats = _CLASSES.get(name, () if name in _EXTRA else (name,))
    if any(len(c) > 2 or c[:1] not in "LMNPSZC" for c in cats):
        raise ValueError(f"unsupported regex class \\p{{{name}}}")
    ranges = sorted([(ord(c), ord(c)) for c in _EXTRA.get(name, "")] +
                    [(lo, hi) for lo, hi, c in _category_runs() if c in cats or c[0] in cats])
    merged = []
    for lo, hi in ranges:
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    if negate:
        edges = [-1] + [x for r in merged for x in r] + [0x110000]
        merged = [(edges[i] + 1, edges[i + 1] - 1) for i in range(0, len(edges), 2) if edges[i] + 1 < edges[i + 1]]
    top = 0xFFFF if bmp else 0x10FFFF
    return "".join(f"\\U{lo:08x}" + (f"-\\U{min(hi, top):08x}" if hi > lo else "") for lo, hi in merged if lo <= top)


_ONIG_TOKEN = re.compile(r"\\([pP])(?:\{(\^?)(\w+)\}|(\w))|\\([sSdDwW])|\\.|\[|\]")


def _translate(pattern: str, bmp: bool) -> str:
    """Oniguruma syntax (as stored in tokenizer.json) -> Python syntax."""
    depth = 0

    def convert(m):
        nonlocal depth
        if m.group(1):
            body = _class_body(m.group(3) or m.group(4), (m.group(1) == "P") != bool(m.group(2)), bmp)
        elif m.group(5):
            body = _class_body(m.group(5).lower(), m.group(5).isupper(), bmp)
        elif m.group() == "[":
            depth += 1
            return "[" if depth == 1 else ""  # Oniguruma nests classes as a union; Python would read '['
        elif m.group() == "]" and depth:
            depth -= 1
            return "" if depth else "]"
        else:
            return m.group()
        return body if depth else f"[{body}]"
    return _ONIG_TOKEN.sub(convert, pattern)


class _Regex:
    """A pattern compiled twice. Python tests the non-BMP ranges of a class one by one, which makes
    big Unicode classes slow; text without such characters (nearly all) uses the copy cut at U+FFFF."""

    def __init__(self, full: str, bmp: Optional[str] = None):
        self.full = re.compile(full)
        self.bmp = re.compile(bmp) if bmp and bmp != full else self.full
        self.groups = self.full.groups

    def __call__(self, s: str) -> "re.Pattern":
        return self.bmp if s.isascii() or max(s) < "\U00010000" else self.full


@functools.lru_cache(maxsize=None)
def _compile(pattern: str, group: bool = False) -> _Regex:
    """group=True wraps the pattern in a capturing group so that re.split also returns the matches."""
    full, bmp = _translate(pattern, False), _translate(pattern, True)
    return _Regex(f"({full})", f"({bmp})") if group else _Regex(full, bmp)


def _pattern(d: dict, group: bool = False) -> _Regex:
    if "String" in d:
        return _Regex(f"({re.escape(d['String'])})" if group else re.escape(d["String"]))
    return _compile(d["Regex"], group)


# --- byte-level alphabet and per-character normalization ----------------------------------------
# GPT-2's byte <-> printable-character table: printable Latin-1 bytes stand for themselves, the others
# are shifted to U+0100 and up.
_BYTE_TO_CHAR = {b: chr(b) for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255}
_BYTE_TO_CHAR.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in _BYTE_TO_CHAR)})
_TO_BYTE_CHARS = str.maketrans({chr(b): c for b, c in _BYTE_TO_CHAR.items()})
_FROM_BYTE_CHARS = {c: b for b, c in _BYTE_TO_CHAR.items()}


@functools.lru_cache(maxsize=1 << 16)
def _to_byte_chars(s: str) -> str:
    return (s if s.isascii() else s.encode("utf-8").decode("latin-1")).translate(_TO_BYTE_CHARS)


def _lower(s: str) -> str:
    # tokenizers lower-cases char by char: no final-sigma rule, which str.lower applies
    return "".join(map(str.lower, s)) if "\u03a3" in s else s.lower()


def _strip_marks(s: str, marks: str = "Mn") -> str:
    """BertNormalizer drops non-spacing marks; the StripAccents normalizer drops every mark."""
    return s if s.isascii() else _compile(rf"\p{{{marks}}}+")(s).sub("", s)


def _is_chinese(cp: int) -> bool:  # the CJK blocks BERT puts spaces around (0x2B920 is tokenizers' bound)
    return any(lo <= cp <= hi for lo, hi in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF),
                                            (0x2A700, 0x2B73F), (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF),
                                            (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


class _BertCleanup(dict):
    """str.translate table for BertNormalizer's per-character steps, filled in lazily."""

    def __init__(self, clean: bool, chinese: bool):
        super().__init__()
        self.clean, self.chinese = clean, chinese

    def __missing__(self, cp: int) -> str:
        c = out = chr(cp)
        if self.clean:  # controls (not unassigned code points) go first: U+0085 is dropped, not a space
            if cp in (0, 0xFFFD) or c not in "\t\n\r" and unicodedata.category(c) in ("Cc", "Cf", "Co"):
                out = ""
            elif c in _WS:
                out = " "
        if self.chinese and _is_chinese(cp):
            out = f" {c} "
        self[cp] = out
        return out


def _split(s: str, rx: _Regex, behavior: str, invert: bool = False):
    """Non-empty pieces of s around the matches of rx (grouped), as tokenizers' SplitDelimiterBehavior
    does, and whether the first piece starts at the beginning of s."""
    parts = rx(s).split(s)  # gap, match, gap, ..., gap
    if rx.groups > 1:
        parts = [p for i, p in enumerate(parts) if i % (rx.groups + 1) < 2]
    if behavior == "Isolated":
        return [p for p in parts if p], True
    if behavior == "Removed":
        first = next((i for i, p in enumerate(parts) if p), 0) % 2 == invert
        return [p for p in parts[1 if invert else 0::2] if p], first
    seq = [(p, (i % 2 == 1) != invert) for i, p in enumerate(parts) if p or i % 2]  # empty matches count
    backward = behavior == "MergedWithNext"
    out, prev = [], False
    for p, is_match in reversed(seq) if backward else seq:
        if out and is_match and (prev if behavior == "Contiguous" else not prev):
            out[-1] = p + out[-1] if backward else out[-1] + p
        else:
            out.append(p)
        prev = is_match
    return [p for p in (reversed(out) if backward else out) if p], True


# --- models --------------------------------------------------------------------------------------
class _Model:
    def __init__(self, d: dict):
        self.vocab, self.unk, self.cache = dict(d.get("vocab") or {}), d.get("unk_token"), {}

    def __call__(self, word: str) -> tuple:
        ids = self.cache.get(word)
        if ids is None:
            if len(self.cache) > 200_000:
                self.cache.clear()
            ids = self.cache[word] = tuple(self.tokenize(word))
        return ids

    def unk_id(self) -> int:
        if self.unk not in self.vocab:
            raise ValueError(f"unknown piece, and unk token {self.unk!r} is not in the vocabulary")
        return self.vocab[self.unk]


class _WordLevel(_Model):
    def tokenize(self, word):
        return [self.vocab[word] if word in self.vocab else self.unk_id()]


class _WordPiece(_Model):
    def __init__(self, d):
        super().__init__(d)
        self.prefix, self.max_chars = d.get("continuing_subword_prefix", "##"), d.get("max_input_chars_per_word", 100)

    def tokenize(self, word):
        if len(word) > self.max_chars:
            return [self.unk_id()]
        ids, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):  # greedy: longest known piece first
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
            else:
                return [self.unk_id()]
            start = end
        return ids


class _BPE(_Model):
    def __init__(self, d):
        super().__init__(d)
        if d.get("dropout"):
            raise ValueError("BPE dropout is not supported: it makes encoding random")
        self.prefix, self.suffix = d.get("continuing_subword_prefix") or "", d.get("end_of_word_suffix") or ""
        self.byte_fallback, self.fuse_unk = d.get("byte_fallback", False), d.get("fuse_unk", False)
        self.ignore_merges = d.get("ignore_merges", False)
        self.merges = {}  # (left id, right id) -> (rank, merged id)
        for rank, m in enumerate(d.get("merges") or []):
            a, b = m.split(" ") if isinstance(m, str) else m
            merged = a + b[len(self.prefix):]
            if not {a, b, merged} <= self.vocab.keys():
                raise ValueError(f"BPE merge {a!r} {b!r} uses a token missing from the vocabulary")
            self.merges.setdefault((self.vocab[a], self.vocab[b]), (rank, self.vocab[merged]))

    def tokenize(self, word):
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]
        ids, unk = [], None  # unk: a pending unknown run, emitted before the next known character
        for i, ch in enumerate(word):
            s = (self.prefix if i else "") + ch + (self.suffix if i == len(word) - 1 else "")
            if s in self.vocab:
                ids += ([unk] if unk is not None else []) + [self.vocab[s]]
                unk = None
                continue
            fallback = [self.vocab.get(f"<0x{b:02X}>") for b in s.encode("utf-8")] if self.byte_fallback else [None]
            if None not in fallback:
                ids += fallback  # tokenizers does not flush a pending unk here either
            elif self.unk is not None:
                if unk is not None and not self.fuse_unk:
                    ids.append(unk)
                unk = self.unk_id()
        return self._merge(ids + ([unk] if unk is not None else []))

    def _merge(self, ids):
        # Lowest rank first, leftmost on ties, skipping stale entries: the order tokenizers uses.
        n, merges = len(ids), self.merges
        nxt, prv, alive = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n
        todo = sorted(((merges[p][0], i, merges[p][1]) for i, p in enumerate(zip(ids, ids[1:])) if p in merges),
                      reverse=True)  # a queue kept in descending order: pop() gives the next merge
        while todo:
            _, i, new = todo.pop()
            j = nxt[i]
            if not alive[i] or j >= n or merges.get((ids[i], ids[j]), (0, None))[1] != new:
                continue
            ids[i], alive[j], k = new, False, nxt[j]
            nxt[i] = k
            if k < n:
                prv[k] = i
                if m := merges.get((new, ids[k])):
                    _insert_descending(todo, (m[0], i, m[1]))
            if prv[i] >= 0 and (m := merges.get((ids[prv[i]], new))):
                _insert_descending(todo, (m[0], prv[i], m[1]))
        return [t for t, a in zip(ids, alive) if a]


def _insert_descending(queue: list, item):
    lo, hi = 0, len(queue)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if queue[mid] > item else (lo, mid)
    queue.insert(lo, item)


# --- pipeline components built from tokenizer.json ----------------------------------------------
def _normalizer(d: dict):
    t = d["type"]
    if t == "BertNormalizer":
        table = _BertCleanup(d.get("clean_text", True), d.get("handle_chinese_chars", True))
        lower = d.get("lowercase", True)
        strip = lower if d.get("strip_accents") is None else d["strip_accents"]
        return lambda s: (_lower if lower else str)(
            _strip_marks(unicodedata.normalize("NFD", s.translate(table))) if strip else s.translate(table))
    if t in ("NFC", "NFD", "NFKC", "NFKD"):
        return lambda s: unicodedata.normalize(t, s)
    if t == "Strip":
        left, right = d.get("strip_left", True), d.get("strip_right", True)
        return lambda s: s.strip(_WS) if left and right else s.lstrip(_WS) if left else s.rstrip(_WS) if right else s
    if t == "Replace":
        rx, content = _pattern(d["pattern"]), d["content"]
        return lambda s: rx(s).sub(lambda m: content, s)
    if t == "Prepend":
        return lambda s: d["prepend"] + s if s else s
    if t == "StripAccents":
        return lambda s: _strip_marks(s, "M")
    return {"Lowercase": _lower, "ByteLevel": _to_byte_chars}.get(t)


def _splitter(rx: _Regex, behavior: str, invert: bool = False):
    """A pre-tokenizer: (pieces, whether pieces[0] starts the input) -> the same, split further."""
    if behavior not in ("Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"):
        raise ValueError(f"unsupported split behavior {behavior!r}")

    def f(state):
        out, first = [], state[1]
        for i, p in enumerate(state[0]):
            got, at0 = _split(p, rx, behavior, invert)
            first = first and at0 and bool(got) if i == 0 else first
            out += got
        return out, first
    return f


def _pre_tokenizer(d: dict):
    t = d["type"]
    if t == "ByteLevel":
        prefix, rx = d.get("add_prefix_space", True), d.get("use_regex", True) and _compile(
            r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+", True)  # GPT-2's

        def byte_level(state):
            out = []
            for s in state[0]:
                s = " " + s if prefix and not s.startswith(" ") else s  # every piece, as tokenizers does
                out += map(_to_byte_chars, _split(s, rx, "Isolated")[0] if rx else [s])
            return out, state[1]
        return byte_level
    if t == "Metaspace":
        rep, split = d.get("replacement", "\u2581"), d.get("split", True)
        scheme = d.get("prepend_scheme") or ("always" if d.get("add_prefix_space", True) else "never")

        def metaspace(state):
            out = []
            for i, s in enumerate(state[0]):
                s = s.replace(" ", rep)
                if (scheme == "always" or scheme == "first" and i == 0 and state[1]) and not s.startswith(rep):
                    s = rep + s
                out += _split(s, _pattern({"String": rep}, True), "MergedWithNext")[0] if split else [s]
            return out, state[1]
        return metaspace
    if t == "BertPreTokenizer":
        ws, punct = _splitter(_compile(r"\s", True), "Removed"), _splitter(_compile(r"\p{punct}", True), "Isolated")
        return lambda state: punct(ws(state))
    args = {"Split": lambda: (_pattern(d["pattern"], True), d["behavior"], d.get("invert", False)),
            "Digits": lambda: (_compile(r"\p{N}", True), "Isolated" if d.get("individual_digits") else "Contiguous"),
            "Whitespace": lambda: (_compile(r"\w+|[^\w\s]+", True), "Removed", True),
            "WhitespaceSplit": lambda: (_compile(r"\s", True), "Removed"),
            "Punctuation": lambda: (_compile(r"\p{punct}", True), d.get("behavior", "Isolated")),
            "CharDelimiterSplit": lambda: (_pattern({"String": d.get("delimiter", "")}, True), "Removed")}.get(t)
    return args and _splitter(*args())


def _post_processor(d: dict):
    """A post-processor: ([(ids, type_ids)] per input, add_special_tokens) -> the same; with .n_added(pair)."""
    t = d["type"]
    if t == "TemplateProcessing":
        specials = {k: v["ids"] for k, v in d.get("special_tokens", {}).items()}

        def template(seqs, add):
            ids, types = [], []
            for piece in d["pair" if len(seqs) == 2 else "single"]:
                (kind, p), = piece.items()
                new = seqs[p["id"] != "A"][0] if kind == "Sequence" else specials[p["id"]] if add else []
                ids += new
                types += [p["type_id"]] * len(new)
            return [(ids, types)]
        template.n_added = lambda pair: sum(len(specials[p["SpecialToken"]["id"]])
                                            for p in d["pair" if pair else "single"] if "SpecialToken" in p)
        return [template]
    if t in ("BertProcessing", "RobertaProcessing"):
        cls, sep, roberta = d["cls"][1], d["sep"][1], t == "RobertaProcessing"

        def bert(seqs, add):
            if not add:  # RoBERTa has a single token type, and says so even without specials
                return [(ids, [0] * len(ids)) for ids, _ in seqs] if roberta else seqs
            out = [([cls] + seqs[0][0] + [sep], [0] * (len(seqs[0][0]) + 2))]
            for b, _ in seqs[1:]:
                b = [sep] * roberta + b + [sep]
                out.append((b, [int(not roberta)] * len(b)))
            return out
        bert.n_added = lambda pair: (3 + roberta) if pair else 2
        return [bert]
    return [] if t == "ByteLevel" else None  # ByteLevel only trims offsets, which we do not report


def _decoder(d: dict):
    """A decoder: list of token strings -> list of strings (joined at the end)."""
    t = d["type"]
    if t == "ByteLevel":
        return lambda tokens: [b"".join(
            bytes(map(_FROM_BYTE_CHARS.__getitem__, tok)) if all(c in _FROM_BYTE_CHARS for c in tok)
            else tok.encode("utf-8") for tok in tokens).decode("utf-8", "replace")]
    if t == "WordPiece":
        prefix, cleanup = d.get("prefix", "##"), d.get("cleanup", True)
        fixes = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")] if cleanup else []

        def wordpiece(tokens):
            out = []
            for i, tok in enumerate(tokens):
                tok = (tok[len(prefix):] if tok.startswith(prefix) else " " + tok) if i else tok
                for a, b in fixes:  # per token, as tokenizers does
                    tok = tok.replace(a, b)
                out.append(tok)
            return out
        return wordpiece
    if t == "Metaspace":
        rep = d.get("replacement", "\u2581")
        first = (d.get("prepend_scheme") or ("always" if d.get("add_prefix_space", True) else "never")) != "never"
        return lambda tokens: [tok.replace(rep, "" if i == 0 and first else " ") for i, tok in enumerate(tokens)]
    if t == "Replace":
        rx, content = _pattern(d["pattern"]), d["content"]
        return lambda tokens: [rx(tok).sub(lambda m: content, tok) for tok in tokens]
    if t == "ByteFallback":
        return _byte_fallback
    if t == "Fuse":
        return lambda tokens: ["".join(tokens)]
    if t == "Strip":
        c, start, stop = d["content"], d.get("start", 0), d.get("stop", 0)
        return lambda tokens: [_strip(tok, c, start, stop) for tok in tokens]
    if t == "BPEDecoder":
        suffix = d.get("suffix", "</w>")
        return lambda tokens: [tok.replace(suffix, "" if i == len(tokens) - 1 else " ") for i, tok in enumerate(tokens)]
    return None


def _byte_fallback(tokens):
    out, pending = [], []
    for tok in tokens + [None]:
        if tok is not None and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            try:
                pending.append(int(tok[3:5], 16))
                continue
            except ValueError:
                pass
        if pending:
            try:
                out.append(bytes(pending).decode("utf-8"))
            except UnicodeDecodeError:  # tokenizers gives one U+FFFD per byte here
                out += ["\ufffd"] * len(pending)
            pending = []
        out += [] if tok is None else [tok]
    return out


def _strip(tok: str, c: str, start: int, stop: int) -> str:
    a, z = 0, len(tok)
    while a < min(start, z) and tok[a] == c:
        a += 1
    while len(tok) - z < stop and z > a and tok[z - 1] == c:
        z -= 1
    return tok[a:z]


def _truncate_longest_first(a: list, b: Optional[list], limit: int):
    """tokenizers' LongestFirst: the shorter input keeps what fits; if both are long they share `limit`."""
    if b is None or len(a) + len(b) <= limit:
        return a[:limit], b
    short = min(len(a), len(b))
    long_ = short if short > limit else max(short, limit - short)
    if short + long_ > limit:
        short, long_ = limit // 2, limit // 2 + limit % 2
    return (a[:long_], b[:short]) if len(a) > len(b) else (a[:short], b[:long_])


# --- the tokenizer -------------------------------------------------------------------------------
@dataclass
class Encoding:
    ids: list = field(default_factory=list)
    type_ids: list = field(default_factory=list)

    def __len__(self):
        return len(self.ids)


class Tokenizer:
    """Encodes and decodes exactly like `tokenizers.Tokenizer` for the components it supports."""

    def __init__(self, spec: dict):
        m = spec["model"]
        kind = m.get("type") or ("BPE" if "merges" in m else "WordPiece" if "max_input_chars_per_word" in m
                                 else "Unigram" if isinstance(m.get("vocab"), list) else "WordLevel")
        model = {"BPE": _BPE, "WordPiece": _WordPiece, "WordLevel": _WordLevel}.get(kind)
        self._model = model(m) if model else self._unsupported("model", kind)
        self._normalize = self._build(spec.get("normalizer"), "normalizer", _normalizer, "normalizers")
        self._pretok = self._build(spec.get("pre_tokenizer"), "pre-tokenizer", _pre_tokenizer, "pretokenizers")
        self._post = self._build(spec.get("post_processor"), "post-processor", _post_processor, "processors") or []
        self._decode = self._build(spec.get("decoder"), "decoder", _decoder, "decoders")
        self._added, self._special, raw, normalized = {}, set(), {}, {}
        self._id_to_token = {i: t for t, i in self._model.vocab.items()}
        vocab = self._model.vocab
        for t in spec.get("added_tokens") or []:
            content = t["content"]
            # tokenizers ignores the stored id: a known token keeps its id, a new one takes the next free id
            tid = self._added.get(content, vocab.get(content))
            if tid is None:
                top = max(self._added.values(), default=None)
                tid = len(vocab) if top is None or top < len(vocab) and vocab else top + 1
            self._added[content] = tid
            if t.get("special"):
                self._special.add(content)
            info = (tid, t.get("single_word", False), t.get("lstrip", False), t.get("rstrip", False))
            if t.get("normalized", not t.get("special")):  # looked for in normalized text, normalized itself
                content = self._normalize(content) if self._normalize else content
                normalized[content] = info
            else:
                raw[content] = info
            self._id_to_token[tid] = content  # tokenizers decodes a normalized token to its normalized form
        self._raw_added, self._norm_added = self._matcher(raw), self._matcher(normalized)
        self.vocab_size = max(self._id_to_token, default=-1) + 1  # embedding rows needed
        self.special_tokens = {}  # role ("bos", "eos", "pad", "unk", ...) -> token text; see from_pretrained
        self.pad_id = self.token_to_id((spec.get("padding") or {}).get("pad_token"))
        self.bos_id = self.eos_id = None

    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        data = read_json(path, "tokenizer.json")
        try:
            return cls(data)
        except ValueError as e:  # name the file in errors about its contents
            raise ValueError(f"{e} in {path}") from None

    @classmethod
    def from_pretrained(cls, folder) -> "Tokenizer":
        """tokenizer.json, plus the special-token roles from tokenizer_config.json / special_tokens_map.json."""
        folder = Path(folder)
        tok = cls.from_file(folder / "tokenizer.json")
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the latter wins, as in transformers
            path = folder / name
            for key, val in (read_json(path, name) if path.is_file() else {}).items():
                if key.endswith("_token") and val and isinstance(val, (str, dict)):
                    tok.special_tokens[key[:-6]] = val["content"] if isinstance(val, dict) else val
        for role in ("pad", "bos", "eos"):
            if role in tok.special_tokens:
                setattr(tok, f"{role}_id", tok.token_to_id(tok.special_tokens[role]))
        return tok

    def token_to_id(self, token: str) -> Optional[int]:
        return self._added.get(token, self._model.vocab.get(token))

    def id_to_token(self, i: int) -> Optional[str]:
        return self._id_to_token.get(i)

    def _unsupported(self, kind, name):
        raise ValueError(f"unsupported {kind} type {name!r}")

    def _build(self, d, kind, make, seq_key):
        if d is None:
            return None
        if d.get("type") == "Sequence":
            parts = [self._build(x, kind, make, seq_key) for x in d[seq_key]]
            if kind == "post-processor":
                return [p for ps in parts for p in ps]
            return lambda x: functools.reduce(lambda acc, f: f(acc), parts, x)
        built = make(d)
        return self._unsupported(kind, d.get("type")) if built is None else built

    @staticmethod
    def _matcher(tokens: dict):
        tokens = {k: v for k, v in tokens.items() if k}
        if not tokens:
            return None
        alternatives = sorted(tokens, key=len, reverse=True)  # leftmost-longest, like tokenizers' Aho-Corasick
        return re.compile("|".join(map(re.escape, alternatives))), tokens

    @staticmethod
    def _split_added(s: str, matcher):
        """[(text or None, added-token id or None, offset)]: s cut around the added tokens in it."""
        if matcher is None or not s:
            return [(s, None, 0)]
        rx, tokens = matcher
        out, pos, word = [], 0, _compile(r"\w")
        for m in rx.finditer(s):
            a, b = m.span()
            tid, single_word, lstrip, rstrip = tokens[m.group()]
            if single_word and (a and word(s).match(s, a - 1) or b < len(s) and word(s).match(s, b)):
                continue
            a = max(len(s[:a].rstrip(_WS)), pos) if lstrip else a
            b = len(s) - len(s[b:].lstrip(_WS)) if rstrip else b
            out += ([(s[pos:a], None, pos)] if a > pos else []) + [(None, tid, a)]
            pos = b
        return out + ([(s[pos:], None, pos)] if pos < len(s) else [])

    def _encode_sequence(self, text: str) -> list:
        ids, model = [], self._model
        for seg, tid, start in self._split_added(text, self._raw_added):
            if tid is not None:
                ids.append(tid)
                continue
            seg = self._normalize(seg) if self._normalize else seg
            for seg2, tid2, start2 in self._split_added(seg, self._norm_added):
                if tid2 is not None:
                    ids.append(tid2)
                elif seg2:
                    # Metaspace's prepend_scheme "first" needs to know whether a piece starts the input
                    pieces = self._pretok(([seg2], start == start2 == 0))[0] if self._pretok else [seg2]
                    for piece in pieces:
                        ids += model.cache.get(piece) or model(piece)
        return ids

    def encode(self, text: str, pair: Optional[str] = None, *, add_special_tokens: bool = True,
               max_length: Optional[int] = None) -> Encoding:
        """Token ids and type ids; max_length truncates longest-first, leaving room for the specials."""
        a = self._encode_sequence(text)
        b = None if pair is None else self._encode_sequence(pair)
        if max_length is not None:
            n_added = sum(p.n_added(b is not None) for p in self._post) if add_special_tokens else 0
            a, b = _truncate_longest_first(a, b, max(0, max_length - n_added))
        seqs = [(a, [0] * len(a))] + ([] if b is None else [(b, [1] * len(b))])
        for proc in self._post:
            seqs = proc(seqs, add_special_tokens)
        return Encoding([i for s in seqs for i in s[0]], [t for s in seqs for t in s[1]])

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        tokens = [t for t in map(self._id_to_token.get, ids)
                  if t is not None and not (skip_special_tokens and t in self._special)]
        return "".join(self._decode(tokens)) if self._decode else " ".join(tokens)

def pad(rows, value, left=False) -> torch.Tensor:
    """Token lists (ids, type ids, labels, or ones for a mask) -> one (B, longest) tensor filled with `value`.
    left=True pads in front, for generation: every row's new tokens then follow its prompt directly."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        start = width - len(r) if left else 0
        out[i, start:start + len(r)] = torch.tensor(r, dtype=torch.long)
    return out


# --------------------------------------------------------------------------------------------------------- encoder

def embedding(num: int, dim: int, padding_idx=None) -> nn.Embedding:
    """nn.Embedding, without its random init on the meta device (from_pretrained): the checkpoint supplies the
    weights, and a random normal_ on meta tensors imports torch._dynamo, seconds at every start-up."""
    on_meta = torch.empty(0).is_meta  # true inside `with torch.device("meta")`
    return nn.Embedding(num, dim, padding_idx=padding_idx, _weight=torch.empty(num, dim) if on_meta else None)


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh}


ENCODER_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings")
DECODER_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def head_count_check(c: dict):
    """Heads must split the hidden size (unless head_dim is given) and share the key/value heads evenly."""
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    if not c.get("head_dim") and c["hidden_size"] % heads:
        raise ValueError(f"hidden_size {c['hidden_size']} is not a multiple of num_attention_heads {heads}")
    if type(kv) is not int or kv <= 0 or heads % kv:
        raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")


class EncoderLayer(nn.Module):
    """Post-LayerNorm transformer block, nested exactly like Hugging Face's BertLayer (hence `attention.self`)."""

    def __init__(self, c):
        super().__init__()
        H, inner, eps = c["hidden_size"], c["intermediate_size"], c["layer_norm_eps"]
        self.n_heads, self.p_attn = c["num_attention_heads"], c.get("attention_probs_dropout_prob", 0.0)
        self.attention = nn.Module()
        self.attention.self = nn.ModuleDict({n: nn.Linear(H, H) for n in ("query", "key", "value")})
        self.attention.output = nn.ModuleDict({"dense": nn.Linear(H, H), "LayerNorm": nn.LayerNorm(H, eps=eps)})
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(H, inner)})
        self.output = nn.ModuleDict({"dense": nn.Linear(inner, H), "LayerNorm": nn.LayerNorm(H, eps=eps)})
        self.act = ACTIVATIONS[c["hidden_act"]]
        self.dropout = nn.Dropout(c.get("hidden_dropout_prob", 0.0))  # active only in train mode, as in HF

    def forward(self, x, mask):
        B, T, H = x.shape
        a = self.attention.self
        q, k, v = (lin(x).view(B, T, self.n_heads, -1).transpose(1, 2) for lin in (a.query, a.key, a.value))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p_attn if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, H)
        x = self.attention.output.LayerNorm(x + self.dropout(self.attention.output.dense(y)))
        h = self.output.dense(self.act(self.intermediate.dense(x)))
        return self.output.LayerNorm(x + self.dropout(h))


class Pooler(nn.Module):
    """BERT's pooler: tanh(dense(hidden state of the first token)). Only built when the checkpoint has it."""

    def __init__(self, H):
        super().__init__()
        self.dense = nn.Linear(H, H)

    def forward(self, hidden):
        return torch.tanh(self.dense(hidden[:, 0]))


class Encoder(nn.Module):
    """BERT or RoBERTa (config model_type). forward -> last hidden state (B, T, H)."""

    def __init__(self, config: dict, pooler: bool = False):
        super().__init__()
        c, H = config, config["hidden_size"]
        if c.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type {c['position_embedding_type']!r} is not supported "
                             "(only absolute)")
        if c["hidden_act"] not in ACTIVATIONS:
            raise ValueError(f"hidden_act {c['hidden_act']!r} is not supported ({', '.join(ACTIVATIONS)})")
        head_count_check(c)
        self.config, self.roberta = config, c["model_type"] == "roberta"
        self.embeddings = nn.ModuleDict({
            "word_embeddings": embedding(c["vocab_size"], H, padding_idx=c.get("pad_token_id")),
            "position_embeddings": embedding(c["max_position_embeddings"], H),
            "token_type_embeddings": embedding(c.get("type_vocab_size", 2), H),
            "LayerNorm": nn.LayerNorm(H, eps=c["layer_norm_eps"]),
            "dropout": nn.Dropout(c.get("hidden_dropout_prob", 0.0))})
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(EncoderLayer(c) for _ in range(c["num_hidden_layers"]))})
        self.pooler = Pooler(H) if pooler else None

    def position_ids(self, input_ids):
        if self.roberta:  # RoBERTa counts real tokens from padding_idx + 1; pads sit at padding_idx itself
            pad = self.config["pad_token_id"]
            real = input_ids.ne(pad).long()
            return real.cumsum(-1) * real + pad
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        e = self.embeddings
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = e.word_embeddings(input_ids) + e.token_type_embeddings(token_type_ids)
        x = e.dropout(e.LayerNorm(x + e.position_embeddings(self.position_ids(input_ids))))
        mask = None
        if attention_mask is not None:  # 0 -> a huge negative score; finfo.min rather than -inf keeps rows NaN-free
            mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=torch.float32):
        folder = resolve(name_or_path)
        config = load_config(folder)
        if config.get("model_type") not in ("bert", "roberta"):
            raise ValueError(f"{folder}: model_type {config.get('model_type')!r} is not supported by Encoder "
                             "(supported: bert, roberta)")
        require_config(config, folder, ENCODER_SIZES, ("hidden_act", "layer_norm_eps")
                       + (("pad_token_id",) if config["model_type"] == "roberta" else ()))
        sd = load_state_dict(folder)
        prefix = config["model_type"] + "."
        if any(k.startswith(prefix) for k in sd):  # a *ForMaskedLM/*ForPreTraining checkpoint: keep the base model,
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}  # drop its task heads
        # very old BERT checkpoints name LayerNorm parameters gamma/beta
        sd = {re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)): v
              for k, v in sd.items()}
        model = build_on_meta(cls, config, folder, pooler="pooler.dense.weight" in sd)
        _load_weights(model, sd, _dtype(dtype), folder)
        return model.eval()

# --------------------------------------------------------------------------------------------------------- decoder


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def normalized(self, x):  # the mean of squares in fp32 even for bf16 activations, as the reference models do
        h = x.float()
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        return self.weight * self.normalized(x).to(x.dtype)


class GemmaRMSNorm(RMSNorm):
    """Gemma stores the scale as an offset from 1 (so it starts at 0) and applies it in fp32 before casting back,
    where Llama casts first: in bf16 the two round differently, so each model gets its own."""

    def __init__(self, dim, eps):
        super().__init__(dim, eps)
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return (self.normalized(x) * (1.0 + self.weight.float())).to(x.dtype)


def rope_inv_freq(config: dict, head_dim: int, device=None):
    """RoPE frequencies, with the rope_scaling types we support. Computed in fp32 at every call: a buffer would
    be rounded by model.to(bfloat16) and is impossible on the meta device."""
    scaling = config.get("rope_parameters") or config.get("rope_scaling") or {}  # transformers 5 / 4 spellings
    theta = config.get("rope_theta") or scaling.get("rope_theta", 10000.0)
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":  # long wavelengths slowed by `factor`, short ones kept, the band between blended linearly
        s = scaling
        wavelen = 2 * math.pi / inv
        blend = ((s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"])
                 / (s["high_freq_factor"] - s["low_freq_factor"])).clamp(0, 1)
        inv = (1 - blend) * inv / s["factor"] + blend * inv
    elif kind != "default":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: default, linear, llama3)")
    return inv


def rotate(x, cos, sin):
    """RoPE in Hugging Face's layout: the two halves of each head (not interleaved pairs) form the rotated pairs."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Keys and values of all past positions, per layer, grown by concatenation (simple; fast enough)."""

    def __init__(self):
        self.keys, self.values = [], []

    def __len__(self):
        return self.keys[0].shape[2] if self.keys else 0

    def update(self, i, k, v):
        if i == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[i], self.values[i] = torch.cat([self.keys[i], k], 2), torch.cat([self.values[i], v], 2)
        return self.keys[i], self.values[i]


class Attention(nn.Module):
    def __init__(self, c, qkv_bias, o_bias):
        super().__init__()
        H, self.n_heads = c["hidden_size"], c["num_attention_heads"]
        self.n_kv = c.get("num_key_value_heads") or self.n_heads
        self.head_dim = c.get("head_dim") or H // self.n_heads
        self.q_proj = nn.Linear(H, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, H, bias=o_bias)

    def forward(self, x, cos, sin, mask, cache, i):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, -1, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(i, k, v)
        rep = self.n_heads // self.n_kv  # grouped-query attention: query head h reads key/value head h // rep
        y = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):  # gated: SwiGLU (Llama family) or GeGLU (Gemma)
    def __init__(self, c, bias, act):
        super().__init__()
        H, inner = c["hidden_size"], c["intermediate_size"]
        self.gate_proj, self.up_proj = nn.Linear(H, inner, bias=bias), nn.Linear(H, inner, bias=bias)
        self.down_proj = nn.Linear(inner, H, bias=bias)
        self.act = act

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c, qkv_bias, o_bias, mlp_bias, act, norm):
        super().__init__()
        self.self_attn, self.mlp = Attention(c, qkv_bias, o_bias), MLP(c, mlp_bias, act)
        self.input_layernorm = norm(c["hidden_size"], c["rms_norm_eps"])
        self.post_attention_layernorm = norm(c["hidden_size"], c["rms_norm_eps"])

    def forward(self, x, cos, sin, mask, cache, i):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, i)
        return x + self.mlp(self.post_attention_layernorm(x))


def gemma_activation(c: dict) -> str:
    """Gemma's MLP activation: hidden_activation where the config has it, else hidden_act. The original releases
    say "gelu" but were trained with the tanh approximation, so transformers reads "gelu" as tanh; so do we."""
    act = c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"
    return "gelu_pytorch_tanh" if act == "gelu" else act


class CausalLM(nn.Module):
    """Llama-family causal LM (llama, mistral, qwen2; SmolLM is llama) and Gemma. forward -> logits (B, T, V).

    Gemma differs in four places: RMSNorm scales by (1 + w) in fp32, the embeddings are multiplied by
    sqrt(hidden_size) (rounded to the activations' dtype, as the reference does), the MLP is GeGLU with the tanh
    GELU, and the head is tied to the embeddings unless the config says otherwise. head_dim comes from the config
    (256 for Gemma-7B, where 16 heads x 256 != hidden 3072)."""

    def __init__(self, config: dict):
        super().__init__()
        c, kind = config, config.get("model_type")
        if kind not in ("llama", "mistral", "qwen2", "gemma"):
            raise ValueError(f"model_type {kind!r} is not supported by CausalLM (supported: llama, mistral, qwen2, "
                             "gemma)")
        gemma = kind == "gemma"
        act = gemma_activation(c) if gemma else c.get("hidden_act", "silu")
        if act not in (ACTIVATIONS if gemma else ("silu",)):
            raise ValueError(f"hidden_act {act!r} is not supported for {kind} "
                             f"({', '.join(ACTIVATIONS) if gemma else 'Llama-family models use silu'})")
        if kind == "qwen2" and c.get("use_sliding_window"):
            raise ValueError("Qwen2 with use_sliding_window=true is not supported")
        head_count_check(c)
        self.config = config
        self.window = c.get("sliding_window") if kind == "mistral" else None
        self.embed_scale = c["hidden_size"] ** 0.5 if gemma else None
        bias = c.get("attention_bias", False)  # llama: one flag for q, k, v and o; qwen2: always on q, k, v only
        qkv_bias, o_bias = (True, False) if kind == "qwen2" else (bias, bias)
        norm = GemmaRMSNorm if gemma else RMSNorm
        rope_inv_freq(c, 2, device="cpu")  # fail now, not at the first forward, on an unsupported rope_scaling
        self.model = nn.Module()
        self.model.embed_tokens = embedding(c["vocab_size"], c["hidden_size"])
        self.model.layers = nn.ModuleList(
            DecoderLayer(c, qkv_bias, o_bias, c.get("mlp_bias", False), ACTIVATIONS[act], norm)
            for _ in range(c["num_hidden_layers"]))
        self.model.norm = norm(c["hidden_size"], c["rms_norm_eps"])
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        self.tied = bool(c.get("tie_word_embeddings", gemma))  # transformers' defaults: Gemma tied, the others not
        if self.tied:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, attention_mask=None, cache: KVCache | None = None, last_only: bool = False):
        """attention_mask covers cached and new tokens (B, past + T). last_only: logits of the last position only
        (generation needs no more, and (B, T, V) logits of a long prompt can take gigabytes)."""
        B, T = input_ids.shape
        dev, past = input_ids.device, len(cache) if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=dev)
        if attention_mask.shape[1] != past + T:
            raise ValueError(f"attention_mask has {attention_mask.shape[1]} columns; it must cover the {past} cached "
                             f"and {T} new tokens")
        keep = attention_mask.bool()
        # positions count real tokens only, so a left-padded row starts at 0 just like the same row unpadded
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        x = self.model.embed_tokens(input_ids)
        if self.embed_scale:
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        freqs = pos[..., None].float() * rope_inv_freq(self.config, self.model.layers[0].self_attn.head_dim, dev)
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, head_dim)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        q_idx = torch.arange(past, past + T, device=dev)[:, None]
        k_idx = torch.arange(past + T, device=dev)[None, :]
        allowed = (k_idx <= q_idx) & keep[:, None, :]  # causal and not padding: (B, T, past + T)
        if self.window:
            allowed &= q_idx - k_idx < self.window
        # A left-padding position would see no key at all; under fp16 autocast its finfo.min scores become -inf,
        # the softmax NaN, and 0 * NaN reaches the real rows. Letting it see itself keeps every row finite.
        allowed |= k_idx == q_idx
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=dev).masked_fill(~allowed, torch.finfo(x.dtype).min)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask[:, None], cache, i)
        x = self.model.norm(x)
        return self.lm_head(x[:, -1:] if last_only else x)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 32, eos_token_id=None):
        """Greedy decoding with a KV cache; rows may be left-padded (mask 0). Returns only the new tokens (B, N),
        N <= max_new_tokens. A row that produced EOS is filled with the pad id afterwards; decoding stops once
        every row has. eos_token_id: int or list; None -> the config's; [] -> never stop early."""
        eos = self.config.get("eos_token_id") if eos_token_id is None else eos_token_id
        eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), dtype=torch.long,
                           device=input_ids.device)
        pad = self.config.get("pad_token_id")
        pad = pad if pad is not None else (int(eos[0]) if len(eos) else 0)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        cache, out = KVCache(), []
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        logits = self(input_ids, mask, cache, last_only=True)[:, -1]
        for step in range(max_new_tokens):
            token = logits.argmax(-1).masked_fill(done, pad)
            out.append(token)
            done |= torch.isin(token, eos)
            if done.all() or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            logits = self(token[:, None], mask, cache, last_only=True)[:, -1]
        return torch.stack(out, 1) if out else input_ids.new_zeros(input_ids.shape[0], 0)

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=torch.float32):
        folder = resolve(name_or_path)
        config = load_config(folder)
        require_config(config, folder, DECODER_SIZES, ("rms_norm_eps",))
        model = build_on_meta(cls, config, folder)  # an unsupported config is reported before any weights are read
        sd = load_state_dict(folder)
        if model.tied:  # the checkpoint usually omits lm_head; tied means it is the embedding, whatever a file says
            sd["lm_head.weight"] = sd.get("model.embed_tokens.weight")
            if sd["lm_head.weight"] is None:
                del sd["lm_head.weight"]
        _load_weights(model, sd, _dtype(dtype), folder)
        if model.tied:  # loading with assign=True replaced the embedding Parameter: share it again
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.eval()

# ------------------------------------------------------------------------------------------ runs and command lines
# Shared by both training scripts, so that their flags and their run folders behave the same way.

def _number(kind, low, low_ok, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(value) or value < low or (value == low and not low_ok):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    parse.__name__ = what  # argparse names the type in its message
    return parse


positive_int = _number(int, 1, True, "a positive integer")
nonnegative_int = _number(int, 0, True, "an integer >= 0")
positive_float = _number(float, 0.0, False, "a finite number > 0")
nonnegative_float = _number(float, 0.0, True, "a finite number >= 0")


def device_name(text):
    """--device: "auto" (cuda when present, else cpu) or a torch device name."""
    try:
        text == "auto" or torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (auto, cpu, cuda, cuda:1, mps)") from None
    return text


def fraction(text):
    value = nonnegative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in [0, 1)")
    return value


MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "tokenizer.json")
RUN_FILES = ("results.json", "run.json", "adapter.pt", "checkpoint.pt", "predictions.jsonl", "summary.json")


def prepare_output_dir(folder, *, overwrite=False, flag="--output_dir") -> Path:
    """Make `folder` the place a run writes into, refusing any folder whose contents it could destroy.

    A model folder is always refused (its config.json and weights are never replaced); a folder holding a run
    is refused unless overwrite; so is a non-empty folder of anything else. Nothing is created on refusal.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SystemExit(f"{flag} {folder} is a file, not a folder.")
    present = set(os.listdir(folder)) if folder.is_dir() else set()
    if present & set(MODEL_FILES) - {"config.json"} or ("config.json" in present and not present & set(RUN_FILES)):
        raise SystemExit(f"{flag} {folder} holds a model; runs never write into a model folder. Pick another {flag}.")
    if present & set(RUN_FILES) and not overwrite:
        raise SystemExit(f"{flag} {folder} already holds a run; pass --overwrite to replace it, or pick another {flag}.")
    if present and not present & set(RUN_FILES):
        raise SystemExit(f"{flag} {folder} is not empty and holds no run of ours; pick an empty or new folder.")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def new_eval_dir(run_dir) -> Path:
    """A fresh folder beside the run's own files for an evaluation of a saved run: eval-1, eval-2, ..."""
    run_dir = Path(run_dir)
    n = 1
    while (run_dir / f"eval-{n}").exists():
        n += 1
    return run_dir / f"eval-{n}"


def finite_or_none(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def write_json(path, obj) -> None:
    """Atomic, and always valid JSON: a non-finite float is written as null (JSON has no NaN)."""
    text = json.dumps(finite_or_none(obj), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


class NonFiniteLoss(Exception):
    """Training diverged; raised before anything of the diverged state is saved."""


def check_finite(loss: float, step: int, hint: str = "lower --lr / --head_lr") -> None:
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"the loss became {loss} at step {step}: training diverged and was stopped; nothing of "
                            f"this step was saved. Try again with a smaller learning rate ({hint}).")


# -------------------------------------------------------------------------------------------------- data parallel
# `torchrun --nproc_per_node N script.py ...` starts N copies with RANK / WORLD_SIZE / LOCAL_RANK set; each copy
# trains on its share of every global batch, and one all-reduce per optimiser step sums the trainable gradients.
# A plain `python script.py` never touches torch.distributed.

@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def main(self) -> bool:  # the one copy that writes files, logs and progress bars
        return self.rank == 0


def start_data_parallel(device: str | None = "auto") -> Ranks:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA, one GPU per copy). device: a
    torch device name, or "auto"/None: cuda when present, else cpu. Not a device name, or a CUDA device on a
    machine without one: ValueError."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError as e:  # not a device name
        raise ValueError(f"--device {device}: {e}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA device; use --device cpu")
    if "WORLD_SIZE" not in os.environ:
        return Ranks(device=device)
    import torch.distributed as dist
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Ranks(rank, world, device)


def stop_data_parallel(ranks: Ranks, failed: bool = False) -> None:
    """Leave the process group: after a barrier, or at once when this copy failed (the others may be gone)."""
    if ranks.world > 1:
        import torch.distributed as dist
        if not failed:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def data_parallel_until_done(ranks: Ranks):
    """The block runs inside the process group; the group is left however the block ends."""
    try:
        yield ranks
    except BaseException:
        stop_data_parallel(ranks, failed=True)  # torchrun then stops the other copies
        raise
    stop_data_parallel(ranks)


def my_share(rows: list, ranks: Ranks) -> list:
    """Rows rank, rank + world, ...: every copy takes its turn through the same seeded order."""
    return rows[ranks.rank::ranks.world]


def gather_shares(share: list, ranks: Ranks) -> list:
    """Undo my_share: every copy's share, interleaved back into the original order (on every copy)."""
    if ranks.world == 1:
        return list(share)
    import torch.distributed as dist
    shares = [None] * ranks.world
    dist.all_gather_object(shares, list(share))
    return [shares[i % ranks.world][i // ranks.world] for i in range(sum(map(len, shares)))]


def sum_gradients(params: list, ranks: Ranks) -> None:
    """One all-reduce (sum) of every trainable gradient: what DistributedDataParallel does, without its buckets.

    A sum, not a mean: each copy divides its loss by the normaliser of the WHOLE global batch (its token or
    example count), so the summed gradient is the one-process gradient. A copy that had no rows adds zeros.
    """
    if ranks.world == 1:
        return
    import torch.distributed as dist
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p).clone()


def main_first(ranks: Ranks, step, *args, share=False):
    """step(*args) on the main copy first: it may download or write. Then the other copies run it too and find what
    it fetched in the cache, or (share=True) take the main copy's result, e.g. the run folder it prepared. If it
    fails on the main copy, that copy raises the error and every other copy exits quietly with status 1, instead
    of waiting forever for a step that will never come."""
    if ranks.world == 1:
        return step(*args)
    import torch.distributed as dist
    result = error = None
    if ranks.main:
        try:
            result = step(*args)
        except BaseException as e:
            error = e
    message = [error is not None, result if share and error is None else None]
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0]:
        raise SystemExit(1)
    return result if ranks.main else message[1] if share else step(*args)


def summed(value: float, ranks: Ranks) -> float:
    """A number summed over the copies, the same on every copy (one process: the number itself)."""
    if ranks.world == 1:
        return value
    import torch.distributed as dist
    total = torch.tensor([value], dtype=torch.float64, device=ranks.device)
    dist.all_reduce(total)
    return total.item()


@torch.no_grad()
def copy_from_main(params: list, ranks: Ranks) -> None:
    """Start every copy from the main copy's trainable values (they agree by seed; this makes it certain)."""
    if ranks.world > 1:
        import torch.distributed as dist
        for p in params:
            dist.broadcast(p.data, src=0)


# ---------------------------------------------------------------------------------------------------------- export


def save_peft_lora(adapter, folder, *, base_model_name_or_path=None, prefix="base_model.model.", task_type=None,
                   rename=None, overwrite=False):
    """Write a trained adapter as a PEFT LoRA folder (adapter_model.safetensors + adapter_config.json).

    The LoRA factors come from adapter.lora_state_dict(), with lora_alpha = r, so PEFT's scale alpha/r is 1 and its
    delta is exactly B @ A. The modules trained in full (adapter.config["keep_trainable"], e.g. a classifier head)
    are exported as PEFT's modules_to_save: their state dicts under "<prefix><module>.<key>", the layout PEFT's own
    loader maps back into its ModulesToSaveWrapper. Each module name becomes prefix + name, after `rename` replaced
    a leading part of it, so that it is the module's name inside the PEFT model: e.g. prefix "base_model.model."
    and rename={"encoder.": "roberta."} when a model holding our Encoder as `encoder` and a head as `classifier` is
    exported onto RobertaForSequenceClassification."""
    existing = [n for n in ("adapter_model.safetensors", "adapter_config.json") if (Path(folder) / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{folder} already holds {', '.join(existing)}; pass overwrite=True to replace them")
    loras = adapter.lora_state_dict()
    if not loras:
        raise ValueError("the adapter has no LoRA modules to export")
    config = getattr(adapter, "config", {})
    r, tensors = config.get("r"), {}

    def target_name(name):
        for old, new in (rename or {}).items():
            if name.startswith(old):
                return prefix + new + name[len(old):]
        return prefix + name
    for name, (A, B) in loras.items():
        if (r is not None and A.shape[0] != r) or B.shape[1] != A.shape[0]:
            raise ValueError(f"{name}: A {tuple(A.shape)} and B {tuple(B.shape)} are not rank-{r} LoRA factors")
        r = A.shape[0]
        tensors[f"{target_name(name)}.lora_A.weight"] = A.detach().float().contiguous()
        tensors[f"{target_name(name)}.lora_B.weight"] = B.detach().float().contiguous()
    heads = list(config.get("keep_trainable", []))
    for head in heads:
        tensors.update(_modules_to_save_tensors(adapter.root, head, loras, target_name(head)))
    folder = Path(folder)
    save_safetensors(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    peft_config = {"peft_type": "LORA", "r": r, "lora_alpha": r, "lora_dropout": 0.0, "bias": "none",
                   "target_modules": sorted({n.rsplit(".", 1)[-1] for n in loras}), "fan_in_fan_out": False,
                   "base_model_name_or_path": base_model_name_or_path, "task_type": task_type,
                   "inference_mode": True, "use_rslora": False,
                   "modules_to_save": [target_name(h).removeprefix(prefix) for h in heads] or None}
    write_json(folder / "adapter_config.json", peft_config)
    return folder


def _modules_to_save_tensors(root, head, loras, exported_name) -> dict:
    """A fully trained module's tensors, keyed as PEFT saves a modules_to_save entry: its state dict under the
    module's own name (PEFT drops the wrapper's 'modules_to_save.<adapter>' part on save and restores it on load)."""
    try:
        module = root.get_submodule(head)
    except AttributeError:
        raise ValueError(f"keep_trainable module {head!r} is not in the model; export the model it was trained "
                         "with") from None
    if any(n == head or n.startswith(head + ".") for n in loras):
        raise ValueError(f"{head!r} is trained in full and also holds LoRA layers; PEFT cannot express both")
    return {f"{exported_name}.{key}": t.detach().contiguous() for key, t in module.state_dict().items()}
