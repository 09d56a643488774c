"""Checkpoint files: config.json, safetensors (read and write), sharded indexes, pytorch_model.bin, and the
strict load of their tensors into a model built on the meta device.

Why it exists: the project depends on torch, numpy and tqdm only, so this replaces what `safetensors` and the
loading half of `transformers` would give. Every name, size and offset read from a file is checked before it is
used: a crafted checkpoint or index ends in a ValueError naming the file, never in a huge allocation, a write
outside the model folder or code run by an unpickler.
"""
import itertools
import json
import math
import os
import re
import struct
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

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
        obj = parse_json(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}); a {what} must be UTF-8 JSON") from None
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore the {what} from its source") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a JSON {type(obj).__name__}, not the object a {what} must be")
    return obj


# A \ud800-\udfff escape: only text holding one can decode to half a surrogate pair, so most text skips the check.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_json(text: str):
    """json.loads of text decoded from UTF-8, with the two inputs it dies of or lets through as ValueErrors: nesting
    deeper than Python's stack (a RecursionError), and a string holding half a surrogate pair (an escape
    \\ud800-\\udfff on its own), which json.loads accepts but no UTF-8 file can hold: it would fail when printed
    or saved."""
    try:
        obj = json.loads(text)
    except RecursionError:
        raise ValueError("arrays or objects nested too deeply to read") from None
    if _SURROGATE_ESCAPE.search(text) and _holds_surrogate(obj):
        raise ValueError("a string holds a lone surrogate escape (\\ud800-\\udfff), which no UTF-8 text can hold")
    return obj


def _holds_surrogate(obj) -> bool:
    """Whether a string in obj, a key included, holds a surrogate: json.loads joins the two halves of a pair into
    one character, so any left is alone. A loop, not recursion: obj may be nested as deep as json.loads allows."""
    todo = [obj]
    while todo:
        x = todo.pop()
        if isinstance(x, str):
            if _SURROGATE.search(x):
                return True
        elif isinstance(x, dict):
            todo += [*x.keys(), *x.values()]
        elif isinstance(x, list):
            todo += x
    return False


