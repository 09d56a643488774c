"""Tests for pretrained.py: offline and tiny, checked against independent references.

The references are written here from the formats' and models' definitions, not captured from the code under
test: a hand-rolled safetensors writer/parser (struct + json + numpy), float64 BERT/RoBERTa/Llama forwards with
explicit loops and softmax, greedy decoding by full recomputation, and a local HTTP server with Range support.
(Equality with `transformers` itself is checked outside the project, since it may not be a dependency.)
"""
import ast
import hashlib
import http.server
import io
import json
import math
import os
import pickle
import random
import re
import socket
import struct
import threading
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import pretrained as P

torch.set_num_threads(1)

# ------------------------------------------------------------------------------------ safetensors by hand

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


def test_reader_reads_a_hand_written_file(tmp_path):
    vals = [1.5, -2.0, 0.15625, 3.0e-3, 1024.0, -0.5]  # all exactly representable in bf16 except 3e-3
    f32 = torch.tensor(vals).reshape(2, 3)
    write_by_hand(tmp_path / "a.safetensors", {"w": f32, "h": f32.half(), "b": f32.bfloat16(),
                                               "i": torch.arange(4), "s": torch.tensor(7.0)})
    sd = P.load_safetensors(tmp_path / "a.safetensors")
    assert {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()} == {
        "w": (torch.float32, (2, 3)), "h": (torch.float16, (2, 3)), "b": (torch.bfloat16, (2, 3)),
        "i": (torch.int64, (4,)), "s": (torch.float32, ())}
    assert sd["w"].flatten().tolist() == [np.float32(v) for v in vals]
    assert sd["h"].flatten().tolist() == [float(np.float16(v)) for v in vals]
    b = sd["b"].flatten().tolist()
    assert b[:3] + b[4:] == [1.5, -2.0, 0.15625, 1024.0, -0.5]
    assert abs(sd["b"].flatten()[3].item() - 3e-3) < 3e-3 / 128  # bf16 keeps 8 significant bits
    assert sd["i"].tolist() == [0, 1, 2, 3] and sd["s"].item() == 7.0


def test_writer_output_parsed_by_hand(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"z.f32": torch.randn(3, 4, generator=g), "a.f16": torch.randn(5, generator=g).half(),
               "m.bf16": torch.randn(2, 2, 2, generator=g).bfloat16(), "t": torch.randn(4, 3, generator=g).T}
    P.save_safetensors(tensors, tmp_path / "w.safetensors", metadata={"format": "pt"})
    parsed, meta, n = parse_by_hand(tmp_path / "w.safetensors")
    assert meta == {"format": "pt"} and (8 + n) % 8 == 0  # data 8-byte aligned, like the reference writer
    assert {k: d for k, (d, _) in parsed.items()} == {"z.f32": "F32", "a.f16": "F16", "m.bf16": "BF16", "t": "F32"}
    for k, t in tensors.items():
        np.testing.assert_array_equal(parsed[k][1], t.float().numpy())
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # the temp file was renamed, none left over


def test_round_trip_keeps_dtype_shape_and_values(tmp_path):
    tensors = {"x": torch.randn(2, 3).bfloat16(), "y": torch.randn(7).half(), "e": torch.zeros(0, 5),
               "s": torch.tensor(2.5), "i": torch.tensor([[1, -2], [3, 4]])}
    P.save_safetensors(tensors, tmp_path / "r.safetensors")
    back = P.load_safetensors(tmp_path / "r.safetensors")
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t)


def test_unsupported_dtype_is_a_clear_error(tmp_path):
    write_by_hand(tmp_path / "f8.safetensors", {"w": torch.zeros(4, dtype=torch.uint8)},
                  dtype_names={torch.uint8: "F8_E4M3"})
    with pytest.raises(ValueError, match=r"'w' has dtype F8_E4M3.*supports only F32, F16, BF16"):
        P.load_safetensors(tmp_path / "f8.safetensors")
    with pytest.raises(ValueError, match="complex64"):
        P.save_safetensors({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()


def test_truncated_file_is_a_clear_error(tmp_path):
    write_by_hand(tmp_path / "t.safetensors", {"w": torch.ones(100)})
    blob = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(blob[:-10])
    with pytest.raises(ValueError, match="truncated"):
        P.load_safetensors(tmp_path / "t.safetensors")


def test_load_state_dict_reads_every_checkpoint_format(tmp_path):
    sd = {"a.weight": torch.randn(3, 2), "b.weight": torch.randn(4).half(), "c.bias": torch.randn(2).bfloat16()}
    (tmp_path / "single").mkdir()
    write_by_hand(tmp_path / "single/model.safetensors", sd)
    (tmp_path / "sharded").mkdir()
    write_by_hand(tmp_path / "sharded/model-00001-of-00002.safetensors", {"a.weight": sd["a.weight"]})
    write_by_hand(tmp_path / "sharded/model-00002-of-00002.safetensors", {k: sd[k] for k in ("b.weight", "c.bias")})
    (tmp_path / "sharded/model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors",
        "c.bias": "model-00002-of-00002.safetensors"}}))
    (tmp_path / "bin").mkdir()
    torch.save(sd, tmp_path / "bin/pytorch_model.bin")
    for folder in ("single", "sharded", "bin"):
        got = P.load_state_dict(tmp_path / folder)
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) and got[k].dtype == sd[k].dtype for k in sd)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        P.load_state_dict(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="config.json"):
        P.load_config(tmp_path / "empty")

# ------------------------------------------------------------------------------------ encoder


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


def test_bert_matches_float64_reference_with_padding_and_token_types(tmp_path):
    sd = encoder_weights(BERT)
    model = P.Encoder.from_pretrained(save_model(tmp_path / "bert", BERT, sd))
    ids = torch.tensor([[2, 7, 9, 11, 3, 5, 8], [2, 4, 6, 3, 0, 0, 0]])
    mask = (ids != 0).long()
    types = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 0, 0, 0]])
    out = model(ids, mask, types)
    ref = encoder_reference(sd, BERT, ids, mask, types)
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()].float(), atol=1e-5, rtol=0)
    w = {k: v.double() for k, v in sd.items()}
    pooled = torch.tanh(ref[:, 0] @ w["pooler.dense.weight"].T + w["pooler.dense.bias"])
    torch.testing.assert_close(model.pooler(out), pooled.float(), atol=1e-5, rtol=0)
    assert not model.training  # from_pretrained returns eval mode (dropout off), as transformers does


