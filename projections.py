"""Which P? The projections the paper's ablations compare, each a drop-in for Uni-LoRA's default.

unilora.py holds the method and its one projection (balanced, global, isometric); this file holds the variants
that test which of those properties matter, so the default path stays short. Each variant changes ONE property of
the default and keeps the others:

    kind        global  uniform  isometric  cost       what changes against `balanced`
    balanced    yes     yes      yes        O(D)       (the default: unilora.make_projection)
    iid         yes     ~        yes*       O(D)       each row's column uniform at random (the paper's text and
                                                        the legacy code): column loads vary, some columns unused
    local       no      yes      yes        O(D)       theta_d split across layers in proportion to their size,
                                                        each layer balanced on its own part (layer-wise)
    nonuniform  yes     no       yes        O(D)       A-rows and B-rows on separate column pools, one A-column
                                                        carrying `load_ratio` times the rows of a B-column
    nonorm      yes     yes      no         O(D)       the balanced index without 1/sqrt(n_j): P^T P = diag(n_j)
    fastfood    yes     yes      ~ (E=I)    O(D log d) stacked S H G Pi H B blocks (Le et al. 2013)
    gaussian    yes     yes      ~ (E=I)    O(D d)     dense N(0, 1/D) entries; small models only

    * iid is an isometry on the columns it uses; an unused column is a dead entry of theta_d.

Signs (a random +-1 per row) can be switched on or off on every index kind; fastfood and gaussian are signed by
construction. Every factory has the signature apply_unilora expects: `f(sizes, d, seed, signs) -> module`, with
sizes = [r*in_1, out_1*r, r*in_2, out_2*r, ...] (A_l then B_l of each adapted layer, D = sum(sizes)), and
`PROJECTIONS[kind]` is that factory (None for the default). The index kinds are pure functions returning
(signed int32 index, normalize), turned into unilora.IndexProjection modules (one gather forward, one index_add
backward); fastfood and gaussian are modules of their own, their random state regenerated from the seed.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import unilora

NONUNIFORM_LOAD_RATIO = 8  # rows per A-column / rows per B-column: a clear departure, both sides still trained
GAUSSIAN_MAX_ENTRIES = 2 ** 28  # D*d above this (1 GiB in fp32) is refused: use fastfood


# ----------------------------------------------------------------------------------------------------------
# Index variants: one nonzero per row, as the default, with another choice of columns or scale
# ----------------------------------------------------------------------------------------------------------

def iid_index(sizes: list[int], d: int, seed: int = 0, signs: bool = False) -> tuple[torch.Tensor, bool]:
    """Each row's column drawn uniformly at random, independently of the others (the paper's description)."""
    D = _total(sizes, d)
    generator = torch.Generator().manual_seed(seed)
    columns = torch.randint(0, d, (D,), generator=generator)
    return _with_signs(columns, d, generator, signs), True


def local_index(sizes: list[int], d: int, seed: int = 0, signs: bool = False) -> tuple[torch.Tensor, bool]:
    """Layer l draws only on its own contiguous range of columns, its width proportional to the layer's size."""
    _total(sizes, d)
    layer_sizes = [a + b for a, b in zip(sizes[0::2], sizes[1::2])]
    if d < len(layer_sizes):
        raise ValueError(f"local projection: d={d} is below the number of adapted layers ({len(layer_sizes)}); "
                         f"every layer needs at least one column of theta_d. Raise d or adapt fewer layers.")
    generator = torch.Generator().manual_seed(seed)
    widths = _apportion(layer_sizes, d)
    starts = [sum(widths[:l]) for l in range(len(widths))]
    columns = torch.cat([start + _balanced(rows, width, generator)
                         for rows, width, start in zip(layer_sizes, widths, starts)])
    return _with_signs(columns, d, generator, signs), True


