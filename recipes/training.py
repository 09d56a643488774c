"""What both training scripts share, written once: how a run fails, its flags, its folders, its optimiser step, and
its copies under torchrun.

Why it exists: train_glue.py and train_math.py are two experiments over one training procedure. Everything here
behaves the same in both (a user error is one line, a run folder is never another run's, an optimiser step sums the
copies' gradients before it checks, clips and steps), so each script reads as the steps of its own experiment.
"""
import argparse
import contextlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrained.hub import missing_dirs, remove_if_empty

# -------------------------------------------------------------------------------------------------- how a run fails
# Two kinds of failure are the user's to fix, and end the process with one line, "error: ...", and no traceback: a
# UserError (a flag, a file, the network) and a NonFiniteLoss (the run diverged). Anything else is a bug: traceback.


class UserError(Exception):
    """Something the user can fix (a flag, a file, the network); printed as one short line, no traceback."""


class NonFiniteLoss(Exception):
    """Training diverged; raised before anything of the diverged state is saved."""


def check_finite(loss: float, step: int, hint: str = "lower --lr / --head_lr") -> None:
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"the loss became {loss} at step {step}: training diverged and was stopped; nothing of "
                            f"this step was saved. Try again with a smaller learning rate ({hint}).")


def is_main_copy() -> bool:
    """Whether this process is the first copy (RANK 0) of a torchrun launch, or a plain `python` run."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def errors_as_exit():
    """A UserError or NonFiniteLoss in the block ends the process: "error: ..." (status 1) from the first copy; the
    other copies meet the same error (or main_first told them) and leave with status 1 without a word."""
    try:
        yield
    except (UserError, NonFiniteLoss) as e:
        raise SystemExit(f"error: {e}" if is_main_copy() else 1) from None


@contextlib.contextmanager
def printing_on_main_copy():
    """Under torchrun every copy runs the whole script; all but the first print nothing, since the same lines N times
    would bury the run's. Their stderr (the traceback of a failure of that copy alone) still shows."""
    if is_main_copy():
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


class Parser(argparse.ArgumentParser):
    """argparse, with every copy under torchrun checking the flags alike (status 2 on an error) and only the first
    one saying why. short_errors: the message alone, "error: ... (see --help)", instead of usage line + message."""

    def __init__(self, *args, short_errors=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.short_errors = short_errors

    def error(self, message):
        if not is_main_copy():
            self.exit(2)
        if self.short_errors:
            self.exit(2, f"error: {message} (see --help)\n")
        super().error(message)


# -------------------------------------------------------------------------------------------------- command line
# Number types for argparse: a bad value is refused with the flag's name before anything is read or written.

def _number(kind, low, low_ok, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(value) or value < low or (value == low and not low_ok):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    parse.__name__ = what  # argparse names the type in its message
    return parse


positive_int = _number(int, 1, True, "a positive integer")
nonnegative_int = _number(int, 0, True, "an integer >= 0")
positive_float = _number(float, 0.0, False, "a finite number > 0")
nonnegative_float = _number(float, 0.0, True, "a finite number >= 0")


def device_name(text):
    """--device: "auto" (cuda when present, else cpu) or a torch device name."""
    try:
        text == "auto" or torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (auto, cpu, cuda, cuda:1, mps)") from None
    return text


def fraction(text):
    value = nonnegative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in [0, 1)")
    return value


# -------------------------------------------------------------------------------------------------- run folders
# A run writes into a folder of its own, never into a model's or another run's; an evaluation of a saved run goes
# to a new eval-N/ beside the run's files, which it never replaces.

MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "tokenizer.json")
RUN_FILES = ("results.json", "run.json", "adapter.pt", "checkpoint.pt", "predictions.jsonl", "summary.json")


def prepare_output_dir(folder, *, overwrite=False, flag="--output_dir") -> Path:
    """Make `folder` the place a run writes into, refusing any folder whose contents it could destroy.

    A model folder is always refused (its config.json and weights are never replaced); a folder holding a run
    is refused unless overwrite; so is a non-empty folder of anything else. Nothing is created on refusal.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SystemExit(f"{flag} {folder} is a file, not a folder.")
    present = set(os.listdir(folder)) if folder.is_dir() else set()
    if present & set(MODEL_FILES) - {"config.json"} or ("config.json" in present and not present & set(RUN_FILES)):
        raise SystemExit(f"{flag} {folder} holds a model; runs never write into a model folder. Pick another {flag}.")
    if present & set(RUN_FILES) and not overwrite:
        raise SystemExit(f"{flag} {folder} already holds a run; pass --overwrite to replace it, or pick another {flag}.")
    if present and not present & set(RUN_FILES):
        raise SystemExit(f"{flag} {folder} is not empty and holds no run of ours; pick an empty or new folder.")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def new_eval_dir(run_dir) -> Path:
    """A fresh folder beside the run's own files for an evaluation of a saved run: eval-1, eval-2, ..."""
    run_dir = Path(run_dir)
    n = 1
    while (run_dir / f"eval-{n}").exists():
        n += 1
    return run_dir / f"eval-{n}"


def eval_output_dir(output_dir, load, refusal: str) -> Path:
    """Where --eval_only --load writes: --output_dir, else a new eval-N/ in the run. Never the run itself or a folder
    holding it (--overwrite would replace the run): a UserError, `refusal` filled with {folder} and {default}."""
    load = Path(load)
    folder = Path(output_dir) if output_dir else new_eval_dir(load)
    if folder.resolve() in (load.resolve(), *load.resolve().parents):
        raise UserError(refusal.format(folder=folder, default=new_eval_dir(load)))
    return folder


def read_saved_run(folder, complaint: str, older: str | None = None) -> dict:
    """The settings a saved run recorded (--eval_only --load): its run.json; runs written before run.json existed,
    the `older` entry of their results.json. A folder without them is a UserError: "--load FOLDER: " + `complaint`,
    filled with the {path} it read and the {error}'s name."""
    folder = Path(folder)
    path = folder / "run.json"
    try:
        if older and not path.is_file() and (folder / "results.json").is_file():
            path = folder / "results.json"
            settings = json.loads(path.read_text()).get(older)
        else:
            settings = json.loads(path.read_text())
        if not isinstance(settings, dict):
            raise ValueError(f"{path} holds no settings")
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"--load {folder}: " + complaint.format(path=path, error=e.__class__.__name__)) from None
    return settings


