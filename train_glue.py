"""
Fine-tune a BERT/RoBERTa encoder on one GLUE task with Uni-LoRA, over several seeds, and print Table 1.

Why this file exists: it is the paper's GLUE experiment as one readable script. By default it runs the recipe
of the official scripts; it is also the harness for fair baselines: --method lora (plain LoRA) and --method
head (the classification head alone) share the data, head, optimiser, schedule and evaluation code.

    python train_glue.py --task sst2                              # one run of the recipe (seed 1)
    python train_glue.py --task sst2 --seeds 1,2,3,4,5            # five seeds + summary.json (mean/std/median)
    python train_glue.py --task mrpc --method lora                # LoRA baseline, same everything else
    python train_glue.py --task cola --no-signs                   # Uni-LoRA exactly as published
    python train_glue.py --eval_only --load runs/glue-sst2-unilora      # score a saved run again (-> eval-N/)
    python train_glue.py --table runs/                            # Table 1 from any run folders
    torchrun --standalone --nproc_per_node 8 -- train_glue.py --task sst2   # one run on 8 GPUs (README)

Where each default comes from:
  official scripts - RoBERTa-base, query and value, r = 4, d = 23,040; AdamW, theta_d lr 5e-3 with no weight
                     decay, per-task head lr and epochs (RECIPES below; RoBERTa-large: its own lrs and epochs,
                     max length 128 instead of 512); head weight decay 0.1 on the head's non-bias, non-LayerNorm
                     weights (the scripts pass --weight_decay 0.1 to the Hugging Face trainer, which applies it so);
                     linear schedule, 6% warmup, batch 32, gradient clipping at norm 1.0 (that trainer's default),
                     fp32, seed 1, dev evaluation every epoch, best epoch reported.
  the paper's text - a result is the mean over 5 seeds of the best-epoch dev metric (--seeds 1,2,3,4,5, the
                     seeds of the official multi-seed scripts; the summary adds std and median); the reported
                     parameter count is d (the head is not counted).
  this project     - random signs in P (--signs, default on): P stays an exact isometry and the bias that ties
                     every LoRA entry to its group's mean direction is gone; untested in the literature, so
                     --no-signs gives the published method. MNLI and QQP recipes (not in the paper) copy QNLI's.
                     LoRA baseline lr 4e-4 (the LoRA paper's RoBERTa-base lr). Preset (base/large) read from
                     config.json (24 layers or hidden 1024 -> large), never from the model's name.

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
peak memory), adapter.pt, head.safetensors, and best/ (run.json, adapter, head of the best epoch). With --seeds,
one such run per seed in DIR/seed-N and DIR/summary.json. A run is built in DIR.partial and moved into place
only when it finished: a failed or diverged run leaves nothing behind and the previous run as it was.

Many GPUs. Under torchrun every copy (rank) takes its share of each global batch of --batch_size examples (the
same seeded order everywhere), divides its loss by the whole batch's size, and one all-reduce per optimiser step
sums the trainable gradients (theta_d or LoRA's A/B, and the head): the update of one process on the whole batch.
Dev sets are scored in shares and gathered back in order. Rank 0 alone writes files, prints and shows progress.
With dropout, each copy draws its own masks, so a run matches one process in distribution, not bit for bit.
"""

import argparse
import json
import math
import os
import random
import shutil
import signal
import statistics
import sys
import time
import zipfile
from contextlib import contextmanager, nullcontext, redirect_stderr, redirect_stdout
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from pretrained.encoder import Encoder
from pretrained.files import load_config, load_safetensors, save_safetensors, write_json
from pretrained.hub import download, missing_dirs, remove_if_empty, resolve
from pretrained.tokenizer import Tokenizer, pad
from recipes.training import (NonFiniteLoss, check_finite, copy_from_main, data_parallel_until_done, device_name,
                              fraction, gather_shares, main_first, my_share, new_eval_dir, nonnegative_float,
                              nonnegative_int, positive_float, positive_int, prepare_output_dir, start_data_parallel,
                              sum_gradients, summed)
from projections import PROJECTIONS
from unilora import apply_lora, apply_unilora, load_unilora

# -----------------------------------------------------------------------------
# Tasks: how each official TSV is laid out, and how each task is scored. Columns are 0-based; labels=None
# means regression; header names the text and label columns of the file's first line (CoLA has none). The
# first metric is the paper's and picks the best epoch; MNLI's first dev file (matched) picks it too.

TASKS = {
    "sst2": dict(folder="SST-2", dev=("dev.tsv",), header=("sentence", "label"), ncols=(2,), text=(0,), label=1,
                 labels=("0", "1"), metrics=("accuracy",)),
    "mrpc": dict(folder="MRPC", dev=("dev.tsv",), header=("#1 String", "#2 String", "Quality"), ncols=(5,),
                 text=(3, 4), label=0, labels=("0", "1"), metrics=("accuracy", "f1")),
    "cola": dict(folder="CoLA", dev=("dev.tsv",), header=None, ncols=(4,), text=(3,), label=1,
                 labels=("0", "1"), metrics=("matthews",)),
    "qnli": dict(folder="QNLI", dev=("dev.tsv",), header=("question", "sentence", "label"), ncols=(4,),
                 text=(1, 2), label=3, labels=("entailment", "not_entailment"), metrics=("accuracy",)),
    "rte": dict(folder="RTE", dev=("dev.tsv",), header=("sentence1", "sentence2", "label"), ncols=(4,),
                text=(1, 2), label=3, labels=("entailment", "not_entailment"), metrics=("accuracy",)),
    "stsb": dict(folder="STS-B", dev=("dev.tsv",), header=("sentence1", "sentence2", "score"), ncols=(10,),
                 text=(7, 8), label=9, labels=None, metrics=("pearson", "spearman")),
    # MNLI train rows have 12 columns, dev rows 16 (five annotator labels); the gold label is always last.
    "mnli": dict(folder="MNLI", dev=("dev_matched.tsv", "dev_mismatched.tsv"),
                 header=("sentence1", "sentence2", "gold_label"), ncols=(12, 16), text=(8, 9), label=-1,
                 labels=("contradiction", "entailment", "neutral"), metrics=("accuracy",)),
    "qqp": dict(folder="QQP", dev=("dev.tsv",), header=("question1", "question2", "is_duplicate"), ncols=(6,),
                text=(3, 4), label=5, labels=("0", "1"), metrics=("accuracy", "f1")),
}
# The official dev sets' example counts, per dev file: a cached download must match them exactly.
DEV_ROWS = {"sst2": (872,), "mrpc": (408,), "cola": (1043,), "qnli": (5463,), "rte": (277,), "stsb": (1500,),
            "mnli": (9815, 9832), "qqp": (40430,)}

