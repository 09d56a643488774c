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
from projections import apply_lora  # the LoRA baseline, used here to check the shared adapter handle
from unilora import apply_unilora, load_unilora, make_projection, merge_adapters


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


def test_lambda_is_counted_from_idx_and_backward_is_P_transpose():
    # A hand-made signed index over d = 4 columns: column 0 used 3 times, column 1 once (negated), column 3 twice,
    # column 2 never (its scale is 0, and its gradient too).
    idx = torch.tensor([0, 4 + 1, 0, 3, 4 + 0, 3])
    P = torch.zeros(6, 4, dtype=torch.float64)
    for i, (j, s, n) in enumerate([(0, 1, 3), (1, -1, 1), (0, 1, 3), (3, 1, 2), (0, -1, 3), (3, 1, 2)]):
        P[i, j] = s / math.sqrt(n)
    projection = unilora.IndexProjection(idx, 4)
    theta = torch.randn(4, dtype=torch.float64, requires_grad=True)
    out = projection(theta)
    assert torch.allclose(out, P @ theta.detach(), atol=1e-15, rtol=0)
    g = torch.randn(6, dtype=torch.float64)
    out.backward(g)
    assert torch.allclose(theta.grad, P.T @ g, atol=1e-15, rtol=0) and theta.grad[2] == 0
    unnormalized = unilora.IndexProjection(idx, 4, normalize=False, kind="nonorm")
    assert torch.equal(unnormalized(theta.detach()), P.sign() @ theta.detach())
    assert unnormalized.config() == {"kind": "nonorm", "normalize": False}
    assert unnormalized.fingerprint() != projection.fingerprint()
    with pytest.raises(ValueError, match="values in \\[0, 2d\\)"):
        unilora.IndexProjection(torch.tensor([0, 8]), 4)


