"""The scripts' shared plumbing (recipes/training.py): command-line number types, run folders, JSON results, how a
run fails, saved runs read back, the learning-rate schedule and the optimiser step."""
import json
import math
import os
from pathlib import Path

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
    assert training.positive_int("1" + "0" * 400) == 10 ** 400  # an int too large for a float is still an int


@pytest.mark.parametrize("parse, text, message", [
    (training.seed_number, "4294967296", "'4294967296' is not a seed from 0 to 4294967295"),  # numpy's limit
    (training.seed_number, "-1", "'-1' is not a seed from 0 to 4294967295"),
    (training.thread_count, "1000000000", "'1000000000' is not a number of threads from 1 to 1024"),
    (training.thread_count, "0", "'0' is not a number of threads from 1 to 1024"),
    (training.device_name, "meta", "'meta' is not a device these scripts run on (auto, cpu, cuda, cuda:N or mps)"),
    (training.device_name, "cuda:x", "'cuda:x' is not a device these scripts run on (auto, cpu, cuda, cuda:N or mps)"),
])
def test_seeds_threads_and_devices_are_bounded(parse, text, message):
    import argparse
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        parse(text)
    assert str(refused.value) == message
    assert (training.seed_number("4294967295"), training.thread_count("1024")) == (2 ** 32 - 1, 1024)
    assert [training.device_name(d) for d in ("auto", "cpu", "cuda", "cuda:3", "mps")] == ["auto", "cpu", "cuda",
                                                                                         "cuda:3", "mps"]
    with pytest.raises(training.UserError) as refused:
        training.start_data_parallel("meta")  # train_math's --device is checked here
    assert str(refused.value) == "--device meta: not a device these scripts run on; use auto, cpu, cuda, cuda:N or mps"


def test_flags_are_never_abbreviated_nor_silently_unused(capsys):
    parser = training.Parser(prog="x", short_errors=True)
    parser.add_argument("--max_new_tokens", type=training.positive_int)
    parser.add_argument("--lr", type=training.positive_float, default=0.1)
    parser.add_argument("--d", type=training.positive_int)
    with pytest.raises(SystemExit) as end:
        parser.parse_args(["--max_new_token", "5"])
    assert end.value.code == 2
    assert capsys.readouterr().err == "error: unrecognized arguments: --max_new_token 5 (see --help)\n"
    args = parser.parse_args(["--max_new_tokens", "5", "--lr", "0.1"])  # --lr at its default: not a given value
    assert training.unused_flag(parser, args, ("max_new_tokens",)) is None
    args = parser.parse_args(["--max_new_tokens", "5", "--d", "8", "--lr", "0.5"])
    assert training.unused_flag(parser, args, ("max_new_tokens",)) == "--lr"  # the first, in the parser's order


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
    fields = {"method": training.choice(("unilora", "lora")), "r": training.whole(null=True),
              "alpha": training.real(null=True), "model": training.text()}

    def refusal(**settings):
        (run / "run.json").write_text(json.dumps(settings) if settings else "[1, 2]")
        with pytest.raises(training.UserError) as refused:
            training.read_saved_run(run, fields, "a run folder")
        return str(refused.value)
    with pytest.raises(training.UserError) as refused:
        training.read_saved_run(run, fields, "a run folder")
    assert str(refused.value) == f"--load {run}: {run / 'run.json'} is not readable (FileNotFoundError); a run folder"
    (run / "results.json").write_text(json.dumps({"args": {"method": "lora", "model": "m"}}))  # before run.json
    assert training.read_saved_run(run, fields, "-", older="args") == {"method": "lora", "model": "m"}
    (run / "results.json").write_text("[]")
    with pytest.raises(training.UserError) as refused:
        training.read_saved_run(run, fields, "a run folder", older="args")
    assert str(refused.value) == f"--load {run}: {run / 'results.json'} holds no settings (a JSON object); a run folder"
    (run / "run.json").write_text(json.dumps({"method": "unilora", "model": "m", "r": 4, "extra": [1]}))
    assert training.read_saved_run(run, fields, "-", older="args")["r"] == 4
    path = run / "run.json"
    assert refusal() == f"--load {run}: {path} holds no settings (a JSON object); a run folder"
    assert refusal(model="m") == f"--load {run}: {path} has no 'method'; a run folder"
    assert refusal(method="head", model="m") == f"--load {run}: {path} has an invalid 'method': 'head'; a run folder"
    assert refusal(method="lora", model="m", r=True) == f"--load {run}: {path} has an invalid 'r': True; a run folder"
    assert refusal(method="lora", model="m", alpha=0) == f"--load {run}: {path} has an invalid 'alpha': 0; a run folder"
    assert refusal(method="lora", model=["m"] * 40) == \
        f"--load {run}: {path} has an invalid 'model': {repr(['m'] * 40)[:60]}; a run folder"  # cut short
    path.write_text("[" * 100000 + "]" * 100000)  # nested too deep for the parser: still one line
    with pytest.raises(training.UserError) as refused:
        training.read_saved_run(run, fields, "a run folder")
    assert str(refused.value) == f"--load {run}: {path} is not readable (RecursionError); a run folder"


