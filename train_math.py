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
    python train_math.py --eval_only --load out/a,out/b        # several runs on one base, in mixed batches
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
from unilora.py and projections.py, the training loop from recipes/causal_lm.py, shared with train_instruct.py,
and data, scoring and decoding from recipes/). Outputs in --output_dir: run.json, train_log.jsonl, checkpoint.pt
(--resume), adapter.pt, results.json, predictions.jsonl.
"""
import argparse
import contextlib
import dataclasses
import json
import os
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pretrained.files import atomic_write, write_json
from projections import PROJECTIONS
from recipes.adapters import merge_for_eval
from recipes.causal_lm import (SavedRun, Script, adapt_and_train, add_machine_flags, add_precision_flags,
                               add_run_flags, add_training_flags, check_run_flags, check_signs, complete,
                               count_or_all, load_base, read_run_checkpoint, run_folder, set_up, settle_eval_only)
from recipes.checkpoint import resume_hint
from recipes.generation import answer_loglik, answer_logliks, cut_at_stop, generate
from recipes.math_data import (PROTOCOLS, Formatter, load_eval_items, load_predictions, load_train_examples,
                                protocol_record)
from recipes.math_scoring import ANSWER_MARK, score_all, summary_lines
from recipes.training import (Parser, Ranks, UserError, choice, data_parallel_until_done, errors_as_exit,
                              gather_shares, interrupt_on_sigterm, load_dirs, main_first, my_share,
                              positive_int, printing_on_main_copy, read_saved_run, real, staged, text, unused_flag,
                              whole)
from taskbank import load_tasks

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

# Settings that must match for --resume to continue a run (eval settings, micro-batch size, --stop_after may
# change).  train_sha256 is the training file's content, n_train the examples it gave.
RESUME_KEYS = ("method", "model", "train_data", "train_sha256", "max_train_samples", "prompt_field",
               "response_field", "template", "system_prompt", "protocol", "max_length", "epochs", "max_steps",
               "batch_size", "lr", "warmup_ratio", "weight_decay", "grad_clip", "d", "r", "lora_alpha", "signs",
               "projection", "dropout", "seed", "dtype", "amp", "loss", "group_by_length", "n_train")
# What this script is to the shared loop (recipes/causal_lm.py): the cosine schedule, the data order seeded by --seed.
SCRIPT = Script(name="train_math.py", folder="math", resume_keys=RESUME_KEYS, decay="cosine", data_seed="seed")
# What --eval_only --load takes from the saved run (the model it was trained on, how it was prompted).
RUN_KEYS = ("method", "model", "template", "system_prompt", "protocol", "r", "lora_alpha", "projection")
# What --eval_only reads from a saved run, each value checked: a damaged file, or another script's, is one line.
SAVED_RUN = dict(method=choice(("unilora", "lora", "none")), model=text(), train_data=text(),
                 template=choice(("alpaca", "chat"), null=True), system_prompt=text(null=True),
                 protocol=choice(tuple(PROTOCOLS), null=True), r=whole(null=True), lora_alpha=real(null=True),
                 projection=choice(tuple(PROJECTIONS), null=True), eval_data=text(null=True),
                 max_eval_samples=lambda v: v == "all" or whole(null=True)(v), max_new_tokens=whole(null=True),
                 eval_batch_size=whole(null=True))
NOT_A_RUN = "not a run folder of train_math.py (needs run.json and adapter.pt)"
SAVED = SavedRun(SAVED_RUN, taken=RUN_KEYS, carried=("eval_data", "max_eval_samples", "max_new_tokens",
                                                     "eval_batch_size"), hint=NOT_A_RUN,
                 older={"protocol": "plain"})  # runs from before --protocol: today's plain protocol


# ----------------------------------------------------------------------------------------------------------
# main: the settings, where the run happens, then the experiment as named steps.

def main(argv=None):
    with printing_on_main_copy():  # under torchrun, the first copy alone prints
        args = parse_args(argv)  # every copy checks the flags alike, so a user error stops them all
        if args.score:
            return score_predictions(args)
        argv = sys.argv[1:] if argv is None else list(argv)
        if args.eval_only and len(load_dirs(args.load)) > 1:
            return evaluate_together(args, argv)
        run = set_up(args, argv, SCRIPT)
        with data_parallel_until_done(run.ranks), run_folder(run) as run.folder, resume_hint(run):
            return train_and_evaluate(run)


def train_and_evaluate(run):
    """The experiment: folder, model, data, the base model's score, adapter, training, evaluation, results."""
    args, ranks = run.args, run.ranks
    # model, prompt format
    tok, model, fmt = main_first(ranks, load_model, args, run.device)
    args.pad_id = tok.pad_id if tok.pad_id is not None else fmt.end_id
    # data: the training examples (and the checkpoint they continue), the test problems
    train = main_first(ranks, load_train_examples, args, fmt, ranks) if args.train else None
    ckpt = read_run_checkpoint(run, train)
    task, eval_items = main_first(ranks, load_eval_items, args, fmt) if not args.no_eval else (None, [])
    results = new_results(args, ranks)
    # the base model's score, the adapter and its training (recipes/causal_lm.py: AdamW, warmup + cosine,
    # checkpoints, exact resume; a resumed run kept "before" in its checkpoint)
    before, adapter, ends_here = adapt_and_train(run, model, train, ckpt, eval_items, results)
    if ends_here:  # stopped by --stop_after, or --no_eval
        return results
    # evaluation, results
    return write_results(run, results, before, evaluate(run, model, adapter, fmt, eval_items, task))


