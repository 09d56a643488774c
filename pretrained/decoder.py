"""Llama / Mistral / Qwen2 / SmolLM / Gemma causal LMs with a KV cache: CausalLM.from_pretrained(folder or hub id).

Why it exists: the math script fine-tunes real Hugging Face decoders without `transformers`. Module names are
Hugging Face's (`model.layers.0.self_attn.q_proj`, `lm_head`). Outputs were checked equal to `transformers`
(fp32, within 1e-5) outside the project.
"""
import math

import torch
import torch.utils.checkpoint
import torch.nn as nn
import torch.nn.functional as F

from .files import (ACTIVATIONS, as_dtype, build_on_meta, check_fits, config_value, embedding, head_count_check,
                    load_config, load_state_dict, load_weights, load_weights_one_by_one, shown, stream_state_dict)
from .hub import resolve
from .nf4 import quantize_model

DECODER_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
ROPE_TYPES = ("default", "linear", "llama3")


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


def rope_settings(c: dict) -> dict:
    """RoPE's theta and scaling from config.json, each field checked for the scaling types we support
    (transformers 5 writes rope_parameters, transformers 4 wrote rope_scaling and rope_theta)."""
    key = "rope_parameters" if c.get("rope_parameters") is not None else "rope_scaling"
    scaling = config_value(c, key, "object", {})
    kind = (config_value(scaling, "rope_type", "name", None, where=key)
            or config_value(scaling, "type", "name", "default", where=key))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    rope = {"type": kind, "theta": config_value(c, "rope_theta", "positive", None)
            or config_value(scaling, "rope_theta", "positive", 10000.0, where=key)}
    if kind != "default":
        rope["factor"] = config_value(scaling, "factor", "positive", where=key)
    if kind == "llama3":
        for field in ("low_freq_factor", "high_freq_factor"):
            rope[field] = config_value(scaling, field, "positive", where=key)
        rope["original_max_position_embeddings"] = config_value(scaling, "original_max_position_embeddings", "size",
                                                                where=key)
        if rope["high_freq_factor"] <= rope["low_freq_factor"]:  # the blend below divides by their difference
            raise ValueError(f"{key}.high_freq_factor is {shown(rope['high_freq_factor'])}; expected a number above "
                             f"{key}.low_freq_factor ({shown(rope['low_freq_factor'])})")
    return rope


def rope_inv_freq(rope: dict, head_dim: int, device=None):
    """RoPE frequencies from rope_settings(). Computed in fp32 at every call: a buffer would be rounded by
    model.to(bfloat16) and is impossible on the meta device."""
    inv = 1.0 / float(rope["theta"]) ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    if rope["type"] == "linear":
        inv = inv / rope["factor"]
    elif rope["type"] == "llama3":  # long wavelengths slowed by `factor`, short ones kept, the band between blended
        s = rope
        wavelen = 2 * math.pi / inv
        blend = ((s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"])
                 / (s["high_freq_factor"] - s["low_freq_factor"])).clamp(0, 1)
        inv = (1 - blend) * inv / s["factor"] + blend * inv
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
    def __init__(self, s, qkv_bias, o_bias):
        super().__init__()
        H, self.n_heads, self.n_kv, self.head_dim = (s["hidden_size"], s["num_attention_heads"],
                                                     s["num_key_value_heads"], s["head_size"])
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
    def __init__(self, s, bias, act):
        super().__init__()
        H, inner = s["hidden_size"], s["intermediate_size"]
        self.gate_proj, self.up_proj = nn.Linear(H, inner, bias=bias), nn.Linear(H, inner, bias=bias)
        self.down_proj = nn.Linear(inner, H, bias=bias)
        self.act = act

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, s, qkv_bias, o_bias, mlp_bias, act, norm):
        super().__init__()
        self.self_attn, self.mlp = Attention(s, qkv_bias, o_bias), MLP(s, mlp_bias, act)
        self.input_layernorm = norm(s["hidden_size"], s["rms_norm_eps"])
        self.post_attention_layernorm = norm(s["hidden_size"], s["rms_norm_eps"])

    def forward(self, x, cos, sin, mask, cache, i):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, i)
        return x + self.mlp(self.post_attention_layernorm(x))


