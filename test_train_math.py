"""Tests for train_math.py: offline, fast, and without the prepared assets.

Why this file exists: the math script glues data parsing, prompt masking, Uni-LoRA training with resume, and
generation-based scoring together; each piece is easy to get subtly wrong (a prompt token left in the loss, an
answer read from the wrong number, a resumed run that sees different batches).  The tests build a tiny random
Llama-style checkpoint and a byte-level BPE tokenizer.json in a temporary folder and run the real script on
them: in-process through main(argv) for speed, and once as a subprocess to cover the command line itself.
"""
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import pretrained
import train_math
from train_math import UserError, extract_answer, main, same_number, to_metamath_format

HERE = Path(__file__).resolve().parent
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
          "system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>"
          "assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_symbols():
    """The byte-level BPE alphabet: printable bytes stand for themselves, the others are shifted past 255 so
    every byte has a visible symbol (space -> 'Ġ', newline -> 'Ċ')."""
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    shifted, out = 0, {}
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + shifted)
            shifted += 1
    return out


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
            "--out_dir", str(out), "--max_train_samples", "16", "--max_eval_samples", "4", "--batch_size", "4",
            "--micro_batch_size", "2", "--max_length", "256", "--max_new_tokens", "6", "--eval_batch_size", "3",
            "--d", "256", "--lr", "0.02", "--data_dir", str(out / "data"), "--threads", "1", *extra]


def formatter(tiny, template="alpaca"):
    tok = train_math.Tokenizer.from_pretrained(tiny["model"])
    config = json.loads((Path(tiny["model"]) / "config.json").read_text())
    return train_math.Formatter(tok, template, tiny["model"], config)


# ---------------------------------------------------------------------------------------------- answers, data

@pytest.mark.parametrize("text, answer, rule", [
    ("She has 3 left.\nThe answer is: 18", "18", "answer_is"),
    ("The answer is: $1,234.00.", "1234", "answer_is"),
    ("the answer is 7, not 9", "7", "answer_is"),
    ("The answer is: -0.50", "-0.5", "answer_is"),
    ("2 + 3 = 5\n#### 72", "72", "####"),
    ("It costs $12 and then 1,000 more.", "1000", "last_number"),
    ("The answer is: 4 apples, not 5", "4", "answer_is"),  # the first number after the marker, as MetaMath reads it
    ("I count 4 apples. The answer is: unknown", "4", "last_number"),
    ("no digits at all", None, "none"),
])
def test_extract_answer(text, answer, rule):
    assert extract_answer(text) == (answer, rule)


def test_same_number():
    assert same_number("18", "18") and same_number("0.5", "0.50") and same_number("1000", "1000.0")
    assert not same_number("18", "19") and not same_number(None, "1")


def test_gsm8k_answers_take_metamath_form():
    converted = to_metamath_format(problem(2, 3)["answer"])
    assert converted == "2 plus 3 is 5.\nThe answer is: 5"  # calculator notes gone, '#### 5' rewritten
    assert extract_answer(converted) == ("5", "answer_is")
    assert to_metamath_format("Plain MetaMathQA text.\nThe answer is: 4") == "Plain MetaMathQA text.\nThe answer is: 4"


def test_loss_is_masked_to_the_response(tiny):
    fmt = formatter(tiny)
    ids, labels, truncated = fmt.example("What is 2 plus 3?", "It is 5.", max_length=1000)
    n_prompt = labels.count(-100)
    assert not truncated and len(ids) == len(labels)
    assert labels[:n_prompt] == [-100] * n_prompt and -100 not in labels[n_prompt:]
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == fmt.end_id == 2
    assert fmt.tok.decode(ids[:n_prompt]).endswith("### Response:")
    assert fmt.tok.decode(ids[n_prompt:]) == " It is 5."  # the end token is special: not decoded
    short_ids, short_labels, truncated = fmt.example("What is 2 plus 3?", "It is 5.", max_length=n_prompt + 2)
    assert truncated and short_ids == ids[:n_prompt + 2] and short_labels == labels[:n_prompt + 2]


