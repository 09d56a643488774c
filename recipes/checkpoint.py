"""Exact resume for the causal-LM scripts (train_math.py, train_instruct.py, through recipes/causal_lm.py): what a
checkpoint holds, the refusal to continue a run with other settings or from a damaged file, when a run folder may be
resumed, and the data order that lets a resumed run see exactly the batches it had not yet seen.

Why it exists: a long run is stopped (--stop_after, a job's time limit, Ctrl-C) and continued (--resume); the
continued run must be the run that was never stopped. So a checkpoint holds every state that shapes the next step
(the trained tensors, AdamW's moments, the schedule, the fp16 scaler, the random generators), and it is refused when
a setting that shapes training differs, or when an entry does not fit the run (a damaged or foreign file). It is read
with weights_only=True: a checkpoint never runs code.
"""
import contextlib
import functools
import json
import shlex
from dataclasses import dataclass

import numpy as np
import torch

from pretrained.files import atomic_write
from recipes.training import UserError

ANEW = "start the run anew with --overwrite instead of --resume"  # what to do about a checkpoint that cannot go on


# ---------------------------------------------------------------------------------------------- the checkpoint

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


def read_checkpoint(path, run_config, script):
    """The checkpoint of this run (of `script`), refused when any setting that shapes training differs."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as e:
        why = (str(e).splitlines() or [e.__class__.__name__])[0][:200]
        raise UserError(f"{path} cannot be read as a checkpoint ({why}); {ANEW}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict):
        raise UserError(f"{path} is not a checkpoint written by {script}")
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


def resume(state: TrainingState, ckpt: dict, folder, writes: bool) -> int:
    """Put the checkpoint's state (folder/checkpoint.pt) back in place and cut the training log (folder/
    train_log.jsonl, JSON lines with a "step") back to its step: steps logged after the checkpoint was written will
    be trained again. Only the copy that `writes` rewrites the log. Returns the number of steps the checkpoint had
    done. A checkpoint or log that does not fit this run is a UserError before anything is changed."""
    path, log_path = folder / "checkpoint.pt", folder / "train_log.jsonl"
    problem = damage(ckpt, state)
    if problem:
        raise UserError(f"{path} is not a checkpoint of this run ({problem}); {ANEW}")
    step = ckpt["step"]
    kept = kept_log(log_path, step)
    try:
        with torch.no_grad():
            for prm, saved in zip(state.params, ckpt["adapter_params"], strict=True):
                prm.copy_(saved)
        state.optimizer.load_state_dict(ckpt["optimizer"])
        state.scheduler.load_state_dict(ckpt["scheduler"])
        state.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["torch_rng"])
        if state.device.type == "cuda" and ckpt["cuda_rng"] is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], state.device)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:  # what damage() leaves to the loaders
        raise UserError(f"{path} is not a checkpoint of this run ({' '.join(str(e).split())[:200]}); {ANEW}") from None
    if writes:
        atomic_write(log_path, lambda f: f.write("".join(x + "\n" for x in kept).encode()))
    return step


CHECKPOINT_KEYS = ("step", "adapter_params", "optimizer", "scheduler", "scaler", "torch_rng", "cuda_rng", "before")


def damage(ckpt: dict, state: TrainingState) -> str | None:
    """What makes `ckpt` unfit to continue `state`, in words, or None: every entry that resume() puts back must
    have the type, and every tensor the shape and dtype, of what this run would save (a file read with
    weights_only=True can still hold any tensors, numbers, strings, lists and dicts)."""
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        return f"it has no {missing[0]!r}"
    if type(ckpt["step"]) is not int or not 1 <= ckpt["step"] <= state.total_steps:
        return f"its step {ckpt['step']!r} is not one of the run's {state.total_steps}"
    params = [p.detach().cpu() for p in state.params]
    expected = dict(adapter_params=params, optimizer=state.optimizer.state_dict(),
                    scheduler=state.scheduler.state_dict(), scaler=state.scaler.state_dict(),
                    torch_rng=torch.get_rng_state())
    wrong = [key for key, like in expected.items() if not fits(ckpt[key], like)]
    if not wrong and not moments_fit(ckpt["optimizer"].get("state", {}), params):
        wrong = ["optimizer"]
    rng = ckpt["cuda_rng"]
    if rng is not None and not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and rng.ndim == 1):
        wrong.append("cuda_rng")
    if ckpt["before"] is not None and not fits(ckpt["before"], {"loglik": 0.0}):
        wrong.append("before")
    return f"its {wrong[0]} does not fit this run's" if wrong else None


def moments_fit(moments: dict, params: list) -> bool:
    """AdamW's state, per parameter index: float tensors of the parameter's shape (the moments) or scalars (step)."""
    return all(type(i) is int and 0 <= i < len(params) and isinstance(m, dict)
               and all(isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape in (params[i].shape, ())
                       for t in m.values())
               for i, m in moments.items())


def fits(saved, like) -> bool:
    """saved has like's structure: a tensor of its dtype and shape, a dict with (at least those of) its keys that
    are present, fitting; a list or tuple of its length; a number for a number, a bool for a bool, a string for a
    string; anything where like is None. Keys that like has and saved lacks are left to the loaders."""
    if isinstance(like, torch.Tensor):
        return isinstance(saved, torch.Tensor) and saved.dtype == like.dtype and saved.shape == like.shape
    if isinstance(like, dict):
        return isinstance(saved, dict) and all(fits(saved[k], v) for k, v in like.items() if k in saved)
    if isinstance(like, (list, tuple)):
        return isinstance(saved, (list, tuple)) and len(saved) == len(like) and all(map(fits, saved, like))
    if isinstance(like, bool):
        return type(saved) is bool
    if isinstance(like, (int, float)):
        return type(saved) in (int, float)
    return like is None or type(saved) is type(like)


def kept_log(log_path, step: int) -> list:
    """The training log's lines of steps 1 to `step`, all of which it must hold: the checkpoint of a step is written
    after the step's line. So a torn last line (the process died while writing it) logged a later step, and is
    dropped with those; any other line that is not a step's is a UserError."""
    lines = log_path.read_bytes().decode("utf-8", "replace").splitlines() if log_path.exists() else []
    kept = []
    for n, line in enumerate(lines, 1):
        logged = logged_step(line)
        if logged is None and n < len(lines):
            raise UserError(f"{log_path}:{n} is not a line of a training log; restore the file, or {ANEW}")
        if logged is not None and logged <= step:
            kept.append(line)
    if [logged_step(x) for x in kept] != list(range(1, step + 1)):
        raise UserError(f"{log_path} does not hold steps 1 to {step}, which the checkpoint has done; restore the "
                        f"file, or {ANEW}")
    return kept


