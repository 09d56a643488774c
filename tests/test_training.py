"""The scripts' shared plumbing (recipes/training.py): command-line number types, run folders, JSON results, how a
run fails, saved runs read back, the learning-rate schedule and the optimiser step."""
import json
import math

import pytest
import torch

from pretrained import files
from recipes import training

torch.set_num_threads(1)


# ------------------------------------------------------------------------------ runs and command lines

def test_cli_number_types_reject_out_of_range_values():
    import argparse
    ok = {training.positive_int: ("1", 1), training.nonnegative_int: ("0", 0),
          training.positive_float: ("2e-3", 2e-3), training.nonnegative_float: ("0", 0.0),
          training.fraction: ("0.06", 0.06)}
    for parse, (text, value) in ok.items():
        assert parse(text) == value
    bad = [(training.positive_int, t) for t in ("0", "-3", "1.5", "x")] + \
          [(training.nonnegative_int, "-1")] + \
          [(training.positive_float, t) for t in ("0", "-1e-3", "nan", "inf", "-inf")] + \
          [(training.nonnegative_float, t) for t in ("-0.1", "nan")] + [(training.fraction, t) for t in ("1", "-0.1")]
    for parse, text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_prepare_output_dir_never_writes_into_a_model_or_another_run(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"x")
    for overwrite in (False, True):
        with pytest.raises(SystemExit, match="holds a model"):
            training.prepare_output_dir(model, overwrite=overwrite)
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text("{}")
    with pytest.raises(SystemExit, match="--overwrite"):
        training.prepare_output_dir(run)
    assert training.prepare_output_dir(run, overwrite=True) == run
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"x")
    with pytest.raises(SystemExit, match="not empty"):
        training.prepare_output_dir(other, overwrite=True)
    fresh = training.prepare_output_dir(tmp_path / "a" / "b")
    assert fresh.is_dir()
    assert training.new_eval_dir(run) == run / "eval-1"
    (run / "eval-1").mkdir()
    assert training.new_eval_dir(run) == run / "eval-2"


def test_write_json_is_always_valid_json(tmp_path):
    path = tmp_path / "r.json"
    files.write_json(path, {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf"), "e": 2}})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "c": {"d": None, "e": 2}}
    training.check_finite(1.5, 3)
    with pytest.raises(training.NonFiniteLoss, match="step 7"):
        training.check_finite(float("nan"), 7)


# ------------------------------------------------------------------------------ failures, flags, saved runs

def test_user_errors_end_in_one_line_from_the_first_copy_only(monkeypatch, capsys):
    with pytest.raises(SystemExit) as end:
        with training.errors_as_exit():
            raise training.UserError("--d 0 is not allowed")
    assert end.value.code == "error: --d 0 is not allowed"
    parser = training.Parser(prog="x", short_errors=True)
    parser.add_argument("--n", type=training.positive_int)
    with pytest.raises(SystemExit) as end:
        parser.parse_args(["--n", "0"])
    assert end.value.code == 2 and capsys.readouterr().err == "error: argument --n: '0' is not a positive integer " \
                                                              "(see --help)\n"
    monkeypatch.setenv("RANK", "1")  # another copy under torchrun: the same exits, without a word
    with pytest.raises(SystemExit) as end:
        parser.parse_args(["--n", "0"])
    assert end.value.code == 2 and capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as end:
        with training.errors_as_exit():
            raise training.NonFiniteLoss("diverged")
    assert end.value.code == 1
    with training.printing_on_main_copy():
        print("not shown")
    assert capsys.readouterr().out == ""


def test_a_saved_run_is_read_back_or_refused_in_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(training.UserError, match=rf"^--load {run}: {run / 'run.json'} is not readable "
                                                 r"\(FileNotFoundError\); a run folder$"):
        training.read_saved_run(run, "{path} is not readable ({error}); a run folder")
    (run / "results.json").write_text(json.dumps({"args": {"method": "lora"}}))  # written before run.json existed
    assert training.read_saved_run(run, "-", older="args") == {"method": "lora"}
    (run / "run.json").write_text(json.dumps({"method": "unilora"}))
    assert training.read_saved_run(run, "-", older="args") == {"method": "unilora"}
    (run / "run.json").write_text("[1, 2]")
    with pytest.raises(training.UserError, match=r"\(ValueError\)"):
        training.read_saved_run(run, "({error})")
    assert training.eval_output_dir(None, run, "{folder}") == run / "eval-1"
    assert training.eval_output_dir(tmp_path / "elsewhere", run, "{folder}") == tmp_path / "elsewhere"
    for inside in (run, tmp_path):  # the run itself, or a folder holding it: --overwrite would replace the run
        with pytest.raises(training.UserError, match=f"^{inside} is taken; default {run / 'eval-1'}$"):
            training.eval_output_dir(inside, run, "{folder} is taken; default {default}")


# ------------------------------------------------------------------------------ the optimiser step

def test_warmup_then_linear_or_cosine_decay():
    p = torch.nn.Parameter(torch.zeros(1))
    linear, cosine = (lambda s: (10 - s) / 8), (lambda s: 0.5 * (1 + math.cos(math.pi * (s - 2) / 8)))
    for decay, expected in (("linear", linear), ("cosine", cosine)):
        optimizer = torch.optim.SGD([p], lr=1.0)
        scheduler, warmup = training.warmup_then_decay(optimizer, 10, 0.15, decay)  # ceil(1.5) = 2 warmup steps
        factors = []
        for _ in range(10):
            factors.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        assert warmup == 2 and factors[:2] == [0.5, 1.0]
        assert factors[2:] == pytest.approx([expected(s) for s in range(2, 10)])


def test_optimizer_step_checks_clips_steps_and_clears():
    p = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    optimizer = torch.optim.SGD([p], lr=0.1)
    scheduler, _ = training.warmup_then_decay(optimizer, 4, 0.0, "linear")
    p.grad = torch.tensor([3.0, 4.0])
    loss, norm, lr, skipped = training.optimizer_step(optimizer, scheduler, 2.5, 1, training.Ranks(), grad_clip=1.0)
    assert (loss, norm, lr, skipped) == (2.5, 5.0, 0.1, False)  # the norm before clipping, the lr it stepped with
    assert p.detach().tolist() == pytest.approx([1 - 0.1 * 0.6, 1 - 0.1 * 0.8]) and p.grad is None
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.075)  # the schedule moved on
    p.grad = torch.tensor([3.0, 4.0])
    before = p.detach().clone()
    with pytest.raises(training.NonFiniteLoss, match="at step 2.*lower --lr, now 0.1"):
        training.optimizer_step(optimizer, scheduler, float("inf"), 2, training.Ranks(), grad_clip=0.0,
                                hint="lower --lr, now 0.1")
    assert torch.equal(p.detach(), before)  # nothing of a diverged step is applied
    loss, norm, _, _ = training.optimizer_step(optimizer, scheduler, 1.0, 2, training.Ranks(), grad_clip=0.0)
    assert norm == 5.0 and p.detach().tolist() == pytest.approx([0.94 - 0.075 * 3, 0.92 - 0.075 * 4])  # unclipped
