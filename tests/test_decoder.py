"""Llama / Qwen2 / Gemma (pretrained/decoder.py) against float64 forwards written here, and greedy decoding with
the KV cache against decoding by full recomputation."""

import json

import pytest
import torch

from pretrained import decoder
from references import DECODERS, decoder_reference, decoder_weights, save_model, tied

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    out = {}
    for name, c in DECODERS.items():
        sd = decoder_weights(c)
        out[name] = (decoder.CausalLM.from_pretrained(save_model(tmp_path_factory.mktemp(name), c, sd)), sd, c)
    return out


@pytest.mark.parametrize("name", list(DECODERS))
def test_causal_lm_matches_float64_reference(decoders, name):
    model, sd, c = decoders[name]
    ids = torch.tensor([[5, 9, 13, 7, 22, 31, 4, 8, 17], [0, 0, 0, 11, 3, 44, 6, 9, 10]])
    mask = torch.tensor([[1] * 9, [0, 0, 0] + [1] * 6])
    out = model(ids, mask)
    ref = decoder_reference(sd, c, ids, mask)
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()].float(), atol=2e-5, rtol=0)
    if tied(c):
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_kv_cache_decoding_equals_uncached(decoders):
    for model, _, _ in decoders.values():
        ids = torch.tensor([[5, 9, 13, 7, 22, 31, 4, 8], [0, 0, 12, 11, 3, 44, 6, 9]])
        mask = (torch.arange(8) >= torch.tensor([[0], [2]])).long()
        full = model(ids, mask)
        cache = decoder.KVCache()
        steps = [model(ids[:, :4], mask[:, :4], cache)]  # a prefill, then one token at a time
        for t in range(4, 8):
            steps.append(model(ids[:, t:t + 1], mask[:, :t + 1], cache))
        assert len(cache) == 8
        torch.testing.assert_close(torch.cat(steps, 1)[mask.bool()], full[mask.bool()], atol=1e-5, rtol=0)


def greedy_reference(sd, c, prompt, n, eos=None):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(decoder_reference(sd, c, torch.tensor([ids]))[0, -1].argmax()))
        if ids[-1] == eos:
            break
    return ids[len(prompt):]


def test_left_padded_batch_generation_equals_per_row(decoders):
    model, sd, c = decoders["llama-gqa-untied"]
    prompts = [[5, 9, 13, 7, 22], [11, 3], [40, 41, 42, 43]]
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    batch = model.generate(ids, mask, max_new_tokens=6, eos_token_id=[])
    assert batch.shape == (3, 6)
    for row, p in zip(batch.tolist(), prompts, strict=True):
        assert row == model.generate(torch.tensor([p]), max_new_tokens=6, eos_token_id=[])[0].tolist()
        assert row == greedy_reference(sd, c, p, 6)  # and greedy by full float64 recomputation


def test_no_attention_row_is_fully_masked_with_left_padding(decoders):
    """A fully masked row is -inf everywhere once fp16 autocast rounds finfo(fp32).min, so its softmax is NaN and
    0 * NaN reaches the real rows (on CUDA): every query, padding included, must see at least one key."""
    model, _, _ = decoders["llama-gqa-untied"]
    seen = []
    hook = model.model.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[3]))
    ids, mask = torch.tensor([[0, 0, 0, 5, 9], [4, 5, 6, 7, 8]]), torch.tensor([[0, 0, 0, 1, 1], [1] * 5])
    model(ids, mask)
    hook.remove()
    allowed = seen[0] == 0
    assert allowed.any(-1).all()
    # and the real rows still see exactly the causal, non-padding keys
    assert allowed[0, 0, 3:, :3].sum() == 0 and allowed[0, 0, 4].tolist() == [False, False, False, True, True]


