"""Fine-tuning a causal LM's adapter: the one training procedure of train_math.py and train_instruct.py, which differ
in their data, prompts and evaluation only.

What it holds, in the order a run meets it: the settings every such script completes the same way (the method and
its P, the recipe's values, --eval_only taking a saved run's settings, the checks that flags agree); where a run
happens (the copies, device, precision, the run folder); the base model; the adapter; and the loop itself: AdamW on
the adapter alone, linear warmup then a linear or cosine decay, micro-batches with the prompt masked from the loss,
a checkpoint every --save_every steps, exact resume, and torchrun data parallelism (recipes/training.py).

Why it exists: the loop is where a subtle difference (a token left in the loss, a resumed run that sees other
batches) would make two experiments incomparable, so both scripts run the same lines.
"""
import argparse
import contextlib
import functools
import json
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pretrained.decoder import CausalLM
from pretrained.files import finite_or_none, write_json
from pretrained.hub import resolve
from pretrained.tokenizer import Tokenizer, pad
from projections import PROJECTIONS
from recipes.adapters import AdapterSettings, build_adapter
from recipes.checkpoint import TrainingState, batch_order, check_run_dir, read_checkpoint, resume, save_checkpoint
from recipes.generation import answer_loglik, at_least_fp32
from recipes.training import (NonFiniteLoss, Ranks, UserError, autocast, copy_from_main, eval_output_dir,
                              fraction, held, my_share, nonnegative_float, optimizer_step, place, positive_float,
                              positive_int, read_saved_run, seed_number, staged, start_data_parallel, thread_count,
                              unused_flag, warmup_then_decay)

PRECISION = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "float64": torch.float64}  # float64: for exact comparisons (tests), not for training
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Script:
    """What differs between the scripts that share this loop, besides their data and evaluation."""
    name: str            # "train_math.py": in messages and in the command that resumes a run
    folder: str          # the default run folder is out/<folder>-<method>
    resume_keys: tuple   # the settings a checkpoint must share with the run that continues it (+ n_train)
    decay: str           # the learning rate after warmup: "cosine" or "linear" (recipes/training.py)
    data_seed: str       # the setting whose value seeds the data order: "seed" or "data_seed"


# ----------------------------------------------------------------------------------------------------------
# Settings: the flags both scripts share, and how a parsed command line is completed and checked.

def add_training_flags(p, lr_help, seed_help, dropout=0.0, grad_clip=1.0):
    """The optimisation flags: the schedule's length, the batch, AdamW, the adapter, the seed."""
    p.add_argument("--epochs", type=positive_int, help="passes over the training data (recipe)")
    p.add_argument("--max_steps", type=positive_int, help="optimizer steps; overrides --epochs")
    p.add_argument("--stop_after", type=positive_int, help="exit after this many steps with a checkpoint")
    p.add_argument("--batch_size", type=positive_int, help="global batch size, whatever the number of copies (recipe)")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--micro_batch_size", type=positive_int, help="examples per forward of one copy (recipe)")
    split.add_argument("--grad_accum", type=positive_int, help="or: micro-batches per step (batch_size / grad_accum)")
    p.add_argument("--lr", type=positive_float, help=lr_help)
    p.add_argument("--warmup_ratio", type=fraction, help="fraction of steps of linear warmup (recipe)")
    p.add_argument("--weight_decay", type=nonnegative_float, default=0.0)
    p.add_argument("--grad_clip", type=nonnegative_float, default=grad_clip, help="max gradient norm; 0 = off")
    p.add_argument("--d", type=positive_int, help="Uni-LoRA: length of theta_d (recipe)")
    p.add_argument("--r", type=positive_int, help="LoRA rank of both methods (recipe: 4)")
    p.add_argument("--lora_alpha", type=positive_float, help="LoRA baseline scale alpha/r (default alpha = r)")
    p.add_argument("--signs", action=argparse.BooleanOptionalAction,
                   help="Uni-LoRA: random +-1 per row of P (ours), or the paper's all-positive P (default;\n"
                        "fastfood and gaussian P's have signs by construction: on for them)")
    p.add_argument("--projection", choices=list(PROJECTIONS),
                   help="Uni-LoRA: which P (projections.py; default balanced, the paper's; others are ablations)")
    p.add_argument("--dropout", type=fraction, default=dropout, help="adapter dropout on the layer input")
    p.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction,
                   help="recompute each layer's activations in the backward instead of keeping them: less memory,\n"
                        "about one more forward of compute (recipe)")
    p.add_argument("--group_by_length", action=argparse.BooleanOptionalAction,
                   help="batches of similar lengths: the shuffled order cut into megabatches of up to 50 batches,\n"
                        "each sorted longest first (transformers' group_by_length; recipe)")
    p.add_argument("--seed", type=seed_number, help=seed_help)


