"""Checkpoint files (pretrained/files.py): a hand-rolled safetensors writer/parser (struct + json + numpy) as the
reference, every checkpoint format, and hostile files: only ValueErrors naming the file, no big allocations, no
code run by an unpickler."""
import ast
import json
import math
import os
import pickle
import random
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrained import decoder, encoder, files, tokenizer
from references import (BERT, DECODERS, ROBERTA, decoder_weights, encoder_weights, parse_by_hand, safetensors_bytes,
                        save_model, write_by_hand)

torch.set_num_threads(1)


def test_reader_reads_a_hand_written_file(tmp_path):
    vals = [1.5, -2.0, 0.15625, 3.0e-3, 1024.0, -0.5]  # all exactly representable in bf16 except 3e-3
    f32 = torch.tensor(vals).reshape(2, 3)
    write_by_hand(tmp_path / "a.safetensors", {"w": f32, "h": f32.half(), "b": f32.bfloat16(),
                                               "i": torch.arange(4), "s": torch.tensor(7.0)})
    sd = files.load_safetensors(tmp_path / "a.safetensors")
    assert {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()} == {
        "w": (torch.float32, (2, 3)), "h": (torch.float16, (2, 3)), "b": (torch.bfloat16, (2, 3)),
        "i": (torch.int64, (4,)), "s": (torch.float32, ())}
    assert sd["w"].flatten().tolist() == [np.float32(v) for v in vals]
    assert sd["h"].flatten().tolist() == [float(np.float16(v)) for v in vals]
    b = sd["b"].flatten().tolist()
    assert b[:3] + b[4:] == [1.5, -2.0, 0.15625, 1024.0, -0.5]
    assert abs(sd["b"].flatten()[3].item() - 3e-3) < 3e-3 / 128  # bf16 keeps 8 significant bits
    assert sd["i"].tolist() == [0, 1, 2, 3] and sd["s"].item() == 7.0


def test_writer_output_parsed_by_hand(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"z.f32": torch.randn(3, 4, generator=g), "a.f16": torch.randn(5, generator=g).half(),
               "m.bf16": torch.randn(2, 2, 2, generator=g).bfloat16(), "t": torch.randn(4, 3, generator=g).T}
    files.save_safetensors(tensors, tmp_path / "w.safetensors", metadata={"format": "pt"})
    parsed, meta, n = parse_by_hand(tmp_path / "w.safetensors")
    assert meta == {"format": "pt"} and (8 + n) % 8 == 0  # data 8-byte aligned, like the reference writer
    assert {k: d for k, (d, _) in parsed.items()} == {"z.f32": "F32", "a.f16": "F16", "m.bf16": "BF16", "t": "F32"}
    for k, t in tensors.items():
        np.testing.assert_array_equal(parsed[k][1], t.float().numpy())
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # the temp file was renamed, none left over


def test_round_trip_keeps_dtype_shape_and_values(tmp_path):
    tensors = {"x": torch.randn(2, 3).bfloat16(), "y": torch.randn(7).half(), "e": torch.zeros(0, 5),
               "s": torch.tensor(2.5), "i": torch.tensor([[1, -2], [3, 4]])}
    files.save_safetensors(tensors, tmp_path / "r.safetensors")
    back = files.load_safetensors(tmp_path / "r.safetensors")
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t)


