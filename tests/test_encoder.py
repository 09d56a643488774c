"""BERT / RoBERTa (pretrained/encoder.py) against a float64 forward written here with explicit loops and softmax,
under Hugging Face's names (equality with `transformers` itself is checked outside the project)."""

import json

import pytest
import torch

from pretrained import encoder
from pretrained.files import load_config
from references import BERT, ROBERTA, encoder_reference, encoder_weights, save_model

torch.set_num_threads(1)


def test_bert_matches_float64_reference_with_padding_and_token_types(tmp_path):
    sd = encoder_weights(BERT)
    model = encoder.Encoder.from_pretrained(save_model(tmp_path / "bert", BERT, sd))
    ids = torch.tensor([[2, 7, 9, 11, 3, 5, 8], [2, 4, 6, 3, 0, 0, 0]])
    mask = (ids != 0).long()
    types = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 0, 0, 0]])
    out = model(ids, mask, types)
    ref = encoder_reference(sd, BERT, ids, mask, types)
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()].float(), atol=1e-5, rtol=0)
    w = {k: v.double() for k, v in sd.items()}
    pooled = torch.tanh(ref[:, 0] @ w["pooler.dense.weight"].T + w["pooler.dense.bias"])
    torch.testing.assert_close(model.pooler(out), pooled.float(), atol=1e-5, rtol=0)
    assert not model.training  # from_pretrained returns eval mode (dropout off), as transformers does


def test_roberta_position_ids_and_padding(tmp_path):
    sd = encoder_weights(ROBERTA, pooler=False)
    model = encoder.Encoder.from_pretrained(save_model(tmp_path / "roberta", ROBERTA, sd))
    assert model.pooler is None
    ids = torch.tensor([[0, 5, 6, 7, 2], [0, 9, 2, 1, 1]])
    assert model.position_ids(ids).tolist() == [[2, 3, 4, 5, 6], [2, 3, 4, 1, 1]]
    mask = (ids != 1).long()
    out = model(ids, mask)
    ref = encoder_reference(sd, ROBERTA, ids, mask)
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()].float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, :3], model(ids[1:, :3])[0], atol=1e-5, rtol=0)  # padding changes nothing


def test_prefixed_checkpoints_with_heads_and_legacy_names(tmp_path):
    sd = encoder_weights(ROBERTA, pooler=False)
    plain = encoder.Encoder.from_pretrained(save_model(tmp_path / "plain", ROBERTA, sd))
    mlm = {"roberta." + k: v for k, v in sd.items()}
    mlm.update({"lm_head.dense.weight": torch.randn(16, 16), "lm_head.bias": torch.randn(40),
                "roberta.embeddings.position_ids": torch.arange(24)[None]})  # a head and a harmless buffer
    prefixed = encoder.Encoder.from_pretrained(save_model(tmp_path / "mlm", ROBERTA, mlm))
    assert prefixed.state_dict().keys() == plain.state_dict().keys()
    ids = torch.tensor([[0, 4, 5, 2]])
    torch.testing.assert_close(prefixed(ids), plain(ids), atol=0, rtol=0)
    bsd = encoder_weights(BERT)  # old BERT .bin: 'bert.' prefix, LayerNorm gamma/beta
    old = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in bsd.items()}
    model = encoder.Encoder.from_pretrained(save_model(tmp_path / "old", BERT, old, fmt="bin"))
    torch.testing.assert_close(model(ids), encoder_reference(bsd, BERT, ids, torch.ones_like(ids)).float(),
                               atol=1e-5, rtol=0)


