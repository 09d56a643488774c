"""The scripts' shared plumbing (recipes/training.py): command-line number types, run folders, JSON results."""
import json

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
