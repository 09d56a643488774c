"""Results over many GLUE runs (recipes/glue_table.py): the seeds' summary against numpy, and Table 1 as
`train_glue.py --table` prints it from run folders (results.json files written here by hand)."""
import json

import numpy as np
import pytest

import train_glue as tg
from recipes import glue_table
from recipes.glue_data import TASKS


def fake_run(task, seed, value, *, model="FacebookAI/roberta-base", method="unilora", mismatched=None, epoch=3,
             **settings):
    """A results.json as a training run writes it, reduced to what the summary and the table read."""
    metric = TASKS[task]["metrics"][0]
    dev = {metric: value, "loss": 0.5}
    if mismatched is not None:
        dev[metric + "_mismatched"] = mismatched
    d = 23040 if method == "unilora" else None
    cfg = {"task": task, "model": model, "preset": "base", "method": method, "d": d, "signs": d and True,
           "lr": 5e-3, "head_lr": 1e-4, "epochs": 60, "seed": seed, "data_dir": f"/data/{task}", **settings}
    return {"config": cfg, "from_recipe": ["head_lr", "lr", "epochs"], "epochs": [{"epoch": epoch, "dev": dev}],
            "best": {"epoch": epoch, "dev": dev}, "trainable": {"d": d or 294912, "D": 294912, "head": 592130}}


def test_summary_statistics_against_numpy():
    values = [0.91, 0.935, 0.9, 0.952, 0.927]
    runs = [fake_run("mnli", seed, v, mismatched=v - 0.01, epoch=seed + 2) for seed, v in enumerate(values, 1)]
    summary = glue_table.summarize(runs)
    assert summary["task"] == "mnli" and summary["metric"] == "accuracy" and summary["seeds"] == [1, 2, 3, 4, 5]
    assert summary["best_epoch"] == {"1": 3, "2": 4, "3": 5, "4": 6, "5": 7}
    for key, vals in (("accuracy", np.array(values)), ("accuracy_mismatched", np.array(values) - 0.01)):
        s = summary[key]
        assert s["values"] == pytest.approx(vals.tolist())
        assert s["mean"] == pytest.approx(np.mean(vals)) and s["median"] == pytest.approx(np.median(vals))
        assert s["std"] == pytest.approx(np.std(vals, ddof=1))  # the sample std over seeds



def write_results(folder, results):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))



def test_table_groups_runs_that_differ_only_by_seed(tmp_path, capsys):
    for seed, v in ((1, 0.94), (2, 0.95), (3, 0.93)):
        write_results(tmp_path / "base" / "sst2" / f"seed-{seed}", fake_run("sst2", seed, v))
    for seed, v in ((1, 0.60), (2, 0.64)):
        write_results(tmp_path / "base" / "cola" / f"seed-{seed}", fake_run("cola", seed, v))
    write_results(tmp_path / "base" / "mnli", fake_run("mnli", 1, 0.87, mismatched=0.88))
    write_results(tmp_path / "base" / "sst2" / "seed-1" / "eval-1", {"kind": "eval", "dev": {"accuracy": 0.1}})
    write_results(tmp_path / "base" / "cola.partial", fake_run("cola", 3, 0.0))  # unfinished: not a result
    write_results(tmp_path / "base" / "math", {"config": {"model": "x"}, "best": {}, "epochs": []})  # not GLUE
    write_results(tmp_path / "lora", fake_run("sst2", 1, 0.95, method="lora"))
    write_results(tmp_path / "proj", fake_run("sst2", 1, 0.90, projection="fastfood"))  # a future setting
    tg.main(["--table", str(tmp_path / "base"), str(tmp_path / "lora"), str(tmp_path / "proj"),
             str(tmp_path / "base" / "sst2")])  # overlapping folders count each run once
    assert capsys.readouterr().out.splitlines() == [
        "| model | method | d | projection | signs | params | SST-2 | CoLA | MNLI |",
        "|---|---|---|---|---|---|---|---|---|",
        "| FacebookAI/roberta-base | Uni-LoRA | 23040 | - | True | 0.023M | 94.0 ± 1.0 (3) | 62.0 ± 2.8 (2) | 87.0 / 88.0 (1) |",
        "| FacebookAI/roberta-base | Uni-LoRA | 23040 | fastfood | True | 0.023M | 90.0 (1) | - | - |",
        "| FacebookAI/roberta-base | LoRA | - | - | - | 0.295M | 95.0 (1) | - | - |",
        "| FacebookAI/roberta-base | Uni-LoRA (paper, no signs) | - | - | - | 0.023M | 94.5 | 64.6 | - |",
    ]


def test_table_shows_what_each_row_costs_as_medians(tmp_path, capsys):
    """The ablation's columns: s/step, P theta_d time and bytes, peak RSS, each the median over the row's runs."""
    for seed, (sec, ms, rss) in enumerate(((0.5, 2.0, 900.0), (0.7, 4.0, 1000.0), (0.6, 3.0, 800.0)), 1):
        run = fake_run("sst2", seed, 0.9, projection="fastfood")
        run.update(seconds_per_step_median=sec, projection_ms=ms, projection_bytes=165888, peak_rss_mb=rss)
        write_results(tmp_path / f"ff-{seed}", run)
    write_results(tmp_path / "head", dict(fake_run("sst2", 1, 0.8, method="head"), seconds_per_step_median=0.25))
    tg.main(["--table", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("| SST-2 | s/step | P ms | P bytes | peak RSS MB |")
    assert lines[2].endswith("| 90.0 ± 0.0 (3) | 0.6 | 3 | 165,888 | 900 |")
    assert lines[3].endswith("| 80.0 (1) | 0.25 | - | - | - |")


def test_table_average_and_paper_row_for_all_six_tasks(tmp_path, capsys):
    ours = {"sst2": 0.94, "mrpc": 0.90, "cola": 0.60, "qnli": 0.92, "rte": 0.80, "stsb": 0.91}
    for task, v in ours.items():
        write_results(tmp_path / task, fake_run(task, 1, v, model="roberta-base"))
    write_results(tmp_path / "other", fake_run("rte", 1, 0.5, model="/data/my-bert"))  # no paper numbers
    tg.main(["--table", str(tmp_path)])
    assert capsys.readouterr().out.splitlines() == [
        "| model | params | SST-2 | MRPC | CoLA | QNLI | RTE | STS-B | avg |".replace("| params", "| method | params"),
        "|---|---|---|---|---|---|---|---|---|---|",
        "| /data/my-bert | Uni-LoRA | 0.023M | - | - | - | - | 50.0 (1) | - | - |",
        "| roberta-base | Uni-LoRA | 0.023M | 94.0 (1) | 90.0 (1) | 60.0 (1) | 92.0 (1) | 80.0 (1) | 91.0 (1) | 84.5 |",
        "| roberta-base | Uni-LoRA (paper, no signs) | 0.023M | 94.5 | 89.7 | 64.6 | 92.3 | 79.8 | 90.9 | 85.3 |",
    ]
