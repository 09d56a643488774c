"""Results over many GLUE runs: the summary of one experiment's seeds (summary.json), and Table 1 (--table) from
any run folders, next to the paper's numbers.

Why it exists: a GLUE result is a statistic over runs (the paper's: the mean over 5 seeds), so reading runs back
and grouping them is its own step, run long after training and on any machine.

Which epoch of a run counts is a choice, `report`: "best", the epoch with the best dev metric (the official
repository's get_results.py takes each run's maximum over its evaluations), or "last", where the official training
scripts end (they evaluate every epoch and keep no best checkpoint). The paper does not say which. Every run
records both, so either can be reported at any time, and the table's first line says which it holds.

In the table, runs whose settings differ only by seed (or by where things lived, or by the per-task recipe values)
form one row; every other recorded setting is part of the row's identity, so a new setting (e.g. a future
--projection) separates rows and becomes a column as soon as it varies.
"""
import json
import statistics
from pathlib import Path

from recipes.glue_data import TASKS, reported
from recipes.training import UserError, bad_field, choice, number, record, text, whole

# Dev results of Table 1 (Uni-LoRA, all-positive P, mean of 5 seeds, d = 23,040).
PAPER = {"roberta-base": {"sst2": 94.5, "mrpc": 89.7, "cola": 64.6, "qnli": 92.3, "rte": 79.8, "stsb": 90.9,
                          "avg": 85.3},
         "roberta-large": {"sst2": 96.3, "mrpc": 91.3, "cola": 68.5, "qnli": 94.6, "rte": 86.6, "stsb": 92.1,
                           "avg": 88.3}}
PAPER_TASKS = ("sst2", "mrpc", "cola", "qnli", "rte", "stsb")
REPORTS = ("best", "last")  # which epoch of each run is reported: the one with the best dev metric, or the last


