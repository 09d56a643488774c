"""Speed and memory of unilora.py, measured side by side in one run (never by a timed test).

    python bench.py                          # CPU, and CUDA too when a GPU is present (long on a CPU: see README)
    python bench.py --quick --threads 2      # a first look in under 2 minutes: smaller shapes, fewer repeats
    python bench.py --device cpu --threads 2 --repeats 7

Every row prints ours, the baseline, their time ratio ours/baseline (below 1: ours is faster), the target and
PASS/FAIL:
  1. a training step (forward, backward, AdamW) of a SmolLM2-135M-shaped Llama (random weights, every linear layer
     but lm_head, r = 4): Uni-LoRA d = 65,536 over LoRA, batch 1 x 64 and 4 x 256. Target <= 1.00: Uni-LoRA trains
     d numbers, LoRA D.
  2. the projection per step as the model does it (every layer's (A, B) looked up, forward and backward; the
     layers' own backward stubbed by one node that hands each matrix its gradient), at the SmolLM2 layer list
     (d = 65,536) and the Mistral-7B one (all 7 linears of 32 layers, d = 524,288):
     over the floor (one hand-written gather of D into a leaf split into the matrices, the same stub handing
     them their gradients, one index_add; no Lambda, no lookup, no node of ours): target <= 1.3; and over PEFT's formulation (its UniLora layer: an int64 index and a float scale per entry, shaped
     like each matrix, theta_d[index] * scale per matrix with autograd): target ours/PEFT <= 0.33 (3x faster).
  3. a training step of a RoBERTa-base-shaped encoder, query and value, d = 23,040, batch 16 x 128: target <= 1.00;
     resident projection state per LoRA entry (target <= 8 bytes; PEFT keeps 12) and the adapter file size.
  4. the 4-bit base (QLoRA's NF4, pretrained/nf4.py): a Uni-LoRA training step over NF4Linear layers against the
     same step over the fp32 base (informational, target <= 2.00); the bytes per weight an NF4Linear of Llama-2-7B's
     MLP shape keeps (target <= 0.53, over bf16's 2); the peak RSS gained while loading a SmolLM2-135M-shaped fp32
     checkpoint into 4 bits, over its size (target: the 4-bit model plus its largest tensor in fp32 and in bf16);
     a Llama-2-7B-shaped 4-bit model's bytes, counted on the meta device (target <= 0.30 of fp16).
  5. many tasks on one base (taskbank.py), at the SmolLM2-135M shape (all linear, d = 65,536, batch 32 x 16) and
     the RoBERTa-base GLUE shape (query and value, d = 23,040, a 2-class head trained beside it, batch 32 x 16): a
     training step on 32 rows of 8 tasks (4 rows each, interleaved) inside bank.rows(...) over the same step of the
     plain adapted model (one task) on 32 rows: target <= 1.25 (throughput >= 0.8x); a task's resident bytes
     (bank.nbytes; target: exactly 4d plus its head's tensors; beside a LoRA r=4 adapter of the same layers); the
     time of bank.add(name, file) and bank.remove(name), beside reading the file alone (informational).
Times are medians of interleaved rounds (each round runs every side once, the order reversed every other round,
the garbage collector never inside a timed call), so drifts in machine load hit all sides alike; each row also
gives the range of ours/baseline over the rounds, its spread. --quick keeps every row but shrinks the models (4 of
30 Llama layers with d scaled to keep D/d, batch 1 x 64 only, RoBERTa batch 2 x 64; the task bank's batches 32 x 8
and 32 x 4) and says so in the row.
"""
import argparse
import contextlib
import copy
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import projections
import unilora
from pretrained import CausalLM, Encoder, save_safetensors
from pretrained.nf4 import NF4Linear, quantize_model, resident_bytes
from recipes.glue_model import GlueModel
from taskbank import TaskBank

SMOLLM2_135M = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
                    rope_theta=100000.0, max_position_embeddings=8192, hidden_act="silu", tie_word_embeddings=True)
