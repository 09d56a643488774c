"""
Fine-tune a BERT/RoBERTa encoder on one GLUE task with Uni-LoRA, end to end.

Why this file exists: it is the paper's GLUE experiment as one readable script. By default it does what
the paper did (RoBERTa-base, query and value adapted, r = 4, d = 23,040, the per-task learning rates and
epochs of the official scripts, dev evaluation every epoch). It is also the harness for fair baselines:
--method lora (plain LoRA) and --method head (the classification head alone) run through the very same
data, head, optimiser, schedule and evaluation code, so the only difference is the adapter.

    python train_glue.py --task sst2 --d 23040                 # the paper's recipe for SST-2
    python train_glue.py --task mrpc --method lora             # LoRA baseline, same everything else
    python train_glue.py --task cola --no-signs                # Uni-LoRA as published (no random signs)
    python train_glue.py --eval_only --load out/glue-sst2-unilora   # evaluate a saved run

Data. Tasks: sst2 cola mrpc qnli rte stsb mnli qqp. --data_dir points at ONE task folder in the layout of
the official GLUE download (the same folder names the original download script produced):
    SST-2/{train,dev}.tsv  sentence<TAB>label, header
    CoLA/{train,dev}.tsv   source<TAB>label<TAB>mark<TAB>sentence, NO header
    MRPC/{train,dev}.tsv   Quality<TAB>#1 ID<TAB>#2 ID<TAB>#1 String<TAB>#2 String, header
    QNLI/{train,dev}.tsv   index<TAB>question<TAB>sentence<TAB>label (entailment / not_entailment), header
    RTE/{train,dev}.tsv    index<TAB>sentence1<TAB>sentence2<TAB>label (entailment / not_entailment), header
    STS-B/{train,dev}.tsv  10 columns, sentence1 = column 8, sentence2 = column 9, score (float) last, header
    MNLI/{train,dev_matched}.tsv  sentence1/sentence2 = columns 9/10, gold label last, header
    QQP/{train,dev}.tsv    id<TAB>qid1<TAB>qid2<TAB>question1<TAB>question2<TAB>is_duplicate, header
Without --data_dir the task is downloaded once from the GLUE mirror (dl.fbaipublicfiles.com) into
--cache_dir (default $UNILORA_CACHE/glue, else ~/.cache/unilora/glue). MRPC is rebuilt the way the GLUE
script did it: the SentEval copy of the MSR corpus, split into train/dev by the official dev ids.

Model. --model is a hub id (default FacebookAI/roberta-base) or a local folder (config.json, weights,
tokenizer.json). RoBERTa-family models get RoBERTa's head (first token -> dense -> tanh -> out_proj, as
`classifier.dense` / `classifier.out_proj`); BERT-family models get BERT's (the checkpoint's pooler, frozen,
then `classifier`). The head is randomly initialised and trained fully with its own lr and weight decay.
Model names containing "large" get the large-model presets (per-task lrs and epochs, max length 128).
Two choices are ours, not the doc's: head weight decay 0.01 (the doc gives none), and gradient clipping
at norm 1.0 (Hugging Face Trainer's default). --weight_decay 0 / --grad_clip 0 turn them off.

Outputs in --output_dir (default out/glue-<task>-<method>):
    results.json      config, dev metrics per epoch, best epoch, trainable counts (d, D, head), wall time
    config.json       what --eval_only needs to rebuild the model
    adapter.pt        the adapter after the last step (Uni-LoRA: theta_d + its config; LoRA: A and B)
    head.safetensors  the classification head after the last step
    best/             the same three files at the best epoch
--eval_only --load DIR evaluates DIR (the last step) or DIR/best.
"""

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
import zipfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from pretrained import Encoder, Tokenizer, download, load_safetensors, pad, resolve, save_safetensors
from unilora import apply_lora, apply_unilora, load_unilora


# -----------------------------------------------------------------------------
# Tasks: how each official TSV is laid out, and how each task is scored.
# Columns are 0-based. labels=None means regression. The first metric is the one the paper reports
# and the one that picks the best epoch.

