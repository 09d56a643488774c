"""Fine-tune a causal LM on math word problems with Uni-LoRA, then score GSM8K or MATH the way the paper did.

This is the paper's second experiment (Uni-LoRA, NeurIPS 2025, Table 3) as one plain script: MetaMathQA
(question, worked solution) pairs under an Alpaca prompt, the loss on the response only, AdamW on the single
trainable vector theta_d with a cosine schedule; then the adapter is merged into the base weights (in fp32,
outside autocast), the test problems are decoded greedily and the answer after "The answer is: " is scored.

    python train_math.py                          # small recipe: SmolLM2-135M-Instruct, laptop-sized
    python train_math.py --recipe paper           # the paper's Gemma-7B recipe (a GPU; see the README)
    python train_math.py --eval_data math         # score the MATH test set instead of GSM8K
    python train_math.py --method lora            # plain-LoRA baseline through the same pipeline
    python train_math.py --method none            # the base model, no training
    python train_math.py --eval_only --load out/math-unilora   # evaluate a saved run again (into eval-N/)
    torchrun --nproc_per_node 8 -- train_math.py --recipe paper  # data parallel: 8 copies share each batch

--protocol official (the default) is the official code's protocol, point by point: training text = prompt +
response + EOS with no separator; evaluation prompt ending "### Response: Let's think step by step."; decoding
stops at "Instruction:", "Instruction", "Response:", "Response" or EOS, within 1,024 new tokens (MATH: 2,048);
GSM8K: the first number after the LAST "The answer is: ", round(float(...)) == reference; MATH: the text after
it equals the last \\boxed{...} of the reference solution after MetaMath's LaTeX normalisation. A lenient reading
is reported next to it under its own name. --protocol plain is this project's earlier protocol.

Needs only torch, numpy and tqdm (models, tokenizers and hub downloads come from pretrained.py, the adapters
from unilora.py). Outputs in --output_dir: run.json, train_log.jsonl, checkpoint.pt (--resume), adapter.pt,
results.json, predictions.jsonl.
"""
import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import pickle
import re
import sys
import time
import urllib.parse
from collections import defaultdict
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import unilora
from projections import PROJECTIONS
from pretrained.decoder import CausalLM, KVCache
from pretrained.files import atomic_write, finite_or_none, write_json
from pretrained.hub import download, hub_endpoint, hub_token, resolve
from pretrained.tokenizer import Tokenizer, pad
from recipes.training import (NonFiniteLoss, check_finite, copy_from_main, data_parallel_until_done, fraction,
                              gather_shares, main_first, my_share, new_eval_dir, nonnegative_float, nonnegative_int,
                              positive_float, positive_int, prepare_output_dir, start_data_parallel, sum_gradients,
                              summed)


class UserError(Exception):
    """A problem the user can fix (bad flag, bad data file); printed without a traceback."""


# ----------------------------------------------------------------------------------------------------------
# Recipes.  Every flag left unset on the command line takes its value from the chosen recipe, so the paper's
# setup is one flag away and any single value can still be overridden.

