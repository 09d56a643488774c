"""Exact resume for train_math.py: what a checkpoint holds, the refusal to continue a run with other settings, and
the data order that lets a resumed run see exactly the batches it had not yet seen.

Why it exists: a long run is stopped (--stop_after, a job's time limit) and continued (--resume); the continued run
must be the run that was never stopped. So a checkpoint holds every state that shapes the next step (the trained
tensors, AdamW's moments, the schedule, the fp16 scaler, the random generators), and it is refused when a setting
that shapes training differs. It is read with weights_only=True: a checkpoint never runs code.
"""
import functools
import json
from dataclasses import dataclass

import numpy as np
import torch

from pretrained.files import atomic_write
from recipes.training import UserError


@dataclass
class TrainingState:
    """What a checkpoint saves and restores: the trainable tensors and what moves them, on `device`; and what it
    records beside them (the planned steps, the run's settings, the base model's score, the data order)."""
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    total_steps: int
    config: dict
    before: dict | None
    data_order: str


def save_checkpoint(path, state: TrainingState, step: int) -> None:
    """The state after `step` steps, written atomically: a crash leaves the previous checkpoint."""
    ckpt = dict(step=step, total_steps=state.total_steps, config=state.config, before=state.before,
                adapter_params=[x.detach().cpu().clone() for x in state.params],
                optimizer=state.optimizer.state_dict(), scheduler=state.scheduler.state_dict(),
                scaler=state.scaler.state_dict(), torch_rng=torch.get_rng_state(),
                cuda_rng=torch.cuda.get_rng_state(state.device) if state.device.type == "cuda" else None,
                data_order=state.data_order)
    atomic_write(path, lambda f: torch.save(ckpt, f))


def read_checkpoint(path, run_config):
    """The checkpoint of this run, refused when any setting that shapes training differs."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as e:
        raise UserError(f"{path} cannot be read as a checkpoint ({str(e).splitlines()[0][:200]}); start a new "
                        f"run with --overwrite") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict):
        raise UserError(f"{path} is not a checkpoint written by train_math.py")
    changed, saved = [], ckpt["config"]
    for key, now in run_config.items():
        # checkpoints written before --projection existed trained Uni-LoRA's balanced P
        was = saved.get(key, "balanced" if key == "projection" and saved.get("method") == "unilora" else None)
        if was != now:
            flag = {"train_sha256": "--train_data (the file's contents changed)",
                    "n_train": "--train_data/--max_train_samples (number of examples)"}.get(key, f"--{key}")
            changed.append(f"{flag}: {was!r} -> {now!r}")
    if changed:
        raise UserError(f"{path} was made with other settings ({'; '.join(changed)}); rerun with the original "
                        f"flags or start a new --output_dir")
    return ckpt


def resume(state: TrainingState, ckpt: dict, log_path, writes: bool) -> int:
    """Put the checkpoint's state back in place and cut the training log (JSON lines with a "step") back to its
    step: steps logged after the checkpoint was written will be trained again. Only the copy that `writes` rewrites
    the log. Returns the number of steps the checkpoint had done."""
    with torch.no_grad():
        for prm, saved in zip(state.params, ckpt["adapter_params"], strict=True):
            prm.copy_(saved)
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    state.scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["torch_rng"])
    if state.device.type == "cuda" and ckpt.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(ckpt["cuda_rng"], state.device)
    step = ckpt["step"]
    kept = [x for x in log_path.read_text().splitlines() if json.loads(x)["step"] <= step] \
        if log_path.exists() else []
    if writes:
        atomic_write(log_path, lambda f: f.write("".join(x + "\n" for x in kept).encode()))
    return step


def batch_order(seed: int, n: int, batch_size: int, steps_per_epoch: int):
    """step -> the indices of its batch. Epoch e visits the n examples in default_rng([seed, e]).permutation(n):
    the order depends only on (seed, epoch), so a resumed run recomputes exactly the batches it had not yet seen."""
    @functools.lru_cache(maxsize=1)  # once per epoch, not per step (7.5 ms for MetaMathQA's 395K examples)
    def epoch_order(epoch):
        return np.random.default_rng([seed, epoch]).permutation(n)

    def batch_indices(step):
        epoch, k = divmod(step, steps_per_epoch)
        return epoch_order(epoch)[k * batch_size:(k + 1) * batch_size]
    return batch_indices
