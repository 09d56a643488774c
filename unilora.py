"""Uni-LoRA: one trainable vector for all LoRA layers of a model (Li et al., NeurIPS 2025, arXiv 2506.00799).

This file is the whole method: it depends on torch only and can be copied into any project.

LoRA adapts each targeted linear layer l (weight W_l, out_l x in_l) as W_l x + B_l A_l x, with A_l: r x in_l and
B_l: out_l x r. Flatten every A_l and B_l, layer after layer (`model.named_modules()` order, row-major), into

    theta_D = [vec(A_1), vec(B_1), vec(A_2), vec(B_2), ...],      D = sum_l r (in_l + out_l).

Uni-LoRA trains ONE vector theta_d of length d << D and reconstructs theta_D = P theta_d, where P (D x d) holds a
single nonzero per row: row i has s_i / sqrt(n_j) at column j = idx_i, with
  - idx a balanced, seeded random assignment over the WHOLE model (global: every layer draws on all of theta_d),
    each column used n_j = floor(D/d) or ceil(D/d) times, so no entry of theta_d is idle;
  - s_i = +1 (the paper, the official code, PEFT), or a random +-1 with `signs=True` (our option).
The columns of P have disjoint supports and unit norm: P^T P = I_d, an exact isometry. Gradients flow back through
P^T: one SGD step moves every LoRA entry of group j = {i : idx_i = j} by the (signed) mean of the group's gradients.

P is never materialised. With P = S Lambda, Lambda = diag(1/sqrt(n_j)), and each sign folded into the index (row i
reads slot idx_i + d [s_i = -1]), P theta_d is ONE gather from [Lambda theta_d; -Lambda theta_d] and P^T g is ONE
scatter-add (index_add) into 2d slots: an int32 per LoRA entry, regenerated from the seed. theta_D is computed once
per forward pass; every layer takes its (A_l, B_l) from that cache.

theta_d starts at U(-0.02, 0.02), not 0: B A is quadratic in theta_d, so 0 is a saddle with a zero gradient. No
alpha/r scaling (dW = B A), as in the official code. After training, B A is merged into W: zero inference cost.

Below: the projection, the shared vector with its per-pass cache, the layer, `apply_unilora`; then the adapter
handle (save, load, merge, export, counts); last the bookkeeping (choosing layers, checking files).
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import re
from typing import Callable, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

FILE_FORMAT = "unilora-adapter/1"
DEFAULT_EXCLUDED = ("lm_head", "classifier", "score")  # output heads are trained fully or left alone, never adapted
Targets = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]


# -- 1. The projection P = S Lambda --------------------------------------------------------------------------------

def make_projection(D: int, d: int, seed: int = 0, signs: bool = False) -> torch.Tensor:
    """P as its signed index: int32 [D], values in [0, 2d). Row i reads column idx_i mod d, negated iff idx_i >= d.
    Balanced: the columns `arange(D) % d` (each used floor(D/d) or ceil(D/d) times), shuffled. A CPU generator makes
    P identical on every device; the draws are, in order, the shuffle, then the signs."""
    _check_d(D, d)
    generator = torch.Generator().manual_seed(seed)
    idx = (torch.arange(D) % d)[torch.randperm(D, generator=generator)]
    if signs:
        idx += d * torch.randint(0, 2, (D,), generator=generator)
    return idx.to(torch.int32)


class _Gather(torch.autograd.Function):
    """theta_D = P theta_d as one gather from [Lambda theta_d; -Lambda theta_d]; backward P^T g as one scatter-add."""

    @staticmethod
    def forward(ctx, theta_d: torch.Tensor, idx: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        # Attributes, not save_for_backward: a backward frees nothing, so the cached theta_D of a pass can be
        # backpropagated again (gradient accumulation, two losses of one forward).
        ctx.idx, ctx.scale = idx, scale
        return torch.index_select((theta_d * scale).view(-1), 0, idx)  # scale = [Lambda; -Lambda], 2 x d

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        slots = grad.new_zeros(ctx.scale.numel()).index_add_(0, ctx.idx, grad)  # P^T g, still signed: 2d slots
        return (slots.view_as(ctx.scale) * ctx.scale).sum(0), None, None


class IndexProjection(nn.Module):
    """P given by its signed index (int [D], values in [0, 2d)): row i reads column idx_i mod d, negated iff idx_i >= d,
    scaled by Lambda_j = 1/sqrt(n_j), n_j the rows using column j (Lambda = I if not normalize). theta_d -> theta_D."""

    def __init__(self, idx: torch.Tensor, d: int, normalize: bool = True, kind: str = "balanced"):
        super().__init__()
        if idx.dim() != 1 or idx.is_floating_point() or not 0 <= int(idx.min()) <= int(idx.max()) < 2 * d:
            raise ValueError(f"idx must be a 1-D integer tensor with values in [0, 2d) = [0, {2 * d})")
        self.d, self.normalize, self.kind = d, normalize, kind
        # Not in the state_dict: the seed regenerates P. Counts, not Lambda, so that model.to(dtype) casts nothing.
        self.register_buffer("idx", idx.to(torch.int32), persistent=False)
        self.register_buffer("counts", torch.bincount(idx.long() % d, minlength=d).to(torch.int32), persistent=False)
        self._scale = None

    def signed_scale(self, dtype: torch.dtype) -> torch.Tensor:
        """[Lambda; -Lambda] (2 x d) in `dtype`, made once per dtype and device."""
        if self._scale is None or self._scale.dtype != dtype or self._scale.device != self.counts.device:
            with torch.inference_mode(False), torch.no_grad():  # a plain tensor, even if first made for inference
                lam = self.counts.to(dtype).rsqrt().nan_to_num(posinf=0.0) if self.normalize else \
                    torch.ones(self.d, dtype=dtype, device=self.counts.device)  # an unused column gets 0
                self._scale = torch.stack([lam, -lam])
        return self._scale

    def forward(self, theta_d: torch.Tensor) -> torch.Tensor:
        return _Gather.apply(theta_d, self.idx, self.signed_scale(theta_d.dtype))

    def config(self) -> dict:
        return {"kind": self.kind, "normalize": self.normalize}

    def fingerprint(self) -> str:
        """A short hash of P, saved with theta_d, so that a P regenerated by a different RNG is caught at load."""
        data = bytes(self.idx.detach().cpu().clone().untyped_storage())  # clone: exactly this tensor's bytes
        return hashlib.sha256(data + (b"" if self.normalize else b"nonorm")).hexdigest()[:16]


def balanced_projection(sizes: list[int], d: int, seed: int, signs: bool) -> IndexProjection:
    """The paper's P and the default `projection` factory: one balanced, seeded, global index over all of D."""
    return IndexProjection(make_projection(sum(sizes), d, seed, signs), d)


