"""What both training scripts share, written once: how a run fails, its flags, its folders, its optimiser step, and
its copies under torchrun.

Why it exists: train_glue.py and train_math.py are two experiments over one training procedure. Everything here
behaves the same in both (a user error is one line, a run folder is never another run's nor two runs' at once, an
optimiser step sums the copies' gradients before it checks, clips and steps), so each script reads as the steps of
its own experiment.
"""
import argparse
import contextlib
import errno
import json
import math
import os
import re
import shutil
import signal
import sys
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
    other copies meet the same error (or main_first told them) and leave with status 1 without a word. Ctrl-C or
    SIGTERM (KeyboardInterrupt) ends it with one line too, the interrupt's own message or the default, status 130."""
    try:
        yield
    except (UserError, NonFiniteLoss) as e:
        raise SystemExit(f"error: {e}" if is_main_copy() else 1) from None
    except KeyboardInterrupt as e:
        if is_main_copy():
            print(str(e) or "interrupted; the output folder was left as it was before", file=sys.stderr)
        raise SystemExit(130) from None


def interrupt_on_sigterm():
    """A job scheduler's time limit sends SIGTERM: leave through the same clean-up as Ctrl-C."""
    signal.signal(signal.SIGTERM, _terminated)


def _terminated(signum, frame):
    raise KeyboardInterrupt("terminated; the output folder was left as it was before")


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
    one saying why. short_errors: the message alone, "error: ... (see --help)", instead of usage line + message.
    A flag must be spelled out: an abbreviation (--max_new_token) is an unknown flag, not silently another one."""

    def __init__(self, *args, short_errors=False, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)
        self.short_errors = short_errors

    def error(self, message):
        if not is_main_copy():
            self.exit(2)
        if self.short_errors:
            self.exit(2, f"error: {message} (see --help)\n")
        super().error(message)


# -------------------------------------------------------------------------------------------------- command line
# Number types for argparse: a bad value is refused with the flag's name before anything is read or written.

def _number(kind, low, low_ok, what, high=math.inf):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if kind is float and not math.isfinite(value) or value < low or (value == low and not low_ok) or value > high:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    parse.__name__ = what  # argparse names the type in its message
    return parse


MAX_SEED = 2 ** 32 - 1  # numpy's seeds (np.random.seed) end here
MAX_THREADS = 1024  # far above any machine's cores; OpenMP aborts the process on absurd counts

positive_int = _number(int, 1, True, "a positive integer")
nonnegative_int = _number(int, 0, True, "an integer >= 0")
positive_float = _number(float, 0.0, False, "a finite number > 0")
nonnegative_float = _number(float, 0.0, True, "a finite number >= 0")
seed_number = _number(int, 0, True, f"a seed from 0 to {MAX_SEED}", high=MAX_SEED)
thread_count = _number(int, 1, True, f"a number of threads from 1 to {MAX_THREADS}", high=MAX_THREADS)
DEVICES = re.compile(r"auto|cpu|mps|cuda(:[0-9]{1,3})?")  # what the scripts run on; torch also knows meta, xla, ...
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"


def device_name(text):
    """--device: "auto" (cuda when present, else cpu), cpu, cuda, cuda:N or mps."""
    if not DEVICES.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device these scripts run on ({DEVICE_HELP})")
    return text


def fraction(text):
    value = nonnegative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in [0, 1)")
    return value


def unused_flag(parser, args, used) -> str | None:
    """The first flag given a value other than its default whose setting is not among `used`, as "--name", or None:
    a mode refuses the flags it would otherwise silently ignore."""
    given = [k for k, v in vars(args).items() if k not in used and v != parser.get_default(k)]
    return f"--{given[0]}" if given else None


# -------------------------------------------------------------------------------------------------- run folders
# A run writes into a folder of its own, never into a model's or another run's; an evaluation of a saved run goes
# to a new eval-N/ beside the run's files, which it never replaces. One run at a time per folder: each holds an OS
# lock on FOLDER.lock, beside the folder, from before it looks at the folder until it ends. A run is built in
# FOLDER.partial and takes FOLDER's place when it is done; FOLDER.partial and FOLDER.old (the replaced run, for the
# instant between two renames) carry a marker file, so that a later run knows them for ours and puts right what a
# run killed on the way left, and never touches a folder of the same name that is not ours.

MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "tokenizer.json")
RUN_FILES = ("results.json", "run.json", "adapter.pt", "checkpoint.pt", "predictions.jsonl", "summary.json")
PARTIAL, OLD = ".unilora-partial", ".unilora-old"  # the markers of FOLDER.partial and FOLDER.old
LOCK_BYTE = 64  # Windows locks a byte range, which others cannot read: one past the pid


def check_output_dir(folder, *, overwrite=False, flag="--output_dir") -> Path:
    """Refuse `folder` as the place a run writes into if the run could destroy its contents: a model folder
    always (its config.json and weights are never replaced); a folder holding a run unless overwrite; a non-empty
    folder of anything else. Creates nothing."""
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
    return folder


def prepare_output_dir(folder, *, overwrite=False, flag="--output_dir") -> Path:
    """check_output_dir, then the folder is made."""
    folder = check_output_dir(folder, overwrite=overwrite, flag=flag)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def load_dirs(text):
    """--load: one run folder, or several comma-separated (a folder whose own name holds a comma: given alone)."""
    return [text] if "," not in text or Path(text).is_dir() else text.split(",")


def new_eval_dir(run_dir) -> Path:
    """A fresh folder beside the run's own files for an evaluation of a saved run: eval-1, eval-2, ..."""
    run_dir = Path(run_dir)
    n = 1
    while (run_dir / f"eval-{n}").exists():
        n += 1
    return run_dir / f"eval-{n}"