def add_precision_flags(p, dtype_help, amp_help):
    p.add_argument("--dtype", choices=("auto", *PRECISION), help=dtype_help)
    p.add_argument("--amp", choices=("auto", *AMP), help=amp_help)


def add_run_flags(p):
    """The flags of a run folder's life: replace it, checkpoint it, continue it, evaluate it again."""
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --output_dir")
    p.add_argument("--save_every", type=positive_int, help="checkpoint every N steps (recipe)")
    p.add_argument("--resume", action="store_true", help="continue from <output_dir>/checkpoint.pt")
    p.add_argument("--eval_only", action="store_true", help="evaluate the run saved in --load")


def add_machine_flags(p):
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--threads", type=thread_count, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--hf_token", help="for gated models and hub data (default: $HF_TOKEN); sent to the hub only")


def count_or_all(text):
    return "all" if text == "all" else positive_int(text)


@dataclass
class SavedRun:
    """What --eval_only --load takes from a run folder of one script."""
    fields: dict    # run.json's entries that are read, each with its check (recipes/training.py)
    taken: tuple    # the run's settings (its model, method, prompt): a flag that contradicts one is an error
    carried: tuple  # taken unless the command line gives them (the test set, how it is decoded)
    hint: str       # what a run folder of this script is, for the error messages
    older: dict = field(default_factory=dict)  # the values of runs written before a setting existed


def settle_eval_only(parser, args, used, saved: SavedRun):
    """--eval_only --load DIR: refuse the flags it would ignore (not in `used`), then take the run's settings."""
    if args.eval_only and (flag := unused_flag(parser, args, used)):
        raise UserError(f"--eval_only evaluates the run in --load as it was trained, so {flag} does not apply; "
                        f"drop it")
    if args.load and not args.eval_only:
        raise UserError("--load is for --eval_only; to continue training a run use --resume --output_dir <run>")
    if args.eval_only:
        if not args.load:
            raise UserError("--eval_only needs --load <run folder>; to evaluate the base model use --method none")
        take_run_settings(args, saved)


def take_run_settings(args, saved: SavedRun):
    """The model, method and prompt come from the run, and by default its test set and how it was decoded; a flag
    that contradicts the run is an error rather than a silently different evaluation."""
    explicit = {k for k in saved.taken if getattr(args, k, None) is not None}
    run_dir = Path(args.load)
    config = read_saved_run(run_dir, saved.fields, saved.hint, older="args" if saved.older else None)
    if not (run_dir / "adapter.pt").is_file() and config.get("method") != "none":
        raise UserError(f"--load {run_dir}: {saved.hint}")
    for key in saved.taken:
        value = config.get(key, saved.older.get(key))
        if value is None:
            continue
        if key in explicit and getattr(args, key) != value:
            raise UserError(f"--{key} {getattr(args, key)} contradicts the run in --load ({key} {value!r}); drop "
                            f"--{key}")
        setattr(args, key, value)
    for key in saved.carried:
        if getattr(args, key) is None and key in config:
            setattr(args, key, "all" if key == "max_eval_samples" and config[key] is None else config[key])


