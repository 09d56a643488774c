"""NormalFloat-4 (NF4): QLoRA's 4-bit storage of a frozen base model, in plain torch (Dettmers et al., "QLoRA:
Efficient Finetuning of Quantized LLMs", NeurIPS 2023, arXiv 2305.14314, section 3).

Why it exists: QLoRA trains LoRA adapters over a base model kept in 4 bits, about a quarter of its 16-bit memory.
The project depends on torch only, so this file replaces what `bitsandbytes` would give (its CUDA kernels are
faster; the scheme is the same). unilora.py adapts an NF4Linear like an nn.Linear (`unilora_adaptable`).

The scheme, for a weight W (out x in) read row-major in blocks of 64 weights:
  1. each block is divided by its absmax (its largest |w|), so that it lies in [-1, 1];
  2. each value is rounded to the nearest of the 16 NF4 codes (NF4_CODES); its index takes 4 bits, two per byte;
  3. double quantisation: the fp32 absmax of every block (32 bits per 64 weights: 0.5 bit per weight) is itself
     quantised. Their mean is subtracted first (they are all positive; centred, a symmetric code uses all of its
     levels), then each group of 256 is stored as 8-bit floats (DYNAMIC_MAP) scaled by the group's largest |value|.
Cost per weight: 4 + 8/64 + 32/(64*256) bits = 4.127 bits, 0.516 bytes (and 4 bytes per layer for the mean).
The weight is rebuilt as code[index] * absmax, in fp32, rounded once to the compute dtype, in every forward (and
again in the backward): a full-precision copy of the weight never stays in memory.

The 8-bit floats are QLoRA's: bitsandbytes' signed dynamic map (Dettmers et al. 2022, "8-bit Optimizers via
Block-wise Quantization"). After the sign bit, z zero bits give a decimal exponent 10^-z (z <= 6), a one bit ends
them, and the 6 - z bits left are a linear fraction: the steps grow with |value|, from 5.5e-7 near 0 to 0.014 near 1.
"""
import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

BLOCK = 64  # weights per absmax (QLoRA's block size for the 4-bit codes)
ABSMAX_BLOCK = 256  # absmax values per fp32 scale in the double quantisation
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
SKIP = ("lm_head", "classifier", "score")  # output heads: kept in 16 bits, as QLoRA keeps lm_head

# The 16 NF4 codes, bitsandbytes' exact float32 values (its create_normal_map). They are quantiles of N(0, 1): the
# inverse normal CDF at 8 evenly spaced probabilities from p = 0.9677083 down to 0.5 (0.5 itself left out) for the
# positive side, at 7 for the negative side (mirrored), and an exact zero, all divided by the largest, so that they
# span [-1, 1]. The top probability is 1 - (1/32 + 1/30) / 2 (halfway between the last quantiles of 32 and 30 equal
# parts, since the quantile at p = 1 is infinite). Equal-probability levels give each code the same share of
# normally distributed weights; the exact zero keeps zeros (and padding) exact; 8 + 7 + 1 = 16 = 2^4.
NF4_CODES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
             1.0)
# bitsandbytes' create_dynamic_map(signed=True) from its definition: for i = 6 - z = 0..6 fraction bits, the 2^i
# midpoints of linspace(0.1, 1, 2^i + 1) times 10^(i - 6), of both signs; and 0 and 1. 256 sorted values, computed
# in float32 as bitsandbytes computes them, so that they are its values to the bit.
DYNAMIC_MAP = tuple(sorted([0.0, 1.0] + [v for i in range(7) for m in [torch.linspace(0.1, 1, 2**i + 1)]
                                         for v in ((m[1:] + m[:-1]) / 2 * 10.0 ** (i - 6)).tolist()
                                         for v in (v, -v)]))
STATE = ("codes", "absmax_codes", "absmax_scales", "absmax_mean")  # NF4Weight's tensors, NF4Linear's buffers


