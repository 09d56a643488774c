"""
Fine-tune a BERT/RoBERTa encoder on one GLUE task with Uni-LoRA, over several seeds, and print Table 1.

Why this file exists: it is the paper's GLUE experiment as one readable script. By default it runs the recipe
of the official scripts; it is also the harness for fair baselines: --method lora (plain LoRA) and --method
head (the classification head alone) share the data, head, optimiser, schedule and evaluation code.

    python train_glue.py --task sst2                              # one run of the recipe (seed 1)
    python train_glue.py --task sst2 --seeds 1,2,3,4,5            # five seeds + summary.json (mean/std/median)
    python train_glue.py --task mrpc --method lora                # LoRA baseline, same everything else
    python train_glue.py --task cola --signs                      # our variant: random signs in P
    python train_glue.py --eval_only --load runs/glue-sst2-unilora      # score a saved run again (-> eval-N/)
    python train_glue.py --eval_only --load runs/a,runs/b,runs/c  # several Uni-LoRA runs, one base, mixed batches
    python train_glue.py --table runs/                            # Table 1 from any run folders (best epoch)
    python train_glue.py --table runs/ --report last              # ... of each run's last epoch instead
    torchrun --standalone --nproc_per_node 8 -- train_glue.py --task sst2   # one run on 8 GPUs (README)

Where each default comes from:
  official scripts - RoBERTa-base, query and value, r = 4, d = 23,040, an all-positive P (no signs, as in the
                     paper and PEFT); AdamW, theta_d lr 5e-3 with no weight decay, per-task head lr and epochs
                     (RECIPES below; base MRPC: 60 epochs in the single-task script, 30 in the multi-seed script
                     that ran seeds 1-5, which we follow; RoBERTa-large: its own lrs and epochs, max length 128
                     instead of 512); head weight decay 0.1 on the head's non-bias, non-LayerNorm weights (the
                     scripts pass --weight_decay 0.1 to the Hugging Face trainer, which applies it so); linear
                     schedule, 6% warmup, batch 32, gradient clipping at norm 1.0 (that trainer's default), fp32,
                     seed 1, dev evaluation every epoch. The training scripts end on the last epoch (no best
                     checkpoint); the repository's get_results.py takes each run's best evaluation. So every run
                     records both, and --report best (default) or --report last picks the one that the seeds'
                     summary and --table report.
  the paper's text - a result is the mean over 5 seeds (--seeds 1,2,3,4,5, the seeds of the official multi-seed
                     scripts; the summary adds std and median), of which epoch it does not say; the reported
                     parameter count is d (the head is not counted).
  this project     - MNLI and QQP recipes (not in the paper) copy QNLI's. LoRA baseline lr 4e-4 (the LoRA paper's
                     RoBERTa-base lr). Preset (base/large) read from config.json (24 layers or hidden 1024 ->
                     large), never from the model's name. An option, off by default: random signs in P (--signs),
                     ours and untested in the literature (P stays an exact isometry and the bias that ties every
                     LoRA entry to its group's mean direction is gone); our ablation (docs/ablations.md, MiniLM-L6,
                     d = D/8, 3 seeds) shows no difference: 75.7 with signs, 75.6 without. (The fastfood and
                     gaussian P's of the ablations are signed by construction: on for them.)

Data. Tasks: sst2 cola mrpc qnli rte stsb mnli qqp, as the official GLUE TSVs: --data_dir is ONE task folder
(SST-2/, CoLA/, ... holding train.tsv and dev.tsv; MNLI: dev_matched.tsv and dev_mismatched.tsv). Without it
the task is downloaded once from GLUE's mirror (dl.fbaipublicfiles.com) into --cache_dir (default
$UNILORA_CACHE/glue, else ~/.cache/unilora/glue); exactly GLUE's files are taken, and the dev sets must have
GLUE's row counts (DEV_ROWS), or the cached folder is refused with the command to rebuild it. MRPC is rebuilt the
way GLUE's script did: SentEval's copy of the MSR corpus split by GLUE's dev ids. Files are UTF-8 (a BOM is
fine); every header line is checked; a bad line stops the run with its file and line.

Model. --model is a hub id or a local folder (config.json, weights, tokenizer.json). RoBERTa-family models get
RoBERTa's head (first token -> dense -> tanh -> out_proj), BERT-family models BERT's (frozen pooler ->
classifier); the head is initialised as the reference models do and trained fully with its own lr.

Outputs, in --output_dir (default runs/glue-<task>-<method>): run.json (every resolved setting), results.json
(settings, dev metrics per epoch, best and last epoch, trainable counts, median seconds per optimiser step,
peak memory), adapter.pt, head.safetensors (both of the last epoch), and best/ (run.json, adapter, head of the best
epoch). With --seeds, one such run per seed in DIR/seed-N and DIR/summary.json: the seeds' statistics of the best
and of the last epoch (keys "best" and "last"), and the --report one also under each metric's name. A run is built
in DIR.partial and moved into place only when it finished: a failed or diverged run leaves nothing behind and the
previous run as it was. One run at a time per folder: a second run on DIR stops at once (the lock DIR.lock).

Many GPUs. Under torchrun every copy (rank) takes its share of each global batch of --batch_size examples (the
same seeded order everywhere), divides its loss by the whole batch's size, and one all-reduce per optimiser step
sums the trainable gradients (theta_d or LoRA's A/B, and the head): the update of one process on the whole batch.
Dev sets are scored in shares and gathered back in order. Rank 0 alone writes files, prints and shows progress.
With dropout, each copy draws its own masks, so a run matches one process in distribution, not bit for bit.
"""