# The official scripts' recipe (see the docstring): (head lr, theta_d lr, epochs) per preset and task.
# MRPC base: 30 epochs as in the multi-lr script that ran seeds 1-5 (the single-task script uses 60).
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
DEFAULTS = dict(model="FacebookAI/roberta-base", method="unilora", d=23040, r=4, signs=True, projection="balanced",
                alpha=None,
                targets="query,value", weight_decay=0.1, max_steps=None, batch_size=32, grad_accum=1,
                eval_batch_size=64, warmup_ratio=0.06, grad_clip=1.0, max_train_samples=None,
                max_eval_samples=None, seed=1, bf16=False, device=None, threads=None, data_dir=None, cache_dir=None)
RECIPE_KEYS = ("head_lr", "lr", "epochs", "max_length")
# Settings that apply to one method only; giving them to another is an error, not silently ignored.
METHOD_KEYS = {"d": ("unilora",), "signs": ("unilora",), "projection": ("unilora",), "alpha": ("lora",),
               "r": ("unilora", "lora"),
               "lr": ("unilora", "lora"), "targets": ("unilora", "lora")}
# What --eval_only may change about the saved run; everything else comes from it.
EVAL_KEYS = ("model", "data_dir", "cache_dir", "max_length", "max_eval_samples", "eval_batch_size", "device",
             "threads", "bf16")

# Dev results of Table 1 (Uni-LoRA, all-positive P, mean of 5 seeds, d = 23,040).
PAPER = {"roberta-base": {"sst2": 94.5, "mrpc": 89.7, "cola": 64.6, "qnli": 92.3, "rte": 79.8, "stsb": 90.9,
                          "avg": 85.3},
         "roberta-large": {"sst2": 96.3, "mrpc": 91.3, "cola": 68.5, "qnli": 94.6, "rte": 86.6, "stsb": 92.1,
                           "avg": 88.3}}
PAPER_TASKS = ("sst2", "mrpc", "cola", "qnli", "rte", "stsb")

GLUE_URL = "https://dl.fbaipublicfiles.com/glue/data/"
GLUE_ZIPS = {"sst2": "SST-2.zip", "cola": "CoLA.zip", "qnli": "QNLIv2.zip", "rte": "RTE.zip",
             "stsb": "STS-B.zip", "mnli": "MNLI.zip", "qqp": "QQP-clean.zip"}
# GLUE never hosted MRPC itself (licence); its script used SentEval's copy plus GLUE's own dev split.
MRPC_TRAIN_URL = "https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_train.txt"
MRPC_DEV_IDS_URL = "https://dl.fbaipublicfiles.com/glue/data/mrpc_dev_ids.tsv"


class UserError(Exception):
    """Something the user can fix (a flag, a file, the network); printed as one short line, no traceback."""


class DataError(UserError, ValueError):
    """A data file that is missing or not in the task's GLUE format."""


# -----------------------------------------------------------------------------
# Folders: a run appears only when complete, and a failure removes exactly what it created.


def begin_stage(folder, stage, overwrite):
    """Check the output folder and make an empty stage beside it; returns the folders this created."""
    created = missing_dirs(folder)
    prepare_output_dir(folder, overwrite=overwrite)
    if stage.exists() and not (stage / ".unilora-partial").exists():
        raise SystemExit(f"{stage} exists and is not ours; move it away or pick another --output_dir.")
    shutil.rmtree(stage, ignore_errors=True)  # left by a killed run of this script
    stage.mkdir()
    (stage / ".unilora-partial").touch()
    return created


@contextmanager
def staged(folder, overwrite, ranks):
    """Yield folder.partial to write into; it replaces `folder` when the block succeeds, and vanishes if not.
    Only the main copy touches the disk; the others get the same path and never write to it."""
    folder = Path(folder).absolute()
    stage = folder.with_name(folder.name + ".partial")
    created = main_first(ranks, begin_stage, folder, stage, overwrite, share=True)
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


# -----------------------------------------------------------------------------
# Data