def gemma_activation(c: dict) -> str:
    """Gemma's MLP activation: hidden_activation where the config has it, else hidden_act. The original releases
    say "gelu" but were trained with the tanh approximation, so transformers reads "gelu" as tanh; so do we."""
    act = (config_value(c, "hidden_activation", "name", None) or config_value(c, "hidden_act", "name", None)
           or "gelu_pytorch_tanh")
    return "gelu_pytorch_tanh" if act == "gelu" else act


def decoder_settings(c: dict) -> dict:
    """Every config.json value the decoder reads, typed and ranged (config_value): a ValueError names the key."""
    kind = config_value(c, "model_type", "name")
    if kind not in ("llama", "mistral", "qwen2", "gemma"):
        raise ValueError(f"model_type {kind!r} is not supported by CausalLM (supported: llama, mistral, qwen2, "
                         "gemma)")
    gemma = kind == "gemma"
    s = {"model_type": kind, **{key: config_value(c, key, "size") for key in DECODER_SIZES}}
    s["act"] = gemma_activation(c) if gemma else config_value(c, "hidden_act", "name", "silu")
    if s["act"] not in (ACTIVATIONS if gemma else ("silu",)):
        raise ValueError(f"hidden_act {s['act']!r} is not supported for {kind} "
                         f"({', '.join(ACTIVATIONS) if gemma else 'Llama-family models use silu'})")
    if kind == "qwen2" and config_value(c, "use_sliding_window", "flag", False):
        raise ValueError("Qwen2 with use_sliding_window=true is not supported")
    # newer Gemma-family configs can ask for attention both ways (transformers then drops the causal mask); this
    # decoder is causal only, so it would load them and give other logits without a word
    if gemma and config_value(c, "use_bidirectional_attention", "flag", False):
        raise ValueError("Gemma with use_bidirectional_attention=true is not supported (this decoder is causal)")
    s["num_key_value_heads"] = config_value(c, "num_key_value_heads", "size", s["num_attention_heads"])
    s["head_dim"] = config_value(c, "head_dim", "size", None)
    head_count_check(s)
    s["head_size"] = s["head_dim"] or s["hidden_size"] // s["num_attention_heads"]
    if s["head_size"] % 2:
        raise ValueError(f"the head size {s['head_size']} (head_dim, else hidden_size / num_attention_heads) is odd; "
                         "RoPE turns pairs of dimensions")
    s["sliding_window"] = config_value(c, "sliding_window", "size", None) if kind == "mistral" else None
    for key in ("attention_bias", "mlp_bias"):
        s[key] = config_value(c, key, "flag", False)
    s["rms_norm_eps"] = config_value(c, "rms_norm_eps", "positive")
    s["tie_word_embeddings"] = config_value(c, "tie_word_embeddings", "flag", gemma)  # transformers' defaults
    s["eos_token_id"] = config_value(c, "eos_token_id", "token ids", None, below=s["vocab_size"])
    s["pad_token_id"] = config_value(c, "pad_token_id", "token id", None, below=s["vocab_size"])
    s["rope"] = rope_settings(c)
    return s


