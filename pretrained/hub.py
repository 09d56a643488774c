"""The Hugging Face hub client: resolve("FacebookAI/roberta-base") -> a local folder.

Why it exists: it replaces `huggingface_hub` for the few files a model needs. A file is downloaded once,
resumably and verified, into a cache that later calls reuse offline; the token goes to the hub's own origin only.

Cache layout (our own, simple): <root>/<org>--<name>/<revision>/<files>, where <root> is `cache_dir` if given,
else $HF_HUB_CACHE/unilora, else $HF_HOME/unilora, else ~/.cache/huggingface/unilora, and a '/' in a revision
becomes '--' too (cache_folder() escapes names that could be read two ways). A `.complete` marker is written once
every file of a default fetch is in place, so later calls need no network at all. One process at a time downloads
a given file: it holds an OS lock on `<file>.lock` beside it, and others wait, then use its result.
"""
import contextlib
import errno
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

if os.name == "nt":
    import msvcrt
    _LOCK, _TRY_LOCK, _UNLOCK = msvcrt.LK_LOCK, msvcrt.LK_NBLCK, msvcrt.LK_UNLCK
else:
    import fcntl
    _LOCK, _TRY_LOCK, _UNLOCK = fcntl.LOCK_EX, fcntl.LOCK_EX | fcntl.LOCK_NB, fcntl.LOCK_UN

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


def download(url: str, dest, *, token=None, timeout: float = 60.0, cache=None) -> Path:
    """Fetch url to dest unless dest exists; verified, then renamed into place, so dest is always a complete file.

    The token goes only to the hub's own origin (HF_ENDPOINT), whatever URL it is passed with. An interrupted
    download stays in dest.incomplete and is resumed only with If-Range on the ETag it came from, and only when the
    server's answer carries that same ETag, so a remote file that changed in between is fetched again from zero
    instead of being mixed with the old bytes. The result must have every size the server states (Content-Length,
    Content-Range, the hub's X-Linked-Size) and the sha256 the hub states for LFS files; a body whose end cannot be
    checked at all is refused. One process at a time downloads dest (an OS lock on dest.lock, held throughout):
    another one waits, then uses its file. `cache` is the folder dest lies in (resolve() passes the hub cache): no
    folder or file this writes below it may be a symbolic link, which could redirect the write anywhere."""
    dest = Path(dest)
    if dest.exists():
        return dest
    part, tag, lock = (dest.with_name(dest.name + end) for end in (".incomplete", ".incomplete.etag", ".lock"))
    _refuse_symlinks(dest, Path(cache) if cache is not None else dest.parent, (part, tag, lock))
    with _locked(lock, dest.name):
        if dest.exists():  # another process finished it while this one waited
            return dest
        checks = _transfer(url, part, tag, token, timeout, dest.name)
        if checks is None:  # the partial could not be continued and was discarded: once more, from zero
            checks = _transfer(url, part, tag, token, timeout, dest.name)
        _verify(part, tag, *checks, url)
        os.replace(part, dest)
        tag.unlink(missing_ok=True)
    return dest


def _transfer(url, part: Path, tag: Path, token, timeout, label):
    """Receive url into part, continuing the partial where that is safe: (size, sha256) the result must have, or
    None when the partial turned out not to continue this file and was discarded."""
    start, etag = _resumable(part, tag)
    try:
        resp, hops = _request(url, token, start, etag, timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # range not satisfiable: the partial is no prefix of the file; start over
            _discard(part, tag)
            return None
        raise
    with resp:
        start = _resume_point(resp, url, part, tag, start, etag)
        if start is None:
            return None
        size, sha256 = _expected(resp, hops, url)
        if size is None and sha256 is None and not resp.chunked:
            _discard(part, tag)
            raise ConnectionError(f"{url}: the server states no length or checksum, so a cut-off transfer cannot be "
                                  "told apart from a complete one; refusing it. Fetch the file another way and pass "
                                  "its local path.")
        _remember_etag(resp, tag)
        _receive(resp, part, start, size, url, label)
    return size, sha256


def _refuse_symlinks(dest: Path, root: Path, files=()):
    """No folder below root on the way to dest, nor dest or `files`, may be a symbolic link: one planted in a shared
    cache would send the download (or its partial, or its lock) to any file the user can write."""
    try:
        parts = dest.relative_to(root).parts
    except ValueError:
        raise ValueError(f"download(cache={str(root)!r}): {dest} is not inside that folder") from None
    on_the_way = [root.joinpath(*parts[:i]) for i in range(1, len(parts) + 1)]  # each folder below root, then dest
    for path in [*on_the_way, *files]:
        if path.is_symlink():
            raise _symlink_error(path)


def _symlink_error(path) -> PermissionError:
    return PermissionError(f"refusing to write through the symbolic link {path} in the download cache (it could "
                           "point anywhere); remove it, or pass another cache_dir=")


def _open_nofollow(path: Path, flags: int) -> int:
    """os.open for the files a download writes, never through a symbolic link (O_NOFOLLOW where the OS has it): the
    check before the download cannot see a link planted after it."""
    try:
        return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0), 0o666)
    except OSError:
        if path.is_symlink():
            raise _symlink_error(path) from None
        raise