# -- 2. The shared vector: theta_d, P, and theta_D = P theta_d once per forward pass -------------------------------

class SharedVector(nn.Module):
    """theta_d (the only trainable tensor), its projection P, and every layer's (A, B) for the current pass.
    shapes: [(r, in_1), (out_1, r), (r, in_2), ...], the shapes of A_1, B_1, A_2, ... in theta_D's order."""

    def __init__(self, theta_d: nn.Parameter, projection: nn.Module, shapes: list[tuple[int, int]]):
        super().__init__()
        self.theta_d, self.projection, self.shapes = theta_d, projection, shapes
        self.sizes = [rows * cols for rows, cols in shapes]
        self._cache = {}  # (grad mode, inference mode) -> (state of theta_d, [(A_1, B_1), (A_2, B_2), ...])

    def factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's (A, B): views of one theta_D = P theta_d, recomputed only when theta_d changed."""
        if torch.compiler.is_compiling():  # a traced graph would freeze the cache: compute it outside the graph
            from torch import _dynamo  # loaded already when compiling; importing it at start-up costs seconds
            return _dynamo.disable(self.factors)()
        theta, mode = self.theta_d, (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        state = (_optimizer_steps[0], theta._version, theta.data_ptr(), theta.device, theta.dtype, theta.requires_grad)
        if self._cache.get(mode, (None,))[0] != state:
            pieces = [t.view(shape) for t, shape in zip(self.projection(theta).split(self.sizes), self.shapes)]
            self._cache[mode] = (state, list(zip(pieces[0::2], pieces[1::2])))
        return self._cache[mode][1]

    def refresh(self) -> None:
        self._cache.clear()

    def __getstate__(self):  # deepcopy and pickle: cached tensors carry an autograd graph, never copy them
        return dict(self.__dict__, _cache={})

    def _apply(self, fn, recurse=True):
        device = keep_fp32([self.theta_d], fn)
        self.projection._apply(lambda t: t.to(device))  # P moves with the model, but is never cast
        self._cache.clear()
        return self


# Fused optimizers (AdamW(fused=True)) write theta_d without moving its version counter: every step is counted.
_optimizer_steps = [0]
register_optimizer_step_post_hook(lambda *_: _optimizer_steps.__setitem__(0, _optimizer_steps[0] + 1))


# -- 3. The layer --------------------------------------------------------------------------------------------------

class AdaptedLinear(nn.Module):
    """base(x) + dropout(x) A^T B^T. Also `weight` / `bias` like the nn.Linear it replaces, for code that reads them
    instead of calling forward (nn.MultiheadAttention's out_proj). Subclasses give lora_factors() -> (A, B)."""

    def __init__(self, base: nn.Linear, dropout: float):
        super().__init__()
        self.base, self.in_features, self.out_features = base, base.in_features, base.out_features
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B = (t.to(x.device, x.dtype) for t in self.lora_factors())
        return self.base(x) + F.linear(F.linear(self.dropout(x), A), B)

    @property
    def weight(self) -> torch.Tensor:
        """W + B A, differentiable, in W's dtype: computed in at least fp32 with autocast off, rounded once."""
        W, (A, B) = base_weight(self.base), self.lora_factors()
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

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.shared.factors()[self.index]

    def extra_repr(self) -> str:
        return f"r={self.r}, layer {self.index} of theta_D"


# -- 4. apply_unilora ----------------------------------------------------------------------------------------------

def apply_unilora(model: nn.Module, d: int, *, r: int = 4, targets: Targets = None, seed: int = 0,
                  signs: bool = False, init_bound: float = 0.02, dropout: float = 0.0,
                  keep_trainable: Sequence[str] = (), projection: Callable | None = None) -> UniLoRA:
    """Patch `model` in place: targeted nn.Linear -> UniLoRALinear, every base parameter frozen, one theta_d.
    Returns the adapter handle: give `adapter.parameters()` (just theta_d) to the optimizer, without weight decay;
    save, load, merge, export and count with it. targets: see find_targets. `keep_trainable` names modules (e.g.
    "classifier") trained fully beside theta_d, saved in the adapter file too. `projection`: a factory (sizes, d,
    seed, signs) -> module mapping theta_d to theta_D (default: the paper's P). All or nothing on any error."""
    check_settings(r, dropout)
    if init_bound <= 0:
        raise ValueError(f"init_bound={init_bound} must be > 0: theta_d = 0 is a saddle with an exactly zero gradient.")
    keep = resolve_keep(model, keep_trainable)
    names = find_targets(model, targets, dropout, keep)
    bases = [model.get_submodule(n) for n in names]
    _check_rank(r, [(n, m.in_features, m.out_features) for n, m in zip(names, bases)])
    shapes = [shape for m in bases for shape in ((r, m.in_features), (m.out_features, r))]
    sizes = [rows * cols for rows, cols in shapes]
    _check_d(sum(sizes), d)
    P = (projection or balanced_projection)(sizes, d, seed, signs)
    # theta_d in fp32 beside a 16-bit base (optimizer state needs it), fp64 beside an fp64 base (exact tests); drawn
    # on the CPU like P, so the same seed gives the same start everywhere (seed + 1 keeps the two streams apart).
    device, dtype = base_device_dtype(bases[0])
    dtype = torch.promote_types(torch.float32, dtype)
    theta = torch.empty(d, dtype=torch.float64).uniform_(-init_bound, init_bound,
                                                         generator=torch.Generator().manual_seed(seed + 1))
    shared = SharedVector(nn.Parameter(theta.to(device, dtype)), P.to(device), shapes)
    with torch.no_grad():
        out = shared.projection(shared.theta_d)
    if out.shape != (sum(sizes),) or out.dtype != dtype:
        raise ValueError(f"the projection returned {out.dtype} {tuple(out.shape)}; it must map theta_d ({dtype}, "
                         f"length {d}) to theta_D of length D = {sum(sizes)} in the same dtype.")
    swap_layers(model, names, keep, lambda i, base: UniLoRALinear(base, shared, i, dropout))
    config = {"format": FILE_FORMAT, "d": d, "D": sum(sizes), "r": r, "seed": seed, "signs": signs,
              "init_bound": init_bound, "dropout": dropout,
              "layers": [[n, m.in_features, m.out_features] for n, m in zip(names, bases)],
              "projection": {"kind": P.kind, **P.config()}, "fingerprint": P.fingerprint(), "keep_trainable": keep}
    return UniLoRA(model, names, config)


# -- 5. The adapter handle: count, export, merge, save, load (shared by Uni-LoRA and the LoRA baseline) ------------

class Adapter:
    """Everything done through the adapter layers. Subclasses give tensors() (the adapter's own trained tensors, by
    their names in a file) and the class attributes below."""
    identity_keys: tuple[str, ...] = ()  # config entries that must match for a saved file to fit
    schema: dict = {}  # config entries a file must hold, with their types
    hints: dict = {}  # what to do when an identity key differs, where it is not "build the same model"

    def __init__(self, model: nn.Module, layer_names: list[str], config: dict):
        self.root, self.layer_names, self.config = model, layer_names, config

    def layers(self) -> list[tuple[str, AdaptedLinear]]:
        modules = dict(self.root.named_modules())
        found = [(n, modules.get(n)) for n in self.layer_names]
        if getattr(self, "merged", False) or any(not isinstance(m, AdaptedLinear) for _, m in found):
            raise RuntimeError("this adapter's layers are gone from the model: it was merged (merge() puts plain nn."
                               "Linear layers back) or its layers were replaced. Apply a new adapter to train or load.")
        return found

    def counts(self) -> dict:
        """d trainable adapter numbers, D LoRA numbers they produce (the LoRA-equivalent count), the rest."""
        D = sum(m.r * (m.in_features + m.out_features) for _, m in self.layers())
        own = {id(p) for p in self.parameters()}
        other = sum(p.numel() for p in self.root.parameters() if p.requires_grad and id(p) not in own)
        return {"d": sum(p.numel() for p in self.parameters()), "D": D, "lora_equivalent": D, "other_trainable": other,
                "frozen": sum(p.numel() for p in self.root.parameters() if not p.requires_grad)}

    @torch.no_grad()
    def lora_state_dict(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module name: (A r x in, B out x r)} with any scale folded into B: an ordinary LoRA adapter, scale 1."""
        return {n: tuple(t.detach().clone() for t in m.lora_factors()) for n, m in self.layers()}

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fold dW = B A (in fp32 or wider, autocast off) into each base weight, put the plain nn.Linear back."""
        for name, layer in self.layers():
            if isinstance(layer.base, nn.Linear):
                layer.base.weight.copy_(layer.weight)
                replace_module(self.root, name, layer.base)
            else:  # a quantized base: into a plain nn.Linear in its compute dtype, never back into its codes
                with torch.device("meta"):  # no random init of a weight about to be replaced
                    plain = nn.Linear(layer.in_features, layer.out_features, bias=False)
                plain.weight = nn.Parameter(layer.weight, requires_grad=False)  # a fresh tensor: no copy
                plain.bias = layer.base.bias  # already frozen, in the compute dtype
                replace_module(self.root, name, plain)
        self.merged = True  # even if another adapter is applied at the same names later
        return self.root

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        """Everything trained outside the adapter, by model.state_dict() name: the keep_trainable modules' parameters
        and persistent buffers, and any parameter the user unfroze by hand (saved and restored too, never dropped)."""
        own = {id(p) for p in self.parameters()}
        return {**{n: p for n, p in self.root.named_parameters() if p.requires_grad and id(p) not in own},
                **self._keep_tensors()}

    def _keep_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{module}.{key}": t for module in self.config["keep_trainable"]
                for key, t in self.root.get_submodule(module).state_dict(keep_vars=True).items()}

    def save(self, path: str, overwrite: bool = False) -> None:
        """Write the adapter atomically (temp file, then rename); an existing file is kept unless overwrite."""
        payload = {"config": json.dumps(self.config), **{k: t.detach().cpu() for k, t in self.tensors().items()},
                   "trained": {k: t.detach().to("cpu", copy=True) for k, t in self.trained_tensors().items()}}
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
        folder, name = os.path.split(os.path.abspath(path))
        prefix = f".{name}.{re.sub(r'[^A-Za-z0-9_.-]', '_', os.uname().nodename if os.name == 'posix' else '')}.tmp-"
        for old in os.listdir(folder):  # temp files of saves killed before their rename (kill -9, power loss) on
            pid = old[len(prefix):] if old.startswith(prefix) else ""  # this machine: another's pids mean nothing
            if pid.isdigit() and os.name == "posix" and not _alive(int(pid)):
                os.unlink(os.path.join(folder, old))
        tmp = os.path.join(folder, f"{prefix}{os.getpid()}")  # one writer per process: never shared
        try:
            with open(tmp, "wb") as f:
                torch.save(payload, f)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp) if os.path.exists(tmp) else None
            raise

    def load(self, path: str):
        """Load a file saved from the same model and config; anything else is a ValueError saying what differs.
        Everything is checked (the config, then every tensor's presence and shape) before anything is written."""
        config, payload = read_adapter_file(path, self)
        for key in self.identity_keys:  # the saved config must equal the one rebuilt from this model
            if config[key] != self.config[key]:
                raise ValueError(f"{path} does not fit this model: {key} differs "
                                 f"({_first_difference(config[key], self.config[key])}). " + self.hints.get(
                                     key, "Build the same model with the same settings (for Uni-LoRA, "
                                          "load_unilora(model, path) applies the saved ones)."))
        trained, in_model = payload.get("trained", {}), self.root.state_dict(keep_vars=True)
        if not isinstance(trained, dict):
            raise ValueError(f"{path}: 'trained' is not a dict of tensors; the file is damaged.")
        pairs = [(name, payload.get(name), t) for name, t in self.tensors().items()]  # (name, saved, in the model)
        keep = self._keep_tensors()
        pairs += [(name, trained.get(name), t) for name, t in keep.items()]
        pairs += [(name, t, in_model.get(name)) for name, t in trained.items() if name not in keep]
        for name, saved, target in pairs:
            if target is None:
                raise ValueError(f"{path} holds a trained tensor '{name}' that this model does not have.")
            if not isinstance(saved, torch.Tensor) or saved.is_floating_point() != target.is_floating_point():
                raise ValueError(f"{path}: '{name}' is missing or not a {target.dtype} tensor; the file is damaged.")
            if saved.shape != target.shape:
                raise ValueError(f"{path}: '{name}' has shape {tuple(saved.shape)}, this model needs "
                                 f"{tuple(target.shape)}.")
            if saved.is_floating_point() and not bool(torch.isfinite(saved).all()):
                raise ValueError(f"{path}: '{name}' holds NaN or infinite values: the run that saved it diverged.")
        with torch.no_grad():
            for _, saved, target in pairs:
                target.copy_(saved)
        params = dict(self.root.named_parameters())
        for name in set(trained) & set(params):  # parameters the user had unfrozen by hand: trainable again
            params[name].requires_grad_(True)
        return self

    def parameters(self) -> list[nn.Parameter]:
        return list(self.tensors().values())