def test_unsupported_dtype_is_a_clear_error(tmp_path):
    write_by_hand(tmp_path / "f8.safetensors", {"w": torch.zeros(4, dtype=torch.uint8)},
                  dtype_names={torch.uint8: "F8_E4M3"})
    with pytest.raises(ValueError, match=r"'w' has dtype F8_E4M3.*supports only F32, F16, BF16"):
        files.load_safetensors(tmp_path / "f8.safetensors")
    with pytest.raises(ValueError, match="complex64"):
        files.save_safetensors({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()


def test_truncated_file_is_a_clear_error(tmp_path):
    write_by_hand(tmp_path / "t.safetensors", {"w": torch.ones(100)})
    blob = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(blob[:-10])
    with pytest.raises(ValueError, match="truncated"):
        files.load_safetensors(tmp_path / "t.safetensors")


def test_load_state_dict_reads_every_checkpoint_format(tmp_path):
    sd = {"a.weight": torch.randn(3, 2), "b.weight": torch.randn(4).half(), "c.bias": torch.randn(2).bfloat16()}
    (tmp_path / "single").mkdir()
    write_by_hand(tmp_path / "single/model.safetensors", sd)
    (tmp_path / "sharded").mkdir()
    write_by_hand(tmp_path / "sharded/model-00001-of-00002.safetensors", {"a.weight": sd["a.weight"]})
    write_by_hand(tmp_path / "sharded/model-00002-of-00002.safetensors", {k: sd[k] for k in ("b.weight", "c.bias")})
    (tmp_path / "sharded/model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors",
        "c.bias": "model-00002-of-00002.safetensors"}}))
    (tmp_path / "bin").mkdir()
    torch.save(sd, tmp_path / "bin/pytorch_model.bin")
    for folder in ("single", "sharded", "bin"):
        got = files.load_state_dict(tmp_path / folder)
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) and got[k].dtype == sd[k].dtype for k in sd)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        files.load_state_dict(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="config.json"):
        files.load_config(tmp_path / "empty")


