"""NF4 (pretrained/nf4.py) against QLoRA's definition, computed here in float64: the published codebook and its
derivation from N(0, 1), blocks of 64 scaled by their absmax and rounded to the nearest code, the absmax values
double-quantised with the signed dynamic 8-bit map (rebuilt here from its bit patterns), the bytes per weight;
NF4Linear's forward and backward, casts and moves; quantize_model; and loading a checkpoint into 4 bits tensor by
tensor (CausalLM.from_pretrained(quantize="nf4"))."""
import math
import weakref
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrained import decoder, files, nf4
from pretrained.nf4 import NF4Linear, dequantize_nf4, quantize_model, quantize_nf4
from references import DECODERS, decoder_reference, decoder_weights, save_model

torch.set_num_threads(1)

# bitsandbytes' NF4 values (bitsandbytes/functional.py, get_4bit_type("nf4")), as QLoRA publishes them
PUBLISHED = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
             1.0)
CODES = torch.tensor(PUBLISHED, dtype=torch.float64)


def dynamic_map() -> torch.Tensor:
    """The signed dynamic 8-bit map in float64, one value per byte: the sign bit, then z zero bits (the exponent
    10^-z), a one bit, and the i = 6 - z bits left, a fraction f: +-10^-z (0.1 + 0.9 (f + 1/2) / 2^i), the middle
    of the f-th of 2^i equal parts of [0.1, 1]. The two bytes with no one bit after the sign are 0 (sign 0) and 1.0
    (sign 1), bitsandbytes' two extra values. Each value exact (fractions) until the one rounding to float64."""
    values = []
    for byte in range(256):
        sign, rest = byte >> 7, byte & 127
        if rest == 0:
            values.append(Fraction(sign))
            continue
        z = 7 - rest.bit_length()  # the zero bits before the one bit
        i, f = 6 - z, rest & ((1 << (6 - z)) - 1)
        values.append((-1) ** sign * Fraction(1, 10**z) * (Fraction(1, 10) + Fraction(9, 10) * Fraction(2 * f + 1,
                                                                                                      2 ** (i + 1))))
    return torch.tensor([float(v) for v in sorted(values)], dtype=torch.float64)


MAP = dynamic_map()


def test_the_codebook_is_qloras_published_nf4():
    assert nf4.NF4_CODES == PUBLISHED
    codes = torch.tensor(nf4.NF4_CODES)
    assert codes.dtype == torch.float32 and codes.tolist() == list(PUBLISHED)  # each constant exact in float32
    assert len(PUBLISHED) == 16 and list(PUBLISHED) == sorted(PUBLISHED)
    assert PUBLISHED[0] == -1.0 and PUBLISHED[-1] == 1.0 and PUBLISHED.count(0.0) == 1
    assert sum(v > 0 for v in PUBLISHED) == 8 and sum(v < 0 for v in PUBLISHED) == 7


