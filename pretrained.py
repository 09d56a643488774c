"""Pretrained Hugging Face models without `transformers`: checkpoint files, hub downloads, BERT/RoBERTa, Llama.

Why this file exists: the project may depend only on torch, numpy and tqdm, yet its two training scripts
fine-tune real Hugging Face checkpoints (RoBERTa-style encoders on GLUE, Llama-family decoders on math).
This one module replaces the parts of `transformers`, `safetensors` and `huggingface_hub` that they need:

  files   - config.json, our own safetensors reader/writer, sharded indexes, pytorch_model.bin
  hub     - resolve("FacebookAI/roberta-base") -> a local folder (download once, resumable, cached, offline reuse)
  encoder - BERT / RoBERTa returning hidden states             (Encoder.from_pretrained)
  decoder - Llama / Mistral / Qwen2 / SmolLM with a KV cache    (CausalLM.from_pretrained, greedy generate)
  export  - save_peft_lora: a trained adapter as a PEFT LoRA folder that loads onto the transformers model

Module and parameter names are Hugging Face's (`encoder.layer.0.attention.self.query`,
`model.layers.0.self_attn.q_proj`, `lm_head`), so adapters target the usual names and exported weights line up.
Outputs were checked equal to `transformers` (fp32, within 1e-5) outside the project, which may not depend on it.

Hub cache layout (our own, simple): <root>/<org>--<name>/<revision>/<files>, where <root> is `cache_dir` if given,
else $HF_HUB_CACHE/unilora, else $HF_HOME/unilora, else ~/.cache/huggingface/unilora. A `.complete` marker is written
once every file of a default fetch is in place, so later calls need no network at all.
"""
import json
import math
import os
import re
import struct
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPException
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------------------- files

# Weights are F32/F16/BF16; the integer types are for buffers real checkpoints carry (e.g. BERT's I64 position_ids).
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def load_config(folder) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a model folder needs the config.json that came with its weights")
    return json.loads(path.read_text())


def _atomic_write(path, write):
    """Write through a temp file in the same folder, then rename: a crash never leaves a half-written file."""
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


def load_safetensors(path) -> dict:
    """Read a .safetensors file: u64 little-endian header size, a JSON header, then raw little-endian tensor bytes."""
    assert sys.byteorder == "little", "safetensors data is little-endian; big-endian hosts are not supported"
    path, tensors = Path(path), {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100_000_000:  # a real header is kilobytes; this guards against reading a non-safetensors file whole
            raise ValueError(f"{path} is not a safetensors file (header size {n})")
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):  # read sequentially
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}; this reader supports only "
                                 f"{', '.join(SAFETENSORS_DTYPES)}. Convert the checkpoint to one of those first.")
            begin, end = info["data_offsets"]
            nbytes = math.prod(info["shape"]) * dtype.itemsize
            if end - begin != nbytes:
                raise ValueError(f"{path}: tensor {name!r} spans {end - begin} bytes, its shape needs {nbytes}")
            f.seek(8 + n + begin)
            buf = bytearray(nbytes)  # one writable buffer per tensor: tensors own their memory, no warning
            if f.readinto(buf) != nbytes:
                raise ValueError(f"{path} is truncated (tensor {name!r}); download it again")
            t = torch.frombuffer(buf, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
            tensors[name] = t.reshape(info["shape"])
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
    _atomic_write(path, write)


def load_state_dict(folder) -> dict:
    """All weights of a checkpoint folder: model.safetensors, a sharded safetensors index, or pytorch_model.bin."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return load_safetensors(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        sd = {}
        for shard in sorted(set(weight_map.values())):
            sd.update(load_safetensors(folder / shard))
        if missing := sorted(set(weight_map) - set(sd)):
            raise ValueError(f"{index} lists tensors that no shard holds: {missing[:5]}")
        return sd
    if (folder / "pytorch_model.bin").is_file():  # weights_only: a .bin is a pickle, never run its code
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
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


def download(url: str, dest, *, token=None, timeout: float = 60.0) -> Path:
    """Fetch url to dest unless dest exists. Resumes dest.incomplete with an HTTP Range request; renames at the end."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".incomplete")
    start = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "unilora-pretrained"})
    if start:
        req.add_header("Range", f"bytes={start}-")
    if token:  # unredirected: the hub redirects big files to a CDN, which must not receive the token
        req.add_unredirected_header("Authorization", f"Bearer {token}")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # range not satisfiable: the partial file is stale, start over
            part.unlink()
            return download(url, dest, token=token, timeout=timeout)
        raise
    except OSError as e:  # URLError, refused connection, timeout, DNS
        raise ConnectionError(f"cannot reach {url}: {getattr(e, 'reason', e)}") from e
    with resp:
        if resp.status != 206:  # the server ignored our Range: it sends the whole file
            start = 0
        size = resp.headers.get("Content-Length")
        total = start + int(size) if size is not None else None
        try:
            with open(part, "ab" if start else "wb") as f, tqdm(total=total, initial=start, unit="B", unit_scale=True,
                                                                unit_divisor=1024, desc=dest.name, disable=None) as bar:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        except (OSError, HTTPException) as e:
            raise ConnectionError(f"download of {url} broke off ({e}); run again to resume from {part}") from e
    if total is not None and part.stat().st_size != total:
        raise ConnectionError(f"download of {url} stopped at {part.stat().st_size} of {total} bytes; "
                              f"run again to resume from {part}")
    os.replace(part, dest)
    return dest


