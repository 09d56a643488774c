"""Speed and memory of unilora.py, measured side by side in one run (never by a timed test).

    python bench.py                      # CPU, and CUDA too when a GPU is present
    python bench.py --device cpu --threads 2 --steps 5

Prints one table of ratios:
  1. a training step of a RoBERTa-base-shaped encoder (12 layers, hidden 768, FFN 3072, random weights,
     batch 16 x 128, query and value adapted, r = 4): Uni-LoRA (d = 23,040) over plain LoRA. Target <= 1.03.
  2. the projection alone, forward + backward, at D = 147,456 / 1.1M / 12.5M: the naive autograd formulation
     `theta_d[idx] * scale` (int64 index and a float scale per entry, as in PEFT's port) over ours. Target >= 2.
  3. resident projection state in bytes per LoRA entry (target <= 8; PEFT keeps 12) and the adapter file size.
Times are medians of interleaved repeats, so drifts in machine load hit both sides alike.
"""
import argparse
import copy
import os
import statistics
import tempfile
import time

import torch

import unilora
from pretrained import Encoder

ROBERTA_BASE = {"model_type": "roberta", "vocab_size": 50265, "hidden_size": 768, "num_hidden_layers": 12,
                "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
                "max_position_embeddings": 514, "type_vocab_size": 1, "layer_norm_eps": 1e-5, "pad_token_id": 1,
                "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}


def timer(device):
    def run(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start
    return run


def interleaved_medians(fns: dict, repeats: int, device) -> dict:
    clock = timer(device)
    for fn in fns.values():  # warm-up: allocator, autograd graph, kernels
        clock(fn)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(clock(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def training_step_ratio(device, steps: int, batch: int, length: int) -> dict:
    torch.manual_seed(0)
    base = Encoder(ROBERTA_BASE).to(device).train()
    models, optimizers = {}, {}
    for method in ("lora", "unilora"):
        model = copy.deepcopy(base)
        if method == "lora":
            adapter = unilora.apply_lora(model, r=4, targets=("query", "value"))
        else:
            adapter = unilora.apply_unilora(model, 23040, r=4, targets=("query", "value"))
        models[method] = model
        optimizers[method] = torch.optim.AdamW(adapter.parameters(), lr=1e-3, weight_decay=0.0)
    ids = torch.randint(3, ROBERTA_BASE["vocab_size"], (batch, length), device=device)
    mask = torch.ones_like(ids)

    def step(method):
        def run():
            with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
                hidden = models[method](ids, mask)
            hidden[:, 0].float().square().mean().backward()
            optimizers[method].step()
            optimizers[method].zero_grad(set_to_none=True)
        return run

    med = interleaved_medians({m: step(m) for m in models}, steps, device)
    return {"lora_s": med["lora"], "unilora_s": med["unilora"], "ratio": med["unilora"] / med["lora"]}


def projection_ratio(device, D: int, d: int, repeats: int) -> dict:
    signed_idx = unilora.make_projection(D, d, seed=0)
    column, negative = signed_idx.long() % d, signed_idx.long() >= d
    counts = torch.bincount(column, minlength=d)
    theta = torch.empty(d, device=device).uniform_(-0.02, 0.02).requires_grad_()
    grad_out = torch.randn(D, device=device)
    # The naive formulation: an int64 index and a float per entry (sign / sqrt(n_j)), autograd through indexing.
    naive_idx = column.to(device)
    naive_scale = ((1 - 2 * negative.float()) / counts[column].float().sqrt()).to(device)
    ours_idx = signed_idx.to(device)

    def naive():
        (theta[naive_idx] * naive_scale).backward(grad_out)
        theta.grad = None

    def ours():
        unilora.Project.apply(theta, ours_idx, D).backward(grad_out)
        theta.grad = None

    with torch.no_grad():  # both compute the same P theta_d
        assert torch.allclose(theta[naive_idx] * naive_scale, unilora.Project.apply(theta, ours_idx, D))
    med = interleaved_medians({"naive": naive, "ours": ours}, repeats, device)
    return {"naive_ms": 1e3 * med["naive"], "ours_ms": 1e3 * med["ours"], "speedup": med["naive"] / med["ours"],
            "ours_bytes": ours_idx.element_size(), "naive_bytes": naive_idx.element_size() + naive_scale.element_size()}


def adapter_file_bytes() -> int:
    model = Encoder(ROBERTA_BASE)
    adapter = unilora.apply_unilora(model, 23040, r=4, targets=("query", "value"))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "adapter.pt")
        adapter.save(path)
        return os.path.getsize(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per method")
    parser.add_argument("--repeats", type=int, default=15, help="timed projection repeats")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [torch.device(d) for d in devices if d == "cpu" or torch.cuda.is_available()]
    print(f"torch {torch.__version__}, {args.threads} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no CUDA device"))
    print("\n| device | measurement | ours | baseline | ratio | target |\n|---|---|---|---|---|---|")
    for device in devices:
        step = training_step_ratio(device, args.steps, args.batch, args.length)
        print(f"| {device.type} | train step, RoBERTa-base shape, {args.batch}x{args.length}, q+v, r=4 "
              f"| Uni-LoRA d=23,040: {step['unilora_s']:.3f} s | LoRA: {step['lora_s']:.3f} s "
              f"| {step['ratio']:.3f} | <= 1.03 |", flush=True)
        for D, d in ((147_456, 23_040), (1_100_000, 131_072), (12_500_000, 524_288)):
            p = projection_ratio(device, D, d, args.repeats)
            print(f"| {device.type} | projection fwd+bwd, D={D:,}, d={d:,} | {p['ours_ms']:.2f} ms "
                  f"| naive theta_d[idx]*scale: {p['naive_ms']:.2f} ms | {p['speedup']:.2f}x faster | >= 2x |",
                  flush=True)
    print(f"| any | projection state per LoRA entry | {p['ours_bytes']} bytes (int32 signed index) | {p['naive_bytes']} bytes (int64 index + fp32 scale) | "
          f"{p['naive_bytes'] / p['ours_bytes']:.1f}x smaller | <= 8 bytes |")
    size = adapter_file_bytes()
    print(f"| any | adapter file, d=23,040 | {size:,} bytes | 4d + 4 KiB = {4 * 23040 + 4096:,} bytes "
          f"| {size / (4 * 23040):.3f} x 4d | < 4d + 4 KiB |")


if __name__ == "__main__":
    main()
