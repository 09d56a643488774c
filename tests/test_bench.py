"""bench.py's verdicts reach its exit status: a FAIL row makes `python bench.py` exit non-zero (a script or CI that
runs it reads the status, not the table). The rows' times are measured, never asserted, here: the task bank's rows
run on tiny shapes for their keys and verdicts (a mixed path slowed on purpose must FAIL; a task's bytes are
exact)."""
import contextlib
import re
import sys
import time

import pytest
import torch

import bench
import taskbank


def fake_rows(failing: bool):
    """Stand-ins for the measuring functions: one row each, failing or not, in no time."""
    ratio = 1.5 if failing else 0.5
    return dict(llama_step_rows=lambda *a: bench.row("cpu", "train step", "a", "b", ratio, 1.0),
                projection_rows=lambda *a: (4, 12), roberta_step_row=lambda *a: None,
                adapter_file_bytes=lambda: 4 * 23040, nf4_rows=lambda *a: None, bank_rows=lambda *a: None)


@pytest.mark.parametrize("failing", [False, True])
def test_a_failed_row_sets_the_exit_status(monkeypatch, capsys, failing):
    monkeypatch.setattr(bench, "FAILED", [])
    for name, fn in fake_rows(failing).items():
        monkeypatch.setattr(bench, name, fn)
    monkeypatch.setattr(sys, "argv", ["bench.py", "--device", "cpu", "--threads", "1"])
    if failing:
        with pytest.raises(SystemExit, match=r"^1 row\(s\) missed the target: train step$"):
            bench.main()
    else:
        bench.main()
    table = capsys.readouterr().out
    assert ("| FAIL |" in table) is failing and table.count("| PASS |") == 3 - failing


def test_abbreviated_flags_are_refused(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench.py", "--rep", "3"])
    with pytest.raises(SystemExit) as err:
        bench.main()
    assert err.value.code == 2


TINY_LLAMA = dict(bench.SMOLLM2_135M, vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2)
TINY_ROBERTA = dict(bench.ROBERTA_BASE, vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                    num_hidden_layers=2)


@pytest.mark.parametrize("slow", [False, True])
def test_the_bank_rows_run_and_a_slow_mixed_batch_fails(monkeypatch, capsys, slow):
    """bank_rows under --quick on tiny shapes: per shape a mixed-batch row (its time ratio mixed / single against
    1 / 0.8), a bytes row that passes only at exactly 4d + the head's bytes, and an informational add / remove row.
    With the mixed path slowed on purpose (bank.rows sleeps), both mixed rows fail and only they are named."""
    torch.set_num_threads(1)
    monkeypatch.setattr(bench, "FAILED", [])
    monkeypatch.setattr(bench, "SMOLLM2_135M", TINY_LLAMA)
    monkeypatch.setattr(bench, "ROBERTA_BASE", TINY_ROBERTA)
    monkeypatch.setattr(bench.gc, "collect", lambda *a: 0)  # 0.15 s a call with torch loaded; kept out of the clocks
    if slow:
        rows = taskbank.TaskBank.rows

        @contextlib.contextmanager
        def slow_rows(self, tasks):
            time.sleep(0.2)  # a tiny step takes milliseconds: this alone puts mixed / single far past 1.25
            with rows(self, tasks) as bank:
                yield bank
        monkeypatch.setattr(taskbank.TaskBank, "rows", slow_rows)
    bench.bank_rows([torch.device("cpu")], True, 1)
    table = [line.split(" | ") for line in capsys.readouterr().out.splitlines()]
    assert [cells[1].split(",")[0] for cells in table] == ["mixed batch train step", "resident bytes per task",
                                                           "time to add / remove a task"] * 2
    mixed, sizes, adds = table[0::3], table[1::3], table[2::3]
    for cells in mixed:
        assert cells[1].endswith(", 32x8, r=4, d=440") or cells[1].endswith(", 32x4, r=4, d=160")
        assert "8 tasks x 4 rows (interleaved)" in cells[2] and cells[5] == "<= 1.25"
        ratio = float(cells[4].split()[0])
        assert cells[6] == ("PASS |" if ratio <= 1.25 else "FAIL |")
        assert not slow or ratio > 1.25
    head = (32 * 32 + 32) + (32 * 2 + 2)  # the tiny RoBERTa's head: dense and out_proj, weights and biases
    for cells, extra in zip(sizes, (0, 4 * head)):
        d = int(re.search(r"d=([\d,]+)$", cells[1]).group(1).replace(",", ""))
        assert cells[2].startswith(f"{4 * d + extra:,} bytes") and cells[6] == "PASS |"
    assert all(cells[6] == "- |" and cells[2].startswith("add: ") for cells in adds)
    assert bench.FAILED == [cells[1] for cells in mixed if cells[6] == "FAIL |"]
    assert len(bench.FAILED) == 2 or not slow
