"""Many tasks on one base: a bank of Uni-LoRA vectors, and batches that mix tasks row by row.

A Uni-LoRA adapter is one vector theta_d (plus any head trained beside it): 92 KB at d = 23,040. Every task trained
on the same base with the same layers, r, d and P differs from the others only by that vector, so one frozen model
can hold hundreds of tasks and answer a batch whose rows belong to different tasks:

    bank = load_tasks(model, {"sst2": "sst2/adapter.pt", "rte": "rte/adapter.pt"})
    with bank.rows(["sst2", "rte", None, "sst2"]):      # one task per row of the batch; None: the base model
        logits = model(batch)

Inside `rows(...)` every adapted layer computes base(x) + B_t A_t x_i for row i of task t: the base matmul once for
the whole batch; each present task's (A_t, B_t) from theta_D = P theta_t, built once per block (as the model's own
per pass) and freed at its end; then ONE pair of matmuls for all tasks: their A's stacked, their B's side by side,
and between the two a 0/1 mask keeping each row's own task's r columns. A task's head (the modules trained beside
theta_d, e.g. a GLUE classifier) is applied to its own rows; heads of different widths are allowed: the output is as
wide as the widest, each row's columns past its own head's width NaN. Gradients reach each task's vector and head
from its own rows only, so several tasks train in one batch. Outside `rows(...)` the model is the single adapter it
was. At rest a task costs 4d bytes plus its heads.

unilora.py knows nothing of this file: the bank reads task files itself, lends their vectors and heads to the
model's adapter to save them (Adapter.save), and inside `rows(...)` gives each adapted layer and head a per-row
forward.
"""
from __future__ import annotations

import contextlib
import copy
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from unilora import (SharedVector, UniLoRA, all_or_nothing, keep_fp32, load_unilora, read_adapter_file,
                     replace_module)

# Modules that act on each row alone: a head built only of these can be applied to a subset of the batch's rows.
ROW_WISE = (nn.Linear, nn.LayerNorm, nn.Dropout, nn.Identity, nn.Tanh, nn.ReLU, nn.GELU, nn.SiLU, nn.Sigmoid,
            nn.Embedding)


class Task(nn.Module):
    """One task of a bank: its theta_d, its heads (copies of the model's keep_trainable modules, in their order),
    and its (A, B) for every layer, computed from theta_d with the model's P and cached as the model's own are."""

    def __init__(self, theta: torch.Tensor, heads: list[nn.Module], adapter: UniLoRA, origin: str):
        super().__init__()
        self.theta_d, self.heads, self.origin = nn.Parameter(theta), nn.ModuleList(heads), origin
        shared = adapter.shared  # the P and the layer shapes of the model's adapter
        self.__dict__["shared"] = SharedVector(self.theta_d, shared.projection, shared.shapes)  # P: not a copy

    def _apply(self, fn, recurse=True):  # bank.to(dtype) casts the heads; theta_d stays fp32, as the model's own
        keep_fp32([self.theta_d], fn)
        self.heads._apply(fn)
        self.shared.refresh()
        return self