def test_generation_stops_at_eos_per_row(decoders):
    model, sd, c = decoders["qwen2-bias-tied"]
    prompts = [[5, 9, 13, 7, 22], [11, 3, 8]]
    ids = torch.tensor([p if len(p) == 5 else [0, 0] + p for p in prompts])
    mask = (ids != 0).long()
    free = model.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    eos = int(free[0, 2])  # make row 0's third token the EOS
    got = model.generate(ids, mask, max_new_tokens=8, eos_token_id=eos)
    expected = []
    for p in prompts:
        row = greedy_reference(sd, c, p, 8, eos=eos)
        expected.append(row + [c["pad_token_id"]] * (8 - len(row)))  # finished rows are padded
    width = max(len(greedy_reference(sd, c, p, 8, eos=eos)) for p in prompts)
    assert got.tolist() == [r[:width] for r in expected] and got.shape[1] == width
    alone = model.generate(ids[:1], mask[:1], max_new_tokens=8, eos_token_id=eos)
    assert alone.tolist() == [greedy_reference(sd, c, prompts[0], 8, eos=eos)] and alone.shape[1] <= 3  # stops early


def test_gemma_greedy_generation_equals_the_reference(decoders):
    model, sd, c = decoders["gemma-mqa-head-dim"]
    prompts = [[5, 9, 13, 7, 22], [11, 3]]
    ids = torch.tensor([prompts[0], [0, 0, 0] + prompts[1]])
    got = model.generate(ids, (ids != 0).long(), max_new_tokens=6, eos_token_id=[])
    assert got.tolist() == [greedy_reference(sd, c, p, 6) for p in prompts]  # cached, left-padded == recomputed
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (4 * 16, 32)  # heads x head_dim, not hidden


def test_gemma_bf16_rounds_where_the_reference_does(tmp_path):
    c = DECODERS["gemma-mqa-head-dim"]
    model = decoder.CausalLM.from_pretrained(save_model(tmp_path / "g", c, decoder_weights(c)), dtype=torch.bfloat16)
    seen = {}
    model.model.layers[0].register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    ids = torch.tensor([[5, 9, 13]])
    model(ids)
    # the scale sqrt(32) = 5.6568... is itself rounded to bf16 (5.65625) before the product, as in transformers
    scale = torch.tensor(5.65625, dtype=torch.bfloat16)
    assert torch.equal(seen["x"], model.model.embed_tokens.weight[ids] * scale)
    # the norm applies (1 + w) in fp32 and rounds once; rounding first (Llama's order) differs in bf16
    x = torch.randn(4, 32).bfloat16()
    norm = model.model.norm
    h = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)
    once = (h * (1 + norm.weight.double())).to(torch.bfloat16)
    assert (norm(x).double() - once.double()).abs().max() <= 2 ** -7 * once.double().abs().max()
    assert not torch.equal(norm(x), h.to(torch.bfloat16) * (1 + norm.weight))


def test_decoder_names_dtypes_and_config_errors(tmp_path, decoders):
    model = decoders["llama-gqa-untied"][0]
    names = {n for n, _ in model.named_modules()}
    assert {"model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",
            "model.layers.0.input_layernorm", "model.norm", "lm_head"} <= names
    c, sd = DECODERS["llama-gqa-untied"], decoders["llama-gqa-untied"][1]
    folder = save_model(tmp_path / "bf16", c, sd)
    half = decoder.CausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    ids = torch.tensor([[5, 9, 13, 7]])
    assert (half(ids).float() - model(ids)).abs().max() < 0.25  # bf16 runs and stays close
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
        yarn = dict(c, rope_scaling={"type": "yarn", "factor": 2.0})
        decoder.CausalLM.from_pretrained(save_model(tmp_path / "yarn", yarn, sd))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        decoder.CausalLM.from_pretrained(save_model(tmp_path / "gpt2", dict(c, model_type="gpt2"), sd))
    with pytest.raises(ValueError, match=r"missing keys \['lm_head.weight'\]"):  # untied needs its own head
        headless = {k: v for k, v in sd.items() if k != "lm_head.weight"}
        decoder.CausalLM.from_pretrained(save_model(tmp_path / "nohead", c, headless))