def test_the_codebook_is_made_of_normal_quantiles():
    """QLoRA's construction: the N(0, 1) quantiles at 8 (positive side) and 7 (negative side) evenly spaced
    probabilities from 1 - (1/32 + 1/30) / 2 down to 1/2 (excluded), an exact zero, divided by the largest. The
    probabilities in float32 as bitsandbytes takes them (torch.linspace), the quantiles in float64."""
    top = 0.9677083  # bitsandbytes' constant: 1 - (1/32 + 1/30) / 2 = 0.96770833...
    assert top == pytest.approx(1 - (1 / 32 + 1 / 30) / 2, abs=1e-7)
    positive = torch.special.ndtri(torch.linspace(top, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(top, 0.5, 8)[:-1].double())
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    torch.testing.assert_close(levels / levels.max(), CODES, atol=1e-7, rtol=0)


def test_the_absmax_code_is_the_signed_dynamic_8_bit_map():
    """QLoRA's "8-bit Floats" for the second level: bitsandbytes' create_dynamic_map(signed=True), 256 sorted
    values, each within two float32 ulps of the definition's exact value (bitsandbytes computes them in float32
    arithmetic: linspace, midpoint and product each rounded; 72 of them are not the nearest float32, and are kept as
    bitsandbytes has them)."""
    table = torch.tensor(nf4.DYNAMIC_MAP)
    assert len(nf4.DYNAMIC_MAP) == 256 == len(set(nf4.DYNAMIC_MAP)) and list(nf4.DYNAMIC_MAP) == sorted(nf4.DYNAMIC_MAP)
    assert table.dtype == torch.float32 and table.tolist() == list(nf4.DYNAMIC_MAP)  # each constant exact in float32
    torch.testing.assert_close(table.double(), MAP, rtol=2**-22, atol=0)  # within two ulps
    assert 60 < int((table != MAP.float()).sum()) < 90  # the float32 arithmetic's own roundings (72), not the nearest
    # by hand: the ends, the smallest values on either side of 0, the next one, the largest below 1
    assert MAP[-1] == 1.0 and MAP[0] == -0.99296875 and MAP[-2] == 0.99296875  # 0.1 + 0.9 * 63.5 / 64
    assert (MAP[126], MAP[127], MAP[128], MAP[129]) == (-5.5e-7, 0.0, 5.5e-7, 3.25e-6)  # 1e-5 (0.1 + 0.9 / 4)
    assert int((MAP < 0).sum()) == 127 and int((MAP == 0).sum()) == 1 and int((MAP > 0).sum()) == 127 + 1  # and 1.0
    for z in range(7):  # 2^(6 - z) values in each decade [10^-z / 10, 10^-z), of either sign
        assert int(((MAP.abs() >= 10.0**-z / 10) & (MAP.abs() < 10.0**-z)).sum()) == 2 * 2 ** (6 - z)


# --- the quantisation, against a float64 reference written from the definition ----------------------------------

def reference_nf4(w: torch.Tensor) -> dict:
    """QLoRA's NF4 in float64: row-major blocks of 64 (the last padded with zeros), each scaled by its absmax and
    rounded to the nearest code; the absmax values minus their mean, in groups of 256, each group's scale s its
    largest |x| (x / s then goes to the nearest value of the dynamic map)."""
    flat = w.double().flatten()
    blocks = torch.cat([flat, flat.new_zeros(-len(flat) % 64)]).view(-1, 64)
    absmax = blocks.abs().amax(1)
    scaled = blocks / torch.where(absmax > 0, absmax, 1.0)[:, None]
    distance = (scaled[..., None] - CODES).abs()  # (blocks, 64, 16)
    mean = absmax.mean()
    centred = torch.cat([absmax - mean, absmax.new_zeros(-len(absmax) % 256)]).view(-1, 256)
    scales = centred.abs().amax(1)
    return {"scaled": scaled, "distance": distance, "absmax": absmax, "mean": mean, "scales": scales}


def unpacked(q) -> torch.Tensor:
    """The 4-bit indices, two per byte, the first in the high nibble: (blocks, 64)."""
    byte = q.codes.long()
    return torch.stack([byte >> 4, byte & 15], -1).view(-1, 64)


def decoded_absmax(q) -> torch.Tensor:
    """float64: each block's absmax, map[index] * its group's scale + the mean."""
    scales = q.absmax_scales.double().repeat_interleave(256)[:len(q.absmax_codes)]
    return MAP[q.absmax_codes.long()] * scales + q.absmax_mean.double()


def weights():
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(256, 200, generator=g)  # 800 blocks: 3 full groups of 256 and one of 32
    heavy = torch.randn(96, 70, generator=g) ** 3 * 0.02  # heavy tails, small scale; 105 blocks
    ragged = torch.randn(3, 50, generator=g)  # 150 weights: the last block padded with 42 zeros
    mixed = torch.randn(8, 64, generator=g)
    mixed[2], mixed[5, :40] = 0.0, 0.0  # an all-zero block, and a block that is mostly zeros
    return {"normal": normal, "heavy-tailed": heavy, "ragged": ragged, "with zero blocks": mixed}


@pytest.mark.parametrize("name", list(weights()))
def test_each_weight_gets_the_nearest_code_of_its_block_scaled_by_the_absmax(name):
    w = weights()[name]
    q, ref = quantize_nf4(w), reference_nf4(w)
    index = unpacked(q)
    assert q.codes.dtype == torch.uint8 and index.shape == ref["scaled"].shape
    chosen = ref["distance"].gather(-1, index[..., None])[..., 0]
    # the nearest code; a value within 1e-6 of a midpoint may go either way (fp32 scaling against float64 here)
    assert bool((chosen <= ref["distance"].amin(-1) + 1e-6).all())
    assert (index == ref["distance"].argmin(-1)).float().mean() > 0.999
    padding = torch.arange(index.numel()).view(index.shape) >= w.numel()
    assert bool((index[padding] == 7).all())  # padding is the exact zero code


@pytest.mark.parametrize("name", list(weights()))
def test_the_absmax_is_double_quantised_to_the_nearest_value_of_the_map(name):
    w = weights()[name]
    q, ref = quantize_nf4(w), reference_nf4(w)
    blocks = ref["absmax"].numel()
    assert (q.absmax_codes.dtype, q.absmax_codes.shape) == (torch.uint8, (blocks,))
    assert (q.absmax_scales.dtype, q.absmax_scales.shape) == (torch.float32, (math.ceil(blocks / 256),))
    assert (q.absmax_mean.dtype, q.absmax_mean.shape) == (torch.float32, ())
    torch.testing.assert_close(q.absmax_mean.double(), ref["mean"], rtol=1e-6, atol=0)
    torch.testing.assert_close(q.absmax_scales.double(), ref["scales"], rtol=1e-5, atol=1e-9)
    # x = (absmax - mean) / scale (the stored mean and scales, in float64) and the map values around it: the
    # chosen value is within half their gap of x; below the map's smallest value (x >= -1), within 1 - 0.99296875
    scales = q.absmax_scales.double().repeat_interleave(256)[:blocks]
    x = (ref["absmax"] - q.absmax_mean.double()) / scales.clamp_min(1e-30)
    assert bool((x.abs() <= 1 + 1e-6).all())
    below = torch.searchsorted(MAP, x, right=True) - 1  # MAP[below] <= x < MAP[below + 1]
    gap = MAP[(below + 1).clamp(max=255)] - MAP[below.clamp(min=0)]
    bound = torch.where(below < 0, MAP[0] - x, gap / 2) + 1e-6 * x.abs()  # + fp32 rounding of x in the code
    assert bool(((MAP[q.absmax_codes.long()] - x).abs() <= bound).all())
    # so each decoded absmax is within that bound times its group's scale of the true absmax (+ fp32 rounding)
    fp32 = 1e-6 * float(ref["absmax"].max())
    torch.testing.assert_close(nf4.dequantize_absmax(q).double(), decoded_absmax(q), rtol=0, atol=fp32)
    assert bool(((decoded_absmax(q) - ref["absmax"]).abs() <= bound * scales + fp32).all())
    assert float((bound * scales).max()) <= float(q.absmax_scales.max()) * 0.00704  # 1 - 0.99296875: the widest


@pytest.mark.parametrize("name", list(weights()))
def test_dequantize_is_the_code_times_the_decoded_absmax_rounded_once(name):
    w = weights()[name]
    q = quantize_nf4(w)
    expected = (CODES[unpacked(q)] * decoded_absmax(q)[:, None]).flatten()[:w.numel()].view(w.shape)
    out = dequantize_nf4(q, torch.float64)
    assert out.shape == w.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-12)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # computed in fp32, rounded once to dtype
        assert torch.equal(dequantize_nf4(q, dtype), dequantize_nf4(q, torch.float32).to(dtype))
    # the whole round trip: within half the widest gap between codes (-1 to -0.696: 0.152) of the block's absmax,
    # plus the absmax's own error
    absmax, half_gap = reference_nf4(w)["absmax"], CODES.diff().max() / 2
    bound = (absmax * half_gap + (decoded_absmax(q) - absmax).abs()).repeat_interleave(64)[:w.numel()].view(w.shape)
    assert bool(((out - w.double()).abs() <= bound + 1e-7).all())