def load_config(folder, settings=None) -> dict:
    """config.json of a model folder. settings (e.g. encoder_settings) reads every value a model uses and raises a
    ValueError naming the key; this names the file too, before any weights are read."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a model folder needs the config.json that came with its weights")
    config = read_json(path, "config.json")
    if settings is not None:
        try:
            settings(config)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return config


REQUIRED = object()  # config_value's default for a key the file must hold
MAX_SIZE = 2**31  # far above any real model's sizes, and the product of two sizes stays within int64


def _is_int(v) -> bool:
    return type(v) is int  # bool is a subclass of int, and true is no size


def _is_number(v) -> bool:  # finite: json.loads accepts NaN and Infinity, and a huge int is no float
    return type(v) in (int, float) and -1e300 < v < 1e300


def _token_id(v, below) -> bool:
    return _is_int(v) and 0 <= v < below


# kind -> (the JSON type it has, its test given `below`, what an error says was expected)
_KINDS = {
    "size": ("number", lambda v, _: _is_int(v) and 0 < v < MAX_SIZE, "a positive integer"),
    "count": ("number", lambda v, _: _is_int(v) and 0 <= v < MAX_SIZE, "an integer >= 0"),
    "token id": ("number", _token_id, "a token id from 0 to {last}"),
    "token ids": ("number", lambda v, below: _token_id(v, below) or isinstance(v, list) and bool(v) and all(
        _token_id(x, below) for x in v), "a token id from 0 to {last}, or a non-empty list of them"),
    "positive": ("number", lambda v, _: _is_number(v) and v > 0, "a positive number"),
    "probability": ("number", lambda v, _: _is_number(v) and 0 <= v <= 1, "a number from 0 to 1"),
    "flag": ("boolean", lambda v, _: type(v) is bool, "true or false"),
    "name": ("string", lambda v, _: isinstance(v, str), "a string"),
    "char": ("string", lambda v, _: isinstance(v, str) and len(v) == 1, "a single character"),
    "object": ("object", lambda v, _: isinstance(v, dict), "an object"),
    "list": ("list", lambda v, _: isinstance(v, list), "a list"),
}


def config_value(config: dict, key: str, kind: str, default=REQUIRED, *, where="", below=MAX_SIZE, choices=()):
    """config[key], checked to be of `kind` (see _KINDS; token ids must be below `below`, a name one of `choices`
    when given). A missing or null key gives `default` unless it is REQUIRED. Otherwise a one-line ValueError names
    the key (after `where`, the JSON path of the object holding it), the value found and what was expected; the
    loaders prefix the file."""
    value = config.get(key)
    if value is None and default is not REQUIRED:
        return default
    json_type, test, expected = _KINDS[kind]
    ok = test(value, below) and (not choices or value in choices)
    expected = f"one of {', '.join(choices)}" if choices else expected.format(last=below - 1)
    if kind in ("size", "count") and _is_int(value) and value >= MAX_SIZE:
        expected += f" below {MAX_SIZE}"
    name = f"{where}.{key}" if where else key
    if key not in config:
        raise ValueError(f"{name} is missing; expected {expected}")
    if not ok:
        raise bad_value(name, value, expected, json_type)
    return value


def bad_value(name: str, value, expected: str, json_type=None) -> ValueError:
    """The error for a value a file holds: `name is <its JSON>; expected ...`, with the value's JSON type after it
    when json_type (the type expected) is given and the value has another (numbers and null speak for themselves)."""
    found = next((t for cls, t in ((bool, "boolean"), (str, "string"), (list, "list"), (dict, "object"))
                  if isinstance(value, cls)), None)
    note = f" ({'an' if found == 'object' else 'a'} {found})" if json_type and found not in (json_type, None) else ""
    return ValueError(f"{name} is {shown(value)}{note}; expected {expected}")


def shown(value) -> str:
    """A value as the JSON text a file holds, cut short: how errors quote it."""
    text = json.dumps(value, ensure_ascii=False, default=repr)  # NaN prints as NaN, as the file spells it
    return text if len(text) <= 60 else text[:57] + "..."


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
    """write(f) into a temp file in the same folder, then rename: a crash never leaves a half-written file. The temp
    is .<name>.<host>.<pid>.<random>.tmp, so a later write of the same file removes the temps of writers on this
    machine that were killed before their rename (kill -9, a power cut)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    host = os.uname().nodename if hasattr(os, "uname") else os.environ.get("COMPUTERNAME", "")
    prefix = f".{path.name}.{re.sub(r'[^A-Za-z0-9_.-]', '_', host)}."  # another machine's pids mean nothing here
    _remove_dead_temps(path.parent, prefix)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{prefix}{os.getpid()}.", suffix=".tmp")
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


def _remove_dead_temps(folder: Path, prefix: str):
    """Remove the temps <prefix><pid>.<random>.tmp whose writer is gone. Only POSIX can ask whether a pid lives
    without touching the process (os.kill(pid, 0); on Windows it would end it), so elsewhere they stay."""
    if os.name != "posix":
        return
    for name in os.listdir(folder):
        m = re.fullmatch(re.escape(prefix) + r"(\d+)\.\w+\.tmp", name)
        if m and not _pid_alive(int(m[1])):
            try:
                os.unlink(folder / name)
            except OSError:  # removed by another writer first, or not this user's to remove: the write goes on
                pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; a number too big for a pid is left alone
        pass
    return True


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


