"""The instruction-tuning data of the paper's Table 4: Cleaned Alpaca (or any JSON/JSONL file of instruction, input,
output records) under the official Alpaca prompts, cut and masked exactly as the official collator does.

The official run is QLoRA's script adapted by the Uni-LoRA authors (instruction_tuning/qlora_unilora.py of the
Uni-LoRA repository). Its data path, point by point:
  - the prompt: ALPACA_PROMPT_DICT["prompt_input"] when a record's input is not "", else "prompt_no_input"
    (extract_alpaca_dataset); both end "### Response: " with a space;
  - the source: the tokenizer's BOS text + the prompt, tokenized without special tokens and cut to its first
    source_max_len tokens; the target: the output + the EOS text, cut to its first target_max_len tokens
    (DataCollatorForCausalLM: truncation keeps the start, so a long output loses its EOS); the slow tokenizer
    (use_fast=False) drops the white space before EOS, so an output's trailing white space is not learned;
  - the labels: -100 on the source, the target's ids on the target (train_on_source False);
  - the held-out set: datasets' train_test_split(test_size=eval_dataset_size, shuffle=True, seed=42), i.e. numpy
    default_rng(42).permutation(n), the first eval_size rows held out and the rest trained on in that order
    (make_data_module); max_train_samples / max_eval_samples take the first rows of each.
With the official source_max_len of 16 tokens the source holds BOS and the start of the prompt's preamble ("Below is
an instruction that describes a task..."), never the instruction: the official run learns the responses without
seeing what they answer. This is reproduced as it is, and said where the numbers are reported (docs/instruct.md).

Why it exists: instruction tuning's numbers depend on the exact ids the model is trained on, and the official
collator's cuts are unusual, so they are written down in one place, with the records read by recipes/math_data.py.
"""
import hashlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pretrained.hub import hub_endpoint
from recipes.math_data import fetch, read_records
from recipes.training import UserError

ALPACA_CLEAN = ("yahma/alpaca-cleaned", "alpaca_data_cleaned.json")  # --dataset alpaca-clean: 51,760 records
# The prompts, as instruction_tuning/qlora_unilora.py writes them (ALPACA_PROMPT_DICT).
ALPACA_PROMPT_DICT = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: "
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response: "
    ),
}
SPLIT_SEED = 42  # make_data_module: train_test_split(..., shuffle=True, seed=42)


def alpaca_prompt(instruction, input=""):
    """The official prompt of one record (extract_alpaca_dataset)."""
    key = "prompt_input" if input != "" else "prompt_no_input"
    return ALPACA_PROMPT_DICT[key].format(instruction=instruction, input=input)


# ----------------------------------------------------------------------------------------------------------
# The records: fetched once, read with errors that name the file and record.

def fetch_instructions(source, data_dir, token):
    """--train_data as a local file: alpaca-clean (downloaded once from the hub), a URL (once), or a path."""
    if source == "alpaca-clean":
        repo, name = ALPACA_CLEAN
        source = f"{hub_endpoint()}/datasets/{repo}/resolve/main/{name}"
    try:
        return fetch(source, "train", data_dir, token)  # recipes/math_data.py: the hub token goes to the hub only
    except UserError as e:
        if e.__cause__ is None:  # not a download that failed
            raise
        raise UserError(f"could not download {source} ({e.__cause__}); without network, pass a local copy as "
                        f"--train_data PATH") from None


def read_instructions(path):
    """[(instruction, input, output)] of a JSON array or JSONL file of records with string fields instruction and
    output, and input (missing: "")."""
    examples = []
    for where, rec in read_records(path):
        for key in ("instruction", "input", "output"):
            if key == "input" and key not in rec:
                continue
            if not isinstance(rec.get(key), str):
                problem = "has no field" if key not in rec else "has a non-string field"
                raise UserError(f"{where}: {problem} {key!r} (fields: {sorted(rec)}); --train_data needs "
                                f"instruction, output and optionally input (the Alpaca layout)")
        examples.append((rec["instruction"], rec.get("input", ""), rec["output"]))
    return examples


