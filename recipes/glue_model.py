"""The GLUE model: a pretrained encoder plus a task head shaped, named and initialised like the reference
implementations' (RoBERTa's classification head, or BERT's pooler and classifier); the batches it reads, its loss.

Why it exists: the paper's per-task head learning rates only mean the same thing here if the head is the same
module as in the official scripts; the adapter goes into the encoder, and the head trains fully beside it.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrained.tokenizer import pad

class RobertaHead(nn.Module):
    """First token -> dropout -> dense -> tanh -> dropout -> out_proj (RobertaClassificationHead)."""

    def __init__(self, hidden, n_out, p):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(p)
        self.out_proj = nn.Linear(hidden, n_out)

    def forward(self, h):
        x = self.dropout(h[:, 0])
        x = self.dropout(torch.tanh(self.dense(x)))
        return self.out_proj(x)


class GlueModel(nn.Module):
    def __init__(self, encoder, n_out):
        super().__init__()
        self.encoder = encoder
        cfg = encoder.config
        hidden = cfg["hidden_size"]
        p = cfg.get("classifier_dropout")
        p = cfg.get("hidden_dropout_prob", 0.1) if p is None else p
        # BERT's head reads the pretrained pooler; RoBERTa's (and a BERT checkpoint saved without a pooler)
        # learns its own dense+tanh instead.
        self.use_pooler = "roberta" not in cfg.get("model_type", "") and encoder.pooler is not None
        if self.use_pooler:
            self.dropout = nn.Dropout(p)
            self.classifier = nn.Linear(hidden, n_out)
        else:
            self.classifier = RobertaHead(hidden, n_out, p)
        # The reference models initialise heads N(0, initializer_range), zero bias.
        std = cfg.get("initializer_range", 0.02)
        for m in self.classifier.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)

    def forward(self, input_ids, attention_mask, token_type_ids):
        h = self.encoder(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        if self.use_pooler:
            return self.classifier(self.dropout(self.encoder.pooler(h)))
        return self.classifier(h)


def batches(examples, index, size, pad_id, regression, device):
    """Yield (ids, mask, types, labels) of the examples at `index`, `size` at a time, padded only to the longest in
    each batch; examples: (encoded, labels), encoded: (token ids, type ids) per example."""
    encoded, labels = examples
    for i in range(0, len(index), size):
        rows = [encoded[j] for j in index[i:i + size]]
        ids = pad([x for x, _ in rows], pad_id)
        types = pad([t for _, t in rows], 0)
        mask = pad([[1] * len(x) for x, _ in rows], 0)
        y = torch.tensor([labels[j] for j in index[i:i + size]], dtype=torch.float32 if regression else torch.long)
        yield ids.to(device), mask.to(device), types.to(device), y.to(device)


def loss_sum(out, y, regression):
    """Mean squared error (regression: STS-B) or cross-entropy, summed, not averaged: the caller divides by the
    examples in the whole (accumulated) batch, which is exact even when micro-batches differ in size."""
    if regression:
        return F.mse_loss(out.float().squeeze(-1), y, reduction="sum")
    return F.cross_entropy(out.float(), y, reduction="sum")