def test_projection_is_global_every_layer_spans_all_of_theta_d():
    model = Tiny(width=24)
    d = 200
    adapter = apply_unilora(model, d)
    idx = make_projection(adapter.config["D"], d, 0, True)
    for name, (start, stop) in layer_rows(adapter).items():
        hist = torch.bincount(idx[start:stop].long() % d * 8 // d, minlength=8)
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
    assert with_grad == {"inp.shared.theta_d", "classifier.weight", "classifier.bias"}
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
    apply_unilora(again, 64, seed=5, signs=True).load(path)
    assert torch.equal(again(x), model(x))


@pytest.mark.skipif(os.name != "posix", reason="whether a pid is alive is asked with POSIX signal 0")
def test_save_cleans_the_temp_files_of_killed_saves_only(tmp_path):
    """A save killed before its rename (kill -9) leaves .NAME.HOST.tmp-PID; the next save removes those of dead
    processes of this machine, never one a live process may still be writing, nor another machine's (a shared disk:
    its pids mean nothing here)."""
    import re
    import subprocess
    import sys
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", os.uname().nodename)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # finished and reaped: its pid names no process now
    (tmp_path / f".a.pt.{host}.tmp-{dead.pid}").write_bytes(b"half a file")
    (tmp_path / f".a.pt.{host}.tmp-{os.getppid()}").write_bytes(b"being written")
    (tmp_path / f".a.pt.other-machine.tmp-{dead.pid}").write_bytes(b"another machine's")
    (tmp_path / f".b.pt.{host}.tmp-1").write_bytes(b"another file's")
    apply_unilora(Tiny(), 40).save(str(tmp_path / "a.pt"))
    assert sorted(os.listdir(tmp_path)) == sorted(["a.pt", f".a.pt.{host}.tmp-{os.getppid()}",
                                                   f".a.pt.other-machine.tmp-{dead.pid}", f".b.pt.{host}.tmp-1"])


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
        (lambda: apply_unilora(Tiny(), 40, seed=1, signs=True), "signs differs"),
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


# ---------------------------------------------------------------- one projection per pass, exactly (issue 10)


class HandAdapted:
    """The adapted model written independently, layer by layer: a copy of the base model whose targeted nn.Linear
    layers add x A^T B^T through forward hooks, (A, B) being this layer's rows of a dense P (dense_P) times a theta
    leaf of its own. Of unilora.py only the config is used (to regenerate P)."""

    def __init__(self, base_copy, adapter):
        self.model, self.r = base_copy, adapter.config["r"]
        self.theta = adapter.theta_d.detach().clone().requires_grad_()
        self.P = dense_P(adapter)
        for name, (start, stop) in layer_rows(adapter).items():
            self.model.get_submodule(name).register_forward_hook(self._hook(start, stop))

    def _hook(self, start, stop):
        def add_lora(module, inputs, out):
            flat = self.P[start:stop].to(self.theta.dtype) @ self.theta
            n_a = self.r * module.in_features
            A, B = flat[:n_a].view(self.r, -1), flat[n_a:].view(-1, self.r)
            x = inputs[0]
            return out + F.linear(F.linear(x, A.to(x.dtype)), B.to(x.dtype))
        return add_lora

    def __call__(self, *args):
        return self.model(*args)


def adapted_pair(dtype=torch.float32, d=60, **kwargs):
    model = Tiny(dtype=dtype)
    reference = copy.deepcopy(model)
    adapter = apply_unilora(model, d, init_bound=0.3, **kwargs)
    return model, adapter, HandAdapted(reference, adapter)


def close(actual, expected):
    """Equal to 1e-6 relative (fp32) or 1e-12 (fp64), measured against the largest entry."""
    tol = 1e-6 if expected.dtype == torch.float32 else 1e-12
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert (actual - expected).abs().max() <= tol * expected.abs().max(), (actual - expected).abs().max()


def count_projections(adapter):
    """Count calls of the adapter's projection (theta_D = P theta_d)."""
    projection, calls = adapter.shared.projection, [0]
    forward = projection.forward

    def counted(theta, **kwargs):
        calls[0] += 1
        return forward(theta, **kwargs)
    projection.forward = counted
    return calls


def step_side_by_side(model, theta, ref, x, optimizers=()):
    """One training step of ours and of the reference on x: equal outputs, equal gradients of theta_d, then every
    optimizer in `optimizers` steps and zeroes its gradients."""
    out, expected = model(x), ref(x)
    close(out, expected)
    out.square().mean().backward()
    expected.square().mean().backward()
    close(theta.grad, ref.theta.grad)
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad()


DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("targets", [None, ("query", "value", "up", "down")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_projection_per_pass_and_gradient_accumulation_are_exact(dtype, targets):
    model, adapter, ref = adapted_pair(dtype, targets=targets)
    calls = count_projections(adapter)
    for _ in range(3):  # three micro-batches accumulate into one gradient
        step_side_by_side(model, adapter.theta_d, ref, torch.randn(4, 5, dtype=dtype))
    assert calls[0] == 1  # all layers, three forwards and backwards, one projection: theta_d never changed


@pytest.mark.parametrize("shapes", [[(2, 3), (4, 2)] * 3,  # one layer shape, repeated
                                    [(2, 3), (4, 2), (2, 5), (3, 2)] * 2,  # a block of two layers
                                    [(2, 3), (4, 2), (2, 5), (3, 2), (1, 4), (3, 1)]])  # no repetition
def test_split_gives_consecutive_row_major_matrices_and_their_gradients_back(shapes):
    D = sum(rows * cols for rows, cols in shapes)
    theta = nn.Parameter(torch.randn(D, dtype=torch.float64))
    shared = unilora.SharedVector(theta, nn.Identity(), shapes)  # P = I: theta_D is theta itself
    pieces = [t for ab in shared.factors() for t in ab]
    weights = [torch.randn(shape, dtype=torch.float64) for shape in shapes]
    # Through .t(), the gradient that reaches each matrix is a non-contiguous (transposed) tensor.
    sum((piece.t() * w.t()).sum() for piece, w in zip(pieces, weights)).backward()
    start = 0
    for piece, w, (rows, cols) in zip(pieces, weights, shapes):
        assert torch.equal(piece, theta.detach()[start:start + rows * cols].view(rows, cols))
        assert torch.equal(theta.grad[start:start + rows * cols], w.flatten())
        start += rows * cols


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_grad_and_inference_mode_between_training_passes(dtype):
    model, adapter, ref = adapted_pair(dtype)
    x = torch.randn(4, 5, dtype=dtype)
    model(x).sum().backward()
    with torch.no_grad():
        out = model(x)
        assert out.grad_fn is None
        close(out, ref(x))
    with torch.inference_mode():
        close(model(x), ref(x))
    adapter.theta_d.grad = None
    model(x).square().sum().backward()  # back in grad mode: the graph-carrying theta_D, not an inference tensor
    ref(x).square().sum().backward()
    close(adapter.theta_d.grad, ref.theta.grad)


OPTIMIZERS = {"sgd": lambda p: torch.optim.SGD(p, lr=0.5),
              "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=0.05, foreach=True),
              "adamw-fused": lambda p: torch.optim.AdamW(p, lr=0.05, fused=True)}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_forward_after_optimizer_step_never_sees_a_stale_theta_D(optimizer):
    model, adapter, ref = adapted_pair(torch.float64)
    ours, theirs = OPTIMIZERS[optimizer](adapter.parameters()), OPTIMIZERS[optimizer]([ref.theta])
    calls = count_projections(adapter)
    for step in range(3):
        step_side_by_side(model, adapter.theta_d, ref, torch.randn(4, 5, dtype=torch.float64), (ours, theirs))
    close(adapter.theta_d.detach(), ref.theta.detach())
    assert calls[0] == 3


def test_model_to_after_a_forward_recomputes_theta_D():
    model, adapter, ref = adapted_pair(torch.float32)
    x = torch.randn(4, 5)
    model(x).sum().backward()  # the cache now holds fp32 pieces and theta_d a gradient
    model.to(torch.float64)
    assert adapter.theta_d.dtype == adapter.theta_d.grad.dtype == torch.float64
    ref.model.to(torch.float64)
    ref.theta = adapter.theta_d.detach().clone().requires_grad_()
    adapter.theta_d.grad = None
    x = x.double()
    out, expected = model(x), ref(x)
    close(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    close(adapter.theta_d.grad, ref.theta.grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_forwards_one_backward_and_two_losses_backwarded_apart(dtype):
    model, adapter, ref = adapted_pair(dtype)
    x1, x2 = torch.randn(3, 5, dtype=dtype), torch.randn(2, 5, dtype=dtype)
    (model(x1).square().sum() + model(x2).sum()).backward()
    (ref(x1).square().sum() + ref(x2).sum()).backward()
    close(adapter.theta_d.grad, ref.theta.grad)
    adapter.theta_d.grad = ref.theta.grad = None
    ours, theirs = (model(x1).square().sum(), model(x2).sum()), (ref(x1).square().sum(), ref(x2).sum())
    for a, b in zip(ours, theirs):
        a.backward()
        b.backward()
        close(adapter.theta_d.grad, ref.theta.grad)


def test_calling_an_adapted_submodule_directly():
    model, adapter, ref = adapted_pair(torch.float64)
    h = torch.randn(3, 12, dtype=torch.float64)
    out, expected = model.blocks[1](h), ref.model.blocks[1](h)
    close(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    close(adapter.theta_d.grad, ref.theta.grad)
    close(model.blocks[0].up(h), ref.model.blocks[0].up(h))


class Checkpointed(nn.Module):
    def __init__(self, block, reentrant):
        super().__init__()
        self.block, self.reentrant = block, reentrant

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=self.reentrant)


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_recomputes_the_same_theta_D(reentrant):
    model, adapter, ref = adapted_pair(torch.float64)
    theta = adapter.theta_d  # the handle's layer names change below
    for i, block in enumerate(model.blocks):
        model.blocks[i] = Checkpointed(block, reentrant)
    sgd, ref_sgd = torch.optim.SGD([theta], lr=0.5), torch.optim.SGD([ref.theta], lr=0.5)
    for step in range(2):
        step_side_by_side(model, theta, ref, torch.randn(4, 5, dtype=torch.float64), (sgd, ref_sgd))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])  # aot_eager also traces the backward, as inductor
def test_torch_compile_is_exact_and_still_projects_once_per_step(backend):
    model, adapter, ref = adapted_pair(torch.float64)
    compiled = torch.compile(model, backend=backend)
    calls = count_projections(adapter)
    sgd, ref_sgd = torch.optim.SGD([adapter.theta_d], lr=0.5), torch.optim.SGD([ref.theta], lr=0.5)
    try:
        for step in range(2):
            step_side_by_side(compiled, adapter.theta_d, ref, torch.randn(4, 5, dtype=torch.float64), (sgd, ref_sgd))
    finally:
        torch._dynamo.reset()
    assert calls[0] == 2


def graph_size(tensor):
    """The number of autograd nodes behind a tensor."""
    seen, todo = set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [next_node for next_node, _ in node.next_functions]
    return len(seen)


def test_every_graph_keeps_the_theta_D_it_was_built_with():
    """What a user sees of the per-pass cache: a training loop holds one graph of constant size (no history chained
    across steps); eval passes between a forward and its backward change nothing; a graph built before theta_d
    changed, and one kept with retain_graph and backpropagated again after later steps, give the gradient of the
    theta_d they saw."""
    model, adapter, ref = adapted_pair(torch.float64)
    sgd, ref_sgd = torch.optim.SGD([adapter.theta_d], lr=0.5), torch.optim.SGD([ref.theta], lr=0.5)
    x = torch.randn(4, 5, dtype=torch.float64)
    sizes = set()
    for step in range(3):
        loss = model(x).square().mean()
        sizes.add(graph_size(model.blocks[0].query.lora_factors()[0]))
        loss.backward(), ref(x).square().mean().backward()
        close(adapter.theta_d.grad, ref.theta.grad)
        sgd.step(), ref_sgd.step(), sgd.zero_grad(), ref_sgd.zero_grad()
    assert len(sizes) == 1

    loss, expected = model(x).square().mean(), ref(x).square().mean()
    with torch.no_grad():
        close(model(x), ref(x))
    with torch.inference_mode():
        close(model(x), ref(x))
    loss.backward(), expected.backward()
    close(adapter.theta_d.grad, ref.theta.grad)
    sgd.step(), ref_sgd.step(), sgd.zero_grad(), ref_sgd.zero_grad()

    old_loss, old_expected = model(x).square().mean(), ref(x).square().mean()
    with torch.no_grad():
        adapter.theta_d.add_(0.1), ref.theta.add_(0.1)
    loss, expected = model(x).square().mean(), ref(x).square().mean()
    (old_loss + loss).backward(), (old_expected + expected).backward()
    close(adapter.theta_d.grad, ref.theta.grad)
    sgd.zero_grad(), ref_sgd.zero_grad()

    kept, kept_ref = model(x).square().mean(), ref(x).square().mean()
    kept.backward(retain_graph=True), kept_ref.backward(retain_graph=True)
    sgd.step(), ref_sgd.step()
    model(x).sum(), ref(x).sum()  # a new pass computes a new theta_D
    sgd.zero_grad(), ref_sgd.zero_grad()
    kept.backward(), kept_ref.backward()
    close(adapter.theta_d.grad, ref.theta.grad)


def test_writes_through_data_need_refresh_and_copies_work():
    model, adapter, ref = adapted_pair(torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64)
    model(x).sum().backward()
    clone = copy.deepcopy(model)  # a cached theta_D carries a graph: it must not be copied
    assert torch.equal(clone(x), model(x))
    adapter.theta_d.data.mul_(2)  # invisible to the version counter, as the docstring says
    adapter.refresh()
    ref.theta = (2 * ref.theta).detach().requires_grad_()
    close(model(x), ref(x))


# ---------------------------------------------------------------- torch's own transformer modules (issue 9)


def dense_dW(adapter):
    """{layer name: B A} in float64, from the dense P built by hand and theta_d."""
    theta_D = dense_P(adapter) @ adapter.theta_d.detach().double()
    r, out = adapter.config["r"], {}
    for name, n_in, n_out in adapter.config["layers"]:
        start, stop = layer_rows(adapter)[name]
        flat = theta_D[start:stop]
        out[name] = flat[r * n_in:].view(n_out, r) @ flat[:r * n_in].view(r, n_in)
    return out


def torch_model(kind, batch_first):
    torch.manual_seed(0)
    layer = dict(d_model=16, nhead=4, dim_feedforward=32, dropout=0.0, batch_first=batch_first)
    if kind == "mha":
        return nn.MultiheadAttention(16, 4, batch_first=batch_first)
    if kind == "encoder_layer":
        return nn.TransformerEncoderLayer(**layer)
    if kind == "encoder":
        return nn.TransformerEncoder(nn.TransformerEncoderLayer(**layer), 2, enable_nested_tensor=False)
    return nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer), 2)


def run_torch_model(kind, model, x):
    if kind == "mha":
        return model(x, x, x)[0]
    return model(x, 0.5 * x) if kind == "decoder" else model(x)


FAST_PATH = {"mha": "_native_multi_head_attention", "encoder_layer": "_transformer_encoder_layer_fwd",
             "encoder": "_transformer_encoder_layer_fwd", "decoder": "_native_multi_head_attention"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["mha", "encoder_layer", "encoder", "decoder"])
def test_torch_transformer_modules_match_weights_plus_BA(kind, batch_first, dtype, tmp_path, monkeypatch):
    model = torch_model(kind, batch_first).to(dtype)
    unadapted = copy.deepcopy(model)
    adapter = apply_unilora(model, 64, init_bound=1.0)
    assert any(n.endswith("out_proj") for n in adapter.layer_names)  # MultiheadAttention's own Linear subclass
    reference = copy.deepcopy(unadapted)
    with torch.no_grad():
        for name, dW in dense_dW(adapter).items():
            W = reference.get_submodule(name).weight
            W.copy_((W.double() + dW).to(dtype))
    tol = 1e-5 if dtype == torch.float32 else 0.05
    x = torch.randn(3, 5, 16, dtype=dtype)

    def check(out, expected):
        assert out.dtype == dtype and (out - expected).abs().max() <= tol
        assert (run_torch_model(kind, unadapted, x) - expected).abs().max() > 5 * tol  # the adapter matters

    out = run_torch_model(kind, model, x)  # training mode
    check(out, run_torch_model(kind, reference, x))
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))  # a loss that LayerNorm cannot flatten
    (out.float() * probe).sum().backward()
    grad = adapter.theta_d.grad
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0
    if dtype == torch.float32:  # the gradient, against W + B A built from a dense P and a theta leaf by hand
        theta = adapter.theta_d.detach().clone().requires_grad_()
        theta_D = dense_P(adapter).float() @ theta
        r, weights = adapter.config["r"], {}
        for name, n_in, n_out in adapter.config["layers"]:
            start, stop = layer_rows(adapter)[name]
            flat = theta_D[start:stop]
            W = unadapted.get_submodule(name).weight
            weights[name + ".weight"] = W + flat[r * n_in:].view(n_out, r) @ flat[:r * n_in].view(r, n_in)
        hand = torch.func.functional_call(unadapted, weights, (x, x, x) if kind == "mha" else
                                          (x, 0.5 * x) if kind == "decoder" else (x,))
        ((hand[0] if kind == "mha" else hand) * probe).sum().backward()
        assert torch.allclose(grad, theta.grad, rtol=1e-4, atol=1e-4 * theta.grad.abs().max())

    for m in (model, reference, unadapted):
        m.eval()
    calls = []
    fast = getattr(torch, FAST_PATH[kind])
    monkeypatch.setattr(torch, FAST_PATH[kind], lambda *a, **k: calls.append(1) or fast(*a, **k))
    with torch.no_grad():
        check(run_torch_model(kind, model, x), run_torch_model(kind, reference, x))
    assert bool(calls) == batch_first  # torch's eval fast path read the adapted `.weight` (batch_first only)

    path = str(tmp_path / "adapter.pt")
    adapter.save(path)
    fresh = copy.deepcopy(unadapted)
    load_unilora(fresh, path)
    with torch.no_grad():
        assert torch.equal(run_torch_model(kind, fresh.eval(), x), run_torch_model(kind, model, x))
        merged = adapter.merge()
        assert not any(isinstance(m, unilora.AdaptedLinear) for m in merged.modules())
        check(run_torch_model(kind, merged, x), run_torch_model(kind, reference, x))