def split_held_out(n, eval_size):
    """(trained rows, held-out rows) as the official train_test_split(test_size=eval_size, seed=42) cuts n records;
    eval_size 0: every row trained on, in file order (the official 7B script, which evaluates nothing)."""
    if eval_size == 0:
        return list(range(n)), []
    if eval_size >= n:
        raise UserError(f"--eval_size {eval_size} holds out every one of the {n} records of --train_data; lower "
                        f"--eval_size")
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    return order[eval_size:].tolist(), order[:eval_size].tolist()


# ----------------------------------------------------------------------------------------------------------
# Tokens: the source and target cuts, the labels.

class Collator:
    """The official collator's ids (DataCollatorForCausalLM): source = BOS text + prompt, target = output + EOS
    text, each tokenized alone without special tokens and cut to its budget."""

    def __init__(self, tok, source_max_len, target_max_len):
        self.tok, self.source_max_len, self.target_max_len = tok, source_max_len, target_max_len
        self.bos = tok.special_tokens.get("bos", "")  # a tokenizer without one: nothing (the official: "None")
        self.eos = tok.special_tokens.get("eos")
        if self.eos is None:
            raise UserError("the tokenizer names no EOS token (tokenizer_config.json / special_tokens_map.json); the "
                            "model would never learn to stop; pick another --model")
        self.end_id = tok.eos_id

    def source_ids(self, prompt, cut=True):
        """BOS + prompt; cut=False: whole (a generation prompt)."""
        ids = self.tok.encode(self.bos + prompt, add_special_tokens=False).ids
        return ids[:self.source_max_len] if cut else ids

    def target_ids(self, output):
        """output + EOS; the white space that ends an output is dropped, as the official slow tokenizer drops it
        before a special token given as a plain string (transformers 4.31's tokenize(), after qlora_unilora.py
        re-registers Llama's EOS with add_special_tokens)."""
        return self.tok.encode(output.rstrip() + self.eos, add_special_tokens=False).ids[:self.target_max_len]

    def example(self, instruction, input, output):
        """(ids, labels): labels -100 on the source, the target's ids on the target."""
        source, target = self.source_ids(alpaca_prompt(instruction, input)), self.target_ids(output)
        return source + target, [-100] * len(source) + target


def load_examples(args, collator, ranks):
    """(train, held-out items) of --train_data: train as the shared loop reads it, (ids, labels, answer tokens,
    characters of prompt + output), if
    the run trains; items as recipes/generation.answer_loglik scores them (the source as prompt, the target as
    answer), unless --no_eval. Records args.train_sha256 (the file's content, for --resume)."""
    path = fetch_instructions(args.train_data, args.data_dir, args.hf_token)
    args.train_sha256 = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    examples = read_instructions(path)
    trained, held_out = split_held_out(len(examples), args.eval_size)
    trained = trained[:args.max_train_samples] if args.train else []
    held_out = held_out[:args.max_eval_samples] if not args.no_eval else []
    tokenized = [collator.example(*examples[i]) for i in tqdm(trained + held_out, desc="tokenize", dynamic_ncols=True,
                                                              disable=len(examples) < 5000 or not ranks.main)]
    sources = [labels.count(-100) for _, labels in tokenized]  # the source's length: its labels are -100
    # the length --group_by_length sorts by, as the official run measures it: characters of prompt and output
    chars = [len(alpaca_prompt(*examples[i][:2])) + len(examples[i][2]) for i in trained]
    train = [(ids, labels, len(ids) - n, c) for (ids, labels), n, c in zip(tokenized[:len(trained)], sources, chars)]
    items = [dict(prompt_ids=ids[:n], answer_ids=ids[n:]) for (ids, _), n in zip(tokenized[len(trained):],
                                                                                   sources[len(trained):])]
    cut_sources = sum(n == collator.source_max_len for n in sources)
    cut_targets = sum(len(ids) - n == collator.target_max_len for (ids, _), n in zip(tokenized, sources))
    print(f"data: {path}, {len(examples)} records: {len(train)} trained on, {len(items)} held out and scored "
          f"(--eval_size {args.eval_size}, split seed {SPLIT_SEED}); {cut_sources} sources reach the "
          f"{collator.source_max_len}-token cut, {cut_targets} targets the {collator.target_max_len}-token cut")
    return train, items