def eval_output_dir(output_dir, load, refusal: str) -> Path:
    """Where --eval_only --load writes: --output_dir, else a new eval-N/ in the run. Never the run itself, a folder
    holding it (--overwrite would replace the run) or one inside it (R/best: the run's own files): a UserError,
    `refusal` filled with {folder} and {default}."""
    if not output_dir:
        return new_eval_dir(load)
    folder, run = Path(output_dir), Path(load).resolve()
    if folder.resolve() in (run, *run.parents) or run in folder.resolve().parents:
        raise UserError(refusal.format(folder=folder, default=new_eval_dir(load)))
    return folder


def sibling(folder, suffix) -> Path:
    """FOLDER.partial, FOLDER.old, FOLDER.lock: names beside the folder, which survive its replacement."""
    folder = Path(folder)
    if not folder.name:
        raise UserError(f"--output_dir {folder}: a run needs a folder of its own, not the root of a file system")
    return folder.with_name(folder.name + suffix)


@contextlib.contextmanager
def held(folder, ranks, check=None, flag="--output_dir"):
    """The block runs with `folder` held by this run: the main copy holds its lock (folder_lock) and, before
    anything else, puts right what a run killed on the way left beside it (_tidy), then runs check() if given.
    Yields the folder's absolute path. However the block ends, the folders made for the lock go if empty."""
    folder = Path(folder).absolute()
    created = missing_dirs(folder) if ranks.main else []
    try:
        with contextlib.ExitStack() as lock:
            main_first(ranks, _hold, folder, lock, check, flag, share=True)
            yield folder
    finally:
        remove_if_empty(created)


def _hold(folder, lock, check, flag):
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {folder}: its parent folder cannot be made ({e.strerror})") from None
    lock.enter_context(folder_lock(folder, flag))
    _tidy(folder)
    if check:
        check()


@contextlib.contextmanager
def folder_lock(folder, flag="--output_dir"):
    """Hold FOLDER.lock for the block: an advisory lock of the OS (flock; msvcrt on Windows) on a file beside the
    folder, holding the holder's pid. A second run on the folder stops at once, naming that pid. The OS lets go of
    a lock when its process dies, however it dies: a dead run's lock file is simply taken over."""
    path = sibling(folder, ".lock")
    fd = _take_lock(path, folder, flag)
    try:
        yield
    finally:
        _drop_lock(fd, path)