def new_results(args, ranks):
    """What results.json says of a run before its numbers: its settings and how it is evaluated."""
    return dict(status="running", method=args.method, model=args.model, recipe=args.recipe,
                projection=args.projection, template=args.template,
                protocol=protocol_record(args.protocol, args.max_new_tokens),
                precision=dict(dtype=args.dtype, amp=args.amp), evaluated_run=args.load, world_size=ranks.world,
                args={k: v for k, v in vars(args).items() if k not in ("hf_token", "pad_id")})


def write_results(run, results, before, after):
    results["before"] = before
    results["after"] = after
    results.update(status="finished", eval_data=str(run.args.eval_data))
    run.save("results.json", results)
    print("\n".join(summary_lines(after)))
    print(f"official accuracy {100 * after['accuracy']:.2f}%; {after['no_answer_mark']} without "
          f"'{ANSWER_MARK.strip()}'; wrote {run.final('results.json')}")
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
    add_training_flags(p, lr_help=f"peak learning rate (default per method: {DEFAULT_LR})",
                       seed_help="projection, LoRA init and data order (recipe: small 0,\n"
                                 "paper 42 as the official run)")
    p.add_argument("--loss", choices=("example", "tokens"),
                   help="example: each example's mean over its answer tokens, averaged over the batch (the\n"
                        "official run: batch 1 x 64 accumulation); tokens: the mean over all answer tokens of\n"
                        "the batch (default: example under --protocol official, tokens under plain)")
    # precision
    add_precision_flags(p, "base weights: auto = bfloat16 on CUDA, float32 on CPU (recipe: small auto, paper\n"
                           "float32 as the official run)",
                        "autocast: auto = bf16 on CUDA (fp16 for float16 weights), none on CPU (recipe: small\n"
                        "auto, paper fp16 with a gradient scaler, as the official run)")
    # runs, checkpoints, evaluation
    p.add_argument("--output_dir", help="run folder (default out/math-<method>; --eval_only: <load>/eval-N)")
    p.add_argument("--out_dir", dest="output_dir", help=argparse.SUPPRESS)  # the earlier spelling
    add_run_flags(p)  # --overwrite, --save_every, --resume, --eval_only
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
    add_machine_flags(p)
    args = p.parse_args(argv)
    if args.score:
        return check_score_flags(p, args)
    if args.eval_only and args.load and len(load_dirs(args.load)) > 1:
        return check_together_flags(p, args)
    if args.adapter:
        args.load = args.load or str(Path(args.adapter).parent)
    settle_eval_only(p, args, EVAL_ONLY_KEYS, SAVED)  # --eval_only: the saved run's settings
    complete(args, RECIPES[args.recipe], DEFAULT_LR)  # the method, then the recipe's values for unset flags
    if args.loss is None:
        args.loss = "example" if args.protocol == "official" else "tokens"
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


def check_flag_combinations(args):
    check_run_flags(args)  # --resume, --overwrite, --no_eval, the batch (recipes/causal_lm.py)
    for flag, source in (("--train_data", args.train_data if args.train else None),
                         ("--eval_data", None if args.no_eval else args.eval_data)):
        named = source in (None, "metamathqa", "gsm8k", "math") or re.match(r"https?://", source)
        if not named and not Path(source).expanduser().is_file():
            raise UserError(f"data file {source} does not exist ({flag}); pass a .json/.jsonl path, a URL, or "
                            f"metamathqa / gsm8k / math to download")
    check_signs(args)
    if args.protocol == "official" and args.template != "alpaca":
        raise UserError("--protocol official uses the Alpaca prompt of the official code; pass --template alpaca, "
                        "or --protocol plain to train with the chat template")


