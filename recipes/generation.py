"""Decoding and scoring text with a causal LM: generation with the KV cache (greedy, or seeded sampling at a
temperature; batches left-padded, stopping at the end token or a stop string), cut_at_stop, and the teacher-forced
log-likelihood of a reference answer.

Why it exists: generation is the slow half of the math experiment and of MT-Bench, and its rules are part of their
protocols (which stops end a completion, how many tokens it may take, when to sample and at which temperature), so
they live apart from training, in one short file.
"""
from dataclasses import dataclass

import numpy as np
import torch

from pretrained.decoder import KVCache
from pretrained.tokenizer import pad
from recipes.training import gather_shares, my_share


def at_least_fp32(logits):
    """Softmax over a large vocabulary in fp32 at least (float64 runs stay float64)."""
    return logits if logits.dtype == torch.float64 else logits.float()


@torch.no_grad()
def answer_loglik(model, items, pad_id, batch_size, autocast, ranks):
    """Teacher-forced log p(reference solution | training prompt), averaged over the solution's tokens for each
    problem (EOS excluded), then over problems.  It moves smoothly where a small model's accuracy sits near 0.
    Each copy scores its share of the problems, on its device."""
    model.eval()
    items, scores = my_share(items, ranks), []
    for i in range(0, len(items), batch_size):
        scores += answer_logliks(model, items[i:i + batch_size], pad_id, autocast, ranks.device)
    return float(np.mean(gather_shares(scores, ranks)))


@torch.no_grad()
def answer_logliks(model, chunk, pad_id, autocast, device):
    """answer_loglik of each problem of one batch (right-padded), as a list."""
    seqs = [it["prompt_ids"] + it["answer_ids"] for it in chunk]
    ids, mask = pad(seqs, pad_id).to(device), pad([[1] * len(s) for s in seqs], 0).to(device)
    lab = pad([[-100] * len(it["prompt_ids"]) + it["answer_ids"] for it in chunk], -100).to(device)
    with autocast():
        logits = model(ids, attention_mask=mask)
    target = lab[:, 1:]
    keep = target != -100
    sel = at_least_fp32(logits[:, :-1][keep])  # the answer positions only
    lp = torch.zeros(target.shape, device=device, dtype=sel.dtype)
    lp[keep] = sel.gather(1, target[keep][:, None])[:, 0] - torch.logsumexp(sel, dim=-1)
    return (lp.sum(1) / keep.sum(1)).tolist()


def cut_at_stop(text, stop):
    """The text before the earliest stop string (what vLLM returns when a stop string ends generation)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


@dataclass(frozen=True)
class Sampling:
    """Drawing each token from softmax(logits / temperature) instead of taking the argmax, as transformers'
    generate(do_sample=True) does: then top_k (0: off) and top_p (1: off) keep the likeliest tokens. Temperature 0 is
    greedy decoding (FastChat's rule). Every row draws with its own generator seeded with `seed`, so a row's text
    does not depend on the rows batched with it."""
    temperature: float
    seed: int = 0
    top_k: int = 0
    top_p: float = 1.0


def next_tokens(logits, sampling, generators):
    """The next token of every row: the argmax (greedy), or a draw from the row's own generator."""
    if sampling is None or sampling.temperature == 0:
        return logits.argmax(-1)
    logits = at_least_fp32(logits) / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if sampling.top_p < 1:  # the smallest set of likeliest tokens whose probabilities reach top_p
        ranked, order = logits.sort(dim=-1, descending=True)
        p = ranked.softmax(-1)
        before = p.cumsum(-1) - p  # the mass of the tokens ranked above
        logits = logits.scatter(-1, order, ranked.masked_fill(before >= sampling.top_p, -torch.inf))
    probs = logits.softmax(-1)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])


@torch.no_grad()
def generate(model, prompts, pad_id, end_id, max_new_tokens, stop, decode, device, autocast, sampling=None):
    """Decoding of a left-padded batch with the KV cache: greedy, or `sampling` (a Sampling). A row ends at the end
    token or as soon as its recent text holds a stop string; returns (new token ids, why it ended) per row."""
    ids, mask = pad(prompts, pad_id, left=True).to(device), pad([[1] * len(p) for p in prompts], 0, left=True)
    mask, cache = mask.to(device), KVCache()
    rows, why = [[] for _ in prompts], [None] * len(prompts)
    window = 4 * max(map(len, stop), default=0) + 4 * 8  # the last 8 tokens and a stop string, in bytes
    generators = [torch.Generator(device).manual_seed(sampling.seed) for _ in prompts] if sampling else None
    with autocast():
        logits = model(ids, mask, cache, last_only=True)[:, -1]
    for step in range(max_new_tokens):
        tokens = next_tokens(logits, sampling, generators)
        for i, t in enumerate(tokens.tolist()):
            if not why[i] and t == end_id:
                why[i] = "eos"
            elif not why[i]:
                rows[i].append(t)
        if stop and step % 8 == 7:  # looking every 8th token costs 8x less decoding and ends at most 7 tokens late
            for i, row in enumerate(rows):
                if not why[i] and any(s in decode(row[-window:]) for s in stop):
                    why[i] = "stop"
        if all(why) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        with autocast():
            logits = model(tokens[:, None], mask, cache, last_only=True)[:, -1]
    return rows, [w or "length" for w in why]