def hostile_variants(seed=0, n=300):
    """Seeded mutations of a valid safetensors file: flipped bytes, hostile header values, lying header lengths,
    truncations, extra overlapping entries and edited header text."""
    rng = random.Random(seed)
    good = safetensors_bytes({"a": torch.randn(3, 4), "b": torch.arange(6).reshape(2, 3), "c": torch.randn(5).half()})
    (hlen,) = struct.unpack("<Q", good[:8])
    header, data = json.loads(good[8:8 + hlen]), good[8 + hlen:]
    pool = [-1, 0, 8, 2**40, 2**64, 1.5, "3", None, True, [], [1], [0, 2**62], [2**62, 2**62 + 8], [-8, 0], [8, 0],
            [0, -1], [[0]], {"a": 1}, "F8_E4M3", "F32", "BF16", ["F32"], [2**31, 2**31], [3, -4], [True, 2], [0, 48],
            [1e3, 2e3], [2**20, 2**20, 2**20], [4, 3], [0, 24], [48, 72]]

    def pack(h, d=data, length=None):
        text = json.dumps(h).encode()
        return struct.pack("<Q", len(text) if length is None else length) + text + d

    for i in range(n):
        kind = i % 7
        if kind == 0:  # flip a few random bytes anywhere
            b = bytearray(good)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            yield bytes(b)
        elif kind == 1:  # one field of one tensor set to a hostile value
            h = json.loads(json.dumps(header))
            h[rng.choice("abc")][rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(pool)
            yield pack(h)
        elif kind == 2:  # the header length lies
            yield pack(header, length=rng.choice([0, 1, 7, hlen - 1, hlen + 1, len(good), 2**32, 2**63, 2**64 - 1]))
        elif kind == 3:  # truncated anywhere
            yield good[:rng.randrange(len(good))]
        elif kind == 4:  # an extra tensor overlapping the others, or one claiming far more than the file holds
            h = json.loads(json.dumps(header))
            big = rng.choice([[2**15, 2**15], [10**9], [3, 4]])
            end = rng.choice([48, 8 * math.prod(big), 2**30])
            h["x"] = {"dtype": "F32", "shape": big, "data_offsets": [rng.choice([0, 8, 24]), end]}
            yield pack(h)
        elif kind == 5:  # a field missing, or an entry that is not an object
            h = json.loads(json.dumps(header))
            name = rng.choice("abc")
            if rng.random() < 0.5:
                del h[name][rng.choice(["dtype", "shape", "data_offsets"])]
            else:
                h[name] = rng.choice(pool)
            yield pack(h)
        else:  # the header text edited: a character dropped, doubled or replaced
            text = bytearray(good[8:8 + hlen])
            j = rng.randrange(len(text))
            op = rng.randrange(3)
            text = text[:j] + text[j + 1:] if op == 0 else text[:j] + text[j:j + 1] * 2 + text[j + 1:] \
                if op == 1 else text[:j] + bytes([rng.randrange(256)]) + text[j + 1:]
            yield struct.pack("<Q", len(text)) + bytes(text) + data


def test_safetensors_fuzz_only_value_errors_and_no_big_allocations(tmp_path):
    import tracemalloc
    outcomes = {"loaded": 0, "refused": 0}
    path = tmp_path / "fuzz.safetensors"
    for i, blob in enumerate(hostile_variants()):
        path.write_bytes(blob)
        tracemalloc.start()
        try:
            sd = files.load_safetensors(path)
            outcomes["loaded"] += 1
            assert sum(t.numel() * t.element_size() for t in sd.values()) <= len(blob)
        except ValueError as e:
            outcomes["refused"] += 1
            assert str(path) in str(e), f"variant {i}: the error does not name the file: {e}"
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak < 4 * len(blob) + (256 << 10), f"variant {i} made the reader allocate {peak} bytes"
    assert outcomes["refused"] > 150 and outcomes["loaded"] > 10  # both paths were really exercised


def test_safetensors_reader_refuses_the_reported_files(tmp_path):
    def header_file(name, header, data=b""):
        text = json.dumps(header).encode()
        (tmp_path / name).write_bytes(struct.pack("<Q", len(text)) + text + data)
        return tmp_path / name
    cases = {  # the examples: a 1 GB claim in a tiny file, negative/overlapping offsets, a lying length
        "huge.safetensors": ({"w": {"dtype": "F32", "shape": [2**28], "data_offsets": [0, 2**30]}}, b"\0" * 16,
                             "ends at byte 1073741824 .* only 16 bytes"),
        "negative.safetensors": ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, b"\0" * 8,
                                 "data_offsets"),
        "overlap.safetensors": ({"u": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                 "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12,
                                "'u' and 'v' overlap"),
        "shape.safetensors": ({"w": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 0]}}, b"", "shape"),
        "dtype.safetensors": ({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "dtype"),
        "entry.safetensors": ({"w": [1, 2]}, b"", "'w' is not an object"),
        "list.safetensors": ([1, 2], b"", "JSON list"),
        "dup.safetensors": (None, b"", "duplicate"),
    }
    for name, (header, data, problem) in cases.items():
        if header is None:
            text = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {}}'
            (tmp_path / name).write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 4)
            path = tmp_path / name
        else:
            path = header_file(name, header, data)
        with pytest.raises(ValueError, match=f"{re.escape(str(path))}.*{problem}"):
            files.load_safetensors(path)
    (tmp_path / "long.safetensors").write_bytes(struct.pack("<Q", 1000) + b"{}")  # length past the end
    with pytest.raises(ValueError, match="header claims 1000 bytes"):
        files.load_safetensors(tmp_path / "long.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"\1\0")
    with pytest.raises(ValueError, match="too short"):
        files.load_safetensors(tmp_path / "tiny.safetensors")


class ArbitraryCode:
    """Unpickling this calls os.mkdir(marker): the stand-in for any code a crafted checkpoint could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_crafted_pickle_checkpoint_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"x": ArbitraryCode(marker)}, tmp_path / "armed.pt")  # prove the payload is live: a plain unpickler
    with zipfile.ZipFile(tmp_path / "armed.pt") as z:                 # runs it
        pickle.loads(z.read(next(n for n in z.namelist() if n.endswith("data.pkl"))))
    assert marker.is_dir()
    marker.rmdir()
    folder = tmp_path / "model"
    folder.mkdir()
    torch.save({"w": torch.ones(2), "x": ArbitraryCode(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=f"{re.escape(str(folder / 'pytorch_model.bin'))} is not a plain tensor"):
        files.load_state_dict(folder)
    assert not marker.exists()
    torch.save({"w": torch.ones(2)}, folder / "pytorch_model.bin")
    (folder / "pytorch_model.bin").write_bytes((folder / "pytorch_model.bin").read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="pytorch_model.bin is not a plain tensor checkpoint"):
        files.load_state_dict(folder)
    torch.save([torch.ones(2)], folder / "pytorch_model.bin")  # loads safely, but is no state dict
    with pytest.raises(ValueError, match="does not hold a state dict"):
        files.load_state_dict(folder)


def test_loader_errors_name_the_file_and_the_problem(tmp_path):
    c, sd = DECODERS["llama-gqa-untied"], decoder_weights(DECODERS["llama-gqa-untied"])

    def folder_with(name, config=c, weights=sd):
        return save_model(tmp_path / name, config, weights)

    bad_configs = {"json": (b'{"model_type": "llama",', "is not valid JSON"),
                   "utf8": (b'{"model_type": "llama\xff"}', "is not UTF-8 text"),
                   "list": (b"[1, 2]", "holds a JSON list"),
                   "missing": (json.dumps({k: v for k, v in c.items() if k != "hidden_size"}).encode(),
                               ": hidden_size is missing; expected a positive integer"),
                   "string": (json.dumps(dict(c, num_hidden_layers="2")).encode(),
                              r': num_hidden_layers is "2" \(a string\); expected a positive integer'),
                   "heads": (json.dumps(dict(c, num_key_value_heads=3)).encode(),
                             "num_attention_heads 4 is not a multiple of num_key_value_heads 3")}
    for name, (text, problem) in bad_configs.items():
        folder = folder_with(name)
        (folder / "config.json").write_bytes(text)
        with pytest.raises(ValueError, match=f"{re.escape(str(folder / 'config.json'))}.*{problem}"):
            decoder.CausalLM.from_pretrained(folder)
    wrong = dict(sd, **{"model.layers.1.self_attn.k_proj.weight": sd["model.layers.1.self_attn.k_proj.weight"].T})
    folder = folder_with("shape", weights=wrong)
    with pytest.raises(ValueError, match=rf"{re.escape(str(folder))}: model.layers.1.self_attn.k_proj.weight has "
                                         r"shape \(32, 16\), its config.json implies \(16, 32\)"):
        decoder.CausalLM.from_pretrained(folder)
    folder = folder_with("truncated")
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{re.escape(str(folder / 'model.safetensors'))}.*truncated"):
        decoder.CausalLM.from_pretrained(folder)
    folder = folder_with("index")
    (folder / "model.safetensors").rename(folder / "shard.safetensors")
    (folder / "model.safetensors.index.json").write_bytes(b"\xfe{}")
    with pytest.raises(ValueError, match=f"{re.escape(str(folder / 'model.safetensors.index.json'))} is not UTF-8"):
        files.load_state_dict(folder)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ["shard.safetensors"]}')
    with pytest.raises(ValueError, match="index.json has no weight_map object"):
        files.load_state_dict(folder)
    (folder / "copy.safetensors").write_bytes((folder / "shard.safetensors").read_bytes())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "shard.safetensors", "lm_head.weight": "copy.safetensors"}}))
    with pytest.raises(ValueError, match="shard.safetensors holds tensors another shard .* holds too"):
        files.load_state_dict(folder)  # two shards with the same tensor: which one wins would be an accident
    bert = save_model(tmp_path / "bert", {k: v for k, v in BERT.items() if k != "layer_norm_eps"},
                      encoder_weights(BERT))
    with pytest.raises(ValueError, match=f"{re.escape(str(bert / 'config.json'))}: layer_norm_eps is missing; "
                                         "expected a positive number"):
        encoder.Encoder.from_pretrained(bert)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok/tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "vocab": {"a": 0}}}))
    (tmp_path / "tok/tokenizer_config.json").write_bytes(b'{"eos_token": "\xff"}')
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 'tok/tokenizer_config.json'))} is not UTF-8"):
        tokenizer.Tokenizer.from_pretrained(tmp_path / "tok")


def test_no_python_file_in_the_repo_unpickles_arbitrary_objects():
    """Every `weights_only=` argument in the repository is the constant True. Read from the parsed source, so any
    spelling (spaces, False, 0, a variable) counts, while the text inside strings (like another test's own check
    for the phrase) does not."""
    repo = Path(__file__).resolve().parent.parent
    files = [p for p in repo.rglob("*.py") if not any(part.startswith(".") for part in p.relative_to(repo).parts)]
    assert len(files) >= 8  # the project's scripts and tests were found
    offenders = [f"{p.relative_to(repo)}:{node.value.lineno}" for p in files
                 for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
                 if isinstance(node, ast.keyword) and node.arg == "weights_only"
                 and not (isinstance(node.value, ast.Constant) and node.value.value is True)]
    assert offenders == [], "torch.load(..., weights_only=True) only: a checkpoint must never run code"


# --- config.json values: config_value, and malformed configs fuzzed ----------------------------------------------
@pytest.mark.parametrize("value,kind,message", [
    ("6", "size", 'k is "6" (a string); expected a positive integer'),
    (True, "size", "k is true (a boolean); expected a positive integer"),
    (3.0, "size", "k is 3.0; expected a positive integer"),
    (2**31, "size", "k is 2147483648; expected a positive integer below 2147483648"),
    (-1, "count", "k is -1; expected an integer >= 0"),
    (2**31, "count", "k is 2147483648; expected an integer >= 0 below 2147483648"),
    (10, "token id", "k is 10; expected a token id from 0 to 9"),
    ([], "token ids", "k is [] (a list); expected a token id from 0 to 9, or a non-empty list of them"),
    (-0.0, "positive", "k is -0.0; expected a positive number"),
    (float("-inf"), "positive", "k is -Infinity; expected a positive number"),
    (10**400, "positive", f"k is 1{'0' * 56}...; expected a positive number"),  # cut short, and no float
    (1.01, "probability", "k is 1.01; expected a number from 0 to 1"),
    (0, "flag", "k is 0; expected true or false"),
    ({"a": 1}, "name", 'k is {"a": 1} (an object); expected a string'),
    ("ab", "char", 'k is "ab"; expected a single character'),
    ([1], "object", "k is [1] (a list); expected an object"),
    ("x" * 80, "list", f'k is "{"x" * 56}... (a string); expected a list'),
])
def test_config_value_names_the_value_and_what_was_expected(value, kind, message):
    with pytest.raises(ValueError) as err:
        files.config_value({"k": value}, "k", kind, below=10)
    assert str(err.value) == message


def test_config_value_defaults_paths_and_choices():
    assert files.config_value({"k": None}, "k", "size", 7) == 7 and files.config_value({}, "k", "size", None) is None
    assert files.config_value({"k": [0, 9]}, "k", "token ids", below=10) == [0, 9]
    assert files.config_value({"k": 1e-12}, "k", "positive") == 1e-12 and files.config_value({"k": 3}, "k", "size") == 3
    for config, message in (({}, "a.b.k is missing; expected one of x, y"), ({"k": None}, "a.b.k is null; expected "
                            "one of x, y"), ({"k": "z"}, 'a.b.k is "z"; expected one of x, y')):
        with pytest.raises(ValueError) as err:
            files.config_value(config, "k", "name", where="a.b", choices=("x", "y"))
        assert str(err.value) == message


def config_variants(seed=0, n=240):
    """Seeded mutations of the valid test configs: one or two keys set to a hostile value or removed, and fields of
    rope_scaling changed."""
    rng = random.Random(seed)
    pool = [-1, 0, 1, 2, 3, 7, 2.0, 0.5, 1e-6, float("nan"), float("inf"), 2**40, "2", "", None, True, False, [], [1],
            [1, 2], {}, {"type": "linear"}, {"rope_type": "llama3", "factor": 2.0}, "silu", "gelu", "llama", "roberta"]
    extra = ["head_dim", "rope_scaling", "rope_parameters", "sliding_window", "use_sliding_window", "hidden_activation",
             "tie_word_embeddings", "attention_bias", "mlp_bias", "eos_token_id", "pad_token_id", "type_vocab_size",
             "position_embedding_type", "use_bidirectional_attention", "rope_theta"]
    bases = [("decoder", c) for c in DECODERS.values()] + [("encoder", BERT), ("encoder", ROBERTA)]
    for i in range(n):
        kind, config = bases[i % len(bases)]
        config = json.loads(json.dumps(config))
        for _ in range(rng.randint(1, 2)):
            key = rng.choice(sorted(config) + extra)
            if isinstance(config.get(key), dict) and config[key] and rng.random() < 0.7:  # a field inside
                config[key][rng.choice(sorted(config[key]))] = rng.choice(pool)
            elif rng.random() < 0.15:
                config.pop(key, None)
            else:
                config[key] = rng.choice(pool)
        yield kind, config


def test_config_fuzz_only_one_line_value_errors_and_accepted_configs_run(tmp_path):
    outcomes = {"loaded": 0, "refused": 0}
    path = tmp_path / "config.json"
    for i, (kind, config) in enumerate(config_variants()):
        path.write_text(json.dumps(config))
        cls = decoder.CausalLM if kind == "decoder" else encoder.Encoder
        try:
            cls.from_pretrained(tmp_path)  # no weights here: a config that passes ends in FileNotFoundError
        except ValueError as e:
            outcomes["refused"] += 1
            assert str(e).startswith(f"{path}: ") and "\n" not in str(e), f"variant {i}: {e}"
            continue
        except FileNotFoundError as e:
            assert "no weights" in str(e), f"variant {i}: {e}"
        outcomes["loaded"] += 1
        model = cls(config).eval()  # what passed must also run: built for real, it is small (sizes up to 7 or so)
        with torch.no_grad():
            model(torch.tensor([[0, 0]]) if kind == "decoder" else torch.tensor([[0]]))
            if kind == "decoder":
                model.generate(torch.tensor([[0]]), max_new_tokens=2)
    assert outcomes["refused"] > 80 and outcomes["loaded"] > 40, outcomes  # both paths were really exercised


# --- JSON files Python reads but cannot write back, or cannot read at all ---------------------------------------
def test_lone_surrogates_and_deep_nesting_are_one_line_errors_naming_the_file(tmp_path):
    path = tmp_path / "tokenizer.json"
    for text, problem in (('{"model": {"vocab": {"\\ud800": 0}}}', "a string holds a lone surrogate escape "
                                                                    "(\\ud800-\\udfff), which no UTF-8 text can hold"),
                          ('{"a": ["x\\udfff"]}', "a string holds a lone surrogate escape (\\ud800-\\udfff), which no "
                                                  "UTF-8 text can hold"),
                          ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "arrays or objects nested too deeply to "
                                                                           "read")):
        path.write_text(text)
        with pytest.raises(ValueError) as err:
            files.read_json(path, "tokenizer.json")
        assert str(err.value) == f"{path} is not valid JSON ({problem}); restore the tokenizer.json from its source"
    # a surrogate pair is one character, and an escaped backslash before "ud800" is plain text: both load
    path.write_text('{"pair": "\\ud83d\\ude00", "text": "\\\\ud800"}')
    assert files.read_json(path) == {"pair": "\U0001F600", "text": "\\ud800"}
