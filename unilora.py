"""Uni-LoRA: one trainable vector for all LoRA layers of a model (Li et al., NeurIPS 2025, arXiv 2506.00799).

This file is the whole method. It depends on torch only and can be copied into any project.

The math, in the paper's notation
---------------------------------
LoRA adapts each targeted linear layer l (weight W_l, out_l x in_l) with a low-rank update

    W_l x  ->  W_l x + B_l A_l x,        A_l: r x in_l,   B_l: out_l x r.

Flatten every A_l and B_l, layer after layer, into one long vector

    theta_D = [vec(A_1), vec(B_1), vec(A_2), vec(B_2), ...],      D = sum_l r (in_l + out_l),

(layers in `model.named_modules()` order, each matrix row-major). Uni-LoRA never trains theta_D. It trains one
vector theta_d of length d << D and reconstructs

    theta_D = P theta_d,       P in R^{D x d},

where row i of P holds a single nonzero, at column j = idx_i, of value s_i / sqrt(n_j):
  - idx is a *balanced* assignment: every column j is used n_j = floor(D/d) or ceil(D/d) times, and the
    assignment is a seeded random shuffle over the WHOLE model (the projection is global: every layer draws
    on all of theta_d);
  - s_i = +-1 is a random sign (count-sketch style), or s_i = +1 with `signs=False`, which is the paper's P
    and the P of the official code and of PEFT's port.
Since P has one nonzero per row, its columns have disjoint supports and unit norm, so P^T P = I_d: P is an
exact isometry, ||P x|| = ||x||. Gradients flow back through P^T: one SGD step with rate lr moves every LoRA
entry i of group j = {i : idx_i = j} by -lr s_i mean_{k in j}(s_k g_k), g the gradient with respect to theta_D.

P is never materialised. Write P = S Lambda with Lambda = diag(1/sqrt(n_j)) (n_j counted from idx) and S the
D x d matrix of signs. The sign is folded into the index: row i reads entry idx_i + d [s_i = -1] of the doubled
vector [u; -u], so P theta_d is ONE gather from [Lambda theta_d; -Lambda theta_d] (itself one multiply of
theta_d by the 2 x d table [Lambda; -Lambda]), and P^T g is one scatter-add (index_add) into 2d slots, then
Lambda (first half minus second half). P costs one int32 per LoRA entry.

One projection per forward pass. Every adapted layer holds the same `SharedVector` (theta_d, P, the layers'
shapes). The first layer that runs computes theta_D = P theta_d (the gather above), splits it once into
(A_1, B_1, A_2, B_2, ...) and caches these views; every other layer takes its own (A_l, B_l) from the cache.
The backward therefore gathers the layers' gradients back into one vector of D numbers and runs one scatter-add,
whatever the number of layers. theta_D and that gradient vector are two buffers rewritten in place from pass to
pass (a fresh D-sized tensor costs a CPU more in page faults than the gather itself), once the graph that last
used them has been backpropagated: a graph still waiting for its backward keeps its values. Only a graph
backpropagated once, kept (retain_graph=True) and backpropagated again after theta_D was recomputed finds them
overwritten; torch then raises (the (A, B) it saved were modified in place) rather than give a wrong gradient.
theta_D is recomputed after every torch.optim step and every other in-place write to theta_d (load(), copy_ under
no_grad: its version counter), when theta_d moves (model.to()), and when the grad mode differs (no_grad,
inference_mode). Not seen: writes through `theta_d.data` and optimizers outside torch.optim that write without
moving the version counter; call `adapter.refresh()` after those. Under torch.compile the projection runs outside
the compiled graph (a graph break), still once per pass.

theta_d starts at U(-0.02, 0.02), not at zero: B A is quadratic in theta_d, so theta_d = 0 is a saddle
point with an exactly zero gradient. There is no alpha/r scaling (dW = B A), as in the official code.
Dropout, if any, is applied to x before A. After training, dW = B A is merged into W: zero inference cost.

Numerics: theta_d and its gradient stay fp32 whatever the model is cast to (fp64 next to an fp64 model). The
low-rank path x A^T B^T runs in the activations' dtype, like the base layer's own matmul it is added to: a bf16
model stays bf16 end to end, with no fp32 copy of the activations. `layer.weight` and merge() compute W + B A
in at least fp32 with autocast off, rounded once to W's dtype.

The adapter file is theta_d plus the seed and the config that regenerate P ("one vector"), plus whatever else
was trained (the `keep_trainable` modules, e.g. a classification head).

The file reads in that order: the projection, the layers, target selection, the adapter (save, load, merge,
export, counts), `apply_unilora`, and last a plain LoRA baseline for side-by-side comparisons.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import inspect
import json
import math
import os
import re
import tempfile
from typing import Callable, Iterable, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

FILE_FORMAT = "unilora-adapter/1"
DEFAULT_EXCLUDED = ("lm_head", "classifier", "score")  # output heads are trained fully or left alone, never adapted
Targets = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]


# ----------------------------------------------------------------------------------------------------------
# The projection P = S Lambda
# ----------------------------------------------------------------------------------------------------------

def make_projection(D: int, d: int, seed: int = 0, signs: bool = True) -> torch.Tensor:
    """Regenerate P from (D, d, seed, signs) as its signed index: int32 [D] with values in [0, 2d).

    Row i of P has its nonzero in column idx_i mod d, negative iff idx_i >= d. Column j is used
    n_j = floor(D/d) + (j < D mod d) times: the columns are `arange(D) % d`, shuffled. A CPU generator makes P
    identical on every device; the draws are, in order: the shuffle, then the signs.
    """
    _check_d(D, d)
    generator = torch.Generator().manual_seed(seed)
    idx = (torch.arange(D) % d)[torch.randperm(D, generator=generator)]
    if signs:
        idx += d * torch.randint(0, 2, (D,), generator=generator)
    return idx.to(torch.int32)


def _check_d(D: int, d: int) -> None:
    if not 1 <= d <= D:
        raise ValueError(f"d={d} must lie in [1, D] with D={D} (the total LoRA size r*(in+out) summed over the "
                         f"targeted layers). Pick d well below D, e.g. D/6 as in the paper's GLUE recipe "
                         f"(d = 23,040 of D = 147,456), or target more layers / raise r.")


class _Gather(torch.autograd.Function):
    """theta_D = one gather from [Lambda theta_d; -Lambda theta_d], written into `out`; backward P^T g = one
    scatter-add into 2d slots."""

    @staticmethod
    def forward(ctx, theta_d: torch.Tensor, idx: torch.Tensor, scale: torch.Tensor, out: torch.Tensor):
        # Plain attributes, not save_for_backward: nothing is freed by a backward, so the cached theta_D can be
        # backpropagated again (gradient accumulation, two losses of one forward).
        ctx.idx, ctx.scale = idx, scale
        torch.index_select((theta_d * scale).view(-1), 0, idx, out=out)  # scale = [Lambda; -Lambda], 2 x d
        ctx.mark_dirty(out)  # `out` is overwritten: autograd must refuse graphs that saved its old values
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        slots = grad.new_zeros(ctx.scale.numel()).index_add_(0, ctx.idx, grad)
        return (slots.view_as(ctx.scale) * ctx.scale).sum(0), None, None, None


class IndexProjection(nn.Module):
    """P with one nonzero per row, given as its signed index idx (int [D], values in [0, 2d)): row i reads column
    idx_i mod d, negated iff idx_i >= d, scaled by Lambda_j = 1/sqrt(n_j), n_j the number of rows using column j
    (0 for a column no row uses), or Lambda = I with normalize=False. forward(theta_d) -> theta_D.
    """

    def __init__(self, idx: torch.Tensor, d: int, normalize: bool = True, kind: str = "balanced"):
        super().__init__()
        if idx.dim() != 1 or idx.is_floating_point() or not 0 <= int(idx.min()) <= int(idx.max()) < 2 * d:
            raise ValueError(f"idx must be a 1-D integer tensor with values in [0, 2d) = [0, {2 * d})")
        self.d, self.normalize, self.kind = d, normalize, kind
        counts = torch.bincount(idx.long() % d, minlength=d)
        # Non-persistent: the seed regenerates P, a model's state_dict never carries it. Counts, not Lambda, are
        # kept so that no float buffer is ever cast by model.to(dtype); Lambda is made in theta_d's dtype.
        self.register_buffer("idx", idx.to(torch.int32), persistent=False)
        self.register_buffer("counts", counts.to(torch.int32), persistent=False)
        self._scale = None

    def signed_scale(self, dtype: torch.dtype) -> torch.Tensor:
        """[Lambda; -Lambda] (2 x d) in `dtype`, made once per dtype and device."""
        if self._scale is None or self._scale.dtype != dtype or self._scale.device != self.counts.device:
            with torch.inference_mode(False), torch.no_grad():  # a plain tensor, even if first made for inference
                lam = self.counts.to(dtype).rsqrt().nan_to_num(posinf=0.0) if self.normalize else \
                    torch.ones(self.d, dtype=dtype, device=self.counts.device)
                self._scale = torch.stack([lam, -lam])
        return self._scale

    def forward(self, theta_d: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """theta_D, written into the memory of `out` (a buffer of D numbers, reused from pass to pass) when given."""
        # detach(): the result's history must not chain to the graph that last wrote the buffer (it shares the
        # buffer's version counter, so that graph still sees the write).
        out = theta_d.new_empty(self.idx.shape) if out is None else out.detach()
        return _Gather.apply(theta_d, self.idx, self.signed_scale(theta_d.dtype), out)

    def config(self) -> dict:
        return {"kind": self.kind, "normalize": self.normalize}

    def fingerprint(self) -> str:
        """A short hash of P, saved with theta_d, so that a P regenerated by a different RNG is caught at load."""
        idx = self.idx.detach().cpu().contiguous()
        data = ctypes.string_at(idx.data_ptr(), idx.numel() * idx.element_size())
        return hashlib.sha256(data + (b"" if self.normalize else b"nonorm")).hexdigest()[:16]


def balanced_projection(sizes: list[int], d: int, seed: int, signs: bool) -> IndexProjection:
    """The paper's P and the default `projection` factory: one balanced, seeded, global index over all of D."""
    return IndexProjection(make_projection(sum(sizes), d, seed, signs), d)