TASKS = {
    "sst2": dict(folder="SST-2", dev="dev.tsv", header=True, ncols=(2,), text=(0,), label=1,
                 labels=("0", "1"), metrics=("accuracy",)),
    "cola": dict(folder="CoLA", dev="dev.tsv", header=False, ncols=(4,), text=(3,), label=1,
                 labels=("0", "1"), metrics=("matthews",)),
    "mrpc": dict(folder="MRPC", dev="dev.tsv", header=True, ncols=(5,), text=(3, 4), label=0,
                 labels=("0", "1"), metrics=("accuracy", "f1")),
    "qnli": dict(folder="QNLI", dev="dev.tsv", header=True, ncols=(4,), text=(1, 2), label=3,
                 labels=("entailment", "not_entailment"), metrics=("accuracy",)),
    "rte": dict(folder="RTE", dev="dev.tsv", header=True, ncols=(4,), text=(1, 2), label=3,
                labels=("entailment", "not_entailment"), metrics=("accuracy",)),
    "stsb": dict(folder="STS-B", dev="dev.tsv", header=True, ncols=(10,), text=(7, 8), label=9,
                 labels=None, metrics=("pearson", "spearman")),
    # MNLI train rows have 12 columns, dev rows 16 (five annotator labels); the gold label is always last.
    "mnli": dict(folder="MNLI", dev="dev_matched.tsv", header=True, ncols=(12, 16), text=(8, 9), label=-1,
                 labels=("contradiction", "entailment", "neutral"), metrics=("accuracy",)),
    "qqp": dict(folder="QQP", dev="dev.tsv", header=True, ncols=(6,), text=(3, 4), label=5,
                labels=("0", "1"), metrics=("accuracy", "f1")),
}

# The paper's recipe (official scripts), see docs/uni-lora.md: (head lr, epochs) for RoBERTa-base with
# theta_d lr 5e-3, and (head lr, theta_d lr, epochs) for RoBERTa-large. MNLI/QQP are not in the paper;
# their values are our guess from the neighbouring tasks (QNLI), so say so when reporting them.
BASE_RECIPE = {"sst2": (1e-4, 60), "mrpc": (2e-2, 30), "cola": (5e-3, 80), "qnli": (2e-4, 25),
               "rte": (5e-4, 160), "stsb": (2e-4, 80), "mnli": (2e-4, 25), "qqp": (2e-4, 25)}
LARGE_RECIPE = {"sst2": (2e-4, 1e-3, 20), "mrpc": (2e-3, 5e-3, 40), "cola": (2e-2, 5e-3, 40),
                "qnli": (5e-3, 5e-3, 20), "rte": (5e-3, 5e-3, 40), "stsb": (2e-4, 5e-3, 40),
                "mnli": (5e-3, 5e-3, 20), "qqp": (5e-3, 5e-3, 20)}
# The doc gives no LoRA recipe; 4e-4 is the LoRA paper's RoBERTa-base lr for most GLUE tasks.
LORA_LR = 4e-4

GLUE_URL = "https://dl.fbaipublicfiles.com/glue/data/"
GLUE_ZIPS = {"sst2": "SST-2.zip", "cola": "CoLA.zip", "qnli": "QNLIv2.zip", "rte": "RTE.zip",
             "stsb": "STS-B.zip", "mnli": "MNLI.zip", "qqp": "QQP-clean.zip"}
# GLUE never hosted MRPC itself (licence); its script used SentEval's copy plus GLUE's own dev split.
MRPC_TRAIN_URL = "https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_train.txt"
MRPC_DEV_IDS_URL = "https://dl.fbaipublicfiles.com/glue/data/mrpc_dev_ids.tsv"

# -----------------------------------------------------------------------------
# Data


class DataError(ValueError):
    """A data file that is missing or not in the task's GLUE format; printed without a traceback."""