class TaskBank(nn.Module):
    """Tasks by name, all sharing the model's base, layers and P. `parameters()` are every task's theta_d and heads,
    for training several tasks at once; `.to(device)` moves them (the model moves on its own)."""

    def __init__(self, model: nn.Module, adapter: UniLoRA):
        super().__init__()
        self.__dict__["model"], self.adapter = model, adapter  # not submodules: the bank holds its tasks only
        self.tasks = nn.ModuleDict()  # "task:<name>" -> Task (the prefix keeps any name clear of nn.Module's own)
        self._plan = None  # inside rows(...): the batch's rows by task
        for name in adapter.config["keep_trainable"]:
            _check_row_wise(model, name)

    def add(self, name: str, path: str | None = None) -> None:
        """A task from an adapter file saved from this base with the same layers, r, d, P and trained modules
        (checked: a file that differs is refused naming what differs; only a head's output width may differ), or
        without a path, a copy of the model's adapter as it is now (to train). Costs 4d bytes plus its heads; the
        base weights are never touched."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"task name {name!r}: a non-empty string without '.'")
        if name in self.names():
            raise ValueError(f"task '{name}' is in the bank already; remove('{name}') first to replace it")
        keep = [self.model.get_submodule(n) for n in self.adapter.config["keep_trainable"]]
        theta, heads = (self.adapter.theta_d, keep) if path is None else self._read(path)
        theta = theta.detach().to(self.adapter.theta_d, copy=True)  # fp32 (fp64 beside fp64), on the model's device
        self.tasks["task:" + name] = Task(theta, [copy.deepcopy(m) for m in heads], self.adapter,
                                          path or "the model's adapter")

    @property
    def vectors(self) -> dict[str, nn.Parameter]:
        return {name: self._task(name).theta_d for name in self.names()}

    @property
    def heads(self) -> dict[str, nn.ModuleList]:
        return {name: self._task(name).heads for name in self.names()}

    def remove(self, name: str) -> None:
        if self._plan is not None:
            raise RuntimeError("remove() inside bank.rows(...): leave the `with` block first")
        self._task(name)
        del self.tasks["task:" + name]

    def save(self, name: str, path: str, overwrite: bool = False) -> None:
        """Write one task as an ordinary adapter file (load_unilora reads it back alone): the model's adapter,
        lent the task's theta_d and heads for the call, saves it."""
        task = self._task(name)
        theta, names = self.adapter.theta_d, self.adapter.config["keep_trainable"]
        kept, heads = theta.detach().clone(), [self.model.get_submodule(n) for n in names]
        try:
            with torch.no_grad():
                theta.copy_(task.theta_d)
            for n, head in zip(names, task.heads):
                replace_module(self.model, n, head)
            self.adapter.save(path, overwrite=overwrite)
        finally:
            with torch.no_grad():
                theta.copy_(kept)
            for n, head in zip(names, heads):
                replace_module(self.model, n, head)
            self.adapter.refresh()

    def names(self) -> list[str]:
        return [key.removeprefix("task:") for key in self.tasks]

    def nbytes(self, name: str) -> int:
        """What the task costs at rest: its theta_d and its heads' tensors (inside a rows(...) block a present task
        also holds its (A, B) of every layer, D numbers, freed when the block ends)."""
        tensors = [*self._task(name).parameters(), *self._task(name).buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    @contextlib.contextmanager
    def rows(self, tasks: list[str | None]):
        """Forward passes inside give row i of the batch the task tasks[i] (None: the base model, with the model's
        own heads). Each adapted layer's and head's forward is replaced for the duration, then restored."""
        if self._plan is not None:
            raise RuntimeError("bank.rows(...) blocks do not nest")
        for t in tasks:
            if t is not None:
                self._task(t)
        groups: dict = {}
        for i, t in enumerate(tasks):
            groups.setdefault(t, []).append(i)
        self._plan = (list(tasks), groups, {})  # {}: row indices and masks on each device, made once
        layers = [m for _, m in self.adapter.layers()]
        heads = [self.model.get_submodule(n) for n in self.adapter.config["keep_trainable"]]
        try:
            for layer in layers:  # an instance attribute `forward` shadows the class's for nn.Module.__call__
                layer.forward = functools.partial(self._layer_forward, layer)
            for k, head in enumerate(heads):
                head.forward = functools.partial(self._head_forward, head, k, type(head).forward.__get__(head))
            yield self
        finally:
            for module in layers + heads:
                module.__dict__.pop("forward", None)
            for t in groups:  # a task's (A, B) is D numbers: kept for the block only, so a task rests at 4d bytes
                if t is not None and "task:" + t in self.tasks:
                    self._task(t).shared.refresh()
            self._plan = None

    # -- inside rows(...) ----------------------------------------------------------------------------------------

    def _groups(self, x: torch.Tensor, where: str):
        """[(task, its rows as a tensor on x's device)], made once per device."""
        tasks, groups, made = self._plan
        if x.shape[0] != len(tasks):
            raise ValueError(f"bank.rows(...) was given {len(tasks)} tasks, but {where} sees a batch of "
                             f"{x.shape[0]} rows")
        if x.device not in made:
            made[x.device] = [(t, torch.tensor(rows, device=x.device)) for t, rows in groups.items()]
        return made[x.device]

    def _mask(self, x: torch.Tensor):
        """(present tasks, a rows x (tasks r) 0/1 mask: row i keeps the r columns of its own task), made once."""
        tasks, groups, made = self._plan
        if (x.device, x.dtype) not in made:
            present, r = [t for t in groups if t is not None], self.adapter.config["r"]
            mask = torch.zeros(len(tasks), len(present) * r)
            for i, t in enumerate(tasks):
                if t is not None:
                    mask[i, present.index(t) * r:(present.index(t) + 1) * r] = 1
            made[x.device, x.dtype] = present, mask.to(x.device, x.dtype)
        return made[x.device, x.dtype]

    def _layer_forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        """base(x) for all rows at once, plus dropout(x_i) A_t^T B_t^T for row i of task t. The present tasks' A's
        stacked (T r x in) and B's side by side (out x T r) make two matmuls serve every task; between them each
        row keeps only its own task's r columns (the rest exactly 0), so it gets its task's result and sends
        gradient to its task alone. The T r columns cost little beside the base matmul's `out` columns."""
        self._groups(x, "an adapted layer")  # the batch is the one rows(...) describes
        out = layer.base(x)
        present, mask = self._mask(x)
        if not present:
            return out
        A, B = self._stacked(layer.index, present, x)
        h = F.linear(layer.dropout(x), A) * mask.view(x.shape[0], *[1] * (x.dim() - 2), -1)
        return out + F.linear(h, B)

    def _stacked(self, index: int, present: list, x: torch.Tensor):
        """Layer `index`'s A's stacked and B's side by side, in x's dtype; without gradients (generation: one forward
        per token) made once per block."""
        made, key = self._plan[2], ("AB", index, x.device, x.dtype)
        if key in made:
            return made[key]
        pairs = [self._task(t).shared.factors()[index] for t in present]
        AB = (torch.cat([a for a, _ in pairs]).to(x.device, x.dtype),
              torch.cat([b for _, b in pairs], dim=1).to(x.device, x.dtype))
        if not torch.is_grad_enabled():
            made[key] = AB
        return AB

    def _head_forward(self, head, k: int, own_forward, x: torch.Tensor) -> torch.Tensor:
        """Each task's k-th head on its rows (None: the model's own); as wide as the widest, NaN past a row's own."""
        outs = []
        for task, rows in self._groups(x, "a head"):
            module = own_forward if task is None else self._task(task).heads[k]
            outs.append((rows, module(x.index_select(0, rows))))
        width = max(y.shape[-1] for _, y in outs)
        shape = (x.shape[0], *outs[0][1].shape[1:-1], width)
        full = outs[0][1].new_full(shape, float("nan"))
        for rows, y in outs:
            full = full.index_copy(0, rows, F.pad(y, (0, width - y.shape[-1]), value=float("nan")))
        return full

    # -- reading a task's file ----------------------------------------------------------------------------------

    def _task(self, name):
        if not isinstance(name, str) or "task:" + name not in self.tasks:
            raise KeyError(f"no task {name!r} in the bank (tasks: {', '.join(self.names()) or 'none'})")
        return self.tasks["task:" + name]

    def _read(self, path):
        """(theta_d, heads) of a file that shares the bank's base and P, each tensor checked before use."""
        config, payload = read_adapter_file(path, UniLoRA)
        first = next((task.origin for task in self.tasks.values()), "the bank's adapter")
        for key in UniLoRA.identity_keys:
            if config[key] != self.adapter.config[key]:
                raise ValueError(f"{path} (fingerprint {config['fingerprint'][:32]}) cannot join a bank with "
                                 f"{first} (fingerprint {self.adapter.config['fingerprint']}): {key} differs "
                                 f"({_short(config[key])} vs {_short(self.adapter.config[key])}); tasks of one bank "
                                 f"share the base, layers, r, d and P (the same seed)")
        theta, trained = payload.get("theta_d"), payload.get("trained", {})
        _check_tensor(path, "theta_d", theta, (config["d"],))
        if not isinstance(trained, dict):
            raise ValueError(f"{path}: 'trained' is not a dict of tensors; the file is damaged")
        keep, heads = config["keep_trainable"], []
        outside = sorted(k for k in trained if not k.startswith(tuple(n + "." for n in keep)))
        if outside:
            raise ValueError(f"{path} trains '{outside[0]}' outside its keep_trainable modules: a bank cannot apply "
                             f"it per row; load this file alone with load_unilora")
        for n in keep:
            head = copy.deepcopy(self.model.get_submodule(n))
            wide = [m for m in head.modules() if isinstance(m, nn.Linear)][-1:]  # the output layer: any width
            state = {}
            for key, t in head.state_dict().items():
                saved = trained.get(f"{n}.{key}")
                owner = head.get_submodule(key.rpartition(".")[0]) if "." in key else head
                free = owner in wide and key.rpartition(".")[2] in ("weight", "bias")
                _check_tensor(path, f"{n}.{key}", saved, t.shape, free_rows=free)
                if saved.shape != t.shape:  # another output width: the layer is made to the file's
                    setattr(owner, key.rpartition(".")[2], nn.Parameter(t.new_empty(saved.shape)))
                    owner.out_features = saved.shape[0]
                state[key] = saved
            head.load_state_dict(state)
            heads.append(head)
        return theta, heads


def load_tasks(model: nn.Module, files: dict[str, str], projection=None) -> TaskBank:
    """Uni-LoRA applied once (with the first file's settings: the model is then that task alone, outside rows()),
    and every file's theta_d and heads in a bank. All files must share layers, r, d and P (checked, named). All or
    nothing: on any error the model is as it was. `projection`: the factory of a P other than the paper's, as for
    load_unilora."""
    if not files:
        raise ValueError("load_tasks needs at least one {name: adapter file}")
    first = next(iter(files.values()))
    config, _ = read_adapter_file(first, UniLoRA)
    modules = dict(model.named_modules())
    keep = [n for n in config["keep_trainable"] if n in modules]
    for name in keep:  # refused before the model is touched
        _check_row_wise(model, name)
    heads = {n: copy.deepcopy(modules[n].state_dict()) for n in keep}  # load_unilora writes the first file's
    with all_or_nothing(model):  # the model's layers and requires_grad flags, put back on any error
        try:
            bank = TaskBank(model, load_unilora(model, first, projection=projection))
            for name, path in files.items():
                bank.add(name, path)
        except BaseException:
            for n, state in heads.items():
                modules[n].load_state_dict(state)
            raise
    return bank


def _check_row_wise(model: nn.Module, name: str) -> None:
    """A head is applied to a subset of rows only if every module in it acts on each row alone."""
    for sub, module in model.get_submodule(name).named_modules():
        if not list(module.children()) and not isinstance(module, ROW_WISE):
            where = f"{name}.{sub}" if sub else name
            raise ValueError(f"the trained module '{where}' is a {type(module).__name__}, which a bank cannot apply "
                             f"per row (it may mix rows); row-wise kinds: {', '.join(k.__name__ for k in ROW_WISE)}")


def _check_tensor(path, key, t, shape, free_rows=False) -> None:
    """A floating-point, finite tensor of `shape` (free_rows: any number of rows, as a head's output layer)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"{path}: '{key}' is missing or not a floating-point tensor; the file is damaged")
    if tuple(t.shape[free_rows:]) != tuple(shape[free_rows:]) or t.dim() != len(shape) or t.numel() == 0:
        raise ValueError(f"{path}: '{key}' has shape {tuple(t.shape)}; this model needs {tuple(shape)}"
                         + (" (any number of rows)" if free_rows else ""))
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{path}: '{key}' holds NaN or infinite values: the run that saved it diverged")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
