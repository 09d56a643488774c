"""Tests for train_glue.py: fast, offline, and independent of the prepared assets.

Why this file exists: the GLUE script must parse eight different TSV layouts exactly, score with the GLUE
metrics, train through three methods with one optimiser/schedule, and reload what it saved. Everything here
runs on tiny random BERT and RoBERTa checkpoints (with hand-written tokenizer.json files) written by the
fixtures, and tiny TSVs in each task's format, so the whole file needs no network and takes seconds.
"""
import io
import json
import math
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import train_glue as tg
from pretrained import save_safetensors

REPO = Path(__file__).resolve().parent

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
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {t: {"id": t, "ids": [specials.index(t)], "tokens": [t]} for t in ("[CLS]", "[SEP]")}},
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": {t: i for i, t in enumerate(vocab)}},
    }


def byte_chars():
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE)."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def roberta_tokenizer_json():
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "g"), ("o", "o"), ("Ġg", "oo"), ("Ġgoo", "d")]
    vocab = specials + byte_chars() + ["".join(m) for m in merges]
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
    folder = Path(root) / tg.TASKS[task]["folder"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_text("\n".join(task_rows(task, n_train, rng)) + "\n")
    (folder / tg.TASKS[task]["dev"]).write_text("\n".join(task_rows(task, n_dev, rng, dev=True)) + "\n")
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue_assets")
    models = {"bert": write_encoder(root / "tiny-bert", "bert"),
              "roberta": write_encoder(root / "tiny-roberta", "roberta"),
              "bert-nopool": write_encoder(root / "tiny-bert-nopool", "bert", pooler=False),
              "roberta-large": write_encoder(root / "tiny-roberta-large", "roberta")}
    data = {task: write_task(root / "glue", task) for task in tg.TASKS}
    return models, data


def run(assets, tmp_path, *extra, task="sst2", model="bert", name="run", data_dir=None):
    models, data = assets
    out = tmp_path / name
    data_dir = ["--data_dir", str(data[task])] if data_dir is None else data_dir
    argv = ["--task", task, "--model", str(models[model]), *data_dir, "--output_dir", str(out),
            "--batch_size", "8", "--max_length", "32", "--epochs", "2", "--d", "256", "--threads", "1",
            "--device", "cpu", *extra]
    return tg.main(argv), out


# ----------------------------------------------------------------------------- metrics vs. textbook formulas

def test_accuracy_and_f1_by_hand():
    pred = np.array([1, 1, 0, 1, 0, 0, 1])
    y = np.array([1, 0, 0, 1, 1, 0, 1])
    tp, fp, fn = 3, 1, 1
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert tg.accuracy(pred, y) == pytest.approx(5 / 7)
    assert tg.f1_score(pred, y) == pytest.approx(2 * precision * recall / (precision + recall))
    assert tg.f1_score(np.zeros(4), np.zeros(4)) == 0.0  # no positives anywhere: defined as 0, not NaN


def test_matthews_binary_formula_and_multiclass_covariance_form():
    pred = np.array([1, 1, 0, 1, 0, 0, 1, 0, 0])
    y = np.array([1, 0, 0, 1, 1, 0, 1, 0, 1])
    tp, tn, fp, fn = 3, 3, 1, 2
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert tg.matthews(pred, y) == pytest.approx(expected)
    # Gorodkin's definition: correlation of the one-hot label and prediction matrices.
    rng = np.random.default_rng(0)
    y3, p3 = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    X, Y = np.eye(3)[p3], np.eye(3)[y3]
    cov = lambda a, b: np.sum((a - a.mean(0)) * (b - b.mean(0)))
    assert tg.matthews(p3, y3) == pytest.approx(cov(X, Y) / math.sqrt(cov(X, X) * cov(Y, Y)))
    assert tg.matthews(np.ones(6, int), np.array([0, 1, 0, 1, 1, 0])) == 0.0  # constant prediction


def test_pearson_and_spearman_by_hand():
    x = np.array([1.0, 2.0, 4.0, 3.0, 7.0])
    y = np.array([2.0, 1.0, 5.0, 4.0, 6.0])
    n = len(x)
    num = n * np.sum(x * y) - x.sum() * y.sum()
    den = math.sqrt((n * np.sum(x * x) - x.sum() ** 2) * (n * np.sum(y * y) - y.sum() ** 2))
    assert tg.pearson(x, y) == pytest.approx(num / den)
    # no ties: Spearman's rank-difference formula
    d = np.array([1, 2, 4, 3, 5]) - np.array([2, 1, 4, 3, 5])
    assert tg.spearman(x, y) == pytest.approx(1 - 6 * np.sum(d ** 2) / (n * (n * n - 1)))
    # ties share the average rank
    assert tg.ranks([3.0, 1.0, 3.0, 2.0, 3.0]).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]
    assert tg.ranks([1.0, 2.0, 2.0, 3.0]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert tg.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(tg.pearson([1, 2.5, 2.5, 4], [1, 2, 3, 4]))
    assert tg.pearson(np.ones(4), y[:4]) == 0.0


# ----------------------------------------------------------------------------- data

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
        assert tg.read_tsv(task, path) == (texts, labels), task
    # MNLI: 12 columns in train, 16 in dev, gold label last in both
    for dev in (False, True):
        path = tmp_path / f"mnli{dev}.tsv"
        path.write_text("\n".join(task_rows("mnli", 3, random.Random(1), dev=dev)) + "\n")
        texts, labels = tg.read_tsv("mnli", path)
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
    with pytest.raises(tg.DataError, match=complaint) as err:
        tg.read_tsv(task, path)
    assert f"{path}:{len(good) + 1}:" in str(err.value)


def test_empty_file_and_missing_split_are_errors(tmp_path, assets):
    path = tmp_path / "dev.tsv"
    path.write_text("sentence\tlabel\n")
    with pytest.raises(tg.DataError, match="no examples"):
        tg.read_tsv("sst2", path)
    with pytest.raises(tg.DataError, match=r"train.tsv not found. --data_dir must be the SST-2 folder"):
        tg.main(["--task", "sst2", "--model", str(assets[0]["bert"]), "--data_dir", str(tmp_path)])


def test_download_unpacks_tasks_and_rebuilds_mrpc(tmp_path, monkeypatch, assets):
    served = {}

    def fake_download(url, dest, **kw):  # what pretrained.download does, from a dict instead of the network
        Path(dest).write_bytes(served[url])
        return Path(dest)

    monkeypatch.setattr(tg, "download", fake_download)
    sst = write_task(tmp_path / "src", "sst2")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:  # folder name unlike the task's, as in QNLIv2.zip
        for f in ("train.tsv", "dev.tsv"):
            z.writestr(f"SST-2-v9/{f}", (sst / f).read_text())
        z.writestr("SST-2-v9/original/other.txt", "ignored")
    served[tg.GLUE_URL + "SST-2.zip"] = buf.getvalue()
    corpus = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n" + "".join(
        f"{i % 2}\t{10 + i}\t{20 + i}\tsent \"{i}\" a\tsent {i} b\n" for i in range(6))
    served[tg.MRPC_TRAIN_URL] = corpus.encode("utf-8")
    served[tg.MRPC_DEV_IDS_URL] = b"11\t21\n14\t24\n"

    cache = tmp_path / "cache"
    folder = tg.fetch_glue("sst2", cache)
    assert folder == cache / "SST-2" and sorted(p.name for p in folder.iterdir()) == ["dev.tsv", "train.tsv"]
    assert (folder / "train.tsv").read_text() == (sst / "train.tsv").read_text()
    assert not (cache / "SST-2.partial").exists()

    mrpc = tg.fetch_glue("mrpc", cache)
    dev_texts, dev_labels = tg.read_tsv("mrpc", mrpc / "dev.tsv")
    train_texts, _ = tg.read_tsv("mrpc", mrpc / "train.tsv")
    assert dev_texts == [('sent "1" a', "sent 1 b"), ('sent "4" a', "sent 4 b")] and dev_labels == [1, 0]
    assert len(train_texts) == 4

    served.clear()  # a second call must not download again
    assert tg.fetch_glue("sst2", cache) == folder
    result, _ = run(assets, tmp_path, "--max_steps", "2", "--cache_dir", str(cache), data_dir=[])
    assert result["steps"] == 2 and result["config"]["data_dir"] is None


