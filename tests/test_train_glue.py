"""Tests for train_glue.py: fast, offline, and independent of the prepared assets.

Why this file exists: the GLUE script must fetch exactly GLUE's files, parse eight TSV layouts, score with the
GLUE metrics, train three methods through one optimiser/schedule, rebuild saved runs, summarise seeds, print
Table 1, and turn every user error into one short message that leaves nothing behind. Everything runs on tiny
random BERT and RoBERTa checkpoints (hand-written tokenizer.json files), tiny TSVs and GLUE-shaped zips served
from 127.0.0.1, so the file needs no network and takes well under a minute. (The metrics and Table 1 are tested
on their own in test_glue_metrics.py and test_glue_table.py.)
"""
import io
import json
import math
import os
import random
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import train_glue as tg
from pretrained import save_safetensors
from recipes import glue_data
from references import bert_template, byte_symbols, paused_while_holding

REPO = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------- tiny checkpoints

WORDS = ("the a movie film plot actor good great fun bad dull awful cat dog sat on mat is was what who "
         "where did does not very").split()


def bert_tokenizer_json():
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-")
    vocab = specials + chars + ["##" + c for c in chars] + [w for w in WORDS if w not in chars]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, t in enumerate(specials)],
        "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                       "strip_accents": None, "lowercase": True},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": bert_template(specials.index("[CLS]"), specials.index("[SEP]")),
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": {t: i for i, t in enumerate(vocab)}},
    }


def roberta_tokenizer_json():
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "g"), ("o", "o"), ("Ġg", "oo"), ("Ġgoo", "d")]
    vocab = specials + list(byte_symbols().values()) + ["".join(m) for m in merges]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, t in enumerate(specials)],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": {"type": "RobertaProcessing", "sep": ["</s>", 2], "cls": ["<s>", 0],
                           "trim_offsets": True, "add_prefix_space": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                  "vocab": {t: i for i, t in enumerate(vocab)}, "merges": [" ".join(m) for m in merges]},
    }


