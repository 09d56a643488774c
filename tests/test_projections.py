"""Each projection variant's defining property, checked against references built here.

References: P written entry by entry from its definition in float64, column counts from numpy's bincount, the
Hadamard matrix from Sylvester's Kronecker construction, expected column ranges and pool sizes worked out by
hand, expectations over many seeds; the LoRA baseline against LoRA written by hand.
"""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import unilora
from projections import (PROJECTIONS, Fastfood, Gaussian, apply_lora, hadamard, iid_index, local_index,
                         nonorm_index, nonuniform_index)
from unilora import make_projection

torch.set_num_threads(1)
INDEX_KINDS = {"iid": iid_index, "local": local_index, "nonuniform": nonuniform_index, "nonorm": nonorm_index}
SIZES = [24, 24, 8, 16, 40, 12]  # three layers (A_l, B_l): mixed shapes; D = 124
D = sum(SIZES)


def dense(idx, d, normalize):
    """P (D x d, float64) from its definition: row i has s_i / sqrt(n_j) (or s_i) at column j = idx_i mod d."""
    idx = idx.numpy().astype(np.int64)
    counts = np.bincount(idx % d, minlength=d)
    P = torch.zeros(len(idx), d, dtype=torch.float64)
    for i, k in enumerate(idx):
        j, sign = k % d, (-1.0 if k >= d else 1.0)
        P[i, j] = sign / math.sqrt(counts[j]) if normalize else sign
    return P


def matrix_of(module, d):
    """The module's P, column j = module(e_j), in float64."""
    return torch.stack([module(e) for e in torch.eye(d, dtype=torch.float64)], dim=1)


def sylvester(n):
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), H)
    return H


def layer_rows(sizes):
    """Row ranges of each layer (A_l and B_l together) in theta_D."""
    ends = np.cumsum([a + b for a, b in zip(sizes[0::2], sizes[1::2])]).tolist()
    return [range(start, end) for start, end in zip([0] + ends[:-1], ends)]


# ----------------------------------------------------------------------------------------------------------
# Index kinds
# ----------------------------------------------------------------------------------------------------------

