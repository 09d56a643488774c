"""The executable specification of unilora.py: each claim of the paper, checked against an independent reference.

References are built by hand here: a dense P written entry by entry from its definition, a hand-written LoRA
forward, float64 arithmetic. Run with `python -m pytest -q`.
"""
import copy
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import unilora
from unilora import apply_lora, apply_unilora, load_unilora, make_projection, merge_adapters


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.query, self.value = nn.Linear(width, width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 2 * width + 3), nn.Linear(2 * width + 3, width)

    def forward(self, x):
        x = x + self.value(x) * torch.sigmoid(self.query(x))
        return x + self.down(F.gelu(self.up(x)))


class Tiny(nn.Module):
    """Layers of mixed shapes, nested names, and a head that must never be adapted by default."""

    def __init__(self, width=12, depth=2, classes=3, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(5, width)
        self.blocks = nn.ModuleList([Block(width) for _ in range(depth)])
        self.classifier = nn.Linear(width, classes)
        self.to(dtype)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.classifier(x)


def dense_P(adapter):
    """P written entry by entry from the paper's definition: one nonzero per row, s_i / sqrt(n_j)."""
    c = adapter.config
    column, sign = columns_and_signs(c)
    counts = [0] * c["d"]
    for j in column.tolist():
        counts[j] += 1
    P = torch.zeros(c["D"], c["d"], dtype=torch.float64)
    for i, j in enumerate(column.tolist()):
        P[i, j] = int(sign[i]) / math.sqrt(counts[j])
    return P


def columns_and_signs(config):
    """Unfold the signed index: row i has its nonzero in column idx_i mod d, negative iff idx_i >= d."""
    idx = make_projection(config["D"], config["d"], config["seed"], config["signs"]).long()
    return idx % config["d"], 1 - 2 * (idx >= config["d"]).long()


def layer_rows(adapter):
    """Row ranges of theta_D per layer: [A row-major, B row-major], layers in model order."""
    out, offset = {}, 0
    for name, n_in, n_out in adapter.config["layers"]:
        size = adapter.config["r"] * (n_in + n_out)
        out[name] = (offset, offset + size)
        offset += size
    return out


def hand_lora(x, W, b, A, B):
    return x @ W.T + b + (x @ A.T) @ B.T


# ---------------------------------------------------------------- the projection


@pytest.mark.parametrize("signs", [True, False])
def test_P_is_an_isometry(signs):
    model = Tiny(dtype=torch.float64)
    adapter = apply_unilora(model, 97, signs=signs, seed=3)
    P = dense_P(adapter)
    assert torch.allclose(P.T @ P, torch.eye(97, dtype=torch.float64), atol=1e-12)
    x = torch.randn(97, dtype=torch.float64)
    assert torch.allclose((P @ x).norm(), x.norm(), rtol=1e-12)
    assert (P != 0).sum(dim=1).eq(1).all()
    assert ((P < 0).any()) == signs  # the paper's P (signs=False) is all positive


@pytest.mark.parametrize("signs", [True, False])
def test_gather_is_P_theta_and_scatter_is_P_transpose_g(signs):
    model = Tiny(dtype=torch.float64)
    adapter = apply_unilora(model, 61, signs=signs)
    P = dense_P(adapter)
    theta_D = adapter.project()
    assert torch.allclose(theta_D, P @ adapter.theta_d.detach(), atol=1e-14)
    g = torch.randn(adapter.config["D"], dtype=torch.float64)
    (theta_D * g).sum().backward()
    assert torch.allclose(adapter.theta_d.grad, P.T @ g, atol=1e-12)


def test_layer_slices_are_A_then_B_in_model_order():
    model = Tiny(dtype=torch.float64)
    adapter = apply_unilora(model, 40, r=3)
    theta_D = adapter.project().detach()
    for name, (start, stop) in layer_rows(adapter).items():
        A, B = model.get_submodule(name).lora_factors()
        assert torch.equal(theta_D[start:stop], torch.cat([A.flatten(), B.flatten()]))
        assert A.shape == (3, model.get_submodule(name).in_features)
        assert B.shape == (model.get_submodule(name).out_features, 3)
    assert [n for n, _, _ in adapter.config["layers"]] == [
        n for n, m in model.named_modules() if isinstance(m, unilora.UniLoRALinear)]


@pytest.mark.parametrize("D,d", [(1000, 7), (1000, 1000), (997, 100), (12, 5), (5, 1)])
def test_assignment_is_balanced_and_uses_every_column(D, d):
    column, _ = columns_and_signs({"D": D, "d": d, "seed": 1, "signs": True})
    counts = torch.bincount(column, minlength=d)
    assert counts.min() >= D // d and counts.max() <= -(-D // d)
    assert (counts > 0).all() and counts.sum() == D


def test_scale_columns_matches_the_counts():
    for D, d in [(1000, 7), (997, 100), (64, 64)]:
        column, _ = columns_and_signs({"D": D, "d": d, "seed": 0, "signs": True})
        counts = torch.bincount(column, minlength=d).double()
        theta = torch.randn(d, dtype=torch.float64)
        assert torch.allclose(unilora.scale_columns(theta, D), theta / counts.sqrt(), atol=1e-15)


def test_projection_is_global_every_layer_spans_all_of_theta_d():
    model = Tiny(width=24)
    d = 200
    adapter = apply_unilora(model, d)
    for name, m in adapter.layers():
        hist = torch.bincount(m.idx.long() % d * 8 // d, minlength=8)
        assert (hist > 0).all(), f"{name} draws on only part of theta_d: {hist.tolist()}"


def test_signs_are_balanced_plus_minus_one():
    _, sign = columns_and_signs({"D": 20000, "d": 100, "seed": 0, "signs": True})
    assert set(sign.unique().tolist()) == {-1, 1}
    assert abs(sign.float().mean().item()) < 0.03
    _, sign = columns_and_signs({"D": 20000, "d": 100, "seed": 0, "signs": False})
    assert (sign == 1).all()


def test_same_seed_same_P_other_seed_other_P():
    a = apply_unilora(Tiny(), 50, seed=7).config["fingerprint"]
    b = apply_unilora(Tiny(), 50, seed=7).config["fingerprint"]
    c = apply_unilora(Tiny(), 50, seed=8).config["fingerprint"]
    assert a == b != c
    assert torch.equal(make_projection(500, 40, seed=7), make_projection(500, 40, seed=7))
    assert not torch.equal(make_projection(500, 40, seed=7), make_projection(500, 40, seed=8))


@pytest.mark.parametrize("signs", [True, False])
def test_one_sgd_step_moves_each_entry_by_the_signed_group_mean(signs):
    model = Tiny(dtype=torch.float64)
    adapter = apply_unilora(model, 53, signs=signs)
    x = torch.randn(9, 5, dtype=torch.float64)
    model(x).pow(2).sum().backward()
    # The full-space gradient g = dL/dtheta_D, from a hand-written LoRA model with the same A and B as leaves.
    factors = {name: tuple(t.detach().requires_grad_() for t in layer.lora_factors()) for name, layer in adapter.layers()}

    def hand_forward(inp):
        def lin(name, t):
            base = model.get_submodule(name).base
            return hand_lora(t, base.weight, base.bias, *factors[name])
        h = lin("inp", inp)
        for i in range(2):
            p = f"blocks.{i}."
            h = h + lin(p + "value", h) * torch.sigmoid(lin(p + "query", h))
            h = h + lin(p + "down", F.gelu(lin(p + "up", h)))
        return h @ model.classifier.weight.T + model.classifier.bias

    hand_forward(x).pow(2).sum().backward()
    g_full = torch.cat([torch.cat([A.grad.flatten(), B.grad.flatten()]) for A, B in factors.values()])

    lr = 0.1
    before = adapter.project().detach()
    with torch.no_grad():
        adapter.theta_d.sub_(lr * adapter.theta_d.grad)
    moved = adapter.project().detach() - before

    c = adapter.config
    column, sign = columns_and_signs(c)
    s = sign.double()
    expected = torch.empty_like(moved)
    for j in range(c["d"]):
        group = (column == j).nonzero().flatten()
        expected[group] = -lr * s[group] * (s[group] * g_full[group]).mean()
    assert torch.allclose(moved, expected, atol=1e-12)


# ---------------------------------------------------------------- the layer


def test_forward_equals_hand_written_lora_float64():
    model = Tiny(dtype=torch.float64)
    reference = copy.deepcopy(model)
    adapter = apply_unilora(model, 77, r=4)
    x = torch.randn(6, 5, dtype=torch.float64)
    for name, layer in adapter.layers():
        A, B = (t.detach() for t in layer.lora_factors())
        base = reference.get_submodule(name)
        inp = torch.randn(3, base.in_features, dtype=torch.float64)
        assert torch.allclose(layer(inp), hand_lora(inp, base.weight, base.bias, A, B), atol=1e-10, rtol=0)
        assert (B @ A).abs().max() > 0  # dW is tiny but nonzero at step 0, unlike LoRA's B = 0
    assert model(x).dtype == torch.float64


def test_zero_theta_is_a_saddle_default_init_is_not():
    model = Tiny()
    adapter = apply_unilora(model, 64)
    assert adapter.theta_d.abs().max() <= 0.02 and adapter.theta_d.abs().max() > 0.01
    x = torch.randn(8, 5)
    model(x).square().mean().backward()
    grad = adapter.theta_d.grad.clone()
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    adapter.theta_d.grad = None
    with torch.no_grad():
        adapter.theta_d.zero_()
    model(x).square().mean().backward()
    assert torch.equal(adapter.theta_d.grad, torch.zeros_like(grad))


def test_only_theta_d_and_what_the_user_keeps_get_gradients():
    model = Tiny()
    adapter = apply_unilora(model, 64, keep_trainable=("classifier",))
    model(torch.randn(4, 5)).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"inp.theta_d", "classifier.weight", "classifier.bias"}
    assert [p for p in model.parameters() if p.requires_grad] == [adapter.theta_d, model.classifier.weight,
                                                                   model.classifier.bias]
    counts = adapter.counts()
    assert counts == {"d": 64, "D": adapter.config["D"], "lora_equivalent": adapter.config["D"],
                      "other_trainable": 12 * 3 + 3,
                      "frozen": sum(p.numel() for n, p in Tiny().named_parameters() if "classifier" not in n)}


def test_theta_d_is_one_shared_parameter_even_after_to():
    model = Tiny()
    adapter = apply_unilora(model, 64)
    model.to(torch.float64)
    thetas = {id(m.theta_d) for _, m in adapter.layers()}
    assert len(thetas) == 1 and adapter.theta_d.dtype == torch.float64
    assert len(list(model.parameters())) == 1 + sum(1 for _ in Tiny().parameters())
    assert "inp.idx" not in model.state_dict()  # P is regenerated from the seed, never stored


def test_dropout_applies_to_x_before_A():
    model = Tiny(dtype=torch.float64)
    apply_unilora(model, 30, dropout=0.5)
    layer = model.inp
    x = torch.randn(4, 5, dtype=torch.float64)
    A, B = (t.detach() for t in layer.lora_factors())
    torch.manual_seed(123)
    out = layer(x)
    torch.manual_seed(123)
    dropped = F.dropout(x, 0.5, training=True)
    assert torch.allclose(out, x @ layer.base.weight.T + layer.base.bias + (dropped @ A.T) @ B.T, atol=1e-12)
    model.eval()
    assert torch.allclose(layer(x), hand_lora(x, layer.base.weight, layer.base.bias, A, B), atol=1e-12)


def test_bf16_base_keeps_fp32_theta_and_returns_bf16():
    model = Tiny(dtype=torch.bfloat16)
    adapter = apply_unilora(model, 64)
    assert adapter.theta_d.dtype == torch.float32
    out = model(torch.randn(4, 5, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert adapter.theta_d.grad.dtype == torch.float32 and adapter.theta_d.grad.abs().sum() > 0


# ---------------------------------------------------------------- targets


def test_target_forms_select_the_same_layers():
    by_suffix = unilora.find_targets(Tiny(), ("query", "value"))
    by_regex = unilora.find_targets(Tiny(), r"blocks\.\d+\.(query|value)")
    by_predicate = unilora.find_targets(Tiny(), lambda n, m: n.endswith(("query", "value")))
    assert by_suffix == by_regex == by_predicate == [
        "blocks.0.query", "blocks.0.value", "blocks.1.query", "blocks.1.value"]
    default = unilora.find_targets(Tiny(), None)
    assert "classifier" not in default and "inp" in default and len(default) == 9


# ---------------------------------------------------------------- merge, save, load, export


def test_merge_equals_unmerged_and_gives_plain_linear():
    model = Tiny()
    adapter = apply_unilora(model, 64, init_bound=0.5)
    x = torch.randn(7, 5)
    before = model(x)
    merged = adapter.merge()
    assert not any(isinstance(m, unilora.UniLoRALinear) for m in merged.modules())
    assert type(merged.inp) is nn.Linear and not hasattr(merged.inp, "theta_d")
    assert torch.allclose(merged(x), before, atol=1e-5)
    assert not torch.allclose(Tiny()(x), before, atol=1e-3)  # the adapter did change the function


def test_bf16_merge_upcasts():
    model = Tiny(dtype=torch.bfloat16)
    adapter = apply_unilora(model, 64, init_bound=0.5)
    A, B = model.inp.lora_factors()
    W = model.inp.base.weight.detach().clone()
    adapter.merge()
    assert model.inp.weight.dtype == torch.bfloat16
    assert torch.equal(model.inp.weight, (W.float() + B.detach() @ A.detach()).bfloat16())


def test_save_fresh_model_load_is_bit_exact(tmp_path):
    model = Tiny()
    adapter = apply_unilora(model, 64, seed=5, signs=True)
    with torch.no_grad():
        adapter.theta_d.normal_()
    x = torch.randn(5, 5)
    path = str(tmp_path / "adapter.pt")
    adapter.save(path)
    assert os.listdir(tmp_path) == ["adapter.pt"]  # the temp file was renamed, nothing left behind
    fresh = Tiny()
    load_unilora(fresh, path)
    assert torch.equal(fresh(x), model(x))
    again = Tiny()
    apply_unilora(again, 64, seed=5).load(path)
    assert torch.equal(again(x), model(x))


def test_adapter_file_for_d_23040_is_one_vector(tmp_path):
    layers = nn.ModuleDict({f"layer{i}": nn.ModuleDict({"query": nn.Linear(768, 768), "value": nn.Linear(768, 768)})
                            for i in range(12)})
    adapter = apply_unilora(layers, 23040)
    assert adapter.config["D"] == 147456
    adapter.save(str(tmp_path / "a.pt"))
    assert os.path.getsize(tmp_path / "a.pt") < 4 * 23040 + 4096


def test_save_does_not_overwrite_without_asking(tmp_path):
    adapter = apply_unilora(Tiny(), 32)
    path = tmp_path / "a.pt"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        adapter.save(str(path))
    assert path.read_bytes() == b"precious"
    adapter.save(str(path), overwrite=True)
    assert path.read_bytes() != b"precious"


def test_lora_export_reproduces_the_adapter():
    model = Tiny(dtype=torch.float64)
    reference = copy.deepcopy(model)
    adapter = apply_unilora(model, 50, init_bound=0.3)
    exported = adapter.lora_state_dict()
    assert set(exported) == set(adapter.layer_names)
    x = torch.randn(3, 5, dtype=torch.float64)
    A, B = exported["inp"]
    assert torch.allclose(model.inp(x), hand_lora(x, reference.inp.weight, reference.inp.bias, A, B), atol=1e-12)


# ---------------------------------------------------------------- errors


def test_bad_d_and_r():
    D = apply_unilora(Tiny(), 10).config["D"]
    with pytest.raises(ValueError, match=rf"d={D + 1} must lie in \[1, D\] with D={D}"):
        apply_unilora(Tiny(), D + 1)
    with pytest.raises(ValueError, match="d=0 must lie"):
        apply_unilora(Tiny(), 0)
    with pytest.raises(ValueError, match="r=0 must be a positive integer"):
        apply_unilora(Tiny(), 10, r=0)
    with pytest.raises(ValueError, match="saddle"):
        apply_unilora(Tiny(), 10, init_bound=0)


def test_no_matching_targets_and_typos():
    with pytest.raises(ValueError, match="match no nn.Linear module .a string is a regex.*look like: inp, blocks.0.query"):
        apply_unilora(Tiny(), 10, targets="query")
    with pytest.raises(ValueError, match="match no nn.Linear module. Linear layers look like"):
        apply_unilora(Tiny(), 10, targets=lambda name, module: False)
    with pytest.raises(ValueError, match="target 'valu' matches nothing"):
        apply_unilora(Tiny(), 10, targets=("query", "valu"))
    with pytest.raises(ValueError, match="only non-Linear modules"):
        apply_unilora(Tiny(), 10, targets=("query", "blocks"))
    with pytest.raises(ValueError, match="keep_trainable entry 'head'"):
        apply_unilora(Tiny(), 10, keep_trainable=("head",))


def test_applying_twice_is_an_error():
    model = Tiny()
    apply_unilora(model, 10)
    with pytest.raises(ValueError, match="already has adapter layers"):
        apply_unilora(model, 10)
    with pytest.raises(ValueError, match="already has adapter layers"):
        apply_lora(model)


def test_loading_into_something_else_is_a_clear_error(tmp_path):
    path = str(tmp_path / "a.pt")
    apply_unilora(Tiny(), 40, r=4, seed=1).save(path)
    cases = [
        (lambda: apply_unilora(Tiny(width=16), 40, seed=1), "layers differs .entry 0: saved \\['inp', 5, 12\\]"),
        (lambda: apply_unilora(Tiny(), 40, seed=1, targets=("query",)), "layers differs"),
        (lambda: apply_unilora(Tiny(), 40, r=2, seed=1), "r differs"),
        (lambda: apply_unilora(Tiny(), 41, seed=1), "d differs"),
        (lambda: apply_unilora(Tiny(), 40, seed=2), "seed differs"),
        (lambda: apply_unilora(Tiny(), 40, seed=1, signs=False), "signs differs"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make().load(path)
    with pytest.raises(FileNotFoundError, match="no adapter file"):
        apply_unilora(Tiny(), 40, seed=1).load(str(tmp_path / "missing.pt"))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an adapter file"):
        apply_unilora(Tiny(), 40, seed=1).load(str(tmp_path / "other.pt"))
    lora_path = str(tmp_path / "lora.pt")
    apply_lora(Tiny()).save(lora_path)
    with pytest.raises(ValueError, match="holds a 'lora-adapter/1' adapter"):
        apply_unilora(Tiny(), 40, seed=1).load(lora_path)


def test_a_P_from_another_rng_is_caught(tmp_path, monkeypatch):
    path = str(tmp_path / "a.pt")
    apply_unilora(Tiny(), 40, seed=1).save(path)
    real = unilora.make_projection

    def other_rng(D, d, seed=0, signs=True):
        return real(D, d, seed, signs).roll(1)  # same sizes and counts, a different P

    monkeypatch.setattr(unilora, "make_projection", other_rng)
    with pytest.raises(ValueError, match="random number generator changed"):
        apply_unilora(Tiny(), 40, seed=1).load(path)


# ---------------------------------------------------------------- the LoRA baseline


def test_lora_baseline_is_standard_lora(tmp_path):
    model = Tiny(dtype=torch.float64)
    reference = copy.deepcopy(model)
    lora = apply_lora(model, r=2, alpha=8, targets=("query", "value"))
    x = torch.randn(4, 5, dtype=torch.float64)
    assert torch.equal(model(x), reference(x))  # B = 0 at init
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_()
    layer, base = model.blocks[0].query, reference.blocks[0].query
    h = torch.randn(3, 12, dtype=torch.float64)
    expected = hand_lora(h, base.weight, base.bias, layer.lora_A, 4.0 * layer.lora_B)
    assert torch.allclose(layer(h), expected, atol=1e-12)
    assert lora.counts()["d"] == lora.counts()["D"] == 4 * 2 * (12 + 12)  # 4 layers, r (in + out)
    path = str(tmp_path / "lora.pt")
    lora.save(path)
    out = model(x)
    fresh = Tiny(dtype=torch.float64)
    apply_lora(fresh, r=2, alpha=8, targets=("query", "value")).load(path)
    assert torch.equal(fresh(x), out)
    merge_adapters(fresh)
    assert type(fresh.blocks[0].query) is nn.Linear
    assert torch.allclose(fresh(x), out, atol=1e-12)


# ---------------------------------------------------------------- CUDA (run wherever a GPU exists)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_matches_cpu_and_to_device_after_patching():
    cpu_model = Tiny()
    cpu_adapter = apply_unilora(cpu_model, 64, init_bound=0.3)
    gpu_model = copy.deepcopy(cpu_model).to("cuda")
    gpu_adapter = unilora.UniLoRA(gpu_model, cpu_adapter.layer_names, cpu_adapter.config)
    assert gpu_adapter.theta_d.device.type == "cuda"
    x = torch.randn(8, 5)
    cpu_model(x).square().sum().backward()
    gpu_model(x.cuda()).square().sum().backward()
    assert torch.allclose(gpu_adapter.theta_d.grad.cpu(), cpu_adapter.theta_d.grad, atol=1e-4, rtol=1e-4)
    assert torch.allclose(gpu_model(x.cuda()).cpu(), cpu_model(x), atol=1e-5)


@cuda
def test_cuda_bf16_autocast_and_merge():
    model = Tiny().cuda()
    adapter = apply_unilora(model, 64, init_bound=0.3)
    x = torch.randn(8, 5, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    assert adapter.theta_d.grad.dtype == torch.float32 and adapter.theta_d.device.type == "cuda"
    reference = model(x).detach()
    adapter.merge()
    assert torch.allclose(model(x), reference, atol=1e-4)