def test_chat_template_is_rendered_by_hand(tiny, tmp_path):
    fmt = formatter(tiny, "chat")
    ids, labels, _ = fmt.example("Hi?", "Hello.", max_length=1000)
    n_prompt = labels.count(-100)
    prompt = fmt.tok.decode(ids[:n_prompt], skip_special_tokens=False)
    assert prompt == ("<|im_start|>system\nYou are a tiny test model<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert ids[-1] == fmt.tok.token_to_id("<|im_end|>")
    other = tmp_path / "model"
    other.mkdir()
    for f in Path(tiny["model"]).iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    (other / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="not ChatML"):
        train_math.Formatter(fmt.tok, "chat", other, {})


def test_chatml_default_system_message_qwen_style(tmp_path):
    """Qwen2-style templates write the newline as an escaped '\\n' inside a jinja string and have a branch for a
    user-supplied system message before the default one; only the literal default is taken."""
    template = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
                "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>"
                "\\n' }}{%- endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    render = train_math.chatml_prompt_builder(tmp_path, None)
    assert render("2+2?") == ("<|im_start|>system\nYou are Qwen, a helpful assistant.<|im_end|>\n"
                              "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert train_math.chatml_prompt_builder(tmp_path, "Be brief.")("q").startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nq")


def test_bad_lines_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(problem(1, 2)) + "\n\n{not json\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:3: not valid JSON"):
        train_math.read_records(bad)
    bad.write_text(json.dumps(problem(1, 2)) + "\n" + json.dumps({"question": "q"}) + "\n")
    records = train_math.read_records(bad)
    with pytest.raises(UserError, match=r"bad\.jsonl:2: has no field 'answer'"):
        train_math.get_pairs(records, "question", "answer")
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"q": "x", "a": "y"}) + "\n")
    with pytest.raises(UserError, match="--prompt_field"):
        train_math.pick_fields(train_math.read_records(odd), None, None, odd)
    assert train_math.pick_fields(train_math.read_records(odd), "q", "a", odd) == ("q", "a")


def test_metamathqa_comes_from_hf_endpoint(tmp_path, monkeypatch):
    """The hub path is {HF_ENDPOINT}/datasets/meta-math/MetaMathQA/resolve/main/MetaMathQA-395K.json and the
    file is one JSON array: served here from a loopback server."""
    served = tmp_path / "srv" / "datasets/meta-math/MetaMathQA/resolve/main"
    served.mkdir(parents=True)
    (served / "MetaMathQA-395K.json").write_text(json.dumps(
        [{"query": "What is 1 plus 1?", "response": "1 + 1 = 2.\nThe answer is: 2", "type": "GSM_AnsAug"}] * 3))
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "srv"))  # noqa: E731
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        path = train_math.fetch("metamathqa", "train", tmp_path / "cache", token=None)
    finally:
        server.shutdown()
    records = train_math.read_records(path)
    assert path.name == "MetaMathQA-395K.json" and len(records) == 3
    assert train_math.pick_fields(records, None, None, path) == ("query", "response")


# ---------------------------------------------------------------------------------------------- end to end

def adapter_params(out):
    return torch.load(out / "checkpoint.pt", weights_only=False)["adapter_params"]