def _take_lock(path, folder, flag):
    """Open and lock `path`, and write our pid into it; returns its descriptor. Held by another run: UserError."""
    while True:
        fd = None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            locked = _os_lock(fd)
        except OSError as e:  # a folder or a link of that name, a file system without locks
            if fd is not None:
                os.close(fd)
            raise UserError(f"{path} cannot be used as a lock file ({e.strerror}); move it away or pick another "
                            f"{flag}") from None
        if not locked:
            pid = _lock_text(fd).strip()
            os.close(fd)
            raise UserError(f"{flag} {folder} is in use by another run (pid {pid if pid.isdigit() else 'unknown'}); "
                            f"wait for it to end, or pick another {flag}")
        if _same_file(fd, path):
            break
        os.close(fd)  # its holder removed it between our open and our lock: lock the one there now
    if not re.fullmatch(r"[0-9]{0,20}\n?", _lock_text(fd)):
        os.close(fd)
        raise UserError(f"{path} is not a lock file of ours; move it away or pick another {flag}")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _os_lock(fd) -> bool:
    """Lock without waiting: False when another process holds the lock."""
    try:
        if os.name == "nt":
            import msvcrt
            os.lseek(fd, LOCK_BYTE, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK, errno.EDEADLK):
            return False
        raise
    return True


def _lock_text(fd) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 32).decode("latin-1")


def _same_file(fd, path) -> bool:
    try:
        there = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


def _drop_lock(fd, path):
    """The lock file goes with the lock. POSIX: removed while still locked, so that no one locks a file on its way
    out; Windows removes no open file, so there it is closed first and left to whoever opened it since."""
    if os.name != "nt":
        path.unlink(missing_ok=True)
        os.close(fd)
        return
    os.close(fd)
    with contextlib.suppress(OSError):
        path.unlink()


def _tidy(folder):
    """What a run killed on the way left beside `folder` (with the lock held, that run is dead): a marked
    FOLDER.old is the run that place() was replacing; it goes back in place when FOLDER is missing (killed between
    the two renames), else away (killed after them). A marked FOLDER.partial goes away; so do stray markers."""
    stage, old = sibling(folder, ".partial"), sibling(folder, ".old")
    if _marked(old, OLD):
        if folder.exists():
            shutil.rmtree(old)
        else:
            (old / OLD).unlink()
            os.replace(old, folder)
            print(f"note: put {folder} back from {old}, where a run killed while replacing it had left it")
    if _marked(stage, PARTIAL):
        shutil.rmtree(stage)
        print(f"note: removed {stage}, left by a run that was killed")
    for marker in (folder / PARTIAL, folder / OLD):
        if marker.is_file():
            marker.unlink()


def _marked(folder, marker) -> bool:
    """Whether `folder` is one of ours: a folder (not a link to one) holding our marker."""
    return folder.is_dir() and not folder.is_symlink() and (folder / marker).is_file()


def _begin_stage(folder, stage, overwrite):
    """Check the output folder and make an empty, marked stage beside it."""
    check_output_dir(folder, overwrite=overwrite)
    if folder.is_symlink():  # replacing it would replace the link, and leave the run it points to
        raise UserError(f"--output_dir {folder} is a symbolic link; pass the folder it points to, {folder.resolve()}")
    old = sibling(folder, ".old")
    if folder.exists() and (old.exists() or old.is_symlink()):  # place() moves the replaced run there
        raise UserError(f"{old} is in the way (the replaced run moves there for a moment); move it away")
    if stage.exists() or stage.is_symlink():
        _clear_unmarked_stage(stage, overwrite)
    stage.mkdir()
    (stage / PARTIAL).touch()


def _clear_unmarked_stage(stage, overwrite):
    """A FOLDER.partial without our marker: empty (a run killed before it marked it), it goes; holding a run's files
    (an earlier version's leftover), it goes with --overwrite; anything else is not ours and is never removed."""
    present = set(os.listdir(stage)) if stage.is_dir() and not stage.is_symlink() else None
    if present == set():
        stage.rmdir()
    elif present and present & set(RUN_FILES) and overwrite:
        shutil.rmtree(stage)
    elif present and present & set(RUN_FILES):
        raise UserError(f"{stage} holds a run's files but no marker of an unfinished run; pass --overwrite to "
                        f"remove it, or move it away")
    else:
        raise UserError(f"{stage} exists and is not ours; move it away or pick another --output_dir")


@contextlib.contextmanager
def staged(folder, overwrite, ranks, check=None):
    """Yield folder.partial to write into; it replaces `folder` when the block succeeds (or earlier, by place()),
    and vanishes if not, with the folders made for it: a run appears only when complete, and a failure removes
    exactly what it created. The folder is held (held(); check() runs there first) for the whole block. Only the
    main copy touches the disk; the others get the same path and never write to it."""
    folder = Path(folder).absolute()
    stage = sibling(folder, ".partial")

    def begin():
        if check:
            check()
        _begin_stage(folder, stage, overwrite)
    with held(folder, ranks, begin):
        if not ranks.main:
            yield stage
            return
        try:
            yield stage
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        place(stage)