@dataclass
class NF4Weight:
    """A weight in NF4: the tensors NF4Linear keeps as buffers, and the weight's (out, in) shape."""
    codes: torch.Tensor  # uint8 (blocks * 32,): two 4-bit indices into NF4_CODES per byte, the first in the high nibble
    absmax_codes: torch.Tensor  # uint8 (blocks,): the index in DYNAMIC_MAP nearest (absmax - mean) / its group's scale
    absmax_scales: torch.Tensor  # fp32 (ceil(blocks / 256),): the largest |absmax - mean| of each group of 256
    absmax_mean: torch.Tensor  # fp32 (): the mean absmax
    shape: tuple

    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in STATE)


def blocks_of(numel: int) -> int:
    """Blocks of 64 weights: the last one is padded with zeros (which change no absmax and decode to 0)."""
    return -(-numel // BLOCK)


def quantize_nf4(weight: torch.Tensor) -> NF4Weight:
    """A 2-D floating-point weight in NF4: per block of 64, the absmax and each weight's nearest code; the absmax
    values double-quantised. Computed in fp32 on the weight's device."""
    _check_weight(weight)
    blocks = _padded(weight.detach().float().flatten(), BLOCK)
    absmax = blocks.abs().amax(1)
    if not bool(torch.isfinite(absmax).all()):  # NaN and inf reach the absmax of their block
        raise ValueError("the weight holds NaN or infinite values; they cannot be quantized")
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]  # an all-zero block stays 0
    # The nearest code: the number of midpoints between neighbouring codes below the value (a tie goes down).
    index = torch.bucketize(scaled, _levels(NF4_CODES, scaled.device)[1], out_int32=True)
    codes = (index[:, 0::2] << 4 | index[:, 1::2]).to(torch.uint8).flatten()
    return NF4Weight(codes, *quantize_absmax(absmax), tuple(weight.shape))


def quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QLoRA's double quantisation: (uint8 indices into DYNAMIC_MAP, an fp32 scale per group of 256, the fp32 mean)."""
    mean = absmax.mean()
    centred = _padded(absmax - mean, ABSMAX_BLOCK)
    scales = centred.abs().amax(1)
    scaled = centred / scales.clamp_min(torch.finfo(torch.float32).tiny)[:, None]  # in [-1, 1]; a zero group stays 0
    index = torch.bucketize(scaled, _levels(DYNAMIC_MAP, absmax.device)[1], out_int32=True)  # the nearest value
    return index.to(torch.uint8).flatten()[:absmax.numel()], scales, mean


def dequantize_absmax(q: NF4Weight) -> torch.Tensor:
    """Every block's absmax (fp32), map[index] * scale + mean: off by at most half a gap of the map, times scale."""
    scales = q.absmax_scales.repeat_interleave(ABSMAX_BLOCK)[:q.absmax_codes.numel()]
    return _levels(DYNAMIC_MAP, q.absmax_codes.device)[0][q.absmax_codes.long()] * scales + q.absmax_mean


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight, code[index] * absmax computed in fp32 and rounded once to `dtype`."""
    _check_dtype(dtype, "dtype")
    pairs = F.embedding(q.codes.int(), _byte_values(q.codes.device))  # each byte's two weights at once: (bytes, 2)
    weights = pairs.view(-1, BLOCK).mul_(dequantize_absmax(q)[:, None])
    return weights.flatten()[:q.shape[0] * q.shape[1]].view(q.shape).to(dtype)


@functools.lru_cache(maxsize=None)
def _levels(codes: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A sorted code's values (fp32) and the midpoints between neighbours, for torch.bucketize."""
    values = torch.tensor(codes, device=device)
    return values, (values[1:] + values[:-1]) / 2