import argparse
import contextlib
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from pretrained.encoder import Encoder, encoder_settings
from pretrained.files import load_config, load_safetensors, save_safetensors, write_json
from pretrained.hub import resolve
from pretrained.tokenizer import Tokenizer
from projections import PROJECTIONS
from recipes.adapters import AdapterSettings, build_adapter
from recipes.costs import peak_memory_mb, projection_cost
from recipes.glue_data import TASKS, load_data, reported, split_suffix
from recipes.glue_metrics import METRICS
from recipes.glue_model import GlueModel, batches, loss_sum
from recipes.glue_table import REPORTS, make_table, summarize
from recipes.training import (MAX_SEED, Parser, Ranks, UserError, autocast, check_finite, choice, copy_from_main,
                              data_parallel_until_done, device_name, errors_as_exit, eval_output_dir, fraction,
                              gather_shares, interrupt_on_sigterm, load_dirs, main_first, my_share, new_eval_dir,
                              nonnegative_float, optimizer_step, positive_float, positive_int, printing_on_main_copy,
                              read_saved_run, real, seed_number, staged, start_data_parallel, text, thread_count,
                              unused_flag, warmup_then_decay, whole)
from taskbank import TaskBank

# -----------------------------------------------------------------------------
# Settings: the recipe per task and model size, the defaults of everything else, and which flags go with what.

# The official scripts' recipe (see the docstring): (head lr, theta_d lr, epochs) per preset and task.
# MRPC base: the official single-task script (roberta_base_mrpc.sh) runs 60 epochs, the multi-seed script
# (roberta_base_run_multi_lr.sh) 30; we take 30, as the multi-seed script is the one that ran seeds 1-5.
# MNLI and QQP are not in the paper: QNLI's values, our guess.
RECIPES = {
    "base": {"sst2": (1e-4, 5e-3, 60), "mrpc": (2e-2, 5e-3, 30), "cola": (5e-3, 5e-3, 80),
             "qnli": (2e-4, 5e-3, 25), "rte": (5e-4, 5e-3, 160), "stsb": (2e-4, 5e-3, 80),
             "mnli": (2e-4, 5e-3, 25), "qqp": (2e-4, 5e-3, 25)},
    "large": {"sst2": (2e-4, 1e-3, 20), "mrpc": (2e-3, 5e-3, 40), "cola": (2e-2, 5e-3, 40),
              "qnli": (5e-3, 5e-3, 20), "rte": (5e-3, 5e-3, 40), "stsb": (2e-4, 5e-3, 40),
              "mnli": (5e-3, 5e-3, 20), "qqp": (5e-3, 5e-3, 20)},
}
MAX_LENGTH = {"base": 512, "large": 128}
LORA_LR = 4e-4
# Defaults of every other setting (None: off / all). Flags default to None so that "not given" is known:
# --eval_only keeps the run's own value for those, and the table tells recipe values from chosen ones.
DEFAULTS = dict(model="FacebookAI/roberta-base", method="unilora", d=23040, r=4, signs=False, projection="balanced",
                alpha=None, targets="query,value", weight_decay=0.1, max_steps=None, batch_size=32, grad_accum=1,
                eval_batch_size=64, warmup_ratio=0.06, grad_clip=1.0, max_train_samples=None, max_eval_samples=None,
                seed=1, bf16=False, device=None, threads=None, data_dir=None, cache_dir=None)
RECIPE_KEYS = ("head_lr", "lr", "epochs", "max_length")
# P's with random signs by construction (projections.py): signs on for them unless --no-signs, which is an error.
SIGNED_PROJECTIONS = ("fastfood", "gaussian")
# Settings that apply to one method only; giving them to another is an error, not silently ignored.
METHOD_KEYS = {"d": ("unilora",), "signs": ("unilora",), "projection": ("unilora",), "alpha": ("lora",),
               "r": ("unilora", "lora"), "lr": ("unilora", "lora"), "targets": ("unilora", "lora")}
# What --eval_only may change about the saved run; everything else comes from it.
EVAL_KEYS = ("model", "data_dir", "cache_dir", "max_length", "max_eval_samples", "eval_batch_size", "device",
             "threads", "bf16")
# What --eval_only reads from a run.json, each value checked: a damaged file, or another script's, is one line.
SAVED_RUN = dict(task=choice(tuple(TASKS)), model=text(), method=choice(("unilora", "lora", "head")),
                 d=whole(null=True), r=whole(null=True), signs=choice((True, False), null=True),
                 projection=choice(tuple(PROJECTIONS), null=True), alpha=real(null=True), targets=text(null=True),
                 seed=whole(0, high=MAX_SEED), max_length=whole(), max_eval_samples=whole(null=True),
                 eval_batch_size=whole(), bf16=choice((True, False)), data_dir=text(null=True),
                 cache_dir=text(null=True))
CONFIG_KEYS = ("task", "model", "preset", "method", "d", "r", "signs", "projection", "alpha", "targets", "lr",
               "head_lr", "weight_decay", "epochs", "max_steps", "batch_size", "grad_accum", "eval_batch_size",
               "warmup_ratio", "grad_clip", "max_length", "max_train_samples", "max_eval_samples", "seed", "bf16",
               "device", "threads", "data_dir", "cache_dir")  # of a run: its run.json, in this order