class UniLoRA(Adapter):
    """The handle `apply_unilora` returns: theta_d, the config that regenerates P, save/load/merge/export/counts."""
    identity_keys = ("layers", "r", "d", "D", "seed", "signs", "projection", "keep_trainable", "fingerprint")
    schema = {"d": int, "D": int, "r": int, "seed": int, "signs": bool, "init_bound": (int, float),
              "dropout": (int, float), "layers": list, "fingerprint": str}
    hints = {"fingerprint": "P regenerated from the saved seed differs from the P the file was trained with: the "
                            "torch random number generator changed. Load it with the torch version that trained it."}

    @property
    def shared(self) -> SharedVector:
        return self.layers()[0][1].shared  # looked up, so model.to() is always seen

    @property
    def theta_d(self) -> nn.Parameter:
        return self.shared.theta_d

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"theta_d": self.theta_d}

    def project(self) -> torch.Tensor:  # theta_D = P theta_d: every layer's (A, B), flattened, in order
        return self.shared.projection(self.theta_d)

    def refresh(self) -> None:  # forget the cached theta_D: needed only after writes through theta_d.data
        self.shared.refresh()

    def __repr__(self) -> str:
        c = self.config
        return (f"UniLoRA(d={c['d']}, D={c['D']}, r={c['r']}, layers={len(c['layers'])}, seed={c['seed']}, "
                f"signs={c['signs']}, projection={c['projection']['kind']})")