def fetch_glue(task, root):
    """Download one task into root/<folder> (once) and return that folder."""
    spec = TASKS[task]
    dest = Path(root) / spec["folder"]
    if (dest / "train.tsv").is_file() and (dest / spec["dev"]).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Build in a side folder and rename at the end, so an interrupted download never looks complete.
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if task == "mrpc":
        download(MRPC_TRAIN_URL, tmp / "msr_paraphrase_train.txt")
        download(MRPC_DEV_IDS_URL, tmp / "mrpc_dev_ids.tsv")
        split_mrpc(tmp / "msr_paraphrase_train.txt", tmp / "mrpc_dev_ids.tsv", tmp)
    else:
        archive = tmp / GLUE_ZIPS[task]
        download(GLUE_URL + GLUE_ZIPS[task], archive)
        with zipfile.ZipFile(archive) as z:
            # The archives hold one top-level folder whose name is not always the task's (QNLIv2.zip);
            # take whichever folder holds train.tsv.
            inner = sorted(n for n in z.namelist() if n.endswith("train.tsv"))
            if not inner:
                raise DataError(f"{archive} holds no train.tsv; the GLUE mirror changed. "
                                f"Download {task} by hand and pass --data_dir")
            prefix = inner[0][: -len("train.tsv")]
            for name in z.namelist():
                if name.startswith(prefix) and not name.endswith("/") and "/" not in name[len(prefix):]:
                    (tmp / name[len(prefix):]).write_bytes(z.read(name))
        archive.unlink()
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def split_mrpc(corpus, dev_ids, out):
    """Split the MSR paraphrase training file into GLUE's MRPC train.tsv / dev.tsv by the official dev ids."""
    with open(dev_ids, encoding="utf-8-sig") as f:
        dev = {tuple(line.rstrip("\r\n").split("\t")) for line in f if line.strip()}
    with open(corpus, encoding="utf-8-sig") as f:
        lines = [line.rstrip("\r\n") for line in f]
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


def read_tsv(task, path):
    """Parse one official GLUE TSV into (texts, labels); texts is a list of 1- or 2-tuples of str.

    GLUE files contain unbalanced quote characters, so rows are split on tabs only (the csv module's
    quoting would silently merge lines). Anything unexpected is an error naming the file and line.
    """
    spec = TASKS[task]
    texts, labels = [], []
    with open(path, encoding="utf-8-sig") as f:  # -sig: the MSR corpus (MRPC) starts with a BOM
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if spec["header"] and lineno == 1:
                continue
            if not line.strip():
                continue  # a blank line (usually the last) carries no example
            cols = line.split("\t")
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
                raise DataError(f"{path}:{lineno}: {task} label must be one of {list(spec['labels'])}, "
                                f"got {raw!r}")
            texts.append(tuple(cols[c] for c in spec["text"]))
            labels.append(y)
    if not texts:
        raise DataError(f"{path}: no examples; is this the right file for {task}?")
    return texts, labels


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


@torch.no_grad()
def evaluate(model, encoded, labels, task, batch_size, pad_id, device, amp):
    regression = TASKS[task]["labels"] is None
    model.eval()
    # Length-sorted batches waste far less compute on padding; the metrics do not depend on order.
    index = sorted(range(len(encoded)), key=lambda j: len(encoded[j][0]))
    outs, total = [], 0.0
    for ids, mask, types, y in batches(encoded, labels, index, batch_size, pad_id, regression, device):
        with amp():
            out = model(ids, mask, types)
        total += loss_sum(out, y, regression).item()
        outs.append(out.float().cpu())
    model.train()
    out = torch.cat(outs)
    pred = out.squeeze(-1).numpy() if regression else out.argmax(-1).numpy()
    y = np.asarray([labels[j] for j in index])
    result = {name: METRICS[name](pred, y) for name in TASKS[task]["metrics"]}
    result["loss"] = total / len(index)
    return result


