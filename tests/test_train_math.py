"""Tests for train_math.py: offline, fast, and without the prepared assets.

Why this file exists: the math script glues data parsing, prompt masking, Uni-LoRA training with resume, and
generation-based scoring together; each piece is easy to get subtly wrong (a prompt token left in the loss, an
answer read from the wrong number, a resumed run that sees different batches), and the numbers are only
comparable with the paper's Table 3 if every rule of the official protocol holds.  The official rules are
checked on their own in test_math_scoring.py, the data files in test_math_data.py.  The tests here
build a tiny random Llama-style checkpoint and a byte-level BPE tokenizer.json in a temporary folder and run
the real script on them: in-process through main(argv) for speed, and once as a subprocess for the command line.
"""
import argparse
import contextlib
import json
import os
import re
import runpy
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pretrained
import taskbank
import train_math
import unilora
from recipes import causal_lm, generation, math_data
from recipes.generation import cut_at_stop
from recipes.training import NonFiniteLoss, UserError
from train_math import main
from references import byte_symbols, paused_while_holding

HERE = Path(__file__).resolve().parent.parent  # the repository root
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
          "system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>"
          "assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_tokenizer(folder):
    symbols = [byte_symbols()[b] for b in range(256)]
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for s in symbols:
        vocab[s] = len(vocab)
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i s", "Ġ is", "a n", "Ġ w", "e r", "Ġ p", "l u", "Ġp lu", "Ġplu s"]
    for m in merges:
        vocab["".join(m.split())] = len(vocab)
    added = [dict(id=i, content=t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
             for i, t in enumerate(SPECIALS)]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        add_bos_token=False, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>", chat_template=CHATML, tokenizer_class="GPT2Tokenizer")))
    (folder / "special_tokens_map.json").write_text(json.dumps(dict(
        bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>")))
    return len(vocab)


def problem(a, b):
    return dict(question=f"What is {a} plus {b}?", answer=f"{a} plus {b} is <<{a}+{b}={a + b}>>{a + b}.\n#### {a + b}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer Llama (GQA, tied embeddings, like SmolLM2) plus GSM8K-style data files."""
    root = tmp_path_factory.mktemp("tiny")
    model_dir = root / "model"
    model_dir.mkdir()
    vocab = write_tokenizer(model_dir)
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab, hidden_size=32,
                  intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    (model_dir / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = pretrained.CausalLM(config)
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied, as on the hub
    pretrained.save_safetensors(sd, model_dir / "model.safetensors")

    data = root / "data"
    data.mkdir()
    train = [problem(a, b) for a in range(1, 7) for b in range(1, 5)]  # 24 problems
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    test = [problem(a, b) for a, b in ((12, 30), (7, 8), (100, 23), (4, 44), (9, 9), (31, 2))]
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    return dict(root=root, model=str(model_dir), train=str(data / "train.jsonl"), test=str(data / "test.jsonl"))


@pytest.fixture(autouse=True)
def restore_threads():
    """The runs below pass --threads 1 (tiny matrices: threads only add synchronisation, and the test machine
    is shared); put torch's setting back so other test files are unaffected."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def base_args(tiny, out, *extra):
    return ["--model", tiny["model"], "--train_data", tiny["train"], "--eval_data", tiny["test"],
            "--output_dir", str(out), "--max_train_samples", "16", "--max_eval_samples", "4", "--batch_size", "4",
            "--micro_batch_size", "2", "--max_length", "256", "--max_new_tokens", "6", "--eval_batch_size", "3",
            "--d", "256", "--lr", "0.02", "--data_dir", str(out.parent / "data"), "--threads", "1", *extra]


def formatter(tiny, template="alpaca", protocol="official"):
    tok = pretrained.Tokenizer.from_pretrained(tiny["model"])
    config = json.loads((Path(tiny["model"]) / "config.json").read_text())
    return math_data.Formatter(tok, template, tiny["model"], config, protocol=protocol)


def strict_json(path):
    """results.json must be JSON as the standard defines it: NaN and Infinity are not."""
    def refuse(name):
        raise ValueError(f"{path} holds {name}")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


# ---------------------------------------------------------------------------------------- prompts, decoding

ALPACA_2_PLUS_3 = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\nWhat is 2 plus 3?\n\n### Response:")


def test_official_training_text_and_eval_prompt(tiny):
    fmt = formatter(tiny)
    ids, labels, truncated = fmt.example("What is 2 plus 3?", "It is 5.", max_length=1000)
    n_prompt = labels.count(-100)
    assert not truncated and len(ids) == len(labels) and ids[-1] == fmt.end_id == 2
    assert fmt.tok.decode(ids) == ALPACA_2_PLUS_3 + "It is 5."  # prompt + response, no separator, then EOS
    assert fmt.tok.decode(ids[:n_prompt]) == ALPACA_2_PLUS_3
    assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert fmt.tok.decode(fmt.eval_prompt_ids("What is 2 plus 3?")) == ALPACA_2_PLUS_3 + " Let's think step by step."
    short_ids, short_labels, truncated = fmt.example("What is 2 plus 3?", "It is 5.", max_length=n_prompt + 2)
    assert truncated and short_ids == ids[:n_prompt + 2] and short_labels == labels[:n_prompt + 2]


def test_plain_protocol_keeps_the_space_and_the_training_prompt(tiny):
    fmt = formatter(tiny, protocol="plain")
    ids, labels, _ = fmt.example("What is 2 plus 3?", "It is 5.", max_length=1000)
    n_prompt = labels.count(-100)
    assert fmt.tok.decode(ids[n_prompt:]) == " It is 5."
    assert fmt.tok.decode(fmt.eval_prompt_ids("What is 2 plus 3?")) == ALPACA_2_PLUS_3


def test_cut_at_stop_strings():
    stop = math_data.PROTOCOLS["official"]["stop"]
    text = "2 plus 3 is 5.\nThe answer is: 5\n\n### Instruction:\nWhat is 1 plus 1?\n\n### Response: 2"
    assert cut_at_stop(text, stop) == "2 plus 3 is 5.\nThe answer is: 5\n\n### "
    assert cut_at_stop("The Response was 4. The answer is: 4", stop) == "The "   # any occurrence, as vLLM
    assert cut_at_stop("The answer is: 4", stop) == "The answer is: 4"
    assert cut_at_stop("The answer is: 4", ()) == "The answer is: 4"


class ScriptedLM(torch.nn.Module):
    """Emits a fixed token sequence per row, whatever the input; counts its forward calls."""

    def __init__(self, scripts, vocab):
        super().__init__()
        self.scripts, self.vocab, self.calls = scripts, vocab, 0

    def forward(self, ids, mask, cache, last_only=True):
        step, self.calls = self.calls, self.calls + 1
        logits = torch.zeros(len(self.scripts), 1, self.vocab)
        for i, script in enumerate(self.scripts):
            logits[i, 0, script[min(step, len(script) - 1)]] = 1.0
        return logits


def test_generation_stops_at_stop_strings_eos_and_budget(tiny):
    tok = pretrained.Tokenizer.from_pretrained(tiny["model"])
    stop = math_data.PROTOCOLS["official"]["stop"]
    ramble = tok.encode("2 plus 3 is 5.\nThe answer is: 5\n\n### Instruction:\nWhat is 9 plus 9?" * 3).ids
    short = tok.encode(" 5").ids + [2] + tok.encode(" never read").ids
    long = tok.encode(" 1" * 100).ids
    model = ScriptedLM([ramble, short, long], vocab=400)
    rows, why = generation.generate(model, [[5, 6], [7], [8, 9, 10]], 2, 2, 120, stop, tok.decode, "cpu",
                                    contextlib_null)
    assert why == ["stop", "eos", "length"]
    assert cut_at_stop(tok.decode(rows[0]), stop) == "2 plus 3 is 5.\nThe answer is: 5\n\n### "
    assert rows[1] == tok.encode(" 5").ids and len(rows[2]) == 120
    assert model.calls == 120  # the budget, not more
    model = ScriptedLM([ramble], vocab=400)
    generation.generate(model, [[5]], 2, 2, 500, stop, tok.decode, "cpu", contextlib_null)
    assert model.calls <= len(tok.encode("2 plus 3 is 5.\nThe answer is: 5\n\n### Instruction").ids) + 8


def contextlib_null():
    return contextlib.nullcontext()


def test_left_padded_batches_generate_what_single_prompts_do(tiny):
    tok = pretrained.Tokenizer.from_pretrained(tiny["model"])
    model = pretrained.CausalLM.from_pretrained(tiny["model"])
    prompts = [tok.encode(q).ids for q in ("What is 12 plus 30?", "What is 7 plus 8? Think.", "Hi")]
    batch, _ = generation.generate(model, prompts, 2, 2, 5, (), tok.decode, "cpu", contextlib_null)
    single = [generation.generate(model, [p], 2, 2, 5, (), tok.decode, "cpu", contextlib_null)[0][0]
              for p in prompts]
    assert batch == single


def test_math_test_files_of_both_layouts(tiny, tmp_path):
    fmt = formatter(tiny)
    hendrycks = tmp_path / "math.jsonl"
    hendrycks.write_text(json.dumps(dict(problem="What is $1+1$?", level="Level 1", type="Algebra",
                                         solution="We add: $1+1=\\boxed{2}$.")) + "\n")
    metamath = tmp_path / "MATH_test.jsonl"
    metamath.write_text(json.dumps(dict(instruction="Find $\\frac{1}{2}+\\frac{1}{2}$.", input="",
                                        output="The sum is $\\boxed{1}$.")) + "\n")
    for path, question, reference, level in ((hendrycks, "What is $1+1$?", "2", "Level 1"),
                                             (metamath, "Find $\\frac{1}{2}+\\frac{1}{2}$.", "1", None)):
        args = argparse.Namespace(eval_data=str(path), data_dir=tmp_path, hf_token=None, max_eval_samples=None,
                                  max_new_tokens=None, protocol="official")
        task, items = math_data.load_eval_items(args, fmt)
        assert task == "math" and args.max_new_tokens == 2048  # the official MATH budget
        assert (items[0]["question"], items[0]["reference"], items[0]["level"]) == (question, reference, level)


# ---------------------------------------------------------------------------------------------- end to end

def checkpoint_params(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)["adapter_params"]


def test_train_resume_and_eval(tiny, tmp_path):
    full = main(base_args(tiny, tmp_path / "full", "--max_steps", "4", "--save_every", "2"))
    assert full["train"]["steps"] == 4 and full["params"]["d"] == 256 and full["status"] == "finished"
    assert full["protocol"]["name"] == "official" and full["after"]["task"] == "gsm8k"
    assert full["after"]["n"] == 4 and 0.0 <= full["after"]["accuracy"] <= 1.0
    assert "accuracy_lenient" in full["after"] and full["precision"] == {"dtype": "float32", "amp": "none"}
    # training on sums must make the reference solutions of unseen sums more likely than the base model did
    assert full["after"]["loglik"] > full["before"]["loglik"]
    assert abs(full["after"]["merge_max_logit_change"]) < 1e-4
    rows = [json.loads(x) for x in (tmp_path / "full" / "predictions.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in rows] == [42, 15, 123, 48]  # the first 4 problems, in file order
    log = [json.loads(x) for x in (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and log[-1]["lr"] < log[1]["lr"]  # cosine decay
    assert strict_json(tmp_path / "full" / "results.json")["status"] == "finished"

    # an interrupted run (stopped after step 2) resumed to the end equals the uninterrupted one
    part = tmp_path / "part"
    stopped = main(base_args(tiny, part, "--max_steps", "4", "--save_every", "2", "--stop_after", "2", "--no_eval"))
    assert "after" not in stopped and stopped["status"] == "stopped"
    assert torch.load(part / "checkpoint.pt", weights_only=True)["step"] == 2
    with pytest.raises(UserError, match="--resume"):
        main(base_args(tiny, part, "--max_steps", "4", "--save_every", "2"))
    with pytest.raises(UserError, match=r"--lr: 0\.02 -> 0\.01"):
        main(base_args(tiny, part, "--max_steps", "4", "--save_every", "2", "--resume", "--lr", "0.01"))
    with open(part / "train_log.jsonl", "a") as f:  # as if it had died during step 3, after logging it
        f.write(json.dumps({"step": 3, "loss": 0.0}) + "\n")
    resumed = main(base_args(tiny, part, "--max_steps", "4", "--save_every", "2", "--resume"))
    log = [json.loads(x) for x in (part / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and log[2]["loss"] > 0
    assert resumed["train"]["first_loss"] == full["train"]["first_loss"]
    for a, b in zip(checkpoint_params(tmp_path / "full"), checkpoint_params(part), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert resumed["before"] == full["before"]
    assert resumed["after"]["loglik"] == pytest.approx(full["after"]["loglik"], abs=1e-5)

    # --eval_only --load: the same numbers, written beside the run in eval-1, eval-2; the run is untouched
    run_files = {n: (tmp_path / "full" / n).read_bytes() for n in ("results.json", "predictions.jsonl")}
    again = main(["--eval_only", "--load", str(tmp_path / "full"), "--eval_data", tiny["test"], "--threads", "1",
                  "--max_eval_samples", "4", "--max_new_tokens", "6", "--eval_batch_size", "3"])
    assert again["after"]["loglik"] == pytest.approx(full["after"]["loglik"], abs=1e-5)
    assert again["evaluated_run"] == str(tmp_path / "full") and "train" not in again
    assert (tmp_path / "full" / "eval-1" / "results.json").is_file()
    assert {n: (tmp_path / "full" / n).read_bytes() for n in run_files} == run_files
    second = main(["--eval_only", "--load", str(tmp_path / "full"), "--max_new_tokens", "2", "--threads", "1"])
    assert (tmp_path / "full" / "eval-2" / "results.json").is_file()
    assert second["eval_data"] == tiny["test"] and second["after"]["n"] == 4  # the run's test set by default
    with pytest.raises(UserError, match="is the run being evaluated"):
        main(["--eval_only", "--load", str(tmp_path / "full"), "--output_dir", str(tmp_path / "full")])
    with pytest.raises(UserError, match="--model .* contradicts the run"):
        main(["--eval_only", "--load", str(tmp_path / "full"), "--model", str(tmp_path)])


def test_resume_refuses_changed_data_precision_and_pickles(tiny, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(Path(tiny["train"]).read_text())
    run = tmp_path / "run"
    args = base_args(tiny, run, "--train_data", str(data), "--max_steps", "2", "--stop_after", "1", "--no_eval")
    main(args)
    with pytest.raises(UserError, match="--amp: 'none' -> 'bf16'"):
        main(args + ["--resume", "--amp", "bf16"])
    with pytest.raises(UserError, match="--dtype: 'float32' -> 'bfloat16'"):
        main(args + ["--resume", "--dtype", "bfloat16"])
    with pytest.raises(UserError, match="--protocol: 'official' -> 'plain'"):
        main(args + ["--resume", "--protocol", "plain"])
    lines = data.read_text().splitlines()
    data.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # same path, same count, other bytes
    with pytest.raises(UserError, match=r"--train_data \(the file's contents changed\)"):
        main(args + ["--resume"])

    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "pwned"))
    torch.save({"config": {}, "step": 1, "payload": Payload()}, run / "checkpoint.pt")
    with pytest.raises(UserError, match="cannot be read as a checkpoint"):
        main(args + ["--resume"])
    assert not marker.exists()
    for code in [HERE / "train_math.py", *sorted((HERE / "recipes").glob("*.py"))]:  # the script and what it runs
        assert "weights_only=False" not in code.read_text(), code


def test_lora_baseline_and_base_model(tiny, tmp_path):
    lora = main(base_args(tiny, tmp_path / "lora", "--method", "lora", "--max_steps", "2", "--lr", "0.01"))
    assert lora["method"] == "lora" and lora["train"]["steps"] == 2 and lora["after"]["n"] == 4
    base = main(base_args(tiny, tmp_path / "none", "--method", "none"))
    assert "train" not in base and "params" not in base
    assert base["after"]["loglik"] == pytest.approx(lora["before"]["loglik"], abs=1e-5)
    again = main(["--eval_only", "--load", str(tmp_path / "lora"), "--eval_data", tiny["test"], "--threads", "1",
                  "--max_eval_samples", "4", "--max_new_tokens", "6", "--eval_batch_size", "3"])
    assert again["method"] == "lora" and again["after"]["loglik"] == pytest.approx(lora["after"]["loglik"], abs=1e-5)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("run.json", "results.json"):
        (broken / name).write_bytes((tmp_path / "lora" / name).read_bytes())
    (broken / "adapter.pt").write_bytes((tmp_path / "lora" / "adapter.pt").read_bytes()[:100])  # truncated
    with pytest.raises(UserError, match=f"--load {broken}: "):
        main(["--eval_only", "--load", str(broken), "--eval_data", tiny["test"], "--threads", "1"])


def test_merge_happens_in_fp32_outside_autocast(tiny, tmp_path, monkeypatch):
    """Train and evaluate under bf16 autocast; merge() must run with autocast off, so that every merged weight
    is W + B A (computed here in float64) rounded once to fp32."""
    seen = []
    original = unilora.UniLoRA.merge

    def spy(self):
        factors = [(m.base.weight.detach().double().clone(), *(t.detach().double() for t in m.lora_factors()),
                    m.base.weight) for _, m in self.layers()]
        seen.append(torch.is_autocast_enabled("cpu"))
        model = original(self)
        for W, A, B, merged in factors:
            exact = W + B @ A
            assert ((merged.double() - exact).abs() <= exact.abs() * 2 ** -23 + 1e-9).all()  # one fp32 rounding
        return model
    monkeypatch.setattr(unilora.UniLoRA, "merge", spy)
    res = main(base_args(tiny, tmp_path / "amp", "--max_steps", "2", "--dtype", "float32", "--amp", "bf16"))
    assert seen == [False] and res["precision"] == {"dtype": "float32", "amp": "bf16"}


def test_fp16_autocast_trains_with_a_gradient_scaler(tiny, tmp_path):
    res = main(base_args(tiny, tmp_path / "fp16", "--max_steps", "2", "--dtype", "float32", "--amp", "fp16",
                         "--no_eval"))
    ckpt = torch.load(tmp_path / "fp16" / "checkpoint.pt", weights_only=True)
    assert res["precision"] == {"dtype": "float32", "amp": "fp16"} and ckpt["scaler"]["scale"] > 1
    assert all(torch.isfinite(t).all() for t in ckpt["adapter_params"])


def test_a_diverging_run_stops_and_saves_nothing_non_finite(tiny, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    args = base_args(tiny, out, "--lr", "1e35", "--max_steps", "4", "--save_every", "1", "--no_eval")
    with pytest.raises(NonFiniteLoss, match="at step 2"):
        main(args)
    results = strict_json(out / "results.json")
    assert results["status"] == "diverged" and "smaller learning rate" in results["error"]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 1 and all(torch.isfinite(t).all() for t in ckpt["adapter_params"])
    assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == [1]
    monkeypatch.setattr(sys, "argv", ["train_math.py", *args[:-1], "--overwrite", "--no_eval"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(HERE / "train_math.py"), run_name="__main__")
    assert str(exit_.value.code).startswith("error: the loss became nan at step 2")


def oracle_for(tok, answer):
    """A generate() that answers from the prompt: right for some problems, wrong for others."""
    def generate(model, prompts, pad_id, end_id, max_new_tokens, stop, decode, device, autocast):
        rows = []
        for ids in prompts:
            text = tok.decode(ids)
            assert text.endswith("### Response: Let's think step by step.")  # the official evaluation prompt
            question = text.split("### Instruction:\n")[1].split("\n\n### Response:")[0]
            rows.append(tok.encode(answer(question)).ids)
        return rows, ["eos"] * len(rows)
    return generate


def test_gsm8k_scoring_with_an_oracle(tiny, tmp_path, monkeypatch):
    """Every other problem answered right: the accuracy must come out exact, answers back in file order, and a
    run-on into '### Instruction:' cut away before reading."""
    tok = pretrained.Tokenizer.from_pretrained(tiny["model"])

    def answer(question):
        a, b = map(int, question.split("What is ")[1].split("?")[0].split(" plus "))
        guess = a + b if a % 2 == 0 else a * b  # right for even a only
        return f" {a} plus {b} is {guess}.\nThe answer is: {guess}\n\n### Instruction:\nThe answer is: {a + b}"
    monkeypatch.setattr(train_math, "generate", oracle_for(tok, answer))
    res = main(base_args(tiny, tmp_path / "oracle", "--method", "none", "--max_eval_samples", "6"))
    # test problems (12,30) (7,8) (100,23) (4,44) (9,9) (31,2): even a for 12, 100, 4
    assert res["after"]["correct"] == 3 and res["after"]["accuracy"] == 0.5
    rows = [json.loads(x) for x in (tmp_path / "oracle" / "predictions.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, False, True, True, False, False]
    assert rows[1]["prediction"] == 56 and rows[1]["completion"].endswith("The answer is: 56\n\n### ")


def test_score_grades_a_runs_predictions_and_hand_written_files(tiny, tmp_path, monkeypatch):
    """--score FILE: the run's own predictions.jsonl gives the run's numbers again without a model; a hand-written
    file of completions and references in every accepted form gives the counts worked out by hand; lines without
    references take them from --eval_data; the output is one line per reader."""
    tok = pretrained.Tokenizer.from_pretrained(tiny["model"])
    monkeypatch.setattr(train_math, "generate", oracle_for(tok, lambda q: " The answer is: 20"))
    run = main(base_args(tiny, tmp_path / "run", "--method", "none", "--max_eval_samples", "6"))["after"]
    again = main(["--score", str(tmp_path / "run" / "predictions.jsonl"), "--eval_data", "gsm8k"])["after"]
    for key in ("correct", "correct_strict", "correct_lenient", "n", "no_answer_mark"):
        assert again[key] == run[key], key

    hand = tmp_path / "hand.jsonl"
    lines = [dict(completion="The answer is: 50", reference="so 50 * 100 = 5,000\n#### 5,000"),  # percent rule
             dict(completion="3 + 4\nThe answer is: 7", reference=7),
             dict(completion="so it is 3", reference="3"),                                    # no marker
             dict(completion="The answer is: 8", reference="The answer is: 9")]
    hand.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cmd = [sys.executable, str(HERE / "train_math.py"), "--score", str(hand), "--eval_data", "gsm8k",
           "--output_dir", str(tmp_path / "scored")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[:3] == ["GSM8K official 2/4", "GSM8K strict 1/4", "GSM8K lenient 2/4"]
    saved = strict_json(tmp_path / "scored" / "results.json")
    assert saved["kind"] == "score" and saved["after"]["correct"] == 2
    assert len((tmp_path / "scored" / "predictions.jsonl").read_text().splitlines()) == 4

    problems = tmp_path / "MATH_test.jsonl"  # MetaMath's MATH_test layout: instruction/output
    problems.write_text("".join(json.dumps(dict(instruction=f"q{i}", output=f"so $\\boxed{{{a}}}$")) + "\n"
                                for i, a in enumerate(["\\frac{1}{2}", "5", "\\frac{\\pi}{3}"])))
    math_lines = tmp_path / "math_preds.jsonl"
    math_lines.write_text("".join(json.dumps(dict(completion=c)) + "\n" for c in
                                  ["The answer is: 0.5", "The answer is: 5.\nDone", "The answer is: \\pi/2"]))
    out = main(["--score", str(math_lines), "--eval_data", str(problems)])["after"]
    assert (out["task"], out["correct"], out["correct_strict"], out["exception_path"]) == ("math", 3, 2, 1)


def test_score_refuses_what_it_would_ignore(tiny, tmp_path, monkeypatch):
    hand = tmp_path / "hand.jsonl"
    hand.write_text(json.dumps(dict(completion="The answer is: 1", reference=1)) + "\n")
    assert run_as_script(monkeypatch, ["--score", str(hand), "--eval_data", "gsm8k", "--lr", "0.1"]) == \
        "error: --score grades a file and needs no model or training settings; drop --lr"
    assert run_as_script(monkeypatch, ["--score", str(hand)]).startswith("error: --score needs --eval_data")
    assert run_as_script(monkeypatch, ["--score", str(tmp_path / "nothing.jsonl"), "--eval_data", "gsm8k"]) == \
        f"error: --score {tmp_path / 'nothing.jsonl'}: no such file; pass a predictions.jsonl or a JSONL of completions"
    hand.write_text(json.dumps(dict(text="The answer is: 1")) + "\n")
    code = run_as_script(monkeypatch, ["--score", str(hand), "--eval_data", "gsm8k"])
    assert code.startswith(f"error: {hand}:1: no 'completion' string") and "\n" not in code
    hand.write_text(json.dumps(dict(completion="The answer is: 1", reference="one")) + "\n")
    code = run_as_script(monkeypatch, ["--score", str(hand), "--eval_data", "gsm8k"])
    assert code == f"error: {hand}:1: reference 'one' is not a GSM8K answer ('... #### n' or a number)"


def test_math_scoring_by_level_and_subject(tiny, tmp_path, monkeypatch):
    tok = pretrained.Tokenizer.from_pretrained(tiny["model"])
    problems = [("What is $1+1$?", "$\\boxed{2}$", "Level 1", "Algebra", " The answer is: 2"),
                ("Half of one?", "$\\boxed{\\frac{1}{2}}$", "Level 2", "Algebra", " The answer is: 1/2"),
                ("Angle?", "$\\boxed{90^\\circ}$", "Level 2", "Geometry", " The answer is: 90"),
                ("Cost?", "$\\boxed{\\$5}$", "Level 1", "Prealgebra", " The answer is 5")]
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(dict(problem=q, solution=s, level=lv, type=t)) + "\n"
                            for q, s, lv, t, _ in problems))
    replies = {q: r for q, _, _, _, r in problems}
    monkeypatch.setattr(train_math, "generate", oracle_for(tok, lambda q: replies[q]))
    args = base_args(tiny, tmp_path / "math", "--method", "none", "--eval_data", str(path))
    args.remove("--max_new_tokens")
    args.remove("6")
    after = main(args)["after"]
    assert after["task"] == "math" and after["max_new_tokens"] == 2048
    assert (after["correct"], after["n"], after["correct_lenient"], after["no_answer_mark"]) == (3, 4, 4, 1)
    assert after["by_level"] == {"Level 1": dict(accuracy=0.5, correct=1, n=2),
                                 "Level 2": dict(accuracy=1.0, correct=2, n=2)}
    assert after["by_subject"]["Algebra"]["correct"] == 2 and after["by_subject"]["Prealgebra"]["correct"] == 0


# ------------------------------------------------------------------------------------------- command line

def test_command_line(tiny, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, str(HERE / "train_math.py"), *base_args(tiny, out, "--max_steps", "2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^GSM8K official \d/4\nGSM8K strict \d/4\nGSM8K lenient \d/4$", proc.stdout, re.M), proc.stdout
    results = strict_json(out / "results.json")
    assert results["train"]["steps"] == 2 and "hf_token" not in results["args"]
    assert (out / "adapter.pt").is_file() and (out / "predictions.jsonl").is_file() and (out / "run.json").is_file()


def run_as_script(monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", ["train_math.py", *argv])
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # the script's SIGTERM handler: not for pytest
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(HERE / "train_math.py"), run_name="__main__")
    return exit_.value.code


def test_user_errors_exit_without_traceback(tiny, tmp_path, monkeypatch):
    code = run_as_script(monkeypatch, ["--model", tiny["model"], "--train_data", str(tmp_path / "missing.jsonl"),
                                       "--output_dir", str(tmp_path / "x")])
    assert str(code).startswith("error: data file") and "missing.jsonl does not exist" in code
    code = run_as_script(monkeypatch, ["--eval_only", "--output_dir", str(tmp_path / "y")])
    assert code == "error: --eval_only needs --load <run folder>; to evaluate the base model use --method none"
    code = run_as_script(monkeypatch, ["--load", str(tmp_path)])
    assert str(code).startswith("error: --load is for --eval_only")
    code = run_as_script(monkeypatch, ["--resume", "--overwrite"])
    assert str(code).startswith("error: --resume continues the run") and "drop one" in code
    code = run_as_script(monkeypatch, ["--template", "chat"])
    assert "--protocol official uses the Alpaca prompt" in code
    code = run_as_script(monkeypatch, ["--model", tiny["model"], "--device", "gpu:7", "--output_dir",
                                       str(tmp_path / "z")])
    assert str(code).startswith("error: --device gpu:7")
    code = run_as_script(monkeypatch, ["--model", tiny["model"], "--output_dir", tiny["model"]])
    assert "holds a model" in code and (Path(tiny["model"]) / "config.json").is_file()
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("flag, value", [
    ("--max_steps", "0"), ("--max_steps", "-3"), ("--epochs", "0"), ("--batch_size", "0"), ("--grad_accum", "0"),
    ("--micro_batch_size", "-1"), ("--eval_batch_size", "0"), ("--save_every", "0"), ("--max_train_samples", "0"),
    ("--max_eval_samples", "-1"), ("--max_new_tokens", "0"), ("--lr", "-0.1"), ("--lr", "nan"), ("--d", "0"),
    ("--warmup_ratio", "1.5"), ("--dropout", "-0.1"), ("--stop_after", "0"), ("--seed", "-1"), ("--dtype", "fp8"),
    ("--grad_clip", "-1"), ("--weight_decay", "-0.5"), ("--r", "0"), ("--threads", "0"), ("--lora_alpha", "0"),
    ("--max_length", "0"), ("--epochs", "2.5"), ("--seed", "4294967296"), ("--threads", "1000000000"),
])
def test_numbers_are_checked_before_anything_is_written(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_:
        main(["--output_dir", str(tmp_path / "run"), flag, value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and flag in err and err.count("\n") == 1 and err.startswith("error: ")
    assert not (tmp_path / "run").exists()


def test_batch_flags_agree(tmp_path):
    with pytest.raises(UserError, match="--grad_accum 3"):
        main(["--output_dir", str(tmp_path / "run"), "--batch_size", "16", "--grad_accum", "3"])
    with pytest.raises(SystemExit):
        train_math.parse_args(["--micro_batch_size", "4", "--grad_accum", "4"])
    assert train_math.parse_args(["--batch_size", "16", "--grad_accum", "4"]).micro_batch_size == 4
    assert train_math.parse_args(["--max_eval_samples", "all"]).max_eval_samples is None
    assert train_math.parse_args(["--out_dir", "old/spelling"]).output_dir == "old/spelling"
    assert train_math.parse_args([]).signs is False and train_math.parse_args(["--signs"]).signs is True
    paper = train_math.parse_args(["--recipe", "paper"])
    assert (paper.model, paper.protocol, paper.signs, paper.max_eval_samples) == ("google/gemma-7b", "official",
                                                                                 False, None)


# ------------------------------------------------------------------------------------ --projection (issue 13)

def test_projection_flag_is_recorded_resumed_and_reloaded(tiny, tmp_path):
    run = tmp_path / "local"
    out = main(base_args(tiny, run, "--projection", "local", "--max_steps", "2", "--stop_after", "1", "--no_eval"))
    assert out["projection"] == "local" and json.loads((run / "run.json").read_text())["projection"] == "local"
    assert unilora.read_adapter_file(str(run / "adapter.pt"))[0]["projection"]["kind"] == "local"
    with pytest.raises(UserError, match=r"--projection: 'local' -> 'iid'"):
        main(base_args(tiny, run, "--projection", "iid", "--max_steps", "2", "--resume"))
    with pytest.raises(UserError, match=r"--projection: 'local' -> 'balanced'"):  # left out: the default, refused
        main(base_args(tiny, run, "--max_steps", "2", "--resume"))
    done = main(base_args(tiny, run, "--projection", "local", "--max_steps", "2", "--resume"))
    assert strict_json(run / "results.json")["projection"] == "local" and done["train"]["steps_done"] == 2
    again = main(["--eval_only", "--load", str(run), "--threads", "1", "--max_new_tokens", "6",
                  "--eval_batch_size", "3"])  # the kind comes from run.json: the same adapter, the same numbers
    assert again["projection"] == "local" and again["after"]["loglik"] == pytest.approx(done["after"]["loglik"],
                                                                                           abs=1e-5)


def test_projection_errors_are_one_line(tiny, tmp_path, monkeypatch):
    for method in ("lora", "none"):
        code = run_as_script(monkeypatch, ["--method", method, "--projection", "iid"])
        assert code == f"error: --projection is Uni-LoRA's choice of P; --method {method} has none: drop it"
    code = run_as_script(monkeypatch, base_args(tiny, tmp_path / "ff", "--projection", "fastfood", "--no-signs"))
    assert str(code).startswith("error: --projection fastfood has random signs") and "\n" not in code
    monkeypatch.setattr("projections.GAUSSIAN_MAX_ENTRIES", 1000)  # the tiny model's D x d is far above
    code = run_as_script(monkeypatch, base_args(tiny, tmp_path / "g", "--projection", "gaussian", "--no_eval"))
    assert str(code).startswith("error: --d 256 / --projection gaussian: gaussian projection: a dense")
    assert "\n" not in code and not (tmp_path / "g" / "run.json").exists()


# ------------------------------------------------------------------------------- several copies (torchrun, issue 14)

def torchrun(argv, copies=2):
    """The user's command, `torchrun --nproc_per_node 2 -- train_math.py ...`, on CPU with gloo on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(copies), "--master_addr",
           "127.0.0.1", "--master_port", str(port), "--", str(HERE / "train_math.py"), *argv]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=HERE,
                          env=env | {"OMP_NUM_THREADS": "1"})


def assert_same_params(a, b, rtol):
    for x, y in zip(a, b, strict=True):
        assert x.dtype == torch.float64 and (x - y).abs().max() <= rtol * x.abs().max()


def test_two_copies_train_and_evaluate_like_one(tiny, tmp_path):
    """Global batch 4 split over 2 copies (2 examples each) equals one process; in float64 the sums over the copies
    differ from the one-process sums in rounding only, so 1e-9 relative is a loose bound."""
    def args(out, *extra):
        return base_args(tiny, out, "--dtype", "float64", "--max_steps", "4", "--save_every", "2", *extra)
    one, two = tmp_path / "one", tmp_path / "two"
    main(args(one, "--stop_after", "2", "--no_eval"))
    proc = torchrun(args(two, "--stop_after", "2", "--no_eval"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_params(checkpoint_params(one), checkpoint_params(two), rtol=1e-9)
    log_one, log_two = ([json.loads(x) for x in (d / "train_log.jsonl").read_text().splitlines()] for d in (one, two))
    assert [r["step"] for r in log_two] == [1, 2]  # one writer: no line twice
    for a, b in zip(log_one, log_two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-9) and b["grad_norm"] == pytest.approx(a["grad_norm"],
                                                                                                 rel=1e-9)
    assert sorted(p.name for p in two.iterdir()) == ["adapter.pt", "checkpoint.pt", "results.json", "run.json",
                                                     "train_log.jsonl"]
    assert strict_json(two / "results.json")["world_size"] == 2 and proc.stdout.count("training 4 steps") == 1

    # the 2-copy checkpoint, resumed by one process, continues the one-process trajectory
    ref = main(args(one, "--resume"))
    cont = main(args(two, "--resume"))
    assert_same_params(checkpoint_params(one), checkpoint_params(two), rtol=1e-9)
    assert cont["after"]["loglik"] == pytest.approx(ref["after"]["loglik"], rel=1e-9)

    # evaluation split over 2 copies: the same predictions, in file order, and the same numbers
    proc = torchrun(["--eval_only", "--load", str(one), "--dtype", "float64", "--threads", "1",
                     "--max_new_tokens", "6", "--eval_batch_size", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (one / "eval-1" / "predictions.jsonl").read_text() == (one / "predictions.jsonl").read_text()
    shared = strict_json(one / "eval-1" / "results.json")
    assert shared["world_size"] == 2 and not (one / "eval-2").exists()
    for key in ("accuracy", "accuracy_lenient", "correct", "n", "no_answer_mark"):
        assert shared["after"][key] == ref["after"][key]
    assert shared["after"]["loglik"] == pytest.approx(ref["after"]["loglik"], rel=1e-9)



def test_plain_python_never_touches_torch_distributed(tiny, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.distributed was called by a one-process run")
    for name in ("init_process_group", "destroy_process_group", "barrier", "all_reduce", "broadcast",
                 "broadcast_object_list", "all_gather_object"):
        monkeypatch.setattr(torch.distributed, name, refuse)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    out = main(base_args(tiny, tmp_path / "plain", "--max_steps", "1"))
    assert out["world_size"] == 1 and out["status"] == "finished"




def test_runs_from_before_projection_are_balanced(tiny, tmp_path):
    run = tmp_path / "old"
    main(base_args(tiny, run, "--max_steps", "2", "--stop_after", "1", "--no_eval"))
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["config"].pop("projection") == "balanced"  # as a checkpoint written before the flag existed
    torch.save(ckpt, run / "checkpoint.pt")
    config = json.loads((run / "run.json").read_text())
    del config["projection"]
    (run / "run.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"--projection: 'balanced' -> 'iid'"):
        main(base_args(tiny, run, "--max_steps", "2", "--resume", "--projection", "iid"))
    assert main(base_args(tiny, run, "--max_steps", "2", "--resume", "--no_eval"))["status"] == "trained"
    again = main(["--eval_only", "--load", str(run), "--threads", "1", "--max_new_tokens", "2"])
    assert again["projection"] == "balanced" and again["status"] == "finished"


# ------------------------------------------------------------------------------- the loss of a batch (issue 21)

@pytest.mark.parametrize("loss", ["example", "tokens"])
def test_batch_loss_against_a_hand_computation(tiny, loss):
    """Three examples of different lengths in micro-batches of 2 (so one is padded). --loss example: the mean of
    each example's own token mean (the official run: batch 1 x 64 accumulation under transformers 4.40.1);
    --loss tokens: the mean over all answer tokens of the batch. Each example is computed alone, unpadded."""
    import torch.nn.functional as F
    from recipes.training import Ranks
    torch.manual_seed(0)
    model = pretrained.CausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    adapter = unilora.apply_unilora(model, 64, seed=1)
    with torch.no_grad():
        adapter.theta_d.normal_(0, 0.1)
    vocab = model.config["vocab_size"]
    train = []
    for n_prompt, n_answer in ((3, 2), (4, 4), (2, 9)):
        ids = torch.randint(1, vocab, (n_prompt + n_answer,)).tolist()
        labels = [-100] * n_prompt + ids[n_prompt:]
        train.append((ids, labels, n_answer))
    args = argparse.Namespace(micro_batch_size=2, pad_id=0, loss=loss)
    run = argparse.Namespace(args=args, ranks=Ranks(), device=torch.device("cpu"), autocast=contextlib.nullcontext,
                             scaler=torch.amp.GradScaler("cpu", enabled=False))
    got = causal_lm.backward(run, model, train, [0, 1, 2])
    grad, adapter.theta_d.grad = adapter.theta_d.grad.clone(), None

    per_example, token_sum = [], 0.0
    for ids, labels, n in train:
        logits = model(torch.tensor([ids]))[0, :-1]
        target = torch.tensor(labels[1:])
        per_example.append(F.cross_entropy(logits, target, ignore_index=-100))  # the mean over its n tokens
        token_sum = token_sum + F.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
    expected = sum(per_example) / 3 if loss == "example" else token_sum / (2 + 4 + 9)
    expected.backward()
    assert got == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(grad, adapter.theta_d.grad, rtol=1e-4, atol=1e-7)
    if loss == "example":  # and it is not the token mean: the lengths differ
        assert got != pytest.approx((token_sum / 15).item(), rel=1e-3)


def test_paper_defaults(tmp_path):
    """Without flags: the paper's all-positive P; the paper recipe: fp32 weights under fp16 autocast, seed 42,
    the per-example loss of the official run; each overridable."""
    small = train_math.parse_args([])
    assert (small.signs, small.seed, small.loss) == (False, 0, "example")
    paper = train_math.parse_args(["--recipe", "paper"])
    assert (paper.signs, paper.dtype, paper.amp, paper.seed, paper.loss) == (False, "float32", "fp16", 42, "example")
    mine = train_math.parse_args(["--recipe", "paper", "--seed", "1", "--amp", "bf16", "--signs", "--loss", "tokens"])
    assert (mine.seed, mine.amp, mine.signs, mine.loss) == (1, "bf16", True, "tokens")
    assert train_math.parse_args(["--protocol", "plain", "--template", "alpaca"]).loss == "tokens"
    assert train_math.parse_args(["--projection", "fastfood"]).signs is True  # signed by construction


# ------------------------------------------------------------------------------------------- run folders (issue 22)

def tree(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


RUN = ["adapter.pt", "checkpoint.pt", "predictions.jsonl", "results.json", "run.json", "train_log.jsonl"]


def test_two_runs_on_one_folder_never_mix(tiny, tmp_path):
    """Two real processes on one --output_dir: the second stops at once, naming the first by its pid; the first
    finishes with its own files only: its seed, its steps logged once each."""
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, str(HERE / "train_math.py"), *base_args(tiny, out, "--max_steps", "2",
                                                                                      "--seed", "1")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=HERE,
                             env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        with paused_while_holding(first, tmp_path / "out.lock"):  # the first run holds the folder meanwhile
            with pytest.raises(UserError) as refused:
                main(base_args(tiny, out, "--max_steps", "2", "--seed", "2"))
        _, err = first.communicate(timeout=240)
    finally:
        first.kill()
    assert str(refused.value) == (f"--output_dir {out} is in use by another run (pid {first.pid}); wait for it to "
                                  f"end, or pick another --output_dir")
    assert first.returncode == 0, err[-3000:]
    assert tree(out) == RUN and not (tmp_path / "out.lock").exists() and not (tmp_path / "out.partial").exists()
    assert strict_json(out / "results.json")["args"]["seed"] == json.loads((out / "run.json").read_text())["seed"] == 1
    assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2]


def interrupt_at(monkeypatch, step):
    """Ctrl-C during optimiser step `step` (before anything of it is logged or saved)."""
    real = causal_lm.optimizer_step

    def step_or_interrupt(*args, **kwargs):
        if args[3] == step:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(causal_lm, "optimizer_step", step_or_interrupt)  # what the shared loop calls


def test_a_failed_or_interrupted_run_blocks_no_retry_and_resumes_from_its_checkpoint(tiny, tmp_path, monkeypatch,
                                                                                    capsys):
    out = tmp_path / "out"
    with pytest.raises(UserError) as refused:
        main(base_args(tiny, out, "--max_train_samples", "3", "--no_eval"))
    assert str(refused.value) == "3 examples do not fill one batch of 4; lower --batch_size or use more data"
    assert not out.exists() and not (tmp_path / "out.partial").exists() and not (tmp_path / "out.lock").exists()
    argv = base_args(tiny, out, "--max_steps", "4", "--save_every", "2")
    interrupt_at(monkeypatch, 1)  # before the first checkpoint: nothing is kept
    capsys.readouterr()
    assert run_as_script(monkeypatch, argv) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "interrupted; the output folder was left as it was before"
    assert not out.exists() and not (tmp_path / "out.partial").exists() and not (tmp_path / "out.lock").exists()
    monkeypatch.undo()
    interrupt_at(monkeypatch, 3)  # after the checkpoint of step 2: a run to resume, and the command that does it
    assert run_as_script(monkeypatch, argv) == 130
    err = capsys.readouterr().err
    command = shlex.join(["python", "train_math.py", *argv, "--resume"])
    assert err.splitlines()[-1] == f"interrupted at step 2 (the last checkpoint); continue with: {command}"
    assert "Traceback" not in err and tree(out) == ["adapter.pt", "checkpoint.pt", "run.json", "train_log.jsonl"]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    monkeypatch.undo()
    done = main(shlex.split(command)[2:])
    assert done["status"] == "finished" and tree(out) == RUN
    assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    results = (out / "results.json").read_bytes()
    with pytest.raises(UserError) as refused:  # a finished run: --resume would replace its results
        main(shlex.split(command)[2:])
    assert str(refused.value) == (f"--resume: {out} holds a finished run, whose results --resume would replace; "
                                  f"evaluate it again with --eval_only --load {out}, or train it anew with --overwrite "
                                  f"instead of --resume")
    assert (out / "results.json").read_bytes() == results


def test_resume_refuses_a_damaged_checkpoint_or_log_in_one_line(tiny, tmp_path):
    run = tmp_path / "run"
    args = base_args(tiny, run, "--max_steps", "2", "--stop_after", "1", "--no_eval")
    main(args)
    path, log = run / "checkpoint.pt", run / "train_log.jsonl"
    good, logged = torch.load(path, weights_only=True), log.read_text()
    anew = "start the run anew with --overwrite instead of --resume"

    def refusal(damage=None, content=None):
        ckpt = torch.load(path, weights_only=True) if damage else None
        if damage:
            damage(ckpt)
            torch.save(ckpt, path)
        if content is not None:
            path.write_bytes(content)
        before = {p: (run / p).read_bytes() for p in tree(run)}
        with pytest.raises(UserError) as refused:
            main(args + ["--resume"])
        assert {p: (run / p).read_bytes() for p in tree(run)} == before  # a refusal changes nothing
        torch.save(good, path)
        return str(refused.value)
    assert refusal(content=path.read_bytes()[:300]).startswith(f"{path} cannot be read as a checkpoint (")
    assert refusal(content=b"").endswith(f"); {anew}")
    assert refusal(lambda c: c.clear() or c.update(config=good["config"], listed=[1])) == \
        f"{path} is not a checkpoint of this run (it has no 'step'); {anew}"
    assert refusal(lambda c: c.pop("scaler")) == f"{path} is not a checkpoint of this run (it has no 'scaler'); {anew}"
    assert refusal(lambda c: c.update(step="1")) == \
        f"{path} is not a checkpoint of this run (its step '1' is not one of the run's 2); {anew}"
    assert refusal(lambda c: c.update(step=3)) == \
        f"{path} is not a checkpoint of this run (its step 3 is not one of the run's 2); {anew}"
    for key, damage in [("adapter_params", lambda c: c["adapter_params"][0].resize_(3)),  # a tensor of another shape
                        ("adapter_params", lambda c: c.update(adapter_params=[])),
                        ("optimizer", lambda c: c["optimizer"]["state"][0].update(exp_avg=torch.zeros(3))),
                        ("optimizer", lambda c: c["optimizer"]["param_groups"][0].update(lr="high")),
                        ("scheduler", lambda c: c["scheduler"].update(last_epoch=[1])),
                        ("scaler", lambda c: c.update(scaler=[])),
                        ("torch_rng", lambda c: c.update(torch_rng=torch.zeros(5, dtype=torch.uint8))),
                        ("cuda_rng", lambda c: c.update(cuda_rng="seed")),
                        ("before", lambda c: c.update(before={"loglik": "high"}))]:
        assert refusal(damage) == f"{path} is not a checkpoint of this run (its {key} does not fit this run's); {anew}"
    assert refusal(lambda c: c["optimizer"].update(param_groups=[])).startswith(
        f"{path} is not a checkpoint of this run (")  # the loader's own check, in one line
    log.write_text("not json\n" + logged)
    assert refusal() == f"{log}:1 is not a line of a training log; restore the file, or {anew}"
    log.write_text("")
    assert refusal() == f"{log} does not hold steps 1 to 1, which the checkpoint has done; restore the file, or {anew}"
    log.write_text(logged + '{"step": 2, "lo')  # torn by a kill while writing step 2's line: cut, as a later step's
    assert main(base_args(tiny, run, "--max_steps", "2", "--no_eval", "--resume"))["train"]["steps_done"] == 2
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2]


def test_eval_only_takes_the_runs_settings_and_no_training_flags(tiny, tmp_path, monkeypatch):
    run = tmp_path / "run"
    main(base_args(tiny, run, "--max_steps", "1"))  # --max_new_tokens 6, --eval_batch_size 3
    files = {p: (run / p).read_bytes() for p in tree(run)}
    for argv, flag in ((["--lr", "0.5", "--d", "1024"], "--lr"), (["--d", "1024"], "--d"), (["--seed", "3"], "--seed"),
                       (["--max_steps", "3"], "--max_steps"), (["--train_data", "gsm8k"], "--train_data")):
        with pytest.raises(UserError) as refused:
            main(["--eval_only", "--load", str(run), *argv])
        assert str(refused.value) == f"--eval_only evaluates the run in --load as it was trained, so {flag} does " \
                                     f"not apply; drop it"
    again = main(["--eval_only", "--load", str(run), "--threads", "1"])  # the run's budget and batch, not 1,024
    assert (again["after"]["max_new_tokens"], again["args"]["eval_batch_size"]) == (6, 3)
    assert tree(run) == sorted([*files, "eval-1", "eval-1/predictions.jsonl", "eval-1/results.json"])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError):  # fails once its folder is staged: no empty eval-2/ is left
        main(["--eval_only", "--load", str(run), "--eval_data", str(tmp_path / "empty.jsonl"), "--threads", "1"])
    assert tree(run) == sorted([*files, "eval-1", "eval-1/predictions.jsonl", "eval-1/results.json"])
    with pytest.raises(UserError) as refused:
        main(["--eval_only", "--load", str(run), "--output_dir", str(run / "eval-1"), "--overwrite"])
    assert str(refused.value) == (f"--output_dir {run / 'eval-1'} is the run being evaluated, or holds it, or lies "
                                  f"inside it; its files are never replaced; leave --output_dir out (results go to "
                                  f"{run / 'eval-2'})")
    hint = "not a run folder of train_math.py (needs run.json and adapter.pt)"
    for content, problem in (("[]", "holds no settings (a JSON object)"),
                             (json.dumps({"task": "sst2", "method": "unilora", "model": "roberta"}),  # train_glue's
                              "has no 'train_data'"),
                             (json.dumps(json.loads(files["run.json"]) | {"max_new_tokens": 0}),
                              "has an invalid 'max_new_tokens': 0")):
        (run / "run.json").write_text(content)
        assert run_as_script(monkeypatch, ["--eval_only", "--load", str(run)]) == \
            f"error: --load {run}: {run / 'run.json'} {problem}; {hint}"


def test_unknown_devices_and_abbreviated_flags_are_refused_in_one_line(tmp_path, monkeypatch, capsys):
    out = ["--output_dir", str(tmp_path / "out")]
    assert run_as_script(monkeypatch, ["--device", "meta", *out]) == \
        "error: --device meta: not a device these scripts run on; use auto, cpu, cuda, cuda:N or mps"
    capsys.readouterr()
    assert run_as_script(monkeypatch, ["--max_new_token", "5", *out]) == 2  # not silently --max_new_tokens
    assert capsys.readouterr().err == "error: unrecognized arguments: --max_new_token 5 (see --help)\n"
    assert tree(tmp_path) == []


# ------------------------------------------------------------------------------- several runs on one base (issue 24)

def test_several_runs_are_evaluated_in_mixed_batches_as_each_alone(tiny, tmp_path, monkeypatch):
    """--eval_only --load A,B,C: one base, every run's adapter in one bank, all problems in one shuffled stream;
    each run's eval-N/ holds what its own --eval_only --load writes (greedy: the same completions, in fp32 on CPU)."""
    sums = tmp_path / "sums.jsonl"  # other training data, a larger lr: B's adapter decodes other tokens than A's
    sums.write_text("".join(json.dumps(problem(a, b)) + "\n" for a in range(20, 30) for b in range(3, 5)))
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    main(base_args(tiny, a, "--max_steps", "2", "--no_eval"))  # 4 problems, batches of 3, 6 new tokens
    main(base_args(tiny, b, "--max_steps", "4", "--lr", "0.5", "--train_data", str(sums), "--no_eval",
                   "--max_eval_samples", "6", "--eval_batch_size", "2"))
    main(base_args(tiny, c, "--max_steps", "1", "--no_eval", "--max_new_tokens", "4"))  # another budget
    calls = {"rows": [], "generate": []}
    real_rows, real_generate = taskbank.TaskBank.rows, train_math.generate

    def rows(self, tasks):
        calls["rows"].append(list(tasks))
        return real_rows(self, tasks)

    def generate(model, prompts, *args):
        """The real one, spied; each row gets one more token, the sum of its prompt: completions of its own (the
        tiny model's greedy text is the same for every problem), to see each land on its own problem."""
        calls["generate"].append(calls["rows"][-1] if calls["rows"] else None)  # the tasks of the batch decoded
        new, why = real_generate(model, prompts, *args)
        return [ids + [3 + ord("0") + sum(p) % 40] for ids, p in zip(new, prompts)], why  # a byte: 0 to W
    monkeypatch.setattr(taskbank.TaskBank, "rows", rows)
    monkeypatch.setattr(train_math, "generate", generate)
    together = main(["--eval_only", "--load", f"{a},{b},{c}", "--threads", "1"])
    assert [r["after"]["n"] for r in together] == [4, 6, 4]
    assert max(map(len, calls["generate"])) == 2  # batches of the smallest eval_batch_size
    assert any(set(tasks) == {"0", "1"} for tasks in calls["generate"])  # a batch of two runs' problems
    assert all(set(tasks) == {"2"} for tasks in calls["generate"] if "2" in tasks)  # C decodes by its own budget
    texts = {run: [json.loads(x)["completion"] for x in (run / "eval-1" / "predictions.jsonl").read_text().splitlines()]
             for run in (a, b)}
    assert [t[:6] for t in texts[a]] != [t[:6] for t in texts[b][:4]]  # the two adapters decode differently
    for run, mixed in zip((a, b, c), together):
        alone = main(["--eval_only", "--load", str(run), "--threads", "1"])
        assert sorted(p.name for p in run.iterdir() if p.name.startswith("eval")) == ["eval-1", "eval-2"]
        assert (run / "eval-1" / "predictions.jsonl").read_text() == (run / "eval-2" / "predictions.jsonl").read_text()
        written = strict_json(run / "eval-1" / "results.json")
        assert written == json.loads(json.dumps(mixed)) and written["together"] == [str(a), str(b), str(c)]
        loglik = [r["after"].pop("loglik") for r in (written, alone)]
        assert loglik[0] == pytest.approx(loglik[1], rel=1e-6)  # the lone run merges the adapter: rounding
        for r in (written, alone):
            r["after"].pop("merge_max_logit_change", None), r["after"].pop("generate_seconds")
            r.pop("together", None)
        assert written == json.loads(json.dumps(alone))  # settings, parameters, every other number



def test_several_runs_refuse_other_settings_and_flags_in_one_line(tiny, tmp_path, monkeypatch):
    a, d = tmp_path / "a", tmp_path / "d"
    main(base_args(tiny, a, "--max_steps", "1", "--no_eval"))
    main(base_args(tiny, d, "--max_steps", "1", "--no_eval", "--seed", "1"))
    before = tree(tmp_path)
    assert run_as_script(monkeypatch, ["--eval_only", "--load", f"{a},{d}"]) == \
        f"error: --load {a} and {d} differ in seed (0 vs 1): runs evaluated together share one base, P and " \
        f"precision; evaluate them one by one"
    assert run_as_script(monkeypatch, ["--eval_only", "--load", f"{a},{d}", "--lr", "0.1"]) == \
        "error: --lr does not apply to --eval_only with several --load folders: each run is evaluated with its own " \
        "run.json's settings, into its own DIR/eval-N; drop it"
    for argv, message in ((["--output_dir", str(tmp_path / "x")], "--output_dir does not apply"),
                          (["--eval_data", tiny["test"]], "--eval_data does not apply"),
                          ([], f"--load names {a} twice")):
        with pytest.raises(UserError, match=message):
            main(["--eval_only", "--load", f"{a},{d}" if argv else f"{a},{a}", *argv])
    with pytest.raises(UserError, match="an empty folder name"):
        main(["--eval_only", "--load", f"{a},"])
    assert tree(tmp_path) == before  # nothing written
    (d / "run.json").write_text((a / "run.json").read_text())  # the seed shows in the adapter file only
    with pytest.raises(UserError) as refused:
        main(["--eval_only", "--load", f"{a},{d}", "--threads", "1"])
    assert str(refused.value).startswith(f"--load: {d / 'adapter.pt'} (fingerprint ") and "seed differs" in \
        str(refused.value) and "\n" not in str(refused.value)
    assert tree(tmp_path) == before  # the eval-N folders staged for the runs are gone
