"""The math experiment's data: fetching MetaMathQA, GSM8K and MATH (or any JSON/JSONL file or URL), reading their
records with errors that name the file and line, picking the question and answer fields, and the prompt Formatter
that turns a (question, solution) pair into training ids and an evaluation prompt, protocol by protocol.

Why it exists: the paper's numbers depend on the exact text a model sees, at training and at test, so the prompt,
the response masking and the official protocol's stops and budgets are written down in one place.
"""
import hashlib
import json
import math
import re
import urllib.parse
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pretrained.files import parse_json
from pretrained.hub import download, hub_endpoint, hub_token
from recipes.math_scoring import gsm8k_reference, last_boxed
from recipes.training import UserError

# ----------------------------------------------------------------------------------------------------------
# Data: read (question, solution) pairs, with errors that say which file and line is bad.

METAMATHQA = ("meta-math/MetaMathQA", "MetaMathQA-395K.json")
GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{split}.jsonl"
# The file MetaMath's (and Uni-LoRA's) MATH evaluation reads: the 5,000 MATH test problems, instruction/output.
MATH_URL = "https://raw.githubusercontent.com/meta-math/MetaMath/main/data/test/MATH_test.jsonl"


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
            items = parse_json(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix the file or re-download it") from e
        except ValueError as e:  # nested too deeply, or a lone surrogate: parse_json's own refusals
            raise UserError(f"{path}: not valid JSON ({e}); fix the file or re-download it") from None
        records = [(f"{path} item {i}", item) for i, item in enumerate(items)]
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{lineno}", parse_json(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or delete that line") from e
            except ValueError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e}); fix or delete that line") from None
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
# Prompts and tokenisation.

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


def protocol_record(name, max_new_tokens):
    """What results.json records of the protocol a run was evaluated with."""
    p = PROTOCOLS[name]
    return dict(name=name, train_text=f"prompt + {p['separator']!r} + response + eos",
                eval_prompt_suffix=p["eval_suffix"], stop=list(p["stop"]), max_new_tokens=max_new_tokens,
                scoring="official: after the last 'The answer is: ' (GSM8K round(float) == ref; MATH is_equiv); "
                        "lenient: accuracy_lenient")


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
# The run's examples: the training set tokenised and masked, the test problems with their references.

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


def read_problems(args):
    """(task, path, records, [(question, solution, where)]) of --eval_data: task 'math' when the solutions hold
    \\boxed{...}, else 'gsm8k'."""
    path = fetch(args.eval_data, "test", args.data_dir, args.hf_token)
    records = read_records(path)[:args.max_eval_samples]
    pairs = get_pairs(records, *pick_fields(records, None, None, path))
    return "math" if args.eval_data == "math" or "\\boxed" in pairs[0][1] else "gsm8k", path, records, pairs


def load_eval_items(args, fmt):
    """(task, items): the test problems, tokenised, each with the reference its answer is scored against."""
    task, path, records, pairs = read_problems(args)
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


def load_predictions(args):
    """--score FILE: (task, items, completions) from a JSONL of generations: this project's predictions.jsonl, or
    lines with `completion` and `reference` (GSM8K: '... #### n' or a number; MATH: a solution with \\boxed{} or
    the bare answer). Lines without a reference take the reference of the problem at the same position in
    --eval_data (gsm8k, math or a file)."""
    if not Path(args.score).is_file():
        raise UserError(f"--score {args.score}: no such file; pass a predictions.jsonl or a JSONL of completions")
    records = read_records(args.score)
    for where, rec in records:
        if not isinstance(rec.get("completion"), str):
            raise UserError(f"{where}: no 'completion' string (fields: {sorted(rec)}); --score reads lines with "
                            f"completion and reference, or predictions.jsonl of train_math.py")
    if args.eval_data in ("gsm8k", "math") and all("reference" in rec for _, rec in records):
        task, problems = args.eval_data, None  # the file carries its references: nothing to download
    else:
        task, path, _, problems = read_problems(args)
        if len(problems) < len(records):
            raise UserError(f"{args.score} has {len(records)} lines but --eval_data {path} only {len(problems)} "
                            f"problems; pass the --eval_data the completions answer")
    items, completions = [], []
    for i, (where, rec) in enumerate(records):
        raw = rec["reference"] if "reference" in rec else problems[i][1]
        reference = read_reference(task, raw, where)
        items.append(dict(question=rec.get("question", problems[i][0] if problems else ""), reference=reference,
                          level=rec.get("level"), subject=rec.get("subject")))
        completions.append(rec["completion"])
    return task, items, completions


def read_reference(task, raw, where):
    """A reference as the official graders compare it: GSM8K a number, MATH the last \\boxed{} of a solution or a
    bare answer (None: no box in a solution, counted wrong as the official code does)."""
    if task == "math":
        if raw is None or isinstance(raw, str) and "\\boxed" not in raw and "\\fbox" not in raw:
            return raw
        return last_boxed(raw) if isinstance(raw, str) else str(raw)
    if isinstance(raw, (int, float)) and not isinstance(raw, bool) and math.isfinite(raw):
        return float(raw)
    if isinstance(raw, str):
        text = raw if ("####" in raw or "The answer is:" in raw) else f"#### {raw}"
        number = gsm8k_reference(text)
        if number is not None:
            return number
    raise UserError(f"{where}: reference {str(raw)[:60]!r} is not a GSM8K answer ('... #### n' or a number)")