def fetch_glue(task, root):
    """Download one task into root/<folder> (once) and return that folder; it holds exactly GLUE's files."""
    spec = TASKS[task]
    dest = Path(root) / spec["folder"]
    needed = ("train.tsv",) + spec["dev"]
    if all((dest / name).is_file() for name in needed):
        return dest
    created = missing_dirs(dest.parent)
    tmp = dest.with_name(dest.name + ".partial")  # an interrupted download never looks complete
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if task == "mrpc":
            download(MRPC_TRAIN_URL, tmp / "msr_paraphrase_train.txt")
            download(MRPC_DEV_IDS_URL, tmp / "mrpc_dev_ids.tsv")
            split_mrpc(tmp / "msr_paraphrase_train.txt", tmp / "mrpc_dev_ids.tsv", tmp)
            for name in ("msr_paraphrase_train.txt", "mrpc_dev_ids.tsv"):
                (tmp / name).unlink()
        else:
            archive = download(GLUE_URL + GLUE_ZIPS[task], tmp / GLUE_ZIPS[task])
            extract(archive, needed, tmp)
            archive.unlink()
        check_dev_rows(task, tmp, {name: read_tsv(task, tmp / name)[0] for name in spec["dev"]},
                       f"GLUE's mirror changed; download {task} by hand and pass --data_dir")
        shutil.rmtree(dest, ignore_errors=True)  # an incomplete copy (e.g. MNLI without dev_mismatched.tsv)
        os.replace(tmp, dest)
    except (OSError, zipfile.BadZipFile) as e:  # OSError: ConnectionError and urllib's HTTPError too
        raise DataError(f"cannot download GLUE {task} ({str(e).splitlines()[0]}). Without network, pass "
                        f"--data_dir with a {spec['folder']} folder holding {', '.join(needed)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_if_empty(created)
    return dest


def extract(archive, names, dest):
    """Copy each named file out of a GLUE zip: the one with that exact name nearest the top. The zips also hold
    original/ folders with other files of similar names (CoLA's in-domain dev set, STS-B's raw files)."""
    with zipfile.ZipFile(archive) as z:
        files = [m for m in z.infolist() if not m.is_dir()]
        for name in names:
            found = [m for m in files if PurePosixPath(m.filename).name == name]
            if not found:
                raise DataError(f"{archive.name} holds no {name}; GLUE's mirror changed. Download the task by "
                                f"hand and pass --data_dir")
            depth = min(len(PurePosixPath(m.filename).parts) for m in found)
            top = [m for m in found if len(PurePosixPath(m.filename).parts) == depth]
            if len(top) > 1:
                raise DataError(f"{archive.name} holds {len(top)} files {name} at the same level; pass --data_dir")
            with z.open(top[0]) as src, open(dest / name, "wb") as out:
                shutil.copyfileobj(src, out)


def check_dev_rows(task, folder, dev_texts, hint):
    for (name, texts), want in zip(dev_texts.items(), DEV_ROWS[task]):
        if len(texts) != want:
            raise DataError(f"{Path(folder) / name} has {len(texts)} examples, GLUE's has {want}: {hint}")


def split_mrpc(corpus, dev_ids, out):
    """Split the MSR paraphrase training file into GLUE's MRPC train.tsv / dev.tsv by the official dev ids."""
    dev = {tuple(line.split("\t")) for line in text_lines(dev_ids) if line}
    lines = list(text_lines(corpus))
    train_rows, dev_rows = [lines[0]], [lines[0]]
    for i, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        cols = line.split("\t")
        if len(cols) != 5:
            raise DataError(f"{corpus}:{i}: expected 5 tab-separated columns, got {len(cols)}")
        (dev_rows if (cols[1], cols[2]) in dev else train_rows).append(line)
    (Path(out) / "train.tsv").write_text("\n".join(train_rows) + "\n", encoding="utf-8")
    (Path(out) / "dev.tsv").write_text("\n".join(dev_rows) + "\n", encoding="utf-8")


def text_lines(path):
    """The lines of a UTF-8 file without line ends (a BOM is dropped); bad bytes are an error naming the line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # the MSR corpus (MRPC) starts with a BOM
                raw = raw[3:]
            try:
                yield raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                f"GLUE files are UTF-8: use the official file unchanged") from None


def read_tsv(task, path):
    """Parse one official GLUE TSV into (texts, labels); texts is a list of 1- or 2-tuples of str.

    GLUE files contain unbalanced quote characters, so rows are split on tabs only (the csv module's
    quoting would silently merge lines). Anything unexpected is an error naming the file and line.
    """
    spec = TASKS[task]
    texts, labels = [], []
    for lineno, line in enumerate(text_lines(path), start=1):
        cols = line.split("\t")
        if spec["header"] and lineno == 1:
            names = tuple(cols[i] if -len(cols) <= i < len(cols) else None for i in spec["text"] + (spec["label"],))
            if names != spec["header"]:
                raise DataError(f"{path}:1: expected {task}'s header line naming columns {', '.join(spec['header'])}, "
                                f"got {line[:60]!r}. Use the official GLUE file, header included")
            continue
        if not line.strip():
            continue  # a blank line (usually the last) carries no example
        if len(cols) not in spec["ncols"]:
            want = " or ".join(map(str, spec["ncols"]))
            raise DataError(f"{path}:{lineno}: expected {want} tab-separated columns for {task}, got "
                            f"{len(cols)}. Use the official GLUE TSV unchanged (a file re-saved by a "
                            f"spreadsheet or with csv quoting loses or adds tabs)")
        raw = cols[spec["label"]].strip()
        if spec["labels"] is None:
            try:
                y = float(raw)
            except ValueError:
                y = float("nan")
            if not math.isfinite(y):
                raise DataError(f"{path}:{lineno}: {task} score must be a finite number, got {raw!r}")
        elif raw in spec["labels"]:
            y = spec["labels"].index(raw)
        else:
            raise DataError(f"{path}:{lineno}: {task} label must be one of {list(spec['labels'])}, got {raw!r}")
        texts.append(tuple(cols[c] for c in spec["text"]))
        labels.append(y)
    if not texts:
        raise DataError(f"{path}: no examples; is this the right file for {task}?")
    return texts, labels


def load_data(cfg, train=True):
    """The task's train and dev examples: {"train": (texts, labels), "dev": {file: (texts, labels)}, ...}."""
    task, spec = cfg["task"], TASKS[cfg["task"]]
    if cfg["data_dir"]:
        folder = Path(cfg["data_dir"])
    else:
        cache = cfg["cache_dir"] or os.path.join(os.environ.get("UNILORA_CACHE", "~/.cache/unilora"), "glue")
        folder = fetch_glue(task, Path(cache).expanduser())
    for name in ("train.tsv",) * train + spec["dev"]:
        if not (folder / name).is_file():
            raise DataError(f"{folder / name} not found. --data_dir must be the {spec['folder']} folder of the "
                            f"GLUE data, holding train.tsv and {', '.join(spec['dev'])}")
    dev = {name: read_tsv(task, folder / name) for name in spec["dev"]}
    glue_dev_counts = all(len(dev[n][0]) == want for n, want in zip(spec["dev"], DEV_ROWS[task]))
    if not cfg["data_dir"]:
        check_dev_rows(task, folder, {n: t for n, (t, _) in dev.items()},
                       f"the cached copy is not GLUE's; delete {folder} to download it again, or pass --data_dir")
    elif not glue_dev_counts:
        print(f"note: {folder} is not GLUE's dev set ({', '.join(str(len(t)) for t, _ in dev.values())} examples, "
              f"GLUE: {', '.join(map(str, DEV_ROWS[task]))}); results are not comparable to the paper's")
    n = cfg["max_eval_samples"]
    dev = {name: (t[:n], y[:n]) for name, (t, y) in dev.items()}
    out = {"folder": str(folder), "dev": dev, "glue_dev_counts": glue_dev_counts}
    if train:
        texts, labels = read_tsv(task, folder / "train.tsv")
        n = cfg["max_train_samples"]
        out["train"] = (texts[:n], labels[:n])
    return out


# -----------------------------------------------------------------------------
# Metrics, in numpy so they can be checked against the textbook formulas. Undefined values (a constant
# prediction) are 0.0, as sklearn does for Matthews, so results.json stays valid JSON (no NaN).


def accuracy(pred, y):
    return float(np.mean(np.asarray(pred) == np.asarray(y)))


def f1_score(pred, y):
    """F1 of the positive class (label 1), as GLUE reports for MRPC and QQP."""
    pred, y = np.asarray(pred), np.asarray(y)
    tp = np.sum((pred == 1) & (y == 1))
    fp = np.sum((pred == 1) & (y != 1))
    fn = np.sum((pred != 1) & (y == 1))
    return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0


def matthews(pred, y):
    """Matthews correlation from the confusion matrix (the multiclass form; equals the binary one)."""
    pred, y = np.asarray(pred), np.asarray(y)
    k = int(max(pred.max(), y.max())) + 1
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (y, pred), 1)
    n, correct = conf.sum(), np.trace(conf)
    t, p = conf.sum(axis=1), conf.sum(axis=0)
    denom = math.sqrt((n * n - p @ p) * (n * n - t @ t))
    return float((correct * n - t @ p) / denom) if denom else 0.0