class _Split(torch.autograd.Function):
    """theta_D -> (A_1, B_1, A_2, ...) as views; backward: their gradients written once into one vector of D
    (the pass's gradient buffer, when it has _Buffers).

    Transformer layers repeat one block of shapes (q, k, v, o, ...), `period` shapes long. Seen as (blocks, block
    size), theta_D splits by column into one (blocks, rows, cols) tensor per position in the block, whose rows are
    that position's matrices in every block. Views are made, and gradients copied, one position at a time: the
    Python work is set by the block, not by the number of layers, and there is one autograd node in all."""

    @staticmethod
    def forward(ctx, theta_D: torch.Tensor, shapes: list[tuple[int, int]], period: int, buffers: _Buffers | None):
        blocks, block_sizes = len(shapes) // period, [rows * cols for rows, cols in shapes[:period]]
        ctx.shapes, ctx.blocks, ctx.block_sizes, ctx.buffers = shapes, blocks, block_sizes, buffers
        columns = theta_D.reshape(blocks, -1).split(block_sizes, dim=1)
        by_position = [column.view(blocks, *shape).unbind(0) for column, shape in zip(columns, shapes)]
        return tuple(by_position[j][i] for i in range(blocks) for j in range(period))

    @staticmethod
    def backward(ctx, *grads):  # a layer that did not run gets zeros (materialized by autograd)
        period, buffers = len(ctx.block_sizes), ctx.buffers
        # A pass with _Buffers that has a backward was made in grad mode, so it has a gradient buffer.
        grad = grads[0].new_empty(ctx.blocks * sum(ctx.block_sizes)) if buffers is None else buffers.grad
        for j, column in enumerate(grad.view(ctx.blocks, -1).split(ctx.block_sizes, dim=1)):
            torch.stack(grads[j::period], out=column.view(ctx.blocks, *ctx.shapes[j]))
        if buffers is not None:
            buffers.backpropagated = True
        return grad, None, None, None


