"""Tests for train_instruct.py and what it is built from: the official Alpaca prompts and collator (which positions
are learned, where the source and target are cut, the held-out split), MT-Bench's answer file and sampling rules,
the seeded sampling of recipes/generation.py, the shared loop's --loss micro, and the script end to end on a tiny
random Llama (test_train_math.py's `tiny` fixture) with resume and --eval_only. Offline, a few seconds each.
"""
import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pretrained
import train_instruct
import train_math
import unilora
from recipes import causal_lm, checkpoint, generation, instruct_data, mt_bench
from recipes.training import Ranks, UserError, errors_as_exit
import test_hub
import test_train_math
from train_instruct import main

tiny = test_train_math.tiny  # the fixture: a random 2-layer Llama with a byte-level tokenizer, in a temporary folder
restore_threads = test_train_math.restore_threads  # autouse: torch's thread count put back after each test

HERE = Path(__file__).resolve().parent.parent

NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\nName a color.\n\n### Response: ")
WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers."
              "\n\n### Input:\n2 and 3\n\n### Response: ")


def records():
    """40 Alpaca-layout records: sums asked two ways, half of them with an input."""
    rows = []
    for a in range(1, 9):
        for b in range(1, 6):
            if a % 2:
                rows.append(dict(instruction=f"What is {a} plus {b}?", input="", output=f"{a} plus {b} is {a + b}."))
            else:
                rows.append(dict(instruction="Add the numbers.", input=f"{a} and {b}", output=f"It is {a + b}."))
    return rows


QUESTIONS = [dict(question_id=82, category="math", turns=["What is 2 plus 2?", "And 3 plus 3?"]),
             dict(question_id=81, category="writing", turns=["Write a line.", "Shorter."])]