def write_encoder(folder, kind, *, pooler=True, hidden=32, layers=2, dropout=0.0):
    """A random BERT/RoBERTa checkpoint with Hugging Face's tensor names, as the hub would serve it."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    tok = bert_tokenizer_json() if kind == "bert" else roberta_tokenizer_json()
    vocab = len(tok["model"]["vocab"])
    roberta = kind == "roberta"
    config = {"model_type": kind, "architectures": ["RobertaForMaskedLM" if roberta else "BertModel"],
              "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 4,
              "intermediate_size": 2 * hidden, "hidden_act": "gelu", "max_position_embeddings": 130 if roberta else 128,
              "type_vocab_size": 1 if roberta else 2, "layer_norm_eps": 1e-5 if roberta else 1e-12,
              "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout,
              "pad_token_id": 1 if roberta else 0, "initializer_range": 0.02}
    g = torch.Generator().manual_seed(1234)
    w = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # larger than 0.02 so tokens stay distinguishable
    H, sd = hidden, {}
    sd["embeddings.word_embeddings.weight"] = w(vocab, H)
    sd["embeddings.position_embeddings.weight"] = w(config["max_position_embeddings"], H)
    sd["embeddings.token_type_embeddings.weight"] = w(config["type_vocab_size"], H)
    sd["embeddings.LayerNorm.weight"], sd["embeddings.LayerNorm.bias"] = torch.ones(H), torch.zeros(H)
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name, (o, n) in {"attention.self.query": (H, H), "attention.self.key": (H, H),
                             "attention.self.value": (H, H), "attention.output.dense": (H, H),
                             "intermediate.dense": (2 * H, H), "output.dense": (H, 2 * H)}.items():
            sd[p + name + ".weight"], sd[p + name + ".bias"] = w(o, n), torch.zeros(o)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            sd[p + name + ".weight"], sd[p + name + ".bias"] = torch.ones(H), torch.zeros(H)
    if pooler:
        sd["pooler.dense.weight"], sd["pooler.dense.bias"] = w(H, H), torch.zeros(H)
    if roberta:  # like the hub's roberta-base: a masked-LM checkpoint, base model under "roberta."
        sd = {"roberta." + k: v for k, v in sd.items()}
        sd["lm_head.bias"] = torch.zeros(vocab)
    save_safetensors(sd, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    if not roberta:  # roberta-base ships no special_tokens_map: the script must fall back to config's pad id
        (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "[PAD]", "cls_token": "[CLS]"}))
    return folder


# ----------------------------------------------------------------------------- tiny GLUE files

def sentences(rng, n, positive):
    good, bad = ["good", "great", "fun"], ["bad", "dull", "awful"]
    out = []
    for _ in range(n):
        words = rng.sample(["the", "a", "movie", "film", "plot", "actor", "is", "was", "very"], 3)
        words.insert(rng.randrange(4), rng.choice(good if positive else bad))
        out.append(" ".join(words) + rng.choice([" .", " !", ' "really"', ""]))
    return out


def task_rows(task, n, rng, dev=False):
    """n data lines of a task's official layout, header first; label 1/positive when the text says "good"."""
    rows = []
    for i in range(n):
        y = i % 2
        s1, s2 = sentences(rng, 2, positive=bool(y))
        if task == "sst2":
            rows.append(f"{s1}\t{y}")
        elif task == "cola":
            rows.append(f"gj04\t{y}\t{'' if y else '*'}\t{s1}")
        elif task == "mrpc":
            rows.append(f"{y}\t{1000 + i}\t{2000 + i}\t{s1}\t{s2}")
        elif task in ("qnli", "rte"):
            rows.append(f"{i}\t{s1}\t{s2}\t{'not_entailment' if y else 'entailment'}")
        elif task == "stsb":
            rows.append(f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{s1}\t{s2}\t{4.2 * y + 0.4 * (i % 3):.3f}")
        elif task == "mnli":
            label = ("contradiction", "entailment", "neutral")[i % 3]
            middle = "\t".join([f"{i}", f"{i}31193", f"{i}31193n", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", s1, s2])
            rows.append(middle + ("\t" + "\t".join([label] * 5) if dev else f"\t{label}") + f"\t{label}")
        elif task == "qqp":
            rows.append(f"{i}\t{2 * i}\t{2 * i + 1}\t{s1}\t{s2}\t{y}")
    headers = {"sst2": "sentence\tlabel", "cola": None, "mrpc": "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
               "qnli": "index\tquestion\tsentence\tlabel", "rte": "index\tsentence1\tsentence2\tlabel",
               "stsb": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
               "mnli": "\t".join(["index", "promptID", "pairID", "genre", "sentence1_binary_parse",
                                  "sentence2_binary_parse", "sentence1_parse", "sentence2_parse", "sentence1",
                                  "sentence2"] + (["label1", "label2", "label3", "label4", "label5"] if dev else
                                                  ["label1"]) + ["gold_label"]),
               "qqp": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"}
    return ([headers[task]] if headers[task] else []) + rows


def write_task(root, task, n_train=48, n_dev=24, seed=0):
    rng = random.Random(seed)
    folder = Path(root) / glue_data.TASKS[task]["folder"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_text("\n".join(task_rows(task, n_train, rng)) + "\n")
    for name in glue_data.TASKS[task]["dev"]:  # MNLI: dev_matched.tsv and dev_mismatched.tsv, different sentences
        (folder / name).write_text("\n".join(task_rows(task, n_dev, rng, dev=True)) + "\n")
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue_assets")
    models = {"bert": write_encoder(root / "tiny-bert", "bert"),
              "roberta": write_encoder(root / "tiny-roberta", "roberta"),
              "bert-nopool": write_encoder(root / "tiny-bert-nopool", "bert", pooler=False),
              # a base-sized model whose path says "large": the preset must come from config.json, not the name
              "named-large": write_encoder(root / "large" / "roberta-large", "roberta")}
    data = {task: write_task(root / "glue", task) for task in glue_data.TASKS}
    return models, data


def run(assets, tmp_path, *extra, task="sst2", model="bert", name="run", data_dir=None):
    models, data = assets
    out = tmp_path / name
    data_dir = ["--data_dir", str(data[task])] if data_dir is None else data_dir
    argv = ["--task", task, "--model", str(models[model]), *data_dir, "--output_dir", str(out),
            "--batch_size", "8", "--max_length", "32", "--epochs", "2", "--threads", "1", "--device", "cpu", *extra]
    if "--method" not in extra and "--d" not in extra:
        argv += ["--d", "256"]
    return tg.main(argv), out


def user_error(capsys, argv):
    """main(argv) must end in SystemExit with a short message (no traceback); returns the message."""
    with pytest.raises(SystemExit) as err:
        tg.main(argv)
    captured = capsys.readouterr()
    message = err.value.code if isinstance(err.value.code, str) else captured.err
    assert err.value.code != 0
    assert "Traceback" not in message and 0 < len(message.strip().splitlines()) <= 2, message
    return message


def tree(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


# ----------------------------------------------------------------------------- data files

def test_each_official_layout_parses_exactly(tmp_path):
    cases = {
        "sst2": ("sentence\tlabel\nit 's a \"charming\" and often affecting journey . \t1\n", [("it 's a \"charming\" and often affecting journey . ",)], [1]),
        "cola": ("gj04\t0\t*\tthe more we study verbs , the crazier they get .\ngj04\t1\t\tHe left.\n",
                 [("the more we study verbs , the crazier they get .",), ("He left.",)], [0, 1]),
        "mrpc": ("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t702876\t702977\tAmrozi said \"x\" .\tHe said .\n",
                 [("Amrozi said \"x\" .", "He said .")], [1]),
        "qnli": ("index\tquestion\tsentence\tlabel\n0\tWhat?\tThis.\tnot_entailment\n1\tWho?\tHim.\tentailment\n",
                 [("What?", "This."), ("Who?", "Him.")], [1, 0]),
        "rte": ("index\tsentence1\tsentence2\tlabel\n0\tA b.\tC.\tentailment\n", [("A b.", "C.")], [0]),
        "stsb": ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                 "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane.\tAn air plane.\t5.000\n",
                 [("A plane.", "An air plane.")], [5.0]),
        "qqp": ("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n7\t15\t16\tHow?\tWhy?\t0\n", [("How?", "Why?")], [0]),
    }
    for task, (content, texts, labels) in cases.items():
        path = tmp_path / f"{task}.tsv"
        path.write_text(content, encoding="utf-8")
        assert glue_data.read_tsv(task, path) == (texts, labels), task
    # MNLI: 12 columns in train, 16 in dev, gold label last in both
    for dev in (False, True):
        path = tmp_path / f"mnli{dev}.tsv"
        path.write_text("\n".join(task_rows("mnli", 3, random.Random(1), dev=dev)) + "\n")
        texts, labels = glue_data.read_tsv("mnli", path)
        assert labels == [0, 1, 2] and all(len(t) == 2 for t in texts)


@pytest.mark.parametrize("task, line, complaint", [
    ("sst2", "good movie\t1\textra", "expected 2 tab-separated columns"),
    ("sst2", "good movie 1", "expected 2 tab-separated columns"),
    ("sst2", "good movie\t2", "label must be one of"),
    ("cola", "gj04\tyes\t\tHe left.", "label must be one of"),
    ("qnli", "0\tWhat?\tThis.\tcontradiction", "label must be one of"),
    ("rte", "0\tA.\tB.\t1", "label must be one of"),
    ("stsb", "0\tg\tf\ty\ti\ts\ts\tA.\tB.\thigh", "score must be a finite number"),
    ("stsb", "0\tg\tf\ty\ti\ts\ts\tA.\tB.\tnan", "score must be a finite number"),
    ("mrpc", "1\t1\t2\tonly one string", "expected 5 tab-separated columns"),
    ("mnli", "0\t1\t2\tfiction\tx\ty\tx\ty\tA.\tB.\tneutral", "expected 12 or 16"),
])
def test_malformed_line_names_file_and_line(tmp_path, task, line, complaint):
    good = task_rows(task, 2, random.Random(0))
    path = tmp_path / "train.tsv"
    path.write_text("\n".join(good + [line]) + "\n")
    with pytest.raises(glue_data.DataError, match=complaint) as err:
        glue_data.read_tsv(task, path)
    assert f"{path}:{len(good) + 1}:" in str(err.value)


@pytest.mark.parametrize("task", [t for t in glue_data.TASKS if t != "cola"])
def test_a_file_without_its_header_is_an_error_not_a_lost_row(tmp_path, task):
    rows = task_rows(task, 3, random.Random(0))[1:]  # the data lines only
    path = tmp_path / "dev.tsv"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(glue_data.DataError, match=rf"{path}:1: expected {task}'s header line"):
        glue_data.read_tsv(task, path)


def test_utf8_with_bom_is_read_and_other_bytes_name_the_line(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_bytes("\ufeffsentence\tlabel\ncafé crème\t1\n".encode("utf-8"))
    assert glue_data.read_tsv("sst2", path) == ([("café crème",)], [1])
    path.write_bytes(b"sentence\tlabel\ngood\t1\ncaf\xe9 bad\t0\n")  # latin-1, as a re-saved file might be
    with pytest.raises(glue_data.DataError, match=rf"{path}:3: not UTF-8 \(byte 0xe9 at column 4\)"):
        glue_data.read_tsv("sst2", path)


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("sentence\tlabel\n")
    with pytest.raises(glue_data.DataError, match="no examples"):
        glue_data.read_tsv("sst2", path)


# ----------------------------------------------------------------------------- downloads, GLUE's zips

def test_the_official_dev_row_counts():
    # GLUE's dev sets (issue 11): SST-2 872, CoLA 1,043, MRPC 408, QNLI 5,463, RTE 277, STS-B 1,500,
    # MNLI 9,815 matched / 9,832 mismatched, QQP 40,430.
    assert glue_data.DEV_ROWS == {"sst2": (872,), "cola": (1043,), "mrpc": (408,), "qnli": (5463,), "rte": (277,),
                           "stsb": (1500,), "mnli": (9815, 9832), "qqp": (40430,)}
    assert all(len(glue_data.DEV_ROWS[t]) == len(spec["dev"]) for t, spec in glue_data.TASKS.items())


@pytest.fixture
def server():
    """A local HTTP server for {path: bytes}; yields (files, base url)."""
    import http.server
    import threading
    files = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield files, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def glue_zip(members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, text in members.items():
            z.writestr(name, text)
    return buf.getvalue()


def tsv(task, n, seed, dev):
    return "\n".join(task_rows(task, n, random.Random(seed), dev=dev)) + "\n"


def serve_glue(files, url, monkeypatch):
    """CoLA, STS-B, MNLI and MRPC laid out as GLUE's mirror serves them, original/ folders included."""
    monkeypatch.setattr(glue_data, "GLUE_URL", url + "/glue/")
    monkeypatch.setattr(glue_data, "MRPC_TRAIN_URL", url + "/senteval/msr_paraphrase_train.txt")
    monkeypatch.setattr(glue_data, "MRPC_DEV_IDS_URL", url + "/glue/mrpc_dev_ids.tsv")
    cola_dev = tsv("cola", 10, 2, True)
    files["/glue/CoLA.zip"] = glue_zip({
        "CoLA/original/raw/in_domain_dev.tsv": tsv("cola", 4, 9, True),  # sorts before CoLA/train.tsv
        "CoLA/original/raw/in_domain_train.tsv": tsv("cola", 6, 9, False),
        "CoLA/original/tokenized/dev.tsv": tsv("cola", 3, 9, True),  # the exact name, but deeper
        "CoLA/train.tsv": tsv("cola", 12, 1, False), "CoLA/dev.tsv": cola_dev, "CoLA/test.tsv": "index\tsentence\n"})
    files["/glue/STS-B.zip"] = glue_zip({
        "STS-B/original/sts-train.tsv": "raw\t7\tcolumns\tx\ty\tz\tw\n", "STS-B/original/sts-dev.tsv": "raw\n",
        "STS-B/LICENSE.txt": "licence", "STS-B/train.tsv": tsv("stsb", 12, 1, False),
        "STS-B/dev.tsv": tsv("stsb", 9, 2, True), "STS-B/test.tsv": "index\n"})
    files["/glue/MNLI.zip"] = glue_zip({
        "MNLI/original/multinli_1.0_dev_matched.txt": "raw", "MNLI/train.tsv": tsv("mnli", 12, 1, False),
        "MNLI/dev_matched.tsv": tsv("mnli", 7, 2, True), "MNLI/dev_mismatched.tsv": tsv("mnli", 8, 3, True),
        "MNLI/test_matched.tsv": "index\n", "MNLI/README.txt": "readme"})
    files["/senteval/msr_paraphrase_train.txt"] = ("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n" + "".join(
        f"{i % 2}\t{10 + i}\t{20 + i}\tsent \"{i}\" a\tsent {i} b\n" for i in range(6))).encode("utf-8")
    files["/glue/mrpc_dev_ids.tsv"] = b"11\t21\n14\t24\n"
    for task, rows in {"cola": (10,), "stsb": (9,), "mnli": (7, 8), "mrpc": (2,)}.items():
        monkeypatch.setitem(glue_data.DEV_ROWS, task, rows)
    return cola_dev


def test_downloads_take_exactly_glues_files(tmp_path, monkeypatch, server, assets):
    files, url = server
    cola_dev = serve_glue(files, url, monkeypatch)
    cache = tmp_path / "cache"
    cola = glue_data.fetch_glue("cola", cache)
    assert tree(cache) == ["CoLA", "CoLA/dev.tsv", "CoLA/train.tsv"]  # no zip, no original/, no .partial
    assert (cola / "dev.tsv").read_text() == cola_dev
    assert sorted(p.name for p in glue_data.fetch_glue("stsb", cache).iterdir()) == ["dev.tsv", "train.tsv"]
    mnli = glue_data.fetch_glue("mnli", cache)
    assert sorted(p.name for p in mnli.iterdir()) == ["dev_matched.tsv", "dev_mismatched.tsv", "train.tsv"]
    mrpc = glue_data.fetch_glue("mrpc", cache)
    assert sorted(p.name for p in mrpc.iterdir()) == ["dev.tsv", "train.tsv"]
    dev_texts, dev_labels = glue_data.read_tsv("mrpc", mrpc / "dev.tsv")
    assert dev_texts == [('sent "1" a', "sent 1 b"), ('sent "4" a', "sent 4 b")] and dev_labels == [1, 0]
    assert len(glue_data.read_tsv("mrpc", mrpc / "train.tsv")[0]) == 4

    files.clear()  # cached: no second download
    result, _ = run(assets, tmp_path, "--max_steps", "2", "--cache_dir", str(cache), task="cola", data_dir=[])
    assert result["data"]["dev_examples"] == {"dev.tsv": 10} and result["data"]["glue_dev_counts"] is True
    assert result["config"]["data_dir"] is None


def test_a_download_with_other_row_counts_is_not_cached(tmp_path, monkeypatch, server):
    files, url = server
    serve_glue(files, url, monkeypatch)
    monkeypatch.setitem(glue_data.DEV_ROWS, "cola", (1043,))
    cache = tmp_path / "new" / "cache"
    with pytest.raises(glue_data.DataError, match=r"dev.tsv has 10 examples, GLUE's has 1043: GLUE's mirror changed"):
        glue_data.fetch_glue("cola", cache)
    assert not (tmp_path / "new").exists()  # the cache folders it made are gone again


def test_a_cached_wrong_folder_is_refused_with_the_rebuild_hint(tmp_path, capsys, assets):
    cache = tmp_path / "cache"
    write_task(cache, "cola", n_dev=24)  # e.g. the 527 in-domain sentences an old version cached
    message = user_error(capsys, ["--task", "cola", "--model", str(assets[0]["bert"]), "--cache_dir", str(cache),
                                  "--output_dir", str(tmp_path / "out")])
    assert f"{cache / 'CoLA' / 'dev.tsv'} has 24 examples, GLUE's has 1043" in message
    assert f"delete {cache / 'CoLA'} to download it again, or pass --data_dir" in message
    assert tree(tmp_path) == ["cache", "cache/CoLA", "cache/CoLA/dev.tsv", "cache/CoLA/train.tsv"]


def test_offline_glue_download_names_data_dir_and_leaves_nothing(tmp_path, capsys, monkeypatch, assets):
    monkeypatch.setattr(glue_data, "GLUE_URL", "http://127.0.0.1:9/glue/")  # nothing listens on the discard port
    message = user_error(capsys, ["--task", "rte", "--model", str(assets[0]["bert"]),
                                  "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out")])
    assert "cannot download GLUE rte" in message and "pass --data_dir with a RTE folder" in message
    assert tree(tmp_path) == []


def test_offline_hub_names_model_and_leaves_no_cache_folders(tmp_path, capsys, monkeypatch, assets):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "hub" / "unilora" / "other--model").mkdir(parents=True)  # not ours: must stay
    message = user_error(capsys, ["--task", "sst2", "--data_dir", str(assets[1]["sst2"]),
                                  "--output_dir", str(tmp_path / "out")])
    assert "--model FacebookAI/roberta-base: cannot reach" in message
    assert "without network, pass --model with a local folder" in message
    assert tree(tmp_path) == ["hub", "hub/unilora", "hub/unilora/other--model"]


# ----------------------------------------------------------------------------- training end to end

def test_unilora_run_outputs_counts_timing_memory(assets, tmp_path):
    result, out = run(assets, tmp_path)
    H, L, r = 32, 2, 4
    assert result["trainable"] == {"d": 256, "D": L * 2 * r * (H + H), "head": H * 2 + 2}  # BERT: classifier (H, 2)
    assert [e["epoch"] for e in result["epochs"]] == [1, 2] and result["steps"] == 2 * 6
    cfg = result["config"]
    assert (cfg["lr"], cfg["head_lr"], cfg["weight_decay"], cfg["seed"]) == (5e-3, 1e-4, 0.1, 1)  # SST-2 recipe
    assert result["from_recipe"] == ["head_lr", "lr"]  # epochs and max_length were given
    assert result["best"]["dev"]["accuracy"] == max(e["dev"]["accuracy"] for e in result["epochs"])
    assert 0 < result["seconds_per_step_median"] < result["wall_time_s"] and result["peak_rss_mb"] > 50
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["last"] == result["last"] and json.loads((out / "run.json").read_text()) == cfg
    assert tree(out) == ["adapter.pt", "best", "best/adapter.pt", "best/head.safetensors", "best/run.json",
                         "head.safetensors", "results.json", "run.json"]
    assert tree(tmp_path) == ["run"] + [f"run/{p}" for p in tree(out)]  # no run.partial, no run.old


@pytest.mark.parametrize("kind", ["local", "fastfood"])
def test_projection_kind_is_trained_recorded_and_reloaded(assets, tmp_path, capsys, kind):
    if kind == "fastfood":  # signed by construction: --no-signs is refused before anything is written
        message = user_error(capsys, ["--task", "sst2", "--model", str(assets[0]["bert"]), "--data_dir",
                                      str(assets[1]["sst2"]), "--projection", kind, "--no-signs",
                                      "--output_dir", str(tmp_path / "nosigns")])
        assert "--projection fastfood has random signs by construction: --no-signs" in message
        assert tree(tmp_path) == []
    results, out = run(assets, tmp_path, "--projection", kind, "--max_steps", "3")
    assert results["config"]["projection"] == kind
    assert results["config"]["signs"] is (kind == "fastfood")  # local: the default, no signs; fastfood: its own
    assert results["projection_ms"] > 0 and results["projection_bytes"] > 0
    saved = torch.load(out / "adapter.pt", weights_only=True)
    assert json.loads(saved["config"])["projection"]["kind"] == kind
    assert tg.main(["--eval_only", "--load", str(out)]) == results["last"]["dev"]  # rebuilt with the same P
    capsys.readouterr()
    assert "--projection does not apply to --method lora" in user_error(
        capsys, ["--task", "sst2", "--method", "lora", "--projection", kind, "--output_dir", str(tmp_path / "x")])


def test_eval_only_rebuilds_the_saved_run_and_writes_eval_n(assets, tmp_path, capsys):
    result, out = run(assets, tmp_path, "--max_eval_samples", "20")
    saved = (out / "results.json").read_text()
    # no --data_dir, no --max_eval_samples, no --model: all from run.json
    dev = tg.main(["--eval_only", "--load", str(out), "--threads", "1"])
    assert dev == result["last"]["dev"]
    assert "on 20 dev.tsv examples" in capsys.readouterr().out
    first = json.loads((out / "eval-1" / "results.json").read_text())
    assert first["kind"] == "eval" and first["dev"] == dev and first["data"]["dev_examples"] == {"dev.tsv": 20}
    assert tg.main(["--eval_only", "--load", str(out / "best")]) == result["best"]["dev"]
    assert (out / "best" / "eval-1" / "results.json").is_file()
    # a flag overrides the saved value, and a second evaluation gets a new folder
    tg.main(["--eval_only", "--load", str(out), "--max_eval_samples", "8"])
    assert json.loads((out / "eval-2" / "results.json").read_text())["data"]["dev_examples"] == {"dev.tsv": 8}
    assert (out / "results.json").read_text() == saved  # the run's own results are never replaced
    tg.main(["--eval_only", "--load", str(out), "--output_dir", str(tmp_path / "ev")])
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["dev"] == dev


def together_runs(assets, tmp_path):
    """Four tiny Uni-LoRA runs on one base and P (d 256, seed 1): SST-2 twice (other data, other lr), STS-B (a
    one-column head, its own max length) and MNLI (three labels: wider than the first run's head, two dev files)."""
    other = write_task(tmp_path / "other-glue", "sst2", seed=5)
    _, a = run(assets, tmp_path, "--max_steps", "3", name="a")
    _, b = run(assets, tmp_path, "--max_steps", "3", "--lr", "2e-2", name="b", data_dir=["--data_dir", str(other)])
    _, c = run(assets, tmp_path, "--max_steps", "3", "--max_length", "24", task="stsb", name="c")
    _, m = run(assets, tmp_path, "--max_steps", "3", "--max_eval_samples", "10", task="mnli", name="m")
    return [a, b, c, m]


def test_eval_only_scores_several_runs_together_as_each_alone(assets, tmp_path, capsys, monkeypatch):
    dirs = together_runs(assets, tmp_path)
    batches = []
    rows = tg.TaskBank.rows
    monkeypatch.setattr(tg.TaskBank, "rows", lambda bank, tasks: batches.append(list(tasks)) or rows(bank, tasks))
    capsys.readouterr()
    together = tg.main(["--eval_only", "--load", ",".join(map(str, dirs)), "--eval_batch_size", "16"])
    printed = capsys.readouterr().out.splitlines()[-5:]  # after each dev set's "note: ... not GLUE's dev set"
    assert len(batches) == math.ceil((24 + 24 + 24 + 2 * 10) / 16)
    assert sum(len(set(b)) > 1 for b in batches) >= len(batches) - 1  # shuffled: the tasks mix in the batches
    assert sorted(t for b in batches for t in b) == sorted(["0"] * 24 + ["1"] * 24 + ["2"] * 24 + ["3"] * 20)
    assert printed[-1].startswith("92 dev examples of 4 runs in mixed batches: ")
    monkeypatch.undo()
    for k, (folder, dev) in enumerate(zip(dirs, together)):
        mixed = json.loads((folder / "eval-1" / "results.json").read_text())
        assert printed[k] == f"{mixed['config']['task']} {folder}: " + ", ".join(
            f"{m} {v:.4f}" for m, v in dev.items()) + " on " + ", ".join(
            f"{n} {name}" for name, n in mixed["data"]["dev_examples"].items()) + f" examples; saved to " \
            f"{folder / 'eval-1'}"
        alone = tg.main(["--eval_only", "--load", str(folder), "--eval_batch_size", "16"])
        assert dev == pytest.approx(alone, rel=1e-6, abs=1e-6) and mixed["dev"] == dev
        single = json.loads((folder / "eval-2" / "results.json").read_text())
        assert {**mixed, "dev": None} == {**single, "dev": None}  # the same file, up to float rounding
        assert tree(folder / "eval-1") == tree(folder / "eval-2") == ["results.json"]
    assert set(together[2]) == {"pearson", "spearman", "loss"}  # STS-B: its one column, not the NaN beside it
    assert set(together[3]) == {"accuracy", "accuracy_mismatched", "loss", "loss_mismatched"}
    assert json.loads((dirs[2] / "eval-1" / "results.json").read_text())["config"]["max_length"] == 24


def test_several_runs_are_refused_in_one_line_when_they_cannot_share_a_base(assets, tmp_path, capsys):
    models, data = assets
    _, a = run(assets, tmp_path, "--max_steps", "1", name="a")
    _, b = run(assets, tmp_path, "--max_steps", "1", "--lr", "2e-2", name="b")
    _, s2 = run(assets, tmp_path, "--max_steps", "1", "--seed", "2", name="seed2")
    _, lora = run(assets, tmp_path, "--max_steps", "1", "--method", "lora", name="lora")
    fingerprint = json.loads(torch.load(a / "adapter.pt", weights_only=True)["config"])["fingerprint"]
    lied = tmp_path / "lied"  # run.json says seed 1, adapter.pt was trained with seed 2: the bank's own check
    lied.mkdir()
    for name in ("adapter.pt", "head.safetensors", "run.json"):
        (lied / name).write_bytes((s2 / name).read_bytes())
    (lied / "run.json").write_text(json.dumps(json.loads((s2 / "run.json").read_text()) | {"seed": 1}))
    both = f"{a},{b}"
    cases = [
        ([f"{a},{s2}"], f"--load {a} and {s2} differ in seed (1 vs 2): runs scored together share one base and P"),
        ([f"{a},{lora}"], f"--load {lora} is a --method lora run: only Uni-LoRA runs are scored together"),
        ([f"{a},{a}"], f"--load names {a} twice"),
        ([both, "--lr", "1e-3"], "--lr does not apply to --eval_only with several --load folders: each run is scored "
                                 "with its own run.json's settings, into its own DIR/eval-N"),
        ([both, "--output_dir", str(tmp_path / "ev")], "--output_dir does not apply to --eval_only with several"),
        ([both, "--seed", "0"], "--seed does not apply to --eval_only with several"),
        ([both, "--no-bf16"], "--bf16 does not apply to --eval_only with several"),
        ([both, "--model", str(models["bert"])], "--model does not apply to --eval_only with several"),
        ([f"{a},"], f"--load {a},: an empty folder name in the list"),
        ([f"{a},{lied}"], f"error: --load: {lied / 'adapter.pt'} (fingerprint "),  # last: `message` is its
    ]
    before = tree(tmp_path)
    for argv, expected in cases:
        message = user_error(capsys, ["--eval_only", "--load", *argv])
        assert expected in message and len(message.strip().splitlines()[-1]) < 400, (argv, message)
        assert tree(tmp_path) == before, argv
    assert message.endswith(f"{a / 'adapter.pt'} (fingerprint {fingerprint}): seed differs (2 vs 1); tasks of one "
                            f"bank share the base, layers, r, d and P (the same seed)")


@pytest.mark.parametrize("method", ["lora", "head"])
def test_baselines_train_and_reload(assets, tmp_path, method):
    result, out = run(assets, tmp_path, "--method", method, "--epochs", "1", "--max_eval_samples", "10")
    H, L, r = 32, 2, 4
    if method == "lora":
        assert result["trainable"]["d"] == result["trainable"]["D"] == L * 2 * r * (H + H)
        assert result["config"]["lr"] == tg.LORA_LR and result["config"]["d"] is None
    else:
        assert result["trainable"]["d"] == 0 and not (out / "adapter.pt").exists()
        assert result["config"]["lr"] is None and result["from_recipe"] == ["head_lr"]
    assert tg.main(["--eval_only", "--load", str(out)]) == result["last"]["dev"]


def test_presets_come_from_config_json_not_from_the_name(assets, tmp_path):
    base = {"hidden_size": 768, "num_hidden_layers": 12}  # roberta-base's config.json
    assert tg.size_preset(base) == "base" and tg.size_preset({}) == "base"
    assert tg.size_preset({"hidden_size": 1024, "num_hidden_layers": 24}) == "large"  # roberta-large, bert-large
    assert tg.size_preset({"hidden_size": 384, "num_hidden_layers": 6}) == "base"  # MiniLM
    models, data = assets
    argv = ["--task", "rte", "--model", str(models["named-large"]), "--data_dir", str(data["rte"]),
            "--max_steps", "1", "--d", "64", "--threads", "1"]
    named = tg.main(argv + ["--output_dir", str(tmp_path / "a")])["config"]
    assert (named["preset"], named["head_lr"], named["lr"], named["epochs"]) == ("base", 5e-4, 5e-3, 160)
    assert named["max_length"] == 128  # base's 512, cut to what this tiny RoBERTa's positions allow (130 - 2)
    large = tg.main(argv + ["--output_dir", str(tmp_path / "b"), "--preset", "large", "--epochs", "3"])
    cfg = large["config"]
    assert (cfg["preset"], cfg["head_lr"], cfg["lr"], cfg["epochs"], cfg["max_length"]) == ("large", 5e-3, 5e-3, 3, 128)
    assert large["from_recipe"] == ["head_lr", "lr", "max_length"]



def test_the_recipes_are_the_official_scripts():
    # (head lr, theta_d lr, epochs), from the recipe tables of docs/uni-lora.md (the official scripts)
    base = {"sst2": (1e-4, 60), "mrpc": (2e-2, 30), "cola": (5e-3, 80), "qnli": (2e-4, 25), "rte": (5e-4, 160),
            "stsb": (2e-4, 80)}
    assert {t: tg.RECIPES["base"][t] for t in base} == {t: (lr, 5e-3, ep) for t, (lr, ep) in base.items()}
    assert {t: tg.RECIPES["large"][t] for t in base} == {
        "sst2": (2e-4, 1e-3, 20), "mrpc": (2e-3, 5e-3, 40), "cola": (2e-2, 5e-3, 40), "qnli": (5e-3, 5e-3, 20),
        "rte": (5e-3, 5e-3, 40), "stsb": (2e-4, 5e-3, 40)}
    assert tg.MAX_LENGTH == {"base": 512, "large": 128}
    assert (tg.DEFAULTS["d"], tg.DEFAULTS["r"], tg.DEFAULTS["targets"], tg.DEFAULTS["batch_size"]) == (
        23040, 4, "query,value", 32)
    assert (tg.DEFAULTS["warmup_ratio"], tg.DEFAULTS["weight_decay"], tg.DEFAULTS["seed"]) == (0.06, 0.1, 1)
    assert tg.DEFAULTS["signs"] is False  # an all-positive P, as the paper, the official code and PEFT


def test_head_weight_decay_only_on_head_weights(assets):
    models, _ = assets
    cfg = dict(task="stsb", model="m", method="unilora", d=64, r=4, signs=True, alpha=None, targets="query,value",
               seed=1, device="cpu", head_lr=1e-3, lr=5e-3, weight_decay=0.1, max_steps=10, warmup_ratio=0.06)
    for kind, decayed in (("roberta", {"classifier.dense.weight", "classifier.out_proj.weight"}),
                          ("bert", {"classifier.weight"})):
        model, adapter = tg.build_model(cfg, models[kind])
        optimizer, _, _ = tg.make_optimizer(model, adapter, cfg, 100)
        names = {id(p): n for n, p in model.named_parameters()}
        groups = [({names[id(p)] for p in g["params"]}, g["lr"], g["weight_decay"]) for g in optimizer.param_groups]
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert groups[0][1:] == (5e-3, 0.0) and groups[0][0] == trainable - {n for n in trainable if "classifier" in n}
        assert groups[1] == (decayed, 1e-3, 0.1)
        assert groups[2] == ({n.replace("weight", "bias") for n in decayed}, 1e-3, 0.0)
    # a head with a LayerNorm: its weight is not decayed either
    model = torch.nn.Module()
    model.classifier = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = tg.param_groups(model, None, cfg)
    assert decay["params"] == [model.classifier[0].weight]
    assert no_decay["params"] == [model.classifier[0].bias, model.classifier[1].weight, model.classifier[1].bias]


def test_roberta_pair_regression(assets, tmp_path):
    result, _ = run(assets, tmp_path, "--max_steps", "3", task="stsb", model="roberta")
    H = 32
    assert set(result["last"]["dev"]) == {"pearson", "spearman", "loss"}
    assert result["trainable"]["head"] == (H * H + H) + (H + 1)  # dense(H,H) + out_proj(H,1)
    assert result["steps"] == 3 and len(result["epochs"]) == 1  # max_steps stops mid-epoch, then evaluates


@pytest.mark.parametrize("task", ["cola", "mrpc", "qnli", "qqp"])
def test_every_task_trains(assets, tmp_path, task):
    result, _ = run(assets, tmp_path, "--max_steps", "2", "--max_eval_samples", "12", task=task,
                    model="roberta" if task == "qnli" else "bert")
    assert set(result["last"]["dev"]) == set(glue_data.TASKS[task]["metrics"]) | {"loss"}
    assert result["trainable"]["head"] > 0 and math.isfinite(result["last"]["dev"]["loss"])


def test_mnli_scores_matched_and_mismatched(assets, tmp_path):
    result, _ = run(assets, tmp_path, "--max_steps", "2", task="mnli", model="roberta")
    assert set(result["last"]["dev"]) == {"accuracy", "loss", "accuracy_mismatched", "loss_mismatched"}
    assert result["data"]["dev_examples"] == {"dev_matched.tsv": 24, "dev_mismatched.tsv": 24}
    assert glue_data.reported("mnli") == ["accuracy", "accuracy_mismatched"]


def test_mnli_matched_picks_the_best_epoch(assets, tmp_path, monkeypatch):
    scripted = iter([{"accuracy": 0.5, "accuracy_mismatched": 0.9, "loss": 1.0},
                     {"accuracy": 0.7, "accuracy_mismatched": 0.1, "loss": 1.0},
                     {"accuracy": 0.6, "accuracy_mismatched": 0.95, "loss": 1.0}])
    monkeypatch.setattr(tg, "evaluate_all", lambda *a: dict(next(scripted)))
    result, _ = run(assets, tmp_path, "--epochs", "3", "--max_train_samples", "8", task="mnli", model="roberta")
    assert result["best"]["epoch"] == 2 and result["best"]["dev"]["accuracy_mismatched"] == 0.1


def test_bert_without_pooler_gets_the_roberta_style_head(assets, tmp_path):
    result, _ = run(assets, tmp_path, "--max_steps", "1", model="bert-nopool")
    assert result["trainable"]["head"] == (32 * 32 + 32) + (32 * 2 + 2)


def test_gradient_accumulation_matches_the_full_batch(assets, tmp_path, capsys):
    # Dropout is 0 in the tiny models, so splitting each batch of 8 into 2 micro-batches must give the same
    # training run up to float rounding; 3 does not divide 8: rejected.
    full, _ = run(assets, tmp_path, "--max_steps", "4", name="full")
    split, _ = run(assets, tmp_path, "--max_steps", "4", "--grad_accum", "2", name="split")
    assert split["last"]["dev"]["loss"] == pytest.approx(full["last"]["dev"]["loss"], rel=1e-5)
    models, data = assets
    message = user_error(capsys, ["--task", "sst2", "--model", str(models["bert"]), "--data_dir", str(data["sst2"]),
                                  "--grad_accum", "3", "--batch_size", "8", "--output_dir", str(tmp_path / "x")])
    assert "--batch_size 8 must be a multiple of --grad_accum 3" in message and not (tmp_path / "x").exists()


def test_signs_flag_and_seed_change_the_run(assets, tmp_path):
    default, _ = run(assets, tmp_path, "--max_steps", "3", name="default")
    off, _ = run(assets, tmp_path, "--max_steps", "3", "--no-signs", name="off")
    on, on_dir = run(assets, tmp_path, "--max_steps", "3", "--signs", name="on")
    other, _ = run(assets, tmp_path, "--max_steps", "3", "--seed", "2", name="seed2")
    # the paper's P by default: no signs (random signs are our variant, --signs)
    assert default["config"]["signs"] is False and off["config"]["signs"] is False and on["config"]["signs"] is True
    assert default["last"]["dev"] == off["last"]["dev"]  # the same run, bit for bit
    assert off["last"]["dev"]["loss"] != on["last"]["dev"]["loss"]
    assert other["last"]["dev"]["loss"] != default["last"]["dev"]["loss"]
    # a saved run keeps its own setting: a run trained with signs is scored with them, whatever the default
    assert json.loads((on_dir / "run.json").read_text())["signs"] is True
    assert tg.main(["--eval_only", "--load", str(on_dir)]) == on["last"]["dev"]


def test_it_learns_the_tiny_task(assets, tmp_path):
    # The tiny SST-2 says its label with one word. Uni-LoRA with a high lr must find it within four epochs, and
    # beat the head alone on the frozen random encoder. Guards against a theta_d or head that silently does
    # not train (wrong optimiser groups, frozen head, lr 0, a broken projection).
    data = write_task(tmp_path / "glue", "sst2", n_train=192, n_dev=48, seed=3)
    common = ["--batch_size", "16", "--epochs", "4", "--head_lr", "0.01", "--weight_decay", "0"]
    uni, _ = run(assets, tmp_path, *common, "--lr", "0.05", "--d", "512", data_dir=["--data_dir", str(data)])
    head, _ = run(assets, tmp_path, *common, "--method", "head", data_dir=["--data_dir", str(data)], name="head")
    assert uni["best"]["dev"]["accuracy"] >= 0.85
    assert uni["best"]["dev"]["accuracy"] > head["best"]["dev"]["accuracy"] + 0.1


# ----------------------------------------------------------------------------- seeds and their summary

def test_seeds_run_the_recipe_per_seed_and_summarise(assets, tmp_path, capsys):
    # 48 examples, 12 steps an epoch, stopped at step 30: 3 epochs, the last scored after 6 of its steps; the high
    # lrs move the dev accuracy from epoch to epoch, so that the best and the last epoch differ
    summary, out = run(assets, tmp_path, "--seeds", "1,2", "--max_steps", "30", "--batch_size", "4",
                       "--head_lr", "0.05", "--lr", "0.05")
    printed = capsys.readouterr().out
    assert "  seed               [1, 2]\n" in printed
    assert sorted(p.name for p in out.iterdir()) == ["seed-1", "seed-2", "summary.json"]
    runs = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (1, 2)]
    assert [r["config"]["seed"] for r in runs] == [1, 2] and [len(r["epochs"]) for r in runs] == [3, 3]
    best = [max(e["dev"]["accuracy"] for e in r["epochs"]) for r in runs]
    last = [r["epochs"][2]["dev"]["accuracy"] for r in runs]
    assert best != last  # else this test could not tell one from the other
    assert summary["report"] == "best"  # the default
    assert summary["best"]["accuracy"]["values"] == best and summary["last"]["accuracy"]["values"] == last
    assert summary["accuracy"] == summary["best"]["accuracy"]  # where summaries kept it before both were there
    assert summary["best"]["accuracy"]["mean"] == pytest.approx(np.mean(best))
    assert summary["last"]["accuracy"]["mean"] == pytest.approx(np.mean(last))
    assert summary["last_epoch"] == {"1": 3, "2": 3}
    assert summary["best_epoch"] == {str(s): 1 + [e["dev"]["accuracy"] for e in r["epochs"]].index(b)
                                     for s, r, b in zip((1, 2), runs, best)}
    assert json.loads((out / "summary.json").read_text()) == summary
    lines = [line for line in printed.splitlines() if "over seeds [1, 2]" in line]
    assert lines == [f"accuracy of the best epoch over seeds [1, 2]: mean {np.mean(best):.4f}, std "
                     f"{np.std(best, ddof=1):.4f}, median {np.median(best):.4f}   (--report)",
                     f"accuracy of the last epoch over seeds [1, 2]: mean {np.mean(last):.4f}, std "
                     f"{np.std(last, ddof=1):.4f}, median {np.median(last):.4f}"]
    assert tg.main(["--eval_only", "--load", str(out / "seed-2")]) == runs[1]["last"]["dev"]
    with pytest.raises(SystemExit, match="already holds a run; pass --overwrite"):
        run(assets, tmp_path, "--seeds", "3", "--max_steps", "1")
    capsys.readouterr()
    again, _ = run(assets, tmp_path, "--seeds", "3", "--max_steps", "1", "--overwrite", "--bf16", "--report", "last")
    assert again["seeds"] == [3] and sorted(p.name for p in out.iterdir()) == ["seed-3", "summary.json"]
    assert json.loads((out / "seed-3" / "run.json").read_text())["bf16"] is True
    assert again["report"] == "last" and again["accuracy"] == again["last"]["accuracy"]
    assert [line.split(" over ")[0] for line in capsys.readouterr().out.splitlines() if " over seeds " in line] == [
        "accuracy of the last epoch", "accuracy of the best epoch"]  # the reported one first


def write_results(folder, results):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))


# ----------------------------------------------------------------------------- failures: short, named, no leftovers

def test_a_diverged_run_stops_saves_nothing_and_keeps_the_old_run(assets, tmp_path, capsys):
    models, data = assets
    argv = ["--task", "sst2", "--model", str(models["bert"]), "--data_dir", str(data["sst2"]), "--d", "64",
            "--max_length", "32", "--batch_size", "8", "--max_steps", "6", "--output_dir", str(tmp_path / "run")]
    message = user_error(capsys, argv + ["--head_lr", "1e30"])
    assert "training diverged and was stopped" in message and "--head_lr" in message
    assert tree(tmp_path) == []
    tg.main(argv)
    before = {p: (tmp_path / "run" / p).read_bytes() for p in tree(tmp_path / "run") if "." in p}
    user_error(capsys, argv + ["--head_lr", "1e30", "--overwrite"])
    assert {p: (tmp_path / "run" / p).read_bytes() for p in tree(tmp_path / "run") if "." in p} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("flag, value", [
    ("--epochs", "0"), ("--epochs", "-1"), ("--max_steps", "0"), ("--batch_size", "0"), ("--grad_accum", "-2"),
    ("--eval_batch_size", "0"), ("--max_train_samples", "0"), ("--max_eval_samples", "-5"), ("--d", "0"),
    ("--r", "0"), ("--lr", "nan"), ("--lr", "-1e-3"), ("--head_lr", "inf"), ("--head_lr", "0"),
    ("--weight_decay", "-0.1"), ("--warmup_ratio", "1"), ("--grad_clip", "-1"), ("--max_length", "0"),
    ("--seed", "-1"), ("--seeds", "1,1"), ("--seeds", "1,x"), ("--threads", "0"), ("--alpha", "nan"),
    ("--device", "gpu0"), ("--task", "wnli"), ("--report", "first"), ("--seed", "4294967296"),
    ("--seeds", "1,4294967296"), ("--threads", "1000000000"), ("--device", "meta"),
])
def test_every_number_is_checked_by_argparse(tmp_path, capsys, flag, value):
    message = user_error(capsys, ["--task", "sst2", flag, value, "--output_dir", str(tmp_path / "out")])
    assert f"argument {flag}" in message
    assert tree(tmp_path) == []


def test_user_errors_are_short_name_the_flag_and_leave_nothing(assets, tmp_path, capsys, monkeypatch):
    models, data = assets
    _, saved = run(assets, tmp_path, "--max_steps", "1", name="saved")
    empty = tmp_path / "empty"
    empty.mkdir()
    old = tmp_path / "old"
    write_results(old, {"config": {"task": "sst2"}, "best": {}, "epochs": []})  # no from_recipe: an old version
    headless = write_task(tmp_path / "headless", "sst2")
    (headless / "dev.tsv").write_text("good movie\t1\n")
    base = ["--model", str(models["bert"]), "--data_dir", str(data["sst2"]), "--output_dir", str(tmp_path / "out")]
    cases = [
        (["--task", "sst2", *base[:2], "--data_dir", str(empty), *base[4:]], "train.tsv not found. --data_dir must"),
        (["--task", "sst2", *base[:2], "--data_dir", str(headless), *base[4:]],
         f"{headless / 'dev.tsv'}:1: expected sst2's header line"),
        (["--task", "sst2", *base, "--method", "lora", "--d", "64"], "--d does not apply to --method lora"),
        (["--task", "sst2", *base, "--method", "head", "--lr", "1e-3"], "--lr does not apply to --method head"),
        (["--task", "sst2", *base, "--targets", "nomatch"], "--d / --r / --targets / --projection: target 'nomatch'"),
        (["--task", "sst2", *base, "--d", "10000000"], "--d / --r / --targets / --projection: d=10000000"),
        (["--task", "sst2", *base, "--seed", "1", "--seeds", "1,2"], "give --seed or --seeds"),
        (["--task", "sst2", "--model", str(tmp_path / "nope"), *base[2:]], f"--model {tmp_path / 'nope'}:"),
        (["--task", "sst2", *base[:4], "--output_dir", str(models["bert"])], "holds a model"),
        (["--task", "sst2", *base[:4], "--output_dir", str(saved)], "already holds a run; pass --overwrite"),
        (["--task", "sst2", *base, "--device", "cuda"], "--device cuda: this machine has no CUDA device"),
        ([*base], "--task is required"),
        (["--eval_only"], "--eval_only and --load DIR go together"),
        (["--load", str(saved)], "--eval_only and --load DIR go together"),
        (["--eval_only", "--load", str(empty)], f"--load {empty}: {empty / 'run.json'} is not readable"),
        (["--eval_only", "--load", str(saved), "--d", "64"], "--d does not apply to --eval_only"),
        (["--eval_only", "--load", str(saved / "best"), "--output_dir", str(saved), "--overwrite"],
         f"--output_dir {saved} holds the run that --load reads"),
        (["--eval_only", "--load", str(saved), "--data_dir", str(empty)], "dev.tsv not found. --data_dir must"),
        (["--eval_only", "--load", str(saved), "--model", str(models["roberta"])],
         f"--load {saved} does not fit --model {models['roberta']}: "),
        (["--eval_only", "--load", str(saved), "--task", "cola"], "but " + str(saved) + " was trained on sst2"),
        (["--table", str(tmp_path), "--task", "sst2"], "--table takes only folders (and --report)"),
        (["--table", str(tmp_path), "--report", "last", "--seeds", "1,2"], "--table takes only folders (and --report)"),
        (["--task", "sst2", *base, "--report", "last"], "--report applies to --seeds and --table only"),
        (["--eval_only", "--load", str(saved), "--report", "best"], "--report applies to --seeds and --table only"),
        (["--table", str(tmp_path / "nope")], "no such file or folder"),
        (["--table", str(empty)], "--table: no training run"),
        (["--table", str(old)], f"--table: {old / 'results.json'} was written by an older train_glue.py"),
    ]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = tree(tmp_path)
    for argv, expected in cases:
        assert expected in user_error(capsys, argv), argv
        assert tree(tmp_path) == before, argv


def test_the_command_line_prints_errors_without_traceback(assets, tmp_path):
    models, data = assets
    cmd = [sys.executable, str(REPO / "train_glue.py"), "--task", "sst2", "--model", str(models["bert"]),
           "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'train.tsv'} not found. --data_dir must be "
                                                f"the SST-2 folder of the GLUE data, holding train.tsv and dev.tsv"]
    assert tree(tmp_path) == []


def test_a_killed_run_leaves_nothing_behind(assets, tmp_path):
    models, data = assets
    out = tmp_path / "runs" / "killed"
    cmd = [sys.executable, str(REPO / "train_glue.py"), "--task", "sst2", "--model", str(models["bert"]),
           "--data_dir", str(data["sst2"]), "--output_dir", str(out), "--epochs", "1000", "--batch_size", "8",
           "--max_length", "32", "--d", "64", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    partial = out.with_name("killed.partial")
    for _ in range(3000):  # until it writes its first epoch's best/ (minutes on a loaded machine)
        if (partial / "best" / "run.json").exists() or proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.terminate()  # SIGTERM, as a job scheduler sends at its time limit
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in err and "terminated" in err
    assert tree(tmp_path) == []


def test_one_real_command_line_run(assets, tmp_path):
    models, data = assets
    out = tmp_path / "cli"
    cmd = [sys.executable, str(REPO / "train_glue.py"), "--task", "cola", "--model", str(models["bert"]),
           "--data_dir", str(data["cola"]), "--output_dir", str(out), "--max_steps", "2", "--batch_size", "8",
           "--max_length", "32", "--d", "128", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "head_lr            0.005   (recipe)" in proc.stdout
    assert re.search(r"^best matthews -?\d\.\d{4} at epoch 1, last -?\d\.\d{4} at epoch 1; 2 steps", proc.stdout, re.M)
    assert json.loads((out / "results.json").read_text())["steps"] == 2


@pytest.mark.parametrize("argv, line", [
    (["--seed", "4294967296"], "argument --seed: '4294967296' is not a seed from 0 to 4294967295"),
    (["--threads", "1000000000"], "argument --threads: '1000000000' is not a number of threads from 1 to 1024"),
    (["--device", "meta"], "argument --device: 'meta' is not a device these scripts run on (auto, cpu, cuda, cuda:N or "
                           "mps)"),
    (["--max_step", "2"], "unrecognized arguments: --max_step 2"),  # an abbreviation is not silently --max_steps
])
def test_out_of_range_numbers_and_abbreviations_are_refused_by_name(tmp_path, capsys, argv, line):
    message = user_error(capsys, ["--task", "sst2", *argv, "--output_dir", str(tmp_path / "out")])
    assert message.splitlines()[-1].endswith(f" error: {line}") and tree(tmp_path) == []


def test_two_runs_on_one_folder_never_mix(assets, tmp_path, capsys):
    """Two real processes on one --output_dir: the second stops at once, naming the first by its pid, and the first
    finishes with its own files only (its seed in results.json, run.json and best/run.json)."""
    models, data = assets
    out = tmp_path / "out"
    argv = ["--task", "sst2", "--model", str(models["bert"]), "--data_dir", str(data["sst2"]), "--output_dir",
            str(out), "--d", "64", "--max_length", "32", "--batch_size", "8", "--max_steps", "2", "--threads", "1"]
    first = subprocess.Popen([sys.executable, str(REPO / "train_glue.py"), *argv, "--seed", "1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        with paused_while_holding(first, tmp_path / "out.lock"):  # the first run holds the folder meanwhile
            message = user_error(capsys, [*argv, "--seed", "2"])
        _, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert message == (f"error: --output_dir {out} is in use by another run (pid {first.pid}); wait for it to end, "
                       f"or pick another --output_dir")
    assert first.returncode == 0, err
    assert tree(tmp_path) == ["out", "out/adapter.pt", "out/best", "out/best/adapter.pt", "out/best/head.safetensors",
                              "out/best/run.json", "out/head.safetensors", "out/results.json", "out/run.json"]
    seeds = [json.loads((out / name).read_text())["seed"] for name in ("run.json", "best/run.json")]
    assert seeds + [json.loads((out / "results.json").read_text())["config"]["seed"]] == [1, 1, 1]


def test_eval_only_refuses_damaged_or_foreign_runs_in_one_line(assets, tmp_path, capsys):
    _, saved = run(assets, tmp_path, "--max_steps", "1", name="saved")
    before = {p: (saved / p).read_bytes() for p in tree(saved) if "." in p}
    config = json.loads((saved / "run.json").read_text())
    hint = "--load must be a run folder written by train_glue.py, or its best/"
    cases = {"list": ("[]", "holds no settings (a JSON object)"),
             "no-task": (json.dumps({k: v for k, v in config.items() if k != "task"}), "has no 'task'"),
             "bad-seed": (json.dumps(config | {"seed": "1"}), "has an invalid 'seed': '1'"),
             "math": (json.dumps({"method": "unilora", "model": "m", "train_data": "metamathqa"}),  # train_math's
                      "has no 'task'")}
    for name, (content, problem) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "run.json").write_text(content)
        message = user_error(capsys, ["--eval_only", "--load", str(folder)])
        assert message == f"error: --load {folder}: {folder / 'run.json'} {problem}; {hint}"
        assert tree(folder) == ["run.json"]
    message = user_error(capsys, ["--eval_only", "--load", str(saved), "--output_dir", str(saved / "best"),
                                  "--overwrite"])  # inside the run: its best adapter would be replaced
    assert message == (f"error: --output_dir {saved / 'best'} holds the run that --load reads, or lies inside it; "
                       f"leave --output_dir out to write {saved / 'eval-1'}")
    assert {p: (saved / p).read_bytes() for p in tree(saved) if "." in p} == before


def test_ctrl_c_ends_in_one_line_with_status_130(assets, tmp_path, capsys, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(tg, "train", interrupted)
    with pytest.raises(SystemExit) as end:
        tg.main(["--task", "sst2", "--output_dir", str(tmp_path / "out")])
    assert end.value.code == 130
    assert capsys.readouterr().err == "interrupted; the output folder was left as it was before\n"


def test_an_existing_run_is_replaced_only_with_overwrite(assets, tmp_path, capsys):
    _, out = run(assets, tmp_path, "--max_steps", "1", "--epochs", "1")
    saved = (out / "results.json").read_text()
    with pytest.raises(SystemExit):
        run(assets, tmp_path, "--max_steps", "1", "--epochs", "1")
    assert (out / "results.json").read_text() == saved
    (out / "eval-1").mkdir()  # belongs to the old run: replaced with it
    again, _ = run(assets, tmp_path, "--max_steps", "2", "--epochs", "1", "--overwrite")
    assert json.loads((out / "results.json").read_text())["steps"] == 2 and not (out / "eval-1").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ----------------------------------------------------------------------------- many copies (torchrun), on CPU

# Loaded into every copy by Python's `site` (PYTHONPATH): a copy other than rank 0 that creates, writes, renames or
# removes anything under UNILORA_TEST_WATCH fails on the spot, so "rank 0 alone writes" is checked, not assumed.
WATCH_HOOK = '''
import os, sys
watched, rank = os.environ.get("UNILORA_TEST_WATCH"), os.environ.get("RANK", "0")
if watched and rank != "0":
    def refuse(event, args):
        writes = event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree") or event == "open" and (
            any(c in args[1] for c in "wax+") if isinstance(args[1], str) else args[2] & (os.O_WRONLY | os.O_RDWR))
        if writes and isinstance(args[0], (str, bytes, os.PathLike)) and \\
                os.path.abspath(os.fsdecode(args[0])).startswith(watched):
            raise PermissionError(f"rank {rank}: {event} {args[0]}")
    sys.addaudithook(refuse)
'''


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(argv, watched, hook_dir, copies=2):
    """`torchrun --nproc_per_node 2 -- train_glue.py ARGV` as a user types it, on 127.0.0.1 (gloo on CPU)."""
    (hook_dir / "sitecustomize.py").write_text(WATCH_HOOK)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(hook_dir), UNILORA_TEST_WATCH=str(watched))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(copies), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "--", str(REPO / "train_glue.py"), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=watched, env=env)


def test_two_copies_train_exactly_the_one_process_run(assets, tmp_path, tmp_path_factory, monkeypatch):
    """Two copies, each with its share of every global batch of 8 (45 examples: the last batch is 5, split 3 + 2),
    in micro-batches of 2 (--grad_accum 4), against one process on the same global batch: the same theta_d and head
    after 12 steps, the same dev predictions, the same files (rank 0 alone writes them).

    Tolerance: fp32 sums the batch in another order on two copies (two partial sums, then one all-reduce). As a
    yardstick, one process whose only change is the order of that sum (--grad_accum 1 instead of 4) moves theta_d
    by about 4e-6 of its norm on this run; two copies must stay within 2e-6 of it (norm-wise). A copy that skipped
    the all-reduce, took the wrong rows or normalised by its own share instead misses by 1e-2 or more."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    models, data = assets
    argv = ["--task", "sst2", "--model", str(models["bert"]), "--data_dir", str(data["sst2"]), "--batch_size", "8",
            "--grad_accum", "4", "--max_train_samples", "45", "--max_eval_samples", "23", "--max_length", "32",
            "--epochs", "2", "--d", "256", "--device", "cpu", "--threads", "1"]
    one = tg.main(argv + ["--output_dir", str(tmp_path / "one")])
    assert not torch.distributed.is_initialized()  # a plain run never starts torch.distributed
    proc = torchrun(argv + ["--output_dir", str(tmp_path / "two")], tmp_path, tmp_path_factory.mktemp("hook"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("saved to") == 1 and proc.stdout.count("  task               sst2") == 1  # rank 0 alone
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert (one["world_size"], two["world_size"], one["steps"], two["steps"]) == (1, 2, 12, 12)
    for a, b in zip(one["epochs"], two["epochs"]):
        assert a["dev"]["accuracy"] == b["dev"]["accuracy"] and a["dev"]["loss"] == pytest.approx(b["dev"]["loss"],
                                                                                                   rel=1e-6)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
    for name in ("adapter.pt", "best/adapter.pt"):
        theta = [torch.load(tmp_path / run / name, weights_only=True)["theta_d"].double() for run in ("one", "two")]
        assert (theta[1] - theta[0]).norm() <= 2e-6 * theta[0].norm(), name
    heads = [tg.load_safetensors(tmp_path / run / "head.safetensors") for run in ("one", "two")]
    for key in heads[0]:
        assert (heads[1][key] - heads[0][key]).double().norm() <= 2e-6 * heads[0][key].double().norm(), key
    assert tree(tmp_path / "two") == tree(tmp_path / "one")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no .partial, no .old, nothing else
    assert json.loads((tmp_path / "two" / "run.json").read_text()) == one["config"]


def test_a_user_error_under_torchrun_is_printed_once_and_stops_every_copy(assets, tmp_path, tmp_path_factory):
    """Only rank 0 checks the output folder; the other copy must not wait for it forever, nor print the error."""
    models, data = assets
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "run.json").write_text("{}")  # another run: refused without --overwrite
    argv = ["--task", "sst2", "--model", str(models["bert"]), "--data_dir", str(data["sst2"]), "--d", "64",
            "--device", "cpu", "--output_dir", str(saved)]
    proc = torchrun(argv, tmp_path, tmp_path_factory.mktemp("hook"))
    assert proc.returncode != 0
    message = f"--output_dir {saved} already holds a run; pass --overwrite"
    assert (proc.stdout + proc.stderr).count(message) == 1 and "train_glue.py\", line" not in proc.stderr
    assert tree(tmp_path) == ["saved", "saved/run.json"]


@pytest.mark.parametrize("key, value, complaint", [
    ("num_hidden_layers", "6", 'num_hidden_layers is "6" \\(a string\\); expected a positive integer'),
    ("model_type", None, "model_type is null; expected a string"),
    ("hidden_size", -8, "hidden_size is -8; expected a positive integer"),
])
def test_a_malformed_model_config_is_one_line(assets, tmp_path, capsys, key, value, complaint):
    """config.json values are typed and ranged before anything is built (pretrained.encoder.encoder_settings): a
    bad one is one line naming the file and the key, not a traceback from the first code that reads it."""
    import shutil
    models, data = assets
    broken = tmp_path / "broken-bert"
    shutil.copytree(models["bert"], broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, key: value}))
    message = user_error(capsys, ["--task", "sst2", "--model", str(broken), "--data_dir", str(data["sst2"]),
                                  "--output_dir", str(tmp_path / "out"), "--threads", "1", "--device", "cpu"])
    assert re.search(f"--model {re.escape(str(broken))}: .*config.json: {complaint}", message), message
    assert not (tmp_path / "out").exists()
