"""What a run costs, recorded in its results.json: the process's peak memory, and the time and memory of Uni-LoRA's
projection P theta_d.

Why it exists: the projections are compared on cost as much as on accuracy (--table shows both), so the numbers
are measured the same way for every run.
"""
import statistics
import sys
import time

import torch

def projection_cost(adapter, repeats=20):
    """P theta_d forward + backward, median milliseconds (once per forward pass), and the bytes P is stored in."""
    if not hasattr(adapter, "project"):
        return {}
    times = []
    for _ in range(repeats):
        if adapter.theta_d.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        adapter.project().sum().backward()
        if adapter.theta_d.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    adapter.theta_d.grad = None
    stored = sum(b.numel() * b.element_size() for b in adapter.shared.projection.buffers())
    return {"projection_ms": round(1000 * statistics.median(times), 3), "projection_bytes": stored}


def peak_memory_mb():
    """Peak resident memory of this process (and peak CUDA memory when used), in MiB."""
    import resource  # Unix only; imported here so that the rest of the script runs anywhere
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_mb": round(rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10), 1)}  # bytes on macOS
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated():
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return out