def pearson(a, b):
    a = np.asarray(a, dtype=np.float64) - np.mean(a)
    b = np.asarray(b, dtype=np.float64) - np.mean(b)
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b / denom) if denom else 0.0


def ranks(a):
    """1-based ranks, ties sharing their average rank (what Spearman needs)."""
    a = np.asarray(a, dtype=np.float64)
    order = np.argsort(a, kind="stable")
    s = a[order]
    first = np.r_[True, s[1:] != s[:-1]]  # start of each run of equal values
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(a)]
    out = np.empty(len(a))
    out[order] = ((starts + ends + 1) / 2)[np.cumsum(first) - 1]
    return out


def spearman(a, b):
    return pearson(ranks(a), ranks(b))


METRICS = {"accuracy": accuracy, "f1": f1_score, "matthews": matthews, "pearson": pearson, "spearman": spearman}

# -----------------------------------------------------------------------------
# Model: the encoder plus a task head shaped and named like the reference implementations', so the
# paper's head learning rates mean the same thing here.


class RobertaHead(nn.Module):
    """First token -> dropout -> dense -> tanh -> dropout -> out_proj (RobertaClassificationHead)."""

    def __init__(self, hidden, n_out, p):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(p)
        self.out_proj = nn.Linear(hidden, n_out)

    def forward(self, h):
        x = self.dropout(h[:, 0])
        x = self.dropout(torch.tanh(self.dense(x)))
        return self.out_proj(x)


