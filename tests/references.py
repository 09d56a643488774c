"""Independent references that several test files share, written from the formats' and models' definitions,
not captured from the code under test: a hand-rolled safetensors writer and parser (struct + json + numpy), tiny
BERT / RoBERTa / Llama-family checkpoints under Hugging Face's names, and float64 forwards with explicit loops.
(Equality with `transformers` itself is checked outside the project, since it may not be a dependency.)
"""
import contextlib
import json
import math
import os
import signal
import struct
import time

import numpy as np
import torch

torch.set_num_threads(1)


NP = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


def raw_bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: take the bit pattern
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def safetensors_bytes(tensors: dict, dtype_names=None, metadata=None) -> bytes:
    """A safetensors file assembled from the spec: u64 header length, JSON header, concatenated data."""
    names = dtype_names or {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
    header, data = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for k, t in tensors.items():
        b = raw_bytes(t)
        header[k] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [len(data), len(data) + len(b)]}
        data += b
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def write_by_hand(path, tensors: dict, **kw):
    path.write_bytes(safetensors_bytes(tensors, **kw))


def parse_by_hand(path):
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    meta = header.pop("__metadata__", None)
    out = {}
    for k, info in header.items():
        b = blob[8 + n + info["data_offsets"][0]: 8 + n + info["data_offsets"][1]]
        if info["dtype"] == "BF16":  # bf16 is the top half of a float32
            a = (np.frombuffer(b, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            a = np.frombuffer(b, NP[info["dtype"]])
        out[k] = (info["dtype"], a.reshape(info["shape"]))
    return out, meta, n


BERT = dict(model_type="bert", vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=24, max_position_embeddings=24, type_vocab_size=2, layer_norm_eps=1e-12,
            hidden_act="gelu", pad_token_id=0, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
ROBERTA = dict(BERT, model_type="roberta", type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5)


def encoder_weights(c, pooler=True, seed=0):
    """Random weights under Hugging Face's BertModel names, spelled out here independently of pretrained.py."""
    g = torch.Generator().manual_seed(seed)
    H, inner = c["hidden_size"], c["intermediate_size"]
    rnd = lambda *s: torch.randn(*s, generator=g) * (s[-1] ** -0.5 if len(s) == 2 else 0.3)  # noqa: E731
    sd = {"embeddings.word_embeddings.weight": torch.randn(c["vocab_size"], H, generator=g),
          "embeddings.position_embeddings.weight": torch.randn(c["max_position_embeddings"], H, generator=g),
          "embeddings.token_type_embeddings.weight": torch.randn(c["type_vocab_size"], H, generator=g),
          "embeddings.LayerNorm.weight": 1 + rnd(H), "embeddings.LayerNorm.bias": rnd(H)}
    for i in range(c["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        shapes = {"attention.self.query": (H, H), "attention.self.key": (H, H), "attention.self.value": (H, H),
                  "attention.output.dense": (H, H), "intermediate.dense": (inner, H), "output.dense": (H, inner)}
        for name, (o, n) in shapes.items():
            sd[p + name + ".weight"], sd[p + name + ".bias"] = rnd(o, n), rnd(o)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = 1 + rnd(H), rnd(H)
    if pooler:
        sd["pooler.dense.weight"], sd["pooler.dense.bias"] = rnd(H, H), rnd(H)
    return sd


def encoder_reference(sd, c, ids, mask, types=None):
    """float64 BERT/RoBERTa with explicit softmax and per-row position counting."""
    w = {k: v.double() for k, v in sd.items()}
    B, T = ids.shape
    H, nh, eps = c["hidden_size"], c["num_attention_heads"], c["layer_norm_eps"]
    d = H // nh
    if c["model_type"] == "roberta":  # real tokens numbered pad+1, pad+2, ...; pads get pad itself
        pad = c["pad_token_id"]
        pos = torch.tensor([[pad + sum(1 for t in row[:j + 1] if t != pad) if row[j] != pad else pad
                             for j in range(T)] for row in ids.tolist()])
    else:
        pos = torch.arange(T).repeat(B, 1)
    types = torch.zeros_like(ids) if types is None else types

    def ln(x, name):
        mu = x.mean(-1, keepdim=True)
        x = (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps)
        return x * w[name + ".weight"] + w[name + ".bias"]

    def lin(x, name):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    x = ln(w["embeddings.word_embeddings.weight"][ids] + w["embeddings.token_type_embeddings.weight"][types]
           + w["embeddings.position_embeddings.weight"][pos], "embeddings.LayerNorm")
    for i in range(c["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (lin(x, p + "attention.self." + n).view(B, T, nh, d) for n in ("query", "key", "value"))
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        s = s.masked_fill(mask[:, None, None, :] == 0, -math.inf)
        a = torch.exp(s - s.amax(-1, keepdim=True))
        y = torch.einsum("bhqk,bkhd->bqhd", a / a.sum(-1, keepdim=True), v).reshape(B, T, H)
        x = ln(x + lin(y, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        h = lin(x, p + "intermediate.dense")
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
        x = ln(x + lin(h, p + "output.dense"), p + "output.LayerNorm")
    return x


def save_model(folder, config, sd, fmt="safetensors"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if fmt == "safetensors":
        write_by_hand(folder / "model.safetensors", sd)
    else:
        torch.save(sd, folder / "pytorch_model.bin")
    return folder


LLAMA = dict(model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
             max_position_embeddings=64, hidden_act="silu", tie_word_embeddings=False, eos_token_id=2, pad_token_id=0)
DECODERS = {
    "llama-gqa-untied": LLAMA,
    "qwen2-bias-tied": dict(LLAMA, model_type="qwen2", tie_word_embeddings=True, num_key_value_heads=1),
    "llama-bias-mha-llama3-rope": dict(
        LLAMA, num_key_value_heads=4, attention_bias=True, mlp_bias=True, rope_theta=500.0,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
                      "original_max_position_embeddings": 16}),
    "mistral-window-3": dict(LLAMA, model_type="mistral", sliding_window=3),
    # Gemma: tied by default, head_dim from the config and unequal to hidden/heads (as in 7B: 16 x 256 != 3072),
    # one key/value head as in 2B; the original releases say "gelu" and mean the tanh approximation
    "gemma-mqa-head-dim": dict(model_type="gemma", vocab_size=50, hidden_size=32, intermediate_size=48,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                               rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64, hidden_act="gelu",
                               hidden_activation="gelu_pytorch_tanh", eos_token_id=1, pad_token_id=0,
                               bos_token_id=2),
    "gemma-legacy-gelu": dict(model_type="gemma", vocab_size=50, hidden_size=32, intermediate_size=48,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-6,
                              rope_theta=500.0, hidden_act="gelu", tie_word_embeddings=True, eos_token_id=1,
                              pad_token_id=0),
}


def is_gemma(c):
    return c["model_type"] == "gemma"


def tied(c):  # transformers' config defaults: Gemma ties its head to the embeddings, the Llama family does not
    return c.get("tie_word_embeddings", is_gemma(c))


def head_dim(c):
    return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]


def decoder_weights(c, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, inner, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = head_dim(c)
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    biased = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"} if c["model_type"] == "qwen2" else set()
    if c.get("attention_bias"):
        biased |= {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
    if c.get("mlp_bias"):
        biased |= {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    rnd = lambda *s: torch.randn(*s, generator=g) * (s[-1] ** -0.5 if len(s) == 2 else 0.3)  # noqa: E731
    scale = 0 if is_gemma(c) else 1  # Gemma stores its norm scales as offsets from 1
    sd = {"model.embed_tokens.weight": torch.randn(V, H, generator=g), "model.norm.weight": scale + rnd(H)}
    if not tied(c):
        sd["lm_head.weight"] = rnd(V, H)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj": (q, H), "self_attn.k_proj": (kv, H), "self_attn.v_proj": (kv, H),
                  "self_attn.o_proj": (H, q), "mlp.gate_proj": (inner, H), "mlp.up_proj": (inner, H),
                  "mlp.down_proj": (H, inner)}
        for name, shape in shapes.items():
            sd[p + name + ".weight"] = rnd(*shape)
            if name in biased:
                sd[p + name + ".bias"] = rnd(shape[0])
        sd[p + "input_layernorm.weight"], sd[p + "post_attention_layernorm.weight"] = scale + rnd(H), scale + rnd(H)
    return sd


def inv_freq_reference(c, hd):
    inv = [c["rope_theta"] ** (-2 * i / hd) for i in range(hd // 2)]
    s = c.get("rope_scaling")
    if s:  # Llama 3's piecewise rule, by wavelength
        old, lo, hi = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
        out = []
        for f in inv:
            wl = 2 * math.pi / f
            if wl < old / hi:  # short wavelengths: unchanged
                out.append(f)
            elif wl > old / lo:  # long wavelengths: slowed by factor
                out.append(f / s["factor"])
            else:  # in between: interpolate
                t = (old / wl - lo) / (hi - lo)
                out.append((1 - t) * f / s["factor"] + t * f)
        inv = out
    return torch.tensor(inv, dtype=torch.float64)


def decoder_reference(sd, c, ids, mask=None):
    """float64 Llama-family or Gemma forward: every (query, key) pair is allowed or not by explicit rules.
    Gemma, from its paper and reference code: norms scale by (1 + w), embeddings are multiplied by
    sqrt(hidden_size), the MLP is GeGLU with GELU's tanh form, the head is the embedding matrix."""
    w = {k: v.double() for k, v in sd.items()}
    B, T = ids.shape
    mask = torch.ones_like(ids) if mask is None else mask
    nh, nkv, H = c["num_attention_heads"], c["num_key_value_heads"], c["hidden_size"]
    hd, gemma = head_dim(c), is_gemma(c)
    inv = inv_freq_reference(c, hd)
    pos = torch.tensor([[sum(row[:j]) for j in range(T)] for row in mask.tolist()], dtype=torch.float64)

    def rope(x):  # x (B, T, heads, hd): pair j with j + hd/2, angle = position * inv[j]
        ang = pos[:, :, None, None] * inv
        a, b = x[..., :hd // 2], x[..., hd // 2:]
        return torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], -1)

    def norm(x, name):
        scale = 1 + w[name] if gemma else w[name]
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + c["rms_norm_eps"]) * scale

    def act(g):
        if gemma:
            return 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))
        return g / (1 + torch.exp(-g))  # SiLU

    def lin(x, name):
        return x @ w[name + ".weight"].T + (w[name + ".bias"] if name + ".bias" in w else 0)

    allowed = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for q in range(T):
            for k in range(q + 1):
                allowed[b, q, k] = bool(mask[b, k]) and (not c.get("sliding_window") or q - k < c["sliding_window"])
    x = w["model.embed_tokens.weight"][ids] * (math.sqrt(H) if gemma else 1)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, p + "input_layernorm.weight")
        q = rope(lin(h, p + "self_attn.q_proj").view(B, T, nh, hd))
        k = rope(lin(h, p + "self_attn.k_proj").view(B, T, nkv, hd))
        v = lin(h, p + "self_attn.v_proj").view(B, T, nkv, hd)
        kv_of = [j * nkv // nh for j in range(nh)]  # query head j reads key/value head j // (nh / nkv)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k[:, :, kv_of]) / math.sqrt(hd)
        s = s.masked_fill(~allowed[:, None], -math.inf)
        a = torch.exp(s - s.amax(-1, keepdim=True))
        a = torch.nan_to_num(a / a.sum(-1, keepdim=True))  # rows of padding queries attend to nothing
        y = torch.einsum("bhqk,bkhd->bqhd", a, v[:, :, kv_of]).reshape(B, T, nh * hd)
        x = x + lin(y, p + "self_attn.o_proj")
        h = norm(x, p + "post_attention_layernorm.weight")
        g = lin(h, p + "mlp.gate_proj")
        x = x + lin(act(g) * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    head = w["model.embed_tokens.weight"] if tied(c) else w["lm_head.weight"]
    return norm(x, "model.norm.weight") @ head.T


# ----------------------------------------------------------------------------- tokenizer fixtures

def bert_template(cls_id: int, sep_id: int) -> dict:
    """A BERT tokenizer.json post-processor: [CLS] A [SEP] (B [SEP]), the second segment typed 1."""
    cls = {"SpecialToken": {"id": "[CLS]", "type_id": 0}}
    sep = lambda t: {"SpecialToken": {"id": "[SEP]", "type_id": t}}
    return {"type": "TemplateProcessing",
            "single": [cls, {"Sequence": {"id": "A", "type_id": 0}}, sep(0)],
            "pair": [cls, {"Sequence": {"id": "A", "type_id": 0}}, sep(0), {"Sequence": {"id": "B", "type_id": 1}}, sep(1)],
            "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [cls_id], "tokens": ["[CLS]"]},
                               "[SEP]": {"id": "[SEP]", "ids": [sep_id], "tokens": ["[SEP]"]}}}


def byte_symbols() -> dict:
    """GPT-2's byte-level BPE alphabet: printable bytes stand for themselves, the others are shifted past 255
    so every byte has a visible symbol (space -> 'Ġ', newline -> 'Ċ')."""
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    shifted, out = 0, {}
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + shifted)
            shifted += 1
    return out


# ----------------------------------------------------------------------------- two processes on one folder

@contextlib.contextmanager
def paused_while_holding(first, lock):
    """Wait until process `first` holds the run folder (its pid in the lock file), stop it there (SIGSTOP) for the
    block, and let it go on after: a second run then meets a folder that is certainly in use."""
    while not lock.is_file() or lock.read_text() != f"{first.pid}\n":
        assert first.poll() is None, first.stderr.read()
        time.sleep(0.01)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(first.pid, signal.SIGCONT)
