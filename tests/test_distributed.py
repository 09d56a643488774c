"""Data parallelism (torchrun) on CPU: two processes with the gloo backend on 127.0.0.1, compared with one process."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from recipes import training


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_torchrun_copy(rank, world, port, fn, out, *args):
    """What torchrun does for one copy: set the environment, then run the script's code."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ranks = training.start_data_parallel("cpu")
    try:
        result = fn(ranks, *args)
        if ranks.main:
            torch.save(result, out)
    finally:
        training.stop_data_parallel(ranks)


def run_copies(world, fn, tmp_path, *args):
    out = str(tmp_path / "result.pt")
    mp.spawn(as_torchrun_copy, args=(world, free_port(), fn, out) + args, nprocs=world, join=True)
    return torch.load(out, weights_only=True)


def gradient_of_one_step(ranks, x, y, seed):
    """A global batch's gradient, each copy summing only its rows, every loss divided by the global batch size."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(x.shape[1], 1).double()
    params = list(model.parameters())
    training.copy_from_main(params, ranks)
    rows = training.my_share(list(range(len(x))), ranks)
    if rows:
        loss = ((model(x[rows]).squeeze(1) - y[rows]) ** 2).sum() / len(x)
        loss.backward()
    training.sum_gradients(params, ranks)
    order = training.gather_shares([f"row{i}" for i in rows], ranks)
    return {"grads": [p.grad for p in params], "order": order}


@pytest.mark.parametrize("n_rows", [5, 1])  # 1 row: the second copy has nothing and must add zeros
def test_two_copies_sum_to_the_one_process_gradient(tmp_path, n_rows):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n_rows, 3, generator=g, dtype=torch.float64), torch.randn(n_rows, generator=g, dtype=torch.float64)
    one = gradient_of_one_step(training.Ranks(), x, y, seed=1)
    two = run_copies(2, gradient_of_one_step, tmp_path, x, y, 1)
    for a, b in zip(one["grads"], two["grads"]):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=0)
    assert two["order"] == [f"row{i}" for i in range(n_rows)]


def test_without_torchrun_nothing_distributed_happens(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ranks = training.start_data_parallel("cpu")
    assert (ranks.rank, ranks.world, ranks.main) == (0, 1, True)
    assert not torch.distributed.is_initialized()
    assert training.my_share([1, 2, 3], ranks) == [1, 2, 3] and training.gather_shares([1, 2, 3], ranks) == [1, 2, 3]
    # shares of 3 copies interleave back into the original order
    rows = list(range(8))
    shares = [training.my_share(rows, training.Ranks(r, 3)) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4, 7], [2, 5]]


def test_main_first_runs_on_the_main_copy_first_and_a_failure_there_stops_the_others(monkeypatch):
    """The main copy's verdict travels in the one broadcast the others wait on: on failure they exit quietly (the
    main copy raises the error and says why) instead of waiting forever; on success they run the step themselves,
    or take its result (share=True)."""
    sent = []

    def broadcast(message, src):  # what the main copy sent, as the second copy receives it
        message[:] = sent.pop(0)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", broadcast)
    first, second, calls = training.Ranks(0, 2), training.Ranks(1, 2), []

    def step(x):
        calls.append(x)
        if x == "bad":
            raise ValueError("--output_dir bad holds a model")
        return x.upper()
    sent.append([True, None])
    with pytest.raises(SystemExit) as stopped:
        training.main_first(second, step, "bad")
    assert stopped.value.code == 1
    sent += [[False, None], [False, "FOLDER"]]
    assert training.main_first(second, step, "data") == "DATA"
    assert training.main_first(second, step, "folder", share=True) == "FOLDER"
    assert calls == ["data"]  # never the failed step, never a shared one

    sent.append(None)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", lambda message, src: sent.__setitem__(-1, message))
    with pytest.raises(ValueError, match="holds a model"):
        training.main_first(first, step, "bad")
    assert sent[-1] == [True, None]  # what the main copy broadcast
    assert training.main_first(first, step, "ok", share=True) == "OK" and sent[-1] == [False, "OK"]
    assert training.main_first(training.Ranks(), step, "alone") == "ALONE"