# --eval_only --load A,B,...: what may be given (each run keeps the rest of its run.json), what the runs must share.
TOGETHER_FLAGS = ("eval_only", "load", "eval_batch_size", "device", "threads")
TOGETHER_KEYS = ("model", "d", "r", "targets", "seed", "projection", "signs", "bf16")


# -----------------------------------------------------------------------------
# main: the flags, then one of three things: Table 1, an evaluation of a saved run, or the experiment.

def main(argv=None):
    with printing_on_main_copy():  # under torchrun, rank 0 alone prints
        args = parse_args(argv)  # every copy checks the flags alike
        with errors_as_exit():  # raised on every copy alike, or (main_first) on rank 0 alone
            if args.table:
                return print(make_table(args.table, args.report or "best"))
            if args.threads:
                torch.set_num_threads(args.threads)
            ranks = start_data_parallel(args.device)  # a plain `python` run: nothing distributed
            with data_parallel_until_done(ranks):
                return evaluate_saved(args, ranks) if args.eval_only else train(args, ranks)


def parse_args(argv):
    p = Parser(description=__doc__.split("\n\n")[0].strip(),
               usage="%(prog)s --task TASK [flags] | --eval_only --load DIR | --table DIR... (-h)",
               formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DEFAULTS
    p.add_argument("--task", choices=list(TASKS), help="GLUE task (required unless --eval_only / --table)")
    p.add_argument("--model", help=f"hub id or local folder (default {d['model']})")
    p.add_argument("--preset", choices=("base", "large"), help="recipe column (default: from config.json's size)")
    p.add_argument("--data_dir", help="the task's GLUE folder (train.tsv, dev.tsv); default: download")
    p.add_argument("--cache_dir", help="where downloaded GLUE tasks live (default ~/.cache/unilora/glue)")
    p.add_argument("--output_dir", help="run folder (default runs/glue-<task>-<method>; --eval_only: DIR/eval-N)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --output_dir")
    p.add_argument("--method", choices=("unilora", "lora", "head"), help=f"default {d['method']}")
    p.add_argument("--d", type=positive_int, help=f"Uni-LoRA: length of theta_d (default {d['d']})")
    p.add_argument("--r", type=positive_int, help=f"LoRA rank of both adapters (default {d['r']})")
    p.add_argument("--signs", action=argparse.BooleanOptionalAction,
                   help="Uni-LoRA: random +-1 per row of P, our untested variant (default off, as published; "
                        "on for the fastfood and gaussian P's, signed by construction)")
    p.add_argument("--projection", choices=list(PROJECTIONS),
                   help="Uni-LoRA: which P (projections.py; default balanced, the paper's; others are ablations)")
    p.add_argument("--alpha", type=positive_float, help="LoRA: scale alpha/r (default alpha = r)")
    p.add_argument("--targets", help=f"comma-separated module-name suffixes to adapt (default {d['targets']})")
    p.add_argument("--lr", type=positive_float, help="adapter lr (default: the recipe's theta_d lr; LoRA 4e-4)")
    p.add_argument("--head_lr", type=positive_float, help="head lr (default: the recipe's, per task)")
    p.add_argument("--weight_decay", type=nonnegative_float, help=f"head weights only (default {d['weight_decay']})")
    p.add_argument("--epochs", type=positive_int, help="default: the recipe's, per task")
    p.add_argument("--max_steps", type=positive_int, help="stop after this many optimiser steps (default: off)")
    p.add_argument("--batch_size", type=positive_int, help=f"examples per optimiser step (default {d['batch_size']})")
    p.add_argument("--grad_accum", type=positive_int, help="micro-batches per step (default 1)")
    p.add_argument("--eval_batch_size", type=positive_int, help=f"default {d['eval_batch_size']}")
    p.add_argument("--warmup_ratio", type=fraction, help=f"default {d['warmup_ratio']}")
    p.add_argument("--grad_clip", type=nonnegative_float, help=f"max grad norm, 0: off (default {d['grad_clip']})")
    p.add_argument("--max_length", type=positive_int, help="tokens per example (default 512 base / 128 large)")
    p.add_argument("--max_train_samples", type=positive_int, help="use the first N training examples")
    p.add_argument("--max_eval_samples", type=positive_int, help="use the first N examples of each dev file")
    p.add_argument("--seed", type=seed_number, help=f"default {d['seed']}, as the official scripts")
    p.add_argument("--seeds", type=seed_list, help="e.g. 1,2,3,4,5: one run per seed in DIR/seed-N + summary.json")
    p.add_argument("--device", type=device_name, help="auto | cpu | cuda | cuda:N (default: cuda if present, else cpu)")
    p.add_argument("--threads", type=thread_count, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast (default off: fp32)")
    p.add_argument("--eval_only", action="store_true", help="score the run saved in --load")
    p.add_argument("--load", help="a run folder written by this script (or its best/); several, comma-separated: "
                                  "Uni-LoRA runs on one base, scored together in mixed batches")
    p.add_argument("--table", nargs="+", metavar="DIR", help="print Table 1 from the runs under these folders")
    p.add_argument("--report", choices=REPORTS, help="which epoch of each run --seeds' summary and --table report: "
                                                     "best (default) or last (where the official scripts end)")
    args = p.parse_args(argv)
    given = [k for k, v in vars(args).items() if v not in (None, False)]
    if args.table and set(given) - {"table", "report"}:
        p.error("--table takes only folders (and --report)")
    if args.report and not (args.table or args.seeds):
        # a run's results.json holds both epochs; only a statistic over runs has to pick one
        p.error("--report applies to --seeds and --table only: a run records both its best and its last epoch")
    if args.eval_only != bool(args.load):
        p.error("--eval_only and --load DIR go together: DIR is the run folder to score")
    if args.eval_only and len(load_dirs(args.load)) > 1:
        if flag := unused_flag(p, args, TOGETHER_FLAGS):
            p.error(f"{flag} does not apply to --eval_only with several --load folders: each run is scored with its "
                    f"own run.json's settings, into its own DIR/eval-N")
        if "" in load_dirs(args.load):
            p.error(f"--load {args.load}: an empty folder name in the list")
    elif args.eval_only:
        extra = set(given) - set(EVAL_KEYS) - {"eval_only", "load", "output_dir", "overwrite", "task"}
        if extra:
            p.error(f"--{sorted(extra)[0]} does not apply to --eval_only: the saved run's setting is used")
    elif not args.table and not args.task:
        p.error("--task is required")
    if args.seeds and args.seed is not None:
        p.error("give --seed or --seeds, not both")
    method = args.method or DEFAULTS["method"]
    for key, methods in METHOD_KEYS.items():
        if getattr(args, key) is not None and method not in methods and not args.eval_only:
            p.error(f"--{key} does not apply to --method {method}")
    return args


def seed_list(text):
    seeds = [seed_number(s) for s in text.split(",")]
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r} repeats a seed")
    return seeds


# -----------------------------------------------------------------------------
# The experiment: its folder, the model's settings, the data, then one run per seed (and their summary).

def train(args, ranks):
    """The experiment: output folder, model and settings, data, then one run per seed (and their summary)."""
    out = Path(args.output_dir or f"runs/glue-{args.task}-{args.method or DEFAULTS['method']}")
    with staged(out, args.overwrite, ranks) as stage:
        model_dir, model_config = main_first(ranks, lambda: fetch_model(args.model or DEFAULTS["model"]))
        cfg, from_recipe = resolve_config(args, model_config, ranks)
        if args.seeds:
            cfg["seed"] = args.seeds  # printed as such; each run records its own
        print_config(cfg, from_recipe, model_config)
        data = tokenize(main_first(ranks, lambda: load_data(cfg)), model_dir, model_config, cfg, ranks)
        if not args.seeds:
            results = train_run(cfg, from_recipe, data, model_dir, stage, ranks)
        else:
            runs = [train_run({**cfg, "seed": s}, from_recipe, data, model_dir, stage / f"seed-{s}", ranks)
                    for s in args.seeds]
            report = args.report or "best"
            results = summarize(runs, report)
            if ranks.main:
                write_json(stage / "summary.json", results)
            for which in sorted(REPORTS, key=lambda w: w != report):  # the reported epoch first
                for key in reported(cfg["task"]):
                    s = results[which][key]
                    print(f"{key} of the {which} epoch over seeds {args.seeds}: mean {s['mean']:.4f}, std "
                          f"{s['std']:.4f}, median {s['median']:.4f}" + ("   (--report)" * (which == report)))
    print(f"saved to {out}")
    return results


def fetch_model(name):
    """The model folder and its config (resolve() leaves no empty cache folder behind when a download fails)."""
    local = Path(name).expanduser()
    if not local.is_dir():
        try:
            local = resolve(name)
        except (OSError, ValueError) as e:
            hint = ("without network, pass --model with a local folder (config.json, model.safetensors, "
                    "tokenizer.json)" if isinstance(e, ConnectionError) else
                    "pass a hub id or a local folder holding config.json, the weights and tokenizer.json")
            raise UserError(f"--model {name}: {str(e).splitlines()[0]}\n{hint}") from None
    try:
        return local, load_config(local, encoder_settings)  # every value the encoder reads, typed and ranged
    except (OSError, ValueError) as e:
        raise UserError(f"--model {name}: {e}") from None


def resolve_config(args, model_config, ranks):
    """Every setting of the run, and the names of those that came from the per-task recipe."""
    cfg = {k: getattr(args, k, None) for k in CONFIG_KEYS}
    cfg["method"] = method = args.method or DEFAULTS["method"]
    cfg["preset"] = preset = args.preset or size_preset(model_config)
    head_lr, theta_lr, epochs = RECIPES[preset][cfg["task"]]
    recipe = dict(head_lr=head_lr, lr=LORA_LR if method == "lora" else theta_lr, epochs=epochs,
                  max_length=MAX_LENGTH[preset])
    from_recipe = [k for k in RECIPE_KEYS if cfg[k] is None]
    cfg.update({k: recipe[k] for k in from_recipe})
    if cfg["signs"] is None and cfg["projection"] in SIGNED_PROJECTIONS:
        cfg["signs"] = True
    if cfg["signs"] is False and cfg["projection"] in SIGNED_PROJECTIONS:
        raise UserError(f"--projection {cfg['projection']} has random signs by construction: --no-signs (the "
                        f"paper's all-positive P) does not apply to it; leave --no-signs out")
    cfg.update({k: v for k, v in DEFAULTS.items() if cfg[k] is None})
    for key, methods in METHOD_KEYS.items():
        if method not in methods:
            cfg[key] = None  # record only what the method uses: no d for a LoRA run
    if cfg["batch_size"] % cfg["grad_accum"]:
        raise UserError(f"--batch_size {cfg['batch_size']} must be a multiple of --grad_accum {cfg['grad_accum']}")
    cfg["device"] = ranks.device  # under torchrun, cuda means this copy's GPU: cuda:LOCAL_RANK
    fit_max_length(cfg, model_config)
    return cfg, [k for k in from_recipe if method in METHOD_KEYS.get(k, (method,))]


def size_preset(model_config):
    """'large' for RoBERTa-large's size (24 layers, hidden 1024) or more, else 'base'; from config.json."""
    large = model_config.get("num_hidden_layers", 0) >= 24 or model_config.get("hidden_size", 0) >= 1024
    return "large" if large else "base"


def fit_max_length(cfg, model_config):
    limit = model_config.get("max_position_embeddings", 512)
    if "roberta" in model_config.get("model_type", ""):
        limit -= 2  # RoBERTa's positions start after the padding index
    if cfg["max_length"] > limit:
        print(f"note: --max_length {cfg['max_length']} is more than {cfg['model']} supports; using {limit}")
        cfg["max_length"] = limit


def print_config(cfg, from_recipe, model_config):
    print(f"{cfg['task']} / {cfg['method']} on {cfg['model']}: preset {cfg['preset']} (config.json: "
          f"{model_config.get('num_hidden_layers')} layers, hidden {model_config.get('hidden_size')})")
    for key in CONFIG_KEYS:
        print(f"  {key:<18} {cfg[key]}" + ("   (recipe)" if key in from_recipe else ""))


def tokenize(data, model_dir, model_config, cfg, ranks):
    """data with every text replaced by its (token ids, type ids), once for all seeds; adds the pad id."""
    try:
        tok = Tokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--model {cfg['model']}: {e}") from None

    def encode(examples):
        texts, labels = examples
        out = []
        for t in tqdm(texts, desc="tokenize", leave=False, disable=len(texts) < 20000 or not ranks.main):
            e = tok.encode(t[0], t[1] if len(t) > 1 else None, max_length=cfg["max_length"])
            out.append((e.ids, e.type_ids))
        return out, labels

    # roberta-base ships no special_tokens_map.json, so the tokenizer may not know its pad token; the model
    # config does (and RoBERTa's position ids are computed from exactly that id).
    pad_id = tok.pad_id if tok.pad_id is not None else (model_config.get("pad_token_id") or 0)
    out = {**data, "dev": {name: encode(examples) for name, examples in data["dev"].items()}, "pad_id": pad_id}
    if "train" in data:
        out["train"] = encode(data["train"])
    return out


# -----------------------------------------------------------------------------
# One run: the model, the optimiser, the loop (dev scores after every epoch, the best epoch kept), the results.

def train_run(cfg, from_recipe, data, model_dir, folder, ranks):
    """One run of cfg into folder: model, optimiser, train (with dev scores each epoch), save."""
    # model
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    model, adapter = build_model(cfg, model_dir)
    # Dropout after the (identical) initialisation: the other copies draw their own masks, as one process draws new
    # ones for every row, not rank 0's again; rank 0 keeps the seed's stream, so a plain run is unchanged.
    if ranks.rank:
        torch.manual_seed(1_000_003 * ranks.rank + cfg["seed"])
    train_set, dev_sets = data["train"], data["dev"]
    counts = dict(adapter.counts()) if adapter is not None else {"d": 0, "D": 0}
    counts = {"d": counts["d"], "D": counts["D"], "head": sum(p.numel() for p in model.classifier.parameters())}
    print(f"{cfg['task']} seed {cfg['seed']}: {len(train_set[0])} train / "
          f"{' + '.join(str(len(e)) for e, _ in dev_sets.values())} dev examples; {cfg['method']}: d {counts['d']:,} "
          f"(D {counts['D']:,}), head {counts['head']:,} trainable")

    # optimiser
    optimizer, scheduler, total_steps = make_optimizer(model, adapter, cfg, len(train_set[0]))
    copy_from_main([p for g in optimizer.param_groups for p in g["params"]], ranks)
    run = Run(cfg, model, adapter, optimizer, scheduler, total_steps, data, folder, ranks)
    # the loop, with the dev sets scored after every epoch
    t0 = time.time()
    history, best, step_times = fit(run)
    # save: the last epoch's model, and what the run measured
    if ranks.main:
        save_model(folder, cfg, model, adapter)
    results = {"config": cfg, "from_recipe": from_recipe, "trainable": counts,
               "data": {"folder": data["folder"], "glue_dev_counts": data["glue_dev_counts"],
                        "train_examples": len(train_set[0]),
                        "dev_examples": {name: len(e) for name, (e, _) in dev_sets.items()}},
               "epochs": history, "best": best, "last": history[-1], "steps": len(step_times),
               "world_size": ranks.world,
               "seconds_per_step_median": statistics.median(step_times), "wall_time_s": round(time.time() - t0, 2),
               **peak_memory_mb(), **projection_cost(adapter)}  # of rank 0
    if ranks.main:
        write_json(folder / "results.json", results)
    metric = TASKS[cfg["task"]]["metrics"][0]
    print(f"best {metric} {best['dev'][metric]:.4f} at epoch {best['epoch']}, last {history[-1]['dev'][metric]:.4f} at "
          f"epoch {history[-1]['epoch']}; {len(step_times)} steps, {results['seconds_per_step_median']:.3f} s/step")
    return results


@dataclass
class Run:
    """What the steps of one run share: its settings, what trains, the data, where it is saved, the copies."""
    cfg: dict
    model: nn.Module
    adapter: object  # the adapter's handle; None for --method head
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    data: dict  # tokenize()'s: "train", "dev" and "pad_id"
    folder: Path
    ranks: Ranks


def build_model(cfg, model_dir, load=None):
    """(model on its device, adapter or None): a fresh adapter, or the one saved in the run folder `load`."""
    try:
        encoder = Encoder.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--model {cfg['model']}: {e}") from None
    labels = TASKS[cfg["task"]]["labels"]
    model = GlueModel(encoder, 1 if labels is None else len(labels))
    targets = tuple(t.strip() for t in (cfg["targets"] or "").split(",") if t.strip())
    settings = AdapterSettings(cfg["method"], d=cfg["d"], r=cfg["r"], alpha=cfg["alpha"], signs=cfg["signs"],
                               projection=cfg.get("projection"), seed=cfg["seed"], targets=targets)
    try:
        adapter = build_adapter(model, settings, saved=load and load / "adapter.pt", keep_trainable=("classifier",))
        if adapter is None:  # --method head
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith("classifier."))
        if load:
            model.classifier.load_state_dict(load_safetensors(load / "head.safetensors"))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        what = f"--load {load} does not fit --model {cfg['model']}" if load else "--d / --r / --targets / --projection"
        raise UserError(f"{what}: {' '.join(str(e).split())[:300]}") from None
    return model.to(cfg["device"]), adapter


