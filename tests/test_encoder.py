"""BERT / RoBERTa (pretrained/encoder.py) against a float64 forward written here with explicit loops and softmax,
under Hugging Face's names (equality with `transformers` itself is checked outside the project)."""

import pytest
import torch

from pretrained import encoder
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