def test_configs_that_attend_otherwise_are_refused_by_their_key(tmp_path, decoders):
    """A config that makes transformers attend otherwise than causally over the whole past would load here and give
    other logits without a word; it is refused with one line that names the key. Set to false, it loads as usual."""
    c, sd = DECODERS["gemma-mqa-head-dim"], decoders["gemma-mqa-head-dim"][1]
    with pytest.raises(ValueError) as err:
        decoder.CausalLM.from_pretrained(save_model(tmp_path / "bidi", dict(c, use_bidirectional_attention=True), sd))
    assert str(err.value) == (f"{tmp_path / 'bidi' / 'config.json'}: Gemma with use_bidirectional_attention=true is "
                              "not supported (this decoder is causal)")
    off = dict(c, use_bidirectional_attention=False)
    causal = decoder.CausalLM.from_pretrained(save_model(tmp_path / "causal", off, sd))
    ids = torch.tensor([[5, 9, 13, 7, 22]])
    torch.testing.assert_close(causal(ids), decoder_reference(sd, c, ids).float(), atol=2e-5, rtol=0)
    # the same refusal for Qwen2's sliding window; off, Qwen2 is plain causal attention
    q, qsd = DECODERS["qwen2-bias-tied"], decoders["qwen2-bias-tied"][1]
    with pytest.raises(ValueError) as err:
        decoder.CausalLM.from_pretrained(save_model(tmp_path / "window", dict(q, use_sliding_window=True,
                                                                               sliding_window=2), qsd))
    assert str(err.value) == (f"{tmp_path / 'window' / 'config.json'}: Qwen2 with use_sliding_window=true is not "
                              "supported")
    plain = decoder.CausalLM.from_pretrained(save_model(tmp_path / "nowindow", dict(q, use_sliding_window=False), qsd))
    torch.testing.assert_close(plain(ids), decoder_reference(qsd, q, ids).float(), atol=2e-5, rtol=0)


# --- malformed config.json: one line naming the file, the key, the value and what was expected -------------------
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
               "original_max_position_embeddings": 16}