def make_optimizer(model, adapter, cfg, n_train):
    """AdamW with linear warmup then linear decay to zero; returns it, its schedule and the number of steps."""
    optimizer = torch.optim.AdamW(param_groups(model, adapter, cfg))
    total = cfg["max_steps"] or math.ceil(n_train / cfg["batch_size"]) * cfg["epochs"]
    scheduler, _ = warmup_then_decay(optimizer, total, cfg["warmup_ratio"], "linear")
    return optimizer, scheduler, total


def param_groups(model, adapter, cfg):
    """The adapter without weight decay; the head with it on its weights, not on biases or LayerNorms (as the
    Hugging Face trainer of the official scripts applies --weight_decay)."""
    decay, no_decay = [], []
    for module in model.classifier.modules():
        for name, p in module.named_parameters(recurse=False):
            (no_decay if name == "bias" or isinstance(module, nn.LayerNorm) else decay).append(p)
    groups = [{"params": decay, "lr": cfg["head_lr"], "weight_decay": cfg["weight_decay"]},
              {"params": no_decay, "lr": cfg["head_lr"], "weight_decay": 0.0}]
    if adapter is not None:
        groups.insert(0, {"params": list(adapter.parameters()), "lr": cfg["lr"], "weight_decay": 0.0})
    return groups