def test_a_weight_made_of_codes_is_stored_exactly():
    """Every block scaled by the same power of two and made of codes: the absmax is the mean, exact in 8 bits,
    and every value a code: nothing is lost. An all-zero weight stays zero (no NaN from 0 / 0)."""
    g = torch.Generator().manual_seed(1)
    w = torch.tensor(PUBLISHED)[torch.randint(0, 16, (32, 128), generator=g)] * 0.25
    w.view(-1, 64)[:, 0] = 0.25  # each block's absmax is 0.25
    assert torch.equal(dequantize_nf4(quantize_nf4(w)), w)
    assert torch.equal(dequantize_nf4(quantize_nf4(torch.zeros(4, 64))), torch.zeros(4, 64))


@pytest.mark.parametrize("shape", [(1024, 1024), (3, 50), (11008, 4096)])
def test_a_layer_takes_half_a_byte_per_weight_plus_the_stated_overhead(shape):
    """0.5 byte per weight (4-bit codes), 1 byte per block of 64 (the 8-bit absmax), 4 bytes per 256 blocks (the
    fp32 scales) and 4 bytes for the mean: 0.516 byte per weight for a big layer. A Llama-2-7B-sized layer is
    counted as a meta-device shell, whose buffers are those of a quantized layer (checked on the small ones)."""
    out, fan_in = shape
    n, blocks = out * fan_in, math.ceil(out * fan_in / 64)
    stated = blocks * 32 + blocks + 4 * math.ceil(blocks / 256) + 4
    shell = NF4Linear(fan_in, out, bias=False, device="meta")
    assert sum(b.numel() * b.element_size() for b in shell.buffers()) == stated
    if n < 2**21:
        layer = NF4Linear.from_weight(torch.randn(out, fan_in))
        assert [(b.shape, b.dtype) for b in layer.buffers()] == [(b.shape, b.dtype) for b in shell.buffers()]
        assert quantize_nf4(torch.randn(out, fan_in)).nbytes() == stated
    if n >= 2**20:
        assert stated / n <= 0.53 and stated / n == pytest.approx(0.5 + 1 / 64 + 4 / (256 * 64), abs=1e-5)