RECIPES = {
    # Runs on a laptop CPU.  SmolLM2-135M-Instruct is a LlamaForCausalLM, 135M parameters, Apache-2.0 and
    # ungated; its tokenizer splits every digit, which suits arithmetic.  D (r=4, all linear layers) is 1.22M;
    # d = 2^16 keeps d/D near the paper's Gemma-7B ratio (524,288 / 12.5M = 4.2%).
    "small": dict(
        model="HuggingFaceTB/SmolLM2-135M-Instruct", train_data="metamathqa", max_train_samples=2000,
        eval_data="gsm8k", max_eval_samples=200, template="alpaca", protocol="official", max_length=384,
        epochs=1, batch_size=16, micro_batch_size=4, d=65536, r=4, signs=True, warmup_ratio=0.02,
        eval_batch_size=16, save_every=25,
    ),
    # The official script: google/gemma-7b (the model of Table 3; --model mistralai/Mistral-7B-v0.1 for the
    # other one), all linear layers except lm_head, r=4, d=2^19, first 100K MetaMathQA examples, max length 512,
    # 2 epochs, effective batch 64, lr 2e-3, cosine, 2% warmup, no weight decay, the paper's P without signs.
    "paper": dict(
        model="google/gemma-7b", train_data="metamathqa", max_train_samples=100_000,
        eval_data="gsm8k", max_eval_samples="all", template="alpaca", protocol="official", max_length=512,
        epochs=2, batch_size=64, micro_batch_size=4, d=524_288, r=4, signs=False, warmup_ratio=0.02,
        eval_batch_size=32, save_every=200,
    ),
}
# Learning rates per method.  theta_d: the paper's 2e-3.  LoRA: Adam moves every coordinate by about lr per
# step; Uni-LoRA's LoRA entries are theta_d entries divided by sqrt(D/d) (about 4.3 small, 4.5 paper), so
# 2e-3 on theta_d is about 4.6e-4 per LoRA entry.  5e-4 gives plain LoRA the same per-entry step size.
DEFAULT_LR = {"unilora": 2e-3, "lora": 5e-4}

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{query}\n\n### Response:"
)
# What each protocol changes.  official: the Uni-LoRA repository's training script and its gsm8k_eval.py /
# MATH_eval.py (MetaMath's evaluation with vLLM).  plain: the prompt of training reused at evaluation, one space
# before the response, EOS as the only stop, and a fixed budget.
PROTOCOLS = {
    "official": dict(separator="", eval_suffix=" Let's think step by step.",
                     stop=("Instruction:", "Instruction", "Response:", "Response"),
                     max_new_tokens={"gsm8k": 1024, "math": 2048}),
    "plain": dict(separator=" ", eval_suffix="", stop=(), max_new_tokens={"gsm8k": 512, "math": 1024}),
}
METAMATHQA = ("meta-math/MetaMathQA", "MetaMathQA-395K.json")
GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{split}.jsonl"
# The file MetaMath's (and Uni-LoRA's) MATH evaluation reads: the 5,000 MATH test problems, instruction/output.
MATH_URL = "https://raw.githubusercontent.com/meta-math/MetaMath/main/data/test/MATH_test.jsonl"
PRECISION = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "float64": torch.float64}  # float64: for exact comparisons (tests), not for training
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Settings that must match for --resume to continue a run (eval settings, micro-batch size, --stop_after may
# change).  train_sha256 is the training file's content, n_train the examples it gave.
RESUME_KEYS = ("method", "model", "train_data", "train_sha256", "max_train_samples", "prompt_field",
               "response_field", "template", "system_prompt", "protocol", "max_length", "epochs", "max_steps",
               "batch_size", "lr", "warmup_ratio", "weight_decay", "grad_clip", "d", "r", "lora_alpha", "signs",
               "projection", "dropout", "seed", "dtype", "amp", "n_train")
# What --eval_only --load takes from the saved run (the model it was trained on, how it was prompted).
RUN_KEYS = ("method", "model", "template", "system_prompt", "protocol", "r", "lora_alpha", "projection")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage block; under torchrun from the first copy only
        self.exit(2, f"error: {message} (see --help)\n" if os.environ.get("RANK", "0") == "0" else None)


def count_or_all(text):
    return "all" if text == "all" else positive_int(text)


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES), default="small", help="defaults for unset flags (small)")
    p.add_argument("--method", choices=("unilora", "lora", "none"),
                   help="unilora (default), lora (baseline), none (evaluate the base model)")
    p.add_argument("--model", help="hub name or local folder (recipe)")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS),
                   help="official (default): the paper's training text, prompt, stops, budgets and scoring;\n"
                        "plain: the same prompt at training and test, stop at EOS only")
    # data
    p.add_argument("--train_data", help="metamathqa | gsm8k | path to .json/.jsonl | http(s) URL (recipe)")
    p.add_argument("--prompt_field", help="question field of --train_data (auto: query, question, instruction)")
    p.add_argument("--response_field", help="answer field of --train_data (auto: response, answer, output)")
    p.add_argument("--max_train_samples", type=count_or_all, help="use the first N training examples, or all")
    p.add_argument("--eval_data", help="gsm8k | math | path | URL: fields question/answer, query/response,\n"
                                       "problem/solution (MATH) or instruction/output (MetaMath's MATH_test)")
    p.add_argument("--max_eval_samples", type=count_or_all, help="evaluate the first N problems, or all (recipe)")
    p.add_argument("--data_dir", default=os.environ.get("UNILORA_DATA", str(Path.home() / ".cache/unilora/data")),
                   help="where downloaded data files are kept (env UNILORA_DATA)")
    p.add_argument("--template", choices=("alpaca", "chat"), help="prompt format (recipe: alpaca)")
    p.add_argument("--system_prompt", help="chat template only: replaces the template's default system message")
    p.add_argument("--max_length", type=positive_int, help="truncate prompt+response to this many tokens (recipe)")
    # optimisation
    p.add_argument("--epochs", type=positive_int, help="passes over the training data (recipe)")
    p.add_argument("--max_steps", type=positive_int, help="optimizer steps; overrides --epochs")
    p.add_argument("--stop_after", type=positive_int, help="exit after this many steps with a checkpoint")
    p.add_argument("--batch_size", type=positive_int, help="global batch size, whatever the number of copies (recipe)")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--micro_batch_size", type=positive_int, help="examples per forward of one copy (recipe)")
    split.add_argument("--grad_accum", type=positive_int, help="or: micro-batches per step (batch_size / grad_accum)")
    p.add_argument("--lr", type=positive_float, help=f"peak learning rate (default per method: {DEFAULT_LR})")
    p.add_argument("--warmup_ratio", type=fraction, help="fraction of steps of linear warmup (recipe)")
    p.add_argument("--weight_decay", type=nonnegative_float, default=0.0)
    p.add_argument("--grad_clip", type=nonnegative_float, default=1.0, help="max gradient norm; 0 = off")
    p.add_argument("--d", type=positive_int, help="Uni-LoRA: length of theta_d (recipe)")
    p.add_argument("--r", type=positive_int, help="LoRA rank of both methods (recipe: 4)")
    p.add_argument("--lora_alpha", type=positive_float, help="LoRA baseline scale alpha/r (default alpha = r)")
    p.add_argument("--signs", action=argparse.BooleanOptionalAction,
                   help="Uni-LoRA: random +-1 per row of P, or the paper's all-positive P (recipe: small on,\n"
                        "paper off)")
    p.add_argument("--projection", choices=list(PROJECTIONS),
                   help="Uni-LoRA: which P (projections.py; default balanced, the paper's; others are ablations)")
    p.add_argument("--dropout", type=fraction, default=0.0, help="adapter dropout on the layer input")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="projection, LoRA init and data order")
    # precision
    p.add_argument("--dtype", choices=("auto", *PRECISION), default="auto",
                   help="base weights: auto = bfloat16 on CUDA, float32 on CPU; the official run: float32")
    p.add_argument("--amp", choices=("auto", *AMP), default="auto",
                   help="autocast: auto = bf16 on CUDA (fp16 for float16 weights), none on CPU; the official\n"
                        "run: fp16 (with a gradient scaler)")
    # runs, checkpoints, evaluation
    p.add_argument("--output_dir", help="run folder (default out/math-<method>; --eval_only: <load>/eval-N)")
    p.add_argument("--out_dir", dest="output_dir", help=argparse.SUPPRESS)  # the earlier spelling
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --output_dir")
    p.add_argument("--save_every", type=positive_int, help="checkpoint every N steps (recipe)")
    p.add_argument("--resume", action="store_true", help="continue from <output_dir>/checkpoint.pt")
    p.add_argument("--eval_only", action="store_true", help="evaluate the run saved in --load")
    p.add_argument("--load", help="a run folder written by this script (with --eval_only)")
    p.add_argument("--adapter", help=argparse.SUPPRESS)  # earlier spelling: the adapter.pt inside a run folder
    p.add_argument("--no_eval", action="store_true", help="train only")
    p.add_argument("--max_new_tokens", type=positive_int,
                   help="generation budget per problem (protocol: official 1,024 GSM8K / 2,048 MATH)")
    p.add_argument("--eval_batch_size", type=positive_int,
                   help="problems decoded together by one copy, left-padded (recipe)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--hf_token", help="for gated models and hub data (default: $HF_TOKEN); sent to the hub only")
    args = p.parse_args(argv)
    explicit = {k for k in RUN_KEYS if getattr(args, k, None) is not None}
    if args.adapter:
        args.load = args.load or str(Path(args.adapter).parent)
    if args.load and not args.eval_only:
        raise UserError("--load is for --eval_only; to continue training a run use --resume --output_dir <run>")
    if args.eval_only:
        if not args.load:
            raise UserError("--eval_only needs --load <run folder>; to evaluate the base model use --method none")
        take_run_settings(args, explicit)
    args.method = args.method or "unilora"
    if args.projection and args.method != "unilora":
        raise UserError(f"--projection is Uni-LoRA's choice of P; --method {args.method} has none: drop it")
    if args.method == "unilora":
        args.projection = args.projection or "balanced"  # runs saved before --projection: balanced
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("max_train_samples", "max_eval_samples"):
        setattr(args, key, None if getattr(args, key) == "all" else getattr(args, key))
    if args.lr is None and args.method != "none":
        args.lr = DEFAULT_LR[args.method]
    args.train = not args.eval_only and args.method != "none"
    check_flag_combinations(args)
    return args


def take_run_settings(args, explicit):
    """--eval_only --load DIR: the model, method and prompt come from the run; a flag that contradicts it is an
    error rather than a silently different evaluation."""
    run_dir, config = Path(args.load), None
    try:
        if (run_dir / "run.json").is_file():
            config = json.loads((run_dir / "run.json").read_text())
        elif (run_dir / "results.json").is_file():  # runs written before run.json existed
            config = json.loads((run_dir / "results.json").read_text()).get("args")
    except (ValueError, AttributeError):
        config = None
    if not isinstance(config, dict) or not (run_dir / "adapter.pt").is_file() and config.get("method") != "none":
        raise UserError(f"--load {run_dir}: not a run folder of train_math.py (needs run.json and adapter.pt)")
    for key in RUN_KEYS:
        saved = config.get(key, "plain" if key == "protocol" else None)  # older runs: today's plain protocol
        if saved is None:
            continue
        if key in explicit and getattr(args, key) != saved:
            raise UserError(f"--{key} {getattr(args, key)} contradicts the run in --load ({key} {saved!r}); drop "
                            f"--{key}")
        setattr(args, key, saved)
    for key in ("eval_data", "max_eval_samples"):  # by default the run's own test problems again
        if getattr(args, key) is None and key in config:
            setattr(args, key, "all" if config[key] is None else config[key])