# ----------------------------------------------------------------------------------------------------------
# Model: the base model and its prompt format (the examples are read by recipes/math_data.py; where the run happens,
# the adapter and its training are recipes/causal_lm.py's).

def load_model(args, device):
    model_dir, tok, model = load_base(args, device)
    fmt = Formatter(tok, args.template, model_dir, model.config, args.system_prompt, args.protocol)
    print(f"model {args.model} ({sum(x.numel() for x in model.parameters()) / 1e6:.1f}M params) on {device}, "
          f"weights {args.dtype}, autocast {args.amp}; template {args.template}, protocol {args.protocol}")
    return tok, model, fmt


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
    return out | scored(run, fmt, items, task, outputs, time.time() - t0)


def scored(run, fmt, items, task, outputs, seconds):
    """Both readings of every problem's completion (outputs: its new token ids, why it ended), predictions.jsonl
    written; returns the numbers."""
    stop = PROTOCOLS[run.args.protocol]["stop"]
    completions = [cut_at_stop(fmt.tok.decode(new_ids), stop) for new_ids, _ in outputs]
    records, accuracy, groups = score_all(task, items, completions)
    if run.ranks.main:
        rows = [json.dumps(dict(r, new_tokens=len(ids), ended_by=why)) for r, (ids, why) in zip(records, outputs)]
        atomic_write(run.folder / "predictions.jsonl", lambda f: f.write(("\n".join(rows) + "\n").encode()))
    return dict(**accuracy, max_new_tokens=run.args.max_new_tokens, generate_seconds=round(seconds, 1), **groups)


# ----------------------------------------------------------------------------------------------------------
# --eval_only --load A,B,...: Uni-LoRA runs of one base and P evaluated in one process, their problems mixed.

# The flags a list takes (each run keeps the rest of its own settings); what its runs must share.
TOGETHER_FLAGS = ("eval_only", "load", "eval_batch_size", "max_new_tokens", "device", "threads", "hf_token", "data_dir")
TOGETHER_KEYS = ("model", "d", "r", "seed", "projection", "signs", "dtype", "amp")
TRAINED = dict(d=whole(null=True), seed=whole(low=0, null=True), signs=choice((True, False), null=True))  # run.json's


def check_together_flags(parser, args):
    if flag := unused_flag(parser, args, TOGETHER_FLAGS):
        raise UserError(f"{flag} does not apply to --eval_only with several --load folders: each run is evaluated "
                        f"with its own run.json's settings, into its own DIR/eval-N; drop it")
    if "" in load_dirs(args.load):
        raise UserError(f"--load {args.load}: an empty folder name in the list")
    return args


def evaluate_together(args, argv):
    """Each run's settings as its own --eval_only --load DIR takes them; the base loaded once, every run's theta_d in
    one bank (taskbank.py); all runs' problems in one stream shuffled with seed 0 (then longest first), every
    batch in bank.rows (row i through its own run's adapter); each run's predictions.jsonl and results.json in
    its own DIR/eval-N, as its own --eval_only writes them. Returns their results, in --load order."""
    given = [x for k in TOGETHER_FLAGS[2:] if getattr(args, k) is not None for x in (f"--{k}", str(getattr(args, k)))]
    runs = [parse_args(["--eval_only", "--load", d, *given]) for d in load_dirs(args.load)]
    check_together(runs)
    run = set_up(runs[0], argv, SCRIPT)  # the device, the precision (resolved once, for all), the copies
    runs, results = [dataclasses.replace(run, args=a) for a in runs], []
    with data_parallel_until_done(run.ranks), contextlib.ExitStack() as stack:
        for r in runs:  # the eval-N folders appear together, once every run is scored; an error leaves none
            r.args.dtype, r.args.amp = run.args.dtype, run.args.amp
            r.folder = stack.enter_context(run_folder(r))
        model_dir, tok, model = main_first(run.ranks, load_base, run.args, run.device)
        bank, fmts, tests = load_bank(model, runs), [], []  # tests: each run's (task, items)
        for a in (r.args for r in runs):
            fmts.append(Formatter(tok, a.template, model_dir, model.config, a.system_prompt, a.protocol))
            a.pad_id = tok.pad_id if tok.pad_id is not None else fmts[-1].end_id
            tests.append(main_first(run.ranks, load_eval_items, a, fmts[-1]))
        stream = [(k, j) for k, (_, items) in enumerate(tests) for j in range(len(items))]
        random.Random(0).shuffle(stream)  # then longest prompts first, as one run's: little padding, runs mixed
        stream.sort(key=lambda kj: -len(tests[kj[0]][1][kj[1]]["gen_ids"]))
        model.eval()
        logliks = mixed_logliks(runs, model, bank, stream, tests)
        t0 = time.time()
        outputs = mixed_outputs(runs, fmts, model, bank, stream, tests)
        seconds = time.time() - t0  # of all runs' decoding: each run's generate_seconds
        for r, fmt, (task, items), loglik, out in zip(runs, fmts, tests, logliks, outputs):
            record = new_results(r.args, run.ranks) | dict(together=[a.args.load for a in runs],
                                                           params=bank.adapter.counts())
            after = dict(loglik=loglik) | scored(r, fmt, items, task, out, seconds)
            results.append(write_results(r, record, None, after))
    print(f"{len(stream)} problems of {len(runs)} runs on one {run.args.model}, in mixed batches: decoded in "
          f"{seconds:.1f} s")
    return results