# ----------------------------------------------------------------------------- training end to end

def test_unilora_run_outputs_counts_and_reload(assets, tmp_path):
    result, out = run(assets, tmp_path)
    H, L, r = 32, 2, 4
    assert result["trainable"]["D"] == L * 2 * r * (H + H)  # query and value of every layer
    assert result["trainable"]["d"] == 256
    assert result["trainable"]["head"] == H * 2 + 2  # BERT: pooler (frozen) -> classifier Linear(H, 2)
    assert [e["epoch"] for e in result["epochs"]] == [1, 2] and result["steps"] == 2 * 6
    assert result["config"]["lr"] == 5e-3 and result["config"]["head_lr"] == 1e-4  # the paper's SST-2 recipe
    assert result["best"]["dev"]["accuracy"] == max(e["dev"]["accuracy"] for e in result["epochs"])
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["last"] == result["last"] and on_disk["wall_time_s"] > 0
    for name in ("adapter.pt", "head.safetensors", "config.json", "best/adapter.pt", "best/head.safetensors"):
        assert (out / name).is_file(), name
    # eval-only reload rebuilds the model from the base checkpoint + saved files: equal to the run's own evals
    models, data = assets
    again = tg.main(["--eval_only", "--load", str(out), "--data_dir", str(data["sst2"]), "--threads", "1"])
    assert again == result["last"]["dev"]
    again = tg.main(["--eval_only", "--load", str(out / "best"), "--data_dir", str(data["sst2"])])
    assert again == result["best"]["dev"]