def check_flag_combinations(args):
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --output_dir and --overwrite would replace it; drop one")
    if args.resume and not args.train:
        raise UserError("--resume continues training; to evaluate a finished run use --eval_only --load <run>")
    if args.eval_only and args.no_eval:
        raise UserError("--eval_only with --no_eval does nothing; drop one of them")
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
    for flag, source in (("--train_data", args.train_data if args.train else None),
                         ("--eval_data", None if args.no_eval else args.eval_data)):
        named = source in (None, "metamathqa", "gsm8k", "math") or re.match(r"https?://", source)
        if not named and not Path(source).expanduser().is_file():
            raise UserError(f"data file {source} does not exist ({flag}); pass a .json/.jsonl path, a URL, or "
                            f"metamathqa / gsm8k / math to download")
    if args.train and args.projection in ("fastfood", "gaussian") and not args.signs:
        raise UserError(f"--projection {args.projection} has random signs by construction and the all-positive P "
                        f"(--no-signs, the paper recipe's default) does not apply; pass --signs")
    if args.protocol == "official" and args.template != "alpaca":
        raise UserError("--protocol official uses the Alpaca prompt of the official code; pass --template alpaca, "
                        "or --protocol plain to train with the chat template")


# ----------------------------------------------------------------------------------------------------------
# Data: read (question, solution) pairs, with errors that say which file and line is bad.

def fetch(source, split, data_dir, token):
    """Turn --train_data/--eval_data into a local file, downloading it once into data_dir.  The hub token goes
    to the hub endpoint only: GSM8K, MATH and other URLs never see it."""
    if source == "metamathqa":
        repo, name = METAMATHQA
        url = f"{hub_endpoint()}/datasets/{repo}/resolve/main/{name}"
        dest = Path(data_dir) / repo.replace("/", "--") / name
    elif source == "gsm8k":
        url, dest = GSM8K_URL.format(split=split), Path(data_dir) / "gsm8k" / f"{split}.jsonl"
    elif source == "math":
        url, dest = MATH_URL, Path(data_dir) / "math" / "MATH_test.jsonl"
    elif re.match(r"https?://", source):
        tag = hashlib.sha1(source.encode()).hexdigest()[:12]
        name = re.sub(r"[^\w.-]", "_", urllib.parse.urlsplit(source).path.rstrip("/").rsplit("/", 1)[-1])
        url, dest = source, Path(data_dir) / "urls" / tag / (name.strip(".") and name or "data")
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserError(f"data file {path} does not exist; pass a .json/.jsonl path, a URL, or "
                            f"metamathqa / gsm8k / math to download")
        return path
    if not dest.is_file():
        print(f"downloading {url} -> {dest}")
        try:
            download(url, dest, token=hub_token(token))  # download() sends it to the hub only
        except Exception as e:  # network, 404, auth: all need the same advice
            raise UserError(f"could not download {url} ({e}); without network, pass a local file instead "
                            f"(e.g. --eval_data ~/.cache/unilora-assets/gsm8k/test.jsonl)") from e
    return dest


def read_records(path):
    """A .json array (MetaMathQA ships one) or JSONL, UTF-8 with or without a BOM; [(where, dict)]."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 (byte {data[e.start]:#04x}); convert the file to UTF-8") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix the file or re-download it") from e
        records = [(f"{path} item {i}", item) for i, item in enumerate(items)]
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or delete that line") from e
    for where, rec in records:
        if not isinstance(rec, dict):
            raise UserError(f"{where}: expected a JSON object with question and answer fields, got "
                            f"{type(rec).__name__}")
    if not records:
        raise UserError(f"{path}: no records")
    return records


FIELD_PAIRS = (("query", "response"), ("question", "answer"), ("problem", "solution"), ("instruction", "output"))


def pick_fields(records, prompt_field, response_field, path):
    """Explicit fields win; otherwise recognise MetaMathQA, GSM8K, MATH or Alpaca/MetaMath-test field names."""
    keys = records[0][1].keys()
    if prompt_field is None or response_field is None:
        for q, a in FIELD_PAIRS:
            if q in keys and a in keys:
                prompt_field, response_field = prompt_field or q, response_field or a
                break
        else:
            raise UserError(f"{path}: cannot tell which fields hold the question and the answer (fields: "
                            f"{sorted(keys)}); pass --prompt_field and --response_field")
    return prompt_field, response_field


def get_pairs(records, prompt_field, response_field):
    pairs = []
    for where, rec in records:
        for field in (prompt_field, response_field):
            if not isinstance(rec.get(field), str):
                problem = "has no field" if field not in rec else "has a non-string field"
                raise UserError(f"{where}: {problem} {field!r} (fields: {sorted(rec)}); fix the line or pass "
                                f"--prompt_field/--response_field")
        pairs.append((rec[prompt_field], rec[response_field], where))
    return pairs


GSM8K_FINAL = re.compile(r"\n?####\s*(.+?)\s*$")
CALCULATOR = re.compile(r"<<[^<>]*>>")


def to_metamath_format(solution):
    """GSM8K solutions end with '#### n' and carry '<<2*3=6>>' calculator notes.  MetaMathQA (and therefore
    the evaluation) ends with 'The answer is: n'; converting makes training and evaluation agree, and dropping
    the notes keeps the model from spending its token budget on them."""
    m = GSM8K_FINAL.search(solution)
    if not m:
        return solution
    body = CALCULATOR.sub("", solution[:m.start()]).rstrip()
    return f"{body}\nThe answer is: {m.group(1)}"


# ----------------------------------------------------------------------------------------------------------
# Scoring, official: exactly the rules of the official gsm8k_eval.py / MATH_eval.py (MetaMath's evaluation).

ANSWER_MARK = "The answer is: "
OFFICIAL_NUMBER = re.compile(r"[-+]?\d*[.,/]?\d+")


def official_gsm8k_answer(completion):
    """The first number after the LAST 'The answer is: ', as round(float(...)); None if there is none.  The
    pattern allows one separator, so '1,234' is 1234 but '1,234,567' reads as 1234; 'a/b' is a fraction (b = 0
    gives a); round() is Python's, halves to even (2.5 -> 2)."""
    if ANSWER_MARK not in completion:
        return None
    m = OFFICIAL_NUMBER.search(completion.split(ANSWER_MARK)[-1].strip())
    if not m:
        return None
    token = m.group()
    numerator, _, denominator = token.partition("/")
    if denominator and not numerator.lstrip("+-").isdigit():  # '/5': the official code finds no number either
        return None
    try:
        if not denominator:
            value = float(token.replace(",", ""))
        elif int(denominator) == 0:  # the official code returns the numerator
            value = float(numerator)
        else:
            value = float(Fraction(int(numerator), int(denominator)))
    except (OverflowError, ValueError):  # thousands of digits: no answer (the official code would crash)
        return None
    return None if math.isinf(value) else round(value)