DROP = object()  # in a case's changes: remove the key
BAD_DECODER_CONFIGS = [  # (base config, changes, the message after "<path>: ")
    ("llama-gqa-untied", {"num_hidden_layers": "6"},
     'num_hidden_layers is "6" (a string); expected a positive integer'),
    ("llama-gqa-untied", {"num_hidden_layers": True}, "num_hidden_layers is true (a boolean); expected a positive "
                                                      "integer"),
    ("llama-gqa-untied", {"num_hidden_layers": 2.0}, "num_hidden_layers is 2.0; expected a positive integer"),
    ("llama-gqa-untied", {"hidden_size": 0}, "hidden_size is 0; expected a positive integer"),
    ("llama-gqa-untied", {"intermediate_size": DROP}, "intermediate_size is missing; expected a positive integer"),
    ("llama-gqa-untied", {"vocab_size": 2**40}, "vocab_size is 1099511627776; expected a positive integer below "
                                                "2147483648"),
    ("llama-gqa-untied", {"num_attention_heads": [4]}, "num_attention_heads is [4] (a list); expected a positive "
                                                       "integer"),
    ("llama-gqa-untied", {"num_key_value_heads": "2"}, 'num_key_value_heads is "2" (a string); expected a positive '
                                                       "integer"),
    ("llama-gqa-untied", {"model_type": None}, "model_type is null; expected a string"),
    ("llama-gqa-untied", {"model_type": DROP}, "model_type is missing; expected a string"),
    ("llama-gqa-untied", {"model_type": ["llama"]}, 'model_type is ["llama"] (a list); expected a string'),
    ("llama-gqa-untied", {"head_dim": -8}, "head_dim is -8; expected a positive integer"),
    ("llama-gqa-untied", {"head_dim": 7}, "the head size 7 (head_dim, else hidden_size / num_attention_heads) is odd; "
                                          "RoPE turns pairs of dimensions"),
    ("llama-gqa-untied", {"hidden_size": 36, "num_attention_heads": 4, "num_key_value_heads": 4},
     "the head size 9 (head_dim, else hidden_size / num_attention_heads) is odd; RoPE turns pairs of dimensions"),
    ("llama-gqa-untied", {"hidden_size": 30}, "hidden_size 30 is not a multiple of num_attention_heads 4"),
    ("llama-gqa-untied", {"rms_norm_eps": "1e-6"}, 'rms_norm_eps is "1e-6" (a string); expected a positive number'),
    ("llama-gqa-untied", {"rms_norm_eps": float("nan")}, "rms_norm_eps is NaN; expected a positive number"),
    ("llama-gqa-untied", {"rms_norm_eps": None}, "rms_norm_eps is null; expected a positive number"),
    ("llama-gqa-untied", {"rms_norm_eps": DROP}, "rms_norm_eps is missing; expected a positive number"),
    ("llama-gqa-untied", {"rope_theta": -1}, "rope_theta is -1; expected a positive number"),
    ("llama-gqa-untied", {"rope_theta": float("inf")}, "rope_theta is Infinity; expected a positive number"),
    ("llama-gqa-untied", {"rope_scaling": "linear"}, 'rope_scaling is "linear" (a string); expected an object'),
    ("llama-gqa-untied", {"rope_scaling": {"type": "linear"}}, "rope_scaling.factor is missing; expected a positive "
                                                               "number"),
    ("llama-gqa-untied", {"rope_scaling": dict(LLAMA3_ROPE, factor="4")},
     'rope_scaling.factor is "4" (a string); expected a positive number'),
    ("llama-gqa-untied", {"rope_scaling": {k: v for k, v in LLAMA3_ROPE.items() if k != "low_freq_factor"}},
     "rope_scaling.low_freq_factor is missing; expected a positive number"),
    ("llama-gqa-untied", {"rope_scaling": dict(LLAMA3_ROPE, original_max_position_embeddings=16.5)},
     "rope_scaling.original_max_position_embeddings is 16.5; expected a positive integer"),
    ("llama-gqa-untied", {"rope_scaling": dict(LLAMA3_ROPE, high_freq_factor=1.0)},
     "rope_scaling.high_freq_factor is 1.0; expected a number above rope_scaling.low_freq_factor (1.0)"),
    ("llama-gqa-untied", {"rope_scaling": {"rope_type": 3}}, "rope_scaling.rope_type is 3; expected a string"),
    ("llama-gqa-untied", {"rope_parameters": {"rope_type": "linear", "factor": 0, "rope_theta": 10000.0}},
     "rope_parameters.factor is 0; expected a positive number"),
    ("llama-gqa-untied", {"rope_theta": DROP, "rope_parameters": {"rope_theta": "1e4"}},
     'rope_parameters.rope_theta is "1e4" (a string); expected a positive number'),
    ("llama-gqa-untied", {"hidden_act": 1}, "hidden_act is 1; expected a string"),
    ("llama-gqa-untied", {"tie_word_embeddings": "false"}, 'tie_word_embeddings is "false" (a string); expected true '
                                                          "or false"),
    ("llama-gqa-untied", {"attention_bias": 1}, "attention_bias is 1; expected true or false"),
    ("llama-gqa-untied", {"mlp_bias": "no"}, 'mlp_bias is "no" (a string); expected true or false'),
    ("llama-gqa-untied", {"eos_token_id": 50}, "eos_token_id is 50; expected a token id from 0 to 49, or a non-empty "
                                               "list of them"),
    ("llama-gqa-untied", {"eos_token_id": [1, "2"]}, 'eos_token_id is [1, "2"] (a list); expected a token id from 0 '
                                                     "to 49, or a non-empty list of them"),
    ("llama-gqa-untied", {"eos_token_id": []}, "eos_token_id is [] (a list); expected a token id from 0 to 49, or a "
                                               "non-empty list of them"),
    ("llama-gqa-untied", {"pad_token_id": -1}, "pad_token_id is -1; expected a token id from 0 to 49"),
    ("mistral-window-3", {"sliding_window": 0}, "sliding_window is 0; expected a positive integer"),
    ("mistral-window-3", {"sliding_window": "3"}, 'sliding_window is "3" (a string); expected a positive integer'),
    ("qwen2-bias-tied", {"use_sliding_window": "no"}, 'use_sliding_window is "no" (a string); expected true or false'),
    ("gemma-mqa-head-dim", {"use_bidirectional_attention": 0}, "use_bidirectional_attention is 0; expected true or "
                                                               "false"),
    ("gemma-mqa-head-dim", {"hidden_activation": ["gelu"]}, 'hidden_activation is ["gelu"] (a list); expected a '
                                                            "string"),
]