def logged_step(line: str) -> int | None:
    """The step of a training log line, or None for anything else."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return row["step"] if isinstance(row, dict) and type(row.get("step")) is int else None


# ---------------------------------------------------------------------------------------------- the run's folder

def check_run_dir(folder, resume: bool, overwrite: bool) -> None:
    """--resume needs the checkpoint of a run that is not finished; a new run never silently drops a checkpoint."""
    checkpoint = folder / "checkpoint.pt"
    if resume and not checkpoint.is_file():
        raise UserError(f"--resume: no checkpoint at {checkpoint}; drop --resume to start a run")
    if resume and finished(folder):
        raise UserError(f"--resume: {folder} holds a finished run, whose results --resume would replace; evaluate "
                        f"it again with --eval_only --load {folder}, or train it anew with --overwrite instead of "
                        f"--resume")
    if not resume and checkpoint.is_file() and not overwrite:
        raise UserError(f"{folder} holds a run with a checkpoint; pass --resume to continue it, --overwrite to "
                        f"replace it, or another --output_dir")


def finished(folder) -> bool:
    try:
        return json.loads((folder / "results.json").read_text()).get("status") == "finished"
    except (OSError, ValueError, RecursionError, AttributeError):  # no results, or not ours: nothing to protect
        return False


@contextlib.contextmanager
def resume_hint(run):
    """Ctrl-C (or SIGTERM) once the run has a checkpoint in its folder (run.saved, its step): one line with the
    command that continues it, the same flags with --resume (which refuses other settings)."""
    try:
        yield
    except KeyboardInterrupt:
        if run.saved is None:
            raise
        raise KeyboardInterrupt(f"interrupted at step {run.saved} (the last checkpoint); continue with: "
                                f"{resume_command(run)}") from None


def resume_command(run) -> str:
    argv, skip = [], False
    for arg in run.argv:  # without what must not be repeated (--overwrite) or shown (--hf_token)
        if not skip and arg not in ("--overwrite", "--resume", "--hf_token") and not arg.startswith("--hf_token="):
            argv.append(arg)
        skip = arg == "--hf_token"
    if run.args.output_dir is None:
        argv += ["--output_dir", str(run.folder)]
    return shlex.join(["python", run.script.name, *argv, "--resume"])


# ---------------------------------------------------------------------------------------------- the data order

def batch_order(seed: int, n: int, batch_size: int, steps_per_epoch: int, lengths=None):
    """step -> the indices of its batch. Epoch e visits the n examples in default_rng([seed, e]).permutation(n):
    the order depends only on (seed, epoch), so a resumed run recomputes exactly the batches it had not yet seen.
    lengths (one number per example): that order grouped by length, as transformers' group_by_length does it."""
    @functools.lru_cache(maxsize=1)  # once per epoch, not per step (7.5 ms for MetaMathQA's 395K examples)
    def epoch_order(epoch):
        order = np.random.default_rng([seed, epoch]).permutation(n)
        return order if lengths is None else grouped_by_length(order, lengths, batch_size)

    def batch_indices(step):
        epoch, k = divmod(step, steps_per_epoch)
        return epoch_order(epoch)[k * batch_size:(k + 1) * batch_size]
    return batch_indices


def grouped_by_length(order, lengths, batch_size):
    """transformers' LengthGroupedSampler (get_length_grouped_indices) on a shuffled order: cut it into megabatches
    of min(n // (4 batch_size), 50) (at least 1) batches, sort each megabatch longest first (ties keep their order),
    and put the longest example of all first, so that a run too large for memory fails at its first step."""
    size = max(1, min(len(order) // (batch_size * 4), 50)) * batch_size
    mega = [sorted(order[i:i + size].tolist(), key=lambda j: -lengths[j]) for i in range(0, len(order), size)]
    longest = max(range(len(mega)), key=lambda m: lengths[mega[m][0]])  # the first of the longest, as argmax
    mega[0][0], mega[longest][0] = mega[longest][0], mega[0][0]
    return np.array([j for m in mega for j in m], dtype=np.int64)