def gsm8k_reference(solution):
    """The number after the last '####' (GSM8K) or 'The answer is:' (MetaMath style), commas removed."""
    for mark in ("####", "The answer is:"):
        if mark in solution:
            text = solution.rsplit(mark, 1)[1].strip().replace(",", "")
            try:
                value = Decimal(text)
            except InvalidOperation:
                return None
            return float(value) if value.is_finite() else None
    return None


def official_math_answer(completion):
    """The text after the last 'The answer is: ', up to the first '.\\n', one trailing '.' dropped."""
    if ANSWER_MARK not in completion:
        return None
    text = completion.split(ANSWER_MARK)[-1].split(".\n")[0].strip()
    return text[:-1].strip() if text.endswith(".") else text


def last_boxed(solution):
    """The content of the last \\boxed{...} (braces balanced), or None; as the official code, a \\fbox or a
    \\boxed without braces gives None, which scores every answer wrong."""
    start = solution.rfind("\\boxed")
    start = start if start >= 0 else solution.rfind("\\fbox")
    if start < 0:
        return None
    depth = 0
    for i in range(start, len(solution)):
        depth += {"{": 1, "}": -1}.get(solution[i], 0)
        if solution[i] == "}" and depth == 0:
            boxed = solution[start:i + 1]
            return boxed[len("\\boxed{"):-1] if boxed.startswith("\\boxed{") else None
    return None


def _brace_first_char(s, command):
    """'\\sqrt2' -> '\\sqrt{2}'; None where the command ends the string (the official code raises there)."""
    head, *parts = s.split(command)
    for part in parts:
        if not part:
            return None
        head += command + (part if part[0] == "{" else "{" + part[0] + "}" + part[1:])
    return head


def _fix_fracs(s):
    """'\\frac12' -> '\\frac{1}{2}', '\\frac1{72}' -> '\\frac{1}{72}'; None where the official code raises."""
    head, *parts = s.split("\\frac")
    for part in parts:
        if not part:
            return None
        if part[0] == "{":
            head += "\\frac" + part
        elif len(part) < 2:
            return s  # the official code gives up and keeps the string as it was
        elif part[1] == "{":
            head += "\\frac{" + part[0] + "}" + part[1:]
        else:
            head += "\\frac{" + part[0] + "}{" + part[1] + "}" + part[2:]
    return head


def _slash_to_frac(s):
    a, _, b = s.partition("/")
    try:
        if s.count("/") == 1 and s == f"{int(a)}/{int(b)}":
            return f"\\frac{{{int(a)}}}{{{int(b)}}}"
    except ValueError:  # not integers (or thousands of digits)
        pass
    return s