def fit(run):
    """Train for run.total_steps, scoring the dev sets after every epoch (and at the last step) and saving the best
    epoch in folder/best. Returns (history, best, seconds of each optimiser step)."""
    cfg, ranks = run.cfg, run.ranks
    metric = TASKS[cfg["task"]]["metrics"][0]
    n, batch_size = len(run.data["train"][0]), cfg["batch_size"]
    order_rng = torch.Generator().manual_seed(cfg["seed"])  # the same order on every copy; not tied to dropout
    history, best, step_times = [], None, []
    run.model.train()
    # the bar is closed on errors too, so that messages start on a clean line
    with tqdm(total=run.total_steps, desc=f"{cfg['task']} {cfg['method']} seed {cfg['seed']}", dynamic_ncols=True,
              mininterval=0.5 if sys.stderr.isatty() else 30, disable=not ranks.main) as bar:
        for epoch in range(1, math.ceil(run.total_steps / math.ceil(n / batch_size)) + 1):
            perm = torch.randperm(n, generator=order_rng).tolist()
            epoch_loss, seen = 0.0, 0
            for b in range(0, n, batch_size):
                if len(step_times) == run.total_steps:
                    break
                index = perm[b:b + batch_size]
                t0 = time.perf_counter()
                loss = train_step(run, index, len(step_times) + 1)
                step_times.append(time.perf_counter() - t0)
                epoch_loss, seen = epoch_loss + loss * len(index), seen + len(index)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)  # the bar redraws at its own pace

            dev = evaluate_all(run.model, run.data["dev"], cfg, run.data["pad_id"], ranks)
            check_finite(dev["loss"], len(step_times))  # the last update can diverge after its own finite loss
            history.append({"epoch": epoch, "step": len(step_times), "train_loss": epoch_loss / seen, "dev": dev})
            bar.write(f"epoch {epoch} step {len(step_times)}: train loss {epoch_loss / seen:.4f}, dev "
                      + ", ".join(f"{k} {v:.4f}" for k, v in dev.items()))
            if best is None or dev[metric] > best["dev"][metric]:
                best = history[-1]
                if ranks.main:
                    save_model(run.folder / "best", cfg, run.model, run.adapter)
    return history, best, step_times