@pytest.mark.parametrize("base,changes,message", BAD_DECODER_CONFIGS)
def test_malformed_config_is_one_line_naming_file_key_and_value(tmp_path, base, changes, message):
    config = {k: v for k, v in dict(DECODERS[base], **changes).items() if v is not DROP}
    tmp_path.joinpath("config.json").write_text(json.dumps(config))  # no weights: the config is refused first
    with pytest.raises(ValueError) as err:
        decoder.CausalLM.from_pretrained(tmp_path)
    assert str(err.value) == f"{tmp_path / 'config.json'}: {message}"
    with pytest.raises(ValueError) as err:  # built directly, the config is checked just the same
        decoder.CausalLM(config)
    assert str(err.value) == message


def test_null_optional_keys_and_the_transformers_5_rope_spelling_load_as_before(tmp_path, decoders):
    """transformers writes null for an optional key it has no value for, and transformers 5 moves rope_theta and
    rope_scaling into rope_parameters: both load to the same model as the plain config."""
    c, sd = DECODERS["llama-gqa-untied"], decoders["llama-gqa-untied"][1]
    nulls = dict(c, head_dim=None, rope_scaling=None, sliding_window=None, pad_token_id=None, attention_bias=None,
                 mlp_bias=None)
    v5 = {k: v for k, v in c.items() if k != "rope_theta"}
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": c["rope_theta"]}
    ids = torch.tensor([[5, 9, 13, 7, 22]])
    for name, config in (("nulls", nulls), ("v5", v5)):
        model = decoder.CausalLM.from_pretrained(save_model(tmp_path / name, config, sd))
        torch.testing.assert_close(model(ids), decoder_reference(sd, c, ids).float(), atol=2e-5, rtol=0)
    g, gsd = DECODERS["llama-bias-mha-llama3-rope"], decoder_weights(DECODERS["llama-bias-mha-llama3-rope"])
    v5 = {k: v for k, v in g.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = dict(g["rope_scaling"], rope_theta=g["rope_theta"])
    model = decoder.CausalLM.from_pretrained(save_model(tmp_path / "llama3-v5", v5, gsd))
    torch.testing.assert_close(model(ids), decoder_reference(gsd, g, ids).float(), atol=2e-5, rtol=0)


# --- loading into 4 bits (quantize="nf4", pretrained/nf4.py) ------------------------------------------------------

@pytest.mark.parametrize("name", list(DECODERS))
def test_nf4_loading_gives_the_model_of_its_dequantized_weights(tmp_path, name):
    """Every decoder loads into 4 bits (biases, tied heads and Gemma's norms included): the blocks' linears become
    NF4Linear layers, the rest stays as loaded, and the logits are the float64 reference's for the dequantized
    weights."""
    from pretrained.nf4 import NF4Linear
    c, sd = DECODERS[name], decoder_weights(DECODERS[name])
    model = decoder.CausalLM.from_pretrained(save_model(tmp_path, c, sd), quantize="nf4")
    layers = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert len(layers) == 7 * c["num_hidden_layers"] and all(k.startswith("model.layers.") for k in layers)
    assert all(torch.equal(m.bias, sd[k[:-len("weight")] + "bias"]) for k, m in layers.items() if m.bias is not None)
    dequantized = dict(sd, **{k: m.dequantize(torch.float64) for k, m in layers.items()})
    ids, mask = torch.tensor([[5, 9, 13, 7, 22, 31], [0, 0, 11, 3, 44, 6]]), torch.tensor([[1] * 6, [0, 0] + [1] * 4])
    with torch.no_grad():
        out = model(ids, mask)[mask.bool()]
    torch.testing.assert_close(out, decoder_reference(dequantized, c, ids, mask)[mask.bool()].float(), atol=2e-5,
                               rtol=0)


def test_nf4_loading_reads_every_checkpoint_format_alike(tmp_path, decoders):
    """A sharded safetensors checkpoint and a pytorch_model.bin load into the same 4-bit model as model.safetensors,
    and a checkpoint that does not fit is refused before anything is quantized, as the 16-bit load refuses it."""
    import re

    from references import write_by_hand
    c, sd = DECODERS["llama-gqa-untied"], decoders["llama-gqa-untied"][1]
    single = decoder.CausalLM.from_pretrained(save_model(tmp_path / "single", c, sd), quantize="nf4").state_dict()
    sharded = tmp_path / "sharded"
    save_model(sharded, c, {})
    (sharded / "model.safetensors").unlink()
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[:9], "model-00002-of-00002.safetensors": names[9:]}
    for shard, keys in shards.items():
        write_by_hand(sharded / shard, {k: sd[k] for k in keys})
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
    for folder in (sharded, save_model(tmp_path / "bin", c, sd, fmt="bin")):
        loaded = decoder.CausalLM.from_pretrained(folder, quantize="nf4").state_dict()
        assert loaded.keys() == single.keys() and all(torch.equal(loaded[k], single[k]) for k in single)
    wrong = dict(sd, **{"model.layers.1.self_attn.k_proj.weight": sd["model.layers.1.self_attn.k_proj.weight"].T})
    folder = save_model(tmp_path / "shape", c, wrong)
    with pytest.raises(ValueError, match=rf"{re.escape(str(folder))}: model.layers.1.self_attn.k_proj.weight has "
                                         r"shape \(32, 16\), its config.json implies \(16, 32\)"):
        decoder.CausalLM.from_pretrained(folder, quantize="nf4")
    folder = save_model(tmp_path / "headless", c, {k: v for k, v in sd.items() if k != "lm_head.weight"})
    with pytest.raises(ValueError, match=r"missing keys \['lm_head.weight'\]"):
        decoder.CausalLM.from_pretrained(folder, quantize="nf4")


