"""The --method switch of both scripts: which adapter a run trains, new or read back from a saved run, and how it is
folded into the model for evaluation.

Why it exists: the method is the one thing a comparison changes. Uni-LoRA (theta_d through P) and the plain LoRA
baseline go through the same call here, so that every other step of a script is the same for both; a method
without an adapter (train_glue's head only, train_math's base model) gets None.
"""
from dataclasses import dataclass

import torch

from projections import PROJECTIONS, apply_lora
from unilora import apply_unilora, load_unilora


@dataclass
class AdapterSettings:
    method: str                    # "unilora", "lora"; anything else: no adapter
    d: int | None = None           # Uni-LoRA: the length of theta_d
    r: int = 4                     # the LoRA rank of both methods
    alpha: float | None = None     # LoRA: scale alpha / r (None: alpha = r)
    signs: bool = False            # Uni-LoRA: the paper's all-positive P (True: random +-1 per row, ours)
    projection: str | None = None  # Uni-LoRA: a name in projections.PROJECTIONS (None: "balanced", the paper's P)
    seed: int = 0
    targets: tuple | None = None   # module-name suffixes to adapt (None: the library's default)
    dropout: float = 0.0


def build_adapter(model, settings: AdapterSettings, saved=None, keep_trainable=()):
    """Patch `model` with the adapter of settings.method and return its handle (None for a method without one).
    saved: the adapter.pt of a saved run; Uni-LoRA rebuilds itself from the file (its d, signs, seed and P), LoRA
    is built from `settings` and then loaded. keep_trainable: modules that train beside it (a task head)."""
    s = settings
    projection = PROJECTIONS[s.projection or "balanced"]  # runs saved before --projection existed: balanced
    if s.method == "unilora":
        if saved:
            return load_unilora(model, saved, projection=projection)
        return apply_unilora(model, s.d, r=s.r, targets=s.targets, seed=s.seed, signs=s.signs, dropout=s.dropout,
                             keep_trainable=keep_trainable, projection=projection)
    if s.method == "lora":
        adapter = apply_lora(model, r=s.r, alpha=s.alpha, targets=s.targets, dropout=s.dropout,
                             keep_trainable=keep_trainable)
        return adapter.load(saved) if saved else adapter
    return None


def merge_for_eval(model, adapter, probe, autocast):
    """Fold dW = B A into W, in fp32 and outside autocast (autocast would round B A to 16 bits); returns the plain
    model and the largest logit change merging caused on one probe sequence."""
    model.eval()
    with torch.no_grad(), autocast():
        before = model(probe).float()
    with torch.autocast(probe.device.type, enabled=False):
        model = adapter.merge()
    with torch.no_grad(), autocast():
        gap = (model(probe).float() - before).abs().max().item()
    return model, gap