def complete(args, recipe: dict, default_lr: dict, per_method=None):
    """The method (unilora unless given) and its P, then every flag left unset from the recipe (and per_method's
    values for the method), "all" as None, the paper's all-positive P, the method's learning rate."""
    args.method = args.method or "unilora"
    if args.projection and args.method != "unilora":
        raise UserError(f"--projection is Uni-LoRA's choice of P; --method {args.method} has none: drop it")
    if args.method == "unilora":
        args.projection = args.projection or "balanced"  # runs saved before --projection: balanced
    for key, value in (recipe | (per_method or {}).get(args.method, {})).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("max_train_samples", "max_eval_samples"):
        setattr(args, key, None if getattr(args, key) == "all" else getattr(args, key))
    for key in ("gradient_checkpointing", "group_by_length"):  # off unless the recipe or the command line says
        setattr(args, key, bool(getattr(args, key)))
    if args.signs is None:  # the paper's P; the dense ablations' P's are signed by construction
        args.signs = args.projection in ("fastfood", "gaussian")
    if args.lr is None and args.method != "none":
        args.lr = default_lr[args.method]
    args.train = not args.eval_only and args.method != "none"


def check_run_flags(args):
    """The flags of a run and of its batch agree; --micro_batch_size is set from --grad_accum."""
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --output_dir and --overwrite would replace it; drop one")
    if args.resume and not args.train:
        raise UserError("--resume continues training; to evaluate a finished run use --eval_only --load <run>")
    if args.method == "none" and args.no_eval:
        raise UserError("--method none only evaluates; drop --no_eval")
    if args.grad_accum:
        if args.batch_size % args.grad_accum:
            raise UserError(f"--batch_size {args.batch_size} is not a multiple of --grad_accum {args.grad_accum}")
        args.micro_batch_size = args.batch_size // args.grad_accum
    if args.micro_batch_size > args.batch_size or args.batch_size % args.micro_batch_size:
        raise UserError(f"--batch_size {args.batch_size} must be a multiple of --micro_batch_size "
                        f"{args.micro_batch_size}")
    copies = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's --nproc_per_node (times nodes)
    if args.train and args.batch_size < copies:
        raise UserError(f"--batch_size {args.batch_size} is the global batch, split across {copies} copies: each "
                        f"needs one example per step; raise --batch_size to at least {copies}")


def check_signs(args):
    if args.train and args.projection in ("fastfood", "gaussian") and not args.signs:
        raise UserError(f"--projection {args.projection} has random signs by construction and the all-positive P "
                        f"(--no-signs, the paper recipe's default) does not apply; pass --signs")


# ----------------------------------------------------------------------------------------------------------
# Where the run happens: the copies and their devices, the precision, the folder.

@dataclass
class Run:
    """Where the steps of a run happen, decided once: the settings, the copies, device and precision, the folder."""
    args: argparse.Namespace
    ranks: Ranks
    device: torch.device
    autocast: Callable  # () -> a fresh autocast context (a null one in fp32)
    scaler: torch.amp.GradScaler  # fp16 gradients underflow without loss scaling; bf16 has fp32's range
    argv: list  # the command line, for the command that resumes the run
    script: Script
    folder: Path | None = None  # where it writes: FOLDER.partial until the run takes FOLDER's place
    saved: int | None = None  # the step of the run's checkpoint in FOLDER, once there is one
    destination: Path | None = None  # FOLDER: where the run's files are once it ends

    def final(self, name) -> Path:
        """Where the file `name` of the run folder is once the run ends (self.folder may be FOLDER.partial)."""
        return (self.destination or self.folder) / name

    def save(self, name, content):
        """A JSON file in the run folder, written by the main copy."""
        if self.ranks.main:
            write_json(self.folder / name, content)


def set_up(args, argv, script: Script):
    """Device, resolved --dtype/--amp, the autocast context, the gradient scaler (fp16 only) and the copies (ranks)
    when torchrun started several: each copy then uses its own GPU (cuda:LOCAL_RANK)."""
    ranks = start_data_parallel(args.device)
    device = torch.device(ranks.device)
    if args.dtype == "auto":
        args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    if args.amp == "auto":
        args.amp = {"float32": "bf16" if device.type == "cuda" else "none", "bfloat16": "bf16",
                    "float16": "fp16", "float64": "none"}[args.dtype]
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    return Run(args, ranks, device, functools.partial(autocast, device, AMP[args.amp]), scaler, argv, script)