# --- NF4Linear ----------------------------------------------------------------------------------------------------

def linear(fan_in=70, out=40, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(fan_in, out, bias=bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_forward_is_f_linear_with_the_dequantized_weight(dtype):
    layer = NF4Linear.from_linear(linear(), compute_dtype=dtype)
    assert (layer.in_features, layer.out_features, layer.compute_dtype) == (70, 40, dtype)
    assert layer.bias.dtype == dtype and not layer.bias.requires_grad and NF4Linear.unilora_adaptable is True
    W = layer.dequantize()
    assert W.shape == (40, 70) and W.dtype == dtype
    assert torch.equal(W, dequantize_nf4(quantize_nf4(linear().weight), dtype))
    x = torch.randn(2, 5, 70).to(dtype)
    assert torch.equal(layer(x), F.linear(x, W, layer.bias))  # the same numbers, not merely close
    assert torch.equal(layer(x[0]), F.linear(x[0], W, layer.bias))


def test_backward_gives_f_linears_gradients_and_keeps_no_full_weight():
    """The gradient of x (and of a bias unfrozen by hand) is F.linear's with the dequantized weight as a constant;
    the graph saves no (out, in) tensor between forward and backward: the weight is rebuilt in the backward."""
    layer = NF4Linear.from_linear(linear())
    layer.bias.requires_grad_(True)
    x = torch.randn(3, 4, 70, requires_grad=True)
    g = torch.randn(3, 4, 40)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = layer(x)
    y.backward(g)
    assert not [s for s in saved if s.numel() >= 40 * 70]
    x2 = x.detach().clone().requires_grad_(True)
    b2 = layer.bias.detach().clone().requires_grad_(True)
    W = layer.dequantize()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y2 = F.linear(x2, W, b2)
    y2.backward(g)
    assert [s for s in saved if s.numel() == 40 * 70]  # the check can fail: plain F.linear keeps the weight
    assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad) and torch.equal(layer.bias.grad, b2.grad)


def test_to_dtype_casts_the_bias_and_never_the_quantisation_state():
    layer = NF4Linear.from_linear(linear())
    state = {name: t.clone() for name, t in layer.named_buffers()}
    for cast, dtype in ((lambda m: m.to(torch.bfloat16), torch.bfloat16), (lambda m: m.half(), torch.float16),
                        (lambda m: m.double(), torch.float64), (lambda m: m.float(), torch.float32)):
        model = cast(nn.Sequential(layer))
        assert model[0] is layer and layer.compute_dtype == dtype and layer.bias.dtype == dtype
        for name, t in layer.named_buffers():
            assert t.dtype == state[name].dtype and torch.equal(t, state[name]), name
        x = torch.randn(2, 70, dtype=dtype)
        assert torch.equal(layer(x), F.linear(x, dequantize_nf4(layer.state(), dtype), layer.bias))
    layer.to("meta")  # a move takes everything along, the fp32 scales too
    assert {t.device.type for t in (*layer.buffers(), layer.bias)} == {"meta"}
    assert layer.absmax_scales.dtype == torch.float32 and layer.compute_dtype == torch.float32


def test_state_dicts_load_both_ways():
    """A quantized layer's state dict restores it exactly; a full-precision nn.Linear's state dict is quantized as
    it loads (how checkpoints are read into 4 bits), into a shell on the meta device with assign=True too."""
    source = linear()
    layer = NF4Linear.from_linear(source)
    copy = NF4Linear(70, 40)
    copy.load_state_dict(layer.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), layer.state_dict().values()))
    for fresh, assign in ((NF4Linear(70, 40), False), (NF4Linear(70, 40, device="meta"), True)):
        fresh.load_state_dict(source.state_dict(), assign=assign)
        assert fresh.state_dict().keys() == layer.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), layer.state_dict().values()))
        assert not fresh.bias.requires_grad
    with pytest.raises(RuntimeError, match="Missing key"):  # strict: a state dict without the weight is refused
        NF4Linear(70, 40).load_state_dict({"bias": torch.zeros(40)})