def test_roberta_position_ids_and_padding(tmp_path):
    sd = encoder_weights(ROBERTA, pooler=False)
    model = P.Encoder.from_pretrained(save_model(tmp_path / "roberta", ROBERTA, sd))
    assert model.pooler is None
    ids = torch.tensor([[0, 5, 6, 7, 2], [0, 9, 2, 1, 1]])
    assert model.position_ids(ids).tolist() == [[2, 3, 4, 5, 6], [2, 3, 4, 1, 1]]
    mask = (ids != 1).long()
    out = model(ids, mask)
    ref = encoder_reference(sd, ROBERTA, ids, mask)
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()].float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, :3], model(ids[1:, :3])[0], atol=1e-5, rtol=0)  # padding changes nothing


def test_prefixed_checkpoints_with_heads_and_legacy_names(tmp_path):
    sd = encoder_weights(ROBERTA, pooler=False)
    plain = P.Encoder.from_pretrained(save_model(tmp_path / "plain", ROBERTA, sd))
    mlm = {"roberta." + k: v for k, v in sd.items()}
    mlm.update({"lm_head.dense.weight": torch.randn(16, 16), "lm_head.bias": torch.randn(40),
                "roberta.embeddings.position_ids": torch.arange(24)[None]})  # a head and a harmless buffer
    prefixed = P.Encoder.from_pretrained(save_model(tmp_path / "mlm", ROBERTA, mlm))
    assert prefixed.state_dict().keys() == plain.state_dict().keys()
    ids = torch.tensor([[0, 4, 5, 2]])
    torch.testing.assert_close(prefixed(ids), plain(ids), atol=0, rtol=0)
    bsd = encoder_weights(BERT)  # old BERT .bin: 'bert.' prefix, LayerNorm gamma/beta
    old = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in bsd.items()}
    model = P.Encoder.from_pretrained(save_model(tmp_path / "old", BERT, old, fmt="bin"))
    torch.testing.assert_close(model(ids), encoder_reference(bsd, BERT, ids, torch.ones_like(ids)).float(),
                               atol=1e-5, rtol=0)


def test_hugging_face_names_and_strict_loading(tmp_path):
    sd = encoder_weights(BERT)
    names = {n for n, _ in P.Encoder.from_pretrained(save_model(tmp_path / "ok", BERT, sd)).named_modules()}
    assert {"embeddings.word_embeddings", "encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense",
            "encoder.layer.0.attention.output.dense", "encoder.layer.0.intermediate.dense", "pooler.dense"} <= names
    missing = {k: v for k, v in sd.items() if k != "encoder.layer.1.attention.self.key.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['encoder.layer.1.attention.self.key.bias'\]"):
        P.Encoder.from_pretrained(save_model(tmp_path / "missing", BERT, missing))
    extra = dict(sd, **{"encoder.layer.0.adapter.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"unexpected keys \['encoder.layer.0.adapter.weight'\]"):
        P.Encoder.from_pretrained(save_model(tmp_path / "extra", BERT, extra))
    with pytest.raises(ValueError, match="model_type 'distilbert' is not supported"):
        P.Encoder.from_pretrained(save_model(tmp_path / "distil", dict(BERT, model_type="distilbert"), sd))

# ------------------------------------------------------------------------------------ decoder


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


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    out = {}
    for name, c in DECODERS.items():
        sd = decoder_weights(c)
        out[name] = (P.CausalLM.from_pretrained(save_model(tmp_path_factory.mktemp(name), c, sd)), sd, c)
    return out


@pytest.mark.parametrize("name", list(DECODERS))
def test_causal_lm_matches_float64_reference(decoders, name):
    model, sd, c = decoders[name]
    ids = torch.tensor([[5, 9, 13, 7, 22, 31, 4, 8, 17], [0, 0, 0, 11, 3, 44, 6, 9, 10]])
    mask = torch.tensor([[1] * 9, [0, 0, 0] + [1] * 6])
    out = model(ids, mask)
    ref = decoder_reference(sd, c, ids, mask)
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()].float(), atol=2e-5, rtol=0)
    if tied(c):
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_kv_cache_decoding_equals_uncached(decoders):
    for model, _, _ in decoders.values():
        ids = torch.tensor([[5, 9, 13, 7, 22, 31, 4, 8], [0, 0, 12, 11, 3, 44, 6, 9]])
        mask = (torch.arange(8) >= torch.tensor([[0], [2]])).long()
        full = model(ids, mask)
        cache = P.KVCache()
        steps = [model(ids[:, :4], mask[:, :4], cache)]  # a prefill, then one token at a time
        for t in range(4, 8):
            steps.append(model(ids[:, t:t + 1], mask[:, :t + 1], cache))
        assert len(cache) == 8
        torch.testing.assert_close(torch.cat(steps, 1)[mask.bool()], full[mask.bool()], atol=1e-5, rtol=0)


def greedy_reference(sd, c, prompt, n, eos=None):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(decoder_reference(sd, c, torch.tensor([ids]))[0, -1].argmax()))
        if ids[-1] == eos:
            break
    return ids[len(prompt):]


def test_left_padded_batch_generation_equals_per_row(decoders):
    model, sd, c = decoders["llama-gqa-untied"]
    prompts = [[5, 9, 13, 7, 22], [11, 3], [40, 41, 42, 43]]
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    batch = model.generate(ids, mask, max_new_tokens=6, eos_token_id=[])
    assert batch.shape == (3, 6)
    for row, p in zip(batch.tolist(), prompts, strict=True):
        assert row == model.generate(torch.tensor([p]), max_new_tokens=6, eos_token_id=[])[0].tolist()
        assert row == greedy_reference(sd, c, p, 6)  # and greedy by full float64 recomputation