@contextlib.contextmanager
def _locked(lock: Path, label):
    """Hold an exclusive OS lock on the file `lock` for the block. The OS drops a lock when its holder dies, so a
    killed download's lock is simply taken over. The holder removes the file before unlocking it; a waiter that then
    gets the lock of the removed file sees that `lock` is another file now, and tries again on that one."""
    while True:
        lock.parent.mkdir(parents=True, exist_ok=True)  # at each try: a failed resolve() removes empty folders
        fd = _open_nofollow(lock, os.O_RDWR | os.O_CREAT)
        try:
            _acquire(fd, lock, label)
            if _still_at(fd, lock):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # Windows cannot remove an open file: there it stays, unlocked
            lock.unlink()
        _os_lock(fd, _UNLOCK)
        os.close(fd)


def _still_at(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
    except FileNotFoundError:
        return False


def _acquire(fd: int, lock: Path, label):
    """Lock fd exclusively, waiting (and saying so) while another process holds it."""
    try:
        _os_lock(fd, _TRY_LOCK)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):  # e.g. ENOLCK: a file system without locks
            raise OSError(f"cannot lock {lock} ({e.strerror}): the download cache's file system has no file locks; "
                          "pass cache_dir= on one that has (a local disk)") from None
        print(f"waiting for another process to finish downloading {label} (it holds {lock})", file=sys.stderr)
        _os_lock(fd, _LOCK)


def _os_lock(fd: int, operation: int):
    """fcntl.flock on POSIX (a lock of the open file, so also between threads); msvcrt.locking of byte 0 on Windows,
    whose LK_LOCK gives up after 10 seconds: it is tried again for as long as the holder works."""
    if os.name != "nt":
        return fcntl.flock(fd, operation)
    os.lseek(fd, 0, os.SEEK_SET)
    while True:
        try:
            return msvcrt.locking(fd, operation, 1)
        except OSError as e:
            if operation != _LOCK or e.errno != errno.EDEADLOCK:
                raise


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


def _resume_point(resp, url, part, tag, start, etag):
    """Where the response's bytes go: 0 for a whole file, `start` for a 206 whose Content-Range says exactly that and
    whose ETag is the partial's. None for a 206 without that ETag (the partial is discarded): a server that ignores
    If-Range sends a new version's bytes as readily as the old one's, and only an equal strong ETag proves them the
    same version."""
    if resp.status != 206:
        if start:
            print(f"{url} changed since the partial download (or the server ignores ranges): starting over",
                  file=sys.stderr)
        return 0
    rng = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", resp.headers.get("Content-Range", "").strip())
    if not start or not rng or int(rng[1]) != start or int(rng[2]) != int(rng[3]) - 1:
        _discard(part, tag)
        raise ConnectionError(f"{url}: asked for bytes {start}- of version {etag}, the server sent Content-Range "
                              f"{resp.headers.get('Content-Range')!r} (ETag {resp.headers.get('ETag')}); the partial "
                              "download was discarded, run again to start over")
    if (got := (resp.headers.get("ETag") or "").strip()) != etag:
        print(f"{url}: the server sent the rest of the file with {f'ETag {got}' if got else 'no ETag'}, not the "
              f"partial download's ETag {etag}: starting over from zero", file=sys.stderr)
        _discard(part, tag)
        return None
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
    fd = _open_nofollow(part, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if start else os.O_TRUNC))
    try:
        with os.fdopen(fd, "ab" if start else "wb") as f, tqdm(total=size, initial=start, unit="B", unit_scale=True,
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


def cache_folder(repo: str, revision: str, cache_dir=None) -> Path:
    """<root>/<repo>/<revision>, each name one folder with '/' as '--'. A part of a name that could be read two ways
    (it holds '--' or '%', or starts or ends with '-') has its '-' and '%' percent-escaped, so no two names share a
    folder ('org--m' and 'org/m', 'refs--pr--1' and 'refs/pr/1'), while 'org/name' and 'main' keep the plain folder
    names earlier versions used."""
    def escape(part):
        if "--" in part or "%" in part or part.startswith("-") or part.endswith("-"):
            return part.replace("%", "%25").replace("-", "%2D")
        return part

    def folder_name(name):
        return "--".join(escape(part) for part in name.split("/"))
    return cache_root(cache_dir) / folder_name(repo) / folder_name(revision)


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
    folder = cache_folder(repo, revision, cache_dir)
    token = hub_token(token)
    created = missing_dirs(folder)  # a failed first download leaves no empty cache folders behind

    def fetch(filename, optional=False):
        url = f"{hub_endpoint()}/{repo}/resolve/{urllib.parse.quote(revision, safe='')}/{urllib.parse.quote(filename)}"
        try:
            return download(url, folder / filename, token=token, cache=cache_root(cache_dir))
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
            atomic_write(folder / ".complete", lambda f: None)  # a rename: never writes through a planted link
    except BaseException as e:
        remove_if_empty(created)
        if not isinstance(e, ConnectionError):
            raise
        raise ConnectionError(f"{e}\nIf the hub is unreachable: the cache {folder} has no complete copy of {repo}. "
                              "Without network, copy the model files (config.json, model.safetensors, tokenizer.json, "
                              "...) into a folder and pass its path instead of the repo id, e.g. "
                              "Encoder.from_pretrained('/path/to/roberta-base').") from e
    return folder