def test_hugging_face_names_and_strict_loading(tmp_path):
    sd = encoder_weights(BERT)
    names = {n for n, _ in encoder.Encoder.from_pretrained(save_model(tmp_path / "ok", BERT, sd)).named_modules()}
    assert {"embeddings.word_embeddings", "encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense",
            "encoder.layer.0.attention.output.dense", "encoder.layer.0.intermediate.dense", "pooler.dense"} <= names
    missing = {k: v for k, v in sd.items() if k != "encoder.layer.1.attention.self.key.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['encoder.layer.1.attention.self.key.bias'\]"):
        encoder.Encoder.from_pretrained(save_model(tmp_path / "missing", BERT, missing))
    extra = dict(sd, **{"encoder.layer.0.adapter.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"unexpected keys \['encoder.layer.0.adapter.weight'\]"):
        encoder.Encoder.from_pretrained(save_model(tmp_path / "extra", BERT, extra))
    with pytest.raises(ValueError, match="model_type 'distilbert' is not supported"):
        encoder.Encoder.from_pretrained(save_model(tmp_path / "distil", dict(BERT, model_type="distilbert"), sd))


# --- malformed config.json: one line naming the file, the key, the value and what was expected -------------------
DROP = object()  # in a case's changes: remove the key
BAD_ENCODER_CONFIGS = [  # (base config, changes, the message after "<path>: ")
    (BERT, {"num_hidden_layers": "6"}, 'num_hidden_layers is "6" (a string); expected a positive integer'),
    (BERT, {"model_type": None}, "model_type is null; expected a string"),
    (BERT, {"model_type": "distilbert"}, "model_type 'distilbert' is not supported by Encoder (supported: bert, "
                                         "roberta)"),
    (BERT, {"vocab_size": -1}, "vocab_size is -1; expected a positive integer"),
    (BERT, {"max_position_embeddings": None}, "max_position_embeddings is null; expected a positive integer"),
    (BERT, {"num_attention_heads": "4"}, 'num_attention_heads is "4" (a string); expected a positive integer'),
    (BERT, {"num_attention_heads": 5}, "hidden_size 16 is not a multiple of num_attention_heads 5"),
    (BERT, {"type_vocab_size": 0}, "type_vocab_size is 0; expected a positive integer"),
    (BERT, {"layer_norm_eps": 0}, "layer_norm_eps is 0; expected a positive number"),
    (BERT, {"layer_norm_eps": DROP}, "layer_norm_eps is missing; expected a positive number"),
    (BERT, {"hidden_dropout_prob": 1.5}, "hidden_dropout_prob is 1.5; expected a number from 0 to 1"),
    (BERT, {"attention_probs_dropout_prob": "0.1"}, 'attention_probs_dropout_prob is "0.1" (a string); expected a '
                                                    "number from 0 to 1"),
    (BERT, {"hidden_act": None}, "hidden_act is null; expected a string"),
    (BERT, {"hidden_act": "swish"}, "hidden_act 'swish' is not supported (gelu, relu, silu, gelu_new, "
                                    "gelu_pytorch_tanh)"),
    (BERT, {"position_embedding_type": 5}, "position_embedding_type is 5; expected a string"),
    (BERT, {"position_embedding_type": "relative_key"}, "position_embedding_type 'relative_key' is not supported "
                                                        "(only absolute)"),
    (BERT, {"pad_token_id": 40}, "pad_token_id is 40; expected a token id from 0 to 39"),
    (BERT, {"classifier_dropout": -0.1}, "classifier_dropout is -0.1; expected a number from 0 to 1"),
    (ROBERTA, {"initializer_range": "0.02"}, 'initializer_range is "0.02" (a string); expected a positive number'),
    (ROBERTA, {"pad_token_id": DROP}, "pad_token_id is missing; expected a token id from 0 to 39"),
    (ROBERTA, {"pad_token_id": True}, "pad_token_id is true (a boolean); expected a token id from 0 to 39"),
    (ROBERTA, {"pad_token_id": 23}, "pad_token_id 23 leaves no position for a token: RoBERTa numbers positions from "
                                    "pad_token_id + 1, below max_position_embeddings 24"),
]


@pytest.mark.parametrize("base,changes,message", BAD_ENCODER_CONFIGS)
def test_malformed_config_is_one_line_naming_file_key_and_value(tmp_path, base, changes, message):
    config = {k: v for k, v in dict(base, **changes).items() if v is not DROP}
    tmp_path.joinpath("config.json").write_text(json.dumps(config))  # no weights: the config is refused first
    with pytest.raises(ValueError) as err:
        encoder.Encoder.from_pretrained(tmp_path)
    assert str(err.value) == f"{tmp_path / 'config.json'}: {message}"


def test_the_glue_script_can_check_a_config_before_reading_it(tmp_path):
    """load_config(folder, encoder_settings) is what a script calls to read config.json values itself: a malformed
    file fails there, with the same line, rather than in the script's own arithmetic."""
    tmp_path.joinpath("config.json").write_text(json.dumps(dict(ROBERTA, num_hidden_layers="24")))
    with pytest.raises(ValueError) as err:
        load_config(tmp_path, encoder.encoder_settings)
    assert str(err.value) == (f"{tmp_path / 'config.json'}: num_hidden_layers is \"24\" (a string); expected a "
                              "positive integer")
    tmp_path.joinpath("config.json").write_text(json.dumps(dict(ROBERTA, position_embedding_type=None)))
    assert load_config(tmp_path, encoder.encoder_settings)["num_hidden_layers"] == 2  # null: the default, absolute
