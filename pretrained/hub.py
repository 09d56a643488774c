"""The Hugging Face hub client: resolve("FacebookAI/roberta-base") -> a local folder.

Why it exists: it replaces `huggingface_hub` for the few files a model needs. A file is downloaded once,
resumably and verified, into a cache that later calls reuse offline; the token goes to the hub's own origin only.

Cache layout (our own, simple): <root>/<org>--<name>/<revision>/<files>, where <root> is `cache_dir` if given,
else $HF_HUB_CACHE/unilora, else $HF_HOME/unilora, else ~/.cache/huggingface/unilora. A `.complete` marker is
written once every file of a default fetch is in place, so later calls need no network at all.
"""
import hashlib
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPException
from pathlib import Path

from tqdm import tqdm

from .files import atomic_write, check_file_name, read_index

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