def _safetensors_entries(f, path) -> tuple[int, list]:
    """(where the data starts, [((begin, end, dtype, shape), name)] in file order) of an open safetensors file: the
    whole header checked (every entry, no overlaps) before any tensor is read."""
    file_size = os.fstat(f.fileno()).st_size
    n, header = _safetensors_header(f, path, file_size)
    if not isinstance(header.pop("__metadata__", {}), dict):
        raise ValueError(f"{path}: __metadata__ in the safetensors header is not an object")
    entries = sorted(((_tensor_entry(name, info, path, file_size - 8 - n), name) for name, info in header.items()),
                     key=lambda e: e[0][:2])
    for ((_, end, _, _), name), ((begin, _, _, _), other) in zip(entries, entries[1:]):
        if begin < end:
            raise ValueError(f"{path}: tensors {name!r} and {other!r} overlap in the data section")
    return 8 + n, entries


def safetensors_shapes(path) -> dict:
    """{name: shape} of a .safetensors file, from its checked header alone: no tensor is read."""
    with open(path, "rb") as f:
        return {name: torch.Size(shape) for (_, _, _, shape), name in _safetensors_entries(f, Path(path))[1]}


def iter_safetensors(path):
    """(name, tensor) of a .safetensors file one at a time, in file order: a caller that drops each tensor once used
    holds one at a time, never the file (loading into 4 bits). Every malformed file raises a ValueError naming it,
    before any tensor memory is allocated."""
    assert sys.byteorder == "little", "safetensors data is little-endian; big-endian hosts are not supported"
    path = Path(path)
    with open(path, "rb") as f:
        start, entries = _safetensors_entries(f, path)
        for (begin, end, dtype, shape), name in entries:  # in file order: one sequential read
            f.seek(start + begin)
            yield name, _read_tensor(f, end - begin, dtype, shape, f"{path} is truncated (tensor {name!r})")


def _read_tensor(f, nbytes, dtype, shape, truncated) -> torch.Tensor:
    """The next nbytes of f as a tensor. A function of its own, so that the generator above keeps no reference to
    the tensor it handed out: dropped by the caller, its memory is freed before the next one is read."""
    buf = bytearray(nbytes)  # one writable buffer per tensor: tensors own their memory, no warning
    if f.readinto(buf) != len(buf):
        raise ValueError(f"{truncated}; download it again")
    return (torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)).reshape(shape)


def load_safetensors(path) -> dict:
    """Read a .safetensors file: u64 little-endian header size, a JSON header, then raw little-endian tensor bytes.
    Every malformed file raises a ValueError naming it, before any tensor memory is allocated."""
    return dict(iter_safetensors(path))


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


def stream_state_dict(folder) -> tuple[dict, object]:
    """The weights of a checkpoint folder one at a time: ({name: shape} of every tensor, read from the headers
    alone, and an iterator of (name, tensor) pairs that reads them in file order). Holding only the tensor in hand,
    a caller checks the names and shapes first, then loads tensor by tensor. The files and checks of
    load_state_dict: model.safetensors, a sharded safetensors index, or pytorch_model.bin (a pickle, read whole)."""
    folder = Path(folder)
    index, weight_map = folder / "model.safetensors.index.json", {}
    if (folder / "model.safetensors").is_file():
        paths = [folder / "model.safetensors"]
    elif index.is_file():
        weight_map = read_index(index)
        paths = [folder / shard for shard in sorted(set(weight_map.values()))]
    elif (folder / "pytorch_model.bin").is_file():
        sd = load_bin(folder / "pytorch_model.bin")
        return {name: t.shape for name, t in sd.items()}, iter(sd.items())
    else:
        raise FileNotFoundError(f"no weights in {folder}: expected model.safetensors, model.safetensors.index.json "
                                "with its shards, or pytorch_model.bin")
    shapes = {}
    for path in paths:
        tensors = safetensors_shapes(path)
        if twice := sorted(shapes.keys() & tensors.keys()):
            raise ValueError(f"{path} holds tensors another shard of {index} holds too: {twice[:5]}")
        shapes.update(tensors)
    if missing := sorted(set(weight_map) - set(shapes)):
        raise ValueError(f"{index} lists tensors that no shard holds: {missing[:5]}")
    return shapes, itertools.chain.from_iterable(map(iter_safetensors, paths))  # keeps no tensor it handed out