def normalize_math(s):
    """MetaMath's (and the MATH paper's) answer normalisation, step by step; None where their code raises, in
    which case the raw strings are compared."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")):
        s = s.replace(old, new)
    if "\\text{ " in s:  # units: only a '\text{ ' with a space, and only once
        parts = s.split("\\text{ ")
        if len(parts) != 2:
            return None
        s = parts[0]
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # 'x = 5', 'k=5' -> '5'
        s = sides[1]
    s = _brace_first_char(s, "\\sqrt")
    if s is None:
        return None
    s = _fix_fracs(s.replace(" ", ""))
    if s is None:
        return None
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _slash_to_frac(s)


def math_equal(prediction, reference):
    """The official is_equiv: equal after normalisation (raw equality where normalising fails)."""
    if prediction is None or reference is None:
        return False
    a, b = normalize_math(prediction), normalize_math(reference)
    return prediction == reference if a is None or b is None else a == b


# ----------------------------------------------------------------------------------------------------------
# Scoring, lenient: a second number for reading small models, never in place of the official one.

NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")


def normalize_number(s):
    """'1,234.00' -> '1234', '$5' -> '5', '0.50' -> '0.5'; None if it is not a number."""
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        x = Decimal(s)
        if not x.is_finite():
            return None
        return str(int(x)) if x == x.to_integral_value() else format(x.normalize(), "f")
    except (InvalidOperation, ValueError):  # not a number, or too many digits to print
        return None


def extract_answer(text):
    """Lenient GSM8K reading: (answer or None, rule).  The number after the last 'The answer is' (colon and
    case optional), after the last '####', else the last number in the text; '$' is dropped first."""
    text = text.replace("$", "")
    markers = list(re.finditer(r"the answer is:?", text, re.IGNORECASE))
    if markers:
        m = NUMBER.search(text, markers[-1].end())
        if m:
            return normalize_number(m.group()), "answer_is"
    if "####" in text:
        m = NUMBER.search(text, text.rindex("####"))
        if m:
            return normalize_number(m.group()), "####"
    numbers = NUMBER.findall(text)
    if numbers:
        return normalize_number(numbers[-1]), "last_number"
    return None, "none"


def same_number(pred, ref):
    if pred is None or ref is None:
        return False
    return math.isclose(float(pred), float(ref), rel_tol=1e-9, abs_tol=1e-6)


def lenient_math_answer(completion):
    """The text after the last 'The answer is' (any case, colon optional), else the last \\boxed{...}."""
    markers = list(re.finditer(r"the answer is:?", completion, re.IGNORECASE))
    if markers:
        return completion[markers[-1].end():].split(".\n")[0].strip().rstrip(".").strip(" $")
    return last_boxed(completion)


def lenient_math_equal(prediction, reference):
    """math_equal, or equal after also dropping \\boxed, $, %, any trailing \\text{..} unit and trailing zeros."""
    if math_equal(prediction, reference):
        return True
    if prediction is None or reference is None:
        return False

    def clean(s):
        s = (last_boxed(s) if s.startswith("\\boxed{") else None) or s
        for mark in ("\\$", "$", "\\%", "%"):
            s = s.replace(mark, "")
        s = re.sub(r"\\(?:text|mbox|mathrm)\{[^{}]*\}\s*$", "", s).strip()
        s = normalize_math(s) or s
        return re.sub(r"^(-?\d+)\.0+$", r"\1", s.replace(",", ""))
    return clean(prediction) == clean(reference)


# ----------------------------------------------------------------------------------------------------------
# Prompts and tokenisation.

def chatml_prompt_builder(model_dir, system_prompt):
    """A hand-written renderer for ChatML (SmolLM2, Qwen2): jinja2 is not a dependency, so only templates that
    use <|im_start|> are supported.  The template's own default system message (shown when the conversation
    has none) is read from its source text."""
    cfg_path = Path(model_dir) / "tokenizer_config.json"
    template = json.loads(cfg_path.read_text()).get("chat_template") if cfg_path.is_file() else None
    if isinstance(template, list):  # newer configs list named templates
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str):
        raise UserError(f"{cfg_path} has no chat_template; use --template alpaca")
    if "<|im_start|>" not in template:
        raise UserError(f"the chat template in {cfg_path} is not ChatML (no <|im_start|>); without jinja2 only "
                        f"ChatML can be rendered; use --template alpaca")
    if system_prompt is None:
        m = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]*?)<\|im_end\|>", template)
        system_prompt = m.group(1).replace("\\n", "\n") if m else ""
    head = f"<|im_start|>system\n{system_prompt}<|im_end|>\n" if system_prompt else ""
    return lambda query: f"{head}<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n"


class Formatter:
    """Builds the training ids (prompt + response + end token, prompt masked) and the evaluation prompt."""

    def __init__(self, tok, template, model_dir, config, system_prompt=None, protocol="official"):
        self.tok, self.official = tok, protocol == "official"
        self.sep, self.eval_suffix = PROTOCOLS[protocol]["separator"], PROTOCOLS[protocol]["eval_suffix"]
        if template == "alpaca":
            self.render = lambda query: ALPACA_PROMPT.format(query=query)
            end = tok.eos_id if tok.eos_id is not None else config.get("eos_token_id")
            end = end[0] if isinstance(end, list) else end
        else:
            self.render = chatml_prompt_builder(model_dir, system_prompt)
            end = tok.token_to_id("<|im_end|>")
            ids = tok.encode(self.render("x")).ids
            if tok.token_to_id("<|im_start|>") is None or tok.token_to_id("<|im_start|>") not in ids:
                raise UserError("the tokenizer does not turn <|im_start|> into its special token; use "
                                "--template alpaca")
        if end is None:
            raise UserError("the tokenizer has no EOS token (and config.json no eos_token_id); the model would "
                            "never learn to stop")
        self.end_id = end
        self.boundary_fixes = 0

    def eval_prompt_ids(self, query):
        return self.tok.encode(self.render(query) + self.eval_suffix).ids

    def split(self, query, response):
        """(prompt ids, response ids) without the end token.  official: as the official script, the ids of
        prompt + response tokenised together, the first len(prompt ids) of them masked.  plain: the same when
        the prompt's ids are a prefix of the joint ids (the usual case); otherwise the two parts tokenised apart
        and concatenated, so that evaluation sees exactly the prefix that training saw (counted)."""
        prompt = self.render(query)
        p = self.tok.encode(prompt).ids
        full = self.tok.encode(prompt + self.sep + response).ids
        if full[:len(p)] != p and not self.official:
            self.boundary_fixes += 1
            return p, self.tok.encode(self.sep + response, add_special_tokens=False).ids
        return full[:len(p)], full[len(p):]

    def example(self, query, response, max_length):
        """(ids, labels, truncated): labels are -100 on the prompt, so the loss covers the response and the end
        token only."""
        p, r = self.split(query, response)
        ids = p + r + [self.end_id]
        labels = [-100] * len(p) + r + [self.end_id]
        return ids[:max_length], labels[:max_length], len(ids) > max_length


# ----------------------------------------------------------------------------------------------------------
# Steps of main().

def prepare_run_dir(args):
    """The folder this invocation writes into; refuses a model folder, another run (without --overwrite), and
    never writes into the run an --eval_only evaluates."""
    if args.eval_only:
        folder = Path(args.output_dir) if args.output_dir else new_eval_dir(args.load)
        if folder.resolve() == Path(args.load).resolve():
            raise UserError(f"--output_dir {folder} is the run being evaluated; its results are never replaced; "
                            f"leave --output_dir out (results go to {new_eval_dir(args.load)})")
    else:
        folder = Path(args.output_dir or f"out/math-{args.method}")
    if args.resume:
        if not (folder / "checkpoint.pt").is_file():
            raise UserError(f"--resume: no checkpoint at {folder / 'checkpoint.pt'}; drop --resume to start a run")
        return folder
    if (folder / "checkpoint.pt").is_file() and not args.overwrite:
        raise UserError(f"{folder} holds a run with a checkpoint; pass --resume to continue it, --overwrite to "
                        f"replace it, or another --output_dir")
    folder = prepare_output_dir(folder, overwrite=args.overwrite)
    for name in ("checkpoint.pt", "train_log.jsonl", "results.json", "predictions.jsonl", "adapter.pt", "run.json"):
        (folder / name).unlink(missing_ok=True)  # --overwrite: no file of the old run may mix with the new one
    return folder


def set_up_device(args):
    """Device, resolved --dtype/--amp, the autocast context, the gradient scaler (fp16 only) and the copies (ranks)
    when torchrun started several: each copy then uses its own GPU (cuda:LOCAL_RANK), and only the main one prints."""
    try:
        ranks = start_data_parallel(args.device)
    except ValueError as e:  # not a device name, or no CUDA device
        raise UserError(str(e)) from None
    device = torch.device(ranks.device)
    if not ranks.main:
        sys.stdout = open(os.devnull, "w")  # one copy prints the run; errors (stderr) still show from every copy
    if args.dtype == "auto":
        args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    if args.amp == "auto":
        args.amp = {"float32": "bf16" if device.type == "cuda" else "none", "bfloat16": "bf16",
                    "float16": "fp16", "float64": "none"}[args.dtype]
    amp = AMP[args.amp]
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext
    # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    return device, autocast, scaler, ranks






def load_model(args, device):
    try:
        model_dir = resolve(args.model, token=args.hf_token)
        tok = Tokenizer.from_pretrained(model_dir)
        model = CausalLM.from_pretrained(model_dir, dtype=PRECISION[args.dtype]).to(device)
        config = model.config
    except (OSError, ValueError) as e:  # not found, gated, offline, unsupported architecture
        raise UserError(f"--model {args.model}: {e}") from e
    for prm in model.parameters():
        prm.requires_grad_(False)
    fmt = Formatter(tok, args.template, model_dir, config, args.system_prompt, args.protocol)
    print(f"model {args.model} ({sum(x.numel() for x in model.parameters()) / 1e6:.1f}M params) on {device}, "
          f"weights {args.dtype}, autocast {args.amp}; template {args.template}, protocol {args.protocol}")
    return tok, model, fmt


def load_train_examples(args, fmt, ranks):
    path = fetch(args.train_data, "train", args.data_dir, args.hf_token)
    args.train_sha256 = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    records = read_records(path)[:args.max_train_samples]
    args.prompt_field, args.response_field = pick_fields(records, args.prompt_field, args.response_field, path)
    train, n_truncated, n_dropped, n_converted = [], 0, 0, 0
    pairs = get_pairs(records, args.prompt_field, args.response_field)
    for query, response, where in tqdm(pairs, desc="tokenize", disable=len(pairs) < 5000 or not ranks.main,
                                       dynamic_ncols=True):
        converted = to_metamath_format(response)
        n_converted += converted != response
        ids, labels, truncated = fmt.example(query, converted, args.max_length)
        n_truncated += truncated
        n_targets = sum(x != -100 for x in labels[1:])
        if n_targets == 0:  # the prompt alone filled max_length: nothing to learn from
            n_dropped += 1
            continue
        train.append((ids, labels, n_targets))
    if not train:
        raise UserError(f"every example was longer than --max_length {args.max_length} before its answer; "
                        f"raise --max_length")
    lengths = [len(x[0]) for x in train]
    print(f"train: {len(train)} examples from {path} (fields {args.prompt_field}/{args.response_field}); "
          f"{n_converted} '#### n' answers converted to 'The answer is: n'; {n_truncated} truncated to "
          f"{args.max_length} tokens, {n_dropped} dropped (no answer left); tokens mean {np.mean(lengths):.0f} "
          f"max {max(lengths)}" + (f"; {fmt.boundary_fixes} prompt/response boundaries re-tokenised"
                                   if fmt.boundary_fixes else ""))
    return train


def load_eval_items(args, fmt):
    """(task, items): task 'math' when the references hold \\boxed{...}, else 'gsm8k'."""
    path = fetch(args.eval_data, "test", args.data_dir, args.hf_token)
    records = read_records(path)[:args.max_eval_samples]
    q_field, a_field = pick_fields(records, None, None, path)
    pairs = get_pairs(records, q_field, a_field)
    task = "math" if args.eval_data == "math" or "\\boxed" in pairs[0][1] else "gsm8k"
    items = []
    for (question, answer, where), (_, rec) in zip(pairs, records):
        if task == "gsm8k":
            reference = gsm8k_reference(answer)
            if reference is None:
                raise UserError(f"{where}: the reference does not end in '#### <number>' or 'The answer is: "
                                f"<number>', so it cannot be scored")
            solution = to_metamath_format(answer)
        else:
            reference = last_boxed(answer)  # None: counted wrong, as the official code does
            solution = answer if reference is None else f"{answer}\nThe answer is: {reference}"
        prompt_ids, answer_ids = fmt.split(question, solution)
        items.append(dict(question=question, reference=reference, level=rec.get("level"), subject=rec.get("type"),
                          gen_ids=fmt.eval_prompt_ids(question), prompt_ids=prompt_ids, answer_ids=answer_ids))
    if args.max_new_tokens is None:
        args.max_new_tokens = PROTOCOLS[args.protocol]["max_new_tokens"][task]
    print(f"eval: first {len(items)} problems of {path} ({task}), up to {args.max_new_tokens} new tokens")
    return task, items


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


def build_adapter(args, model):
    """Uni-LoRA or LoRA on every linear layer but lm_head; for --eval_only, the one saved in --load."""
    saved = Path(args.load) / "adapter.pt" if args.eval_only else None
    try:
        if args.method == "unilora":
            projection = PROJECTIONS[args.projection]
            if saved:
                return unilora.load_unilora(model, str(saved), projection=projection)
            return unilora.apply_unilora(model, args.d, r=args.r, seed=args.seed, signs=args.signs,
                                         dropout=args.dropout, projection=projection)
        if args.method == "lora":
            adapter = unilora.apply_lora(model, r=args.r, alpha=args.lora_alpha, dropout=args.dropout)
            return adapter.load(str(saved)) if saved else adapter
    except (ValueError, OSError, EOFError, RuntimeError, pickle.UnpicklingError) as e:  # d > D; a bad adapter file
        raise UserError(f"--load {args.load}: {e}" if saved else
                        f"--d {args.d} / --projection {args.projection}: {' '.join(str(e).split())}") from e
    return None


def lr_lambda_factory(total_steps, warmup_steps):
    """Linear warmup then cosine decay to zero; step s (0-based) trains with the factor at s."""
    def factor(s):
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        progress = (s - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def at_least_fp32(logits):
    """Softmax over a large vocabulary in fp32 at least (float64 runs stay float64)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def train_adapter(args, model, adapter, train, ckpt, run_dir, device, autocast, scaler, run_config, before, ranks):
    """AdamW on the adapter with warmup + cosine; atomic checkpoints; exact resume.  Returns the summary.  A
    non-finite loss raises NonFiniteLoss before anything of that step is saved.

    Several copies (torchrun): each takes my_share of every global batch and divides its loss by the whole
    batch's answer tokens; one sum_gradients after the last micro-batch gives every copy the one-process
    gradient, so clipping, the fp16 scaler's overflow check and AdamW run identically everywhere.  The main copy
    alone writes; the checkpoint is the same whatever the number of copies."""
    ckpt_path, log_path = run_dir / "checkpoint.pt", run_dir / "train_log.jsonl"
    steps_per_epoch = len(train) // args.batch_size
    if steps_per_epoch == 0 and args.max_steps is None:
        raise UserError(f"{len(train)} examples do not fill one batch of {args.batch_size}; lower --batch_size or "
                        f"use more data")
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    steps_per_epoch = max(1, steps_per_epoch)
    warmup_steps = max(1, math.ceil(args.warmup_ratio * total_steps)) if args.warmup_ratio > 0 else 0
    params = list(adapter.parameters())
    copy_from_main(params, ranks)
    opt = torch.optim.AdamW([{"params": params, "weight_decay": args.weight_decay}], lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda_factory(total_steps, warmup_steps))
    pad_id = args.pad_id

    step = 0
    if ckpt:
        with torch.no_grad():
            for prm, saved in zip(params, ckpt["adapter_params"], strict=True):
                prm.copy_(saved)
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["torch_rng"])
        if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        step = ckpt["step"]
        # steps logged after the checkpoint was written will be trained again: drop them from the log
        kept = [x for x in log_path.read_text().splitlines() if json.loads(x)["step"] <= step] \
            if log_path.exists() else []
        if ranks.main:
            atomic_write(log_path, lambda f: f.write("".join(x + "\n" for x in kept).encode()))
        print(f"resumed {ckpt_path} at step {step}/{total_steps}")

    # Data order: epoch e visits the examples in default_rng([seed, e]).permutation(n).  It depends only on
    # (seed, epoch), so a resumed run recomputes exactly the batches it had not yet seen from the step.
    @functools.lru_cache(maxsize=1)  # once per epoch, not per step (7.5 ms for MetaMathQA's 395K examples)
    def epoch_order(epoch):
        return np.random.default_rng([args.seed, epoch]).permutation(len(train))

    def batch_indices(s):
        epoch, k = divmod(s, steps_per_epoch)
        return epoch_order(epoch)[k * args.batch_size:(k + 1) * args.batch_size]

    def save_checkpoint(s):
        adapter.save(str(run_dir / "adapter.pt"), overwrite=True)
        state = dict(step=s, total_steps=total_steps, config=run_config, before=before,
                     adapter_params=[x.detach().cpu().clone() for x in params], optimizer=opt.state_dict(),
                     scheduler=sched.state_dict(), scaler=scaler.state_dict(), torch_rng=torch.get_rng_state(),
                     cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                     data_order=f"numpy default_rng([{args.seed}, epoch]).permutation({len(train)})")
        atomic_write(ckpt_path, lambda f: torch.save(state, f))

    end_step = min(total_steps, args.stop_after) if args.stop_after else total_steps
    print(f"training {total_steps} steps ({total_steps / steps_per_epoch:.2f} epochs) of batch {args.batch_size} "
          f"(micro {args.micro_batch_size}), lr {args.lr}, warmup {warmup_steps}"
          + (f"; stopping after step {end_step}" if end_step < total_steps else ""))
    model.train()
    t0 = time.time()
    bar = tqdm(range(step, end_step), initial=step, total=total_steps, desc=f"train {args.method}",
               dynamic_ncols=True, disable=not ranks.main)
    with open(log_path, "a") if ranks.main else contextlib.nullcontext() as log:
        for s in bar:
            idx = batch_indices(s)
            n_targets = sum(train[i][2] for i in idx)  # normalise by the whole batch's answer tokens
            mine = my_share(list(idx), ranks)
            loss = 0.0
            for j in range(0, len(mine), args.micro_batch_size):
                micro = [train[i] for i in mine[j:j + args.micro_batch_size]]
                ids, mask = pad([m[0] for m in micro], pad_id), pad([[1] * len(m[0]) for m in micro], 0)
                lab = pad([m[1] for m in micro], -100)
                with autocast():
                    logits = model(ids.to(device), attention_mask=mask.to(device))
                target = lab[:, 1:].to(device)
                keep = target != -100  # only response positions: fp32 logits of a 256k vocabulary are large
                part = F.cross_entropy(at_least_fp32(logits[:, :-1][keep]), target[keep], reduction="sum") / n_targets
                scaler.scale(part).backward()
                loss += part.item()
            loss = summed(loss, ranks)  # the whole batch's: every copy stops on the same step
            check_finite(loss, s + 1, hint=f"lower --lr, now {args.lr}")
            sum_gradients(params, ranks)  # before unscale_: every copy sees the same overflow, clips the same norm
            scaler.unscale_(opt)
            grad_norm = (torch.nn.utils.clip_grad_norm_(params, args.grad_clip) if args.grad_clip > 0
                         else torch.linalg.vector_norm(torch.cat([x.grad.flatten() for x in params])))
            lr_now, scale = opt.param_groups[0]["lr"], scaler.get_scale()
            scaler.step(opt)  # fp16: skipped when a gradient overflowed, and the scale shrinks
            scaler.update()
            skipped = scaler.get_scale() < scale
            if not bool(torch.stack([torch.isfinite(x).all() for x in params]).all()):  # one sync, not one per tensor
                raise NonFiniteLoss(f"the adapter became non-finite at step {s + 1}: training diverged and was "
                                    f"stopped; nothing of this step was saved. Lower --lr (now {args.lr}).")
            if not skipped:
                sched.step()
            opt.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr_now:.2e}")
            if not ranks.main:
                continue
            log.write(json.dumps(dict(step=s + 1, loss=loss, lr=lr_now, grad_norm=finite_or_none(float(grad_norm)),
                                      skipped=skipped, seconds=round(time.time() - t0, 1))) + "\n")
            log.flush()
            if (s + 1) % args.save_every == 0 or s + 1 == end_step:
                save_checkpoint(s + 1)
    bar.close()
    if end_step == step:
        print(f"checkpoint already at step {step}; nothing left to train")
    if not ranks.main:  # the main copy reports
        return dict(steps=total_steps, steps_done=end_step)
    logged = [json.loads(x) for x in log_path.read_text().splitlines()]
    return dict(data=str(args.train_data), examples=len(train), steps=total_steps, steps_done=end_step,
                batch_size=args.batch_size, lr=args.lr, first_loss=logged[0]["loss"], last_loss=logged[-1]["loss"],
                skipped_steps=sum(x.get("skipped", False) for x in logged), seconds=round(time.time() - t0, 1))