class GlueModel(nn.Module):
    def __init__(self, encoder, n_out):
        super().__init__()
        self.encoder = encoder
        cfg = encoder.config
        hidden = cfg["hidden_size"]
        p = cfg.get("classifier_dropout")
        p = cfg.get("hidden_dropout_prob", 0.1) if p is None else p
        # BERT's head reads the pretrained pooler; RoBERTa's (and a BERT checkpoint saved without a pooler)
        # learns its own dense+tanh instead.
        self.use_pooler = "roberta" not in cfg.get("model_type", "") and encoder.pooler is not None
        if self.use_pooler:
            self.dropout = nn.Dropout(p)
            self.classifier = nn.Linear(hidden, n_out)
        else:
            self.classifier = RobertaHead(hidden, n_out, p)
        # The reference models initialise heads N(0, initializer_range), zero bias.
        std = cfg.get("initializer_range", 0.02)
        for m in self.classifier.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)

    def forward(self, input_ids, attention_mask, token_type_ids):
        h = self.encoder(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        if self.use_pooler:
            return self.classifier(self.dropout(self.encoder.pooler(h)))
        return self.classifier(h)


def batches(encoded, labels, index, size, pad_id, regression, device):
    """Yield padded batches of the examples at `index`, padded only to the longest in each batch."""
    for i in range(0, len(index), size):
        rows = [encoded[j] for j in index[i:i + size]]
        ids = pad([x for x, _ in rows], pad_id)
        types = pad([t for _, t in rows], 0)
        mask = pad([[1] * len(x) for x, _ in rows], 0)
        y = torch.tensor([labels[j] for j in index[i:i + size]], dtype=torch.float32 if regression else torch.long)
        yield ids.to(device), mask.to(device), types.to(device), y.to(device)


def loss_sum(out, y, regression):
    # Summed, not averaged: the caller divides by the examples in the whole (accumulated) batch, which is
    # exact even when micro-batches differ in size.
    if regression:
        return F.mse_loss(out.float().squeeze(-1), y, reduction="sum")
    return F.cross_entropy(out.float(), y, reduction="sum")


def autocast(cfg):
    device = torch.device(cfg["device"])
    return torch.autocast(device.type, dtype=torch.bfloat16) if cfg["bf16"] else nullcontext()


@torch.no_grad()
def evaluate(model, examples, cfg, pad_id, ranks):
    """Metrics and mean loss on one dev set; each copy scores its share, and every copy gets the whole set's."""
    encoded, labels = examples
    task = cfg["task"]
    regression = TASKS[task]["labels"] is None
    model.eval()
    # Length-sorted batches waste far less compute on padding; the metrics do not depend on order.
    index = sorted(range(len(encoded)), key=lambda j: len(encoded[j][0]))
    rows = []
    for ids, mask, types, _ in batches(encoded, labels, my_share(index, ranks), cfg["eval_batch_size"], pad_id,
                                       regression, cfg["device"]):
        with autocast(cfg):
            rows += model(ids, mask, types).float().cpu().tolist()
    model.train()
    out = torch.tensor(gather_shares(rows, ranks))  # the outputs of all examples, in `index` order
    y = torch.tensor([labels[j] for j in index], dtype=torch.float32 if regression else torch.long)
    pred = out.squeeze(-1) if regression else out.argmax(-1)
    result = {name: METRICS[name](pred.numpy(), y.numpy()) for name in TASKS[task]["metrics"]}
    result["loss"] = loss_sum(out, y, regression).item() / len(index)
    return result


def split_suffix(task, name):
    """'' for the dev file that picks the best epoch, '_mismatched' for MNLI's dev_mismatched.tsv."""
    return "" if name == TASKS[task]["dev"][0] else "_" + name.removeprefix("dev_").removesuffix(".tsv")


def evaluate_all(model, dev_sets, cfg, pad_id, ranks):
    """Metrics on every dev file of the task, in one flat dict (MNLI: accuracy, accuracy_mismatched, ...)."""
    out = {}
    for name, examples in dev_sets.items():
        scores = evaluate(model, examples, cfg, pad_id, ranks)
        out.update({k + split_suffix(cfg["task"], name): v for k, v in scores.items()})
    return out


def reported(task):
    """The paper's metric, per dev file: what the summary and the table report."""
    return [TASKS[task]["metrics"][0] + split_suffix(task, name) for name in TASKS[task]["dev"]]


# -----------------------------------------------------------------------------
# Settings: flags, then the recipe for this task and model size, then DEFAULTS.

CONFIG_KEYS = ("task", "model", "preset", "method", "d", "r", "signs", "projection", "alpha", "targets", "lr",
               "head_lr",
               "weight_decay", "epochs", "max_steps", "batch_size", "grad_accum", "eval_batch_size",
               "warmup_ratio", "grad_clip", "max_length", "max_train_samples", "max_eval_samples", "seed", "bf16",
               "device", "threads", "data_dir", "cache_dir")


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
    cfg.update({k: v for k, v in DEFAULTS.items() if cfg[k] is None})
    for key, methods in METHOD_KEYS.items():
        if method not in methods:
            cfg[key] = None  # record only what the method uses: no d for a LoRA run
    if cfg["batch_size"] % cfg["grad_accum"]:
        raise UserError(f"--batch_size {cfg['batch_size']} must be a multiple of --grad_accum {cfg['grad_accum']}")
    cfg["device"] = ranks.device  # under torchrun, cuda means this copy's GPU: cuda:LOCAL_RANK
    fit_max_length(cfg, model_config)
    return cfg, [k for k in from_recipe if method in METHOD_KEYS.get(k, (method,))]


def print_config(cfg, from_recipe, model_config):
    print(f"{cfg['task']} / {cfg['method']} on {cfg['model']}: preset {cfg['preset']} (config.json: "
          f"{model_config.get('num_hidden_layers')} layers, hidden {model_config.get('hidden_size')})")
    for key in CONFIG_KEYS:
        print(f"  {key:<18} {cfg[key]}" + ("   (recipe)" if key in from_recipe else ""))


# -----------------------------------------------------------------------------
# Model: the encoder plus the task head, with the adapter, new or read from a saved run.


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
        return local, load_config(local)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {name}: {e}") from None


def build_model(cfg, model_dir, load=None):
    """(model on its device, adapter or None): a fresh adapter, or the one saved in the run folder `load`."""
    try:
        encoder = Encoder.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--model {cfg['model']}: {e}") from None
    labels = TASKS[cfg["task"]]["labels"]
    model = GlueModel(encoder, 1 if labels is None else len(labels))
    targets = tuple(t.strip() for t in (cfg["targets"] or "").split(",") if t.strip())
    try:
        adapter = None
        projection = PROJECTIONS[cfg.get("projection") or "balanced"]  # runs saved before --projection: balanced
        if cfg["method"] == "unilora" and load:
            adapter = load_unilora(model, load / "adapter.pt", projection=projection)
        elif cfg["method"] == "unilora":
            adapter = apply_unilora(model, cfg["d"], r=cfg["r"], targets=targets, seed=cfg["seed"],
                                    signs=cfg["signs"], keep_trainable=("classifier",), projection=projection)
        elif cfg["method"] == "lora":
            adapter = apply_lora(model, r=cfg["r"], alpha=cfg["alpha"], targets=targets,
                                 keep_trainable=("classifier",))
            if load:
                adapter.load(load / "adapter.pt")
        else:
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith("classifier."))
        if load:
            model.classifier.load_state_dict(load_safetensors(load / "head.safetensors"))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        what = f"--load {load} does not fit --model {cfg['model']}" if load else "--d / --r / --targets / --projection"
        raise UserError(f"{what}: {' '.join(str(e).split())[:300]}") from None
    return model.to(cfg["device"]), adapter


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
    pad_id = tok.pad_id if tok.pad_id is not None else model_config.get("pad_token_id", 0)
    out = {**data, "dev": {name: encode(examples) for name, examples in data["dev"].items()}, "pad_id": pad_id}
    if "train" in data:
        out["train"] = encode(data["train"])
    return out


# -----------------------------------------------------------------------------
# Optimiser, training loop, saving


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