def load_unilora(model: nn.Module, path: str, projection: Callable | None = None) -> UniLoRA:
    """Apply Uni-LoRA with the config saved in `path` (same layers, d, r, seed, signs, projection, trained modules)
    and load theta_d and everything else the file holds. All or nothing: on any error the model is as before.
    A file trained with another projection kind needs the same factory again: `projection=`."""
    config, _ = read_adapter_file(path, UniLoRA)
    kind = config["projection"]["kind"]
    if kind != "balanced" and projection is None:
        raise ValueError(f"{path} was trained with the '{kind}' projection: pass the same factory again, "
                         f"load_unilora(model, path, projection=...).")
    _check_file_fits(path, config, model)
    names = {layer[0] for layer in config["layers"]}
    with all_or_nothing(model):
        try:
            adapter = apply_unilora(model, config["d"], r=config["r"], targets=lambda n, m: n in names,
                                    seed=config["seed"], signs=config["signs"], init_bound=config["init_bound"],
                                    dropout=config["dropout"], keep_trainable=config["keep_trainable"],
                                    projection=projection)
        except (ValueError, RuntimeError) as e:  # RuntimeError: e.g. a seed torch cannot take
            raise ValueError(f"{path} does not fit this model: {e}") from None
        return adapter.load(path)


def merge_adapters(model: nn.Module) -> nn.Module:
    """Merge whatever adapter layers the model has (Uni-LoRA or LoRA) into plain nn.Linear modules."""
    names = [n for n, m in model.named_modules() if isinstance(m, AdaptedLinear)]
    if not names:
        raise ValueError("the model has no adapter layers to merge.")
    return Adapter(model, names, {}).merge()