def test_train_resume_and_eval(tiny, tmp_path):
    full = main(base_args(tiny, tmp_path / "full", "--max_steps", "4", "--save_every", "2"))
    assert full["train"]["steps"] == 4 and full["params"]["d"] == 256
    assert full["after"]["n"] == 4 and 0.0 <= full["after"]["accuracy"] <= 1.0
    # training on sums must make the reference solutions of unseen sums more likely than the base model did
    assert full["after"]["loglik"] > full["before"]["loglik"]
    assert abs(full["merge_max_logit_change"]) < 1e-4
    rows = [json.loads(x) for x in (tmp_path / "full" / "predictions.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in rows] == ["42", "15", "123", "48"]  # the first 4 problems, in file order
    log = [json.loads(x) for x in (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and log[-1]["lr"] < log[1]["lr"]  # cosine decay

    # an interrupted run (stopped after step 2) resumed to the end equals the uninterrupted one
    part = tmp_path / "part"
    stopped = main(base_args(tiny, part, "--max_steps", "4", "--save_every", "2", "--stop_after", "2", "--no_eval"))
    assert "after" not in stopped and torch.load(part / "checkpoint.pt", weights_only=False)["step"] == 2
    with pytest.raises(UserError, match="--resume"):
        main(base_args(tiny, part, "--max_steps", "4", "--save_every", "2"))
    with pytest.raises(UserError, match=r"lr: 0\.02 -> 0\.01"):
        main(base_args(tiny, part, "--max_steps", "4", "--save_every", "2", "--resume", "--lr", "0.01"))
    with open(part / "train_log.jsonl", "a") as f:  # as if it had died during step 3, after logging it
        f.write(json.dumps({"step": 3, "loss": 0.0}) + "\n")
    resumed = main(base_args(tiny, part, "--max_steps", "4", "--save_every", "2", "--resume"))
    log = [json.loads(x) for x in (part / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and log[2]["loss"] > 0
    assert resumed["train"]["first_loss"] == full["train"]["first_loss"]
    for a, b in zip(adapter_params(tmp_path / "full"), adapter_params(part), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert resumed["before"] == full["before"]
    assert resumed["after"]["loglik"] == pytest.approx(full["after"]["loglik"], abs=1e-5)

    # the saved adapter evaluates to the same numbers on its own
    again = main(base_args(tiny, tmp_path / "again", "--eval_only", "--adapter", str(tmp_path / "full" / "adapter.pt")))
    assert again["after"]["loglik"] == pytest.approx(full["after"]["loglik"], abs=1e-5)


def test_lora_baseline_and_base_model(tiny, tmp_path):
    lora = main(base_args(tiny, tmp_path / "lora", "--method", "lora", "--max_steps", "2", "--lr", "0.01"))
    assert lora["method"] == "lora" and lora["train"]["steps"] == 2 and lora["after"]["n"] == 4
    base = main(base_args(tiny, tmp_path / "none", "--method", "none"))
    assert "train" not in base and "params" not in base
    assert base["after"]["loglik"] == pytest.approx(lora["before"]["loglik"], abs=1e-5)


def test_scoring_with_a_model_that_knows_some_answers(tiny, tmp_path, monkeypatch):
    """Replace generation by an oracle that answers every other problem correctly: the accuracy must come out
    exact, which checks left padding, the length-sorted batching and putting answers back in file order."""
    tok = train_math.Tokenizer.from_pretrained(tiny["model"])

    def oracle(self, input_ids, attention_mask, max_new_tokens, eos_token_id=None):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            assert mask[0] == 0 or all(mask)  # padding sits on the left
            text = tok.decode([t for t, m in zip(ids, mask) if m])
            a, b = map(int, text.split("What is ")[1].split("?")[0].split(" plus "))
            guess = a + b if a % 2 == 0 else a * b  # right for even a only
            rows.append(tok.encode(f" {a} plus {b} is {guess}.\nThe answer is: {guess}").ids + [eos_token_id] * 3)
        width = max(map(len, rows))
        return torch.tensor([r + [eos_token_id] * (width - len(r)) for r in rows])

    monkeypatch.setattr(pretrained.CausalLM, "generate", oracle)
    res = main(base_args(tiny, tmp_path / "oracle", "--method", "none", "--max_eval_samples", "6",
                         "--max_new_tokens", "64"))
    # test problems (12,30) (7,8) (100,23) (4,44) (9,9) (31,2): even a for 12, 100, 4
    assert res["after"]["correct"] == 3 and res["after"]["accuracy"] == 0.5
    rows = [json.loads(x) for x in (tmp_path / "oracle" / "predictions.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, False, True, True, False, False]
    assert rows[1]["prediction"] == "56" and rows[1]["rule"] == "answer_is"


def test_command_line(tiny, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, str(HERE / "train_math.py"), *base_args(tiny, out, "--max_steps", "2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GSM8K accuracy" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["train"]["steps"] == 2 and "hf_token" not in results["args"]
    assert (out / "adapter.pt").is_file() and (out / "predictions.jsonl").is_file()


def test_user_errors_exit_without_traceback(tiny, tmp_path, monkeypatch):
    """Run the file as __main__ in-process (runpy): a fixable mistake is one 'error: ...' line, exit status 1."""
    import runpy
    monkeypatch.setattr(sys, "argv", ["train_math.py", "--model", tiny["model"], "--train_data",
                                      str(tmp_path / "missing.jsonl"), "--out_dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(HERE / "train_math.py"), run_name="__main__")
    assert str(exit_.value.code).startswith("error: data file") and "missing.jsonl does not exist" in exit_.value.code