def make_optimizer(model, adapter, cfg, n_train):
    """AdamW with linear warmup then linear decay to zero; returns it, its schedule and the number of steps."""
    optimizer = torch.optim.AdamW(param_groups(model, adapter, cfg))
    total = cfg["max_steps"] or math.ceil(n_train / cfg["batch_size"]) * cfg["epochs"]
    warmup = math.ceil(cfg["warmup_ratio"] * total)

    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), total


def train_step(model, optimizer, scheduler, train_set, index, cfg, pad_id, step, ranks):
    """One optimiser step on the training examples at `index` (this copy: its share of them), in micro-batches of
    at most batch_size / grad_accum examples; returns the whole batch's mean loss."""
    encoded, labels = train_set
    regression = TASKS[cfg["task"]]["labels"] is None
    micro = cfg["batch_size"] // cfg["grad_accum"]
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    batch_loss = 0.0
    for ids, mask, types, y in batches(encoded, labels, my_share(index, ranks), micro, pad_id, regression,
                                       cfg["device"]):
        with autocast(cfg):
            out = model(ids, mask, types)
        loss = loss_sum(out, y, regression) / len(index)  # the whole batch's size, on every copy
        loss.backward()
        batch_loss += loss.item()
    sum_gradients(trainable, ranks)
    batch_loss = summed(batch_loss, ranks)
    check_finite(batch_loss, step)  # before the update, on every copy alike: nothing diverged is applied or saved
    if cfg["grad_clip"]:
        torch.nn.utils.clip_grad_norm_(trainable, cfg["grad_clip"])
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if torch.device(cfg["device"]).type == "cuda":
        torch.cuda.synchronize()  # so that the step's time is the step's
    return batch_loss


def fit(model, adapter, optimizer, scheduler, total_steps, train_set, dev_sets, cfg, pad_id, folder, ranks):
    """Train for total_steps, scoring the dev sets after every epoch (and at the last step) and saving the best
    epoch in folder/best. Returns (history, best, seconds of each optimiser step)."""
    metric = TASKS[cfg["task"]]["metrics"][0]
    n, batch_size = len(train_set[0]), cfg["batch_size"]
    order_rng = torch.Generator().manual_seed(cfg["seed"])  # the same order on every copy; not tied to dropout
    history, best, step_times = [], None, []
    model.train()
    # the bar is closed on errors too, so that messages start on a clean line
    with tqdm(total=total_steps, desc=f"{cfg['task']} {cfg['method']} seed {cfg['seed']}", dynamic_ncols=True,
              mininterval=0.5 if sys.stderr.isatty() else 30, disable=not ranks.main) as bar:
        for epoch in range(1, math.ceil(total_steps / math.ceil(n / batch_size)) + 1):
            perm = torch.randperm(n, generator=order_rng).tolist()
            epoch_loss, seen = 0.0, 0
            for b in range(0, n, batch_size):
                if len(step_times) == total_steps:
                    break
                index = perm[b:b + batch_size]
                t0 = time.perf_counter()
                loss = train_step(model, optimizer, scheduler, train_set, index, cfg, pad_id, len(step_times) + 1,
                                  ranks)
                step_times.append(time.perf_counter() - t0)
                epoch_loss, seen = epoch_loss + loss * len(index), seen + len(index)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)  # the bar redraws at its own pace

            dev = evaluate_all(model, dev_sets, cfg, pad_id, ranks)
            check_finite(dev["loss"], len(step_times))  # the last update can diverge after its own finite loss
            history.append({"epoch": epoch, "step": len(step_times), "train_loss": epoch_loss / seen, "dev": dev})
            bar.write(f"epoch {epoch} step {len(step_times)}: train loss {epoch_loss / seen:.4f}, dev "
                      + ", ".join(f"{k} {v:.4f}" for k, v in dev.items()))
            if best is None or dev[metric] > best["dev"][metric]:
                best = history[-1]
                if ranks.main:
                    save_model(folder / "best", cfg, model, adapter)
    return history, best, step_times