def test_no_attention_row_is_fully_masked_with_left_padding(decoders):
    """A fully masked row is -inf everywhere once fp16 autocast rounds finfo(fp32).min, so its softmax is NaN and
    0 * NaN reaches the real rows (on CUDA): every query, padding included, must see at least one key."""
    model, _, _ = decoders["llama-gqa-untied"]
    seen = []
    hook = model.model.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[3]))
    ids, mask = torch.tensor([[0, 0, 0, 5, 9], [4, 5, 6, 7, 8]]), torch.tensor([[0, 0, 0, 1, 1], [1] * 5])
    model(ids, mask)
    hook.remove()
    allowed = seen[0] == 0
    assert allowed.any(-1).all()
    # and the real rows still see exactly the causal, non-padding keys
    assert allowed[0, 0, 3:, :3].sum() == 0 and allowed[0, 0, 4].tolist() == [False, False, False, True, True]


def test_generation_stops_at_eos_per_row(decoders):
    model, sd, c = decoders["qwen2-bias-tied"]
    prompts = [[5, 9, 13, 7, 22], [11, 3, 8]]
    ids = torch.tensor([p if len(p) == 5 else [0, 0] + p for p in prompts])
    mask = (ids != 0).long()
    free = model.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    eos = int(free[0, 2])  # make row 0's third token the EOS
    got = model.generate(ids, mask, max_new_tokens=8, eos_token_id=eos)
    expected = []
    for p in prompts:
        row = greedy_reference(sd, c, p, 8, eos=eos)
        expected.append(row + [c["pad_token_id"]] * (8 - len(row)))  # finished rows are padded
    width = max(len(greedy_reference(sd, c, p, 8, eos=eos)) for p in prompts)
    assert got.tolist() == [r[:width] for r in expected] and got.shape[1] == width
    alone = model.generate(ids[:1], mask[:1], max_new_tokens=8, eos_token_id=eos)
    assert alone.tolist() == [greedy_reference(sd, c, prompts[0], 8, eos=eos)] and alone.shape[1] <= 3  # stops early


def test_gemma_greedy_generation_equals_the_reference(decoders):
    model, sd, c = decoders["gemma-mqa-head-dim"]
    prompts = [[5, 9, 13, 7, 22], [11, 3]]
    ids = torch.tensor([prompts[0], [0, 0, 0] + prompts[1]])
    got = model.generate(ids, (ids != 0).long(), max_new_tokens=6, eos_token_id=[])
    assert got.tolist() == [greedy_reference(sd, c, p, 6) for p in prompts]  # cached, left-padded == recomputed
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (4 * 16, 32)  # heads x head_dim, not hidden


def test_gemma_bf16_rounds_where_the_reference_does(tmp_path):
    c = DECODERS["gemma-mqa-head-dim"]
    model = P.CausalLM.from_pretrained(save_model(tmp_path / "g", c, decoder_weights(c)), dtype=torch.bfloat16)
    seen = {}
    model.model.layers[0].register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    ids = torch.tensor([[5, 9, 13]])
    model(ids)
    # the scale sqrt(32) = 5.6568... is itself rounded to bf16 (5.65625) before the product, as in transformers
    scale = torch.tensor(5.65625, dtype=torch.bfloat16)
    assert torch.equal(seen["x"], model.model.embed_tokens.weight[ids] * scale)
    # the norm applies (1 + w) in fp32 and rounds once; rounding first (Llama's order) differs in bf16
    x = torch.randn(4, 32).bfloat16()
    norm = model.model.norm
    h = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)
    once = (h * (1 + norm.weight.double())).to(torch.bfloat16)
    assert (norm(x).double() - once.double()).abs().max() <= 2 ** -7 * once.double().abs().max()
    assert not torch.equal(norm(x), h.to(torch.bfloat16) * (1 + norm.weight))


def test_decoder_names_dtypes_and_config_errors(tmp_path, decoders):
    model = decoders["llama-gqa-untied"][0]
    names = {n for n, _ in model.named_modules()}
    assert {"model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",
            "model.layers.0.input_layernorm", "model.norm", "lm_head"} <= names
    c, sd = DECODERS["llama-gqa-untied"], decoders["llama-gqa-untied"][1]
    folder = save_model(tmp_path / "bf16", c, sd)
    half = P.CausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    ids = torch.tensor([[5, 9, 13, 7]])
    assert (half(ids).float() - model(ids)).abs().max() < 0.25  # bf16 runs and stays close
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
        yarn = dict(c, rope_scaling={"type": "yarn", "factor": 2.0})
        P.CausalLM.from_pretrained(save_model(tmp_path / "yarn", yarn, sd))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        P.CausalLM.from_pretrained(save_model(tmp_path / "gpt2", dict(c, model_type="gpt2"), sd))
    with pytest.raises(ValueError, match=r"missing keys \['lm_head.weight'\]"):  # untied needs its own head
        headless = {k: v for k, v in sd.items() if k != "lm_head.weight"}
        P.CausalLM.from_pretrained(save_model(tmp_path / "nohead", c, headless))

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
    P.download(hub.url + "/org/m/resolve/main/config.json", tmp_path / "a", token="secret")
    assert hub.log[-1][2] == "Bearer secret"  # the hub itself gets it
    P.download(foreign.url + "/data/test.jsonl", tmp_path / "b", token="secret")  # a caller passing it anyway
    assert foreign.log[-1][2] is None
    # the hub redirects a big file to its CDN: the hub sees the token, the CDN never does
    hub.redirect["/org/m/resolve/main/model.safetensors"] = foreign.url + "/cdn/blob"
    assert P.download(hub.url + "/org/m/resolve/main/model.safetensors", tmp_path / "c",
                      token="secret").read_bytes() == body
    assert hub.log[-1] == ("/org/m/resolve/main/model.safetensors", None, "Bearer secret", None)
    # a redirect that stays on the hub's origin (a renamed repo) keeps it
    hub.redirect["/old/m/resolve/main/config.json"] = hub.url + "/org/m/resolve/main/config.json"
    P.download(hub.url + "/old/m/resolve/main/config.json", tmp_path / "d", token="secret")
    assert [a for _, _, a, _ in hub.log[-2:]] == ["Bearer secret", "Bearer secret"]
    # resolve() with $HF_TOKEN, weights served by the CDN
    monkeypatch.setenv("HF_TOKEN", "secret")
    tiny_bert_repo(hub, "org/tiny")
    hub.files["/cdn/tiny"] = hub.files.pop("/org/tiny/resolve/main/model.safetensors")
    foreign.files["/cdn/tiny"] = hub.files["/cdn/tiny"]
    hub.redirect["/org/tiny/resolve/main/model.safetensors"] = foreign.url + "/cdn/tiny"
    assert (P.resolve("org/tiny") / "model.safetensors").read_bytes() == foreign.files["/cdn/tiny"]
    assert [p for p, _, _, _ in foreign.log] == ["/data/test.jsonl", "/cdn/blob", "/cdn/tiny"]
    assert [a for _, _, a, _ in foreign.log] == [None, None, None]
    assert {a for _, _, a, _ in hub.log} == {"Bearer secret"}
    # the token saved by `huggingface-cli login` is scoped the same way
    monkeypatch.delenv("HF_TOKEN")
    (tmp_path / "hf/token").write_text("saved\n")
    hub.log.clear()
    tiny_bert_repo(hub, "org/tiny2")
    hub.redirect["/org/tiny2/resolve/main/model.safetensors"] = foreign.url + "/cdn/tiny"
    P.resolve("org/tiny2")
    assert {a for _, _, a, _ in hub.log} == {"Bearer saved"} and foreign.log[-1][2] is None
    hub.redirect["/org/m/resolve/main/x.bin"] = "ftp://127.0.0.1/x.bin"  # only http(s) redirects are followed
    with pytest.raises(urllib.error.HTTPError, match="non-HTTP URL refused"):
        P.download(hub.url + "/org/m/resolve/main/x.bin", tmp_path / "x", token="secret")