# -- 6. Bookkeeping: choosing the layers, patching all or nothing, reading and checking files ----------------------

def find_targets(model: nn.Module, targets: Targets, dropout: float = 0.0, keep: Sequence[str] = ()) -> list[str]:
    """Names of the nn.Linear modules selected by `targets`, in named_modules() order (the order of theta_D).
    targets: None: every nn.Linear but heads (a name component in DEFAULT_EXCLUDED) and the modules in `keep`;
    list/tuple of str: module-name suffixes ("query" matches "encoder.layer.0.attention.self.query"); str: a regex
    for the whole name; callable(name, module) -> bool. A layer that cannot be adapted exactly is an error."""
    adapted = [name for name, module in model.named_modules() if isinstance(module, AdaptedLinear)]
    if adapted:
        raise ValueError(f"the model already has adapter layers (e.g. '{adapted[0]}'): adapters cannot be stacked. "
                         f"Call merge() on the existing adapter first, or start from a fresh model.")
    linears = {name: m for name, m in model.named_modules() if is_base(m)}
    examples = ", ".join(list(linears)[:6]) + (", ..." if len(linears) > 6 else "") or "(the model has none)"
    kept = {n: next((k for k in keep if (n + ".").startswith(k + ".")), None) for n in linears}
    if targets is None:
        chosen = [n for n in linears if not set(n.split(".")) & set(DEFAULT_EXCLUDED) and not kept[n]]
    elif isinstance(targets, str):
        chosen = [n for n in linears if re.fullmatch(targets, n)]
    elif callable(targets):
        chosen = [n for n, m in linears.items() if targets(n, m)]
    else:
        chosen = [n for n in linears if any(_has_suffix(n, s) for s in targets)]
        for s in targets:  # a typo in one suffix must not silently drop those layers
            if not any(_has_suffix(n, s) for n in chosen):
                others = [type(m).__name__ for n, m in model.named_modules() if _has_suffix(n, s)]
                why = f"only non-Linear modules ({others[0]})" if others else "nothing"
                raise ValueError(f"target '{s}' matches {why}. Linear layers look like: {examples}")
    if not chosen:
        hint = " (a string is a regex for the whole name; pass a list for suffixes)" if isinstance(targets, str) else ""
        raise ValueError(f"targets={targets!r} match no nn.Linear module{hint}. Linear layers look like: {examples}")
    users = collections.Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for name in chosen:
        if kept[name]:
            raise ValueError(f"'{name}' is inside keep_trainable module '{kept[name]}', which is trained fully: leave "
                             f"it out of targets or out of keep_trainable.")
        why = _why_not_adaptable(model, name, users, dropout)
        if why:
            raise ValueError(f"cannot adapt '{name}': {why}. Leave it out of targets (e.g. a list of name suffixes, "
                             f"or targets=lambda name, module: ... returning False for it).")
    return chosen


