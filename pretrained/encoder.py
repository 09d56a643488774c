"""BERT / RoBERTa encoders returning hidden states: Encoder.from_pretrained(folder or hub id).

Why it exists: the GLUE script fine-tunes real Hugging Face encoders without `transformers`. Module and parameter
names are Hugging Face's (`encoder.layer.0.attention.self.query`), so adapters target the usual names and exported
weights line up. Outputs were checked equal to `transformers` (fp32, within 1e-5) outside the project.
"""
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from .files import (ACTIVATIONS, REQUIRED, as_dtype, build_on_meta, config_value, embedding, head_count_check,
                    load_config, load_state_dict, load_weights)
from .hub import resolve

ENCODER_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings")


def encoder_settings(c: dict) -> dict:
    """Every config.json value the encoder reads, typed and ranged (config_value): a ValueError names the key."""
    s = {"model_type": config_value(c, "model_type", "name")}
    if s["model_type"] not in ("bert", "roberta"):
        raise ValueError(f"model_type {s['model_type']!r} is not supported by Encoder (supported: bert, roberta)")
    s.update({key: config_value(c, key, "size") for key in ENCODER_SIZES})
    s["hidden_act"] = config_value(c, "hidden_act", "name")
    if s["hidden_act"] not in ACTIVATIONS:
        raise ValueError(f"hidden_act {s['hidden_act']!r} is not supported ({', '.join(ACTIVATIONS)})")
    position = config_value(c, "position_embedding_type", "name", "absolute")
    if position != "absolute":
        raise ValueError(f"position_embedding_type {position!r} is not supported (only absolute)")
    s["type_vocab_size"] = config_value(c, "type_vocab_size", "size", 2)
    s["layer_norm_eps"] = config_value(c, "layer_norm_eps", "positive")
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        s[key] = config_value(c, key, "probability", 0.0)
    # read from encoder.config by the GLUE head (recipes/glue_model.py): checked with the rest
    s["classifier_dropout"] = config_value(c, "classifier_dropout", "probability", None)
    s["initializer_range"] = config_value(c, "initializer_range", "positive", 0.02)
    # RoBERTa counts positions from its padding id; BERT's pad id only marks the embedding row that stays zero
    needed = REQUIRED if s["model_type"] == "roberta" else None
    s["pad_token_id"] = config_value(c, "pad_token_id", "token id", needed, below=s["vocab_size"])
    if needed is REQUIRED and s["pad_token_id"] + 1 >= s["max_position_embeddings"]:
        raise ValueError(f"pad_token_id {s['pad_token_id']} leaves no position for a token: RoBERTa numbers positions "
                         f"from pad_token_id + 1, below max_position_embeddings {s['max_position_embeddings']}")
    head_count_check(s)
    return s


class EncoderLayer(nn.Module):
    """Post-LayerNorm transformer block, nested exactly like Hugging Face's BertLayer (hence `attention.self`)."""

    def __init__(self, s):
        super().__init__()
        H, inner, eps = s["hidden_size"], s["intermediate_size"], s["layer_norm_eps"]
        self.n_heads, self.p_attn = s["num_attention_heads"], s["attention_probs_dropout_prob"]
        self.attention = nn.Module()
        self.attention.self = nn.ModuleDict({n: nn.Linear(H, H) for n in ("query", "key", "value")})
        self.attention.output = nn.ModuleDict({"dense": nn.Linear(H, H), "LayerNorm": nn.LayerNorm(H, eps=eps)})
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(H, inner)})
        self.output = nn.ModuleDict({"dense": nn.Linear(inner, H), "LayerNorm": nn.LayerNorm(H, eps=eps)})
        self.act = ACTIVATIONS[s["hidden_act"]]
        self.dropout = nn.Dropout(s["hidden_dropout_prob"])  # active only in train mode, as in HF

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
        s = encoder_settings(config)
        H = s["hidden_size"]
        self.config, self.roberta, self.pad_id = config, s["model_type"] == "roberta", s["pad_token_id"]
        self.embeddings = nn.ModuleDict({
            "word_embeddings": embedding(s["vocab_size"], H, padding_idx=s["pad_token_id"]),
            "position_embeddings": embedding(s["max_position_embeddings"], H),
            "token_type_embeddings": embedding(s["type_vocab_size"], H),
            "LayerNorm": nn.LayerNorm(H, eps=s["layer_norm_eps"]),
            "dropout": nn.Dropout(s["hidden_dropout_prob"])})
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(EncoderLayer(s) for _ in range(s["num_hidden_layers"]))})
        self.pooler = Pooler(H) if pooler else None

    def position_ids(self, input_ids):
        if self.roberta:  # RoBERTa counts real tokens from padding_idx + 1; pads sit at padding_idx itself
            real = input_ids.ne(self.pad_id).long()
            return real.cumsum(-1) * real + self.pad_id
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
        config = load_config(folder, encoder_settings)  # a bad config is reported before any weights are read
        sd = load_state_dict(folder)
        prefix = config["model_type"] + "."
        if any(k.startswith(prefix) for k in sd):  # a *ForMaskedLM/*ForPreTraining checkpoint: keep the base model,
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}  # drop its task heads
        # very old BERT checkpoints name LayerNorm parameters gamma/beta
        sd = {re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)): v
              for k, v in sd.items()}
        model = build_on_meta(cls, config, folder, pooler="pooler.dense.weight" in sd)
        load_weights(model, sd, as_dtype(dtype), folder)
        return model.eval()
