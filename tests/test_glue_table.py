"""Results over many GLUE runs (recipes/glue_table.py): the seeds' summary against numpy, and Table 1 as
`train_glue.py --table` prints it from run folders (results.json files written here by hand)."""
import json

import numpy as np
import pytest

import train_glue as tg
from recipes import glue_table
from recipes.glue_data import TASKS


def fake_run(task, seed, value, *, model="FacebookAI/roberta-base", method="unilora", mismatched=None, epoch=3,
             last=None, **settings):
    """A results.json as a training run writes it, reduced to what the summary and the table read. value (and
    mismatched) at the best epoch; last: (epoch, value[, mismatched]) of a later, last epoch (default: the best is
    the last)."""
    metric = TASKS[task]["metrics"][0]

    def scores(value, mismatched=None):
        return {metric: value, "loss": 0.5, **({metric + "_mismatched": mismatched} if mismatched is not None else {})}

    best = {"epoch": epoch, "dev": scores(value, mismatched)}
    final = best if last is None else {"epoch": last[0], "dev": scores(*last[1:])}
    d = 23040 if method == "unilora" else None
    cfg = {"task": task, "model": model, "preset": "base", "method": method, "d": d, "signs": d and True,
           "lr": 5e-3, "head_lr": 1e-4, "epochs": 60, "seed": seed, "data_dir": f"/data/{task}", **settings}
    return {"config": cfg, "from_recipe": ["head_lr", "lr", "epochs"], "epochs": [best] + [final] * (last is not None),
            "best": best, "last": final, "trainable": {"d": d or 294912, "D": 294912, "head": 592130}}


def test_summary_statistics_against_numpy():
    values = [0.91, 0.935, 0.9, 0.952, 0.927]
    lasts = [0.905, 0.93, 0.9, 0.94, 0.92]  # seed 3 ends on its best epoch
    runs = [fake_run("mnli", s, v, mismatched=v - 0.01, epoch=s + 2, last=(10, w, w - 0.02) if s != 3 else None)
            for s, (v, w) in enumerate(zip(values, lasts), 1)]
    summary = glue_table.summarize(runs)
    assert summary["task"] == "mnli" and summary["metric"] == "accuracy" and summary["seeds"] == [1, 2, 3, 4, 5]
    assert summary["report"] == "best"
    assert summary["best_epoch"] == {"1": 3, "2": 4, "3": 5, "4": 6, "5": 7}
    assert summary["last_epoch"] == {"1": 10, "2": 10, "3": 5, "4": 10, "5": 10}
    last_mismatched = [0.885, 0.91, 0.89, 0.92, 0.90]  # seed 3's last epoch is its best: 0.9 - 0.01
    for which, key, vals in (("best", "accuracy", values), ("best", "accuracy_mismatched", np.array(values) - 0.01),
                             ("last", "accuracy", lasts), ("last", "accuracy_mismatched", last_mismatched)):
        s = summary[which][key]
        assert s["values"] == pytest.approx(list(vals))
        assert s["mean"] == pytest.approx(np.mean(vals)) and s["median"] == pytest.approx(np.median(vals))
        assert s["std"] == pytest.approx(np.std(vals, ddof=1))  # the sample std over seeds
    # the reported epoch also under each metric's name, as summaries had it before both were kept
    assert summary["accuracy"]["values"] == pytest.approx(values)
    assert summary["accuracy_mismatched"] == summary["best"]["accuracy_mismatched"]
    last = glue_table.summarize(runs, "last")
    assert last["report"] == "last" and last["accuracy"]["values"] == pytest.approx(lasts)
    assert last["accuracy_mismatched"]["mean"] == pytest.approx(0.901)
    assert last["best"] == summary["best"] and last["last"] == summary["last"]



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
        "Dev metric in percent at each run's best epoch (--report best): mean ± std (runs).", "",
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
    lines = capsys.readouterr().out.splitlines()[2:]  # after the line that says which epoch
    assert lines[0].endswith("| SST-2 | s/step | P ms | P bytes | peak RSS MB |")
    assert lines[2].endswith("| 90.0 ± 0.0 (3) | 0.6 | 3 | 165,888 | 900 |")
    assert lines[3].endswith("| 80.0 (1) | 0.25 | - | - | - |")


def test_table_average_and_paper_row_for_all_six_tasks(tmp_path, capsys):
    ours = {"sst2": 0.94, "mrpc": 0.90, "cola": 0.60, "qnli": 0.92, "rte": 0.80, "stsb": 0.91}
    for task, v in ours.items():
        write_results(tmp_path / task, fake_run(task, 1, v, model="roberta-base"))
    write_results(tmp_path / "other", fake_run("rte", 1, 0.5, model="/data/my-bert"))  # no paper numbers
    tg.main(["--table", str(tmp_path)])
    assert capsys.readouterr().out.splitlines()[2:] == [
        "| model | params | SST-2 | MRPC | CoLA | QNLI | RTE | STS-B | avg |".replace("| params", "| method | params"),
        "|---|---|---|---|---|---|---|---|---|---|",
        "| /data/my-bert | Uni-LoRA | 0.023M | - | - | - | - | 50.0 (1) | - | - |",
        "| roberta-base | Uni-LoRA | 0.023M | 94.0 (1) | 90.0 (1) | 60.0 (1) | 92.0 (1) | 80.0 (1) | 91.0 (1) | 84.5 |",
        "| roberta-base | Uni-LoRA (paper, no signs) | 0.023M | 94.5 | 89.7 | 64.6 | 92.3 | 79.8 | 90.9 | 85.3 |",
    ]