def _why_not_adaptable(model: nn.Module, name: str, users: dict, dropout: float) -> str | None:
    """Why W x + B A x would not be what this layer computes, or merge() could not fold B A into W; None if fine."""
    module = model.get_submodule(name)
    if not isinstance(module, nn.Linear):  # a quantized base that declares itself adaptable (is_base)
        return None
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


def is_base(module: nn.Module) -> bool:
    """What can be adapted: an nn.Linear, or a quantized layer whose class declares `unilora_adaptable = True` and
    so promises forward(x) = F.linear(x, dequantize(), bias), with in_features, out_features, bias, compute_dtype
    and a `codes` buffer (pretrained/nf4.py's NF4Linear). Other quantized classes are refused by name."""
    return isinstance(module, nn.Linear) or getattr(type(module), "unilora_adaptable", False) is True


def base_weight(module: nn.Module) -> torch.Tensor:
    """W of a base layer: an nn.Linear's weight, a quantized layer's dequantized weight (compute dtype)."""
    return module.weight if isinstance(module, nn.Linear) else module.dequantize()


def base_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where a base layer computes, in what dtype: its weight's, or a quantized layer's codes' device and compute
    dtype (without dequantizing it)."""
    if isinstance(module, nn.Linear):
        return module.weight.device, module.weight.dtype
    return module.codes.device, module.compute_dtype


def _has_suffix(name: str, suffix: str) -> bool:  # "query" is a suffix of "layer.0.query", not of "layer.0.xquery"
    return ("." + name).endswith("." + suffix)


def resolve_keep(model: nn.Module, keep_trainable: Sequence[str]) -> list[str]:
    """Full names of the keep_trainable modules: an entry is a module's full name, else a name suffix."""
    names, resolved = [n for n, _ in model.named_modules() if n], []
    for entry in [keep_trainable] if isinstance(keep_trainable, str) else keep_trainable:
        matched = [entry] if entry in names else [n for n in names if _has_suffix(n, entry)]
        if not matched:
            raise ValueError(f"keep_trainable entry '{entry}' matches no module of the model.")
        resolved += [n for n in matched if n not in resolved]
    return resolved


