"""What both training scripts share: command-line types, run folders, finiteness, data parallelism.
"""
import argparse
import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

# Shared by both training scripts, so that their flags and their run folders behave the same way.

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


class NonFiniteLoss(Exception):
    """Training diverged; raised before anything of the diverged state is saved."""


def check_finite(loss: float, step: int, hint: str = "lower --lr / --head_lr") -> None:
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"the loss became {loss} at step {step}: training diverged and was stopped; nothing of "
                            f"this step was saved. Try again with a smaller learning rate ({hint}).")


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
    machine without one: ValueError."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError as e:  # not a device name
        raise ValueError(f"--device {device}: {e}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA device; use --device cpu")
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