@torch.no_grad()
def answer_loglik(model, items, pad_id, batch_size, device, autocast, ranks):
    """Teacher-forced log p(reference solution | training prompt), averaged over the solution's tokens for each
    problem (EOS excluded), then over problems.  It moves smoothly where a small model's accuracy sits near 0.
    Each copy scores its share of the problems."""
    model.eval()
    items, scores = my_share(items, ranks), []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        seqs = [it["prompt_ids"] + it["answer_ids"] for it in chunk]
        ids, mask = pad(seqs, pad_id).to(device), pad([[1] * len(s) for s in seqs], 0).to(device)
        lab = pad([[-100] * len(it["prompt_ids"]) + it["answer_ids"] for it in chunk], -100).to(device)
        with autocast():
            logits = model(ids, attention_mask=mask)
        target = lab[:, 1:]
        keep = target != -100
        sel = at_least_fp32(logits[:, :-1][keep])  # the answer positions only
        lp = torch.zeros(target.shape, device=device, dtype=sel.dtype)
        lp[keep] = sel.gather(1, target[keep][:, None])[:, 0] - torch.logsumexp(sel, dim=-1)
        scores += (lp.sum(1) / keep.sum(1)).tolist()
    return float(np.mean(gather_shares(scores, ranks)))


def cut_at_stop(text, stop):
    """The text before the earliest stop string (what vLLM returns when a stop string ends generation)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


@torch.no_grad()
def generate(model, prompts, pad_id, end_id, max_new_tokens, stop, decode, device, autocast):
    """Greedy decoding of a left-padded batch with the KV cache.  A row ends at the end token or as soon as its
    recent text holds a stop string; returns (new token ids, why it ended) per row."""
    ids, mask = pad(prompts, pad_id, left=True).to(device), pad([[1] * len(p) for p in prompts], 0, left=True)
    mask, cache = mask.to(device), KVCache()
    rows, why = [[] for _ in prompts], [None] * len(prompts)
    window = 4 * max(map(len, stop), default=0) + 4 * 8  # the last 8 tokens and a stop string, in bytes
    with autocast():
        logits = model(ids, mask, cache, last_only=True)[:, -1]
    for step in range(max_new_tokens):
        tokens = logits.argmax(-1)
        for i, t in enumerate(tokens.tolist()):
            if not why[i] and t == end_id:
                why[i] = "eos"
            elif not why[i]:
                rows[i].append(t)
        if stop and step % 8 == 7:  # looking every 8th token costs 8x less decoding and ends at most 7 tokens late
            for i, row in enumerate(rows):
                if not why[i] and any(s in decode(row[-window:]) for s in stop):
                    why[i] = "stop"
        if all(why) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        with autocast():
            logits = model(tokens[:, None], mask, cache, last_only=True)[:, -1]
    return rows, [w or "length" for w in why]


def merge_for_eval(model, adapter, probe, autocast):
    """Fold dW = B A into W, in fp32 and outside autocast (autocast would round B A to 16 bits); returns the plain
    model and the largest logit change merging caused on one probe sequence."""
    model.eval()
    with torch.no_grad(), autocast():
        before = model(probe).float()
    with torch.autocast(probe.device.type, enabled=False):
        model = adapter.merge()
    with torch.no_grad(), autocast():
        gap = (model(probe).float() - before).abs().max().item()
    return model, gap


def score(task, completion, item):
    """(official prediction, correct, lenient prediction, correct) for one completion."""
    if task == "gsm8k":
        pred = official_gsm8k_answer(completion)
        lenient, _ = extract_answer(completion)
        ok = pred is not None and float(pred) == item["reference"]
        return pred, ok, lenient, same_number(lenient, item["reference"])
    pred, lenient = official_math_answer(completion), lenient_math_answer(completion)
    return pred, math_equal(pred, item["reference"]), lenient, lenient_math_equal(lenient, item["reference"])


def evaluate(args, model, adapter, tok, fmt, items, task, run_dir, device, autocast, ranks):
    """Merge the adapter, generate for every problem, score both readings, write predictions.jsonl; returns the
    numbers.  Each copy generates for its share of the problems; the main copy gets all of them back in order."""
    out = {}
    if adapter is not None:
        probe = torch.tensor([items[0]["prompt_ids"] + items[0]["answer_ids"]], device=device)
        model, out["merge_max_logit_change"] = merge_for_eval(model, adapter, probe, autocast)
        print(f"merged the adapter (max |logit change| from merging {out['merge_max_logit_change']:.2e})")
    # in training-sized batches: logits over the whole vocabulary for every position are what fills memory here
    out["loglik"] = answer_loglik(model, items, args.pad_id, args.micro_batch_size, device, autocast, ranks)
    t0 = time.time()
    stop = PROTOCOLS[args.protocol]["stop"]
    # Longest prompts first: batches hold similar lengths, so little padding, and an out-of-memory error shows
    # up in the first batch, not the last.
    # Dealt round-robin in that order, every copy gets long and short ones alike.
    order = sorted(range(len(items)), key=lambda i: -len(items[i]["gen_ids"]))
    mine, done = my_share(order, ranks), []
    for i in tqdm(range(0, len(mine), args.eval_batch_size), desc="generate", dynamic_ncols=True,
                  disable=not ranks.main):
        chunk = mine[i:i + args.eval_batch_size]
        rows, why = generate(model, [items[j]["gen_ids"] for j in chunk], args.pad_id, fmt.end_id,
                             args.max_new_tokens, stop, tok.decode, device, autocast)
        done += zip(rows, why)
    outputs = [None] * len(items)
    for j, row_why in zip(order, gather_shares(done, ranks), strict=True):
        outputs[j] = row_why
    seconds = time.time() - t0
    rows, counts = [], defaultdict(lambda: [0, 0])
    for item, (new_ids, why) in zip(items, outputs):
        completion = cut_at_stop(tok.decode(new_ids), stop)
        pred, ok, lenient, ok_lenient = score(task, completion, item)
        for group in ("all", f"level:{item['level']}", f"subject:{item['subject']}"):
            counts[group][0] += ok
            counts[group][1] += 1
        counts["lenient"][0] += ok_lenient
        counts["no_answer_mark"][0] += ANSWER_MARK not in completion
        rows.append(json.dumps(dict(question=item["question"], reference=item["reference"], prediction=pred,
                                    correct=ok, prediction_lenient=lenient, correct_lenient=ok_lenient,
                                    level=item["level"], subject=item["subject"], completion=completion,
                                    new_tokens=len(new_ids), ended_by=why)))
    if ranks.main:
        atomic_write(run_dir / "predictions.jsonl", lambda f: f.write(("\n".join(rows) + "\n").encode()))
    n, correct = counts["all"][1], counts["all"][0]
    out.update(task=task, accuracy=correct / n, correct=correct, n=n,
               accuracy_lenient=counts["lenient"][0] / n, correct_lenient=counts["lenient"][0],
               no_answer_mark=counts["no_answer_mark"][0], max_new_tokens=args.max_new_tokens,
               generate_seconds=round(seconds, 1))
    for kind in ("level", "subject"):
        groups = {k.split(":", 1)[1]: dict(accuracy=c / m, correct=c, n=m) for k, (c, m) in sorted(counts.items())
                  if k.startswith(kind + ":") and k != f"{kind}:None"}
        if groups:
            out[f"by_{kind}"] = groups
    return out


def protocol_record(args):
    p = PROTOCOLS[args.protocol]
    return dict(name=args.protocol, train_text=f"prompt + {p['separator']!r} + response + eos",
                eval_prompt_suffix=p["eval_suffix"], stop=list(p["stop"]), max_new_tokens=args.max_new_tokens,
                scoring="official: after the last 'The answer is: ' (GSM8K round(float) == ref; MATH is_equiv); "
                        "lenient: accuracy_lenient")


# ----------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)  # every copy checks the flags alike, so a user error stops them all
    device, autocast, scaler, ranks = set_up_device(args)
    with data_parallel_until_done(ranks):
        return train_and_evaluate(args, ranks, device, autocast, scaler)


def train_and_evaluate(args, ranks, device, autocast, scaler):
    def save(name, content):
        if ranks.main:
            write_json(run_dir / name, content)

    run_dir = main_first(ranks, prepare_run_dir, args, share=True)
    tok, model, fmt = main_first(ranks, load_model, args, device)
    args.pad_id = tok.pad_id if tok.pad_id is not None else fmt.end_id
    train = main_first(ranks, load_train_examples, args, fmt, ranks) if args.train else None
    run_config = {k: getattr(args, k) for k in RESUME_KEYS[:-1]} | {"n_train": len(train)} if args.train else None
    ckpt = read_checkpoint(run_dir / "checkpoint.pt", run_config) if args.resume else None
    task, eval_items = main_first(ranks, load_eval_items, args, fmt) if not args.no_eval else (None, [])
    results = dict(status="running", method=args.method, model=args.model, recipe=args.recipe,
                   projection=args.projection, template=args.template, protocol=protocol_record(args),
                   precision=dict(dtype=args.dtype, amp=args.amp), evaluated_run=args.load, world_size=ranks.world,
                   args={k: v for k, v in vars(args).items() if k not in ("hf_token", "pad_id")})
    # "before": the untouched base model (a resumed run kept the number in its checkpoint)
    before = ckpt.get("before") if ckpt else None
    if eval_items and args.train and before is None:
        before = {"loglik": answer_loglik(model, eval_items, args.pad_id, args.micro_batch_size, device, autocast,
                                          ranks)}
        print(f"before training: mean answer log-likelihood {before['loglik']:.4f}")
    adapter = build_adapter(args, model)
    if adapter is not None:
        results["params"] = adapter.counts()
        print(f"{args.method}: {results['params']}")
    if args.train and not args.resume:  # once the adapter exists: a refused --d or --projection leaves no run.json
        save("run.json", results["args"])

    if args.train:
        try:
            results["train"] = train_adapter(args, model, adapter, train, ckpt, run_dir, device, autocast, scaler,
                                             run_config, before, ranks)
        except NonFiniteLoss as e:
            save("results.json", results | dict(status="diverged", error=str(e)))
            raise
        stopped = results["train"]["steps_done"] < results["train"]["steps"]
        if stopped or args.no_eval:
            results["status"] = "stopped" if stopped else "trained"
            save("results.json", results)
            print("stopped as asked; continue with --resume" if stopped else "trained; --no_eval: no evaluation")
            return results

    results["before"] = before
    results["after"] = evaluate(args, model, adapter, tok, fmt, eval_items, task, run_dir, device, autocast, ranks)
    results.update(status="finished", eval_data=str(args.eval_data))
    save("results.json", results)
    after = results["after"]
    print(f"{task.upper()} accuracy (official) {after['correct']}/{after['n']} = {100 * after['accuracy']:.2f}%; "
          f"lenient reading {100 * after['accuracy_lenient']:.2f}%; {after['no_answer_mark']} without "
          f"'{ANSWER_MARK.strip()}'; wrote {run_dir / 'results.json'}")
    return results


if __name__ == "__main__":
    try:
        main()
    except (UserError, NonFiniteLoss) as e:  # every copy meets it; the main copy says it
        sys.exit(f"error: {e}" if os.environ.get("RANK", "0") == "0" else 1)