def save_model(folder, cfg, model, adapter):
    """run.json (what --eval_only rebuilds from), the adapter and the head."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "run.json", cfg)
    if adapter is not None:
        adapter.save(folder / "adapter.pt", overwrite=True)
    save_safetensors({k: v.detach().float().cpu().contiguous() for k, v in model.classifier.state_dict().items()},
                     folder / "head.safetensors")


def projection_cost(adapter, repeats=20):
    """P theta_d forward + backward, median milliseconds (once per forward pass), and the bytes P is stored in."""
    if not hasattr(adapter, "project"):
        return {}
    times = []
    for _ in range(repeats):
        if adapter.theta_d.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        adapter.project().sum().backward()
        if adapter.theta_d.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    adapter.theta_d.grad = None
    stored = sum(b.numel() * b.element_size() for b in adapter.shared.projection.buffers())
    return {"projection_ms": round(1000 * statistics.median(times), 3), "projection_bytes": stored}


def peak_memory_mb():
    """Peak resident memory of this process (and peak CUDA memory when used), in MiB."""
    import resource  # Unix only; imported here so that the rest of the script runs anywhere
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_mb": round(rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10), 1)}  # bytes on macOS
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated():
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return out


def train_run(cfg, from_recipe, data, model_dir, folder, ranks):
    """One run of cfg into folder: model, optimiser, train (with dev scores each epoch), save."""
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    model, adapter = build_model(cfg, model_dir)
    # Dropout after the (identical) initialisation: the other copies draw their own masks, as one process draws new
    # ones for every row, not rank 0's again; rank 0 keeps the seed's stream, so a plain run is unchanged.
    if ranks.rank:
        torch.manual_seed(1_000_003 * ranks.rank + cfg["seed"])
    train_set, dev_sets, pad_id = data["train"], data["dev"], data["pad_id"]
    counts = dict(adapter.counts()) if adapter is not None else {"d": 0, "D": 0}
    counts = {"d": counts["d"], "D": counts["D"], "head": sum(p.numel() for p in model.classifier.parameters())}
    print(f"{cfg['task']} seed {cfg['seed']}: {len(train_set[0])} train / "
          f"{' + '.join(str(len(e)) for e, _ in dev_sets.values())} dev examples; {cfg['method']}: d {counts['d']:,} "
          f"(D {counts['D']:,}), head {counts['head']:,} trainable")

    optimizer, scheduler, total_steps = make_optimizer(model, adapter, cfg, len(train_set[0]))
    copy_from_main([p for g in optimizer.param_groups for p in g["params"]], ranks)
    t0 = time.time()
    history, best, step_times = fit(model, adapter, optimizer, scheduler, total_steps, train_set, dev_sets, cfg,
                                    pad_id, folder, ranks)

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
    print(f"best {metric} {best['dev'][metric]:.4f} at epoch {best['epoch']}; {len(step_times)} steps, "
          f"{results['seconds_per_step_median']:.3f} s/step")
    return results


def stats(values):
    return {"values": values, "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "median": statistics.median(values)}


def summarize(runs):
    """Per task: the best-epoch dev metric of every seed, its mean, sample std and median, the best epochs."""
    task = runs[0]["config"]["task"]
    out = {"task": task, "metric": TASKS[task]["metrics"][0], "seeds": [r["config"]["seed"] for r in runs],
           "best_epoch": {str(r["config"]["seed"]): r["best"]["epoch"] for r in runs}}
    out.update({key: stats([r["best"]["dev"][key] for r in runs]) for key in reported(task)})
    return out


# -----------------------------------------------------------------------------
# Table 1 from run folders. Runs whose settings differ only by seed (or by where things lived, or by the
# per-task recipe values) form one row; every other recorded setting is part of the row's identity, so a new
# setting (e.g. a future --projection) separates rows and becomes a column as soon as it varies.

NOT_SETTINGS = ("task", "seed", "device", "threads", "data_dir", "cache_dir", "eval_batch_size")
METHOD_NAMES = {"unilora": "Uni-LoRA", "lora": "LoRA", "head": "head only"}


def collect_runs(paths):
    runs, seen = [], set()
    for path in map(Path, paths):
        if not path.exists():
            raise UserError(f"--table {path}: no such file or folder")
        for file in [path] if path.is_file() else sorted(path.rglob("results.json")):
            if file.resolve() in seen or any(part.endswith(".partial") for part in file.parts):
                continue
            seen.add(file.resolve())
            try:
                results = json.loads(file.read_text())
            except (OSError, ValueError) as e:
                raise UserError(f"--table: {file} is not a readable results.json ({e})") from None
            # a GLUE training run: eval-N/ holds scores only, and other scripts' runs have other tasks
            if not isinstance(results, dict) or "best" not in results or results.get("kind") == "eval" \
                    or results.get("config", {}).get("task") not in TASKS:
                continue
            if not {"from_recipe", "trainable"} <= results.keys():
                raise UserError(f"--table: {file} was written by an older train_glue.py; run it again with "
                                f"this version (or leave its folder out)")
            runs.append(results)
    if not runs:
        raise UserError(f"--table: no training run (results.json) under {', '.join(map(str, paths))}")
    return runs


def cell(runs, task):
    """'mean ± std (n)' in percent over the runs' best epochs; MNLI: matched / mismatched."""
    parts = []
    for key in reported(task):
        s = stats([100 * r["best"]["dev"][key] for r in runs])
        parts.append(f"{s['mean']:.1f}" + (f" ± {s['std']:.1f}" if len(runs) > 1 else ""))
    return " / ".join(parts) + f" ({len(runs)})"


# What a row costs (columns shown when the runs recorded them), as medians over its runs: time per optimiser step, P theta_d forward + backward per forward
# pass, the bytes P is stored in, and the process's peak resident memory.
COST_COLUMNS = (("s/step", "seconds_per_step_median"), ("P ms", "projection_ms"), ("P bytes", "projection_bytes"),
                ("peak RSS MB", "peak_rss_mb"))


def cost(runs, key):
    values = [r[key] for r in runs if r.get(key) is not None]
    if not values:
        return "-"
    median = statistics.median(values)
    return f"{round(median):,}" if all(isinstance(v, int) for v in values) else f"{median:.4g}"