# Only its layer shapes are used (the projection rows): the dimensions are Mistral-7B's, the rest is irrelevant.
MISTRAL_7B = dict(SMOLLM2_135M, vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
ROBERTA_BASE = {"model_type": "roberta", "vocab_size": 50265, "hidden_size": 768, "num_hidden_layers": 12,
                "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
                "max_position_embeddings": 514, "type_vocab_size": 1, "layer_norm_eps": 1e-5, "pad_token_id": 1,
                "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}


def interleaved_times(fns: dict, repeats: int, device) -> dict:
    """Seconds per call of each fn, `repeats` rounds; each round calls every fn once, in an order reversed every
    other round, so that drifts in machine load and the cost of running after one another hit all sides alike.
    The garbage collector runs between calls, never inside one."""
    def clock(fn):
        gc.collect()
        gc.disable()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        gc.enable()
        return elapsed
    for fn in fns.values():  # warm-up: allocator, autograd graph, kernels, cached tables
        clock(fn)
    times = {name: [] for name in fns}
    for i in range(repeats):
        for name in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
            times[name].append(clock(fns[name]))
    return times


def compare(times: dict, ours: str, baseline: str) -> tuple[float, float, float, str]:
    """(median ours, median baseline, their ratio, the range of the ratio over the rounds: its spread)."""
    a, b = statistics.median(times[ours]), statistics.median(times[baseline])
    per_round = [x / y for x, y in zip(times[ours], times[baseline])]
    return a, b, a / b, f"rounds {min(per_round):.2f}-{max(per_round):.2f}"


FAILED = []  # the rows that missed their target: the exit status says so (a script or CI reads it)


def row(device, what, ours, baseline, ratio, target, better="faster", worse="slower", spread=""):
    """One table row; ratio is ours/baseline (time or bytes): below 1 ours is smaller, i.e. faster."""
    verdict = f"{1 / ratio:.2f}x {better}" if ratio < 1 else f"{ratio:.2f}x {worse}" if ratio > 1 else "equal"
    verdict += f"; {spread}" if spread else ""
    check(device, what, ours, baseline, f"{ratio:.3f} ({verdict})", f"<= {target:.2f}", ratio <= target)


def check(device, what, ours, baseline, ratio: str, target: str, ok):
    """One table row with its verdict given: ok True PASS, False FAIL (named in the exit status), None
    informational (no target: "-")."""
    status = "-" if ok is None else "PASS" if ok else "FAIL"
    FAILED.extend([what] if ok is False else [])
    print(f"| {device} | {what} | {ours} | {baseline} | {ratio} | {target} | {status} |", flush=True)


# ---------------------------------------------------------------------------------------- training steps


def step_times(device, base: nn.Module, make_adapter: dict, batch_fn, loss_fn, repeats: int) -> dict:
    """Seconds per training step (forward, backward, AdamW) for each way of adapting `base`."""
    steps = {}
    for name, apply in make_adapter.items():
        model = copy.deepcopy(base)
        adapter = apply(model)
        model.to(device).train()
        optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-3, weight_decay=0.0)

        def step(model=model, optimizer=optimizer):
            with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
                loss = loss_fn(model, *batch_fn())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        steps[name] = step
    return interleaved_times(steps, repeats, device)


def llama_step_rows(device, quick: bool, repeats: int):
    layers = 4 if quick else SMOLLM2_135M["num_hidden_layers"]
    config = dict(SMOLLM2_135M, num_hidden_layers=layers)
    d = round(65536 * layers / 30)  # the same D/d as the real recipe
    torch.manual_seed(0)
    base = CausalLM(config)
    adapters = {"lora": lambda m: projections.apply_lora(m, r=4), "unilora": lambda m: unilora.apply_unilora(m, d, r=4)}

    def lm_loss(model, ids):
        logits = model(ids)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())

    for batch, length in ((1, 64),) if quick else ((1, 64), (4, 256)):
        ids = torch.randint(0, config["vocab_size"], (batch, length), device=device)
        ours, lora, ratio, spread = compare(step_times(device, base, adapters, lambda: (ids,), lm_loss, repeats),
                                            "unilora", "lora")
        row(device.type, f"train step, SmolLM2-135M shape{f' ({layers} of 30 layers)' if quick else ''}, "
            f"{batch}x{length}, all linear, r=4", f"Uni-LoRA d={d:,}: {ours:.3f} s", f"LoRA: {lora:.3f} s", ratio,
            1.00, spread=spread)