def test_same_origin_compares_scheme_host_and_port():
    assert P.same_origin("https://huggingface.co/a/b", "https://HuggingFace.co:443")
    assert P.same_origin("http://127.0.0.1:8000/x", "http://127.0.0.1:8000")
    for other in ("http://huggingface.co/a", "https://cdn-lfs.huggingface.co/a", "https://huggingface.co:8443/a",
                  "https://huggingface.co.evil.com/a", "https://evil.com/huggingface.co", "https://x@evil.com/",
                  "https://huggingface.co:bad/"):
        assert not P.same_origin(other, "https://huggingface.co"), other


def test_download_resumes_only_the_version_it_started(hub, tmp_path):
    body = bytes(range(256)) * 40
    hub.files["/f.bin"] = body
    hub.truncate.add("/f.bin")
    with pytest.raises(ConnectionError, match="run again to resume"):  # cut mid-file: the partial is kept
        P.download(hub.url + "/f.bin", tmp_path / "f.bin")
    assert not (tmp_path / "f.bin").exists() and (tmp_path / "f.bin.incomplete").stat().st_size == len(body) // 2
    etag = f'"{hashlib.sha256(body).hexdigest()}"'
    assert P.download(hub.url + "/f.bin", tmp_path / "f.bin").read_bytes() == body
    assert hub.log[-1][1:] == (f"bytes={len(body) // 2}-", None, etag)  # Range with If-Range on its ETag
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]  # no partial, no ETag file left
    n = len(hub.log)
    P.download(hub.url + "/f.bin", tmp_path / "f.bin")  # already there: no request at all
    assert len(hub.log) == n
    # the remote file changes between the two attempts: the result is the new file, never a mix of both
    hub.files["/g.bin"] = body
    hub.truncate.add("/g.bin")
    with pytest.raises(ConnectionError):
        P.download(hub.url + "/g.bin", tmp_path / "g.bin")
    new = bytes(reversed(body))
    hub.files["/g.bin"] = new
    assert P.download(hub.url + "/g.bin", tmp_path / "g.bin").read_bytes() == new
    assert hub.log[-1][3] == etag  # it asked for the old version; the server sent the new one whole
    # a partial without the ETag it came from (e.g. an older client's) is not trusted: start from zero
    (tmp_path / "h.bin.incomplete").write_bytes(b"\0" * 1000)
    hub.files["/h.bin"] = body
    assert P.download(hub.url + "/h.bin", tmp_path / "h.bin").read_bytes() == body
    assert hub.log[-1][1] is None
    with pytest.raises(Exception) as e:
        P.download(hub.url + "/missing.bin", tmp_path / "missing.bin")
    assert getattr(e.value, "code", None) == 404 and not (tmp_path / "missing.bin").exists()


def test_download_rejects_a_wrong_content_range(hub, tmp_path):
    body = bytes(range(256)) * 8
    hub.files["/r.bin"] = body
    hub.truncate.add("/r.bin")
    with pytest.raises(ConnectionError):
        P.download(hub.url + "/r.bin", tmp_path / "r.bin")
    hub.bad_range.add("/r.bin")  # the server answers the resume with bytes that start one too late
    with pytest.raises(ConnectionError, match=r"Content-Range 'bytes 1025-2047/2048'.*discarded"):
        P.download(hub.url + "/r.bin", tmp_path / "r.bin")
    assert list(tmp_path.iterdir()) == []
    assert P.download(hub.url + "/r.bin", tmp_path / "r.bin").read_bytes() == body  # a fresh start is whole


def test_download_never_marks_a_short_file_complete(hub, foreign, tmp_path):
    body = bytes(range(256)) * 8
    foreign.files["/n.bin"] = body
    foreign.no_length.add("/n.bin")  # no Content-Length, and not the hub: nothing states the size or a checksum
    with pytest.raises(ConnectionError, match="states no length or checksum"):
        P.download(foreign.url + "/n.bin", tmp_path / "n.bin")
    assert list(tmp_path.iterdir()) == []
    hub.files["/n.bin"] = body
    hub.no_length.add("/n.bin")
    hub.headers["/n.bin"] = {"X-Linked-Size": str(len(body))}  # the hub's size header makes it checkable
    hub.truncate.add("/n.bin")
    with pytest.raises(ConnectionError, match=f"stopped at {len(body) // 2} of {len(body)} bytes"):
        P.download(hub.url + "/n.bin", tmp_path / "n.bin")
    assert not (tmp_path / "n.bin").exists()
    assert P.download(hub.url + "/n.bin", tmp_path / "n.bin").read_bytes() == body  # resumed, then complete
    hub.files["/c.bin"] = body
    hub.chunked_cut.add("/c.bin")  # a chunked body that stops before its final chunk
    with pytest.raises(ConnectionError, match="broke off"):
        P.download(hub.url + "/c.bin", tmp_path / "c.bin")
    assert not (tmp_path / "c.bin").exists()
    hub.chunked_cut.clear()
    hub.chunked.add("/c.bin")  # chunked and complete: its terminating chunk proves the end
    assert P.download(hub.url + "/c.bin", tmp_path / "c.bin").read_bytes() == body