@pytest.mark.parametrize("method", ["lora", "head"])
def test_baselines_train_and_reload(assets, tmp_path, method):
    result, out = run(assets, tmp_path, "--method", method, "--epochs", "1", "--max_eval_samples", "10")
    H, L, r = 32, 2, 4
    if method == "lora":
        assert result["trainable"]["d"] == result["trainable"]["D"] == L * 2 * r * (H + H)
        assert result["config"]["lr"] == tg.LORA_LR
    else:
        assert result["trainable"]["d"] == 0 and not (out / "adapter.pt").exists()
    dev = tg.main(["--eval_only", "--load", str(out), "--data_dir", str(assets[1]["sst2"]),
                   "--max_eval_samples", "10", "--output_dir", str(tmp_path / "ev")])
    assert dev == result["last"]["dev"]
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["dev"] == dev


def test_roberta_pair_regression_and_large_presets(assets, tmp_path):
    result, _ = run(assets, tmp_path, "--max_steps", "3", task="stsb", model="roberta")
    H = 32
    assert set(result["last"]["dev"]) == {"pearson", "spearman", "loss"}
    assert result["trainable"]["head"] == (H * H + H) + (H + 1)  # dense(H,H) + out_proj(H,1)
    assert result["steps"] == 3 and len(result["epochs"]) == 1  # max_steps stops mid-epoch, then evaluates
    big, _ = run(assets, tmp_path, "--max_steps", "1", task="rte", model="roberta-large", name="large")
    head_lr, theta_lr, epochs = tg.LARGE_RECIPE["rte"]
    cfg = big["config"]
    assert (cfg["head_lr"], cfg["lr"], cfg["epochs"]) == (head_lr, theta_lr, 2)  # --epochs 2 overrides the preset
    models, data = assets
    preset = tg.main(["--task", "rte", "--model", str(models["roberta-large"]), "--data_dir", str(data["rte"]),
                      "--output_dir", str(tmp_path / "preset"), "--max_steps", "1", "--d", "64"])
    assert preset["config"]["max_length"] == 128 and preset["config"]["epochs"] == epochs


@pytest.mark.parametrize("task", ["cola", "mrpc", "qnli", "mnli", "qqp"])
def test_every_task_trains(assets, tmp_path, task):
    result, _ = run(assets, tmp_path, "--max_steps", "2", "--max_eval_samples", "12", task=task,
                    model="roberta" if task in ("qnli", "mnli") else "bert")
    assert set(result["last"]["dev"]) == set(tg.TASKS[task]["metrics"]) | {"loss"}
    assert result["trainable"]["head"] > 0 and math.isfinite(result["last"]["dev"]["loss"])