def test_quantize_model_replaces_the_linear_layers_and_keeps_the_rest():
    torch.manual_seed(0)
    c = DECODERS["llama-gqa-untied"]
    model = decoder.CausalLM(c)
    embed, norm, head = model.model.embed_tokens, model.model.norm, model.lm_head
    assert quantize_model(model, torch.bfloat16) is model
    quantized = [n for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    assert len(quantized) == 7 * c["num_hidden_layers"] and all(n.startswith("model.layers.") for n in quantized)
    assert model.model.embed_tokens is embed and model.model.norm is norm and model.lm_head is head
    assert {m.compute_dtype for m in model.modules() if isinstance(m, NF4Linear)} == {torch.bfloat16}
    assert not any(type(m) is nn.Linear for n, m in model.named_modules() if n != "lm_head")
    attention = nn.MultiheadAttention(16, 2)  # its out_proj is read, not called: a subclass of nn.Linear, kept
    mixed = quantize_model(nn.ModuleDict({"attn": attention, "mlp": nn.Linear(16, 16)}))
    assert mixed["attn"].out_proj is attention.out_proj and isinstance(mixed["mlp"], NF4Linear)
    kept = quantize_model(nn.ModuleDict({"a": nn.Linear(8, 8), "b": nn.Linear(8, 8)}), skip="b")
    assert isinstance(kept["a"], NF4Linear) and type(kept["b"]) is nn.Linear


# --- a quantized model ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    c, sd = DECODERS["llama-gqa-untied"], decoder_weights(DECODERS["llama-gqa-untied"])
    return c, sd, save_model(tmp_path_factory.mktemp("llama"), c, sd)


def test_quantized_logits_are_the_dequantized_models_and_close_to_fp32(llama):
    """Exactly the model of its dequantized weights (against the float64 reference forward), and near the fp32
    model. NF4 rounds each weight matrix of this random model with a relative error (Frobenius) of 0.090-0.097;
    through 2 layers the logits move by 0.177 of their norm (measured, torch 2.13). The bound, 0.25, leaves room for
    another torch's rounding and still catches the usual mistakes, measured on this model: the two codes of a byte
    swapped (1.30), each block given another block's absmax (0.42), one absmax for the whole layer (0.33)."""
    c, sd, folder = llama
    full = decoder.CausalLM.from_pretrained(folder)
    model = decoder.CausalLM.from_pretrained(folder, quantize="nf4")
    ids = torch.tensor([[5, 9, 13, 7, 22, 31, 4, 8, 17], [0, 0, 0, 11, 3, 44, 6, 9, 10]])
    mask = torch.tensor([[1] * 9, [0, 0, 0] + [1] * 6])
    layers = [(f"{n}.weight", m) for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    dequantized = dict(sd, **{key: m.dequantize(torch.float64) for key, m in layers})
    with torch.no_grad():
        out, ref = model(ids, mask)[mask.bool()], full(ids, mask)[mask.bool()]
    torch.testing.assert_close(out, decoder_reference(dequantized, c, ids, mask)[mask.bool()].float(), atol=2e-5,
                               rtol=0)
    errors = [float((dequantized[key] - sd[key]).norm() / sd[key].norm()) for key, _ in layers]
    assert 0.05 < min(errors) and max(errors) < 0.12
    assert 0.05 < float((out - ref).norm() / ref.norm()) < 0.25


@pytest.mark.parametrize("name", ["llama-gqa-untied", "qwen2-bias-tied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loading_into_4_bits_equals_quantizing_the_loaded_model(tmp_path, name, dtype):
    c, sd = DECODERS[name], decoder_weights(DECODERS[name])
    folder = save_model(tmp_path, c, sd)
    loaded = decoder.CausalLM.from_pretrained(folder, dtype=dtype, quantize="nf4")
    reference = quantize_model(decoder.CausalLM.from_pretrained(folder, dtype=dtype), dtype)
    a, b = loaded.state_dict(), reference.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
    assert isinstance(loaded.model.layers[1].mlp.down_proj, NF4Linear) and type(loaded.lm_head) is nn.Linear
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == (name == "qwen2-bias-tied")
    ids = torch.tensor([[5, 9, 13, 7, 22]])
    assert torch.equal(loaded(ids), reference(ids)) and not loaded.training


def tracked_reads(monkeypatch) -> list:
    """Patch the safetensors reader: at each tensor read, record the bytes of the earlier ones still alive (weak
    references: nothing here keeps them) and of the new one. Returns the list it fills."""
    reads, alive = [], []
    original = files.iter_safetensors

    class Tracked:  # an iterator object, not a generator: its frame keeps no tensor between reads
        def __init__(self, path):
            self.tensors = original(path)

        def __iter__(self):
            return self

        def __next__(self):
            name, t = next(self.tensors)
            earlier = sum(t.nbytes for t in (ref() for ref in alive) if t is not None)
            reads.append((name, earlier, t.nbytes))
            alive.append(weakref.ref(t))
            return name, t

    monkeypatch.setattr(files, "iter_safetensors", Tracked)
    return reads


def test_loading_into_4_bits_holds_one_checkpoint_tensor_at_a_time(tmp_path, monkeypatch):
    """Each tensor read is quantized into its layer (or, outside the blocks, kept as the model's parameter) and
    dropped before the next is read: the most checkpoint bytes alive at once is the largest tensor, where the
    16-bit load holds the whole file. The 4-bit model is then what its layers' formula says."""
    c = dict(DECODERS["llama-gqa-untied"], hidden_size=64, intermediate_size=256, vocab_size=64)
    sd = decoder_weights(c)
    folder = save_model(tmp_path, c, sd)
    reads = tracked_reads(monkeypatch)
    model = decoder.CausalLM.from_pretrained(folder, dtype=torch.bfloat16, quantize="nf4")
    assert len(reads) == len(sd) and all(earlier == 0 for _, earlier, _ in reads)
    assert max(earlier + now for _, earlier, now in reads) == max(t.nbytes for t in sd.values())
    reads.clear()
    decoder.CausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert max(earlier + now for _, earlier, now in reads) == sum(t.nbytes for t in sd.values())  # the whole file
    linears = [t for k, t in sd.items() if k.startswith("model.layers.") and t.dim() == 2]
    blocks = [math.ceil(t.numel() / 64) for t in linears]
    quantized = sum(b * 32 + b + 4 * math.ceil(b / 256) + 4 for b in blocks)
    kept = sum(2 * t.numel() for k, t in sd.items() if t.dim() == 1 or not k.startswith("model.layers."))
    assert nf4.resident_bytes(model) == quantized + kept


# --- bad input: one line that names the problem ---------------------------------------------------------------

BAD = [
    (lambda: quantize_nf4(torch.randn(64)), r"NF4 quantizes a 2-D \(out_features, in_features\) weight; got \(64,\)"),
    (lambda: quantize_nf4(torch.randn(2, 3, 64)), r"NF4 quantizes a 2-D .* weight; got \(2, 3, 64\)"),
    (lambda: quantize_nf4([[1.0]]), "NF4 quantizes a 2-D .* weight; got list"),
    (lambda: quantize_nf4(torch.ones(4, 64, dtype=torch.int64)), "NF4 quantizes a floating-point weight; got dtype "
                                                                   "torch.int64"),
    (lambda: quantize_nf4(torch.ones(0, 64)), r"the weight \(0, 64\) on cpu has no values to quantize"),
    (lambda: quantize_nf4(torch.ones(4, 64, device="meta")), r"the weight \(4, 64\) on meta has no values"),
    (lambda: quantize_nf4(torch.tensor([[1.0, float("nan")]])), "the weight holds NaN or infinite values"),
    (lambda: quantize_nf4(torch.tensor([[1.0, float("inf")]])), "the weight holds NaN or infinite values"),
    (lambda: NF4Linear(0, 4), "in_features and out_features must be positive integers; got 0, 4"),
    (lambda: NF4Linear(4, 4, compute_dtype=torch.int8), "compute_dtype is torch.int8; expected one of "
                                                        "torch.bfloat16, torch.float16, torch.float32, torch.float64"),
    (lambda: NF4Linear.from_weight(torch.randn(4, 8), torch.zeros(8)), r"bias must be a tensor of shape \(4,\)"),
    (lambda: NF4Linear.from_linear(nn.Conv1d(2, 2, 1)), "from_linear takes an nn.Linear; got Conv1d"),
    (lambda: NF4Linear(8, 4).quantize_(torch.randn(8, 4)), r"the weight has shape \(8, 4\); this layer needs "
                                                           r"\(4, 8\)"),
    (lambda: NF4Linear(8, 4)(torch.randn(2, 5)), "the input's last dimension is 5; this layer takes 8"),
    (lambda: NF4Linear(8, 4).dequantize(torch.int32), "dtype is torch.int32; expected one of"),
    (lambda: quantize_model(nn.Sequential(nn.ReLU())), r"the model has no nn.Linear layer outside skip=\('lm_head', "
                                                       r"'classifier', 'score'\) to quantize"),
    (lambda: NF4Linear(64, 1).load_state_dict(dict(NF4Linear(64, 1).state_dict(),
                                                   absmax_codes=torch.zeros(1, dtype=torch.int8))),
     r"absmax_codes is torch.int8; expected torch.uint8 \(indices into DYNAMIC_MAP\)"),
    (lambda: decoder.CausalLM.from_pretrained("no/such-folder", quantize="int8"),
     r"quantize='int8' is not supported; use None \(the weights in dtype\) or 'nf4'"),
]


@pytest.mark.parametrize("call,message", BAD)
def test_bad_input_is_one_line_naming_the_problem(call, message):
    with pytest.raises(ValueError, match=message) as err:
        call()
    assert "\n" not in str(err.value)


def test_uni_lora_on_a_4_bit_llama_saves_loads_and_exports_to_peft(llama, tmp_path):
    """Uni-LoRA on the NF4 model: theta_d fp32, every NF4 block layer adapted, the file reloads into a fresh 4-bit
    model with the same logits, and the PEFT export holds each layer's (A, B) as lora_state_dict gives them."""
    import json
    import unilora
    from pretrained import peft
    from references import parse_by_hand
    _, _, folder = llama
    model = decoder.CausalLM.from_pretrained(folder, quantize="nf4")
    adapter = unilora.apply_unilora(model, 256, seed=3)
    names = [n for n, m in model.named_modules() if isinstance(getattr(m, "base", None), NF4Linear)]
    assert names == [n for n, _ in adapter.layers()] and len(names) > 0 and adapter.theta_d.dtype == torch.float32
    with torch.no_grad():
        adapter.theta_d.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    adapter.refresh()
    ids = torch.tensor([[5, 9, 13, 7, 22, 31]])
    with torch.no_grad():
        logits = model(ids)
    adapter.save(str(tmp_path / "a.pt"))
    fresh = decoder.CausalLM.from_pretrained(folder, quantize="nf4")
    unilora.load_unilora(fresh, str(tmp_path / "a.pt"))
    with torch.no_grad():
        assert torch.equal(fresh(ids), logits)
    peft.save_peft_lora(adapter, tmp_path / "peft", base_model_name_or_path="tiny")
    tensors, _, _ = parse_by_hand(tmp_path / "peft/adapter_model.safetensors")
    factors = adapter.lora_state_dict()
    assert len(tensors) == 2 * len(factors)
    for name, (A, B) in factors.items():
        key = next(k for k in tensors if k.endswith(f"{name}.lora_A.weight"))
        assert torch.equal(torch.from_numpy(tensors[key][1].copy()), A.float())
        assert torch.equal(torch.from_numpy(tensors[key.replace("lora_A", "lora_B")][1].copy()), B.float())
    assert json.loads((tmp_path / "peft/adapter_config.json").read_text())["r"] == 4