def swap_layers(model: nn.Module, names: list[str], keep: list[str], make: Callable) -> None:
    """Freeze all but the `keep` modules, then replace layer i of `names` by make(i, layer); all or nothing."""
    with all_or_nothing(model):
        for p in model.parameters():
            p.requires_grad_(False)
        for name in keep:
            model.get_submodule(name).requires_grad_(True)
        for i, name in enumerate(names):
            replace_module(model, name, make(i, model.get_submodule(name)))


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@contextlib.contextmanager
def all_or_nothing(model: nn.Module):
    """On any error inside, put back the modules (replaced, never modified) and requires_grad flags the model had."""
    modules = list(model.named_modules())[1:]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    except BaseException:
        for name, module in modules:  # parents first, so each name resolves in the restored tree
            if model.get_submodule(name) is not module:
                replace_module(model, name, module)
        for p, flag in flags:
            p.requires_grad_(flag)
        raise


def _check_d(D: int, d: int) -> None:
    if not 1 <= d <= D:
        raise ValueError(f"d={d} must lie in [1, D] with D={D} (the total LoRA size r*(in+out) summed over the "
                         f"targeted layers). Pick d well below D, e.g. D/6 as in the paper's GLUE recipe "
                         f"(d = 23,040 of D = 147,456), or target more layers / raise r.")


def _check_rank(r: int, layers: list) -> None:
    """A rank-r update B A of an out x in matrix has rank <= min(in, out): a larger r only adds parameters."""
    for name, fan_in, fan_out in layers:
        if r > min(fan_in, fan_out):
            raise ValueError(f"r={r} exceeds min(in, out) = {min(fan_in, fan_out)} of layer '{name}' ({fan_in} -> "
                             f"{fan_out}): a rank-r update of that matrix needs r <= {min(fan_in, fan_out)}.")