def train_step(run, index, step):
    """One optimiser step on the training examples at `index` (this copy: its share of them), in micro-batches of
    at most batch_size / grad_accum examples; returns the whole batch's mean loss."""
    cfg = run.cfg
    regression = TASKS[cfg["task"]]["labels"] is None
    batch_loss = 0.0
    for ids, mask, types, y in batches(run.data["train"], my_share(index, run.ranks),
                                       cfg["batch_size"] // cfg["grad_accum"], run.data["pad_id"], regression,
                                       cfg["device"]):
        with mixed_precision(cfg):
            out = run.model(ids, mask, types)
        loss = loss_sum(out, y, regression) / len(index)  # the whole batch's size, on every copy
        loss.backward()
        batch_loss += loss.item()
    batch_loss, *_ = optimizer_step(run.optimizer, run.scheduler, batch_loss, step, run.ranks,
                                    grad_clip=cfg["grad_clip"])
    if torch.device(cfg["device"]).type == "cuda":
        torch.cuda.synchronize()  # so that the step's time is the step's
    return batch_loss


def mixed_precision(cfg):
    """--bf16: bf16 autocast; otherwise fp32, as the official scripts."""
    return autocast(cfg["device"], torch.bfloat16 if cfg["bf16"] else None)


def evaluate_all(model, dev_sets, cfg, pad_id, ranks):
    """Metrics on every dev file of the task, in one flat dict (MNLI: accuracy, accuracy_mismatched, ...)."""
    out = {}
    for name, examples in dev_sets.items():
        scores = evaluate(model, examples, cfg, pad_id, ranks)
        out.update({k + split_suffix(cfg["task"], name): v for k, v in scores.items()})
    return out


