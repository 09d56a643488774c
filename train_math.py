"""Fine-tune a Llama-family causal LM on math word problems with Uni-LoRA, then measure GSM8K accuracy.

This is the paper's second experiment (Uni-LoRA, NeurIPS 2025, Sec. "Mathematical reasoning") as one plain
script: MetaMathQA-style (question, worked solution) pairs, an Alpaca prompt, the loss on the response only,
AdamW on the single trainable vector theta_d with a cosine schedule, then merge the adapter into the base
weights and greedy-decode the GSM8K test set, reading the number after "The answer is:".

    python train_math.py                      # small recipe: SmolLM2-135M-Instruct, laptop-sized
    python train_math.py --recipe paper       # the paper's 7B recipe (needs a GPU; see the README)
    python train_math.py --method lora        # plain-LoRA baseline through the same pipeline
    python train_math.py --method none        # the base model, no training

It needs only torch, numpy and tqdm: models, tokenizers, hub downloads and KV-cache generation come from
pretrained.py, the adapters from unilora.py.  Outputs go to --out_dir: results.json, predictions.jsonl,
adapter.pt, checkpoint.pt (resume with --resume) and train_log.jsonl.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import sys
import time
from decimal import Decimal, InvalidOperation
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import unilora
from pretrained import CausalLM, Tokenizer, atomic_write, download, pad, resolve



class UserError(Exception):
    """A problem the user can fix (bad flag, bad data file); printed without a traceback."""


# ----------------------------------------------------------------------------------------------------------
# Recipes.  Every flag left unset on the command line takes its value from the chosen recipe, so the paper's
# setup is one flag away and any single value can still be overridden.

RECIPES = {
    # Runs on a laptop CPU.  SmolLM2-135M-Instruct is a LlamaForCausalLM (the architecture pretrained.py
    # implements), 135M parameters, Apache-2.0 and ungated; its tokenizer splits every digit, which suits
    # arithmetic.  D (r=4, all linear layers) is 1.22M; d = 2^16 keeps d/D near the paper's Gemma-7B ratio
    # (524,288 / 12.5M = 4.2%).
    "small": dict(
        model="HuggingFaceTB/SmolLM2-135M-Instruct", train_data="metamathqa", max_train_samples=2000,
        eval_data="gsm8k", max_eval_samples=200, template="alpaca", max_length=384, epochs=1, batch_size=16,
        micro_batch_size=4, d=65536, r=4, signs="on", warmup_ratio=0.02, max_new_tokens=256,
        eval_batch_size=16, save_every=25,
    ),
    # The paper: Gemma-7B / Mistral-7B, all linear layers except lm_head, r=4, d=2^19, first 100K MetaMathQA
    # examples, Alpaca prompt, max length 512, 2 epochs, effective batch 64, theta_d lr 2e-3, cosine, 2% warmup,
    # no weight decay, full GSM8K test, and the paper's P without signs.  Mistral is the default model because
    # pretrained.py loads Llama/Mistral/Qwen2 checkpoints; Gemma needs a Gemma-capable loader.
    "paper": dict(
        model="mistralai/Mistral-7B-v0.1", train_data="metamathqa", max_train_samples=100_000,
        eval_data="gsm8k", max_eval_samples=None, template="alpaca", max_length=512, epochs=2, batch_size=64,
        micro_batch_size=4, d=524_288, r=4, signs="off", warmup_ratio=0.02, max_new_tokens=512,
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
METAMATHQA = ("meta-math/MetaMathQA", "MetaMathQA-395K.json")
GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{split}.jsonl"

# Fields that must match for --resume to continue a run; anything else (eval settings, micro-batch size,
# --stop_after) may change between the two invocations.
RESUME_KEYS = ("method", "model", "train_data", "max_train_samples", "prompt_field", "response_field", "template",
               "system_prompt", "max_length", "epochs", "max_steps", "batch_size", "lr", "warmup_ratio",
               "weight_decay", "grad_clip", "d", "r", "lora_alpha", "signs", "dropout", "seed")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES), default="small", help="defaults for unset flags (small)")
    p.add_argument("--method", choices=("unilora", "lora", "none"), default="unilora",
                   help="unilora (default), lora (baseline), none (evaluate the base model)")
    p.add_argument("--model", help="hub name or local folder (recipe)")
    # data
    p.add_argument("--train_data", help="metamathqa | gsm8k | path to .json/.jsonl | http(s) URL (recipe)")
    p.add_argument("--prompt_field", help="question field of --train_data (auto: query, question, instruction)")
    p.add_argument("--response_field", help="answer field of --train_data (auto: response, answer, output)")
    p.add_argument("--max_train_samples", type=int, help="use the first N training examples (recipe)")
    p.add_argument("--eval_data", help="gsm8k | path | URL; fields question/answer or query/response (recipe)")
    p.add_argument("--max_eval_samples", type=int, help="evaluate the first N problems; 0 = all (recipe)")
    p.add_argument("--data_dir", default=os.environ.get("UNILORA_DATA", str(Path.home() / ".cache/unilora/data")),
                   help="where downloaded data files are kept (env UNILORA_DATA)")
    p.add_argument("--template", choices=("alpaca", "chat"), help="prompt format (recipe: alpaca)")
    p.add_argument("--system_prompt", help="chat template only: replaces the template's default system message")
    p.add_argument("--max_length", type=int, help="truncate prompt+response to this many tokens (recipe)")
    # optimisation
    p.add_argument("--epochs", type=int, help="passes over the training data (recipe)")
    p.add_argument("--max_steps", type=int, help="optimizer steps; overrides --epochs (schedule follows it)")
    p.add_argument("--stop_after", type=int, help="exit after this many steps with a checkpoint (job time limits)")
    p.add_argument("--batch_size", type=int, help="effective batch size (recipe)")
    p.add_argument("--micro_batch_size", type=int, help="examples per forward; accumulation fills the batch")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default per method: {DEFAULT_LR})")
    p.add_argument("--warmup_ratio", type=float, help="fraction of steps of linear warmup (recipe)")
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm; 0 = off")
    p.add_argument("--d", type=int, help="Uni-LoRA: length of theta_d (recipe)")
    p.add_argument("--r", type=int, help="LoRA rank of both methods (recipe: 4)")
    p.add_argument("--lora_alpha", type=float, help="LoRA baseline scale alpha/r (default alpha = r)")
    p.add_argument("--signs", choices=("on", "off"), help="Uni-LoRA: random +-1 per row of P (on), or the "
                   "paper's all-positive P (off) (recipe: small on, paper off)")
    p.add_argument("--dropout", type=float, default=0.0, help="adapter dropout on the layer input")
    p.add_argument("--seed", type=int, default=0, help="projection, LoRA init and data order")
    # checkpoints, evaluation
    p.add_argument("--out_dir", help="default out/math-<method>")
    p.add_argument("--save_every", type=int, help="checkpoint every N steps (recipe)")
    p.add_argument("--resume", action="store_true", help="continue from <out_dir>/checkpoint.pt")
    p.add_argument("--eval_only", action="store_true", help="skip training; with --adapter evaluate that adapter")
    p.add_argument("--adapter", help="adapter file (adapter.pt) to evaluate with --eval_only")
    p.add_argument("--no_eval", action="store_true", help="train only")
    p.add_argument("--max_new_tokens", type=int, help="generation budget per problem (recipe)")
    p.add_argument("--eval_batch_size", type=int, help="problems decoded together, left-padded (recipe)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice); on a machine "
                   "shared with other jobs 1 is often fastest")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="base weights: auto = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--hf_token", default=os.environ.get("HF_TOKEN"), help="for gated models (env HF_TOKEN)")
    args = p.parse_args(argv)

    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.lr is None and args.method != "none":
        args.lr = DEFAULT_LR[args.method]
    if args.out_dir is None:
        args.out_dir = f"out/math-{args.method}"
    if args.max_eval_samples == 0:
        args.max_eval_samples = None
    if args.method == "none":
        args.eval_only = True
    if args.adapter and not args.eval_only:
        raise UserError("--adapter is for --eval_only; to continue training use --resume")
    if args.adapter and args.method == "none":
        raise UserError("--adapter needs --method unilora or lora (the kind of adapter it is)")
    if args.resume and args.eval_only:
        raise UserError("--resume continues training; to evaluate a finished run pass --eval_only --adapter "
                        "<out_dir>/adapter.pt")
    if args.eval_only and args.no_eval:
        raise UserError("--eval_only with --no_eval does nothing; drop one of them")
    if args.micro_batch_size > args.batch_size or args.batch_size % args.micro_batch_size:
        raise UserError(f"--batch_size {args.batch_size} must be a multiple of --micro_batch_size "
                        f"{args.micro_batch_size}")
    return args


# ----------------------------------------------------------------------------------------------------------
# Data: read (question, solution) pairs, with errors that say which file and line is bad.

def fetch(source, split, data_dir, token):
    """Turn --train_data/--eval_data into a local file, downloading it once into data_dir."""
    if source == "metamathqa":
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        repo, name = METAMATHQA
        url, dest = f"{endpoint}/datasets/{repo}/resolve/main/{name}", Path(data_dir) / repo.replace("/", "--") / name
    elif source == "gsm8k":
        url, dest = GSM8K_URL.format(split=split), Path(data_dir) / "gsm8k" / f"{split}.jsonl"
    elif re.match(r"https?://", source):
        tag = hashlib.sha1(source.encode()).hexdigest()[:12]
        url, dest = source, Path(data_dir) / "urls" / tag / source.rstrip("/").rsplit("/", 1)[-1]
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserError(f"data file {path} does not exist; pass a .json/.jsonl path, a URL, or "
                            f"metamathqa / gsm8k to download")
        return path
    if not dest.is_file():
        print(f"downloading {url} -> {dest}")
        try:
            download(url, dest, token=token)
        except Exception as e:  # network, 404, auth: all need the same advice
            raise UserError(f"could not download {url} ({e}); without network, pass a local file instead "
                            f"(e.g. --train_data ~/.cache/unilora-assets/gsm8k/train.jsonl)") from e
    return dest


def read_records(path):
    """A .json array (MetaMathQA ships one) or JSONL; returns [(where, dict)] with where = 'file:line'."""
    text = Path(path).read_text(encoding="utf-8")
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


def pick_fields(records, prompt_field, response_field, path):
    """Explicit fields win; otherwise recognise MetaMathQA, GSM8K or Alpaca field names."""
    keys = records[0][1].keys()
    if prompt_field is None or response_field is None:
        for q, a in (("query", "response"), ("question", "answer"), ("instruction", "output")):
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
# Answers: what the model said, and whether it equals the reference.

NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")


def normalize_number(s):
    """'1,234.00' -> '1234', '$5' -> '5', '0.50' -> '0.5'; None if it is not a number."""
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        x = Decimal(s)
    except InvalidOperation:
        return None
    if not x.is_finite():
        return None
    return str(int(x)) if x == x.to_integral_value() else format(x.normalize(), "f")


def extract_answer(text):
    """Returns (answer or None, rule).  Rules in order: the number after the last 'The answer is' (MetaMathQA),
    after the last '####' (GSM8K), else the last number in the text.  '$' is dropped first so '$1,200' reads
    as 1200."""
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
    """Builds the prompt text, and the token ids of prompt + response + end token with the prompt masked."""

    def __init__(self, tok, template, model_dir, config, system_prompt=None):
        self.tok = tok
        if template == "alpaca":
            self.render, self.sep = (lambda query: ALPACA_PROMPT.format(query=query)), " "
            # MetaMath-style training code glues the response straight onto "### Response:"; one space gives
            # the first word its usual word-initial token.
            end = tok.eos_id if tok.eos_id is not None else config.get("eos_token_id")
            end = end[0] if isinstance(end, list) else end
        else:
            render = chatml_prompt_builder(model_dir, system_prompt)
            self.render, self.sep = render, ""
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

    def split(self, query, response):
        """(prompt ids, response ids) without the end token.  The prompt is tokenised alone and together with
        the response: the joint ids are what the tokenizer naturally produces, and when the prompt ids are
        their prefix (the usual case) evaluation sees exactly the prefix that training saw.  Otherwise the two
        parts are tokenised apart and concatenated, which keeps that guarantee, and the case is counted."""
        prompt = self.render(query)
        p = self.tok.encode(prompt).ids
        full = self.tok.encode(prompt + self.sep + response).ids
        if full[:len(p)] != p:
            self.boundary_fixes += 1
            return p, self.tok.encode(self.sep + response, add_special_tokens=False).ids
        return p, full[len(p):]

    def example(self, query, response, max_length):
        """(ids, labels, truncated): labels are -100 on the prompt, so the loss covers the response and the end
        token only."""
        p, r = self.split(query, response)
        ids = p + r + [self.end_id]
        labels = [-100] * len(p) + r + [self.end_id]
        return ids[:max_length], labels[:max_length], len(ids) > max_length


# ----------------------------------------------------------------------------------------------------------
# Small helpers.

def write_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def pad_batch(seqs, pad_id, left=False, labels=None):
    """(ids, attention mask, labels or None) for token lists; labels are padded with -100 (ignored by the loss)."""
    mask = pad([[1] * len(s) for s in seqs], 0, left)
    return pad(seqs, pad_id, left), mask, None if labels is None else pad(labels, -100, left)


@torch.no_grad()
def answer_loglik(model, items, pad_id, batch_size, device, autocast):
    """Teacher-forced log p(reference solution | prompt), averaged over the solution's tokens for each problem
    (EOS excluded), then over problems.  It moves smoothly where accuracy of a small model sits near zero."""
    model.eval()
    scores = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        seqs = [it["prompt_ids"] + it["answer_ids"] for it in chunk]
        labels = [[-100] * len(it["prompt_ids"]) + it["answer_ids"] for it in chunk]
        ids, mask, lab = pad_batch(seqs, pad_id, labels=labels)
        ids, mask, lab = ids.to(device), mask.to(device), lab.to(device)
        with autocast():
            logits = model(ids, attention_mask=mask)
        logits, target = logits[:, :-1].float(), lab[:, 1:]
        keep = target != -100
        lp = torch.zeros_like(target, dtype=torch.float)
        sel = logits[keep]
        lp[keep] = sel.gather(1, target[keep][:, None])[:, 0] - torch.logsumexp(sel, dim=-1)
        scores += (lp.sum(1) / keep.sum(1)).tolist()
    return float(np.mean(scores))


def load_eval_items(args, fmt):
    path = fetch(args.eval_data, "test", args.data_dir, args.hf_token)
    records = read_records(path)
    if args.max_eval_samples is not None:
        records = records[:args.max_eval_samples]  # a fixed subset: always the first N, never sampled
    q_field, a_field = pick_fields(records, None, None, path)
    items = []
    for question, answer, where in get_pairs(records, q_field, a_field):
        solution = to_metamath_format(answer)
        ref, rule = extract_answer(solution)
        if rule != "answer_is" or ref is None:
            raise UserError(f"{where}: the reference answer does not end in '#### <number>' or 'The answer is: "
                            f"<number>', so it cannot be scored")
        prompt_ids, answer_ids = fmt.split(question, solution)
        items.append(dict(question=question, reference=ref, prompt_ids=prompt_ids, answer_ids=answer_ids))
    return path, items


def lr_lambda_factory(total_steps, warmup_steps):
    """Linear warmup then cosine decay to zero; step s (0-based) trains with the factor at s."""
    def factor(s):
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        progress = (s - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


# ----------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, adapter_path = out_dir / "checkpoint.pt", out_dir / "adapter.pt"
    if ckpt_path.exists() and not args.resume and not args.eval_only:
        raise UserError(f"{ckpt_path} exists; pass --resume to continue that run, or choose another --out_dir")
    if args.resume and not ckpt_path.exists():
        raise UserError(f"--resume: no checkpoint at {ckpt_path}; drop --resume to start a new run")

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    # bf16 autocast on CUDA as in the paper; on CPU bf16 matmuls are slow on most machines, so fp32 there.
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda"
                else contextlib.nullcontext)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)

    # ---- model and tokenizer
    try:
        model_dir = resolve(args.model, token=args.hf_token)
    except OSError as e:  # not found, gated, offline: pretrained.py's message already says what to do
        raise UserError(str(e)) from e
    config = json.loads((Path(model_dir) / "config.json").read_text())
    tok = Tokenizer.from_pretrained(model_dir)
    model = CausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    for prm in model.parameters():
        prm.requires_grad_(False)
    fmt = Formatter(tok, args.template, model_dir, config, args.system_prompt)
    pad_id = tok.pad_id if tok.pad_id is not None else fmt.end_id
    print(f"model {args.model} ({sum(x.numel() for x in model.parameters()) / 1e6:.1f}M params) on {device}, "
          f"{dtype}; template {args.template}; end token {fmt.end_id}")

    # ---- training data
    train = []
    if not args.eval_only:
        path = fetch(args.train_data, "train", args.data_dir, args.hf_token)
        records = read_records(path)[:args.max_train_samples]
        q_field, a_field = pick_fields(records, args.prompt_field, args.response_field, path)
        args.prompt_field, args.response_field = q_field, a_field
        n_truncated = n_dropped = n_converted = 0
        pairs = get_pairs(records, q_field, a_field)
        for query, response, where in tqdm(pairs, desc="tokenize", disable=len(pairs) < 5000, dynamic_ncols=True):
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
        print(f"train: {len(train)} examples from {path} (fields {q_field}/{a_field}); "
              f"{n_converted} '#### n' answers converted to 'The answer is: n'; {n_truncated} truncated to "
              f"{args.max_length} tokens, {n_dropped} dropped (no answer left); tokens mean {np.mean(lengths):.0f}"
              f" max {max(lengths)}" + (f"; {fmt.boundary_fixes} prompt/response boundaries re-tokenised"
                                        if fmt.boundary_fixes else ""))

    # ---- resume: the checkpoint must come from the same run settings (checked before anything slow happens)
    ckpt = run_config = None
    if not args.eval_only:
        run_config = {k: getattr(args, k) for k in RESUME_KEYS} | {"n_train": len(train)}
    if args.resume:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        changed = [f"{k}: {ckpt['config'].get(k)!r} -> {v!r}" for k, v in run_config.items()
                   if ckpt["config"].get(k) != v]
        if changed:
            raise UserError(f"{ckpt_path} was made with other settings ({'; '.join(changed)}); rerun with the "
                            f"original flags or start a new --out_dir")

    eval_items = []
    if not args.no_eval:
        eval_path, eval_items = load_eval_items(args, fmt)
        print(f"eval: first {len(eval_items)} problems of {eval_path}")

    results = dict(method=args.method, model=args.model, recipe=args.recipe, template=args.template,
                   args={k: v for k, v in vars(args).items() if k != "hf_token"})

    # ---- "before": the untouched base model (a resumed run kept the number in its checkpoint)
    before = ckpt.get("before") if ckpt else None
    if eval_items and not args.eval_only and before is None:
        t0 = time.time()
        before = {"loglik": answer_loglik(model, eval_items, pad_id, args.eval_batch_size, device, autocast)}
        print(f"before training: mean answer log-likelihood {before['loglik']:.4f} ({time.time() - t0:.0f}s)")

    # ---- adapter (none for --method none, and for --eval_only without --adapter: that evaluates the base)
    adapter = None
    try:
        if args.method == "unilora" and args.adapter:
            adapter = unilora.load_unilora(model, args.adapter)
        elif args.method == "unilora" and not args.eval_only:
            adapter = unilora.apply_unilora(model, args.d, r=args.r, seed=args.seed, signs=args.signs == "on",
                                            dropout=args.dropout)
        elif args.method == "lora" and (args.adapter or not args.eval_only):
            adapter = unilora.apply_lora(model, r=args.r, alpha=args.lora_alpha, dropout=args.dropout)
            if args.adapter:
                adapter.load(args.adapter)
    except (ValueError, FileNotFoundError) as e:  # d > D, a missing or mismatched adapter file
        raise UserError(str(e)) from e
    if adapter is not None:
        results["params"] = adapter.counts()
        print(f"{args.method}: {results['params']}")

    # ---- optimizer, schedule, resume
    if not args.eval_only:
        steps_per_epoch = len(train) // args.batch_size
        if steps_per_epoch == 0 and args.max_steps is None:
            raise UserError(f"{len(train)} examples do not fill one batch of {args.batch_size}; lower "
                            f"--batch_size or use more data")
        total_steps = args.max_steps or args.epochs * steps_per_epoch
        steps_per_epoch = max(1, steps_per_epoch)
        warmup_steps = max(1, math.ceil(args.warmup_ratio * total_steps)) if args.warmup_ratio > 0 else 0
        params = list(adapter.parameters())
        opt = torch.optim.AdamW([{"params": params, "weight_decay": args.weight_decay}], lr=args.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda_factory(total_steps, warmup_steps))

        step = 0
        if ckpt:
            with torch.no_grad():
                for prm, saved in zip(params, ckpt["adapter_params"], strict=True):
                    prm.copy_(saved)
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            torch.set_rng_state(ckpt["torch_rng"])
            if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
            step = ckpt["step"]
            # steps logged after the checkpoint was written will be trained again: drop them from the log
            log_path = out_dir / "train_log.jsonl"
            kept = [x for x in log_path.read_text().splitlines() if json.loads(x)["step"] <= step] \
                if log_path.exists() else []
            atomic_write(log_path, lambda f: f.write("".join(x + "\n" for x in kept).encode()))
            print(f"resumed {ckpt_path} at step {step}/{total_steps}")

        # Data order: epoch e visits the examples in default_rng([seed, e]).permutation(n).  It depends only on
        # (seed, epoch), so a resumed run recomputes exactly the batches it had not yet seen from the step.
        def batch_indices(s):
            epoch, k = divmod(s, steps_per_epoch)
            order = np.random.default_rng([args.seed, epoch]).permutation(len(train))
            return order[k * args.batch_size:(k + 1) * args.batch_size]

        def save_checkpoint(s):
            adapter.save(adapter_path, overwrite=True)
            state = dict(step=s, total_steps=total_steps, config=run_config, before=before,
                         adapter_params=[x.detach().cpu().clone() for x in params],
                         optimizer=opt.state_dict(), scheduler=sched.state_dict(), torch_rng=torch.get_rng_state(),
                         cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                         data_order=f"numpy default_rng([{args.seed}, epoch]).permutation({len(train)})")
            atomic_write(ckpt_path, lambda f: torch.save(state, f))

        end_step = min(total_steps, args.stop_after) if args.stop_after else total_steps
        print(f"training {total_steps} steps ({total_steps / steps_per_epoch:.2f} epochs) of batch "
              f"{args.batch_size} (micro {args.micro_batch_size}), lr {args.lr}, warmup {warmup_steps}"
              + (f"; stopping after step {end_step}" if end_step < total_steps else ""))
        model.train()
        t0 = time.time()
        bar = tqdm(range(step, end_step), initial=step, total=total_steps, desc=f"train {args.method}",
                   dynamic_ncols=True)
        with open(out_dir / "train_log.jsonl", "a") as log:
            for s in bar:
                idx = batch_indices(s)
                n_targets = sum(train[i][2] for i in idx)  # normalise by the whole batch's answer tokens
                loss = 0.0
                for j in range(0, len(idx), args.micro_batch_size):
                    micro = [train[i] for i in idx[j:j + args.micro_batch_size]]
                    ids, mask, lab = pad_batch([m[0] for m in micro], pad_id, labels=[m[1] for m in micro])
                    ids, mask, lab = ids.to(device), mask.to(device), lab.to(device)
                    with autocast():
                        logits = model(ids, attention_mask=mask)
                    part = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), lab[:, 1:].flatten(),
                                           ignore_index=-100, reduction="sum") / n_targets
                    part.backward()
                    loss += part.item()
                if not math.isfinite(loss):
                    raise RuntimeError(f"loss is {loss} at step {s + 1}; lower --lr (now {args.lr})")
                grad_norm = (torch.nn.utils.clip_grad_norm_(params, args.grad_clip) if args.grad_clip > 0
                             else torch.linalg.vector_norm(torch.cat([x.grad.flatten() for x in params])))
                lr_now = opt.param_groups[0]["lr"]
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr_now:.2e}")
                log.write(json.dumps(dict(step=s + 1, loss=loss, lr=lr_now, grad_norm=float(grad_norm),
                                          seconds=round(time.time() - t0, 1))) + "\n")
                log.flush()
                if (s + 1) % args.save_every == 0 or s + 1 == end_step:
                    save_checkpoint(s + 1)
        bar.close()
        if end_step == step:
            print(f"checkpoint already at step {step}; nothing left to train")
        logged = [json.loads(x) for x in (out_dir / "train_log.jsonl").read_text().splitlines()]
        results["train"] = dict(data=str(args.train_data), examples=len(train), steps=total_steps,
                                batch_size=args.batch_size, lr=args.lr, first_loss=logged[0]["loss"],
                                last_loss=logged[-1]["loss"], seconds=round(time.time() - t0, 1))
        if end_step < total_steps:
            print(f"stopped after step {end_step} of {total_steps} as asked; continue with --resume")
            return results

    if args.no_eval:
        write_json(out_dir / "results.json", results)
        return results

    # ---- evaluation: merge, then greedy decoding with the KV cache
    if before is not None:
        results["before"] = before
    if adapter is not None:
        probe = eval_items[0]["prompt_ids"] + eval_items[0]["answer_ids"]
        probe = torch.tensor([probe], device=device)
        model.eval()
        with torch.no_grad(), autocast():
            ref_logits = model(probe).float()
            model = adapter.merge()  # dW folded into W: inference costs exactly what the base model costs
            gap = (model(probe).float() - ref_logits).abs().max().item()
        print(f"merged the adapter (max |logit change| from merging {gap:.2e})")
        results["merge_max_logit_change"] = gap
    model.eval()
    t0 = time.time()
    after = {"loglik": answer_loglik(model, eval_items, pad_id, args.eval_batch_size, device, autocast)}
    print(f"{'after training' if not args.eval_only else 'model'}: mean answer log-likelihood "
          f"{after['loglik']:.4f} ({time.time() - t0:.0f}s)")

    # Longest prompts first: batches hold similar lengths, so little left padding, and an out-of-memory error
    # shows up in the first batch, not the last.
    order = sorted(range(len(eval_items)), key=lambda i: -len(eval_items[i]["prompt_ids"]))
    outputs = [None] * len(eval_items)
    t0 = time.time()
    for i in tqdm(range(0, len(order), args.eval_batch_size), desc="generate", dynamic_ncols=True):
        chunk = order[i:i + args.eval_batch_size]
        ids, mask, _ = pad_batch([eval_items[j]["prompt_ids"] for j in chunk], pad_id, left=True)
        with torch.no_grad(), autocast():
            new = model.generate(ids.to(device), mask.to(device), args.max_new_tokens, eos_token_id=fmt.end_id)
        for j, row in zip(chunk, new.tolist()):
            outputs[j] = row[:row.index(fmt.end_id)] if fmt.end_id in row else row
    gen_seconds = time.time() - t0

    correct, rules = 0, {}
    rows = []
    for item, out in zip(eval_items, outputs):
        text = tok.decode(out)
        pred, rule = extract_answer(text)
        ok = same_number(pred, item["reference"])
        correct += ok
        rules[rule] = rules.get(rule, 0) + 1
        rows.append(json.dumps(dict(question=item["question"], reference=item["reference"], prediction=pred,
                                    rule=rule, correct=ok, completion=text, new_tokens=len(out))))
    atomic_write(out_dir / "predictions.jsonl", lambda f: f.write(("\n".join(rows) + "\n").encode()))
    after.update(accuracy=correct / len(eval_items), correct=correct, n=len(eval_items), extracted_by=rules,
                 generate_seconds=round(gen_seconds, 1), max_new_tokens=args.max_new_tokens)
    results["after"] = after
    results["eval_data"] = str(args.eval_data)
    write_json(out_dir / "results.json", results)
    print(f"GSM8K accuracy {correct}/{len(eval_items)} = {100 * correct / len(eval_items):.2f}% "
          f"(answers read by {rules}; {gen_seconds:.0f}s); wrote {out_dir / 'results.json'}")
    return results


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