def place(stage) -> Path:
    """Move a stage into its folder's place now (train_math: at a run's first checkpoint, so that a run killed later
    can be resumed); staged() then leaves it there however its block ends. Returns the folder; a stage placed
    already, or a folder, is left as it is. The run it replaces waits in FOLDER.old, marked, for the time of the
    two renames: a process killed between them leaves FOLDER.old, which the next run on the folder puts back."""
    stage = Path(stage)
    folder = stage.with_name(stage.name.removesuffix(".partial"))
    if folder == stage or not _marked(stage, PARTIAL):
        return folder
    old = sibling(folder, ".old")
    if folder.exists():
        (folder / OLD).touch()
        os.replace(folder, old)
    os.replace(stage, folder)
    (folder / PARTIAL).unlink()
    shutil.rmtree(old, ignore_errors=True)
    return folder


# -------------------------------------------------------------------------------------------------- saved runs
# What a run.json or results.json holds is checked before anything uses it: a damaged file, or another script's,
# is one line that names the file and the value, never a traceback halfway through. A check: value -> bool.

def whole(low=1, null=False, high=math.inf):
    """An integer from low to high (a bool is not one), or (null) None / missing."""
    return lambda v: null and v is None or type(v) is int and low <= v <= high


def number(low=-math.inf, null=False):
    """A finite number >= low (a bool is not one), or (null) None / missing."""
    return lambda v: null and v is None or (type(v) is int or type(v) is float and math.isfinite(v)) and v >= low


def real(null=False):
    """A finite number > 0, or (null) None / missing."""
    return lambda v: number(null=null)(v) and (v is None or v > 0)


def text(null=False):
    return lambda v: null and v is None or type(v) is str


def choice(options, null=False):
    """One of `options`, of the same type (True is not 1), or (null) None / missing."""
    return lambda v: null and v is None or any(type(v) is type(o) and v == o for o in options)


def record(fields):
    """A JSON object whose entries pass `fields` (name -> check)."""
    def check(v):
        return isinstance(v, dict) and bad_field(v, fields) is None
    check.fields = fields  # for bad_field, to name the entry inside that fails
    return check


def bad_field(settings: dict, fields: dict) -> str | None:
    """The first entry of `settings` that fails its check in `fields` (name -> check; a missing one is None), in
    words ("has no 'task'", "has an invalid 'best': 5", "has in 'config' an invalid 'method': None"), or None when
    every one passes."""
    for name, ok in fields.items():
        value = settings.get(name)
        if ok(value):
            continue
        if name not in settings:
            return f"has no {name!r}"
        if hasattr(ok, "fields") and isinstance(value, dict):
            return f"has in {name!r}{bad_field(value, ok.fields).removeprefix('has')}"
        return f"has an invalid {name!r}: {repr(value)[:60]}"
    return None


def read_saved_run(folder, fields: dict, hint: str, older: str | None = None) -> dict:
    """The settings a saved run recorded (--eval_only --load): its run.json; runs written before run.json existed,
    the `older` entry of their results.json. Each of `fields` (name -> check) is checked. A folder without them, or
    with a value that fails, is a UserError: "--load FOLDER: " + what is wrong + "; " + hint."""
    folder = Path(folder)
    path = folder / "run.json"
    if older and not path.is_file() and (folder / "results.json").is_file():
        path = folder / "results.json"
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"--load {folder}: {path} is not readable ({e.__class__.__name__}); {hint}") from None
    if path.name == "results.json":
        settings = settings.get(older) if isinstance(settings, dict) else None
    problem = bad_field(settings, fields) if isinstance(settings, dict) else "holds no settings (a JSON object)"
    if problem:
        raise UserError(f"--load {folder}: {path} {problem}; {hint}")
    return settings


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
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA, one GPU per copy). device: cpu,
    cuda, cuda:N, mps, or "auto"/None: cuda when present, else cpu. Any other name (meta), or a device this machine
    lacks: UserError."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not DEVICES.fullmatch(device):
        raise UserError(f"--device {device}: not a device these scripts run on; use {DEVICE_HELP}")
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this machine has no CUDA device; use --device cpu")
    if kind == "cuda" and ":" in device and int(device[5:]) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: this machine has no MPS device; use --device cpu")
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