@torch.no_grad()
def evaluate(model, examples, cfg, pad_id, ranks):
    """Metrics and mean loss on one dev set; each copy scores its share, and every copy gets the whole set's."""
    encoded, labels = examples
    regression = TASKS[cfg["task"]]["labels"] is None
    model.eval()
    # Length-sorted batches waste far less compute on padding; the metrics do not depend on order.
    index = by_length(encoded)
    rows = []
    for ids, mask, types, _ in batches(examples, my_share(index, ranks), cfg["eval_batch_size"], pad_id, regression,
                                       cfg["device"]):
        with mixed_precision(cfg):
            rows += model(ids, mask, types).float().cpu().tolist()
    model.train()
    return score(cfg["task"], gather_shares(rows, ranks), [labels[j] for j in index])  # all examples, `index` order


def by_length(encoded):
    return sorted(range(len(encoded)), key=lambda j: len(encoded[j][0]))


def score(task, rows, labels):
    """Metrics and mean loss of a dev set: the model's output rows and the labels, example by example."""
    regression = TASKS[task]["labels"] is None
    out = torch.tensor(rows)
    y = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)
    pred = out.squeeze(-1) if regression else out.argmax(-1)
    result = {name: METRICS[name](pred.numpy(), y.numpy()) for name in TASKS[task]["metrics"]}
    result["loss"] = loss_sum(out, y, regression).item() / len(labels)
    return result


def save_model(folder, cfg, model, adapter):
    """run.json (what --eval_only rebuilds from), the adapter and the head."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "run.json", cfg)
    if adapter is not None:
        adapter.save(folder / "adapter.pt", overwrite=True)
    save_safetensors({k: v.detach().float().cpu().contiguous() for k, v in model.classifier.state_dict().items()},
                     folder / "head.safetensors")


# -----------------------------------------------------------------------------
# --eval_only --load DIR: the saved run rebuilt from its run.json and scored again, into DIR/eval-N.

def evaluate_saved(args, ranks):
    """--eval_only: rebuild the run in --load from its run.json (flags override), score it, write eval-N/."""
    if len(load_dirs(args.load)) > 1:
        return evaluate_together(args, [Path(d) for d in load_dirs(args.load)], ranks)
    load = Path(args.load)
    cfg = saved_config(args, load, ranks)
    # not the run itself, a folder holding it or one inside it: --overwrite would replace the run's files
    dest = eval_output_dir(args.output_dir, load, "--output_dir {folder} holds the run that --load reads, or lies "
                                                  "inside it; leave --output_dir out to write {default}")
    with staged(dest, args.overwrite, ranks) as stage:
        model_dir, model_config = main_first(ranks, lambda: fetch_model(cfg["model"]))
        data = dev_data(cfg, model_dir, model_config, ranks)
        model, _ = build_model(cfg, model_dir, load=load)
        dev = evaluate_all(model, data["dev"], cfg, data["pad_id"], ranks)
        line = write_eval(stage, load, cfg, dev, data, ranks)
    print(f"{line}; saved to {dest}")
    return dev


def saved_config(args, load, ranks):
    """The settings of the run in `load` (its run.json, checked), with the --eval_only flags' overrides."""
    hint = "--load must be a run folder written by train_glue.py, or its best/"
    cfg = dict.fromkeys(SAVED_RUN) | read_saved_run(load, SAVED_RUN, hint)  # a setting left out: None
    if args.task and args.task != cfg["task"]:
        raise UserError(f"--task {args.task}, but {load} was trained on {cfg['task']}")
    cfg.update({k: getattr(args, k) for k in EVAL_KEYS if getattr(args, k) is not None})
    cfg["device"] = ranks.device
    return cfg


def dev_data(cfg, model_dir, model_config, ranks):
    fit_max_length(cfg, model_config)
    return tokenize(main_first(ranks, lambda: load_data(cfg, train=False)), model_dir, model_config, cfg, ranks)


