"""save_peft_lora (pretrained/peft.py): the PEFT LoRA layout, checked by reading the files back by hand."""
import json

import numpy as np
import pytest
import torch

from pretrained import encoder, peft
from references import ROBERTA, parse_by_hand

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------ PEFT export


class FakeAdapter:
    config = {"r": 2}

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.loras = {f"encoder.layer.{i}.attention.self.{n}": (torch.randn(2, 16, generator=g),
                                                                 torch.randn(16, 2, generator=g))
                      for i in range(2) for n in ("query", "value")}

    def lora_state_dict(self):
        return self.loras


def test_save_peft_lora_writes_the_peft_layout(tmp_path):
    adapter = FakeAdapter()
    peft.save_peft_lora(adapter, tmp_path / "peft", base_model_name_or_path="FacebookAI/roberta-base",
                     prefix="base_model.model.roberta.", task_type="SEQ_CLS")
    tensors, meta, _ = parse_by_hand(tmp_path / "peft/adapter_model.safetensors")
    assert meta == {"format": "pt"}
    assert set(tensors) == {f"base_model.model.roberta.{n}.lora_{ab}.weight" for n in adapter.loras for ab in "AB"}
    for n, (A, B) in adapter.loras.items():
        np.testing.assert_array_equal(tensors[f"base_model.model.roberta.{n}.lora_A.weight"][1], A.numpy())
        np.testing.assert_array_equal(tensors[f"base_model.model.roberta.{n}.lora_B.weight"][1], B.numpy())
    cfg = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == cfg["lora_alpha"] == 2 and cfg["bias"] == "none"
    assert cfg["target_modules"] == ["query", "value"] and cfg["fan_in_fan_out"] is False
    assert cfg["base_model_name_or_path"] == "FacebookAI/roberta-base" and cfg["task_type"] == "SEQ_CLS"
    with pytest.raises(FileExistsError, match="overwrite=True"):
        peft.save_peft_lora(adapter, tmp_path / "peft")
    peft.save_peft_lora(adapter, tmp_path / "peft", overwrite=True)


class HeadAdapter(FakeAdapter):
    """An adapter handle as unilora's will be: LoRA factors plus config["keep_trainable"] (full module names) of
    modules trained in full, found under adapter.root. The root mirrors train_glue's model: `encoder` + `classifier`."""

    def __init__(self, keep=("classifier",)):
        super().__init__()
        self.loras = {"encoder." + n: ab for n, ab in self.loras.items()}
        self.root = torch.nn.Module()
        self.root.encoder = torch.nn.Linear(2, 2)
        self.root.classifier = torch.nn.ModuleDict({"dense": torch.nn.Linear(16, 16),
                                                   "out_proj": torch.nn.Linear(16, 3)})
        self.config = {"r": 2, "keep_trainable": list(keep)}


def test_save_peft_lora_exports_trained_modules_as_modules_to_save(tmp_path):
    """PEFT saves a modules_to_save entry as the module's state dict under "<prefix><module>.<key>" (it strips
    the wrapper's "modules_to_save.<adapter>." on save and adds it back on load: peft.utils.save_and_load). Checked
    outside the project with peft 0.21.2 / transformers 5.24.0: PeftModel.from_pretrained of such an export onto a
    fresh RobertaForSequenceClassification reproduces the trained model's logits (head included) within 5e-7, and
    the export without the head fails there with a KeyError for base_model.model.classifier.dense.weight."""
    adapter = HeadAdapter()
    peft.save_peft_lora(adapter, tmp_path / "peft", task_type="SEQ_CLS", rename={"encoder.": "roberta."})
    tensors, _, _ = parse_by_hand(tmp_path / "peft/adapter_model.safetensors")
    head = {f"base_model.model.classifier.{m}.{p}" for m in ("dense", "out_proj") for p in ("weight", "bias")}
    lora = {f"base_model.model.roberta.{n[len('encoder.'):]}.lora_{ab}.weight" for n in adapter.loras for ab in "AB"}
    assert set(tensors) == head | lora
    np.testing.assert_array_equal(tensors["base_model.model.classifier.out_proj.weight"][1],
                                  adapter.root.classifier.out_proj.weight.detach().numpy())
    np.testing.assert_array_equal(tensors["base_model.model.classifier.dense.bias"][1],
                                  adapter.root.classifier.dense.bias.detach().numpy())
    cfg = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["classifier"] and cfg["target_modules"] == ["query", "value"]
    peft.save_peft_lora(HeadAdapter(keep=()), tmp_path / "plain")  # nothing trained in full: nothing extra
    assert json.loads((tmp_path / "plain/adapter_config.json").read_text())["modules_to_save"] is None
    with pytest.raises(ValueError, match="'head' is not in the model"):
        peft.save_peft_lora(HeadAdapter(keep=("head",)), tmp_path / "bad")
    with pytest.raises(ValueError, match="'encoder' is trained in full and also holds LoRA layers"):
        peft.save_peft_lora(HeadAdapter(keep=("encoder",)), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # a refused export writes nothing


def test_a_trained_unilora_adapter_exports_as_an_equivalent_lora(tmp_path):
    import unilora
    torch.manual_seed(0)
    model = encoder.Encoder(ROBERTA).double().eval()
    reference = encoder.Encoder(ROBERTA).double().eval()
    reference.load_state_dict(model.state_dict())
    unadapted = encoder.Encoder(ROBERTA).double().eval()
    unadapted.load_state_dict(model.state_dict())
    adapter = unilora.apply_unilora(model, 100, targets=("query", "value"), init_bound=0.3)
    peft.save_peft_lora(adapter, tmp_path / "peft")
    tensors, _, _ = parse_by_hand(tmp_path / "peft/adapter_model.safetensors")
    with torch.no_grad():  # apply the exported file by hand: W + B A for every listed module
        for name, _, _ in adapter.config["layers"]:
            A = torch.from_numpy(tensors[f"base_model.model.{name}.lora_A.weight"][1].copy()).double()
            B = torch.from_numpy(tensors[f"base_model.model.{name}.lora_B.weight"][1].copy()).double()
            reference.get_submodule(name).weight += B @ A
    ids = torch.randint(3, ROBERTA["vocab_size"], (2, 7))
    assert torch.allclose(reference(ids), model(ids), atol=1e-6)
    assert not torch.allclose(unadapted(ids), model(ids), atol=1e-3)  # the adapter does change the outputs