def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_fewer_activations():
    """Recomputing each layer in the backward (QLoRA's --gradient_checkpointing) changes memory, not numbers: the
    same theta_d gradient in float64, with adapter dropout on (the recomputation must replay the same masks), while
    far fewer tensors are kept for the backward."""
    import unilora
    c = DECODERS["llama-gqa-untied"]
    ids = torch.tensor([[5, 9, 13, 7, 22, 31, 4, 8, 17], [0, 0, 0, 11, 3, 44, 6, 9, 10]])
    mask = torch.tensor([[1] * 9, [0, 0, 0] + [1] * 6])
    grads, kept = [], []
    for recompute in (False, True):
        model = decoder.CausalLM(c).double()
        model.load_state_dict({k: v.double() for k, v in decoder_weights(c).items()}, strict=False)
        adapter = unilora.apply_unilora(model, d=64, dropout=0.3, seed=1)
        model.train()
        model.gradient_checkpointing = recompute
        saved = []
        torch.manual_seed(7)  # the dropout masks
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = model(ids, mask).logsumexp(-1).mean()
        loss.backward()
        grads.append(next(iter(adapter.parameters())).grad.clone())
        kept.append(sum(saved))
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-12)
    assert grads[0].abs().sum() > 0
    assert kept[1] < kept[0] / 2  # the layers' insides are not kept (measured: an eighth)