def write_eval(stage, load, cfg, dev, data, ranks):
    """stage/results.json of one scored run; returns its line for the terminal."""
    counts = {name: len(e) for name, (e, _) in data["dev"].items()}
    if ranks.main:
        write_json(stage / "results.json", {"kind": "eval", "load": str(load), "config": cfg, "dev": dev,
                                            "world_size": ranks.world,
                                            "data": {"folder": data["folder"], "dev_examples": counts,
                                                     "glue_dev_counts": data["glue_dev_counts"]}})
    return (f"{cfg['task']} {load}: " + ", ".join(f"{k} {v:.4f}" for k, v in dev.items()) + " on "
            + ", ".join(f"{n} {name}" for name, n in counts.items()) + " examples")


# --eval_only --load A,B,...: Uni-LoRA runs on one base and P scored in one process, their dev sets in one stream.

def evaluate_together(args, dirs, ranks):
    """Every run's dev examples in one shuffled stream (then ordered by length), each batch mixing runs row by row
    (taskbank.TaskBank: the base once, each row through its own run's theta_d and head); each run's metrics and
    DIR/eval-N/ as its own --eval_only --load DIR writes them. Returns their dev metrics, in --load order."""
    cfgs = [saved_config(args, d, ranks) for d in dirs]
    check_together(dirs, cfgs)
    dests = [new_eval_dir(d) for d in dirs]
    with contextlib.ExitStack() as stack:
        stages = [stack.enter_context(staged(dest, False, ranks)) for dest in dests]
        model_dir, model_config = main_first(ranks, lambda: fetch_model(cfgs[0]["model"]))
        datas = [dev_data(cfg, model_dir, model_config, ranks) for cfg in cfgs]
        model, adapter = build_model(cfgs[0], model_dir, load=dirs[0])  # the first run: its P, as its own eval
        bank = TaskBank(model, adapter)
        try:
            for k, d in enumerate(dirs):
                bank.add(str(k), str(d / "adapter.pt"))
        except (ValueError, OSError) as e:  # a file the bank refuses, or one that is missing
            raise UserError(f"--load: {' '.join(str(e).split())}") from None
        t0 = time.time()
        outs = mixed_outputs(model, bank, datas, cfgs, ranks)
        seconds, devs, lines = time.time() - t0, [], []
        for k, (d, cfg, data, stage) in enumerate(zip(dirs, cfgs, datas, stages)):
            devs.append({})
            for name, (encoded, labels) in data["dev"].items():
                index = by_length(encoded)  # the single run's order: the same sums
                scores = score(cfg["task"], [outs[k, name, j] for j in index], [labels[j] for j in index])
                devs[-1].update({m + split_suffix(cfg["task"], name): v for m, v in scores.items()})
            lines.append(write_eval(stage, d, cfg, devs[-1], data, ranks))
    for line, dest in zip(lines, dests):
        print(f"{line}; saved to {dest}")
    print(f"{len(outs)} dev examples of {len(dirs)} runs in mixed batches: {seconds:.2f} s, "
          f"{len(outs) / max(seconds, 1e-9):,.0f} examples/s")
    return devs


def check_together(dirs, cfgs):
    """Runs scored together are Uni-LoRA runs of one model, layers, r, d and P, and one precision."""
    for d, cfg in zip(dirs, cfgs):
        if cfg["method"] != "unilora":
            raise UserError(f"--load {d} is a --method {cfg['method']} run: only Uni-LoRA runs are scored together")
        if [x.resolve() for x in dirs].count(d.resolve()) > 1:
            raise UserError(f"--load names {d} twice")
        for key in TOGETHER_KEYS:
            a, b = ((c[key] or "balanced") if key == "projection" else c[key] for c in (cfgs[0], cfg))
            if a != b:
                raise UserError(f"--load {dirs[0]} and {d} differ in {key} ({a} vs {b}): runs scored together "
                                f"share one base and P; score them one by one")


@torch.no_grad()
def mixed_outputs(model, bank, datas, cfgs, ranks):
    """{(run, dev file, example): its output row, as wide as its head} over one stream of all runs' dev examples,
    shuffled with seed 0 then ordered by length (runs stay mixed among equal lengths), in batches of the smallest
    eval_batch_size; row i through run tasks[i]'s adapter and head."""
    stream = [(k, name, j) for k, data in enumerate(datas) for name, (encoded, _) in data["dev"].items()
              for j in range(len(encoded))]
    random.Random(0).shuffle(stream)
    stream.sort(key=lambda s: len(datas[s[0]]["dev"][s[1]][0][s[2]][0]))  # by length, as one run's: little padding
    encoded = [datas[k]["dev"][name][0][j] for k, name, j in stream]
    widths = [1 if TASKS[c["task"]]["labels"] is None else len(TASKS[c["task"]]["labels"]) for c in cfgs]
    size, share, rows = min(c["eval_batch_size"] for c in cfgs), my_share(list(range(len(stream))), ranks), []
    model.eval()
    for b, (ids, mask, types, _) in enumerate(batches((encoded, [0] * len(stream)), share, size,
                                                      datas[0]["pad_id"], False, cfgs[0]["device"])):
        tasks = [stream[i][0] for i in share[b * size:(b + 1) * size]]
        with bank.rows([str(k) for k in tasks]), mixed_precision(cfgs[0]):
            out = model(ids, mask, types).float().cpu()
        rows += [row[:widths[k]].tolist() for row, k in zip(out, tasks)]  # columns past a row's head: NaN
    return dict(zip(stream, gather_shares(rows, ranks)))


if __name__ == "__main__":
    interrupt_on_sigterm()  # a job scheduler's time limit: the same clean-up and one line, as Ctrl-C (main)
    main()
