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
    python train_math.py --score preds.jsonl --eval_data math  # grade generations made elsewhere, no model
    torchrun --nproc_per_node 8 -- train_math.py --recipe paper  # data parallel: 8 copies share each batch

--protocol official (the default) is the official code's protocol, point by point: training text = prompt +
response + EOS with no separator; evaluation prompt ending "### Response: Let's think step by step."; decoding
stops at "Instruction:", "Instruction", "Response:", "Response" or EOS, within 1,024 new tokens (MATH: 2,048);
GSM8K: the first number after the LAST "The answer is: ", round(float(...)), compared by the official grader;
MATH: the text after it against the last \\boxed{...} of the reference solution by the official grader (see
recipes/math_scoring.py: numbers, the percent rule, brackets, tuples, sympy, the exception path). The strict and
lenient readings are reported next to it under their own names. --protocol plain is this project's earlier one.

Needs only torch, numpy and tqdm (models, tokenizers and hub downloads come from pretrained/, the adapters
from unilora.py and projections.py, data, scoring and decoding from recipes/). Outputs in --output_dir: run.json,
train_log.jsonl, checkpoint.pt (--resume), adapter.pt, results.json, predictions.jsonl.
"""
import argparse
import contextlib
import functools
import json
import os
import pickle
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pretrained.decoder import CausalLM
from pretrained.files import atomic_write, finite_or_none, write_json
from pretrained.hub import resolve
from pretrained.tokenizer import Tokenizer, pad
from projections import PROJECTIONS
from recipes.adapters import AdapterSettings, build_adapter, merge_for_eval
from recipes.checkpoint import (TrainingState, batch_order, check_run_dir, read_checkpoint, resume, resume_hint,
                                save_checkpoint)
from recipes.generation import answer_loglik, at_least_fp32, cut_at_stop, generate
from recipes.math_data import (PROTOCOLS, Formatter, load_eval_items, load_predictions, load_train_examples,
                                protocol_record)
from recipes.math_scoring import ANSWER_MARK, score_all, summary_lines
from recipes.training import (NonFiniteLoss, Parser, Ranks, UserError, autocast, choice, copy_from_main,
                              data_parallel_until_done, errors_as_exit, eval_output_dir, fraction, gather_shares, held,
                              interrupt_on_sigterm, main_first, my_share, nonnegative_float, optimizer_step, place,
                              positive_float, positive_int, printing_on_main_copy, read_saved_run, real, seed_number,
                              staged, start_data_parallel, text, thread_count, unused_flag, warmup_then_decay, whole)

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
        epochs=1, batch_size=16, micro_batch_size=4, d=65536, r=4, warmup_ratio=0.02,
        eval_batch_size=16, save_every=25, dtype="auto", amp="auto", seed=0,
    ),
    # The official script: google/gemma-7b (the model of Table 3; --model mistralai/Mistral-7B-v0.1 for the
    # other one), all linear layers except lm_head, r=4, d=2^19, first 100K MetaMathQA examples, max length 512,
    # 2 epochs, effective batch 64, lr 2e-3, cosine, 2% warmup, no weight decay, the paper's P without signs;
    # fp32 weights under fp16 autocast (the official run's --fp16), seed 42 (its default).
    "paper": dict(
        model="google/gemma-7b", train_data="metamathqa", max_train_samples=100_000,
        eval_data="gsm8k", max_eval_samples="all", template="alpaca", protocol="official", max_length=512,
        epochs=2, batch_size=64, micro_batch_size=4, d=524_288, r=4, warmup_ratio=0.02,
        eval_batch_size=32, save_every=200, dtype="float32", amp="fp16", seed=42,
    ),
}
# Learning rates per method.  theta_d: the paper's 2e-3.  LoRA: Adam moves every coordinate by about lr per
# step; Uni-LoRA's LoRA entries are theta_d entries divided by sqrt(D/d) (about 4.3 small, 4.5 paper), so
# 2e-3 on theta_d is about 4.6e-4 per LoRA entry.  5e-4 gives plain LoRA the same per-entry step size.
DEFAULT_LR = {"unilora": 2e-3, "lora": 5e-4}

PRECISION = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "float64": torch.float64}  # float64: for exact comparisons (tests), not for training
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Settings that must match for --resume to continue a run (eval settings, micro-batch size, --stop_after may
# change).  train_sha256 is the training file's content, n_train the examples it gave.
RESUME_KEYS = ("method", "model", "train_data", "train_sha256", "max_train_samples", "prompt_field",
               "response_field", "template", "system_prompt", "protocol", "max_length", "epochs", "max_steps",
               "batch_size", "lr", "warmup_ratio", "weight_decay", "grad_clip", "d", "r", "lora_alpha", "signs",
               "projection", "dropout", "seed", "dtype", "amp", "loss", "n_train")
# What --eval_only --load takes from the saved run (the model it was trained on, how it was prompted).
RUN_KEYS = ("method", "model", "template", "system_prompt", "protocol", "r", "lora_alpha", "projection")
# What --eval_only reads from a saved run, each value checked: a damaged file, or another script's, is one line.
SAVED_RUN = dict(method=choice(("unilora", "lora", "none")), model=text(), train_data=text(),
                 template=choice(("alpaca", "chat"), null=True), system_prompt=text(null=True),
                 protocol=choice(tuple(PROTOCOLS), null=True), r=whole(null=True), lora_alpha=real(null=True),
                 projection=choice(tuple(PROJECTIONS), null=True), eval_data=text(null=True),
                 max_eval_samples=lambda v: v == "all" or whole(null=True)(v), max_new_tokens=whole(null=True),
                 eval_batch_size=whole(null=True))


# ----------------------------------------------------------------------------------------------------------
# main: the settings, where the run happens, then the experiment as named steps.

def main(argv=None):
    with printing_on_main_copy():  # under torchrun, the first copy alone prints
        args = parse_args(argv)  # every copy checks the flags alike, so a user error stops them all
        if args.score:
            return score_predictions(args)
        run = set_up(args, sys.argv[1:] if argv is None else list(argv))
        with data_parallel_until_done(run.ranks), run_folder(run) as run.folder, resume_hint(run):
            return train_and_evaluate(run)


@dataclass
class Run:
    """Where the steps of a run happen, decided once: the settings, the copies, device and precision, the folder."""
    args: argparse.Namespace
    ranks: Ranks
    device: torch.device
    autocast: Callable  # () -> a fresh autocast context (a null one in fp32)
    scaler: torch.amp.GradScaler  # fp16 gradients underflow without loss scaling; bf16 has fp32's range
    argv: list  # the command line, for the command that resumes the run
    folder: Path | None = None  # where it writes: FOLDER.partial until the run takes FOLDER's place
    saved: int | None = None  # the step of the run's checkpoint in FOLDER, once there is one


def train_and_evaluate(run):
    """The experiment: folder, model, data, the base model's score, adapter, training, evaluation, results."""
    args, ranks = run.args, run.ranks

    def save(name, content):
        if ranks.main:
            write_json(run.folder / name, content)

    # model, prompt format
    tok, model, fmt = main_first(ranks, load_model, args, run.device)
    args.pad_id = tok.pad_id if tok.pad_id is not None else fmt.end_id
    # data: the training examples (and the checkpoint they continue), the test problems
    train = main_first(ranks, load_train_examples, args, fmt, ranks) if args.train else None
    ckpt = read_checkpoint(run.folder / "checkpoint.pt", resume_config(args, train)) if args.resume else None
    task, eval_items = main_first(ranks, load_eval_items, args, fmt) if not args.no_eval else (None, [])
    results = dict(status="running", method=args.method, model=args.model, recipe=args.recipe,
                   projection=args.projection, template=args.template,
                   protocol=protocol_record(args.protocol, args.max_new_tokens),
                   precision=dict(dtype=args.dtype, amp=args.amp), evaluated_run=args.load, world_size=ranks.world,
                   args={k: v for k, v in vars(args).items() if k not in ("hf_token", "pad_id")})
    # "before": the untouched base model (a resumed run kept the number in its checkpoint)
    before = ckpt.get("before") if ckpt else None
    if eval_items and args.train and before is None:
        before = {"loglik": answer_loglik(model, eval_items, args.pad_id, args.micro_batch_size, run.autocast,
                                          ranks)}
        print(f"before training: mean answer log-likelihood {before['loglik']:.4f}")
    # the adapter
    adapter = make_adapter(args, model)
    if adapter is not None:
        results["params"] = adapter.counts()
        print(f"{args.method}: {results['params']}")
    if args.train and not args.resume:  # once the adapter exists: a refused --d or --projection leaves no run.json
        save("run.json", results["args"])
    # training
    if args.train:
        try:
            results["train"] = train_adapter(run, model, adapter, train, ckpt, before)
        except NonFiniteLoss as e:
            save("results.json", results | dict(status="diverged", error=str(e)))
            raise
        stopped = results["train"]["steps_done"] < results["train"]["steps"]
        if stopped or args.no_eval:
            results["status"] = "stopped" if stopped else "trained"
            save("results.json", results)
            print("stopped as asked; continue with --resume" if stopped else "trained; --no_eval: no evaluation")
            return results
    # evaluation, results
    results["before"] = before
    results["after"] = evaluate(run, model, adapter, fmt, eval_items, task)
    results.update(status="finished", eval_data=str(args.eval_data))
    save("results.json", results)
    after = results["after"]
    print("\n".join(summary_lines(after)))
    print(f"official accuracy {100 * after['accuracy']:.2f}%; {after['no_answer_mark']} without "
          f"'{ANSWER_MARK.strip()}'; wrote {run.folder / 'results.json'}")
    return results