def test_bert_without_pooler_gets_the_roberta_style_head(assets, tmp_path):
    result, _ = run(assets, tmp_path, "--max_steps", "1", model="bert-nopool")
    assert result["trainable"]["head"] == (32 * 32 + 32) + (32 * 2 + 2)


def test_gradient_accumulation_matches_the_full_batch(assets, tmp_path):
    # Dropout is 0 in the tiny models, so splitting each batch of 8 into 2 or 3 micro-batches (3 does not
    # divide 8: rejected) must give the same training run up to float rounding.
    full, _ = run(assets, tmp_path, "--max_steps", "4", name="full")
    split, _ = run(assets, tmp_path, "--max_steps", "4", "--grad_accum", "2", name="split")
    assert split["last"]["dev"]["loss"] == pytest.approx(full["last"]["dev"]["loss"], rel=1e-5)
    with pytest.raises(SystemExit):
        run(assets, tmp_path, "--grad_accum", "3")


def test_signs_flag_and_seed_change_the_run(assets, tmp_path):
    on, _ = run(assets, tmp_path, "--max_steps", "3", name="on")
    off, _ = run(assets, tmp_path, "--max_steps", "3", "--no-signs", name="off")
    again, _ = run(assets, tmp_path, "--max_steps", "3", name="again")
    other, _ = run(assets, tmp_path, "--max_steps", "3", "--seed", "1", name="seed1")
    assert off["config"]["signs"] is False and on["config"]["signs"] is True
    assert again["last"]["dev"] == on["last"]["dev"]  # same seed: the same run, bit for bit
    assert off["last"]["dev"]["loss"] != on["last"]["dev"]["loss"]
    assert other["last"]["dev"]["loss"] != on["last"]["dev"]["loss"]


def test_it_learns_the_tiny_task(assets, tmp_path):
    # The tiny SST-2 says its label with one word. Uni-LoRA with a high lr must find it within four epochs, and
    # beat the head alone on the frozen random encoder. Guards against a theta_d or head that silently does
    # not train (wrong optimiser groups, frozen head, lr 0, a broken projection).
    data = write_task(tmp_path / "glue", "sst2", n_train=192, n_dev=48, seed=3)
    common = ["--batch_size", "16", "--epochs", "4", "--d", "512", "--head_lr", "0.01"]
    uni, _ = run(assets, tmp_path, *common, "--lr", "0.05", data_dir=["--data_dir", str(data)])
    head, _ = run(assets, tmp_path, *common, "--method", "head", data_dir=["--data_dir", str(data)], name="head")
    assert uni["best"]["dev"]["accuracy"] >= 0.85
    assert uni["best"]["dev"]["accuracy"] > head["best"]["dev"]["accuracy"] + 0.1


def test_command_line_errors(assets, tmp_path):
    with pytest.raises(SystemExit):
        tg.main(["--eval_only"])
    with pytest.raises(SystemExit):
        tg.main(["--model", "x"])  # no --task
    with pytest.raises(SystemExit):
        tg.main(["--eval_only", "--load", str(tmp_path)])  # not a run folder


def test_one_real_command_line_run(assets, tmp_path):
    models, data = assets
    out = tmp_path / "cli"
    cmd = [sys.executable, str(REPO / "train_glue.py"), "--task", "cola", "--model", str(models["bert"]),
           "--data_dir", str(data["cola"]), "--output_dir", str(out), "--max_steps", "2", "--batch_size", "8",
           "--max_length", "32", "--d", "128", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "best matthews" in proc.stdout
    assert json.loads((out / "results.json").read_text())["steps"] == 2


def test_an_existing_run_is_not_overwritten_without_asking(assets, tmp_path):
    _, out = run(assets, tmp_path, "--max_steps", "1", "--epochs", "1")
    saved = (out / "results.json").read_text()
    with pytest.raises(SystemExit):
        run(assets, tmp_path, "--max_steps", "1", "--epochs", "1")
    assert (out / "results.json").read_text() == saved
    run(assets, tmp_path, "--max_steps", "1", "--epochs", "1", "--overwrite")
    assert (out / "results.json").exists()
