"""bench.py's verdicts reach its exit status: a FAIL row makes `python bench.py` exit non-zero (a script or CI that
runs it reads the status, not the table). The rows themselves are measured, never asserted, here."""
import sys

import pytest

import bench


def fake_rows(failing: bool):
    """Stand-ins for the measuring functions: one row each, failing or not, in no time."""
    ratio = 1.5 if failing else 0.5
    return dict(llama_step_rows=lambda *a: bench.row("cpu", "train step", "a", "b", ratio, 1.0),
                projection_rows=lambda *a: (4, 12), roberta_step_row=lambda *a: None,
                adapter_file_bytes=lambda: 4 * 23040, nf4_rows=lambda *a: None)


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