# ---------------------------------------------------------------- layers that cannot be adapted exactly


class FakeQuantizedLinear(nn.Linear):
    """Like the quantized Linear subclasses of common libraries: its own forward over its own storage."""

    def forward(self, x):
        return F.linear(x, self.weight.round(), self.bias)


class Int8Param(nn.Parameter):
    pass


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [(n, type(m)) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()])


def assert_unchanged(model, before):
    state, types, flags = snapshot(model)
    assert types == before[1] and flags == before[2] and state.keys() == before[0].keys()
    assert all(torch.equal(state[k], before[0][k]) for k in state)


def test_special_linear_layers_are_refused_by_name_even_under_default_targets():
    quantized = nn.Sequential(nn.Linear(4, 4), FakeQuantizedLinear(4, 4))
    int8 = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    int8[1].weight = Int8Param(int8[1].weight.detach())
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    cases = [(quantized, "cannot adapt '1': FakeQuantizedLinear replaces nn.Linear's forward"),
             (int8, "cannot adapt '1': its weight is a Int8Param .* not a plain floating nn.Parameter"),
             (tied, "cannot adapt '0': its weight is shared with another module")]
    for model, message in cases:
        before = snapshot(model)
        for apply in (lambda: apply_unilora(model, 8), lambda: apply_lora(model)):
            with pytest.raises(ValueError, match=message):
                apply()
            assert_unchanged(model, before)
    apply_unilora(quantized, 8, targets=("0",))  # left out of targets, the rest is adapted
    with pytest.raises(ValueError, match="'head.1' is inside keep_trainable module 'head'"):
        apply_unilora(WithHead(), 8, targets=("inp", "1"), keep_trainable=("head",))
    with pytest.raises(ValueError, match="cannot adapt 'out_proj': nn.MultiheadAttention reads out_proj.weight"):
        apply_unilora(nn.MultiheadAttention(8, 2), 8, dropout=0.1)