def save_run(folder, config, model, adapter):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if adapter is not None:
        adapter.save(folder / "adapter.pt", overwrite=True)
    save_safetensors({k: v.detach().float().cpu().contiguous() for k, v in model.classifier.state_dict().items()},
                     folder / "head.safetensors")


# -----------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), help="GLUE task (required unless --eval_only)")
    parser.add_argument("--model", default="FacebookAI/roberta-base", help="hub id or local folder")
    parser.add_argument("--data_dir", help="folder with the task's train.tsv and dev.tsv (default: download)")
    parser.add_argument("--cache_dir", help="where downloaded GLUE tasks live (default ~/.cache/unilora/glue)")
    parser.add_argument("--output_dir", help="default out/glue-<task>-<method>")
    parser.add_argument("--method", choices=("unilora", "lora", "head"), default="unilora")
    parser.add_argument("--d", type=int, default=23040, help="Uni-LoRA: length of theta_d")
    parser.add_argument("--r", type=int, default=4, help="LoRA rank (both adapters)")
    parser.add_argument("--signs", action=argparse.BooleanOptionalAction, default=True,
                        help="Uni-LoRA: random +-1 per projection row (--no-signs: as published)")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA: scale alpha/r (default alpha = r)")
    parser.add_argument("--targets", default="query,value", help="comma-separated module-name suffixes to adapt")
    parser.add_argument("--lr", type=float, help="adapter lr (default: the recipe's theta_d lr; LoRA 4e-4)")
    parser.add_argument("--head_lr", type=float, help="head lr (default: the recipe's per-task value)")
    parser.add_argument("--weight_decay", type=float, default=0.01, help="head weight decay (adapter: none)")
    parser.add_argument("--epochs", type=int, help="default: the recipe's per-task value")
    parser.add_argument("--max_steps", type=int, default=0, help="stop after this many optimiser steps (0: off)")
    parser.add_argument("--batch_size", type=int, default=32, help="examples per optimiser step")
    parser.add_argument("--grad_accum", type=int, default=1, help="split each batch into this many micro-batches")
    parser.add_argument("--eval_batch_size", type=int, default=64)
    parser.add_argument("--warmup_ratio", type=float, default=0.06)
    parser.add_argument("--grad_clip", type=float, default=1.0, help="max grad norm over all trainable (0: off)")
    parser.add_argument("--max_length", type=int, help="tokens per example (default 512 base / 128 large)")
    parser.add_argument("--max_train_samples", type=int, default=0, help="use the first N training examples")
    parser.add_argument("--max_eval_samples", type=int, default=0, help="use the first N dev examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no_amp", action="store_true", help="no bf16 autocast on CUDA")
    parser.add_argument("--eval_only", action="store_true", help="evaluate the run saved in --load")
    parser.add_argument("--load", help="a run folder (or its best/) written by this script")
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in --output_dir")
    args = parser.parse_args(argv)

    # ---- what to build: from the command line, or for --eval_only from the saved run
    if args.eval_only:
        if not args.load:
            parser.error("--eval_only needs --load DIR (a folder written by a training run)")
        saved_path = Path(args.load) / "config.json"
        if not saved_path.is_file():
            parser.error(f"{saved_path} not found; --load must be a training run's output folder or its best/")
        saved = json.loads(saved_path.read_text())
        if args.task and args.task != saved["task"]:
            parser.error(f"--task {args.task} but {args.load} was trained on {saved['task']}")
        for key in ("task", "model", "method", "d", "r", "signs", "alpha", "targets", "max_length"):
            setattr(args, key, saved[key])
    elif not args.task:
        parser.error("--task is required")
    spec = TASKS[args.task]
    regression = spec["labels"] is None
    large = "large" in str(args.model).lower()
    if large:
        head_lr, theta_lr, epochs = LARGE_RECIPE[args.task]
    else:
        (head_lr, epochs), theta_lr = BASE_RECIPE[args.task], 5e-3
    args.head_lr = args.head_lr if args.head_lr is not None else head_lr
    args.lr = args.lr if args.lr is not None else (LORA_LR if args.method == "lora" else theta_lr)
    args.epochs = args.epochs or epochs
    args.max_length = args.max_length or (128 if large else 512)
    args.output_dir = args.output_dir or (None if args.eval_only else f"out/glue-{args.task}-{args.method}")
    if not args.eval_only and (Path(args.output_dir) / "results.json").exists() and not args.overwrite:
        parser.error(f"{args.output_dir} already holds a run; pass --overwrite to replace it, or another --output_dir")
    # Record only what the method uses, so results.json never shows e.g. a d for a LoRA run.
    if args.method != "unilora":
        args.d = args.signs = None
    if args.method == "head":
        args.lr = args.r = args.alpha = None
    if args.batch_size % args.grad_accum:
        parser.error(f"--batch_size {args.batch_size} must be a multiple of --grad_accum {args.grad_accum}")
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    use_amp = device.type == "cuda" and not args.no_amp

    def amp():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else nullcontext()

    # ---- data
    if args.data_dir:
        data_dir = Path(args.data_dir)
    else:
        cache = args.cache_dir or os.path.join(os.environ.get("UNILORA_CACHE", "~/.cache/unilora"), "glue")
        data_dir = fetch_glue(args.task, Path(cache).expanduser())
    for name in ("train.tsv", spec["dev"]):
        if not (data_dir / name).is_file():
            raise DataError(f"{data_dir / name} not found. --data_dir must be the {spec['folder']} folder of "
                            f"the GLUE data, holding train.tsv and {spec['dev']}")
    dev_texts, dev_labels = read_tsv(args.task, data_dir / spec["dev"])
    if args.max_eval_samples:
        dev_texts, dev_labels = dev_texts[:args.max_eval_samples], dev_labels[:args.max_eval_samples]
    if not args.eval_only:
        train_texts, train_labels = read_tsv(args.task, data_dir / "train.tsv")
        if args.max_train_samples:
            train_texts, train_labels = train_texts[:args.max_train_samples], train_labels[:args.max_train_samples]

    # ---- model and tokenizer
    model_dir = resolve(args.model)  # a hub id is downloaded once and then read from the cache
    encoder = Encoder.from_pretrained(model_dir)
    tok = Tokenizer.from_pretrained(model_dir)
    # roberta-base ships no special_tokens_map.json, so the tokenizer may not know its pad token; the model
    # config does (and RoBERTa's position ids are computed from exactly that id).
    pad_id = tok.pad_id if tok.pad_id is not None else encoder.config.get("pad_token_id", 0)
    limit = encoder.config.get("max_position_embeddings", 512)
    if "roberta" in encoder.config.get("model_type", ""):
        limit -= 2  # RoBERTa's positions start after the padding index
    if args.max_length > limit:
        print(f"note: --max_length {args.max_length} is more than {args.model} supports; using {limit}")
        args.max_length = limit

    def encode(texts):
        out = []
        for t in tqdm(texts, desc="tokenize", leave=False, disable=len(texts) < 20000):
            e = tok.encode(t[0], t[1] if len(t) > 1 else None, max_length=args.max_length)
            out.append((e.ids, e.type_ids))
        return out

    dev_enc = encode(dev_texts)
    model = GlueModel(encoder, 1 if regression else len(spec["labels"]))

    if args.method == "unilora" and args.eval_only:
        adapter = load_unilora(model, Path(args.load) / "adapter.pt")
    elif args.method == "unilora":
        adapter = apply_unilora(model, args.d, r=args.r, targets=targets, seed=args.seed, signs=args.signs,
                                keep_trainable=("classifier",))
    elif args.method == "lora":
        adapter = apply_lora(model, r=args.r, alpha=args.alpha, targets=targets, keep_trainable=("classifier",))
        if args.eval_only:
            adapter.load(Path(args.load) / "adapter.pt")
    else:
        adapter = None
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("classifier."))
    model.to(device)
    config = {k: v for k, v in vars(args).items() if k not in ("eval_only", "load")}

    if args.eval_only:
        model.classifier.load_state_dict(load_safetensors(Path(args.load) / "head.safetensors"))
        metrics = evaluate(model, dev_enc, dev_labels, args.task, args.eval_batch_size, pad_id, device, amp)
        print(json.dumps({"task": args.task, "load": str(args.load), "dev": metrics}))
        if args.output_dir:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.output_dir) / "eval.json").write_text(json.dumps({"config": config, "dev": metrics}, indent=2))
        return metrics

    train_enc = encode(train_texts)
    head_params = list(model.classifier.parameters())
    counts = dict(adapter.counts()) if adapter is not None else {"d": 0, "D": 0}
    counts["head"] = sum(p.numel() for p in head_params)
    print(f"{args.task}: {len(train_enc)} train / {len(dev_enc)} dev examples; {args.method}: "
          f"d {counts['d']:,} (D {counts['D']:,}), head {counts['head']:,} trainable")

    # ---- optimiser and schedule: two groups, the adapter without weight decay, the head with it
    groups = [{"params": head_params, "lr": args.head_lr, "weight_decay": args.weight_decay}]
    if adapter is not None:
        groups.insert(0, {"params": list(adapter.parameters()), "lr": args.lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    steps_per_epoch = math.ceil(len(train_enc) / args.batch_size)
    total_steps = args.max_steps or steps_per_epoch * args.epochs
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    warmup = math.ceil(args.warmup_ratio * total_steps)

    def schedule(step):  # linear warmup, then linear decay to zero at total_steps
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    trainable = [p for g in groups for p in g["params"]]

    # ---- train
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    history, best = [], None
    order_rng = torch.Generator().manual_seed(args.seed)  # data order independent of dropout/init draws
    micro = args.batch_size // args.grad_accum
    step, t0 = 0, time.time()
    model.train()
    bar = tqdm(total=total_steps, desc=f"{args.task} {args.method}", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30)
    for epoch in range(1, n_epochs + 1):
        perm = torch.randperm(len(train_enc), generator=order_rng).tolist()
        epoch_loss, epoch_n = 0.0, 0
        for b in range(0, len(perm), args.batch_size):
            if step >= total_steps:
                break
            index = perm[b:b + args.batch_size]
            batch_loss = 0.0
            for ids, mask, types, y in batches(train_enc, train_labels, index, micro, pad_id, regression, device):
                with amp():
                    out = model(ids, mask, types)
                loss = loss_sum(out, y, regression) / len(index)
                loss.backward()
                batch_loss += loss.item()
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
            lr = scheduler.get_last_lr()[0]  # the lr this step uses (group 0: the adapter, else the head)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            epoch_loss, epoch_n = epoch_loss + batch_loss * len(index), epoch_n + len(index)
            bar.update(1)
            bar.set_postfix(loss=f"{batch_loss:.4f}", lr=f"{lr:.2e}", refresh=False)  # the bar redraws at its own pace

        metrics = evaluate(model, dev_enc, dev_labels, args.task, args.eval_batch_size, pad_id, device, amp)
        history.append({"epoch": epoch, "step": step, "train_loss": epoch_loss / max(1, epoch_n), "dev": metrics})
        main_metric = spec["metrics"][0]
        bar.write(f"epoch {epoch} step {step}: train loss {epoch_loss / max(1, epoch_n):.4f}, dev "
                  + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if best is None or metrics[main_metric] > best["dev"][main_metric]:
            best = history[-1]
            save_run(out_dir / "best", config, model, adapter)
        if step >= total_steps:
            break
    bar.close()

    wall = time.time() - t0
    save_run(out_dir, config, model, adapter)
    results = {"config": config, "epochs": history, "best": best, "last": history[-1], "trainable": counts,
               "steps": step, "wall_time_s": round(wall, 2)}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"best {main_metric} {best['dev'][main_metric]:.4f} at epoch {best['epoch']}; "
          f"{step} steps in {wall:.0f}s; saved to {out_dir}")
    return results


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