def nonuniform_index(sizes: list[int], d: int, seed: int = 0, signs: bool = False,
                     load_ratio: float = NONUNIFORM_LOAD_RATIO) -> tuple[torch.Tensor, bool]:
    """A-rows on columns [0, d_A), B-rows on [d_A, d), each pool balanced and global across layers.

    As in VeRA and Tied-LoRA, A and B are projected from subspaces of different sizes: d_A is chosen so that an
    A-column carries `load_ratio` times as many rows as a B-column (d_A = d n_A / (n_A + load_ratio n_B), n_A and
    n_B the numbers of A- and B-rows). With `load_ratio` = 1 the split would be uniform again.
    """
    D = _total(sizes, d)
    if d < 2 or load_ratio <= 0:
        raise ValueError(f"nonuniform projection needs d >= 2 (got {d}) and load_ratio > 0 (got {load_ratio}).")
    is_a = torch.cat([torch.full((n,), i % 2 == 0) for i, n in enumerate(sizes)])
    n_a = sum(sizes[0::2])
    n_b = D - n_a
    d_a = min(max(round(d * n_a / (n_a + load_ratio * n_b)), 1), d - 1)
    if d - d_a > n_b:
        raise ValueError(f"nonuniform projection: the B pool ({d - d_a} columns) exceeds the {n_b} B-rows, so "
                         f"columns would stay unused; choose d below about {n_b + d_a} or a smaller load_ratio.")
    generator = torch.Generator().manual_seed(seed)
    columns = torch.empty(D, dtype=torch.long)
    columns[is_a] = _balanced(n_a, d_a, generator)
    columns[~is_a] = d_a + _balanced(n_b, d - d_a, generator)
    return _with_signs(columns, d, generator, signs), True


def nonorm_index(sizes: list[int], d: int, seed: int = 0, signs: bool = False) -> tuple[torch.Tensor, bool]:
    """The default balanced index, same seed, same rows, without 1/sqrt(n_j): only the isometry is lost."""
    return unilora.make_projection(_total(sizes, d), d, seed, signs), False


def as_module(idx: torch.Tensor, d: int, normalize: bool, kind: str) -> nn.Module:
    """A signed index as the core's projection module (one gather forward, one index_add backward)."""
    return unilora.IndexProjection(idx, d, normalize=normalize, kind=kind)


def _total(sizes: list[int], d: int) -> int:
    if not sizes or len(sizes) % 2 or any(not isinstance(n, int) or n < 1 for n in sizes):
        raise ValueError(f"sizes must list r*in_l, out_l*r (positive ints) for every adapted layer, got {sizes}.")
    D = sum(sizes)
    if not 1 <= d <= D:
        raise ValueError(f"d={d} must lie in [1, D] with D={D} (the total LoRA size); pick d well below D.")
    return D