class _Buffers:
    """The memory behind one pass: theta_D and (in grad mode) its gradient. A later pass writes into the same memory
    once this pass's graph has been backpropagated, or if it never had one: a graph still waiting for its backward
    (a second forward first, two losses) keeps its values. Apart from _Pass so that _Split's node, which marks it
    backpropagated, holds no reference back to the views it made (no reference cycle through autograd)."""

    def __init__(self, theta_D: torch.Tensor, grad: torch.Tensor | None):
        self.theta_D, self.grad, self.backpropagated = theta_D, grad, False

    def reusable_for(self, theta: torch.Tensor) -> bool:
        graph_done = self.backpropagated or not self.theta_D.requires_grad
        return graph_done and self.theta_D.dtype == theta.dtype and self.theta_D.device == theta.device


class _Pass:
    """What one pass computed: the state of theta_d it saw, every layer's (A, B), and the memory behind them."""

    def __init__(self, state: tuple | None, pieces: tuple, buffers: _Buffers | None):
        self.state, self.factors, self.buffers = state, list(zip(pieces[0::2], pieces[1::2])), buffers


class SharedVector(nn.Module):
    """theta_d (the only trainable tensor), its projection P, and theta_D = P theta_d cached for the current pass.

    shapes: [(r, in_1), (out_1, r), (r, in_2), ...], the shapes of A_1, B_1, A_2, ... in theta_D's order.
    """

    def __init__(self, theta_d: nn.Parameter, projection: nn.Module, shapes: list[tuple[int, int]]):
        super().__init__()
        self.theta_d, self.projection, self.shapes = theta_d, projection, shapes
        # The length of the block of shapes that the layers repeat (see _Split), or all shapes.
        self.period = next(p for p in range(1, len(shapes) + 1)
                           if len(shapes) % p == 0 and shapes == shapes[:p] * (len(shapes) // p))
        self._cache = {}  # (grad mode, inference mode) -> _Pass
        # A projection that can write theta_D into a given tensor gets one, reused from pass to pass (see _project).
        self._writes_in_place = "out" in inspect.signature(projection.forward).parameters

    def factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's (A, B): views of one theta_D, recomputed only when theta_d or the grad mode changed."""
        if torch.compiler.is_compiling():  # a traced graph would freeze the cache: compute it outside the graph
            from torch import _dynamo  # loaded already when compiling; importing it at start-up costs seconds
            return _dynamo.disable(self._factors)()
        return self._factors()

    def _factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # Run by every layer in every pass: read the registries directly, nn.Module's attribute lookup costs
        # microseconds, which hundreds of layers turn into a sizeable share of the projection itself.
        theta = self._parameters["theta_d"]
        mode = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        state = (_optimizer_steps[0], theta._version, theta.data_ptr(), theta.device, theta.dtype, theta.requires_grad)
        cached = self._cache.get(mode)
        if cached is None or cached.state != state:
            cached = self._cache[mode] = self._project(theta, state, cached)
        return cached.factors

    def _project(self, theta: torch.Tensor, state: tuple, last: _Pass | None) -> _Pass:
        """theta_D = P theta_d, split into the layers' (A, B).

        On a CPU a fresh tensor of D numbers costs more in page faults than the gather itself, so a projection that
        can write in place writes theta_D (and _Split its gradient) into the memory of the last pass in this grad
        mode when that is free (see _Buffers), and into new memory otherwise.
        """
        if not self._writes_in_place:
            return _Pass(state, _Split.apply(self.projection(theta), self.shapes, self.period, None), None)
        if last is not None and last.buffers.reusable_for(theta):
            theta_D, grad = last.buffers.theta_D, last.buffers.grad
        else:
            theta_D, grad = theta.new_empty(sum(rows * cols for rows, cols in self.shapes)), None
        if grad is None and torch.is_grad_enabled() and theta.requires_grad:
            grad = torch.empty_like(theta_D)
        buffers = _Buffers(self.projection(theta, out=theta_D), grad)
        return _Pass(state, _Split.apply(buffers.theta_D, self.shapes, self.period, buffers), buffers)

    def refresh(self) -> None:
        for cached in self._cache.values():
            cached.state = None  # stale: recomputed by the next pass (into the same memory, once free)

    def __getstate__(self):  # deepcopy and pickle: cached tensors carry an autograd graph, never copy them
        return dict(self.__dict__, _cache={})

    def _apply(self, fn, recurse=True):
        device = _follow_in_fp32([self.theta_d], fn)
        self.projection._apply(lambda t: t.to(device))  # P moves with the model, but is never cast
        self._cache.clear()
        return self


# Fused optimizers (AdamW(fused=True), ...) write parameters without moving their version counter: count every
# torch.optim step, so that a step always invalidates theta_D.
_optimizer_steps = [0]


def _count_step(optimizer, args, kwargs) -> None:
    _optimizer_steps[0] += 1


register_optimizer_step_post_hook(_count_step)


def _follow_in_fp32(params: list[nn.Parameter], fn) -> torch.device:
    """Move params (and their grads) to the device fn sends the model to, in fp32 or wider (fp64 with an fp64
    model): optimizer state and updates of a few trained numbers must not be rounded through 16 bits."""
    probe = fn(torch.empty(0, dtype=params[0].dtype, device=params[0].device))
    dtype = torch.promote_types(torch.float32, probe.dtype) if probe.is_floating_point() else params[0].dtype
    for p in params:
        p.data = p.data.to(probe.device, dtype)
        if p.grad is not None:
            p.grad = p.grad.to(probe.device, dtype)
    return probe.device


# ----------------------------------------------------------------------------------------------------------
# The layers
# ----------------------------------------------------------------------------------------------------------

class AdaptedLinear(nn.Module):
    """base(x) + dropout(x) A^T B^T, and `weight` / `bias` like the nn.Linear it replaces, for code that reads
    them instead of calling forward (nn.MultiheadAttention's out_proj, nn.TransformerEncoderLayer's fast path).
    Subclasses give lora_factors() -> (A, B)."""

    def __init__(self, base: nn.Linear, dropout: float):
        super().__init__()
        self.base, self.in_features, self.out_features = base, base.in_features, base.out_features
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B = (t.to(x.device, x.dtype) for t in self.lora_factors())
        return self.base(x) + F.linear(F.linear(self.dropout(x), A), B)

    @property
    def weight(self) -> torch.Tensor:
        """W + B A, differentiable, in W's dtype: computed in at least fp32 with autocast off, rounded once."""
        W, (A, B) = self.base.weight, self.lora_factors()
        dtype = torch.promote_types(torch.float32, W.dtype)
        with torch.autocast(W.device.type, enabled=False):
            return (W.to(dtype) + B.to(W.device, dtype) @ A.to(W.device, dtype)).to(W.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias


class UniLoRALinear(AdaptedLinear):
    """An adapted layer whose (A, B) are its rows of theta_D = P theta_d, taken from the SharedVector."""

    def __init__(self, base: nn.Linear, shared: SharedVector, index: int, dropout: float = 0.0):
        super().__init__(base, dropout)
        self.shared, self.index = shared, index  # the same SharedVector in every layer, like a tied weight
        self.r = shared.shapes[2 * index][0]

    @property
    def theta_d(self) -> nn.Parameter:
        return self.shared.theta_d

    @property
    def size(self) -> int:
        return self.r * (self.in_features + self.out_features)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._modules["shared"].factors()[self.index]  # see SharedVector._factors: a direct lookup

    def extra_repr(self) -> str:
        return f"r={self.r}, layer {self.index} of theta_D"


# ----------------------------------------------------------------------------------------------------------
# Choosing the layers
# ----------------------------------------------------------------------------------------------------------

def find_targets(model: nn.Module, targets: Targets, dropout: float = 0.0, keep: Sequence[str] = ()) -> list[str]:
    """Names of the nn.Linear modules selected by `targets`, in named_modules() order (the order of theta_D).

    targets: None: every nn.Linear except heads (a name component in DEFAULT_EXCLUDED) and the modules in `keep`
                   (trained fully, see keep_trainable);
             list/tuple of str: module-name suffixes ("query" matches "encoder.layer.0.attention.self.query");
             str: a regex that must match the whole module name; callable(name, module) -> bool.
    A selected layer that cannot be adapted exactly (see _why_not_adaptable) is an error, never skipped.
    """
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            raise ValueError(f"the model already has adapter layers (e.g. '{name}'): adapters cannot be stacked. "
                             f"Call merge() on the existing adapter first, or start from a fresh model.")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    def kept(name):
        return next((k for k in keep if _has_prefix(name, k)), None)
    if targets is None:
        chosen = [n for n in linears if not set(n.split(".")) & set(DEFAULT_EXCLUDED) and not kept(n)]
    elif isinstance(targets, str):
        chosen = [n for n in linears if re.fullmatch(targets, n)]
    elif callable(targets):
        chosen = [n for n, m in linears.items() if targets(n, m)]
    else:
        suffixes = list(targets)
        chosen = [n for n in linears if any(_has_suffix(n, s) for s in suffixes)]
        for s in suffixes:  # a typo in one suffix must not silently drop those layers
            if not any(_has_suffix(n, s) for n in chosen):
                others = [n for n, m in model.named_modules() if _has_suffix(n, s)]
                why = f"only non-Linear modules ({type(model.get_submodule(others[0])).__name__})" if others else "nothing"
                raise ValueError(f"target '{s}' matches {why}. Linear layers look like: {_examples(linears)}")
    if not chosen:
        hint = " (a string is a regex for the whole name; pass a list for suffixes)" if isinstance(targets, str) else ""
        raise ValueError(f"targets={targets!r} match no nn.Linear module{hint}. Linear layers look like: "
                         f"{_examples(linears)}")
    for name in chosen:
        if kept(name):
            raise ValueError(f"'{name}' is inside keep_trainable module '{kept(name)}', which is trained fully: leave "
                             f"it out of targets or out of keep_trainable.")
    users = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        users[id(p)] = users.get(id(p), 0) + 1
    for name in chosen:
        why = _why_not_adaptable(model, name, users, dropout)
        if why:
            raise ValueError(f"cannot adapt '{name}': {why}. Leave it out of targets (e.g. a list of name suffixes, "
                             f"or targets=lambda name, module: ... returning False for it).")
    return chosen


def _why_not_adaptable(model: nn.Module, name: str, users: dict, dropout: float) -> str | None:
    """Why W x + B A x would not be what this layer computes, or merge() could not fold B A into W; None if fine."""
    module = model.get_submodule(name)
    if type(module).forward is not nn.Linear.forward:
        return (f"{type(module).__name__} replaces nn.Linear's forward (a quantized or otherwise special layer), so "
                f"W x + B A x is not what it computes")
    if type(module.weight) is not nn.Parameter or not module.weight.is_floating_point():
        return (f"its weight is a {type(module.weight).__name__} of dtype {module.weight.dtype}, not a plain floating "
                f"nn.Parameter (quantized or parametrized storage), so B A cannot be merged into it")
    if users.get(id(module.weight), 0) > 1:
        return "its weight is shared with another module (tied weights): merge() would change that module too"
    parent = model.get_submodule(name.rpartition(".")[0])
    if dropout > 0 and isinstance(parent, nn.MultiheadAttention):
        return ("nn.MultiheadAttention reads out_proj.weight without calling the layer, so dropout on its input "
                "cannot apply; use dropout=0")
    return None


def _has_suffix(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _has_prefix(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _examples(linears: dict) -> str:
    names = list(linears)
    return ", ".join(names[:6]) + (", ..." if len(names) > 6 else "") if names else "(the model has none)"


def _resolve_keep(model: nn.Module, keep_trainable: Sequence[str]) -> list[str]:
    """Full names of the keep_trainable modules: an entry is a module's full name, else a name suffix."""
    if isinstance(keep_trainable, str):
        keep_trainable = [keep_trainable]
    names = [n for n, _ in model.named_modules() if n]
    resolved = []
    for entry in keep_trainable:
        matched = [entry] if entry in names else [n for n in names if _has_suffix(n, entry)]
        if not matched:
            raise ValueError(f"keep_trainable entry '{entry}' matches no module of the model.")
        resolved += [n for n in matched if n not in resolved]
    return resolved


def _freeze_all_but(model: nn.Module, keep: list[str]) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for name in keep:
        model.get_submodule(name).requires_grad_(True)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@contextlib.contextmanager
def _all_or_nothing(model: nn.Module):
    """On any error inside, put back the modules and requires_grad flags the model had: a failed call changes
    nothing (modules are replaced, never modified, so putting the old objects back restores everything)."""
    modules = list(model.named_modules())[1:]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    except BaseException:
        for name, module in modules:  # parents first, so each name resolves in the restored tree
            if model.get_submodule(name) is not module:
                _replace(model, name, module)
        for p, flag in flags:
            p.requires_grad_(flag)
        raise


# ----------------------------------------------------------------------------------------------------------
# What an adapter can do: count, merge, export, save, load (shared by Uni-LoRA and the LoRA baseline)
# ----------------------------------------------------------------------------------------------------------

class _AdapterHandle:
    """Everything done through the adapter layers; subclasses say what is trainable and what a file holds."""
    layer_names: list[str]
    config: dict
    _identity_keys: tuple[str, ...] = ()  # config entries that must match for a saved file to fit

    def layers(self) -> list[tuple[str, AdaptedLinear]]:
        found = [(n, _submodule_or_none(self.root, n)) for n in self.layer_names]
        if getattr(self, "merged", False) or any(not isinstance(m, AdaptedLinear) for _, m in found):
            raise RuntimeError("this adapter's layers are gone from the model: it was merged (merge() puts plain "
                               "nn.Linear layers back) or its layers were replaced. Apply a new adapter to train "
                               "or load again.")
        return found

    def counts(self) -> dict:
        """d trainable adapter numbers, D LoRA numbers they produce (the LoRA-equivalent count), the rest."""
        own = {id(p) for p in self.parameters()}
        other = sum(p.numel() for p in self.root.parameters() if p.requires_grad and id(p) not in own)
        frozen = sum(p.numel() for p in self.root.parameters() if not p.requires_grad)
        D = sum(m.size for _, m in self.layers())
        return {"d": sum(p.numel() for p in self.parameters()), "D": D, "lora_equivalent": D,
                "other_trainable": other, "frozen": frozen}

    @torch.no_grad()
    def lora_state_dict(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module name: (A r x in, B out x r)} with the scale folded into B: an ordinary LoRA adapter, scale 1."""
        return {n: tuple(t.detach().clone() for t in m.lora_factors()) for n, m in self.layers()}

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fold dW = B A into each base weight and put plain nn.Linear modules back; returns the model.
        dW is computed in at least fp32 (fp64 for an fp64 base) with autocast off, whatever the context."""
        for name, layer in self.layers():
            layer.base.weight.copy_(layer.weight)
            _replace(self.root, name, layer.base)
        self.merged = True  # even if another adapter is applied at the same names later
        return self.root

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        """Everything trained outside the adapter, by model.state_dict() name: the keep_trainable modules' parameters
        and persistent buffers, and any parameter the user unfroze by hand (saved and restored too, never dropped)."""
        tensors = self._keep_tensors()
        own = {id(p) for p in self.parameters()}
        for name, p in self.root.named_parameters():
            if p.requires_grad and id(p) not in own and name not in tensors:
                tensors[name] = p
        return tensors

    def _keep_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{module}.{key}": t for module in self.config["keep_trainable"]
                for key, t in self.root.get_submodule(module).state_dict(keep_vars=True).items()}

    def save(self, path: str, overwrite: bool = False) -> None:
        """Write the adapter atomically (temp file, then rename); an existing file is kept unless overwrite."""
        payload = {"config": json.dumps(self.config), **self._tensors(),
                   "trained": {k: t.detach().to("cpu", copy=True) for k, t in self.trained_tensors().items()}}
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual permissions
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    def load(self, path: str):
        """Load a file saved from the same model and config; anything else is a ValueError saying what differs."""
        config, payload = read_adapter_file(path)
        return self._load(path, config, payload)

    def _load(self, path: str, config: dict, payload: dict):
        if config.get("format") != self.config["format"]:
            raise ValueError(f"{path} holds a '{config.get('format')}' adapter, this is '{self.config['format']}'.")
        _check_schema(path, config, self._schema)
        for key in self._identity_keys:
            if config.get(key, _DEFAULTS.get(key)) != self.config[key]:
                raise ValueError(f"{path} does not fit this model: {key} differs "
                                 f"({_first_difference(config.get(key), self.config[key])}). Build the same model "
                                 f"with the same settings (for Uni-LoRA, load_unilora(model, path) applies the saved ones).")
        self._check_file(path, config)
        trained = payload.get("trained", {})
        if not isinstance(trained, dict):
            raise ValueError(f"{path}: 'trained' is not a dict of tensors; the file is damaged.")
        missing = [k for k in self._keep_tensors() if k not in trained]
        if missing:
            raise ValueError(f"{path} lacks {missing[:3]} of the keep_trainable modules; the file is damaged.")
        in_model = self.root.state_dict(keep_vars=True)
        pairs = [(name, payload.get(name), t) for name, t in self._expected_tensors().items()]
        pairs += [(name, t, in_model.get(name)) for name, t in trained.items()]
        for name, saved, target in pairs:  # check everything before writing anything
            if target is None:
                raise ValueError(f"{path} holds a trained tensor '{name}' that this model does not have.")
            if not isinstance(saved, torch.Tensor) or saved.is_floating_point() != target.is_floating_point():
                raise ValueError(f"{path}: '{name}' is missing or not a {target.dtype} tensor; the file is damaged.")
            if saved.shape != target.shape:
                raise ValueError(f"{path}: '{name}' has shape {tuple(saved.shape)}, this model needs "
                                 f"{tuple(target.shape)}.")
        with torch.no_grad():
            for _, saved, target in pairs:
                target.copy_(saved)
        return self

    def _check_file(self, path: str, config: dict) -> None:
        """What else a subclass checks once the identity keys match."""


_DEFAULTS = {"keep_trainable": [], "projection": {"kind": "balanced", "normalize": True}}  # files before they existed


def _submodule_or_none(model: nn.Module, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def read_adapter_file(path: str) -> tuple[dict, dict]:
    """(config, tensors) of a file written by save(); never unpickles arbitrary objects."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no adapter file at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # empty, truncated, not a torch file, or holding objects other than tensors
        why = (str(e).splitlines() or ["no details"])[0][:200]
        raise ValueError(f"{path} is not a readable adapter file ({type(e).__name__}: {why}). It is empty, truncated "
                         f"or was not written by unilora.py.") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("config"), str):
        raise ValueError(f"{path} is not an adapter file written by unilora.py")
    try:
        config = json.loads(payload["config"])
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: its config is not a JSON object; the file is damaged.")
    return config, payload


def _check_schema(path: str, config: dict, schema: dict) -> None:
    """Every key of `schema` present with its type, the optional keys (_DEFAULTS) typed too: nothing read from a
    file is used before this check."""
    for key, kind in {**schema, **{k: type(v) for k, v in _DEFAULTS.items() if k in config}}.items():
        if key not in config:
            raise ValueError(f"{path}: the config lacks '{key}'; the file is damaged or from another program.")
        value = config[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            raise ValueError(f"{path}: config '{key}' is {value!r}, not a {getattr(kind, '__name__', kind)}.")
    if not all(isinstance(name, str) for name in config.get("keep_trainable", [])) or \
            not isinstance(config.get("projection", _DEFAULTS["projection"]).get("kind"), str):
        raise ValueError(f"{path}: config 'keep_trainable' or 'projection' is damaged.")
    for layer in config.get("layers", ()):
        if not (isinstance(layer, list) and len(layer) == 3 and isinstance(layer[0], str)
                and all(isinstance(v, int) and v > 0 for v in layer[1:])):
            raise ValueError(f"{path}: config 'layers' holds {layer!r}, not [name, in_features, out_features].")


def _first_difference(saved, current) -> str:
    if isinstance(saved, list) and isinstance(current, list):
        for i, (a, b) in enumerate(zip(saved, current)):
            if a != b:
                return f"entry {i}: saved {a}, this model {b}"
        return f"saved {len(saved)} entries, this model {len(current)}"
    return f"saved {saved!r}, this model {current!r}"


# ----------------------------------------------------------------------------------------------------------
# The Uni-LoRA adapter
# ----------------------------------------------------------------------------------------------------------

class UniLoRA(_AdapterHandle):
    """The handle `apply_unilora` returns: theta_d, the config that regenerates P, save/load/merge/export/counts."""
    _identity_keys = ("layers", "r", "d", "D", "seed", "signs", "projection", "keep_trainable")
    _schema = {"d": int, "D": int, "r": int, "seed": int, "signs": bool, "init_bound": (int, float),
               "dropout": (int, float), "layers": list, "fingerprint": str}

    def __init__(self, model: nn.Module, layer_names: list[str], config: dict):
        self.root, self.layer_names, self.config = model, layer_names, config

    @property
    def shared(self) -> SharedVector:
        return self.layers()[0][1].shared  # looked up, so model.to() is always seen

    @property
    def theta_d(self) -> nn.Parameter:
        return self.shared.theta_d

    def parameters(self) -> list[nn.Parameter]:
        return [self.theta_d]

    def project(self) -> torch.Tensor:
        """theta_D = P theta_d, every layer's (A, B) flattened in order."""
        return self.shared.projection(self.theta_d)

    def refresh(self) -> None:
        """Forget the cached theta_D; needed only after writing theta_d through .data (invisible to autograd)."""
        self.shared.refresh()

    def _tensors(self) -> dict:
        return {"theta_d": self.theta_d.detach().cpu()}

    def _expected_tensors(self) -> dict:
        return {"theta_d": self.theta_d}

    def _check_file(self, path: str, config: dict) -> None:
        if config["fingerprint"] != self.config["fingerprint"]:
            raise ValueError(f"{path}: P regenerated from seed {config['seed']} differs from the saved one "
                             f"(fingerprint {self.config['fingerprint']} != {config['fingerprint']}); the torch "
                             f"random number generator changed. Load it with the torch version that trained it.")

    def __repr__(self) -> str:
        c = self.config
        return (f"UniLoRA(d={c['d']}, D={c['D']}, r={c['r']}, layers={len(c['layers'])}, seed={c['seed']}, "
                f"signs={c['signs']}, projection={c['projection']['kind']})")


def apply_unilora(model: nn.Module, d: int, *, r: int = 4, targets: Targets = None, seed: int = 0,
                  signs: bool = True, init_bound: float = 0.02, dropout: float = 0.0,
                  keep_trainable: Sequence[str] = (), projection: Callable | None = None) -> UniLoRA:
    """Patch `model` in place: targeted nn.Linear -> UniLoRALinear, every base parameter frozen, one theta_d.

    Returns the adapter handle: give `adapter.parameters()` (just theta_d) to the optimizer, with no weight decay,
    and use it to save, load, merge, export and count. `keep_trainable` names modules (full names or suffixes,
    e.g. "classifier") that stay trainable next to theta_d; the adapter file holds them too. `projection` is a
    factory (sizes, d, seed, signs) -> module mapping theta_d to theta_D (default: the paper's balanced P).
    All or nothing: on any error the model is left exactly as it was.
    """
    if r < 1:
        raise ValueError(f"r={r} must be a positive integer (the paper uses r = 4).")
    if init_bound <= 0:
        raise ValueError(f"init_bound={init_bound} must be > 0: theta_d = 0 is a saddle with an exactly zero gradient.")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout={dropout} must lie in [0, 1).")
    keep = _resolve_keep(model, keep_trainable)
    names = find_targets(model, targets, dropout, keep)
    bases = [model.get_submodule(n) for n in names]
    shapes = [shape for m in bases for shape in ((r, m.in_features), (m.out_features, r))]
    sizes = [rows * cols for rows, cols in shapes]
    _check_d(sum(sizes), d)
    P = (projection or balanced_projection)(sizes, d, seed, signs)
    device = bases[0].weight.device
    # fp32 next to a 16-bit base (optimizer state needs it), fp64 next to an fp64 base (exact tests).
    dtype = torch.promote_types(torch.float32, bases[0].weight.dtype)
    # Drawn on the CPU like P, so the same seed gives the same start everywhere; seed + 1 keeps the two streams apart.
    generator = torch.Generator().manual_seed(seed + 1)
    theta = torch.empty(d, dtype=torch.float64).uniform_(-init_bound, init_bound, generator=generator)
    shared = SharedVector(nn.Parameter(theta.to(device, dtype)), P.to(device), shapes)
    with torch.no_grad():
        out = shared.projection(shared.theta_d)
    if out.shape != (sum(sizes),) or out.dtype != dtype:
        raise ValueError(f"the projection returned {out.dtype} {tuple(out.shape)}; it must map theta_d ({dtype}, "
                         f"length {d}) to theta_D of length D = {sum(sizes)} in the same dtype.")
    with _all_or_nothing(model):
        _freeze_all_but(model, keep)
        for i, (name, base) in enumerate(zip(names, bases)):
            _replace(model, name, UniLoRALinear(base, shared, i, dropout))
    config = {"format": FILE_FORMAT, "d": d, "D": sum(sizes), "r": r, "seed": seed, "signs": signs,
              "init_bound": init_bound, "dropout": dropout,
              "layers": [[n, m.in_features, m.out_features] for n, m in zip(names, bases)],
              "projection": {"kind": P.kind, **P.config()}, "fingerprint": P.fingerprint(), "keep_trainable": keep}
    return UniLoRA(model, names, config)


def load_unilora(model: nn.Module, path: str, projection: Callable | None = None) -> UniLoRA:
    """Apply Uni-LoRA with the config saved in `path` (same layers, d, r, seed, signs, projection, trained modules)
    and load theta_d and everything else the file holds. All or nothing: on any error the model is as before.
    A file trained with another projection kind needs the same factory again: `projection=`."""
    config, payload = read_adapter_file(path)
    if config.get("format") != FILE_FORMAT:
        raise ValueError(f"{path} holds a '{config.get('format')}' adapter, not a Uni-LoRA one.")
    _check_schema(path, config, UniLoRA._schema)
    kind = config.get("projection", _DEFAULTS["projection"]).get("kind")
    if kind != "balanced" and projection is None:
        raise ValueError(f"{path} was trained with the '{kind}' projection: pass the same factory again, "
                         f"load_unilora(model, path, projection=...).")
    theta = payload.get("theta_d")
    if not isinstance(theta, torch.Tensor) or theta.shape != (config["d"],):
        raise ValueError(f"{path}: theta_d is {getattr(theta, 'shape', theta)!r}, the config says d = {config['d']}.")
    names = {layer[0] for layer in config["layers"]}
    with _all_or_nothing(model):
        try:
            adapter = apply_unilora(model, config["d"], r=config["r"], targets=lambda n, m: n in names,
                                    seed=config["seed"], signs=config["signs"], init_bound=config["init_bound"],
                                    dropout=config["dropout"], keep_trainable=config.get("keep_trainable", []),
                                    projection=projection)
        except (ValueError, RuntimeError) as e:  # RuntimeError: e.g. a seed torch cannot take
            raise ValueError(f"{path} does not fit this model: {e}") from None
        by_hand = [n for n in payload.get("trained", {})
                   if not any(_has_prefix(n, k) for k in adapter.config["keep_trainable"])]
        params = dict(model.named_parameters())
        if any(n not in params for n in by_hand):
            raise ValueError(f"{path} holds tensors outside its keep_trainable modules that are not parameters "
                             f"of this model: {[n for n in by_hand if n not in params][:3]}")
        adapter._load(path, config, payload)
        for name in by_hand:  # parameters the user had unfrozen by hand: trainable again, as when saved
            params[name].requires_grad_(True)
    return adapter


# ----------------------------------------------------------------------------------------------------------
# Baseline: plain LoRA (in the unified view, P = I and d = D), for fair side-by-side comparisons
# ----------------------------------------------------------------------------------------------------------

class LoRALinear(AdaptedLinear):
    """base(x) + (alpha/r) dropout(x) A^T B^T with A Kaiming-uniform and B = 0 (Hu et al., 2021)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, dropout)
        self.r, self.scaling = r, alpha / r
        dtype = torch.promote_types(torch.float32, base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=dtype, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=dtype, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # what nn.Linear does for its own weight

    @property
    def size(self) -> int:
        return self.r * (self.in_features + self.out_features)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A, self.lora_B * self.scaling

    def _apply(self, fn, recurse=True):
        for child in self.children():
            child._apply(fn)
        _follow_in_fp32([self.lora_A, self.lora_B], fn)  # like theta_d: A and B stay fp32 in a 16-bit model
        return self


class LoRA(_AdapterHandle):
    """The handle `apply_lora` returns: the same save/load/merge/export/count API as UniLoRA."""
    _identity_keys = ("layers", "r", "alpha", "keep_trainable")
    _schema = {"r": int, "alpha": (int, float), "layers": list}

    def __init__(self, model: nn.Module, layer_names: list[str], r: int, alpha: float, dropout: float,
                 keep_trainable: list[str] = ()):
        self.root, self.layer_names = model, layer_names
        shapes = [[n, m.in_features, m.out_features] for n, m in self.layers()]
        self.config = {"format": "lora-adapter/1", "r": r, "alpha": alpha, "dropout": dropout, "layers": shapes,
                       "keep_trainable": list(keep_trainable)}

    def parameters(self) -> Iterable[nn.Parameter]:
        return [p for _, m in self.layers() for p in (m.lora_A, m.lora_B)]

    def _tensors(self) -> dict:
        return {k: t.detach().cpu() for k, t in self._expected_tensors().items()}

    def _expected_tensors(self) -> dict:
        return {f"{n}.{k}": getattr(m, k) for n, m in self.layers() for k in ("lora_A", "lora_B")}


def apply_lora(model: nn.Module, *, r: int = 4, alpha: float | None = None, targets: Targets = None,
               dropout: float = 0.0, keep_trainable: Sequence[str] = ()) -> LoRA:
    """Patch `model` with plain LoRA on the same targets as apply_unilora would use; alpha defaults to r."""
    if r < 1:
        raise ValueError(f"r={r} must be a positive integer.")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout={dropout} must lie in [0, 1).")
    keep = _resolve_keep(model, keep_trainable)
    names = find_targets(model, targets, dropout, keep)
    with _all_or_nothing(model):
        _freeze_all_but(model, keep)
        for name in names:
            _replace(model, name, LoRALinear(model.get_submodule(name), r, float(alpha or r), dropout))
        return LoRA(model, names, r, float(alpha or r), dropout, keep)


def merge_adapters(model: nn.Module) -> nn.Module:
    """Merge whatever adapter layers the model has (Uni-LoRA or LoRA) into plain nn.Linear modules."""
    names = [n for n, m in model.named_modules() if isinstance(m, AdaptedLinear)]
    if not names:
        raise ValueError("the model has no adapter layers to merge.")
    handle = _AdapterHandle()
    handle.root, handle.layer_names = model, names
    return handle.merge()