# ---------------------------------------------------------------- the file holds everything trained


class WithHead(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.mid = nn.Linear(5, 12), nn.Linear(12, 12)
        self.head = nn.Sequential(nn.BatchNorm1d(12), nn.Linear(12, 3))

    def forward(self, x):
        return self.head(F.gelu(self.mid(F.gelu(self.inp(x)))))


@pytest.mark.parametrize("method", ["unilora", "lora"])
def test_a_trained_head_and_hand_unfrozen_parameters_round_trip_bit_exactly(method, tmp_path):
    model = WithHead()
    if method == "unilora":
        adapter = apply_unilora(model, 30, keep_trainable=("head",))
    else:
        adapter = apply_lora(model, r=2, keep_trainable=("head",))
    model.mid.base.bias.requires_grad_(True)  # unfrozen by hand: trained, so saved too
    assert adapter.config["keep_trainable"] == ["head"]
    assert adapter.layer_names == ["inp", "mid"]  # default targets leave the fully trained head alone
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):  # trains theta_d / A, B, the head, its BatchNorm statistics and the hand-unfrozen bias
        model(torch.randn(8, 5)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    x = torch.randn(4, 5)
    path = str(tmp_path / "adapter.pt")
    adapter.save(path)
    saved = torch.load(path, weights_only=True)
    assert set(saved["trained"]) == {"head.0.weight", "head.0.bias", "head.0.running_mean", "head.0.running_var",
                                     "head.0.num_batches_tracked", "head.1.weight", "head.1.bias", "mid.base.bias"}
    fresh = WithHead()
    if method == "unilora":
        loaded = load_unilora(fresh, path)
    else:
        loaded = apply_lora(fresh, r=2, keep_trainable=("head",)).load(path)
    assert torch.equal(fresh.eval()(x), model(x))
    assert not torch.equal(WithHead().eval()(x), model(x))
    if method == "unilora":  # restored as saved: trainable again
        assert fresh.mid.base.bias.requires_grad and fresh.head[1].weight.requires_grad
    # what pretrained.save_peft_lora reads to export PEFT's modules_to_save
    assert [loaded.root.get_submodule(n).state_dict().keys() for n in loaded.config.get("keep_trainable", [])]


@pytest.mark.parametrize("cast,dtype", [(lambda m: m.to(torch.bfloat16), torch.float32),
                                        (lambda m: m.half(), torch.float32),
                                        (lambda m: m.bfloat16(), torch.float32),
                                        (lambda m: m.double(), torch.float64)])
def test_casting_the_model_afterwards_keeps_theta_d_fp32(cast, dtype):
    for method in ("unilora", "lora"):
        model = Tiny()
        adapter = apply_unilora(model, 64, init_bound=0.3) if method == "unilora" else apply_lora(model, r=2)
        model(torch.randn(4, 5)).square().sum().backward()
        params = adapter.parameters()
        values, grads = [p.detach().clone() for p in params], [p.grad.clone() for p in params]
        cast(model)
        for p, value, grad in zip(params, values, grads):
            assert p.dtype == p.grad.dtype == dtype
            assert torch.equal(p.detach().double(), value.double()) and torch.equal(p.grad.double(), grad.double())
            p.grad = None
        out = model(torch.randn(4, 5, dtype=model.inp.base.weight.dtype))
        assert out.dtype == model.inp.base.weight.dtype != dtype or dtype == torch.float64
        out.float().square().sum().backward()
        assert all(p.grad.dtype == dtype and p.grad.abs().sum() > 0 for p in params[-1:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_inside_autocast_is_computed_in_fp32_or_better(dtype):
    model = Tiny(dtype=dtype)
    adapter = apply_unilora(model, 64, init_bound=0.5)
    W = {name: model.get_submodule(name).base.weight.detach().double().clone() for name in adapter.layer_names}
    dW = dense_dW(adapter)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        merged = adapter.merge()
    for name in adapter.layer_names:
        weight = merged.get_submodule(name).weight
        assert weight.dtype == dtype  # an fp64 base stays fp64
        error = (weight.double() - (W[name] + dW[name])).abs().max()
        assert error <= (1e-6 if dtype == torch.float32 else 1e-14)  # bf16 would be about 1e-3


def test_the_handle_after_merge_says_it_was_merged(tmp_path):
    model = Tiny()
    adapter = apply_unilora(model, 40)
    adapter.save(str(tmp_path / "a.pt"))
    adapter.merge()
    calls = [adapter.merge, adapter.counts, adapter.parameters, adapter.lora_state_dict, adapter.project,
             lambda: adapter.theta_d, lambda: adapter.save(str(tmp_path / "b.pt")),
             lambda: adapter.load(str(tmp_path / "a.pt"))]
    apply_unilora(model, 40)  # a new adapter at the same names does not revive the old handle
    for call in calls:
        with pytest.raises(RuntimeError, match="it was merged"):
            call()
    lora = apply_lora(Tiny())
    merge_adapters(lora.root)
    with pytest.raises(RuntimeError, match="it was merged"):
        lora.parameters()


# ---------------------------------------------------------------- all or nothing, clear loader errors (issue 8)


def test_a_failed_apply_leaves_the_model_as_it_was():
    def wrong_length(sizes, d, seed, signs):
        return unilora.IndexProjection(torch.zeros(sum(sizes) - 1, dtype=torch.int32), d)

    def broken(sizes, d, seed, signs):
        raise RuntimeError("broken factory")

    cases = [(lambda m: apply_unilora(m, 10, targets=("query", "valu")), ValueError, "matches nothing"),
             (lambda m: apply_unilora(m, 0), ValueError, "d=0"),
             (lambda m: apply_unilora(m, 10 ** 6), ValueError, "must lie in"),
             (lambda m: apply_unilora(m, 10, keep_trainable=("classifier", "head")), ValueError, "'head'"),
             (lambda m: apply_unilora(m, 10, projection=wrong_length), ValueError, "projection returned"),
             (lambda m: apply_unilora(m, 10, projection=broken), RuntimeError, "broken factory"),
             (lambda m: apply_lora(m, targets="nothing"), ValueError, "match no nn.Linear"),
             (lambda m: apply_lora(m, keep_trainable=("head",)), ValueError, "'head'")]
    for apply, error, message in cases:
        model = Tiny()
        model.classifier.requires_grad_(False)
        before = snapshot(model)
        with pytest.raises(error, match=message):
            apply(model)
        assert_unchanged(model, before)


def damaged_files(tmp_path):
    """{file name: (bytes or a payload to torch.save, what the error must say)} from a good Uni-LoRA file."""
    good = tmp_path / "good.pt"
    apply_unilora(Tiny(), 40, seed=1, keep_trainable=("classifier",)).save(str(good))
    payload = torch.load(good, weights_only=True)
    config = __import__("json").loads(payload["config"])

    def with_config(**changes):
        return dict(payload, config=__import__("json").dumps({k: v for k, v in {**config, **changes}.items()
                                                              if v is not None}))
    lora = tmp_path / "lora-source.pt"
    apply_lora(Tiny()).save(str(lora))
    wide = tmp_path / "wide-source.pt"
    apply_unilora(Tiny(width=16), 40, seed=1).save(str(wide))
    return good, {
        "empty.pt": (b"", "not a readable adapter file"),
        "truncated.pt": (good.read_bytes()[:300], "not a readable adapter file"),
        "text.pt": (b"hello", "not a readable adapter file"),
        "pickled-object.pt": (__import__("pickle").dumps(nn.Linear(2, 2), protocol=2), "not a readable adapter file"),
        "lora.pt": (lora.read_bytes(), "holds a 'lora-adapter/1' adapter"),
        "wide.pt": (wide.read_bytes(), "does not fit this model"),
        "theta-shape-1.pt": (dict(payload, theta_d=torch.zeros(1)), "'theta_d' has shape \\(1,\\), this model needs \\(40,\\)"),
        "no-theta.pt": ({"config": payload["config"]}, "'theta_d' is missing"),
        "no-seed.pt": (with_config(seed=None), "lacks 'seed'"),
        "d-as-text.pt": (with_config(d="40"), "config 'd' is '40'"),
        "bad-layers.pt": (with_config(layers=[["inp", 5]]), "not \\[name, in_features, out_features\\]"),
        "not-json.pt": (dict(payload, config="{"), "not a JSON object"),
        "head-shape.pt": (dict(payload, trained={**payload["trained"], "classifier.weight": torch.zeros(2, 2)}),
                          "'classifier.weight' has shape \\(2, 2\\)"),
        "head-missing.pt": (dict(payload, trained={"classifier.bias": payload["trained"]["classifier.bias"]}),
                            "'classifier.weight' is missing"),
        "extra-tensor.pt": (dict(payload, trained={**payload["trained"], "ghost.weight": torch.zeros(2)}),
                            "ghost.weight"),
        "other-kind.pt": (with_config(projection={"kind": "fastfood"}), "'fastfood' projection"),
        "projection-as-text.pt": (with_config(projection="balanced"), "config 'projection' is 'balanced'"),
        "keep-as-number.pt": (with_config(keep_trainable=[3]), "'keep_trainable' or 'projection' is damaged"),
        "huge-seed.pt": (with_config(seed=2 ** 70), "does not fit this model"),
        "other-fingerprint.pt": (with_config(fingerprint="0" * 16), "random number generator changed"),
        "huge-r.pt": (with_config(r=4_000_000, D=4_000_000 * sum(i + o for _, i, o in config["layers"])),
                      "r=4000000 exceeds min\\(in, out\\) = 5 of layer 'inp'"),
        "wrong-D.pt": (with_config(D=123), "its config says D=123, its layers and r give D="),
        "nan-theta.pt": (dict(payload, theta_d=torch.full((40,), float("nan"))), "'theta_d' holds NaN or infinite"),
        "inf-head.pt": (dict(payload, trained={**payload["trained"], "classifier.bias": torch.full((3,), float("inf"))}),
                        "'classifier.bias' holds NaN or infinite"),
    }


def test_a_file_is_checked_against_the_model_before_P_is_built(tmp_path, monkeypatch):
    """A 2 KB file claiming r = 4,000,000 (D consistent with it) would make P hold 10^9 entries: the claim is refused
    by arithmetic on the model's layers, before anything of size D is allocated."""
    _, cases = damaged_files(tmp_path)
    built = []
    monkeypatch.setattr(unilora, "make_projection", lambda *a, **k: built.append(a) or 1 / 0)
    for name in ("huge-r.pt", "wrong-D.pt", "wide.pt"):
        torch.save(cases[name][0], tmp_path / name) if not isinstance(cases[name][0], bytes) else \
            (tmp_path / name).write_bytes(cases[name][0])
        with pytest.raises(ValueError, match=cases[name][1]):
            load_unilora(Tiny(), str(tmp_path / name))
    assert built == []
    with pytest.raises(ValueError, match="r=6 exceeds min\\(in, out\\) = 5 of layer 'inp' \\(5 -> 12\\)"):
        apply_unilora(Tiny(), 40, r=6)


def test_a_failed_load_names_the_file_and_leaves_the_model_as_it_was(tmp_path):
    good, cases = damaged_files(tmp_path)
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        model = Tiny()
        before = snapshot(model)
        with pytest.raises(ValueError, match=f"{__import__('re').escape(str(path))}.*{message}"):
            load_unilora(model, str(path))
        assert_unchanged(model, before)
        adapter = apply_unilora(model, 40, seed=1, keep_trainable=("classifier",))
        theta = adapter.theta_d.detach().clone()
        if name != "wide.pt":  # a handle of another shape gives its own message
            with pytest.raises(ValueError, match=__import__("re").escape(str(path))):
                adapter.load(str(path))
            assert torch.equal(adapter.theta_d, theta)
        adapter.merge()
        fresh = Tiny()
        load_unilora(fresh, str(good))  # the retry with the right file works
    assert len(cases) == 24


# ---------------------------------------------------------------- the projection extension point (issue 13)


def test_a_custom_projection_is_used_saved_and_must_be_passed_again(tmp_path):
    seen = []

    def rolled(sizes, d, seed, signs):
        seen.append(list(sizes))
        return unilora.IndexProjection(make_projection(sum(sizes), d, seed, signs).roll(3), d, normalize=False,
                                       kind="rolled")
    model = Tiny(dtype=torch.float64)
    reference = copy.deepcopy(model)
    adapter = apply_unilora(model, 40, projection=rolled, init_bound=0.3)
    assert seen == [[s for _, n_in, n_out in adapter.config["layers"] for s in (4 * n_in, n_out * 4)]]
    assert adapter.config["projection"] == {"kind": "rolled", "normalize": False}
    column, sign = columns_and_signs(adapter.config)
    expected = (sign * adapter.theta_d.detach()[column]).roll(3)  # signed, unscaled, rows rolled by hand
    assert torch.equal(adapter.project().detach(), expected)
    x = torch.randn(3, 5, dtype=torch.float64)
    path = str(tmp_path / "a.pt")
    adapter.save(path)
    before = snapshot(reference)
    with pytest.raises(ValueError, match="'rolled' projection: pass the same factory again"):
        load_unilora(reference, path)
    with pytest.raises(ValueError, match="projection differs"):
        load_unilora(reference, path, projection=lambda *a: unilora.IndexProjection(
            make_projection(sum(a[0]), *a[1:]).roll(3), a[1], kind="rolled"))
    assert_unchanged(reference, before)
    load_unilora(reference, path, projection=rolled)
    assert torch.equal(reference(x), model(x))


# ---------------------------------------------------------------- the README's and the docs' examples run


def test_readme_quickstart_and_your_model_examples_run(tmp_path, monkeypatch):
    """The README's quickstart and the three examples of docs/your-model.md, executed as written."""
    re, root = __import__("re"), os.path.dirname(os.path.abspath(__file__))
    monkeypatch.chdir(tmp_path)
    for name, count in (("README.md", 1), (os.path.join("docs", "your-model.md"), 3)):
        blocks = re.findall(r"```python\n(.*?)```", open(os.path.join(root, name)).read(), re.S)
        assert len(blocks) == count
        for i, block in enumerate(blocks):
            exec(compile(block, f"{name}, example {i + 1}", "exec"), {})


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


# ---------------------------------------------------------------- a quantized base (issue 23)

class Rounded(nn.Module):
    """A stand-in quantized layer keeping the is_base contract: integer codes times one step, dequantized in forward,
    `unilora_adaptable = True`. (pretrained/nf4.py's NF4Linear is the real one; this one keeps the test exact.)"""
    unilora_adaptable = True

    def __init__(self, linear: nn.Linear, step: float = 0.01):
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype, self.step = (
            linear.in_features, linear.out_features, linear.weight.dtype, step)
        self.register_buffer("codes", torch.round(linear.weight.detach() / step).to(torch.int16))
        self.bias = linear.bias.requires_grad_(False)

    def dequantize(self, dtype=None):
        return self.codes.to(dtype or self.compute_dtype) * self.step

    def forward(self, x):
        return F.linear(x, self.dequantize(x.dtype), self.bias)


def quantized_and_dense_twins():
    """Tiny in float64 with its block layers quantized, and the same network with those layers as plain nn.Linear
    holding the dequantized weights: the twin that an adapter must not tell apart."""
    quantized, dense = Tiny(dtype=torch.float64), Tiny(dtype=torch.float64)
    for block_q, block_d in zip(quantized.blocks, dense.blocks):
        for name, child in list(block_q.named_children()):
            if isinstance(child, nn.Linear):
                setattr(block_q, name, Rounded(child))
                with torch.no_grad():
                    getattr(block_d, name).weight.copy_(getattr(block_q, name).dequantize())
    return quantized, dense


@pytest.mark.parametrize("method", ["unilora", "lora"])
def test_a_quantized_base_is_adapted_exactly_like_its_dequantized_twin(tmp_path, method):
    """Same P, same theta_d, same file: forward = dequantized W x + B A x, gradients, save/load, and merge into a
    plain nn.Linear (never into the codes), all equal to the twin's in float64."""
    quantized, dense = quantized_and_dense_twins()
    apply = (lambda m: apply_unilora(m, 40, seed=2)) if method == "unilora" else (lambda m: apply_lora(m))
    adapters = []
    for model in (quantized, dense):
        torch.manual_seed(0)  # LoRA's A draws from torch's generator
        adapters.append(apply(model))
        with torch.no_grad():
            for param in adapters[-1].parameters():
                param.copy_(torch.randn(param.shape, dtype=param.dtype, generator=torch.Generator().manual_seed(1)))
    aq, ad = adapters
    assert [n for n, _ in aq.layers()] == [n for n, _ in ad.layers()] and len(aq.layers()) == 9  # inp, 2 x 4
    x = torch.randn(7, 5, dtype=torch.float64)
    assert torch.equal(quantized(x), dense(x))
    quantized(x).square().sum().backward()
    dense(x).square().sum().backward()
    for pq, pd in zip(aq.parameters(), ad.parameters()):
        assert torch.equal(pq.grad, pd.grad)
    if method == "unilora":  # the first block's query against the paper's P built by hand: W_deq h + b + B A h
        names = [n for n, _ in aq.layers()]
        theta_D = dense_P(aq) @ aq.theta_d.detach()
        layer, start = quantized.blocks[0].query, 0
        for name, m in aq.layers()[:names.index("blocks.0.query")]:
            start += m.r * (m.in_features + m.out_features)
        A, B = (t.detach() for t in layer.lora_factors())
        assert torch.allclose(torch.cat([A.flatten(), B.flatten()]), theta_D[start:start + A.numel() + B.numel()],
                              atol=1e-15)
        h = torch.randn(3, 12, dtype=torch.float64)
        assert torch.allclose(layer(h), h @ layer.base.dequantize().T + layer.base.bias + h @ A.T @ B.T, atol=1e-12)
    path = tmp_path / "a.pt"
    aq.save(str(path))
    fresh, _ = quantized_and_dense_twins()
    load_unilora(fresh, str(path)) if method == "unilora" else apply_lora(fresh).load(str(path))
    assert torch.equal(fresh(x), quantized(x))
    codes = {n: m.base.codes.clone() for n, m in aq.layers() if isinstance(m.base, Rounded)}
    merged = aq.merge()
    assert all(type(merged.get_submodule(n)) is nn.Linear for n in codes)  # plain layers, in the compute dtype
    assert torch.allclose(merged(x), dense(x), atol=1e-12)
    assert all(torch.equal(c, fresh.get_submodule(n).base.codes) for n, c in codes.items())  # codes untouched


def test_a_quantized_class_that_does_not_declare_the_contract_is_refused_by_name():
    class Packed(nn.Linear):  # e.g. another library's 4-bit layer: its own forward, no unilora_adaptable
        def forward(self, x):
            return super().forward(x)
    model = Tiny()
    model.blocks[0].query = Packed(12, 12)
    with pytest.raises(ValueError, match="cannot adapt 'blocks.0.query': Packed replaces nn.Linear's forward"):
        apply_unilora(model, 40)