@pytest.fixture(scope="module")
def data(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("instruct")
    (root / "alpaca.json").write_text(json.dumps(records()))
    (root / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return dict(model=tiny["model"], train=str(root / "alpaca.json"), questions=str(root / "question.jsonl"))


def base_args(data, out, *extra):
    return ["--model", data["model"], "--train_data", data["train"], "--output_dir", str(out), "--eval_size", "8",
            "--batch_size", "4", "--micro_batch_size", "2", "--source_max_len", "128", "--target_max_len", "64",
            "--d", "256", "--lr", "0.02", "--max_new_tokens", "4", "--eval_batch_size", "2", "--threads", "1",
            "--data_dir", str(out.parent / "data"), *extra]


def collator(data, source_max_len=1000, target_max_len=1000):
    return instruct_data.Collator(pretrained.Tokenizer.from_pretrained(data["model"]), source_max_len, target_max_len)


# ---------------------------------------------------------------------------------------------- prompts, labels

def test_the_official_prompts():
    assert instruct_data.alpaca_prompt("Name a color.") == NO_INPUT
    assert instruct_data.alpaca_prompt("Add the numbers.", "2 and 3") == WITH_INPUT


def test_labels_cover_the_response_and_eos_only(data):
    c = collator(data)
    ids, labels = c.example("Name a color.", "", "Red.")
    tok = c.tok
    # the source: BOS (id 1, <|im_start|> in this tokenizer) and the prompt; the target: "Red." and EOS (id 2)
    n_source = len(tok.encode(NO_INPUT).ids) + 1
    assert ids[0] == 1 and tok.decode(ids[:n_source]) == NO_INPUT
    assert labels[:n_source] == [-100] * n_source  # every source position, BOS included, is masked
    assert tok.decode(ids[n_source:]) == "Red." and ids[-1] == 2 and len(ids) == n_source + 4 + 1  # R e d . EOS
    assert labels[n_source:] == ids[n_source:]
    with_input, labels = c.example("Add the numbers.", "2 and 3", "5")
    assert tok.decode(with_input[:labels.count(-100)]) == WITH_INPUT and labels[-2:] == with_input[-2:]
    assert c.example("Name a color.", "", "Red. \n")[0] == ids  # white space before EOS: dropped, as the slow
    # tokenizer of the official run drops it


def test_source_and_target_are_cut_from_the_start(data):
    c = collator(data, source_max_len=6, target_max_len=3)
    ids, labels = c.example("Name a color.", "", "Hi there.")
    # "Below is ..." is one byte a token here (no merge applies to "Below"): BOS + B e l o w; the target keeps
    # "H", "i", " the" (a merge) and loses "re." and its EOS, as the official collator's truncation does
    assert labels[:6] == [-100] * 6 and c.tok.decode(ids[:6]) == "Below" and ids[0] == 1
    assert c.tok.decode(ids[6:]) == "Hi the" and len(ids) == 9 and 2 not in ids[6:]
    assert labels[6:] == ids[6:]


def test_the_held_out_split_is_the_official_one():
    # datasets' train_test_split(test_size=3, shuffle=True, seed=42) of 10 rows: default_rng(42).permutation(10) is
    # [5, 6, 0, 7, 3, 2, 4, 9, 1, 8]; the first 3 are held out, the rest trained on in that order
    assert instruct_data.split_held_out(10, 3) == ([7, 3, 2, 4, 9, 1, 8], [5, 6, 0])
    assert instruct_data.split_held_out(4, 0) == ([0, 1, 2, 3], [])
    with pytest.raises(UserError, match="--eval_size 4 holds out every one of the 4 records"):
        instruct_data.split_held_out(4, 4)


def test_bad_records_are_one_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(dict(instruction="a", output="b")) + "\n" + json.dumps(dict(instruction="a")) + "\n")
    with pytest.raises(UserError) as refused:
        instruct_data.read_instructions(path)
    assert str(refused.value) == (f"{path}:2: has no field 'output' (fields: ['instruction']); --train_data needs "
                                  f"instruction, output and optionally input (the Alpaca layout)")
    path.write_text(json.dumps([dict(instruction="a", output="b"), dict(instruction="c", input="d", output="e")]))
    assert instruct_data.read_instructions(path) == [("a", "", "b"), ("c", "d", "e")]  # no input: ""


def test_downloads_once_with_the_token_for_the_hub_only(tmp_path, monkeypatch):
    server = test_hub.start_server()  # a local stand-in for the hub and for GitHub
    hub_path = "/datasets/yahma/alpaca-cleaned/resolve/main/alpaca_data_cleaned.json"
    server.files = {hub_path: json.dumps(records()[:3]).encode(),
                    "/fastchat/question.jsonl": "".join(json.dumps(q) + "\n" for q in QUESTIONS).encode()}
    try:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(mt_bench, "QUESTIONS_URL", f"{server.url}/fastchat/question.jsonl")
        for _ in range(2):  # the second time from the cache
            path = instruct_data.fetch_instructions("alpaca-clean", tmp_path, "secret")
            questions = mt_bench.load_questions("download", tmp_path)
    finally:
        server.stop()
    assert [(p, auth) for p, _, auth, _ in server.log] == [(hub_path, "Bearer secret"),
                                                         ("/fastchat/question.jsonl", None)]
    assert instruct_data.read_instructions(path)[0] == ("What is 1 plus 1?", "", "1 plus 1 is 2.")
    assert [q["question_id"] for q in questions] == [82, 81]


# ---------------------------------------------------------------------------------------------- sampling

def test_sampling_is_seeded_per_row_and_greedy_at_temperature_zero(data):
    model = pretrained.CausalLM.from_pretrained(data["model"])
    tok = pretrained.Tokenizer.from_pretrained(data["model"])
    prompts = [tok.encode(q).ids for q in ("What is 12 plus 30?", "Hi", "Tell me a story.")]

    def run(sampling, rows=prompts):
        return generation.generate(model, rows, 2, 2, 8, (), tok.decode, "cpu", contextlib.nullcontext, sampling)[0]
    greedy = run(None)
    assert run(generation.Sampling(0.0)) == greedy  # FastChat: temperature 0 is greedy
    assert run(generation.Sampling(5.0, top_k=1)) == greedy  # only the likeliest token is left
    assert run(generation.Sampling(5.0, top_p=1e-6)) == greedy
    hot = run(generation.Sampling(5.0, seed=3))
    assert hot == run(generation.Sampling(5.0, seed=3)) and hot != greedy
    assert [run(generation.Sampling(5.0, seed=3), [p])[0] for p in prompts] == hot  # a row ignores its batch
    assert run(generation.Sampling(5.0, seed=4)) != hot


# ---------------------------------------------------------------------------------------------- MT-Bench

def test_mt_bench_prompts_temperatures_and_file(data, tmp_path, monkeypatch):
    """The generator is replaced by one that records each prompt and its sampling: the second turn's prompt must
    hold the first question and its answer, and each category its FastChat temperature."""
    tok = pretrained.Tokenizer.from_pretrained(data["model"])
    seen = []

    def fake(model, prompts, pad_id, end_id, max_new_tokens, stop, decode, device, autocast, sampling):
        rows = []
        for ids in prompts:
            seen.append((decode(ids), sampling.temperature, max_new_tokens, tok.decode(ids[:1], False)))
            rows.append(tok.encode(f" Answer {len(seen)} ").ids)
        return rows, ["eos"] * len(rows)
    monkeypatch.setattr(mt_bench, "generate", fake)
    questions = data["questions"]
    extra = Path(questions).parent / "three.jsonl"  # and a category FastChat's table lacks: 0.7
    extra.write_text(Path(questions).read_text() + json.dumps(dict(question_id=1, category="chat", turns=["Hi."])))
    out = tmp_path / "base"
    res = main(base_args(data, out, "--method", "none", "--eval_size", "0", "--mt_bench", str(extra),
                         "--max_new_tokens", "7"))
    assert res["after"]["mt_bench"]["questions"] == 3 and "loglik" not in res["after"]
    prompts = {text: (temperature, budget, first) for text, temperature, budget, first in seen}
    alpaca = instruct_data.alpaca_prompt
    assert prompts[alpaca("What is 2 plus 2?")] == (0.0, 7, "<|im_start|>")  # math: greedy; BOS as in training
    assert prompts[alpaca("Write a line.")][0] == 0.7 and prompts[alpaca("Hi.")][0] == 0.7
    rows = [json.loads(x) for x in (out / "mt_bench_answers.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [1, 81, 82]  # sorted, as FastChat's reorg_answer_file
    for r in rows:
        assert sorted(r) == ["answer_id", "choices", "model_id", "question_id", "tstamp"]
        assert r["model_id"] == "base" and isinstance(r["answer_id"], str) and isinstance(r["tstamp"], float)
        assert [c["index"] for c in r["choices"]] == [0]
    by_id = {r["question_id"]: r["choices"][0]["turns"] for r in rows}
    first, second = by_id[82]
    assert first.startswith("Answer ") and first == first.strip() and len(by_id[1]) == 1
    # the second turn: the first turn's prompt, its answer as given back, then the next instruction
    expected = (alpaca("What is 2 plus 2?") + first + "\n\n### Instruction:\nAnd 3 plus 3?\n\n### Response: ")
    assert prompts[expected][0] == 0.0 and second != first
    assert (alpaca("Write a line.") + by_id[81][0] + "\n\n### Instruction:\nShorter.\n\n### Response: ") in prompts


def test_mt_bench_questions_are_checked(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(dict(question_id="81", category="writing", turns=["x"])) + "\n")
    with pytest.raises(UserError, match=r"q\.jsonl:1: not an MT-Bench question \(an integer question_id"):
        mt_bench.read_questions(path)
    assert mt_bench.TEMPERATURE == {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                                    "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
    model = tmp_path / "model"
    model.mkdir()
    assert mt_bench.read_generation_config(model) == dict(top_k=50, top_p=1.0)  # transformers' defaults
    (model / "generation_config.json").write_text(json.dumps(dict(temperature=0.6, top_p=0.9, top_k=None)))
    assert mt_bench.sampling_for("stem", mt_bench.read_generation_config(model)) == generation.Sampling(0.1, 0, 0, 0.9)


# ---------------------------------------------------------------------------------------------- the shared loop

def test_micro_loss_is_each_forwards_token_mean_averaged(data):
    """--loss micro (transformers' Trainer with accumulation): micro-batches [ex0, ex1] and [ex2]; each one's mean
    over its own answer tokens, then the mean over the two."""
    torch.manual_seed(0)
    model = pretrained.CausalLM.from_pretrained(data["model"])
    adapter = unilora.apply_unilora(model, 64, seed=1)
    with torch.no_grad():
        adapter.theta_d.normal_(0, 0.1)
    train = []
    for n_prompt, n_answer in ((3, 2), (4, 6), (2, 9)):
        ids = torch.randint(3, model.config["vocab_size"], (n_prompt + n_answer,)).tolist()
        train.append((ids, [-100] * n_prompt + ids[n_prompt:], n_answer))
    run = argparse.Namespace(args=argparse.Namespace(micro_batch_size=2, pad_id=0, loss="micro"), ranks=Ranks(),
                             device=torch.device("cpu"), autocast=contextlib.nullcontext,
                             scaler=torch.amp.GradScaler("cpu", enabled=False))
    got = causal_lm.backward(run, model, train, [0, 1, 2])
    grad, adapter.theta_d.grad = adapter.theta_d.grad.clone(), None
    sums = []
    for ids, labels, _ in train:
        logits = model(torch.tensor([ids]))[0, :-1]
        sums.append(F.cross_entropy(logits, torch.tensor(labels[1:]), ignore_index=-100, reduction="sum"))
    expected = ((sums[0] + sums[1]) / (2 + 6) + sums[2] / 9) / 2
    expected.backward()
    assert got == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(grad, adapter.theta_d.grad, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------- end to end

def test_train_evaluate_resume_and_eval_only(data, tmp_path):
    full = main(base_args(data, tmp_path / "full", "--max_steps", "4", "--save_every", "2", "--mt_bench",
                          data["questions"]))
    assert full["status"] == "finished" and full["train"]["steps"] == 4 and full["params"]["d"] == 256
    assert full["after"]["n"] == 8 and full["after"]["loglik"] > full["before"]["loglik"]  # sums: learned
    assert (full["quantize"], full["precision"]) == ("none", {"dtype": "float32", "amp": "none"})
    assert full["train"]["examples"] == 32 and full["after"]["mt_bench"]["questions"] == 2
    saved = json.loads((tmp_path / "full" / "run.json").read_text())
    assert (saved["source_max_len"], saved["loss"], saved["data_seed"], saved["grad_clip"], saved["dropout"]) == \
        (128, "micro", 42, 0.3, 0.05)
    log = [json.loads(x) for x in (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log] == pytest.approx([0.02, 0.02 * 3 / 3, 0.02 * 2 / 3, 0.02 * 1 / 3])  # 1 warmup step
    answers = [json.loads(x) for x in (tmp_path / "full" / "mt_bench_answers.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [81, 82] and all(len(a["choices"][0]["turns"]) == 2 for a in answers)

    # stopped after step 2, resumed: the same adapter as the run that never stopped
    part = tmp_path / "part"
    main(base_args(data, part, "--max_steps", "4", "--save_every", "2", "--stop_after", "2", "--no_eval"))
    with pytest.raises(UserError, match=r"--data_seed: 42 -> 7"):
        main(base_args(data, part, "--max_steps", "4", "--save_every", "2", "--resume", "--data_seed", "7"))
    resumed = main(base_args(data, part, "--max_steps", "4", "--save_every", "2", "--resume"))
    for a, b in zip(*(torch.load(d / "checkpoint.pt", weights_only=True)["adapter_params"]
                      for d in (tmp_path / "full", part)), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert resumed["before"] == full["before"]
    assert resumed["after"]["loglik"] == pytest.approx(full["after"]["loglik"], abs=1e-5)
    interrupted = argparse.Namespace(argv=["--recipe", "paper", "--hf_token", "x"], folder=part,
                                     args=argparse.Namespace(output_dir=None), script=train_instruct.SCRIPT)
    assert checkpoint.resume_command(interrupted) == \
        f"python train_instruct.py --recipe paper --output_dir {part} --resume"  # what Ctrl-C prints

    # --eval_only: the run's settings and held-out set, the same number, into eval-1
    again = main(["--eval_only", "--load", str(tmp_path / "full"), "--threads", "1"])
    assert again["after"]["loglik"] == pytest.approx(full["after"]["loglik"], abs=1e-5) and "train" not in again
    assert (tmp_path / "full" / "eval-1" / "results.json").is_file()
    with pytest.raises(UserError, match="so --lr does not apply"):
        main(["--eval_only", "--load", str(tmp_path / "full"), "--lr", "0.1"])
    with pytest.raises(UserError, match=r"--source_max_len 16 contradicts the run in --load \(source_max_len 128\)"):
        main(["--eval_only", "--load", str(tmp_path / "full"), "--source_max_len", "16"])
    with pytest.raises(UserError, match="not a run folder of train_instruct.py"):
        main(["--eval_only", "--load", str(tmp_path), "--threads", "1"])


def test_lora_baseline_takes_the_official_lora_settings(data, tmp_path):
    args = train_instruct.parse_args(["--method", "lora"])
    assert (args.r, args.lora_alpha, args.lr) == (64, 32.0, 2e-4)
    res = main(base_args(data, tmp_path / "lora", "--method", "lora", "--r", "4", "--max_steps", "1"))
    assert res["status"] == "finished" and res["params"]["lora_equivalent"] == res["params"]["d"]


def test_the_paper_recipes():
    paper = vars(train_instruct.parse_args(["--recipe", "paper"]))
    expected = dict(model="meta-llama/Llama-2-7b-hf", quantize="nf4", train_data="alpaca-clean", d=524_288, r=4,
                    lr=8e-4, batch_size=16, micro_batch_size=4, epochs=1, warmup_ratio=0.1, grad_clip=0.3,
                    weight_decay=0.0, dropout=0.05, seed=0, data_seed=42, source_max_len=16, target_max_len=512,
                    loss="micro", dtype="bfloat16", amp="bf16", eval_size=1024, max_eval_samples=1000,
                    max_train_samples=None, signs=False, projection="balanced", max_new_tokens=1024,
                    group_by_length=True, gradient_checkpointing=True)
    assert {k: paper[k] for k in expected} == expected
    big = train_instruct.parse_args(["--recipe", "paper13b"])
    assert (big.model, big.d, big.lr) == ("meta-llama/Llama-2-13b-hf", 1_048_576, 8e-4)
    assert train_instruct.parse_args(["--recipe", "paper", "--model", "meta-llama/Llama-2-13b-hf"]).d == 524_288


def test_nf4_base_trains_and_evaluates(data, tmp_path):
    res = main(base_args(data, tmp_path / "nf4", "--quantize", "nf4", "--max_steps", "2"))
    assert res["status"] == "finished" and res["quantize"] == "nf4" and "loglik" in res["after"]


def test_two_copies_train_and_answer_like_one(data, tmp_path):
    """torchrun, 2 CPU copies: the same adapter (float64, no dropout: a copy draws its own dropout masks; --loss
    tokens: --loss micro weighs the forwards each copy makes, which differ from one process's), the same held-out
    score and the same MT-Bench answers, written once."""
    args = ["--dtype", "float64", "--dropout", "0", "--loss", "tokens", "--max_steps", "2", "--device", "cpu",
            "--mt_bench", data["questions"]]
    one = main(base_args(data, tmp_path / "one", *args))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--"]
    proc = subprocess.run([*launch, str(HERE / "train_instruct.py"), *base_args(data, tmp_path / "two", *args)],
                          capture_output=True, text=True, timeout=240, cwd=HERE,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["world_size"] == 2 and two["after"]["loglik"] == pytest.approx(one["after"]["loglik"], rel=1e-9)
    for a, b in zip(*(torch.load(d / "checkpoint.pt", weights_only=True)["adapter_params"]
                      for d in (tmp_path / "one", tmp_path / "two")), strict=True):
        assert (a - b).abs().max() <= 1e-9 * a.abs().max()
    answers = [[json.loads(x)["choices"] for x in (d / "mt_bench_answers.jsonl").read_text().splitlines()]
               for d in (tmp_path / "one", tmp_path / "two")]
    assert answers[0] == answers[1] and len(answers[1]) == 2


def refusal(argv):
    """What the command line prints on a user error: main() inside the script's errors_as_exit."""
    with pytest.raises(SystemExit) as exit_, errors_as_exit():
        main(argv)
    return exit_.value.code


def test_user_errors_are_one_line(data, tmp_path):
    out = ["--output_dir", str(tmp_path / "x")]
    assert refusal(["--train_data", str(tmp_path / "none.json"), *out]) == (
        f"error: data file {tmp_path / 'none.json'} does not exist (--train_data); pass a .json/.jsonl path, a URL, "
        f"or alpaca-clean to download")
    assert refusal(["--mt_bench", str(tmp_path / "q.jsonl"), *out]) == \
        f"error: --mt_bench {tmp_path / 'q.jsonl'}: no such file; pass FastChat's question.jsonl or download"
    assert refusal(["--method", "none", "--eval_size", "0", *out]) == (
        "error: nothing to evaluate: hold out examples (--eval_size N) or answer MT-Bench (--mt_bench download)")
    assert refusal(base_args(data, tmp_path / "y", "--eval_size", "40")) == (
        "error: --eval_size 40 holds out every one of the 40 records of --train_data; lower --eval_size")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_command_line(data, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, str(HERE / "train_instruct.py"), *base_args(data, out, "--max_steps", "1")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^held-out response log-likelihood -?\d+\.\d{4} \(before training -?\d+\.\d{4}\) over 8 "
                     r"examples$", proc.stdout, re.M), proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["adapter.pt", "checkpoint.pt", "results.json", "run.json",
                                                      "train_log.jsonl"]
    proc = subprocess.run([*cmd, "--lr", "-1"], capture_output=True, text=True, timeout=300, cwd=HERE)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--lr" in proc.stderr


# ---------------------------------------------------------------------------------------------- the official extras

def test_group_by_length_is_transformers_rule_on_a_hand_worked_case():
    """get_length_grouped_indices by hand: 20 examples, batch 2 -> megabatches of min(20 // 8, 50) = 2 batches (4
    examples), each sorted longest first (ties in their order), then the longest example of all swapped to the
    front."""
    order = np.array([3, 0, 7, 1, 9, 4, 2, 8, 5, 6, 19, 10, 18, 11, 17, 12, 16, 13, 15, 14])
    lengths = [5, 1, 9, 3, 3, 0, 2, 8, 6, 4, 7, 7, 1, 2, 30, 5, 5, 0, 9, 2]
    # megabatches: [3 0 7 1] -> [7 0 3 1]; [9 4 2 8] -> [2 8 9 4]; [5 6 19 10] -> [10 6 19 5] (6, 19 tie);
    # [18 11 17 12] -> [18 11 12 17]; [16 13 15 14] -> [14 16 15 13] (16, 15 tie); 14 (length 30) swaps with 7
    expected = [14, 0, 3, 1, 2, 8, 9, 4, 10, 6, 19, 5, 18, 11, 12, 17, 7, 16, 15, 13]
    assert checkpoint.grouped_by_length(order, lengths, 2).tolist() == expected
    first = checkpoint.batch_order(42, 20, 2, 10, lengths)
    assert first(0)[0] == 14 and sorted(np.concatenate([first(s) for s in range(10)]).tolist()) == list(range(20))
    plain = checkpoint.batch_order(42, 20, 2, 10)
    assert plain(0).tolist() == np.random.default_rng([42, 0]).permutation(20)[:2].tolist()


def test_group_by_length_measures_characters_of_prompt_and_output(data):
    args = argparse.Namespace(train_data=data["train"], data_dir="unused", hf_token=None, eval_size=8,
                              max_train_samples=None, max_eval_samples=None, train=True, no_eval=False)
    train, _ = instruct_data.load_examples(args, collator(data), Ranks(0, 1, "cpu"))
    rows = records()
    trained, _ = instruct_data.split_held_out(len(rows), 8)
    assert [t[3] for t in train] == [len(instruct_data.alpaca_prompt(rows[i]["instruction"], rows[i]["input"]))
                                     + len(rows[i]["output"]) for i in trained]


def test_recipes_turn_the_official_extras_on():
    small = train_instruct.parse_args([])
    assert (small.group_by_length, small.gradient_checkpointing) == (True, False)  # a 135M model: no memory to save
    assert train_instruct.parse_args(["--no-group_by_length"]).group_by_length is False
    maths = train_math.parse_args(["--recipe", "paper"])
    assert (maths.group_by_length, maths.gradient_checkpointing) == (False, False)  # the official math run: neither


def test_a_tokenizer_without_pad_gets_the_official_pad_row(data, tmp_path, capsys):
    """smart_tokenizer_and_embedding_resize: one more row in the embeddings and lm_head, the mean of the others
    (float64 here), the old logits unchanged, the new id = the tokenizer's size; a run on such a tokenizer pads
    with it."""
    nopad = tmp_path / "nopad"
    shutil.copytree(data["model"], nopad)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (nopad / name).write_text(json.dumps({k: v for k, v in json.loads((nopad / name).read_text()).items()
                                              if k != "pad_token"}))
    tok = pretrained.Tokenizer.from_pretrained(nopad)
    assert tok.pad_id is None and pretrained.Tokenizer.from_pretrained(data["model"]).pad_id == 2
    res = main(base_args(dict(data, model=str(nopad)), tmp_path / "run", "--max_steps", "1"))
    out = capsys.readouterr().out
    assert res["status"] == "finished" and f"[PAD] added as id {tok.vocab_size}" in out
    wrote = Path(re.search(r"^wrote (.*)$", out, re.M).group(1))
    assert wrote == (tmp_path / "run" / "results.json").absolute() and wrote.is_file()  # where it is, not .partial
    for tied_head in (True, False):
        model = pretrained.CausalLM.from_pretrained(data["model"], dtype=torch.float64)
        if not tied_head:
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 3)
            model.tied = False
        ids = torch.tensor([[5, 9, 13, 7]])
        before = model(ids).detach()
        embed, head = model.model.embed_tokens.weight.detach().clone(), model.lm_head.weight.detach().clone()
        assert train_instruct.add_pad_token(model, tok) == tok.vocab_size == embed.shape[0]
        after = model(ids).detach()
        torch.testing.assert_close(after[..., :-1], before, rtol=0, atol=0)
        torch.testing.assert_close(model.model.embed_tokens.weight[-1], embed.mean(0), rtol=0, atol=1e-15)
        torch.testing.assert_close(model.lm_head.weight[-1], head.mean(0), rtol=0, atol=1e-15)
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied_head
        assert after.shape[-1] == tok.vocab_size + 1