def check_together(runs):
    """Uni-LoRA runs, each once, of one model, d, r, seed, projection and signs (one base and P), one precision."""
    def shared(a):
        saved = read_saved_run(a.load, TRAINED, NOT_A_RUN, older="args")
        return {k: saved.get(k) if k in TRAINED else getattr(a, k) for k in TOGETHER_KEYS}
    first, folders = shared(runs[0]), [Path(a.load).resolve() for a in runs]
    for a, folder in zip(runs, folders):
        if a.method != "unilora":
            raise UserError(f"--load {a.load} is a --method {a.method} run: only Uni-LoRA runs are evaluated together")
        if folders.count(folder) > 1:
            raise UserError(f"--load names {a.load} twice")
        for key, value in shared(a).items():
            if value != first[key]:
                raise UserError(f"--load {runs[0].load} and {a.load} differ in {key} ({first[key]} vs {value}): runs "
                                f"evaluated together share one base, P and precision; evaluate them one by one")


def load_bank(model, runs):
    """Every run's adapter.pt in one bank on the model (outside bank.rows, the model is the first run's adapter)."""
    files = {str(k): str(Path(r.args.load) / "adapter.pt") for k, r in enumerate(runs)}
    try:
        return load_tasks(model, files, projection=PROJECTIONS[runs[0].args.projection])
    except (ValueError, OSError, RuntimeError) as e:  # a file the bank refuses (read_adapter_file: ValueError)
        raise UserError(f"--load: {' '.join(str(e).split())}") from None


def mixed_logliks(runs, model, bank, stream, tests):
    """Each run's mean answer log-likelihood (answer_loglik), its problems scored among the other runs'."""
    run = runs[0]
    got = mixed_batches(runs, bank, stream, "micro_batch_size", "loglik", lambda part, _: answer_logliks(
        model, [tests[k][1][j] for k, j in part], run.args.pad_id, run.autocast, run.device))  # right pads: unseen
    return [float(np.mean([got[k, j] for j in range(len(items))])) for k, (_, items) in enumerate(tests)]


def mixed_outputs(runs, fmts, model, bank, stream, tests):
    """Each run's (new token ids, why it ended) for every problem, decoded greedily among the other runs'; a row
    decodes by its own run's rules (pad and end token, budget, stop strings): rows of other rules apart."""
    run = runs[0]
    rules = [(r.args.pad_id, f.end_id, r.args.max_new_tokens, PROTOCOLS[r.args.protocol]["stop"])
             for r, f in zip(runs, fmts)]
    got = mixed_batches(runs, bank, stream, "eval_batch_size", "generate", lambda part, rule: zip(*generate(
        model, [tests[k][1][j]["gen_ids"] for k, j in part], *rule, fmts[0].tok.decode, run.device, run.autocast)),
        rules.__getitem__)
    return [[got[k, j] for j in range(len(items))] for k, (_, items) in enumerate(tests)]


def mixed_batches(runs, bank, stream, size, desc, step, rule=lambda k: None):
    """{(run, problem): its result}: this copy's share of the stream in batches of the runs' smallest `size`
    setting, the rows of one rule(run) together, each through step(rows, rule) inside bank.rows (row i: its own
    run's adapter)."""
    size, ranks, done = min(getattr(r.args, size) for r in runs), runs[0].ranks, []
    mine = my_share(stream, ranks)
    for i in tqdm(range(0, len(mine), size), desc=desc, dynamic_ncols=True, disable=not ranks.main):
        for same in dict.fromkeys(rule(k) for k, _ in mine[i:i + size]):
            part = [(k, j) for k, j in mine[i:i + size] if rule(k) == same]
            with bank.rows([str(k) for k, _ in part]):
                done += zip(part, step(part, same))
    return dict(gather_shares(done, ranks))


if __name__ == "__main__":
    interrupt_on_sigterm()  # a job scheduler's time limit: the same clean-up and message as Ctrl-C
    with errors_as_exit():  # every copy meets it; the main copy says it
        main()