@contextlib.contextmanager
def run_folder(run):
    """The folder this invocation writes into, held by it alone from first look to end (recipes/training.py).
    --resume continues the run there. Anything else is built in FOLDER.partial, which takes FOLDER's place at the
    run's first checkpoint (from then on a killed run can be resumed) or when it ends: a failure before leaves
    nothing behind, and the run that --overwrite was to replace as it was. Never the run --eval_only evaluates."""
    args = run.args
    if args.eval_only:
        folder = eval_output_dir(args.output_dir, args.load, "--output_dir {folder} is the run being evaluated, or "
                                 "holds it, or lies inside it; its files are never replaced; leave --output_dir out "
                                 "(results go to {default})")
    else:
        folder = Path(args.output_dir or f"out/{run.script.folder}-{args.method}")
    run.destination = Path(folder).absolute()
    check = functools.partial(check_run_dir, folder, args.resume, args.overwrite)  # under the folder's lock
    if args.resume:
        with held(folder, run.ranks, check) as folder:
            yield folder
    else:
        with staged(folder, args.overwrite, run.ranks, check) as stage:
            yield stage


# ----------------------------------------------------------------------------------------------------------
# The base model, frozen, and the adapter on it.

def load_base(args, device, quantize=None):
    """(model folder, tokenizer, frozen model) of --model; quantize "nf4": QLoRA's 4-bit NormalFloat blocks
    (pretrained/nf4.py), the rest in --dtype."""
    try:
        model_dir = resolve(args.model, token=args.hf_token)
        tok = Tokenizer.from_pretrained(model_dir)
        model = CausalLM.from_pretrained(model_dir, dtype=PRECISION[args.dtype], quantize=quantize).to(device)
    except (OSError, ValueError) as e:  # not found, gated, offline, unsupported architecture
        raise UserError(f"--model {args.model}: {e}") from e
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model_dir, tok, model


def make_adapter(args, model):
    """Uni-LoRA or LoRA on every linear layer but lm_head; for --eval_only, the one saved in --load."""
    saved = Path(args.load) / "adapter.pt" if args.eval_only else None
    settings = AdapterSettings(args.method, d=args.d, r=args.r, alpha=args.lora_alpha, signs=args.signs,
                               projection=args.projection, seed=args.seed, dropout=args.dropout)
    try:
        return build_adapter(model, settings, saved=saved and str(saved))
    except (ValueError, OSError, EOFError, RuntimeError, pickle.UnpicklingError) as e:  # d > D; a bad adapter file
        raise UserError(f"--load {args.load}: {e}" if saved else
                        f"--d {args.d} / --projection {args.projection}: {' '.join(str(e).split())}") from e


def resume_config(run, train):
    """The settings a checkpoint must share with the run that continues it."""
    return {k: getattr(run.args, k) for k in run.script.resume_keys if k != "n_train"} | {"n_train": len(train)}


def read_run_checkpoint(run, train):
    """The checkpoint --resume continues (None without --resume), refused if made with other settings."""
    if not run.args.resume:
        return None
    return read_checkpoint(run.folder / "checkpoint.pt", resume_config(run, train), run.script.name)


def score_before(run, model, items, ckpt):
    """The untouched base model's mean answer log-likelihood on `items`, before training (None when the run does not
    train or has nothing to score); a resumed run kept the number in its checkpoint."""
    before = ckpt.get("before") if ckpt else None
    if items and run.args.train and before is None:
        before = {"loglik": answer_loglik(model, items, run.args.pad_id, run.args.micro_batch_size, run.autocast,
                                          run.ranks)}
        print(f"before training: mean answer log-likelihood {before['loglik']:.4f}")
    return before


# ----------------------------------------------------------------------------------------------------------
# Training: the adapter made and trained, with what results.json records of it.