def roberta_step_row(device, quick: bool, repeats: int):
    batch, length = (2, 64) if quick else (16, 128)
    torch.manual_seed(0)
    base = Encoder(ROBERTA_BASE)
    targets = ("query", "value")
    adapters = {"lora": lambda m: projections.apply_lora(m, r=4, targets=targets),
                "unilora": lambda m: unilora.apply_unilora(m, 23040, r=4, targets=targets)}
    ids = torch.randint(3, ROBERTA_BASE["vocab_size"], (batch, length), device=device)
    t = step_times(device, base, adapters, lambda: (ids, torch.ones_like(ids)),
                   lambda model, ids, mask: model(ids, mask)[:, 0].float().square().mean(), repeats)
    ours, lora, ratio, spread = compare(t, "unilora", "lora")
    row(device.type, f"train step, RoBERTa-base shape, {batch}x{length}, query+value, r=4",
        f"Uni-LoRA d=23,040: {ours:.3f} s", f"LoRA: {lora:.3f} s", ratio, 1.00, spread=spread)


# ---------------------------------------------------------------------------------------- the projection


def adapted_shapes(config: dict, r: int = 4) -> list[tuple[int, int]]:
    """(A, B) shapes of the layers apply_unilora adapts by default in a CausalLM of this config, in theta_D's order:
    the model's own layer list, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = CausalLM(config)
    layers = [model.get_submodule(name) for name in unilora.find_targets(model, None)]
    return [shape for m in layers for shape in ((r, m.in_features), (m.out_features, r))]


class LayersBackward(torch.autograd.Function):
    """One scalar over every (A, B) whose backward hands each its gradient: the layers' own backward, stubbed,
    so that the gradients reach the projection as in a model (from nodes, not from hundreds of backward roots)."""

    @staticmethod
    def forward(ctx, grads, *pieces):
        ctx.grads = grads
        return pieces[0].new_zeros(())

    @staticmethod
    def backward(ctx, _):
        return None, *ctx.grads


def projection_rows(device, name: str, shapes: list, d: int, repeats: int):
    sizes = [a * b for a, b in shapes]
    D, L = sum(sizes), len(shapes) // 2
    projection = unilora.balanced_projection(sizes, d, 0, True).to(device)
    theta = nn.Parameter(torch.empty(d, device=device).uniform_(-0.02, 0.02))
    shared = unilora.SharedVector(theta, projection, shapes)
    grads = [torch.randn(s, device=device) for s in shapes]

    def ours():  # every layer asks for its (A, B), as the model's forward does; then one backward
        shared.refresh()  # a new step: theta_d has just been updated
        pieces = [t for i in range(L) for t in shared.factors()[i]]
        LayersBackward.apply(grads, *pieces).backward()
        theta.grad = None

    idx, plain = projection.idx, theta.detach()

    def floor():  # what any autograd implementation pays: one gather of D into a leaf, its matrices as views, the
        # layers' gradients delivered through the same stub as ours (autograd's split backward: one cat), one
        # index_add into 2d slots. No Lambda, no per-layer lookup, no node of ours.
        leaf = torch.index_select(torch.cat([plain, -plain]), 0, idx).requires_grad_()
        LayersBackward.apply(grads, *(t.view(s) for t, s in zip(leaf.split(sizes), shapes))).backward()
        plain.new_zeros(2 * d).index_add_(0, idx, leaf.grad)

    # PEFT's formulation (its UniLora layer): per matrix, an int64 column and a float scale per entry, shaped like
    # the matrix, and theta_d[index] * scale with autograd: a gather and a multiply per matrix, and in the backward
    # a multiply, a zero-filled d-vector, an accumulating index_put and an add into theta_d's gradient per matrix.
    columns = idx.long() % d
    counts = torch.bincount(columns, minlength=d).float()
    scales = (1 - 2 * (idx >= d).float()) / counts[columns].sqrt()
    column = [c.view(shape) for c, shape in zip(columns.split(sizes), shapes)]
    scale = [s.view(shape) for s, shape in zip(scales.split(sizes), shapes)]

    def peft():
        pieces = [theta[c] * s for c, s in zip(column, scale)]
        LayersBackward.apply(grads, *pieces).backward()
        theta.grad = None

    with torch.no_grad():  # all three compute the same P theta_d
        ours_D = torch.cat([t.flatten() for ab in shared.factors() for t in ab])
        assert torch.allclose(ours_D, torch.cat([(theta[c] * s).flatten() for c, s in zip(column, scale)]), atol=1e-7)
    t = interleaved_times({"ours": ours, "floor": floor, "peft": peft}, repeats, device)
    what = f"projection per step fwd+bwd, {name} ({L} layers, D={D:,}, d={d:,})"
    for baseline, label, target in (("floor", "floor (gather D, split, stub, index_add)", 1.30),
                                    ("peft", "PEFT's per-layer indexing", 0.33)):
        a, b, ratio, spread = compare(t, "ours", baseline)
        row(device.type, what, f"{1e3 * a:.1f} ms", f"{label}: {1e3 * b:.1f} ms", ratio, target, spread=spread)
    return idx.element_size(), column[0].element_size() + scale[0].element_size()


def adapter_file_bytes() -> int:
    model = Encoder(ROBERTA_BASE)
    adapter = unilora.apply_unilora(model, 23040, r=4, targets=("query", "value"))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "adapter.pt")
        adapter.save(path)
        return os.path.getsize(path)


# ---------------------------------------------------------------------------------------- the 4-bit base (NF4)

# Only its shapes are used (meta device): Llama-2-7B's dimensions, untied head, 6.74B parameters.
LLAMA2_7B = dict(SMOLLM2_135M, vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, rope_theta=10000.0, max_position_embeddings=4096,
                 tie_word_embeddings=False)


def nf4_step_row(device, quick: bool, repeats: int):
    """A Uni-LoRA training step over the 4-bit base (every block linear an NF4Linear, its weight rebuilt in each
    forward and backward) against the same step over the fp32 base: the time QLoRA's memory costs. Informational:
    the target only flags a slowdown beyond 2x."""
    layers = 4 if quick else SMOLLM2_135M["num_hidden_layers"]
    config, d = dict(SMOLLM2_135M, num_hidden_layers=layers), round(65536 * layers / 30)
    torch.manual_seed(0)
    base = CausalLM(config)
    adapters = {"nf4": lambda m: unilora.apply_unilora(quantize_model(m), d, r=4),
                "fp32": lambda m: unilora.apply_unilora(m, d, r=4)}
    what = (f"train step, SmolLM2-135M shape{f' ({layers} of 30 layers)' if quick else ''}, 1x64, Uni-LoRA "
            f"d={d:,}, r=4, on the 4-bit NF4 base")
    try:
        adapters["nf4"](copy.deepcopy(base))
    except ValueError as e:  # unilora.py without NF4Linear support
        print(f"| {device.type} | {what} | skipped: unilora.py cannot adapt NF4Linear ({e}) | | | | |", flush=True)
        return
    ids = torch.randint(0, config["vocab_size"], (1, 64), device=device)

    def lm_loss(model, ids):
        logits = model(ids)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())

    ours, fp32, ratio, spread = compare(step_times(device, base, adapters, lambda: (ids,), lm_loss, repeats),
                                        "nf4", "fp32")
    row(device.type, what, f"4-bit base: {ours:.3f} s", f"fp32 base: {fp32:.3f} s", ratio, 2.00, spread=spread)


def nf4_bytes_row():
    """What a big layer keeps: 4-bit codes, an 8-bit absmax per 64 weights, an fp32 scale per 256 of those."""
    layer = NF4Linear.from_weight(torch.randn(11008, 4096))  # Llama-2-7B's MLP shape
    per_weight = sum(b.nbytes for b in layer.buffers()) / (11008 * 4096)
    row("any", "resident bytes per weight, NF4Linear 11008x4096 (Llama-2-7B MLP)",
        f"{per_weight:.4f} B (codes, 8-bit absmax, fp32 scales)", "bf16: 2 B", per_weight / 2, 0.53 / 2, "smaller",
        "larger")


LOAD = """import sys, torch
from pretrained import CausalLM
from pretrained.nf4 import resident_bytes
folder, quantize, dtype, threads = sys.argv[1:]
torch.set_num_threads(int(threads))
def peak_rss():  # kB: this process's high-water mark since it started (getrusage's would include its parent's)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
before = peak_rss()
model = CausalLM.from_pretrained(folder, getattr(torch, dtype), None if quantize == "none" else quantize)
print(1024 * (peak_rss() - before), resident_bytes(model))
"""


def load_peak(folder: str, quantize: str, dtype: str, threads: int) -> tuple[int, int]:
    """(peak resident memory (RSS) gained while loading, the loaded model's bytes), in a fresh process: peak RSS
    counts every allocation, torch's included, but only ever grows, so each load needs a process of its own. Read
    from /proc (VmHWM): getrusage's ru_maxrss keeps the high-water mark of the parent that started the process."""
    out = subprocess.run([sys.executable, "-c", LOAD, folder, quantize, dtype, str(threads)], capture_output=True,
                         text=True, check=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    peak, size = out.stdout.split()[-2:]
    return int(peak), int(size)


def nf4_load_row(threads: int):
    """Peak memory of CausalLM.from_pretrained(quantize="nf4") on a SmolLM2-135M-shaped fp32 checkpoint (random
    weights, all 30 layers even with --quick: nothing here is timed), against the checkpoint's size. Target: the
    design's bound, the 4-bit model plus the largest checkpoint tensor (the embedding) in fp32 and cast to bf16."""
    what = "peak memory loading a SmolLM2-135M-shaped fp32 checkpoint into 4 bits (bf16 embeddings)"
    if not os.path.exists("/proc/self/status"):
        print(f"| any | {what} | skipped: peak RSS is read from /proc (Linux only) | | | | |")
        return
    torch.manual_seed(0)
    sd = {k: v for k, v in CausalLM(SMOLLM2_135M).state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    fp32, largest = sum(t.nbytes for t in sd.values()), max(t.nbytes for t in sd.values())
    with tempfile.TemporaryDirectory() as tmp:
        save_safetensors(sd, os.path.join(tmp, "model.safetensors"))
        del sd
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(SMOLLM2_135M, f)
        peak, size = load_peak(tmp, "nf4", "bfloat16", threads)
        peak_fp32, _ = load_peak(tmp, "none", "float32", threads)
    row("any", what, f"peak RSS +{peak / 2**20:.0f} MiB (the model: {size / 2**20:.0f} MiB)",
        f"fp32 checkpoint: {fp32 / 2**20:.0f} MiB (loaded in fp32: peak RSS +{peak_fp32 / 2**20:.0f} MiB)",
        peak / fp32, (size + 1.5 * largest) / fp32, "smaller", "larger")


def nf4_7b_row():
    """A Llama-2-7B-shaped model in 4 bits, counted on the meta device (the bytes its tensors would take, nothing
    allocated): the blocks' linears in NF4, the embeddings, norms and lm_head in bf16, as QLoRA keeps them."""
    with torch.device("meta"):
        model = CausalLM(LLAMA2_7B)
    n = sum(p.numel() for p in model.parameters())
    ours = resident_bytes(quantize_model(model, torch.bfloat16).to(torch.bfloat16))
    row("any", "Llama-2-7B shape in memory: 4-bit blocks, bf16 embeddings, norms, lm_head (meta device)",
        f"{ours / 2**30:.2f} GiB", f"fp16: {2 * n / 2**30:.2f} GiB ({n / 1e9:.2f}B parameters)", ours / (2 * n), 0.30,
        "smaller", "larger")


def nf4_rows(devices, quick: bool, repeats: int, threads: int):
    for device in devices:
        nf4_step_row(device, quick, repeats)
    nf4_bytes_row()
    nf4_load_row(threads)
    nf4_7b_row()


# ---------------------------------------------------------------------------------------- many tasks on one base

BANK_TASKS, BANK_ROWS = 8, 32  # a mixed batch: 32 rows drawn from 8 tasks, 4 rows each, interleaved


def scaled_d(model: nn.Module, targets, full_d: int, full_D: int, r: int = 4) -> int:
    """d for the layers apply_unilora adapts in `model`: full_d where their D is the full shape's full_D, else scaled
    to keep D/d (--quick's fewer layers, the tests' tiny shapes)."""
    layers = [model.get_submodule(name) for name in unilora.find_targets(model, targets)]
    return max(1, round(full_d * sum(r * (m.in_features + m.out_features) for m in layers) / full_D))


def bank_shapes(quick: bool):
    """The two shapes of the bank rows: (label, model, targets, d, batch of 32 rows, loss, heads trained beside
    theta_d). A SmolLM2-135M-shaped Llama (every linear but lm_head, d = 65,536 at D = 1,221,120: the d of
    train_math.py and train_instruct.py) and a RoBERTa-base-shaped GLUE model (query and value, d = 23,040, the
    paper's GLUE d; its classification head trained beside theta_d as in train_glue.py)."""
    layers = 4 if quick else SMOLLM2_135M["num_hidden_layers"]
    config = dict(SMOLLM2_135M, num_hidden_layers=layers)
    length = 8 if quick else 16
    torch.manual_seed(0)
    llama = CausalLM(config)
    d = scaled_d(llama, None, 65536, 1_221_120)
    ids = torch.randint(0, config["vocab_size"], (BANK_ROWS, length))

    def lm_loss(model, ids):
        logits = model(ids)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    yield (f"SmolLM2-135M shape{f' ({layers} of 30 layers)' if quick else ''}, all linear", llama, None, d, (ids,),
           lm_loss, ())

    length = 4 if quick else 16
    torch.manual_seed(0)
    glue = GlueModel(Encoder(ROBERTA_BASE), 2)
    d = scaled_d(glue, ("query", "value"), 23040, 147_456)
    ids = torch.randint(3, ROBERTA_BASE["vocab_size"], (BANK_ROWS, length))
    labels = torch.randint(0, 2, (BANK_ROWS,))
    yield ("RoBERTa-base shape, query+value, 2-class head", glue, ("query", "value"), d,
           (ids, torch.ones_like(ids), torch.zeros_like(ids), labels),
           lambda model, ids, mask, types, y: F.cross_entropy(model(ids, mask, types).float(), y), ("classifier",))


def make_bank(model: nn.Module, adapter, tasks: int) -> tuple:
    """A TaskBank over the adapted `model` holding `tasks` tasks (copies of its adapter, each its own random
    theta_d), and their names."""
    bank = TaskBank(model, adapter)
    names = [f"task{i}" for i in range(tasks)]
    generator = torch.Generator().manual_seed(1)
    for name in names:
        bank.add(name)
        with torch.no_grad():
            bank.vectors[name].copy_(torch.empty(adapter.config["d"]).uniform_(-0.02, 0.02, generator=generator))
    return bank, names


def mixed_batch_row(device, what: str, base: nn.Module, targets, d: int, batch: tuple, loss_fn, keep, repeats: int):
    """A training step (forward, backward, AdamW) on 32 rows of 8 tasks inside bank.rows(...), against the same step
    of the plain adapted model (one task, outside rows) on the same 32 rows. Returns the bank, for the bytes row."""
    batch = tuple(t.to(device) for t in batch)
    steps, banks = {}, {}
    for side in ("mixed", "single"):
        model = copy.deepcopy(base)
        adapter = unilora.apply_unilora(model, d, r=4, targets=targets, keep_trainable=keep)
        model.to(device).train()
        if side == "mixed":
            bank, names = make_bank(model, adapter, BANK_TASKS)
            rows = [names[i % BANK_TASKS] for i in range(len(batch[0]))]
            params, context = list(bank.parameters()), lambda bank=bank, rows=rows: bank.rows(rows)
            banks[side] = bank
        else:
            params = [*adapter.parameters(), *(t for t in adapter.trained_tensors().values() if t.requires_grad)]
            context = contextlib.nullcontext
        optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)

        def step(model=model, optimizer=optimizer, context=context):
            with context(), torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
                loss = loss_fn(model, *batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        steps[side] = step
    mixed, single, ratio, spread = compare(interleaved_times(steps, repeats, device), "mixed", "single")
    row(device.type, f"mixed batch train step, {what}, {len(batch[0])}x{batch[0].shape[1]}, r=4, d={d:,}",
        f"{BANK_TASKS} tasks x {len(batch[0]) // BANK_TASKS} rows (interleaved): {mixed:.3f} s, throughput "
        f"{single / mixed:.2f}x of single", f"1 task (the plain adapted model): {single:.3f} s", ratio, 1 / 0.8,
        spread=spread)
    return banks["mixed"]


def bank_bytes_row(what: str, bank, keep) -> None:
    """What one task costs in the bank (bank.nbytes), checked equal to 4d plus its heads' tensors (else FAIL), against
    a LoRA r=4 adapter of the same layers (4 bytes x r (in + out) per layer) with the same heads."""
    name, adapter, model = bank.names()[0], bank.adapter, bank.model
    d = adapter.config["d"]
    heads = sum(t.numel() * t.element_size() for n in keep for m in [model.get_submodule(n)]
                for t in [*m.parameters(), *m.buffers()])
    lora = sum(4 * 4 * (m.in_features + m.out_features) for _, m in adapter.layers())
    ours, expected = bank.nbytes(name), 4 * d + heads
    with_head = " + the same head" if heads else ""
    check("any", f"resident bytes per task, {what}, d={d:,}", f"{ours:,} bytes ({ours / 1e6:.3f} MB)",
          f"LoRA r=4 of the same layers{with_head}: {lora + heads:,} bytes ({(lora + heads) / 1e6:.3f} MB)",
          f"{ours / (lora + heads):.3f}", f"== 4d{f' + head {heads:,}' if heads else ''} = {expected:,} bytes",
          ours == expected)


def bank_add_row(device, what: str, bank, repeats: int) -> None:
    """Median time of bank.add(name, path) from a saved adapter file and of bank.remove(name), interleaved with
    reading the same file alone (unilora.read_adapter_file: what any load pays). Informational: no target."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "adapter.pt")
        bank.adapter.save(path)
        size, added, fresh = os.path.getsize(path), [], (f"added{i}" for i in itertools.count())

        def add():
            added.append(next(fresh))
            bank.add(added[-1], path)

        for _ in range(2):  # remove() has a task to take whatever the order of a round (add first or last)
            add()
        times = interleaved_times({"add": add, "remove": lambda: bank.remove(added.pop(0)),
                                   "read": lambda: unilora.read_adapter_file(path, unilora.UniLoRA)}, repeats, device)
    for name in added:
        bank.remove(name)
    add_s, read_s, ratio, spread = compare(times, "add", "read")
    remove_s = statistics.median(times["remove"])
    check(device.type, f"time to add / remove a task, {what}, from a {size:,}-byte adapter file",
          f"add: {1e3 * add_s:.2f} ms, remove: {1e3 * remove_s:.3f} ms",
          f"reading the file alone: {1e3 * read_s:.2f} ms", f"{ratio:.3f} (add / read; {spread})", "informational",
          None)


def bank_rows(devices, quick: bool, repeats: int) -> None:
    """taskbank.py: per shape, the mixed batch on each device, a task's bytes once, add / remove on each device;
    `repeats` rounds each (the step rows' count: add / remove take milliseconds, the rounds' garbage collections
    most of the time)."""
    for what, base, targets, d, batch, loss_fn, keep in bank_shapes(quick):
        for i, device in enumerate(devices):
            bank = mixed_batch_row(device, what, base, targets, d, batch, loss_fn, keep, repeats)
            if i == 0:
                bank_bytes_row(what, bank, keep)
            bank_add_row(device, what, bank, repeats)
            del bank


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    parser.add_argument("--repeats", type=int, help="timed repeats per row (default 9 steps / 25 projections; "
                                                    "--quick: 5 / 7)")
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats: a first look")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [torch.device(d) for d in devices if d == "cpu" or torch.cuda.is_available()]
    step_repeats = args.repeats or (5 if args.quick else 9)
    projection_repeats = args.repeats or (7 if args.quick else 25)
    print(f"torch {torch.__version__}, {args.threads} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no CUDA device")
          + (", --quick" if args.quick else ""))
    print("\n| device | measurement | ours | baseline | ours / baseline | target | result |\n|---|---|---|---|---|---|---|")
    start = time.time()
    for device in devices:
        llama_step_rows(device, args.quick, step_repeats)
        bytes_ours, bytes_peft = projection_rows(device, "SmolLM2-135M", adapted_shapes(SMOLLM2_135M), 65536,
                                                 projection_repeats)
        projection_rows(device, "Mistral-7B", adapted_shapes(MISTRAL_7B), 524288, projection_repeats)
        roberta_step_row(device, args.quick, step_repeats)
    row("any", "projection state per LoRA entry", f"{bytes_ours} bytes (int32 signed index)",
        f"{bytes_peft} bytes (int64 index + fp32 scale)", bytes_ours / bytes_peft, 8 / bytes_peft, "smaller", "larger")
    size = adapter_file_bytes()
    row("any", "adapter file, d=23,040, nothing else trained", f"{size:,} bytes", f"4d = {4 * 23040:,} bytes",
        size / (4 * 23040), 1 + 4096 / (4 * 23040), "smaller", "larger")
    nf4_rows(devices, args.quick, step_repeats, args.threads)
    bank_rows(devices, args.quick, step_repeats)
    print(f"\n{time.time() - start:.0f} s")
    if FAILED:
        raise SystemExit(f"{len(FAILED)} row(s) missed the target: {'; '.join(FAILED)}")


if __name__ == "__main__":
    main()