def test_an_evaluation_never_writes_into_the_run_it_evaluates(tmp_path):
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    assert training.eval_output_dir(None, run, "{folder}") == run / "eval-1"
    assert training.eval_output_dir(tmp_path / "elsewhere", run, "{folder}") == tmp_path / "elsewhere"
    # the run itself, a folder holding it (--overwrite would replace the run), or one inside it (its best/)
    for inside in (run, tmp_path, run / "best", run / "eval-7"):
        with pytest.raises(training.UserError) as refused:
            training.eval_output_dir(inside, run, "{folder} is taken; default {default}")
        assert str(refused.value) == f"{inside} is taken; default {run / 'eval-1'}"


# ------------------------------------------------------------------------------ one run per folder, staged

def tree(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


def run_into(folder, content, overwrite=False, **kwargs):
    """A run as the scripts make one: staged() into `folder`, writing results.json = content."""
    with training.staged(folder, overwrite, training.Ranks(), **kwargs) as stage:
        (stage / "results.json").write_text(content)


def test_a_folder_is_held_by_one_run_at_a_time(tmp_path):
    out = tmp_path / "runs" / "out"
    with training.staged(out, False, training.Ranks()) as stage:
        assert (tmp_path / "runs" / "out.lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(training.UserError) as refused:  # a second open of the lock: refused as another process
            run_into(out, "second")
        assert str(refused.value) == (f"--output_dir {out} is in use by another run (pid {os.getpid()}); wait for it "
                                      f"to end, or pick another --output_dir")
        (stage / "results.json").write_text("first")
    assert tree(tmp_path) == ["runs", "runs/out", "runs/out/results.json"]  # the lock goes with its run
    assert (out / "results.json").read_text() == "first"
    (tmp_path / "runs" / "out.lock").write_text("999999999\n")  # a dead run's: the OS lock died with it
    run_into(out, "third", overwrite=True)
    assert tree(tmp_path) == ["runs", "runs/out", "runs/out/results.json"]
    (tmp_path / "runs" / "out.lock").write_text("my notes")  # not a lock file of ours: never overwritten
    with pytest.raises(training.UserError) as refused:
        run_into(out, "fourth", overwrite=True)
    assert str(refused.value) == (f"{tmp_path / 'runs' / 'out.lock'} is not a lock file of ours; move it away or "
                                  f"pick another --output_dir")
    assert (tmp_path / "runs" / "out.lock").read_text() == "my notes" and (out / "results.json").read_text() == "third"


def test_what_a_killed_run_left_is_put_right_and_nothing_else_is_touched(tmp_path, capsys):
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    partial.mkdir()
    (partial / training.PARTIAL).touch()  # a killed run's stage, marked: removed, and said so
    (partial / "run.json").write_text("{}")
    run_into(out, "new")
    assert capsys.readouterr().out == f"note: removed {partial}, left by a run that was killed\n"
    assert tree(tmp_path) == ["out", "out/results.json"]
    partial.mkdir()  # unmarked but empty: a run killed between making and marking it
    run_into(out, "newer", overwrite=True)
    assert tree(tmp_path) == ["out", "out/results.json"]
    (out / "results.json").unlink()
    partial.mkdir()
    (partial / "results.json").write_text("an earlier version's")  # a run's files, no marker: only --overwrite
    with pytest.raises(training.UserError) as refused:
        run_into(out, "x")
    assert str(refused.value) == (f"{partial} holds a run's files but no marker of an unfinished run; pass "
                                  f"--overwrite to remove it, or move it away")
    run_into(out, "newest", overwrite=True)
    assert tree(tmp_path) == ["out", "out/results.json"] and (out / "results.json").read_text() == "newest"
    partial.mkdir()
    (partial / "thesis.tex").write_text("mine")  # not ours: never removed, even with --overwrite
    with pytest.raises(training.UserError) as refused:
        run_into(out, "x", overwrite=True)
    assert str(refused.value) == f"{partial} exists and is not ours; move it away or pick another --output_dir"
    assert tree(tmp_path) == ["out", "out.partial", "out.partial/thesis.tex", "out/results.json"]
    (partial / "thesis.tex").unlink()
    partial.rmdir()
    (tmp_path / "out.old").mkdir()  # not ours either, and in the way of replacing out
    with pytest.raises(training.UserError) as refused:
        run_into(out, "x", overwrite=True)
    assert str(refused.value) == (f"{tmp_path / 'out.old'} is in the way (the replaced run moves there for a moment); "
                                  f"move it away")
    assert tree(tmp_path) == ["out", "out.old", "out/results.json"]


def test_a_run_killed_between_the_two_renames_is_put_back(tmp_path, monkeypatch, capsys):
    """place() moves the old run to out.old, then the stage to out: a crash (SIGTERM) between the two renames
    leaves no out; the next run on out puts the old run back before it looks at the folder."""
    out = tmp_path / "out"
    run_into(out, "old run")
    real_replace, calls = os.replace, []

    def crash_after_the_first(src, dst):
        calls.append(src)
        if len(calls) > 1:
            raise KeyboardInterrupt  # as SIGTERM raises it (interrupt_on_sigterm)
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", crash_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        run_into(out, "new run", overwrite=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert tree(tmp_path) == ["out.old", f"out.old/{training.OLD}", "out.old/results.json", "out.partial",
                              f"out.partial/{training.PARTIAL}", "out.partial/results.json"]
    with pytest.raises(SystemExit, match="already holds a run; pass --overwrite"):  # the old run, back in place
        run_into(out, "another run")
    assert capsys.readouterr().out == (f"note: put {out} back from {tmp_path / 'out.old'}, where a run killed while "
                                       f"replacing it had left it\nnote: removed {tmp_path / 'out.partial'}, left by "
                                       f"a run that was killed\n")
    assert tree(tmp_path) == ["out", "out/results.json"] and (out / "results.json").read_text() == "old run"


def test_a_stage_placed_early_stays_when_the_run_then_fails(tmp_path):
    """train_math places a run at its first checkpoint: from then on a failure leaves it, resumable."""
    out = tmp_path / "out"
    run_into(out, "old run")
    with pytest.raises(training.NonFiniteLoss):
        with training.staged(out, True, training.Ranks()) as stage:
            (stage / "checkpoint.pt").write_text("step 1")
            assert training.place(stage) == out and training.place(out) == out  # placed once
            raise training.NonFiniteLoss("diverged at step 2")
    assert tree(tmp_path) == ["out", "out/checkpoint.pt"]
    with pytest.raises(training.UserError, match="^refused by the script$"):  # check() runs under the lock
        run_into(out, "x", overwrite=True, check=lambda: (_ for _ in ()).throw(training.UserError("refused by the "
                                                                                                 "script")))
    assert tree(tmp_path) == ["out", "out/checkpoint.pt"]


def test_interruptions_end_in_one_line_with_status_130(capsys):
    for raised, line in ((KeyboardInterrupt(), "interrupted; the output folder was left as it was before"),
                         (KeyboardInterrupt("interrupted at step 4; continue with: x"),
                          "interrupted at step 4; continue with: x")):
        with pytest.raises(SystemExit) as end:
            with training.errors_as_exit():
                raise raised
        assert end.value.code == 130 and capsys.readouterr().err == line + "\n"
    with pytest.raises(KeyboardInterrupt, match="^terminated; the output folder was left as it was before$"):
        training._terminated(15, None)  # SIGTERM's handler (interrupt_on_sigterm)


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