def make_table(paths):
    rows, runs = {}, collect_runs(paths)  # settings -> task -> runs
    costs = [(label, key) for label, key in COST_COLUMNS if any(r.get(key) is not None for r in runs)]
    for r in runs:
        settings = tuple(sorted((k, json.dumps(v)) for k, v in r["config"].items()
                                if k not in NOT_SETTINGS and k not in r.get("from_recipe", ())))
        rows.setdefault(settings, {}).setdefault(r["config"]["task"], []).append(r)
    tasks = [t for t in TASKS if any(t in by_task for by_task in rows.values())]
    names = sorted({k for settings in rows for k, _ in settings} - {"model", "method"})
    varying = [k for k in names if len({dict(s).get(k) for s in rows}) > 1]
    with_avg = all(t in tasks for t in PAPER_TASKS)
    header = ["model", "method", *varying, "params", *(TASKS[t]["folder"] for t in tasks)] + ["avg"] * with_avg + \
        [label for label, _ in costs]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    def shown(settings, key):
        value = json.loads(dict(settings).get(key, "null"))
        return "-" if value is None else str(value)

    order = sorted(rows, key=lambda s: (shown(s, "model"), shown(s, "method") != "unilora",
                                        [shown(s, k) for k in varying]))
    for i, settings in enumerate(order):
        by_task, s = rows[settings], {k: json.loads(v) for k, v in settings}
        any_run = next(iter(by_task.values()))[0]
        cells = [cell(by_task[t], t) if t in by_task else "-" for t in tasks]
        means = [statistics.mean(100 * r["best"]["dev"][reported(t)[0]] for r in by_task[t])
                 for t in PAPER_TASKS if t in by_task]
        avg = [f"{statistics.mean(means):.1f}" if len(means) == len(PAPER_TASKS) else "-"] * with_avg
        every_run = [r for runs in by_task.values() for r in runs]
        lines.append("| " + " | ".join([s["model"], METHOD_NAMES[s["method"]], *(shown(settings, k) for k in varying),
                                        f"{any_run['trainable']['d'] / 1e6:.3g}M", *cells, *avg,
                                        *(cost(every_run, key) for _, key in costs)]) + " |")
        paper = PAPER.get(s["model"].lower().removeprefix("facebookai/"))
        last_of_model = i + 1 == len(order) or dict(order[i + 1])["model"] != dict(settings)["model"]
        if paper and last_of_model and any(t in paper for t in tasks):
            lines.append("| " + " | ".join([s["model"], "Uni-LoRA (paper, no signs)", *("-" for _ in varying),
                                            "0.023M", *(str(paper.get(t, "-")) for t in tasks),
                                            *[str(paper["avg"])] * with_avg, *("-" for _ in costs)]) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Command line


def seed_list(text):
    seeds = [nonnegative_int(s) for s in text.split(",")]
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r} repeats a seed")
    return seeds


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
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
                   help="Uni-LoRA: random +-1 per row of P (default on; --no-signs: as published)")
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
    p.add_argument("--seed", type=nonnegative_int, help=f"default {d['seed']}, as the official scripts")
    p.add_argument("--seeds", type=seed_list, help="e.g. 1,2,3,4,5: one run per seed in DIR/seed-N + summary.json")
    p.add_argument("--device", type=device_name, help="auto | cpu | cuda | cuda:N (default: cuda if present, else cpu)")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast (default off: fp32)")
    p.add_argument("--eval_only", action="store_true", help="score the run saved in --load")
    p.add_argument("--load", help="a run folder written by this script (or its best/)")
    p.add_argument("--table", nargs="+", metavar="DIR", help="print Table 1 from the runs under these folders")
    args = p.parse_args(argv)
    given = [k for k, v in vars(args).items() if v not in (None, False)]
    if args.table and given != ["table"]:
        p.error("--table takes only folders")
    if args.eval_only != bool(args.load):
        p.error("--eval_only and --load DIR go together: DIR is the run folder to score")
    if args.eval_only:
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


def read_saved_run(load):
    path = Path(load) / "run.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--load {load}: {path} is not readable ({e.__class__.__name__}); --load must be a run "
                        f"folder written by train_glue.py, or its best/") from None


def evaluate_saved(args, ranks):
    """--eval_only: rebuild the run in --load from its run.json (flags override), score it, write eval-N/."""
    load = Path(args.load)
    cfg = read_saved_run(load)
    if args.task and args.task != cfg["task"]:
        raise UserError(f"--task {args.task}, but {load} was trained on {cfg['task']}")
    cfg.update({k: getattr(args, k) for k in EVAL_KEYS if getattr(args, k) is not None})
    cfg["device"] = ranks.device
    dest = Path(args.output_dir or new_eval_dir(load))
    if dest.resolve() in (load.resolve(), *load.resolve().parents):  # --overwrite would replace the run itself
        raise UserError(f"--output_dir {dest} holds the run that --load reads; leave --output_dir out to write "
                        f"{new_eval_dir(load)}")
    with staged(dest, args.overwrite, ranks) as stage:
        model_dir, model_config = main_first(ranks, lambda: fetch_model(cfg["model"]))
        fit_max_length(cfg, model_config)
        data = tokenize(main_first(ranks, lambda: load_data(cfg, train=False)), model_dir, model_config, cfg, ranks)
        model, _ = build_model(cfg, model_dir, load=load)
        dev = evaluate_all(model, data["dev"], cfg, data["pad_id"], ranks)
        counts = {name: len(e) for name, (e, _) in data["dev"].items()}
        if ranks.main:
            write_json(stage / "results.json", {"kind": "eval", "load": str(load), "config": cfg, "dev": dev,
                                                "world_size": ranks.world,
                                                "data": {"folder": data["folder"], "dev_examples": counts,
                                                         "glue_dev_counts": data["glue_dev_counts"]}})
    print(f"{cfg['task']} {load}: " + ", ".join(f"{k} {v:.4f}" for k, v in dev.items()) + " on "
          + ", ".join(f"{n} {name}" for name, n in counts.items()) + f" examples; saved to {dest}")
    return dev


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
            results = summarize(runs)
            if ranks.main:
                write_json(stage / "summary.json", results)
            for key in reported(cfg["task"]):
                s = results[key]
                print(f"{key} over seeds {args.seeds}: mean {s['mean']:.4f}, std {s['std']:.4f}, "
                      f"median {s['median']:.4f}")
    print(f"saved to {out}")
    return results


def main(argv=None):
    # Under torchrun every copy runs all of this, and all but rank 0 print nothing: the same lines N times would
    # bury the run's. Their tracebacks (a failure of that copy alone) still reach stderr.
    quiet = os.environ.get("RANK", "0") != "0"
    with open(os.devnull, "w") as null, redirect_stdout(null) if quiet else nullcontext():
        with redirect_stderr(null) if quiet else nullcontext():
            args = parse_args(argv)  # argparse's messages go to stderr; every copy checks the flags alike
        try:
            if args.table:
                return print(make_table(args.table))
            if args.threads:
                torch.set_num_threads(args.threads)
            try:
                ranks = start_data_parallel(args.device)  # a plain `python` run: nothing distributed
            except ValueError as e:  # no CUDA device
                raise UserError(str(e)) from None
            with data_parallel_until_done(ranks):
                return evaluate_saved(args, ranks) if args.eval_only else train(args, ranks)
        except (UserError, NonFiniteLoss) as e:  # raised on every copy alike, or (main_first) on rank 0 alone
            raise SystemExit(1 if quiet else f"error: {e}") from None


if __name__ == "__main__":
    # A job scheduler's time limit sends SIGTERM: leave through the same clean-up as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated; the output folder was left as it was before"))
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; the output folder was left as it was before")