def adapt_and_train(run, model, train, ckpt, items, results):
    """The base model's score on `items` (score_before), the adapter (recorded in results), run.json, then training
    unless the run only evaluates. Returns the score, the adapter and whether the run ends here: stopped by
    --stop_after, or trained with --no_eval (results.json is then written). A diverged run writes results.json with
    status "diverged" and raises NonFiniteLoss."""
    args = run.args
    before = score_before(run, model, items, ckpt)
    adapter = make_adapter(args, model)
    if adapter is not None:
        results["params"] = adapter.counts()
        print(f"{args.method}: {results['params']}")
    if args.train and not args.resume:  # once the adapter exists: a refused --d or --projection leaves no run.json
        run.save("run.json", results["args"])
    if not args.train:
        return before, adapter, False
    try:
        results["train"] = train_adapter(run, model, adapter, train, ckpt, before)
    except NonFiniteLoss as e:
        run.save("results.json", results | dict(status="diverged", error=str(e)))
        raise
    stopped = results["train"]["steps_done"] < results["train"]["steps"]
    if stopped or args.no_eval:
        results["status"] = "stopped" if stopped else "trained"
        run.save("results.json", results)
        print("stopped as asked; continue with --resume" if stopped else "trained; --no_eval: no evaluation")
        return before, adapter, True
    return before, adapter, False


def train_adapter(run, model, adapter, train, ckpt, before):
    """AdamW on the adapter with warmup + decay; atomic checkpoints; exact resume.  Returns the summary.  A
    non-finite loss raises NonFiniteLoss before anything of that step is saved.

    Several copies (torchrun): each takes my_share of every global batch and divides its loss by the whole
    batch's answer tokens; one sum_gradients after the last micro-batch gives every copy the one-process
    gradient, so clipping, the fp16 scaler's overflow check and AdamW run identically everywhere.  The main copy
    alone writes; the checkpoint is the same whatever the number of copies."""
    args, ranks = run.args, run.ranks
    data_seed = getattr(args, run.script.data_seed)
    # the schedule: optimiser steps per epoch, in all
    steps_per_epoch = len(train) // args.batch_size
    if steps_per_epoch == 0 and args.max_steps is None:
        raise UserError(f"{len(train)} examples do not fill one batch of {args.batch_size}; lower --batch_size or "
                        f"use more data")
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    steps_per_epoch = max(1, steps_per_epoch)
    # the optimiser, on the adapter's parameters alone, and all that a checkpoint saves of it
    params = list(adapter.parameters())
    copy_from_main(params, ranks)
    opt = torch.optim.AdamW([{"params": params, "weight_decay": args.weight_decay}], lr=args.lr)
    sched, warmup_steps = warmup_then_decay(opt, total_steps, args.warmup_ratio, run.script.decay)
    order = f"numpy default_rng([{data_seed}, epoch]).permutation({len(train)})"
    lengths = [t[3] if len(t) > 3 else len(t[0]) for t in train] if args.group_by_length else None
    state = TrainingState(params, opt, sched, run.scaler, run.device, total_steps, resume_config(run, train),
                          before, data_order=order + (", grouped by length" if lengths else ""))
    # resume, then the data order from there
    step = 0
    if ckpt:
        step = run.saved = resume(state, ckpt, run.folder, ranks.main)
        print(f"resumed {run.folder / 'checkpoint.pt'} at step {step}/{total_steps}")
    batch_indices = batch_order(data_seed, len(train), args.batch_size, steps_per_epoch, lengths)
    # the loop: forward and backward, the optimiser step, the log, a checkpoint every --save_every steps
    end_step = min(total_steps, args.stop_after) if args.stop_after else total_steps
    print(f"training {total_steps} steps ({total_steps / steps_per_epoch:.2f} epochs) of batch {args.batch_size} "
          f"(micro {args.micro_batch_size}), lr {args.lr}, warmup {warmup_steps}"
          + (f"; stopping after step {end_step}" if end_step < total_steps else ""))
    model.train()
    model.gradient_checkpointing = args.gradient_checkpointing
    t0 = time.time()
    with tqdm(range(step, end_step), initial=step, total=total_steps, desc=f"train {args.method}",
              dynamic_ncols=True, disable=not ranks.main) as bar:  # closed on errors too: messages on a clean line
        for s in bar:
            loss = backward(run, model, train, batch_indices(s))
            loss, grad_norm, lr_now, skipped = optimizer_step(opt, sched, loss, s + 1, ranks, grad_clip=args.grad_clip,
                                                              scaler=run.scaler, hint=f"lower --lr, now {args.lr}")
            if not bool(torch.stack([torch.isfinite(x).all() for x in params]).all()):  # one sync, not one per tensor
                raise NonFiniteLoss(f"the adapter became non-finite at step {s + 1}: training diverged and was "
                                    f"stopped; nothing of this step was saved. Lower --lr (now {args.lr}).")
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr_now:.2e}")
            if not ranks.main:
                continue
            with open(run.folder / "train_log.jsonl", "a") as log:  # opened anew: the folder moves (place)
                log.write(json.dumps(dict(step=s + 1, loss=loss, lr=lr_now, grad_norm=finite_or_none(grad_norm),
                                          skipped=skipped, seconds=round(time.time() - t0, 1))) + "\n")
            if (s + 1) % args.save_every == 0 or s + 1 == end_step:
                adapter.save(str(run.folder / "adapter.pt"), overwrite=True)
                save_checkpoint(run.folder / "checkpoint.pt", state, s + 1)
                run.folder, run.saved = place(run.folder), s + 1  # a run to resume from its first checkpoint on
    # the summary
    if end_step == step:
        print(f"checkpoint already at step {step}; nothing left to train")
    if not ranks.main:  # the main copy reports
        return dict(steps=total_steps, steps_done=end_step)
    logged = [json.loads(x) for x in (run.folder / "train_log.jsonl").read_text().splitlines()]
    return dict(data=str(args.train_data), examples=len(train), steps=total_steps, steps_done=end_step,
                batch_size=args.batch_size, lr=args.lr, first_loss=logged[0]["loss"], last_loss=logged[-1]["loss"],
                skipped_steps=sum(x.get("skipped", False) for x in logged), seconds=round(time.time() - t0, 1))