def _begin_stage(folder, stage, overwrite):
    """Check the output folder and make an empty stage beside it; returns the folders this created."""
    created = missing_dirs(folder)
    prepare_output_dir(folder, overwrite=overwrite)
    if stage.exists() and not (stage / ".unilora-partial").exists():
        raise SystemExit(f"{stage} exists and is not ours; move it away or pick another --output_dir.")
    shutil.rmtree(stage, ignore_errors=True)  # left by a killed run of this script
    stage.mkdir()
    (stage / ".unilora-partial").touch()
    return created


@contextlib.contextmanager
def staged(folder, overwrite, ranks):
    """Yield folder.partial to write into; it replaces `folder` when the block succeeds, and vanishes if not, with
    the folders made for it: a run appears only when complete, and a failure removes exactly what it created.
    Only the main copy touches the disk; the others get the same path and never write to it."""
    folder = Path(folder).absolute()
    stage = folder.with_name(folder.name + ".partial")
    created = main_first(ranks, _begin_stage, folder, stage, overwrite, share=True)
    if not ranks.main:
        yield stage
        return
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        remove_if_empty(created)
        raise
    (stage / ".unilora-partial").unlink()
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(folder, old)
    os.replace(stage, folder)
    shutil.rmtree(old)


# -------------------------------------------------------------------------------------------------- optimiser step

def autocast(device, dtype=None):
    """An autocast context for `dtype` (torch.bfloat16, torch.float16) on `device`; None: fp32, a null context."""
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext()


def warmup_then_decay(optimizer, total: int, warmup_ratio: float, decay: str):
    """The learning rate of every step as a factor of the peak: linear warmup over ceil(warmup_ratio * total) steps,
    then down to zero at `total`, "linear" (the GLUE recipe) or "cosine" (the math recipe); step s (0-based) trains
    with the factor at s. Returns the scheduler and the number of warmup steps."""
    warmup = math.ceil(warmup_ratio * total)

    def factor(s):
        if s < warmup:
            return (s + 1) / warmup
        if decay == "linear":
            return max(0.0, (total - s) / max(1, total - warmup))
        progress = (s - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), warmup