def stats(values):
    return {"values": values, "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "median": statistics.median(values)}


def summarize(runs, report="best"):
    """The seeds' dev metrics, per task: under "best" and "last" the statistics (values, mean, sample std, median)
    of the best and of the last epoch, the epochs themselves per seed, and, at the top level under each metric's
    name, the statistics of the epoch that `report` names (what readers of older summaries find there)."""
    task = runs[0]["config"]["task"]
    out = {"task": task, "metric": TASKS[task]["metrics"][0], "seeds": [r["config"]["seed"] for r in runs],
           "report": report}
    for which in REPORTS:
        out[which + "_epoch"] = {str(r["config"]["seed"]): r[which]["epoch"] for r in runs}
        out[which] = {key: stats([r[which]["dev"][key] for r in runs]) for key in reported(task)}
    out.update(out[report])
    return out


# -----------------------------------------------------------------------------
# Table 1

NOT_SETTINGS = ("task", "seed", "device", "threads", "data_dir", "cache_dir", "eval_batch_size")
METHOD_NAMES = {"unilora": "Uni-LoRA", "lora": "LoRA", "head": "head only"}
# What a row costs (columns shown when the runs recorded them), as medians over its runs: time per optimiser
# step, P theta_d forward + backward per forward pass, the bytes P is stored in, the peak resident memory.
COST_COLUMNS = (("s/step", "seconds_per_step_median"), ("P ms", "projection_ms"), ("P bytes", "projection_bytes"),
                ("peak RSS MB", "peak_rss_mb"))
# What the table reads from a GLUE run's results.json, each value checked (recipes/training.py): a damaged file is
# one line that names it. A results.json is a GLUE run's when it has "best" and its config a GLUE task.
IS_GLUE_RUN = record({"task": choice(tuple(TASKS))})
EPOCH = record({"epoch": whole(), "dev": record({})})
RESULTS = {"config": record({"model": text(), "method": choice(tuple(METHOD_NAMES))}),
           "from_recipe": lambda v: isinstance(v, list) and all(type(k) is str for k in v),
           "trainable": record({"d": whole(0)}), "best": EPOCH, "last": EPOCH,
           **{key: number(0, null=True) for _, key in COST_COLUMNS}}


def make_table(paths, report="best"):
    """Table 1 in Markdown, after a line that says which epoch of each run it reports: a row per setting (the
    paper's row after each of its models), a column per task."""
    rows, runs = {}, collect_runs(paths)  # settings -> task -> runs
    costs = [(label, key) for label, key in COST_COLUMNS if any(r.get(key) is not None for r in runs)]
    for r in runs:
        settings = tuple(sorted((k, json.dumps(v)) for k, v in r["config"].items()
                                if k not in NOT_SETTINGS and k not in r.get("from_recipe", ())))
        rows.setdefault(settings, {}).setdefault(r["config"]["task"], []).append(r)
    tasks = [t for t in TASKS if any(t in by_task for by_task in rows.values())]
    names = sorted({k for settings in rows for k, _ in settings} - {"model", "method"})
    varying = [k for k in names if len({dict(s).get(k) for s in rows}) > 1]
    with_avg = all(t in tasks for t in PAPER_TASKS)
    header = ["model", "method", *varying, "params", *(TASKS[t]["folder"] for t in tasks)] + ["avg"] * with_avg + \
        [label for label, _ in costs]
    # Best and last epoch can differ by points; a table that does not say which it holds cannot be compared.
    lines = [f"Dev metric in percent at each run's {report} epoch (--report {report}): mean ± std (runs).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    def shown(settings, key):
        value = json.loads(dict(settings).get(key, "null"))
        return "-" if value is None else str(value)

    order = sorted(rows, key=lambda s: (shown(s, "model"), shown(s, "method") != "unilora",
                                        [shown(s, k) for k in varying]))
    for i, settings in enumerate(order):
        by_task, s = rows[settings], {k: json.loads(v) for k, v in settings}
        any_run = next(iter(by_task.values()))[0]
        cells = [cell(by_task[t], t, report) if t in by_task else "-" for t in tasks]
        means = [statistics.mean(100 * r[report]["dev"][reported(t)[0]] for r in by_task[t])
                 for t in PAPER_TASKS if t in by_task]
        avg = [f"{statistics.mean(means):.1f}" if len(means) == len(PAPER_TASKS) else "-"] * with_avg
        every_run = [r for runs in by_task.values() for r in runs]
        lines.append("| " + " | ".join([s["model"], METHOD_NAMES[s["method"]], *(shown(settings, k) for k in varying),
                                        f"{any_run['trainable']['d'] / 1e6:.3g}M", *cells, *avg,
                                        *(cost(every_run, key) for _, key in costs)]) + " |")
        paper = PAPER.get(s["model"].lower().removeprefix("facebookai/"))
        last_of_model = i + 1 == len(order) or dict(order[i + 1])["model"] != dict(settings)["model"]
        if paper and last_of_model and any(t in paper for t in tasks):
            lines.append("| " + " | ".join([s["model"], "Uni-LoRA (paper, no signs)", *("-" for _ in varying),
                                            "0.023M", *(str(paper.get(t, "-")) for t in tasks),
                                            *[str(paper["avg"])] * with_avg, *("-" for _ in costs)]) + " |")
    return "\n".join(lines)


def collect_runs(paths):
    """The results.json of every finished GLUE training run under `paths`, each once."""
    runs, seen = [], set()
    for path in map(Path, paths):
        if not path.exists():
            raise UserError(f"--table {path}: no such file or folder")
        for file in [path] if path.is_file() else sorted(path.rglob("results.json")):
            if file.resolve() in seen or any(part.endswith(".partial") for part in file.parts):
                continue
            seen.add(file.resolve())
            try:
                results = json.loads(file.read_text())
            except (OSError, ValueError) as e:
                raise UserError(f"--table: {file} is not a readable results.json ({e})") from None
            # a GLUE training run: eval-N/ holds scores only, and other scripts' runs have other tasks
            if not isinstance(results, dict) or "best" not in results or results.get("kind") == "eval" \
                    or not IS_GLUE_RUN(results.get("config")):
                continue
            if not {"from_recipe", "trainable", "last"} <= results.keys():
                raise UserError(f"--table: {file} was written by an older train_glue.py; run it again with "
                                f"this version (or leave its folder out)")
            problem = bad_field(results, RESULTS) or bad_metric(results)
            if problem:
                raise UserError(f"--table: {file} {problem}; it is not a results.json as train_glue.py writes "
                                f"it: leave its folder out")
            runs.append(results)
    if not runs:
        raise UserError(f"--table: no training run (results.json) under {', '.join(map(str, paths))}")
    return runs


def bad_metric(results) -> str | None:
    """The task's reported metrics at the best and the last epoch, which the table averages, must be numbers."""
    for which in REPORTS:
        problem = bad_field(results[which]["dev"], {key: number() for key in reported(results["config"]["task"])})
        if problem:
            return f"has at its {which} epoch{problem.removeprefix('has')}"  # "... no 'accuracy'", "... an invalid"
    return None


def cell(runs, task, report):
    """'mean ± std (n)' in percent over the runs' best (or last) epochs; MNLI: matched / mismatched."""
    parts = []
    for key in reported(task):
        s = stats([100 * r[report]["dev"][key] for r in runs])
        parts.append(f"{s['mean']:.1f}" + (f" ± {s['std']:.1f}" if len(runs) > 1 else ""))
    return " / ".join(parts) + f" ({len(runs)})"


def cost(runs, key):
    values = [r[key] for r in runs if r.get(key) is not None]
    if not values:
        return "-"
    median = statistics.median(values)
    return f"{round(median):,}" if all(isinstance(v, int) for v in values) else f"{median:.4g}"