def test_iid_columns_are_independent_uniform_draws_not_balanced():
    d, n = 10_000, 20_000
    idx, normalize = iid_index([n // 2, n // 2], d, seed=0, signs=False)
    counts = np.bincount(idx.numpy(), minlength=d)
    assert normalize and idx.dtype == torch.int32 and counts.sum() == n and counts.size == d
    # Uniform independent draws: the number of unused columns is d (1 - 1/d)^n ~ d e^{-2} (std ~ 34 here).
    assert abs((counts == 0).sum() - d * (1 - 1 / d) ** n) < 200
    # Pearson's statistic against uniform is ~ d - 1 +- sqrt(2 d) for independent draws, and exactly 0 balanced.
    chi2 = ((counts - n / d) ** 2 / (n / d)).sum()
    assert abs(chi2 - (d - 1)) < 5 * math.sqrt(2 * d)
    balanced = np.bincount(make_projection(n, d, seed=0, signs=False).numpy(), minlength=d)
    assert ((balanced - n / d) ** 2).sum() == 0


def test_iid_P_is_an_isometry_on_the_columns_it_uses():
    d = 40
    idx, normalize = iid_index(SIZES, d, seed=3, signs=True)
    used = np.bincount(idx.numpy() % d, minlength=d) > 0
    assert not used.all()  # with D/d ~ 3 a few columns stay unused: the flaw balanced removes
    P = dense(idx, d, normalize)
    assert torch.allclose(P.T @ P, torch.diag(torch.tensor(used, dtype=torch.float64)), atol=1e-12)


@pytest.mark.parametrize("sizes, d, widths", [
    ([4, 4, 8, 8, 4, 12], 10, [2, 4, 4]),  # layer sizes 8, 16, 16: exact quotas
    ([5, 5, 10, 10, 15, 15], 7, [1, 2, 4]),  # quotas 7/6, 14/6, 21/6: the last remainder (.5) is the largest
    ([1, 1, 50, 48], 4, [1, 3]),  # quota 0.08 for the tiny layer: lifted to one column, taken from the other
])
def test_local_layers_use_only_their_own_range_sized_by_the_layer(sizes, d, widths):
    idx, normalize = local_index(sizes, d, seed=1, signs=True)
    columns = idx.numpy() % d
    assert normalize
    start = 0
    for rows, width in zip(layer_rows(sizes), widths):
        counts = np.bincount(columns[rows.start:rows.stop], minlength=d)
        used = np.flatnonzero(counts)
        assert used.tolist() == list(range(start, start + width))  # its own range, all of it
        assert set(counts[used]) <= {len(rows) // width, -(-len(rows) // width)}  # balanced within the layer
        start += width


def test_local_widths_are_proportional_and_every_layer_gets_a_column():
    sizes = [96, 96, 96, 96, 8, 40, 200, 56, 24, 24]
    d = 101
    idx, _ = local_index(sizes, d, seed=0, signs=False)
    for rows in layer_rows(sizes):
        width = len(np.unique(idx.numpy()[rows.start:rows.stop]))
        assert abs(width - d * len(rows) / sum(sizes)) < 1
    with pytest.raises(ValueError, match="number of adapted layers"):
        local_index(sizes, 4, seed=0, signs=False)


@pytest.mark.parametrize("sizes, d, load_ratio, d_a", [
    ([16, 16, 16, 16], 18, 8, 2),  # 32 A-rows on 2 columns (16 each), 32 B-rows on 16 (2 each): loads 8 : 1
    ([16, 16, 16, 16], 18, 1, 9),  # load ratio 1 is the uniform split again
    ([8, 24, 8, 24], 21, 2, 3),  # in != out: 16 A-rows, 48 B-rows; d_A = 21 * 16 / (16 + 96) = 3
])
def test_nonuniform_A_and_B_rows_use_disjoint_pools_of_the_stated_sizes(sizes, d, load_ratio, d_a):
    idx, normalize = nonuniform_index(sizes, d, seed=2, signs=True, load_ratio=load_ratio)
    columns = idx.numpy() % d
    is_a = np.concatenate([np.full(n, i % 2 == 0) for i, n in enumerate(sizes)])
    assert normalize
    for rows, pool in ((columns[is_a], range(0, d_a)), (columns[~is_a], range(d_a, d))):
        counts = np.bincount(rows, minlength=d)
        assert np.flatnonzero(counts).tolist() == list(pool)
        assert set(counts[list(pool)]) <= {len(rows) // len(pool), -(-len(rows) // len(pool))}


def test_nonuniform_is_the_default_ratio_and_refuses_what_cannot_be_split():
    idx, _ = nonuniform_index([16, 16, 16, 16], 18, seed=0, signs=False)  # default load_ratio 8 -> d_A = 2
    assert sorted(set(idx[:16].tolist()) | set(idx[32:48].tolist())) == [0, 1]
    with pytest.raises(ValueError, match="d >= 2"):
        nonuniform_index([16, 16], 1, seed=0, signs=False)
    with pytest.raises(ValueError, match="B pool"):
        nonuniform_index([30, 2], 30, seed=0, signs=False)  # d_A = 20, leaving 10 columns for 2 B-rows


def test_nonorm_is_the_balanced_P_without_its_scale():
    d = 30
    idx, normalize = nonorm_index(SIZES, d, seed=4, signs=True)
    assert not normalize and torch.equal(idx, make_projection(D, d, seed=4, signs=True))
    counts = np.bincount(idx.numpy() % d, minlength=d)
    assert set(counts) == {D // d, D // d + 1}
    P = dense(idx, d, normalize)
    assert torch.allclose(P.T @ P, torch.diag(torch.tensor(counts, dtype=torch.float64)))
    x = torch.randn(d, dtype=torch.float64)
    assert (P @ x).norm() > 1.5 * x.norm()  # ~ sqrt(D/d) = 2 times: not an isometry


@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_index_kinds_signs_on_off_change_only_the_signs(kind):
    d = 24
    off, _ = INDEX_KINDS[kind](SIZES, d, 5, False)
    on, _ = INDEX_KINDS[kind](SIZES, d, 5, True)
    assert off.min() >= 0 and off.max() < d  # all-positive P: the paper's
    assert torch.equal(on % d, off)  # same columns, same seed
    negative = int((on >= d).sum())
    assert abs(negative - D / 2) < 5 * math.sqrt(D) / 2


@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_index_kinds_are_regenerated_from_the_seed(kind):
    first, second, other = (INDEX_KINDS[kind](SIZES, 20, seed, True)[0] for seed in (7, 7, 8))
    assert torch.equal(first, second) and not torch.equal(first, other)
    assert first.dtype == torch.int32 and first.numel() == D and 0 <= first.min() and first.max() < 40


@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_index_kinds_refuse_bad_sizes_and_d(kind):
    for sizes, d, what in (([24, 24, 8], 4, "sizes"), ([24, 0], 4, "sizes"), (SIZES, 0, "d=0"),
                           (SIZES, D + 1, f"d={D + 1}")):
        with pytest.raises(ValueError, match=what):
            INDEX_KINDS[kind](sizes, d, 0, True)


# ----------------------------------------------------------------------------------------------------------
# Fastfood and Gaussian
# ----------------------------------------------------------------------------------------------------------

def test_hadamard_is_sylvesters_matrix():
    for n in (1, 2, 8, 64):
        assert torch.equal(hadamard(torch.eye(n, dtype=torch.float64)), sylvester(n))
    batch = torch.randn(3, 5, 16, dtype=torch.float64)
    assert torch.allclose(hadamard(batch), batch @ sylvester(16))
    with pytest.raises(ValueError, match="power-of-2"):
        hadamard(torch.ones(12))


def test_fastfood_is_S_H_G_Pi_H_B_per_block():
    d, L = 5, 8
    module = Fastfood(SIZES, d, seed=3, signs=True)
    blocks = -(-D // L)
    assert module.block == L and module.flips.shape == module.gauss.shape == (blocks, L)
    H = sylvester(L)
    rows = []
    for b in range(blocks):
        B = torch.diag(module.flips[b].double())
        perm = module.perm[b * L:(b + 1) * L].long() - b * L
        assert sorted(perm.tolist()) == list(range(L))  # a permutation of its own block
        Pi = torch.zeros(L, L, dtype=torch.float64)
        Pi[torch.arange(L), perm] = 1.0  # (Pi x)_m = x_perm[m]
        G = module.gauss[b].double()
        assert set(module.flips[b].tolist()) <= {-1, 1} and abs(G.square().sum() - L) < 1e-4
        rows.append(H @ torch.diag(G) @ Pi @ H @ B)
    expected = torch.cat(rows)[:D, :d] / math.sqrt(D * L)
    assert torch.allclose(matrix_of(module, d), expected, atol=1e-6)


@pytest.mark.parametrize("cls", [Fastfood, Gaussian])
def test_forward_is_the_matrix_and_backward_its_transpose(cls):
    d = 6
    module = cls(SIZES, d, seed=1, signs=True)
    P = matrix_of(module, d)
    x = torch.randn(d, dtype=torch.float64, requires_grad=True)
    g = torch.randn(D, dtype=torch.float64)
    y = module(x)
    assert y.shape == (D,) and torch.allclose(y, P @ x)
    (grad,) = torch.autograd.grad(y, x, g)
    assert torch.allclose(grad, P.T @ g)
    small = cls([4, 4, 2, 2], 3, seed=0, signs=True)
    assert torch.autograd.gradcheck(small, (torch.randn(3, dtype=torch.float64, requires_grad=True),))


@pytest.mark.parametrize("cls", [Fastfood, Gaussian])
def test_near_isometry_in_expectation_over_seeds(cls):
    """E[P^T P] = I and E||Px||^2 = ||x||^2; per seed ||Px||^2 spreads by ~0.15 here (not an exact isometry)."""
    d, seeds = 6, 300
    x = torch.randn(d, dtype=torch.float64)
    x /= x.norm()
    gram, squares = torch.zeros(d, d, dtype=torch.float64), []
    for seed in range(seeds):
        P = matrix_of(cls(SIZES, d, seed, True), d)
        gram += P.T @ P / seeds
        squares.append(float((P @ x).square().sum()))
    # Tolerances ~5 standard errors of a 300-seed mean (per-seed std of a Gram entry <= 0.18).
    assert torch.allclose(gram, torch.eye(d, dtype=torch.float64), atol=0.06)
    assert abs(np.mean(squares) - 1) < 0.05
    assert np.std(squares) > 0.02


def test_gaussian_entries_are_N_0_1_over_D():
    module = Gaussian([2048, 2048], 64, seed=0, signs=True)
    entries = module.matrix.double().flatten()
    n, Dm = entries.numel(), 4096
    assert abs(entries.mean()) < 5 / math.sqrt(Dm * n)
    assert abs(entries.var() * Dm - 1) < 0.02  # relative std of the estimate: sqrt(2 / n) = 0.003


def test_gaussian_refuses_a_matrix_too_large_before_allocating_it():
    with pytest.raises(ValueError, match="use fastfood"):
        Gaussian([2 ** 20, 2 ** 20], 2 ** 8, seed=0, signs=True)  # 2^29 entries: 2 GiB in fp32


@pytest.mark.parametrize("cls", [Fastfood, Gaussian])
def test_signs_off_is_refused_not_ignored(cls):
    with pytest.raises(ValueError, match="signs=False"):
        cls(SIZES, 6, seed=0, signs=False)


@pytest.mark.parametrize("cls", [Fastfood, Gaussian])
def test_random_state_comes_from_the_seed_and_is_not_saved(cls):
    first, second, other = (cls(SIZES, 6, seed, True) for seed in (4, 4, 5))
    assert first.fingerprint() == second.fingerprint() != other.fingerprint()
    x = torch.randn(6)
    assert torch.equal(first(x), second(x)) and not torch.equal(first(x), other(x))
    assert first.state_dict() == {} and list(first.parameters()) == []
    config = json.loads(json.dumps(first.config()))
    assert config["kind"] == first.kind == cls.kind and config["seed"] == 4 and config["D"] == D
    assert first(x.double()).dtype == torch.float64 and torch.allclose(first(x.double()).float(), first(x), atol=1e-6)
    # Device-agnostic: the buffers follow .to() and forward makes no tensor on a fixed device (meta: shapes only).
    on_meta = cls(SIZES, 6, 4, True).to("meta")
    assert all(b.device.type == "meta" for b in on_meta.buffers())
    assert on_meta(torch.empty(6, device="meta")).shape == (D,)


def test_projections_registry_names_every_kind():
    assert set(PROJECTIONS) == {"balanced", "iid", "local", "nonuniform", "nonorm", "fastfood", "gaussian"}
    assert PROJECTIONS["balanced"] is None  # unilora's own default path
    assert PROJECTIONS["fastfood"] is Fastfood and PROJECTIONS["gaussian"] is Gaussian


# ----------------------------------------------------------------------------------------------------------
# Inside a model (needs the core side of issue 13)
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_index_kind_modules_are_the_hand_built_P(kind):
    d = 20
    idx, normalize = INDEX_KINDS[kind](SIZES, d, 6, True)
    module = PROJECTIONS[kind](SIZES, d, 6, True)
    assert module.kind == kind and json.loads(json.dumps(module.config()))
    P = dense(idx, d, normalize)
    assert torch.allclose(matrix_of(module, d), P, atol=1e-12)
    x = torch.randn(d, dtype=torch.float64, requires_grad=True)
    g = torch.randn(D, dtype=torch.float64)
    (grad,) = torch.autograd.grad(module(x), x, g)
    assert torch.allclose(grad, P.T @ g)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.query, self.value, self.head = nn.Linear(8, 6), nn.Linear(6, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.value(torch.tanh(self.query(x))))


@pytest.mark.parametrize("kind", [k for k in PROJECTIONS if k != "balanced"])
def test_every_kind_saves_loads_and_merges(kind, tmp_path):
    x = torch.randn(4, 8)
    model = TwoLayers()
    signed = kind in ("fastfood", "gaussian")  # dense P's have random signs by construction: signs=True
    adapter = unilora.apply_unilora(model, 12, targets=["query", "value"], seed=3, signs=signed,
                                    projection=PROJECTIONS[kind])
    with torch.no_grad():
        adapter.theta_d.normal_(0, 0.3)
    expected = model(x)
    adapter.save(str(tmp_path / "a.pt"))
    with pytest.raises(ValueError, match=kind):
        unilora.load_unilora(TwoLayers(), str(tmp_path / "a.pt"))  # a variant needs its factory passed again
    loaded = TwoLayers()
    unilora.load_unilora(loaded, str(tmp_path / "a.pt"), projection=PROJECTIONS[kind])
    assert torch.allclose(loaded(x), expected, atol=1e-6)
    assert torch.allclose(unilora.merge_adapters(loaded)(x), expected, atol=1e-5)


# ---------------------------------------------------------------- the LoRA baseline (P = I)


class Attention(nn.Module):
    def __init__(self, width=12):
        super().__init__()
        torch.manual_seed(0)
        self.query, self.key, self.value = (nn.Linear(width, width).double() for _ in range(3))

    def forward(self, x):
        return self.value(x) * torch.sigmoid(self.query(x) + self.key(x))


def test_lora_baseline_is_standard_lora(tmp_path):
    """Hu et al.'s LoRA written by hand: x W^T + b + (alpha/r) x A^T B^T, B = 0 at the start."""
    model, reference = Attention(), Attention()
    lora = apply_lora(model, r=2, alpha=8, targets=("query", "value"))
    x = torch.randn(4, 12, dtype=torch.float64)
    assert torch.equal(model(x), reference(x))  # B = 0 at init
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_()
    layer, base = model.query, reference.query
    expected = x @ base.weight.T + base.bias + (8 / 2) * (x @ layer.lora_A.T) @ layer.lora_B.T
    assert torch.allclose(layer(x), expected, atol=1e-12)
    assert type(model.key) is nn.Linear  # not a target
    assert lora.counts()["d"] == lora.counts()["D"] == 2 * 2 * (12 + 12)  # 2 layers, r (in + out)
    path = str(tmp_path / "lora.pt")
    lora.save(path)
    out = model(x)
    fresh = Attention()
    apply_lora(fresh, r=2, alpha=8, targets=("query", "value")).load(path)
    assert torch.equal(fresh(x), out)
    unilora.merge_adapters(fresh)
    assert type(fresh.query) is nn.Linear
    assert torch.allclose(fresh(x), out, atol=1e-12)