def optimizer_step(optimizer, scheduler, loss: float, step: int, ranks, *, grad_clip: float, scaler=None,
                   hint: str = "lower --lr / --head_lr"):
    """The end of every optimiser step, once this copy's micro-batches have run backward (`loss`: the sum of their
    losses, each already divided by the whole batch's normaliser). In order: the whole batch's loss, stopped if not
    finite (on every copy alike, before anything is updated or saved); the copies' gradients summed; clipping to
    grad_clip (0: off); the step (fp16: through the gradient scaler, which skips a step whose gradients overflowed);
    the schedule, unless skipped; the gradients cleared. Returns (loss, gradient norm before clipping, lr, skipped)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    loss = summed(loss, ranks)
    check_finite(loss, step, hint)
    sum_gradients(params, ranks)  # before unscale_: every copy sees the same overflow and clips the same norm
    if scaler is not None:
        scaler.unscale_(optimizer)
    grads = [p.grad for p in params if p.grad is not None]
    norm = (torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip
            else torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))
    lr, skipped = optimizer.param_groups[0]["lr"], False
    if scaler is None:
        optimizer.step()
    else:
        scale = scaler.get_scale()
        scaler.step(optimizer)  # fp16: skipped when a gradient overflowed, and the scale shrinks
        scaler.update()
        skipped = scaler.get_scale() < scale
    if not skipped:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, float(norm), lr, skipped


# -------------------------------------------------------------------------------------------------- data parallel
# `torchrun --nproc_per_node N script.py ...` starts N copies with RANK / WORLD_SIZE / LOCAL_RANK set; each copy
# trains on its share of every global batch, and one all-reduce per optimiser step sums the trainable gradients.
# A plain `python script.py` never touches torch.distributed.

@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def main(self) -> bool:  # the one copy that writes files, logs and progress bars
        return self.rank == 0


def start_data_parallel(device: str | None = "auto") -> Ranks:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA, one GPU per copy). device: a
    torch device name, or "auto"/None: cuda when present, else cpu. Not a device name, or a CUDA device on a
    machine without one: UserError."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError as e:  # not a device name
        raise UserError(f"--device {device}: {e}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this machine has no CUDA device; use --device cpu")
    if "WORLD_SIZE" not in os.environ:
        return Ranks(device=device)
    import torch.distributed as dist
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Ranks(rank, world, device)


def stop_data_parallel(ranks: Ranks, failed: bool = False) -> None:
    """Leave the process group: after a barrier, or at once when this copy failed (the others may be gone)."""
    if ranks.world > 1:
        import torch.distributed as dist
        if not failed:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def data_parallel_until_done(ranks: Ranks):
    """The block runs inside the process group; the group is left however the block ends."""
    try:
        yield ranks
    except BaseException:
        stop_data_parallel(ranks, failed=True)  # torchrun then stops the other copies
        raise
    stop_data_parallel(ranks)


def my_share(rows: list, ranks: Ranks) -> list:
    """Rows rank, rank + world, ...: every copy takes its turn through the same seeded order."""
    return rows[ranks.rank::ranks.world]


def gather_shares(share: list, ranks: Ranks) -> list:
    """Undo my_share: every copy's share, interleaved back into the original order (on every copy)."""
    if ranks.world == 1:
        return list(share)
    import torch.distributed as dist
    shares = [None] * ranks.world
    dist.all_gather_object(shares, list(share))
    return [shares[i % ranks.world][i // ranks.world] for i in range(sum(map(len, shares)))]


def sum_gradients(params: list, ranks: Ranks) -> None:
    """One all-reduce (sum) of every trainable gradient: what DistributedDataParallel does, without its buckets.

    A sum, not a mean: each copy divides its loss by the normaliser of the WHOLE global batch (its token or
    example count), so the summed gradient is the one-process gradient. A copy that had no rows adds zeros.
    """
    if ranks.world == 1:
        return
    import torch.distributed as dist
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p).clone()


def main_first(ranks: Ranks, step, *args, share=False):
    """step(*args) on the main copy first: it may download or write. Then the other copies run it too and find what
    it fetched in the cache, or (share=True) take the main copy's result, e.g. the run folder it prepared. If it
    fails on the main copy, that copy raises the error and every other copy exits quietly with status 1, instead
    of waiting forever for a step that will never come."""
    if ranks.world == 1:
        return step(*args)
    import torch.distributed as dist
    result = error = None
    if ranks.main:
        try:
            result = step(*args)
        except BaseException as e:
            error = e
    message = [error is not None, result if share and error is None else None]
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0]:
        raise SystemExit(1)
    return result if ranks.main else message[1] if share else step(*args)


def summed(value: float, ranks: Ranks) -> float:
    """A number summed over the copies, the same on every copy (one process: the number itself)."""
    if ranks.world == 1:
        return value
    import torch.distributed as dist
    total = torch.tensor([value], dtype=torch.float64, device=ranks.device)
    dist.all_reduce(total)
    return total.item()


@torch.no_grad()
def copy_from_main(params: list, ranks: Ranks) -> None:
    """Start every copy from the main copy's trainable values (they agree by seed; this makes it certain)."""
    if ranks.world > 1:
        import torch.distributed as dist
        for p in params:
            dist.broadcast(p.data, src=0)