def load_state_dict(folder) -> dict:
    """All weights of a checkpoint folder: model.safetensors, a sharded safetensors index, or pytorch_model.bin."""
    return dict(stream_state_dict(folder)[1])


def derived(name: str) -> bool:
    """Buffers a checkpoint may hold that the models compute themselves: never loaded."""
    return name.endswith(("position_ids", "rotary_emb.inv_freq"))


def check_fits(model: nn.Module, shapes: dict, folder):
    """The checks of a strict load, from names and shapes alone: every parameter of the model (built on the meta
    device) must come from the checkpoint, in the shape config.json implies, and nothing else may be there."""
    shapes = {k: v for k, v in shapes.items() if not derived(k)}
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint in {folder} does not fit {type(model).__name__}: missing keys {missing[:10]}, "
                         f"unexpected keys {unexpected[:10]}. Is it the right model folder?")
    for name, t in expected.items():
        if shapes[name] != t.shape:
            raise ValueError(f"checkpoint in {folder}: {name} has shape {tuple(shapes[name])}, its config.json "
                             f"implies {tuple(t.shape)}; the weights and config.json do not belong together")


def load_weights(model: nn.Module, sd: dict, dtype, folder):
    """Strict load into a model built on the meta device: every parameter must come from the checkpoint, in the
    shape config.json implies."""
    sd = {k: v for k, v in sd.items() if not derived(k)}
    check_fits(model, {k: v.shape for k, v in sd.items()}, folder)
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, assign=True)


def load_weights_one_by_one(model: nn.Module, tensors, dtype, skip=()):
    """load_weights for (name, tensor) pairs read one at a time (stream_state_dict), after check_fits: each tensor
    but those named in `skip` is put into its module (floating ones cast to dtype, assigned, as load_weights does)
    and dropped, so loading holds the model and one checkpoint tensor. A module may turn what it is given into its
    own state: NF4Linear quantizes a full-precision weight as it loads it."""
    for name, t in tensors:
        if not derived(name) and name not in skip:
            module, _, key = name.rpartition(".")
            t = t.to(dtype) if t.is_floating_point() else t
            model.get_submodule(module).load_state_dict({key: t}, strict=False, assign=True)
        del t  # before the next tensor is read


def build_on_meta(cls, config, folder, **kwargs):
    """cls(config) on the meta device: no memory and no random init, since every parameter comes from the
    checkpoint. A config the model refuses is named by its file."""
    try:
        with torch.device("meta"):
            return cls(config, **kwargs)
    except ValueError as e:
        raise ValueError(f"{Path(folder) / 'config.json'}: {e}") from None


def as_dtype(dtype):
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype  # accept "bfloat16" too


def embedding(num: int, dim: int, padding_idx=None) -> nn.Embedding:
    """nn.Embedding, without its random init on the meta device (from_pretrained): the checkpoint supplies the
    weights, and a random normal_ on meta tensors imports torch._dynamo, seconds at every start-up."""
    on_meta = torch.empty(0).is_meta  # true inside `with torch.device("meta")`
    return nn.Embedding(num, dim, padding_idx=padding_idx, _weight=torch.empty(num, dim) if on_meta else None)


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh}




def head_count_check(s: dict):
    """Heads must split the hidden size (unless head_dim is given) and share the key/value heads evenly. s holds
    values config_value checked; num_key_value_heads and head_dim are None or absent when the config has none."""
    heads, kv = s["num_attention_heads"], s.get("num_key_value_heads") or s["num_attention_heads"]
    if not s.get("head_dim") and s["hidden_size"] % heads:
        raise ValueError(f"hidden_size {s['hidden_size']} is not a multiple of num_attention_heads {heads}")
    if heads % kv:
        raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")


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