def _balanced(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    """`rows` draws of columns 0..columns-1, each floor or ceil(rows/columns) times, in a random order."""
    return (torch.arange(rows) % columns)[torch.randperm(rows, generator=generator)]


def _with_signs(columns: torch.Tensor, d: int, generator: torch.Generator, signs: bool) -> torch.Tensor:
    """Fold a random sign into the index as unilora does: column + d means the row reads -theta_d[column]."""
    if signs:
        columns = columns + d * torch.randint(0, 2, columns.shape, generator=generator)
    return columns.to(torch.int32)


def _apportion(weights: list[int], total: int) -> list[int]:
    """Integer parts >= 1 summing to `total`, proportional to weights (largest remainder, Hamilton's method)."""
    quota = [total * w / sum(weights) for w in weights]
    parts = [max(1, math.floor(q)) for q in quota]
    while sum(parts) < total:  # the rest goes to the largest remainders
        j = max(range(len(parts)), key=lambda j: quota[j] - parts[j])
        parts[j] += 1
    while sum(parts) > total:  # only when a tiny layer was lifted to 1: take from the part furthest above its quota
        j = max((j for j in range(len(parts)) if parts[j] > 1), key=lambda j: parts[j] - quota[j])
        parts[j] -= 1
    return parts


def _index_kind(index: Callable, kind: str) -> Callable:
    def factory(sizes: list[int], d: int, seed: int = 0, signs: bool = False) -> nn.Module:
        idx, normalize = index(sizes, d, seed, signs)
        return as_module(idx, d, normalize, kind)
    factory.__name__ = kind
    return factory


# ----------------------------------------------------------------------------------------------------------
# Dense-in-effect projections: every entry of theta_D depends on every entry of theta_d
# ----------------------------------------------------------------------------------------------------------

def hadamard(x: torch.Tensor) -> torch.Tensor:
    """x H along the last dim, H the unnormalised Sylvester-Hadamard matrix (H^T H = n I), in O(n log n).

    Butterflies on pairs (i, i + h) within blocks of 2h, h = 1, 2, 4, ...; plain torch ops, so autograd gives the
    backward (H is symmetric: the backward is the same transform).
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"hadamard needs a power-of-2 length, got {n}")
    h = 1
    while h < n:
        pairs = x.reshape(*x.shape[:-1], n // (2 * h), 2, h)
        x = torch.stack([pairs[..., 0, :] + pairs[..., 1, :], pairs[..., 0, :] - pairs[..., 1, :]], dim=-2)
        x = x.reshape(*x.shape[:-3], n)
        h *= 2
    return x


class Fastfood(nn.Module):
    """theta_D = S [H G_b Pi_b H B_b pad(theta_d)]_b: ceil(D/L) blocks of size L = 2^ceil(log2 d), first D rows.

    Per block: B_b random +-1, H Walsh-Hadamard (unnormalised), Pi_b a random permutation, G_b Gaussian rescaled to
    ||G_b||^2 = L (the legacy code's divisor). Every row m of a block then has E[m m^T] = L I exactly, so the
    scalar S = 1/sqrt(D L) gives E[P^T P] = I_d; Fastfood's chi-distributed row scales (there to mimic Gaussian
    rows in kernel approximations) would add variance and nothing to that expectation. Cost O(D log d) time,
    about 9 bytes per row of state (int8 B, int32 Pi, fp32 G), all regenerated from the seed.
    """
    kind = "fastfood"

    def __init__(self, sizes: list[int], d: int, seed: int = 0, signs: bool = False):
        super().__init__()
        _signed_by_construction(self.kind, signs)
        self.D, self.d, self.seed = _total(sizes, d), d, seed
        self.block = 1 << (d - 1).bit_length()
        blocks = -(-self.D // self.block)
        generator = torch.Generator().manual_seed(seed)
        flips = 1 - 2 * torch.randint(0, 2, (blocks, self.block), generator=generator, dtype=torch.int8)
        perm = torch.stack([torch.randperm(self.block, generator=generator) for _ in range(blocks)])
        perm += self.block * torch.arange(blocks)[:, None]  # flat positions, so one index_select permutes every block
        gauss = torch.randn(blocks, self.block, generator=generator)
        gauss *= math.sqrt(self.block) / gauss.norm(dim=1, keepdim=True)
        for name, value in (("flips", flips), ("perm", perm.flatten().to(torch.int32)), ("gauss", gauss)):
            self.register_buffer(name, value, persistent=False)  # the seed regenerates them: not in state_dict

    def forward(self, theta_d: torch.Tensor) -> torch.Tensor:
        x = F.pad(theta_d, (0, self.block - self.d)) * self.flips.to(theta_d.dtype)  # B, every block at once
        x = hadamard(x).flatten().index_select(0, self.perm).view_as(x)  # Pi H
        x = hadamard(x * self.gauss.to(theta_d.dtype))  # H G
        return x.flatten()[:self.D] / math.sqrt(self.D * self.block)

    def config(self) -> dict:
        return {"kind": self.kind, "D": self.D, "d": self.d, "seed": self.seed, "block": self.block}

    def fingerprint(self) -> str:
        return _digest(self.flips, self.perm, self.gauss)


class Gaussian(nn.Module):
    """theta_D = M theta_d, M dense with i.i.d. N(0, 1/D) entries, so that E[M^T M] = I_d. O(D d) time and memory."""
    kind = "gaussian"

    def __init__(self, sizes: list[int], d: int, seed: int = 0, signs: bool = False):
        super().__init__()
        _signed_by_construction(self.kind, signs)
        self.D, self.d, self.seed = _total(sizes, d), d, seed
        if self.D * d > GAUSSIAN_MAX_ENTRIES:
            raise ValueError(f"gaussian projection: a dense {self.D} x {d} matrix ({self.D * d * 4 / 2 ** 30:.1f} GiB "
                             f"in fp32) is over the limit of {GAUSSIAN_MAX_ENTRIES:,} entries; use fastfood "
                             f"(O(D log d)), a smaller d, or fewer adapted layers.")
        generator = torch.Generator().manual_seed(seed)
        matrix = torch.randn(self.D, d, generator=generator) / math.sqrt(self.D)
        self.register_buffer("matrix", matrix, persistent=False)

    def forward(self, theta_d: torch.Tensor) -> torch.Tensor:
        return self.matrix.to(theta_d.dtype) @ theta_d

    def config(self) -> dict:
        return {"kind": self.kind, "D": self.D, "d": self.d, "seed": self.seed}

    def fingerprint(self) -> str:
        return _digest(self.matrix)


def _signed_by_construction(kind: str, signs: bool) -> None:
    if not signs:
        raise ValueError(f"{kind} projection: its P has random signs by construction, and signs=False (the paper's "
                         f"all-positive P, --no-signs) applies to index projections only; pass signs=True (--signs).")


def _digest(*tensors: torch.Tensor) -> str:
    """A short hash of the random state that defines P, saved with theta_d to catch a different RNG at load."""
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        digest.update(ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()))
    return digest.hexdigest()[:16]


# kind -> factory(sizes, d, seed, signs) for apply_unilora(..., projection=...); None is unilora's own default.
PROJECTIONS = {
    "balanced": None,
    "iid": _index_kind(iid_index, "iid"),
    "local": _index_kind(local_index, "local"),
    "nonuniform": _index_kind(nonuniform_index, "nonuniform"),
    "nonorm": _index_kind(nonorm_index, "nonorm"),
    "fastfood": Fastfood,
    "gaussian": Gaussian,
}


# ----------------------------------------------------------------------------------------------------------
# The LoRA baseline: P = I in the unified view (d = D, every LoRA entry trained), for side-by-side comparisons
# ----------------------------------------------------------------------------------------------------------

class LoRALinear(unilora.AdaptedLinear):
    """base(x) + (alpha/r) dropout(x) A^T B^T with A Kaiming-uniform and B = 0 (Hu et al., 2021)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, dropout)
        self.r, self.scaling = r, alpha / r
        device, dtype = unilora.base_device_dtype(base)  # an nn.Linear, or a quantized base (NF4)
        dtype = torch.promote_types(torch.float32, dtype)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # what nn.Linear does for its own weight

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A, self.lora_B * self.scaling

    def _apply(self, fn, recurse=True):
        for child in self.children():
            child._apply(fn)
        unilora.keep_fp32([self.lora_A, self.lora_B], fn)  # like theta_d: A and B stay fp32 in a 16-bit model
        return self