def test_table_reports_the_last_epoch_when_asked(tmp_path, capsys):
    """Best and last epoch in the same runs: --report picks which one the cells and the average hold, and the first
    line says which."""
    ours = {"sst2": (0.94, 0.93), "mrpc": (0.90, 0.88), "cola": (0.60, 0.55), "qnli": (0.92, 0.92),
            "rte": (0.80, 0.75), "stsb": (0.91, 0.90)}  # (best, last)
    for task, (best, last) in ours.items():
        write_results(tmp_path / task, fake_run(task, 1, best, model="roberta-base", last=(60, last)))
    write_results(tmp_path / "sst2-2", fake_run("sst2", 2, 0.96, model="roberta-base", last=(60, 0.91)))
    write_results(tmp_path / "mnli", fake_run("mnli", 1, 0.87, mismatched=0.88, model="roberta-base",
                                              last=(25, 0.86, 0.85)))
    tg.main(["--table", str(tmp_path), "--report", "last"])
    assert capsys.readouterr().out.splitlines()[:5] == [
        "Dev metric in percent at each run's last epoch (--report last): mean ± std (runs).", "",
        "| model | method | params | SST-2 | MRPC | CoLA | QNLI | RTE | STS-B | MNLI | avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        # SST-2: 93 and 91; avg: (92 + 88 + 55 + 92 + 75 + 90) / 6 = 82.0 (MNLI is not in the paper's average)
        "| roberta-base | Uni-LoRA | 0.023M | 92.0 ± 1.4 (2) | 88.0 (1) | 55.0 (1) | 92.0 (1) | 75.0 (1) | 90.0 (1) | "
        "86.0 / 85.0 (1) | 82.0 |"]
    tg.main(["--table", str(tmp_path), "--report", "best"])  # the default, named
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Dev metric in percent at each run's best epoch (--report best): mean ± std (runs)."
    # SST-2: 94 and 96; avg: (95 + 90 + 60 + 92 + 80 + 91) / 6 = 84.666...
    assert lines[4] == ("| roberta-base | Uni-LoRA | 0.023M | 95.0 ± 1.4 (2) | 90.0 (1) | 60.0 (1) | 92.0 (1) | "
                        "80.0 (1) | 91.0 (1) | 87.0 / 88.0 (1) | 84.7 |")


@pytest.mark.parametrize("damage, problem", [
    (lambda r: r.update(best=5), "has an invalid 'best': 5"),
    (lambda r: r.update(last={"epoch": "3", "dev": {}}), "has in 'last' an invalid 'epoch': '3'"),
    (lambda r: r["config"].update(method=None), "has in 'config' an invalid 'method': None"),
    (lambda r: r.update(trainable=[]), "has an invalid 'trainable': []"),
    (lambda r: r["trainable"].pop("d"), "has in 'trainable' no 'd'"),
    (lambda r: r.update(from_recipe="lr"), "has an invalid 'from_recipe': 'lr'"),
    (lambda r: r.update(seconds_per_step_median="fast"), "has an invalid 'seconds_per_step_median': 'fast'"),
    (lambda r: r["last"]["dev"].pop("accuracy"), "has at its last epoch no 'accuracy'"),
    (lambda r: r["best"]["dev"].update(accuracy=None), "has at its best epoch an invalid 'accuracy': None"),
])
def test_table_refuses_a_damaged_results_json_in_one_line(tmp_path, capsys, damage, problem):
    write_results(tmp_path / "good", fake_run("sst2", 1, 0.9))
    run = fake_run("sst2", 2, 0.8, last=(5, 0.7))
    damage(run)
    write_results(tmp_path / "bad", run)
    with pytest.raises(SystemExit) as end:
        tg.main(["--table", str(tmp_path)])
    assert end.value.code == (f"error: --table: {tmp_path / 'bad' / 'results.json'} {problem}; it is not a "
                              f"results.json as train_glue.py writes it: leave its folder out")


def test_table_leaves_out_what_is_no_glue_run(tmp_path, capsys):
    write_results(tmp_path / "good", fake_run("sst2", 1, 0.9))
    for name, results in {"list": [], "config-list": {"best": {}, "config": []},
                          "task-list": {"best": {}, "config": {"task": ["sst2"]}}}.items():
        write_results(tmp_path / name, results)
    tg.main(["--table", str(tmp_path)])
    assert capsys.readouterr().out.splitlines()[4] == "| FacebookAI/roberta-base | Uni-LoRA | 0.023M | 90.0 (1) |"
