"""The --method switch (recipes/adapters.py): one call builds Uni-LoRA or LoRA, new or read back from a saved
adapter.pt, or nothing; merging for evaluation keeps the model's outputs."""
import contextlib
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from recipes.adapters import AdapterSettings, build_adapter, merge_for_eval

torch.set_num_threads(1)


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(query=nn.Linear(8, 8), value=nn.Linear(8, 8), classifier=nn.Linear(8, 2)))


@pytest.mark.parametrize("method", ["unilora", "lora"])
def test_a_saved_adapter_is_built_again_from_its_file(tmp_path, method):
    settings = AdapterSettings(method, d=16, r=2, seed=3, targets=("query", "value"), projection="balanced")
    model = tiny_model()
    adapter = build_adapter(model, settings, keep_trainable=("classifier",))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("classifier.")} == {"classifier.weight", "classifier.bias"}
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn_like(p))
    adapter.save(tmp_path / "adapter.pt")
    x = torch.randn(3, 8)
    again = tiny_model()
    build_adapter(again, settings, saved=tmp_path / "adapter.pt", keep_trainable=("classifier",))
    torch.testing.assert_close(again(x), model(x))
    merged, gap = merge_for_eval(model, adapter, x, contextlib.nullcontext)
    assert gap < 1e-5 and {type(m) for m in merged.modules()} == {nn.Sequential, nn.Linear}  # plain layers again


def test_methods_without_an_adapter_get_none():
    for method in ("head", "none"):
        assert build_adapter(tiny_model(), AdapterSettings(method)) is None