def check_settings(r: int, dropout: float) -> None:
    if r < 1:
        raise ValueError(f"r={r} must be a positive integer (the paper uses r = 4).")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout={dropout} must lie in [0, 1).")


def keep_fp32(params: list[nn.Parameter], fn) -> torch.device:
    """Move params (and their grads) to the device `fn` sends the model to, in fp32 or wider (fp64 with an fp64
    model): optimizer state and updates of a few trained numbers must not be rounded through 16 bits."""
    probe = fn(torch.empty(0, dtype=params[0].dtype, device=params[0].device))
    dtype = torch.promote_types(torch.float32, probe.dtype) if probe.is_floating_point() else params[0].dtype
    for p in params:
        p.data = p.data.to(probe.device, dtype)
        if p.grad is not None:
            p.grad = p.grad.to(probe.device, dtype)
    return probe.device


_DEFAULTS = {"keep_trainable": [], "projection": {"kind": "balanced", "normalize": True}}  # files before they existed


def read_adapter_file(path: str, handle=None) -> tuple[dict, dict]:
    """(config, tensors) of a file written by save(); never unpickles arbitrary objects. With a handle (or its
    class), the config is checked against its schema: nothing read from a file is used before this check."""
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
    config = {**_DEFAULTS, **config}
    if handle is not None:
        _check_config(path, config, handle)
    return config, payload


def _check_config(path: str, config: dict, handle) -> None:
    """Of the handle's format, every key of its schema there with its type, the optional keys of _DEFAULTS too."""
    expected = handle.config["format"] if isinstance(handle, Adapter) else FILE_FORMAT
    if config.get("format") != expected:
        raise ValueError(f"{path} holds a '{config.get('format')}' adapter, this is '{expected}'.")
    for key, kind in {**handle.schema, "keep_trainable": list, "projection": dict}.items():
        if key not in config:
            raise ValueError(f"{path}: the config lacks '{key}'; the file is damaged or from another program.")
        if not isinstance(config[key], kind) or (isinstance(config[key], bool) and kind is int):
            raise ValueError(f"{path}: config '{key}' is {config[key]!r}, not a {getattr(kind, '__name__', kind)}.")
    if not all(isinstance(name, str) for name in config["keep_trainable"]) or \
            not isinstance(config["projection"].get("kind"), str):
        raise ValueError(f"{path}: config 'keep_trainable' or 'projection' is damaged.")
    for layer in config.get("layers", ()):
        if not (isinstance(layer, list) and len(layer) == 3 and isinstance(layer[0], str)
                and all(isinstance(v, int) and v > 0 for v in layer[1:])):
            raise ValueError(f"{path}: config 'layers' holds {layer!r}, not [name, in_features, out_features].")


def _check_file_fits(path: str, config: dict, model: nn.Module) -> None:
    """What a file claims, checked against the model by arithmetic alone before P (D entries) is built: a damaged
    2 KB file must not make load_unilora allocate gigabytes."""
    modules = dict(model.named_modules())
    for name, fan_in, fan_out in config["layers"]:
        m = modules.get(name)
        if not is_base(m) or (m.in_features, m.out_features) != (fan_in, fan_out):
            found = f"{m.in_features} -> {m.out_features}" if is_base(m) else \
                f"a {type(m).__name__}" if m is not None else "nothing"
            raise ValueError(f"{path} does not fit this model: layer '{name}' is {fan_in} -> {fan_out} in the file, "
                             f"this model has {found} there.")
    try:
        _check_rank(config["r"], config["layers"])
    except ValueError as e:
        raise ValueError(f"{path}: {e} The file is damaged.") from None
    D = sum(config["r"] * (fan_in + fan_out) for _, fan_in, fan_out in config["layers"])
    if config["D"] != D:
        raise ValueError(f"{path}: its config says D={config['D']}, its layers and r give D={D}; the file is damaged.")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: is there such a process (POSIX only; on Windows os.kill terminates)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but is another user's
        pass
    return True


def _first_difference(saved, current) -> str:
    if not (isinstance(saved, list) and isinstance(current, list)):
        return f"saved {saved!r}, this model {current!r}"
    return next((f"entry {i}: saved {a}, this model {b}" for i, (a, b) in enumerate(zip(saved, current)) if a != b),
                f"saved {len(saved)} entries, this model {len(current)}")