LOSSES = {
    "example": "each example's mean over its answer tokens, averaged over the batch",
    "tokens": "the mean over all answer tokens of the batch",
    "micro": "each micro-batch's mean over its answer tokens, averaged over the batch's micro-batches",
}


def backward(run, model, train, idx):
    """Forward and backward over this copy's share of the batch `idx`, in micro-batches (the prompt is masked).
    --loss example: each example's mean over its answer tokens, divided by the whole batch's size, as the official
    math run (one example per forward, 64 accumulated); --loss tokens: each token's loss divided by the whole batch's
    answer tokens; --loss micro: each micro-batch's token mean divided by the number of micro-batches of the whole
    batch (all copies), as transformers' Trainer with gradient accumulation (the official instruction-tuning run:
    4 per forward, 4 accumulated). Returns the sum of this copy's losses."""
    args = run.args
    n_targets = sum(train[i][2] for i in idx)  # the whole batch's answer tokens
    n_micro = sum(-(-len(idx[r::run.ranks.world]) // args.micro_batch_size) for r in range(run.ranks.world))
    mine = my_share(list(idx), run.ranks)
    loss = 0.0
    for j in range(0, len(mine), args.micro_batch_size):
        micro = [train[i] for i in mine[j:j + args.micro_batch_size]]
        ids, mask = pad([m[0] for m in micro], args.pad_id), pad([[1] * len(m[0]) for m in micro], 0)
        lab = pad([m[1] for m in micro], -100)
        with run.autocast():
            logits = model(ids.to(run.device), attention_mask=mask.to(run.device))
        target = lab[:, 1:].to(run.device)
        keep = target != -100  # only response positions: fp32 logits of a 256k vocabulary are large
        token_losses = F.cross_entropy(at_least_fp32(logits[:, :-1][keep]), target[keep], reduction="none")
        if args.loss == "example":  # weight 1 / (its example's answer tokens x the batch's examples)
            per_example = keep.sum(1, keepdim=True).expand_as(keep)[keep]
            part = (token_losses / per_example).sum() / len(idx)
        elif args.loss == "micro":
            part = token_losses.sum() / keep.sum() / n_micro
        else:
            part = token_losses.sum() / n_targets
        run.scaler.scale(part).backward()
        loss += part.item()
    return loss