def test_download_checks_the_sha256_the_hub_states(hub, foreign, tmp_path):
    body, other = b"a" * 3000, b"b" * 3000
    foreign.files["/cdn/x"] = body
    foreign.no_length.add("/cdn/x")  # the CDN sends no length: the hub's size and sha256 must suffice
    hub.redirect["/org/m/resolve/main/w.safetensors"] = foreign.url + "/cdn/x"
    hub.headers["/org/m/resolve/main/w.safetensors"] = {"X-Linked-Etag": f'"{hashlib.sha256(body).hexdigest()}"',
                                                        "X-Linked-Size": str(len(body))}
    assert P.download(hub.url + "/org/m/resolve/main/w.safetensors", tmp_path / "w").read_bytes() == body
    foreign.files["/cdn/x"] = other  # the CDN now serves other bytes of the same length
    with pytest.raises(ConnectionError, match="has sha256 .* the hub states .* discarded"):
        P.download(hub.url + "/org/m/resolve/main/w.safetensors", tmp_path / "w2")
    assert not (tmp_path / "w2").exists() and not (tmp_path / "w2.incomplete").exists()
    hub.files["/y.bin"] = body  # an LFS file served by the hub itself: its ETag is the sha256, and it is checked
    hub.headers["/y.bin"] = {"X-Linked-Etag": hashlib.sha256(other).hexdigest()}
    with pytest.raises(ConnectionError, match="headers contradict"):
        P.download(hub.url + "/y.bin", tmp_path / "y")
    foreign.files["/z"] = other  # another origin's ETag means nothing: not taken for a checksum
    foreign.headers["/z"] = {"X-Linked-Etag": hashlib.sha256(body).hexdigest()}
    assert P.download(foreign.url + "/z", tmp_path / "z").read_bytes() == other


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
    folder = P.resolve("org/tiny-bert")
    assert folder == tmp_path / "hf/unilora/org--tiny-bert/main"
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json", ".complete"}
    requested = [path for path, *_ in hub.log]
    assert requested[0].endswith("/config.json") and "/org/tiny-bert/resolve/main/generation_config.json" in requested
    hub.stop()  # offline from here on: the cache must be enough
    model = P.Encoder.from_pretrained("org/tiny-bert")
    ids = torch.tensor([[2, 7, 9, 3]])
    ref = encoder_reference(sd, BERT, ids, torch.ones_like(ids))
    torch.testing.assert_close(model(ids), ref.float(), atol=1e-5, rtol=0)
    assert P.resolve("org/tiny-bert", files=["config.json"]) == folder
    assert P.resolve(str(folder)) == folder  # a local folder is used as is


@pytest.mark.parametrize("weights, expected",
                         [("sharded", "model-00002-of-00002.safetensors"), ("bin", "pytorch_model.bin")])
def test_resolve_falls_back_to_other_weight_formats(hub, weights, expected):
    sd = tiny_bert_repo(hub, "org/other", weights)
    folder = P.resolve("org/other")
    assert (folder / expected).is_file() and not (folder / "model.safetensors").exists()
    assert P.load_state_dict(folder).keys() == sd.keys()


def test_resolve_errors_name_the_problem_and_the_fix(hub, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"org/nope/resolve/main/config.json: not found \(404\)"):
        P.resolve("org/nope")
    tiny_bert_repo(hub, "org/gated")
    hub.gated.add("/org/gated/resolve/main/config.json")
    with pytest.raises(PermissionError, match="HF_TOKEN"):
        P.resolve("org/gated")
    monkeypatch.setenv("HF_TOKEN", "secret")
    assert (P.resolve("org/gated") / "config.json").is_file()
    assert hub.log[-1][2] == "Bearer secret"
    with pytest.raises(FileNotFoundError, match="neither an existing folder nor a hub repo id"):
        P.resolve(str(tmp_path / "no/such/folder"))
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: the network is "down"
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(ConnectionError, match="unreachable.*pass its path instead of the repo id"):
        P.Encoder.from_pretrained("org/never-downloaded")
    cache = tmp_path / "fresh-cache"
    with pytest.raises(ConnectionError):
        P.resolve("org/never-downloaded", cache_dir=cache)
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
        P.resolve("org/crafted")
    assert not [p for p, *_ in hub.log if "model-0000" in p]  # no shard was requested
    n = len(hub.log)
    if name is not None:
        with pytest.raises(ValueError, match=re.escape(repr(name))):
            P.resolve("org/crafted2", files=["config.json", name])
        assert len(hub.log) == n  # refused before any request
    # a local folder whose index points outside it, at a valid file that the old reader would have loaded
    folder = tmp_path / "models/m"
    folder.mkdir(parents=True)
    write_by_hand(tmp_path / "models/evil.safetensors", {"w": torch.ones(2)})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": name}}))
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        P.load_state_dict(folder)
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if "evil" in p.name}
    assert written == {"models/evil.safetensors"}  # nothing else named evil anywhere


def test_nested_names_and_revisions_inside_the_folder_are_fine(hub):
    assert P.check_file_name("sub/dir/model-00001.safetensors", "test") == "sub/dir/model-00001.safetensors"
    with pytest.raises(ValueError, match="revision"):
        P.resolve("org/x", revision="../../x")
    assert hub.log == []