def resolve(name_or_path, files=None, *, revision: str = "main", cache_dir=None, token=None) -> Path:
    """A local folder as is; otherwise a hub repo id, downloaded once into the cache and reused offline.

    files=None fetches config.json, the weights (model.safetensors, else the sharded index and its shards, else
    pytorch_model.bin) and the tokenizer/generation files the repo has. A list fetches exactly those files."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return local
    repo = str(name_or_path)
    if not REPO_ID.fullmatch(repo) or ".." in repo or ".." in revision:
        raise FileNotFoundError(f"{repo!r} is neither an existing folder nor a hub repo id like "
                                "'FacebookAI/roberta-base'")
    folder = cache_root(cache_dir) / repo.replace("/", "--") / revision.replace("/", "--")
    token = hub_token(token)

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
                        for shard in sorted(set(json.loads(path.read_text())["weight_map"].values())):
                            fetch(shard)
                    break
            else:
                raise FileNotFoundError(f"{repo} has none of {', '.join(WEIGHT_FILES)}")
            for filename in OPTIONAL_FILES:
                fetch(filename, optional=True)
            (folder / ".complete").touch()
    except ConnectionError as e:
        raise ConnectionError(f"{e}\nThe hub is unreachable and the cache {folder} has no complete copy of {repo}. "
                              "Without network, copy the model files (config.json, model.safetensors, tokenizer.json, "
                              "...) into a folder and pass its path instead of the repo id, e.g. "
                              "Encoder.from_pretrained('/path/to/roberta-base').") from e
    return folder


def _load_weights(model: nn.Module, sd: dict, dtype):
    """Strict load into a model built on the meta device: every parameter must come from the checkpoint."""
    sd = {k: v for k, v in sd.items() if not k.endswith(("position_ids", "rotary_emb.inv_freq"))}  # derived buffers
    expected = model.state_dict().keys()
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit {type(model).__name__}: missing keys {missing[:10]}, "
                         f"unexpected keys {unexpected[:10]}. Is it the right model folder?")
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, assign=True)


def _dtype(dtype):
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype  # accept "bfloat16" too

# --------------------------------------------------------------------------------------------------------- encoder

def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh}


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
        self.config, self.roberta = config, c["model_type"] == "roberta"
        self.embeddings = nn.ModuleDict({
            "word_embeddings": nn.Embedding(c["vocab_size"], H, padding_idx=c.get("pad_token_id")),
            "position_embeddings": nn.Embedding(c["max_position_embeddings"], H),
            "token_type_embeddings": nn.Embedding(c.get("type_vocab_size", 2), H),
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
        sd = load_state_dict(folder)
        prefix = config["model_type"] + "."
        if any(k.startswith(prefix) for k in sd):  # a *ForMaskedLM/*ForPreTraining checkpoint: keep the base model,
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}  # drop its task heads
        # very old BERT checkpoints name LayerNorm parameters gamma/beta
        sd = {re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)): v
              for k, v in sd.items()}
        with torch.device("meta"):  # no memory and no random init: every parameter comes from the checkpoint
            model = cls(config, pooler="pooler.dense.weight" in sd)
        _load_weights(model, sd, _dtype(dtype))
        return model.eval()

# --------------------------------------------------------------------------------------------------------- decoder


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):  # the mean of squares in fp32 even for bf16 activations, as the reference models do
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


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


class MLP(nn.Module):  # SwiGLU
    def __init__(self, c, bias):
        super().__init__()
        H, inner = c["hidden_size"], c["intermediate_size"]
        self.gate_proj, self.up_proj = nn.Linear(H, inner, bias=bias), nn.Linear(H, inner, bias=bias)
        self.down_proj = nn.Linear(inner, H, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c, qkv_bias, o_bias, mlp_bias):
        super().__init__()
        self.self_attn, self.mlp = Attention(c, qkv_bias, o_bias), MLP(c, mlp_bias)
        self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])

    def forward(self, x, cos, sin, mask, cache, i):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, i)
        return x + self.mlp(self.post_attention_layernorm(x))


class CausalLM(nn.Module):
    """Llama-family causal LM (llama, mistral, qwen2; SmolLM is llama). forward -> logits (B, T, V)."""

    def __init__(self, config: dict):
        super().__init__()
        c, kind = config, config.get("model_type")
        if kind not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"model_type {kind!r} is not supported by CausalLM (supported: llama, mistral, qwen2)")
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {c['hidden_act']!r} is not supported (Llama-family models use silu)")
        if kind == "qwen2" and c.get("use_sliding_window"):
            raise ValueError("Qwen2 with use_sliding_window=true is not supported")
        self.config = config
        self.window = c.get("sliding_window") if kind == "mistral" else None
        bias = c.get("attention_bias", False)  # llama: one flag for q, k, v and o; qwen2: always on q, k, v only
        qkv_bias, o_bias = (True, False) if kind == "qwen2" else (bias, bias)
        rope_inv_freq(c, 2, device="cpu")  # fail now, not at the first forward, on an unsupported rope_scaling
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.model.layers = nn.ModuleList(DecoderLayer(c, qkv_bias, o_bias, c.get("mlp_bias", False))
                                          for _ in range(c["num_hidden_layers"]))
        self.model.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        self.tied = bool(c.get("tie_word_embeddings", False))
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
        freqs = pos[..., None].float() * rope_inv_freq(self.config, self.model.layers[0].self_attn.head_dim, dev)
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, head_dim)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        q_idx = torch.arange(past, past + T, device=dev)[:, None]
        k_idx = torch.arange(past + T, device=dev)[None, :]
        allowed = (k_idx <= q_idx) & keep[:, None, :]  # causal and not padding: (B, T, past + T)
        if self.window:
            allowed &= q_idx - k_idx < self.window
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
        sd = load_state_dict(folder)
        with torch.device("meta"):
            model = cls(config)
        if model.tied:  # the checkpoint usually omits lm_head; tied means it is the embedding, whatever a file says
            sd["lm_head.weight"] = sd.get("model.embed_tokens.weight")
            if sd["lm_head.weight"] is None:
                del sd["lm_head.weight"]
        _load_weights(model, sd, _dtype(dtype))
        if model.tied:  # loading with assign=True replaced the embedding Parameter: share it again
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.eval()

# ---------------------------------------------------------------------------------------------------------- export


def save_peft_lora(adapter, folder, *, base_model_name_or_path=None, prefix="base_model.model.", task_type=None):
    """Write adapter.lora_state_dict() as a PEFT LoRA folder (adapter_model.safetensors + adapter_config.json).
    lora_alpha = r, so PEFT's scale alpha/r is 1 and its delta is exactly B @ A. prefix + module name must be
    the module's name inside the PEFT model: e.g. "base_model.model.roberta." when our Encoder's weights were
    adapted and the target is RobertaForSequenceClassification."""
    loras = adapter.lora_state_dict()
    if not loras:
        raise ValueError("the adapter has no LoRA modules to export")
    r = adapter.config.get("r") if hasattr(adapter, "config") else None
    tensors = {}
    for name, (A, B) in loras.items():
        if (r is not None and A.shape[0] != r) or B.shape[1] != A.shape[0]:
            raise ValueError(f"{name}: A {tuple(A.shape)} and B {tuple(B.shape)} are not rank-{r} LoRA factors")
        r = A.shape[0]
        tensors[f"{prefix}{name}.lora_A.weight"] = A.detach().float().contiguous()
        tensors[f"{prefix}{name}.lora_B.weight"] = B.detach().float().contiguous()
    folder = Path(folder)
    save_safetensors(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": r, "lora_dropout": 0.0, "bias": "none",
              "target_modules": sorted({n.rsplit(".", 1)[-1] for n in loras}), "fan_in_fan_out": False,
              "base_model_name_or_path": base_model_name_or_path, "task_type": task_type, "inference_mode": True,
              "use_rslora": False, "modules_to_save": None}
    _atomic_write(folder / "adapter_config.json", lambda f: f.write(json.dumps(config, indent=2).encode()))
    return folder