class CausalLM(nn.Module):
    """Llama-family causal LM (llama, mistral, qwen2; SmolLM is llama) and Gemma. forward -> logits (B, T, V).

    Gemma differs in four places: RMSNorm scales by (1 + w) in fp32, the embeddings are multiplied by
    sqrt(hidden_size) (rounded to the activations' dtype, as the reference does), the MLP is GeGLU with the tanh
    GELU, and the head is tied to the embeddings unless the config says otherwise. head_dim comes from the config
    (256 for Gemma-7B, where 16 heads x 256 != hidden 3072)."""

    def __init__(self, config: dict):
        super().__init__()
        s = self.settings = decoder_settings(config)
        kind, gemma = s["model_type"], s["model_type"] == "gemma"
        self.config = config
        self.window = s["sliding_window"]
        self.embed_scale = s["hidden_size"] ** 0.5 if gemma else None
        bias = s["attention_bias"]  # llama: one flag for q, k, v and o; qwen2: always on q, k, v only
        qkv_bias, o_bias = (True, False) if kind == "qwen2" else (bias, bias)
        norm = GemmaRMSNorm if gemma else RMSNorm
        self.model = nn.Module()
        self.model.embed_tokens = embedding(s["vocab_size"], s["hidden_size"])
        self.model.layers = nn.ModuleList(
            DecoderLayer(s, qkv_bias, o_bias, s["mlp_bias"], ACTIVATIONS[s["act"]], norm)
            for _ in range(s["num_hidden_layers"]))
        self.model.norm = norm(s["hidden_size"], s["rms_norm_eps"])
        self.lm_head = nn.Linear(s["hidden_size"], s["vocab_size"], bias=False)
        self.tied = s["tie_word_embeddings"]  # transformers' defaults: Gemma tied, the others not
        if self.tied:
            self.lm_head.weight = self.model.embed_tokens.weight
        # True: in training, each layer's activations are recomputed in the backward instead of kept (QLoRA's
        # setting: a 7B model's activations no longer grow with the layers, for about one more forward of compute)
        self.gradient_checkpointing = False

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
        freqs = pos[..., None].float() * rope_inv_freq(self.settings["rope"], self.settings["head_size"], dev)
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
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for i, layer in enumerate(self.model.layers):
            if recompute:  # the recomputation replays the same dropout masks (checkpoint restores the RNG state)
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask[:, None], None, i, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask[:, None], cache, i)
        x = self.model.norm(x)
        return self.lm_head(x[:, -1:] if last_only else x)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 32, eos_token_id=None):
        """Greedy decoding with a KV cache; rows may be left-padded (mask 0). Returns only the new tokens (B, N),
        N <= max_new_tokens. A row that produced EOS is filled with the pad id afterwards; decoding stops once
        every row has. eos_token_id: int or list; None -> the config's; [] -> never stop early."""
        eos = self.settings["eos_token_id"] if eos_token_id is None else eos_token_id
        eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), dtype=torch.long,
                           device=input_ids.device)
        pad = self.settings["pad_token_id"]
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
    def from_pretrained(cls, name_or_path, dtype=torch.float32, quantize=None):
        """The model of a folder or hub id, its weights in `dtype`. quantize="nf4": QLoRA's 4-bit base (nf4.py):
        the linear layers of the blocks become NF4Linear layers computing in `dtype`, the embeddings, norms and
        lm_head stay in `dtype`; each weight is quantized as it is read, so loading holds the 4-bit model and one
        checkpoint tensor, never the full-precision model. The result equals quantize_model(nf4.py) applied to the
        model loaded in `dtype`, bit for bit."""
        if quantize not in (None, "nf4"):
            raise ValueError(f"quantize={quantize!r} is not supported; use None (the weights in dtype) or 'nf4'")
        folder = resolve(name_or_path)
        config = load_config(folder, decoder_settings)  # a bad config is reported before any weights are read
        model = build_on_meta(cls, config, folder)
        if quantize == "nf4":
            return load_nf4(model, folder, as_dtype(dtype)).eval()
        sd = load_state_dict(folder)
        if model.tied:  # the checkpoint usually omits lm_head; tied means it is the embedding, whatever a file says
            sd["lm_head.weight"] = sd.get("model.embed_tokens.weight")
            if sd["lm_head.weight"] is None:
                del sd["lm_head.weight"]
        load_weights(model, sd, as_dtype(dtype), folder)
        if model.tied:  # loading with assign=True replaced the embedding Parameter: share it again
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.eval()


def load_nf4(model: CausalLM, folder, dtype) -> CausalLM:
    """from_pretrained(quantize="nf4") for a model built on the meta device: names and shapes checked from the file
    headers, the block linears replaced by empty NF4Linear shells, then the tensors read and placed one at a time."""
    shapes, tensors = stream_state_dict(folder)
    head = "model.embed_tokens.weight"
    if model.tied:  # as from_pretrained: the head is the embedding, whatever the file says
        shapes.pop("lm_head.weight", None)
        shapes.update({"lm_head.weight": shapes[head]} if head in shapes else {})
    check_fits(model, shapes, folder)
    quantize_model(model, dtype)  # lm_head is kept: QLoRA quantizes the blocks only
    load_weights_one_by_one(model, tensors, dtype, skip={"lm_head.weight"} if model.tied else ())
    if model.tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model