@functools.lru_cache(maxsize=None)
def _byte_values(device: torch.device) -> torch.Tensor:
    """(256, 2) fp32: the values of a byte's high and low 4-bit codes, so that one lookup decodes two weights."""
    codes, byte = torch.tensor(NF4_CODES, device=device), torch.arange(256, device=device)
    return torch.stack([codes[byte >> 4], codes[byte & 15]], 1)


def _padded(flat: torch.Tensor, size: int) -> torch.Tensor:
    """flat as rows of `size`, the last one completed with zeros."""
    return F.pad(flat, (0, -flat.numel() % size)).view(-1, size)


def _check_weight(weight) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"NF4 quantizes a 2-D (out_features, in_features) weight; got {shape}")
    if not weight.is_floating_point():
        raise ValueError(f"NF4 quantizes a floating-point weight; got dtype {weight.dtype}")
    if weight.numel() == 0 or weight.is_meta:
        raise ValueError(f"the weight {tuple(weight.shape)} on {weight.device} has no values to quantize")


def _check_dtype(dtype, what: str) -> None:
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"{what} is {dtype}; expected one of {', '.join(map(str, COMPUTE_DTYPES))}")


class _DequantizedLinear(torch.autograd.Function):
    """F.linear(x, layer.dequantize(x.dtype), bias), the weight rebuilt in the forward and again in the backward:
    left to autograd, F.linear would keep every layer's full-precision weight alive from the forward to the
    backward, a full-precision model during training (bitsandbytes' MatMul4Bit rebuilds it too). The weight is
    frozen: only x, and a bias unfrozen by hand, get gradients."""

    @staticmethod
    def forward(ctx, x, layer, bias):
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad @ ctx.layer.dequantize(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


class NF4Linear(nn.Module):
    """A frozen linear layer stored in NF4: forward(x) = F.linear(x, self.dequantize(x.dtype), self.bias).

    Buffers: `codes` (uint8) and the double-quantised absmax (`absmax_codes` uint8, `absmax_scales` and
    `absmax_mean` fp32); `bias` is a frozen nn.Parameter (or None) in `compute_dtype`. model.to(device) moves them
    all; model.to(dtype) (and .half(), .bfloat16()) casts the bias and sets compute_dtype, never the quantisation
    state: the codes are integers, and the fp32 scales are kept fp32 (rounded to 16 bits they would move every
    weight). A full-precision `weight` given to load_state_dict is quantized (how from_pretrained loads a 4-bit
    model tensor by tensor)."""
    unilora_adaptable = True  # unilora.py adapts it like an nn.Linear: W x + B A x, W being dequantize()

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: torch.dtype = torch.float32, device=None):
        """An empty layer (every weight 0) of the given shape, to be filled by load_state_dict; on the meta device,
        a shell that costs nothing. from_linear and from_weight make a quantized one."""
        super().__init__()
        if not all(type(n) is int and n > 0 for n in (in_features, out_features)):
            raise ValueError(f"in_features and out_features must be positive integers; got {in_features}, "
                             f"{out_features}")
        _check_dtype(compute_dtype, "compute_dtype")
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype
        blocks = blocks_of(in_features * out_features)
        self.register_buffer("codes", torch.zeros(blocks * BLOCK // 2, dtype=torch.uint8, device=device))
        self.register_buffer("absmax_codes", torch.zeros(blocks, dtype=torch.uint8, device=device))
        self.register_buffer("absmax_scales", torch.zeros(-(-blocks // ABSMAX_BLOCK), device=device))
        self.register_buffer("absmax_mean", torch.zeros((), device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    compute_dtype: torch.dtype | None = None) -> "NF4Linear":
        """weight (out, in) quantized, bias kept in compute_dtype (default: the weight's dtype), on the weight's
        device."""
        _check_weight(weight)
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != weight.shape[:1]):
            raise ValueError(f"bias must be a tensor of shape ({weight.shape[0]},), one value per output")
        compute_dtype = compute_dtype or weight.dtype
        layer = cls(weight.shape[1], weight.shape[0], bias is not None, compute_dtype, device="meta")
        layer.quantize_(weight)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(weight.device, compute_dtype), requires_grad=False)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None) -> "NF4Linear":
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear takes an nn.Linear; got {type(linear).__name__}")
        return cls.from_weight(linear.weight, linear.bias, compute_dtype)

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor) -> None:
        """Replace the stored weight by `weight` (out, in), quantized on its device."""
        if isinstance(weight, torch.Tensor) and tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"the weight has shape {tuple(weight.shape)}; this layer needs "
                             f"({self.out_features}, {self.in_features})")
        q = quantize_nf4(weight)
        for name in STATE:  # assigned, not copied: the meta shell's buffers become real ones
            setattr(self, name, getattr(q, name))

    def state(self) -> NF4Weight:
        return NF4Weight(*(getattr(self, name) for name in STATE), (self.out_features, self.in_features))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (out_features, in_features) in `dtype` (default: compute_dtype), rebuilt at every call."""
        return dequantize_nf4(self.state(), dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"the input's last dimension is {x.shape[-1]}; this layer takes {self.in_features}")
        return _DequantizedLinear.apply(x, self, self.bias)

    def _apply(self, fn, recurse=True):
        """model.to(device) moves the fp32 scales; model.to(dtype) casts the bias alone and sets compute_dtype."""
        kept = {name: self._buffers.pop(name) for name in ("absmax_scales", "absmax_mean")}  # registered last
        super()._apply(fn, recurse)
        self._buffers.update({name: t.to(self.codes.device) for name, t in kept.items()})
        probe = fn(torch.empty(0, dtype=self.compute_dtype))
        self.compute_dtype = probe.dtype if probe.dtype in COMPUTE_DTYPES else self.compute_dtype
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A full-precision `weight` (a checkpoint's) is quantized into the buffers; the rest loads as usual."""
        weight = state_dict.pop(prefix + "weight", None)
        if weight is not None:
            self.quantize_(weight)
            state_dict.update({prefix + name: getattr(self, name) for name in STATE})
        codes = state_dict.get(prefix + "absmax_codes")  # int8 ones hold an older linear code: refused, not misread
        if isinstance(codes, torch.Tensor) and codes.dtype != torch.uint8:
            raise ValueError(f"{prefix}absmax_codes is {codes.dtype}; expected torch.uint8 (indices into DYNAMIC_MAP)")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"compute_dtype={self.compute_dtype}")