def hostile_variants(seed=0, n=300):
    """Seeded mutations of a valid safetensors file: flipped bytes, hostile header values, lying header lengths,
    truncations, extra overlapping entries and edited header text."""
    rng = random.Random(seed)
    good = safetensors_bytes({"a": torch.randn(3, 4), "b": torch.arange(6).reshape(2, 3), "c": torch.randn(5).half()})
    (hlen,) = struct.unpack("<Q", good[:8])
    header, data = json.loads(good[8:8 + hlen]), good[8 + hlen:]
    pool = [-1, 0, 8, 2**40, 2**64, 1.5, "3", None, True, [], [1], [0, 2**62], [2**62, 2**62 + 8], [-8, 0], [8, 0],
            [0, -1], [[0]], {"a": 1}, "F8_E4M3", "F32", "BF16", ["F32"], [2**31, 2**31], [3, -4], [True, 2], [0, 48],
            [1e3, 2e3], [2**20, 2**20, 2**20], [4, 3], [0, 24], [48, 72]]

    def pack(h, d=data, length=None):
        text = json.dumps(h).encode()
        return struct.pack("<Q", len(text) if length is None else length) + text + d

    for i in range(n):
        kind = i % 7
        if kind == 0:  # flip a few random bytes anywhere
            b = bytearray(good)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            yield bytes(b)
        elif kind == 1:  # one field of one tensor set to a hostile value
            h = json.loads(json.dumps(header))
            h[rng.choice("abc")][rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(pool)
            yield pack(h)
        elif kind == 2:  # the header length lies
            yield pack(header, length=rng.choice([0, 1, 7, hlen - 1, hlen + 1, len(good), 2**32, 2**63, 2**64 - 1]))
        elif kind == 3:  # truncated anywhere
            yield good[:rng.randrange(len(good))]
        elif kind == 4:  # an extra tensor overlapping the others, or one claiming far more than the file holds
            h = json.loads(json.dumps(header))
            big = rng.choice([[2**15, 2**15], [10**9], [3, 4]])
            end = rng.choice([48, 8 * math.prod(big), 2**30])
            h["x"] = {"dtype": "F32", "shape": big, "data_offsets": [rng.choice([0, 8, 24]), end]}
            yield pack(h)
        elif kind == 5:  # a field missing, or an entry that is not an object
            h = json.loads(json.dumps(header))
            name = rng.choice("abc")
            if rng.random() < 0.5:
                del h[name][rng.choice(["dtype", "shape", "data_offsets"])]
            else:
                h[name] = rng.choice(pool)
            yield pack(h)
        else:  # the header text edited: a character dropped, doubled or replaced
            text = bytearray(good[8:8 + hlen])
            j = rng.randrange(len(text))
            op = rng.randrange(3)
            text = text[:j] + text[j + 1:] if op == 0 else text[:j] + text[j:j + 1] * 2 + text[j + 1:] \
                if op == 1 else text[:j] + bytes([rng.randrange(256)]) + text[j + 1:]
            yield struct.pack("<Q", len(text)) + bytes(text) + data


def test_safetensors_fuzz_only_value_errors_and_no_big_allocations(tmp_path):
    import tracemalloc
    outcomes = {"loaded": 0, "refused": 0}
    path = tmp_path / "fuzz.safetensors"
    for i, blob in enumerate(hostile_variants()):
        path.write_bytes(blob)
        tracemalloc.start()
        try:
            sd = P.load_safetensors(path)
            outcomes["loaded"] += 1
            assert sum(t.numel() * t.element_size() for t in sd.values()) <= len(blob)
        except ValueError as e:
            outcomes["refused"] += 1
            assert str(path) in str(e), f"variant {i}: the error does not name the file: {e}"
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak < 4 * len(blob) + (256 << 10), f"variant {i} made the reader allocate {peak} bytes"
    assert outcomes["refused"] > 150 and outcomes["loaded"] > 10  # both paths were really exercised


def test_safetensors_reader_refuses_the_reported_files(tmp_path):
    def header_file(name, header, data=b""):
        text = json.dumps(header).encode()
        (tmp_path / name).write_bytes(struct.pack("<Q", len(text)) + text + data)
        return tmp_path / name
    cases = {  # the examples: a 1 GB claim in a tiny file, negative/overlapping offsets, a lying length
        "huge.safetensors": ({"w": {"dtype": "F32", "shape": [2**28], "data_offsets": [0, 2**30]}}, b"\0" * 16,
                             "ends at byte 1073741824 .* only 16 bytes"),
        "negative.safetensors": ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, b"\0" * 8,
                                 "data_offsets"),
        "overlap.safetensors": ({"u": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                 "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12,
                                "'u' and 'v' overlap"),
        "shape.safetensors": ({"w": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 0]}}, b"", "shape"),
        "dtype.safetensors": ({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "dtype"),
        "entry.safetensors": ({"w": [1, 2]}, b"", "'w' is not an object"),
        "list.safetensors": ([1, 2], b"", "JSON list"),
        "dup.safetensors": (None, b"", "duplicate"),
    }
    for name, (header, data, problem) in cases.items():
        if header is None:
            text = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {}}'
            (tmp_path / name).write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 4)
            path = tmp_path / name
        else:
            path = header_file(name, header, data)
        with pytest.raises(ValueError, match=f"{re.escape(str(path))}.*{problem}"):
            P.load_safetensors(path)
    (tmp_path / "long.safetensors").write_bytes(struct.pack("<Q", 1000) + b"{}")  # length past the end
    with pytest.raises(ValueError, match="header claims 1000 bytes"):
        P.load_safetensors(tmp_path / "long.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"\1\0")
    with pytest.raises(ValueError, match="too short"):
        P.load_safetensors(tmp_path / "tiny.safetensors")


class ArbitraryCode:
    """Unpickling this calls os.mkdir(marker): the stand-in for any code a crafted checkpoint could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_crafted_pickle_checkpoint_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"x": ArbitraryCode(marker)}, tmp_path / "armed.pt")  # prove the payload is live: a plain unpickler
    with zipfile.ZipFile(tmp_path / "armed.pt") as z:                 # runs it
        pickle.loads(z.read(next(n for n in z.namelist() if n.endswith("data.pkl"))))
    assert marker.is_dir()
    marker.rmdir()
    folder = tmp_path / "model"
    folder.mkdir()
    torch.save({"w": torch.ones(2), "x": ArbitraryCode(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=f"{re.escape(str(folder / 'pytorch_model.bin'))} is not a plain tensor"):
        P.load_state_dict(folder)
    assert not marker.exists()
    torch.save({"w": torch.ones(2)}, folder / "pytorch_model.bin")
    (folder / "pytorch_model.bin").write_bytes((folder / "pytorch_model.bin").read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="pytorch_model.bin is not a plain tensor checkpoint"):
        P.load_state_dict(folder)
    torch.save([torch.ones(2)], folder / "pytorch_model.bin")  # loads safely, but is no state dict
    with pytest.raises(ValueError, match="does not hold a state dict"):
        P.load_state_dict(folder)


def test_loader_errors_name_the_file_and_the_problem(tmp_path):
    c, sd = DECODERS["llama-gqa-untied"], decoder_weights(DECODERS["llama-gqa-untied"])

    def folder_with(name, config=c, weights=sd):
        return save_model(tmp_path / name, config, weights)

    bad_configs = {"json": (b'{"model_type": "llama",', "is not valid JSON"),
                   "utf8": (b'{"model_type": "llama\xff"}', "is not UTF-8 text"),
                   "list": (b"[1, 2]", "holds a JSON list"),
                   "missing": (json.dumps({k: v for k, v in c.items() if k != "hidden_size"}).encode(),
                               "has no 'hidden_size'"),
                   "string": (json.dumps(dict(c, num_hidden_layers="2")).encode(), "num_hidden_layers is '2'"),
                   "heads": (json.dumps(dict(c, num_key_value_heads=3)).encode(),
                             "num_attention_heads 4 is not a multiple of num_key_value_heads 3")}
    for name, (text, problem) in bad_configs.items():
        folder = folder_with(name)
        (folder / "config.json").write_bytes(text)
        with pytest.raises(ValueError, match=f"{re.escape(str(folder / 'config.json'))}.*{problem}"):
            P.CausalLM.from_pretrained(folder)
    wrong = dict(sd, **{"model.layers.1.self_attn.k_proj.weight": sd["model.layers.1.self_attn.k_proj.weight"].T})
    folder = folder_with("shape", weights=wrong)
    with pytest.raises(ValueError, match=rf"{re.escape(str(folder))}: model.layers.1.self_attn.k_proj.weight has "
                                         r"shape \(32, 16\), its config.json implies \(16, 32\)"):
        P.CausalLM.from_pretrained(folder)
    folder = folder_with("truncated")
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{re.escape(str(folder / 'model.safetensors'))}.*truncated"):
        P.CausalLM.from_pretrained(folder)
    folder = folder_with("index")
    (folder / "model.safetensors").rename(folder / "shard.safetensors")
    (folder / "model.safetensors.index.json").write_bytes(b"\xfe{}")
    with pytest.raises(ValueError, match=f"{re.escape(str(folder / 'model.safetensors.index.json'))} is not UTF-8"):
        P.load_state_dict(folder)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ["shard.safetensors"]}')
    with pytest.raises(ValueError, match="index.json has no weight_map object"):
        P.load_state_dict(folder)
    (folder / "copy.safetensors").write_bytes((folder / "shard.safetensors").read_bytes())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "shard.safetensors", "lm_head.weight": "copy.safetensors"}}))
    with pytest.raises(ValueError, match="shard.safetensors holds tensors another shard .* holds too"):
        P.load_state_dict(folder)  # two shards with the same tensor: which one wins would be an accident
    bert = save_model(tmp_path / "bert", {k: v for k, v in BERT.items() if k != "layer_norm_eps"},
                      encoder_weights(BERT))
    with pytest.raises(ValueError, match=f"{re.escape(str(bert / 'config.json'))} has no 'layer_norm_eps'"):
        P.Encoder.from_pretrained(bert)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok/tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "vocab": {"a": 0}}}))
    (tmp_path / "tok/tokenizer_config.json").write_bytes(b'{"eos_token": "\xff"}')
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 'tok/tokenizer_config.json'))} is not UTF-8"):
        P.Tokenizer.from_pretrained(tmp_path / "tok")


def test_no_python_file_in_the_repo_unpickles_arbitrary_objects():
    """Every `weights_only=` argument in the repository is the constant True. Read from the parsed source, so any
    spelling (spaces, False, 0, a variable) counts, while the text inside strings (like another test's own check
    for the phrase) does not."""
    repo = Path(__file__).resolve().parent
    files = [p for p in repo.rglob("*.py") if not any(part.startswith(".") for part in p.relative_to(repo).parts)]
    assert len(files) >= 8  # the project's scripts and tests were found
    offenders = [f"{p.relative_to(repo)}:{node.value.lineno}" for p in files
                 for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
                 if isinstance(node, ast.keyword) and node.arg == "weights_only"
                 and not (isinstance(node.value, ast.Constant) and node.value.value is True)]
    assert offenders == [], "torch.load(..., weights_only=True) only: a checkpoint must never run code"


# ------------------------------------------------------------------------------------ PEFT export


class FakeAdapter:
    config = {"r": 2}

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.loras = {f"encoder.layer.{i}.attention.self.{n}": (torch.randn(2, 16, generator=g),
                                                                 torch.randn(16, 2, generator=g))
                      for i in range(2) for n in ("query", "value")}

    def lora_state_dict(self):
        return self.loras


def test_save_peft_lora_writes_the_peft_layout(tmp_path):
    adapter = FakeAdapter()
    P.save_peft_lora(adapter, tmp_path / "peft", base_model_name_or_path="FacebookAI/roberta-base",
                     prefix="base_model.model.roberta.", task_type="SEQ_CLS")
    tensors, meta, _ = parse_by_hand(tmp_path / "peft/adapter_model.safetensors")
    assert meta == {"format": "pt"}
    assert set(tensors) == {f"base_model.model.roberta.{n}.lora_{ab}.weight" for n in adapter.loras for ab in "AB"}
    for n, (A, B) in adapter.loras.items():
        np.testing.assert_array_equal(tensors[f"base_model.model.roberta.{n}.lora_A.weight"][1], A.numpy())
        np.testing.assert_array_equal(tensors[f"base_model.model.roberta.{n}.lora_B.weight"][1], B.numpy())
    cfg = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == cfg["lora_alpha"] == 2 and cfg["bias"] == "none"
    assert cfg["target_modules"] == ["query", "value"] and cfg["fan_in_fan_out"] is False
    assert cfg["base_model_name_or_path"] == "FacebookAI/roberta-base" and cfg["task_type"] == "SEQ_CLS"
    with pytest.raises(FileExistsError, match="overwrite=True"):
        P.save_peft_lora(adapter, tmp_path / "peft")
    P.save_peft_lora(adapter, tmp_path / "peft", overwrite=True)


class HeadAdapter(FakeAdapter):
    """An adapter handle as unilora's will be: LoRA factors plus config["keep_trainable"] (full module names) of
    modules trained in full, found under adapter.root. The root mirrors train_glue's model: `encoder` + `classifier`."""

    def __init__(self, keep=("classifier",)):
        super().__init__()
        self.loras = {"encoder." + n: ab for n, ab in self.loras.items()}
        self.root = torch.nn.Module()
        self.root.encoder = torch.nn.Linear(2, 2)
        self.root.classifier = torch.nn.ModuleDict({"dense": torch.nn.Linear(16, 16),
                                                   "out_proj": torch.nn.Linear(16, 3)})
        self.config = {"r": 2, "keep_trainable": list(keep)}


def test_save_peft_lora_exports_trained_modules_as_modules_to_save(tmp_path):
    """PEFT saves a modules_to_save entry as the module's state dict under "<prefix><module>.<key>" (it strips
    the wrapper's "modules_to_save.<adapter>." on save and adds it back on load: peft.utils.save_and_load). Checked
    outside the project with peft 0.21.2 / transformers 5.24.0: PeftModel.from_pretrained of such an export onto a
    fresh RobertaForSequenceClassification reproduces the trained model's logits (head included) within 5e-7, and
    the export without the head fails there with a KeyError for base_model.model.classifier.dense.weight."""
    adapter = HeadAdapter()
    P.save_peft_lora(adapter, tmp_path / "peft", task_type="SEQ_CLS", rename={"encoder.": "roberta."})
    tensors, _, _ = parse_by_hand(tmp_path / "peft/adapter_model.safetensors")
    head = {f"base_model.model.classifier.{m}.{p}" for m in ("dense", "out_proj") for p in ("weight", "bias")}
    lora = {f"base_model.model.roberta.{n[len('encoder.'):]}.lora_{ab}.weight" for n in adapter.loras for ab in "AB"}
    assert set(tensors) == head | lora
    np.testing.assert_array_equal(tensors["base_model.model.classifier.out_proj.weight"][1],
                                  adapter.root.classifier.out_proj.weight.detach().numpy())
    np.testing.assert_array_equal(tensors["base_model.model.classifier.dense.bias"][1],
                                  adapter.root.classifier.dense.bias.detach().numpy())
    cfg = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["classifier"] and cfg["target_modules"] == ["query", "value"]
    P.save_peft_lora(HeadAdapter(keep=()), tmp_path / "plain")  # nothing trained in full: nothing extra
    assert json.loads((tmp_path / "plain/adapter_config.json").read_text())["modules_to_save"] is None
    with pytest.raises(ValueError, match="'head' is not in the model"):
        P.save_peft_lora(HeadAdapter(keep=("head",)), tmp_path / "bad")
    with pytest.raises(ValueError, match="'encoder' is trained in full and also holds LoRA layers"):
        P.save_peft_lora(HeadAdapter(keep=("encoder",)), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # a refused export writes nothing


def test_a_trained_unilora_adapter_exports_as_an_equivalent_lora(tmp_path):
    import unilora
    torch.manual_seed(0)
    model = P.Encoder(ROBERTA).double().eval()
    reference = P.Encoder(ROBERTA).double().eval()
    reference.load_state_dict(model.state_dict())
    unadapted = P.Encoder(ROBERTA).double().eval()
    unadapted.load_state_dict(model.state_dict())
    adapter = unilora.apply_unilora(model, 100, targets=("query", "value"), init_bound=0.3)
    P.save_peft_lora(adapter, tmp_path / "peft")
    tensors, _, _ = parse_by_hand(tmp_path / "peft/adapter_model.safetensors")
    with torch.no_grad():  # apply the exported file by hand: W + B A for every listed module
        for name, _, _ in adapter.config["layers"]:
            A = torch.from_numpy(tensors[f"base_model.model.{name}.lora_A.weight"][1].copy()).double()
            B = torch.from_numpy(tensors[f"base_model.model.{name}.lora_B.weight"][1].copy()).double()
            reference.get_submodule(name).weight += B @ A
    ids = torch.randint(3, ROBERTA["vocab_size"], (2, 7))
    assert torch.allclose(reference(ids), model(ids), atol=1e-6)
    assert not torch.allclose(unadapted(ids), model(ids), atol=1e-3)  # the adapter does change the outputs


def test_pad_right_and_left():
    rows = [[5, 6, 7], [8], []]
    assert P.pad(rows, 0).tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert P.pad(rows, -100, left=True).tolist() == [[5, 6, 7], [-100, -100, 8], [-100, -100, -100]]


# ------------------------------------------------------------------------------ runs and command lines

def test_cli_number_types_reject_out_of_range_values():
    import argparse
    ok = {P.positive_int: ("1", 1), P.nonnegative_int: ("0", 0),
          P.positive_float: ("2e-3", 2e-3), P.nonnegative_float: ("0", 0.0),
          P.fraction: ("0.06", 0.06)}
    for parse, (text, value) in ok.items():
        assert parse(text) == value
    bad = [(P.positive_int, t) for t in ("0", "-3", "1.5", "x")] + \
          [(P.nonnegative_int, "-1")] + \
          [(P.positive_float, t) for t in ("0", "-1e-3", "nan", "inf", "-inf")] + \
          [(P.nonnegative_float, t) for t in ("-0.1", "nan")] + [(P.fraction, t) for t in ("1", "-0.1")]
    for parse, text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_prepare_output_dir_never_writes_into_a_model_or_another_run(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"x")
    for overwrite in (False, True):
        with pytest.raises(SystemExit, match="holds a model"):
            P.prepare_output_dir(model, overwrite=overwrite)
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text("{}")
    with pytest.raises(SystemExit, match="--overwrite"):
        P.prepare_output_dir(run)
    assert P.prepare_output_dir(run, overwrite=True) == run
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"x")
    with pytest.raises(SystemExit, match="not empty"):
        P.prepare_output_dir(other, overwrite=True)
    fresh = P.prepare_output_dir(tmp_path / "a" / "b")
    assert fresh.is_dir()
    assert P.new_eval_dir(run) == run / "eval-1"
    (run / "eval-1").mkdir()
    assert P.new_eval_dir(run) == run / "eval-2"


def test_write_json_is_always_valid_json(tmp_path):
    path = tmp_path / "r.json"
    P.write_json(path, {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf"), "e": 2}})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "c": {"d": None, "e": 2}}
    P.check_finite(1.5, 3)
    with pytest.raises(P.NonFiniteLoss, match="step 7"):
        P.check_finite(float("nan"), 7)