class LoRA(unilora.Adapter):
    """The handle `apply_lora` returns: the same save/load/merge/export/count API as unilora.UniLoRA."""
    identity_keys = ("layers", "r", "alpha", "keep_trainable")
    schema = {"r": int, "alpha": (int, float), "layers": list}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{n}.{k}": getattr(m, k) for n, m in self.layers() for k in ("lora_A", "lora_B")}


def apply_lora(model: nn.Module, *, r: int = 4, alpha: float | None = None, targets: unilora.Targets = None,
               dropout: float = 0.0, keep_trainable: Sequence[str] = ()) -> LoRA:
    """Patch `model` with plain LoRA on the same targets as apply_unilora would use; alpha defaults to r."""
    unilora.check_settings(r, dropout)
    alpha = float(alpha or r)
    keep = unilora.resolve_keep(model, keep_trainable)
    names = unilora.find_targets(model, targets, dropout, keep)
    unilora.swap_layers(model, names, keep, lambda i, base: LoRALinear(base, r, alpha, dropout))
    layers = [[n, model.get_submodule(n).in_features, model.get_submodule(n).out_features] for n in names]
    return LoRA(model, names, {"format": "lora-adapter/1", "r": r, "alpha": alpha, "dropout": dropout,
                               "layers": layers, "keep_trainable": keep})