def score_predictions(args):
    """--score FILE: the three readings of generations made elsewhere (vLLM, another run); no model needed."""
    task, items, completions = load_predictions(args)
    records, accuracy, groups = score_all(task, items, completions)
    print("\n".join(summary_lines(accuracy)))
    results = dict(kind="score", scored=str(Path(args.score).resolve()), eval_data=args.eval_data,
                   after=accuracy | groups)
    if args.output_dir:
        with staged(args.output_dir, args.overwrite, Ranks()) as stage:
            rows = "".join(json.dumps(r) + "\n" for r in records)
            atomic_write(stage / "predictions.jsonl", lambda f: f.write(rows.encode()))
            write_json(stage / "results.json", results)
        print(f"wrote {Path(args.output_dir) / 'results.json'}")
    return results


# ----------------------------------------------------------------------------------------------------------
# Settings: the flags, completed from the recipe (and, for --eval_only, from the saved run), checked together.

def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
               short_errors=True)
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
                   help="Uni-LoRA: random +-1 per row of P (ours), or the paper's all-positive P (default;\n"
                        "fastfood and gaussian P's have signs by construction: on for them)")
    p.add_argument("--projection", choices=list(PROJECTIONS),
                   help="Uni-LoRA: which P (projections.py; default balanced, the paper's; others are ablations)")
    p.add_argument("--dropout", type=fraction, default=0.0, help="adapter dropout on the layer input")
    p.add_argument("--seed", type=seed_number, help="projection, LoRA init and data order (recipe: small 0,\n"
                                                         "paper 42 as the official run)")
    p.add_argument("--loss", choices=("example", "tokens"),
                   help="example: each example's mean over its answer tokens, averaged over the batch (the\n"
                        "official run: batch 1 x 64 accumulation); tokens: the mean over all answer tokens of\n"
                        "the batch (default: example under --protocol official, tokens under plain)")
    # precision
    p.add_argument("--dtype", choices=("auto", *PRECISION),
                   help="base weights: auto = bfloat16 on CUDA, float32 on CPU (recipe: small auto, paper\n"
                        "float32 as the official run)")
    p.add_argument("--amp", choices=("auto", *AMP),
                   help="autocast: auto = bf16 on CUDA (fp16 for float16 weights), none on CPU (recipe: small\n"
                        "auto, paper fp16 with a gradient scaler, as the official run)")
    # runs, checkpoints, evaluation
    p.add_argument("--output_dir", help="run folder (default out/math-<method>; --eval_only: <load>/eval-N)")
    p.add_argument("--out_dir", dest="output_dir", help=argparse.SUPPRESS)  # the earlier spelling
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --output_dir")
    p.add_argument("--save_every", type=positive_int, help="checkpoint every N steps (recipe)")
    p.add_argument("--resume", action="store_true", help="continue from <output_dir>/checkpoint.pt")
    p.add_argument("--eval_only", action="store_true", help="evaluate the run saved in --load")
    p.add_argument("--score", metavar="FILE",
                   help="grade a JSONL of generations (predictions.jsonl, or lines with completion and reference)\n"
                        "with the official, strict and lenient readers; needs --eval_data gsm8k|math|PATH")
    p.add_argument("--load", help="a run folder written by this script (with --eval_only)")
    p.add_argument("--adapter", help=argparse.SUPPRESS)  # earlier spelling: the adapter.pt inside a run folder
    p.add_argument("--no_eval", action="store_true", help="train only")
    p.add_argument("--max_new_tokens", type=positive_int,
                   help="generation budget per problem (protocol: official 1,024 GSM8K / 2,048 MATH)")
    p.add_argument("--eval_batch_size", type=positive_int,
                   help="problems decoded together by one copy, left-padded (recipe)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--threads", type=thread_count, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--hf_token", help="for gated models and hub data (default: $HF_TOKEN); sent to the hub only")
    args = p.parse_args(argv)
    if args.score:
        return check_score_flags(p, args)
    if args.eval_only and (flag := unused_flag(p, args, EVAL_ONLY_KEYS)):
        raise UserError(f"--eval_only evaluates the run in --load as it was trained, so {flag} does not apply; "
                        f"drop it")
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
    if args.signs is None:  # the paper's P; the dense ablations' P's are signed by construction
        args.signs = args.projection in ("fastfood", "gaussian")
    if args.loss is None:
        args.loss = "example" if args.protocol == "official" else "tokens"
    if args.lr is None and args.method != "none":
        args.lr = DEFAULT_LR[args.method]
    args.train = not args.eval_only and args.method != "none"
    check_flag_combinations(args)
    return args


SCORE_KEYS = ("score", "eval_data", "max_eval_samples", "data_dir", "hf_token", "output_dir", "overwrite")
# What --eval_only uses besides the run's own settings: where and how to evaluate, never how to train.
EVAL_ONLY_KEYS = (*RUN_KEYS, "eval_only", "load", "adapter", "output_dir", "overwrite", "recipe", "eval_data",
                  "max_eval_samples", "data_dir", "max_new_tokens", "eval_batch_size", "micro_batch_size", "dtype",
                  "amp", "device", "threads", "hf_token")


def check_score_flags(parser, args):
    """--score reads a file and --eval_data; any other flag would be silently ignored, so it is refused."""
    if flag := unused_flag(parser, args, SCORE_KEYS):
        raise UserError(f"--score grades a file and needs no model or training settings; drop {flag}")
    if args.eval_data is None:
        raise UserError("--score needs --eval_data gsm8k, math or the problems file the completions answer")
    if args.max_eval_samples == "all":
        args.max_eval_samples = None
    return args


def count_or_all(text):
    return "all" if text == "all" else positive_int(text)


NOT_A_RUN = "not a run folder of train_math.py (needs run.json and adapter.pt)"


def take_run_settings(args, explicit):
    """--eval_only --load DIR: the model, method and prompt come from the run, and by default its test problems and
    how they were decoded; a flag that contradicts the run is an error rather than a silently different evaluation."""
    run_dir = Path(args.load)
    config = read_saved_run(run_dir, SAVED_RUN, NOT_A_RUN, older="args")  # older: runs from before run.json
    if not (run_dir / "adapter.pt").is_file() and config.get("method") != "none":
        raise UserError(f"--load {run_dir}: {NOT_A_RUN}")
    for key in RUN_KEYS:
        saved = config.get(key, "plain" if key == "protocol" else None)  # older runs: today's plain protocol
        if saved is None:
            continue
        if key in explicit and getattr(args, key) != saved:
            raise UserError(f"--{key} {getattr(args, key)} contradicts the run in --load ({key} {saved!r}); drop "
                            f"--{key}")
        setattr(args, key, saved)
    for key in ("eval_data", "max_eval_samples", "max_new_tokens", "eval_batch_size"):  # unless given: the run's
        if getattr(args, key) is None and key in config:
            setattr(args, key, "all" if key == "max_eval_samples" and config[key] is None else config[key])


def check_flag_combinations(args):
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
# Where the run happens: the copies and their devices, the precision, the folder.

def set_up(args, argv):
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
    return Run(args, ranks, device, functools.partial(autocast, device, AMP[args.amp]), scaler, argv)


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
        folder = Path(args.output_dir or f"out/math-{args.method}")
    check = functools.partial(check_run_dir, folder, args.resume, args.overwrite)  # under the folder's lock
    if args.resume:
        with held(folder, run.ranks, check) as folder:
            yield folder
    else:
        with staged(folder, args.overwrite, run.ranks, check) as stage:
            yield stage


# ----------------------------------------------------------------------------------------------------------
# Model and data: the base model and its prompt format (the examples are read by recipes/math_data.py).

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


# ----------------------------------------------------------------------------------------------------------
# The adapter, and its training: AdamW with warmup + cosine, exact resume, atomic checkpoints.

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


def resume_config(args, train):
    """The settings a checkpoint must share with the run that continues it."""
    return {k: getattr(args, k) for k in RESUME_KEYS[:-1]} | {"n_train": len(train)}


def train_adapter(run, model, adapter, train, ckpt, before):
    """AdamW on the adapter with warmup + cosine; atomic checkpoints; exact resume.  Returns the summary.  A
    non-finite loss raises NonFiniteLoss before anything of that step is saved.

    Several copies (torchrun): each takes my_share of every global batch and divides its loss by the whole
    batch's answer tokens; one sum_gradients after the last micro-batch gives every copy the one-process
    gradient, so clipping, the fp16 scaler's overflow check and AdamW run identically everywhere.  The main copy
    alone writes; the checkpoint is the same whatever the number of copies."""
    args, ranks = run.args, run.ranks
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
    sched, warmup_steps = warmup_then_decay(opt, total_steps, args.warmup_ratio, "cosine")
    state = TrainingState(params, opt, sched, run.scaler, run.device, total_steps, resume_config(args, train),
                          before, data_order=f"numpy default_rng([{args.seed}, epoch]).permutation({len(train)})")
    # resume, then the data order from there
    step = 0
    if ckpt:
        step = run.saved = resume(state, ckpt, run.folder, ranks.main)
        print(f"resumed {run.folder / 'checkpoint.pt'} at step {step}/{total_steps}")
    batch_indices = batch_order(args.seed, len(train), args.batch_size, steps_per_epoch)
    # the loop: forward and backward, the optimiser step, the log, a checkpoint every --save_every steps
    end_step = min(total_steps, args.stop_after) if args.stop_after else total_steps
    print(f"training {total_steps} steps ({total_steps / steps_per_epoch:.2f} epochs) of batch {args.batch_size} "
          f"(micro {args.micro_batch_size}), lr {args.lr}, warmup {warmup_steps}"
          + (f"; stopping after step {end_step}" if end_step < total_steps else ""))
    model.train()
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


def backward(run, model, train, idx):
    """Forward and backward over this copy's share of the batch `idx`, in micro-batches (the prompt is masked).
    --loss example: each example's mean over its answer tokens, divided by the whole batch's size, as the official
    run (one example per forward, 64 accumulated); --loss tokens: each token's loss divided by the whole batch's
    answer tokens. Returns the sum of this copy's losses."""
    args = run.args
    n_targets = sum(train[i][2] for i in idx)  # the whole batch's answer tokens
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
        else:
            part = token_losses.sum() / n_targets
        run.scaler.scale(part).backward()
        loss += part.item()
    return loss


# ----------------------------------------------------------------------------------------------------------
# Evaluation: the adapter merged, greedy decoding of every test problem, both readings of each answer.

def evaluate(run, model, adapter, fmt, items, task):
    """Merge the adapter, generate for every problem, score both readings, write predictions.jsonl; returns the
    numbers.  Each copy generates for its share of the problems; the main copy gets all of them back in order."""
    args, ranks = run.args, run.ranks
    out = {}
    if adapter is not None:
        probe = torch.tensor([items[0]["prompt_ids"] + items[0]["answer_ids"]], device=run.device)
        model, out["merge_max_logit_change"] = merge_for_eval(model, adapter, probe, run.autocast)
        print(f"merged the adapter (max |logit change| from merging {out['merge_max_logit_change']:.2e})")
    # in training-sized batches: logits over the whole vocabulary for every position are what fills memory here
    out["loglik"] = answer_loglik(model, items, args.pad_id, args.micro_batch_size, run.autocast, ranks)
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
                             args.max_new_tokens, stop, fmt.tok.decode, run.device, run.autocast)
        done += zip(rows, why)
    outputs = [None] * len(items)
    for j, row_why in zip(order, gather_shares(done, ranks), strict=True):
        outputs[j] = row_why
    seconds = time.time() - t0
    completions = [cut_at_stop(fmt.tok.decode(new_ids), stop) for new_ids, _ in outputs]
    records, accuracy, groups = score_all(task, items, completions)
    if ranks.main:
        rows = [json.dumps(dict(r, new_tokens=len(ids), ended_by=why)) for r, (ids, why) in zip(records, outputs)]
        atomic_write(run.folder / "predictions.jsonl", lambda f: f.write(("\n".join(rows) + "\n").encode()))
    out.update(**accuracy, max_new_tokens=args.max_new_tokens, generate_seconds=round(seconds, 1), **groups)
    return out


if __name__ == "__main__":
    interrupt_on_sigterm()  # a job scheduler's time limit: the same clean-up and message as Ctrl-C
    with errors_as_exit():  # every copy meets it; the main copy says it
        main()