def quantize_model(model: nn.Module, compute_dtype: torch.dtype | None = None, skip=SKIP) -> nn.Module:
    """Replace, in place, every nn.Linear of `model` by an NF4Linear computing in compute_dtype (default: each
    layer's own dtype), except those with a name component in `skip`. QLoRA quantizes the linear layers of the
    transformer blocks only: the embeddings, the norms and the output head (lm_head) stay in 16 bits (Dettmers et
    al. 2023); embeddings and norms are no nn.Linear, so they are kept whatever `skip` says. Only exact nn.Linear
    modules are replaced (a subclass may be read rather than called: nn.MultiheadAttention's out_proj). On the
    meta device (a model built to be loaded), the layers become NF4Linear shells that load_state_dict(...,
    assign=True) fills from full-precision weights."""
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    names = [name for name, m in model.named_modules() if type(m) is nn.Linear and not set(name.split(".")) & set(skip)]
    if not names:
        raise ValueError(f"the model has no nn.Linear layer outside skip={skip} to quantize")
    for name in names:
        linear = model.get_submodule(name)
        dtype = compute_dtype or linear.weight.dtype
        layer = NF4Linear(linear.in_features, linear.out_features, linear.bias is not None, dtype, device="meta") \
            if linear.weight.is_meta else NF4Linear.from_linear(linear, dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)  # the full-precision layer is dropped as we go
    return model


def resident_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers, each tensor counted once (tied ones too); on the meta device,
    the bytes the model would take, nothing allocated."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
