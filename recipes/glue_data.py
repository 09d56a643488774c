"""GLUE's data, exactly as the benchmark defines it: the eight tasks' official TSV layouts, the download from GLUE's
mirror (MRPC rebuilt the way GLUE's script did), the dev sets' row counts, and which metric each task reports.

Why it exists: a result is comparable to the paper's only on GLUE's own files, read exactly. Every way a file can
differ (a missing header, a re-saved row with other tabs, another encoding, a different dev set) is an error naming
the file and line, or, for a --data_dir of the user's own, a printed note that the numbers are not comparable.
"""
import math
import os
import shutil
import zipfile
from pathlib import Path, PurePosixPath

from pretrained.hub import download, missing_dirs, remove_if_empty
from recipes.training import UserError

# -----------------------------------------------------------------------------
# Tasks: how each official TSV is laid out, and how each task is scored. Columns are 0-based; labels=None
# means regression; header names the text and label columns of the file's first line (CoLA has none). The
# first metric is the paper's and picks the best epoch; MNLI's first dev file (matched) picks it too.

TASKS = {
    "sst2": dict(folder="SST-2", dev=("dev.tsv",), header=("sentence", "label"), ncols=(2,), text=(0,), label=1,
                 labels=("0", "1"), metrics=("accuracy",)),
    "mrpc": dict(folder="MRPC", dev=("dev.tsv",), header=("#1 String", "#2 String", "Quality"), ncols=(5,),
                 text=(3, 4), label=0, labels=("0", "1"), metrics=("accuracy", "f1")),
    "cola": dict(folder="CoLA", dev=("dev.tsv",), header=None, ncols=(4,), text=(3,), label=1,
                 labels=("0", "1"), metrics=("matthews",)),
    "qnli": dict(folder="QNLI", dev=("dev.tsv",), header=("question", "sentence", "label"), ncols=(4,),
                 text=(1, 2), label=3, labels=("entailment", "not_entailment"), metrics=("accuracy",)),
    "rte": dict(folder="RTE", dev=("dev.tsv",), header=("sentence1", "sentence2", "label"), ncols=(4,),
                text=(1, 2), label=3, labels=("entailment", "not_entailment"), metrics=("accuracy",)),
    "stsb": dict(folder="STS-B", dev=("dev.tsv",), header=("sentence1", "sentence2", "score"), ncols=(10,),
                 text=(7, 8), label=9, labels=None, metrics=("pearson", "spearman")),
    # MNLI train rows have 12 columns, dev rows 16 (five annotator labels); the gold label is always last.
    "mnli": dict(folder="MNLI", dev=("dev_matched.tsv", "dev_mismatched.tsv"),
                 header=("sentence1", "sentence2", "gold_label"), ncols=(12, 16), text=(8, 9), label=-1,
                 labels=("contradiction", "entailment", "neutral"), metrics=("accuracy",)),
    "qqp": dict(folder="QQP", dev=("dev.tsv",), header=("question1", "question2", "is_duplicate"), ncols=(6,),
                text=(3, 4), label=5, labels=("0", "1"), metrics=("accuracy", "f1")),
}
# The official dev sets' example counts, per dev file: a cached download must match them exactly.
DEV_ROWS = {"sst2": (872,), "mrpc": (408,), "cola": (1043,), "qnli": (5463,), "rte": (277,), "stsb": (1500,),
            "mnli": (9815, 9832), "qqp": (40430,)}


GLUE_URL = "https://dl.fbaipublicfiles.com/glue/data/"
GLUE_ZIPS = {"sst2": "SST-2.zip", "cola": "CoLA.zip", "qnli": "QNLIv2.zip", "rte": "RTE.zip",
             "stsb": "STS-B.zip", "mnli": "MNLI.zip", "qqp": "QQP-clean.zip"}
# GLUE never hosted MRPC itself (licence); its script used SentEval's copy plus GLUE's own dev split.
MRPC_TRAIN_URL = "https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_train.txt"
MRPC_DEV_IDS_URL = "https://dl.fbaipublicfiles.com/glue/data/mrpc_dev_ids.tsv"


class DataError(UserError, ValueError):
    """A data file that is missing or not in the task's GLUE format."""


def split_suffix(task, name):
    """'' for the dev file that picks the best epoch, '_mismatched' for MNLI's dev_mismatched.tsv."""
    return "" if name == TASKS[task]["dev"][0] else "_" + name.removeprefix("dev_").removesuffix(".tsv")


def reported(task):
    """The paper's metric, per dev file: what the summary and the table report."""
    return [TASKS[task]["metrics"][0] + split_suffix(task, name) for name in TASKS[task]["dev"]]


# -----------------------------------------------------------------------------
# A task's examples: from --data_dir, else from the download.


def load_data(cfg, train=True):
    """The task's train and dev examples: {"train": (texts, labels), "dev": {file: (texts, labels)}, ...}."""
    task, spec = cfg["task"], TASKS[cfg["task"]]
    if cfg["data_dir"]:
        folder = Path(cfg["data_dir"])
    else:
        cache = cfg["cache_dir"] or os.path.join(os.environ.get("UNILORA_CACHE", "~/.cache/unilora"), "glue")
        folder = fetch_glue(task, Path(cache).expanduser())
    for name in ("train.tsv",) * train + spec["dev"]:
        if not (folder / name).is_file():
            raise DataError(f"{folder / name} not found. --data_dir must be the {spec['folder']} folder of the "
                            f"GLUE data, holding train.tsv and {', '.join(spec['dev'])}")
    dev = {name: read_tsv(task, folder / name) for name in spec["dev"]}
    glue_dev_counts = all(len(dev[n][0]) == want for n, want in zip(spec["dev"], DEV_ROWS[task]))
    if not cfg["data_dir"]:
        check_dev_rows(task, folder, {n: t for n, (t, _) in dev.items()},
                       f"the cached copy is not GLUE's; delete {folder} to download it again, or pass --data_dir")
    elif not glue_dev_counts:
        print(f"note: {folder} is not GLUE's dev set ({', '.join(str(len(t)) for t, _ in dev.values())} examples, "
              f"GLUE: {', '.join(map(str, DEV_ROWS[task]))}); results are not comparable to the paper's")
    n = cfg["max_eval_samples"]
    dev = {name: (t[:n], y[:n]) for name, (t, y) in dev.items()}
    out = {"folder": str(folder), "dev": dev, "glue_dev_counts": glue_dev_counts}
    if train:
        texts, labels = read_tsv(task, folder / "train.tsv")
        n = cfg["max_train_samples"]
        out["train"] = (texts[:n], labels[:n])
    return out


# -----------------------------------------------------------------------------
# Download, once, into the cache: exactly GLUE's files, or nothing.


def fetch_glue(task, root):
    """Download one task into root/<folder> (once) and return that folder; it holds exactly GLUE's files."""
    spec = TASKS[task]
    dest = Path(root) / spec["folder"]
    needed = ("train.tsv",) + spec["dev"]
    if all((dest / name).is_file() for name in needed):
        return dest
    created = missing_dirs(dest.parent)
    tmp = dest.with_name(dest.name + ".partial")  # an interrupted download never looks complete
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if task == "mrpc":
            download(MRPC_TRAIN_URL, tmp / "msr_paraphrase_train.txt")
            download(MRPC_DEV_IDS_URL, tmp / "mrpc_dev_ids.tsv")
            split_mrpc(tmp / "msr_paraphrase_train.txt", tmp / "mrpc_dev_ids.tsv", tmp)
            for name in ("msr_paraphrase_train.txt", "mrpc_dev_ids.tsv"):
                (tmp / name).unlink()
        else:
            archive = download(GLUE_URL + GLUE_ZIPS[task], tmp / GLUE_ZIPS[task])
            extract(archive, needed, tmp)
            archive.unlink()
        check_dev_rows(task, tmp, {name: read_tsv(task, tmp / name)[0] for name in spec["dev"]},
                       f"GLUE's mirror changed; download {task} by hand and pass --data_dir")
        shutil.rmtree(dest, ignore_errors=True)  # an incomplete copy (e.g. MNLI without dev_mismatched.tsv)
        os.replace(tmp, dest)
    except (OSError, zipfile.BadZipFile) as e:  # OSError: ConnectionError and urllib's HTTPError too
        raise DataError(f"cannot download GLUE {task} ({str(e).splitlines()[0]}). Without network, pass "
                        f"--data_dir with a {spec['folder']} folder holding {', '.join(needed)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_if_empty(created)
    return dest


def extract(archive, names, dest):
    """Copy each named file out of a GLUE zip: the one with that exact name nearest the top. The zips also hold
    original/ folders with other files of similar names (CoLA's in-domain dev set, STS-B's raw files)."""
    with zipfile.ZipFile(archive) as z:
        files = [m for m in z.infolist() if not m.is_dir()]
        for name in names:
            found = [m for m in files if PurePosixPath(m.filename).name == name]
            if not found:
                raise DataError(f"{archive.name} holds no {name}; GLUE's mirror changed. Download the task by "
                                f"hand and pass --data_dir")
            depth = min(len(PurePosixPath(m.filename).parts) for m in found)
            top = [m for m in found if len(PurePosixPath(m.filename).parts) == depth]
            if len(top) > 1:
                raise DataError(f"{archive.name} holds {len(top)} files {name} at the same level; pass --data_dir")
            with z.open(top[0]) as src, open(dest / name, "wb") as out:
                shutil.copyfileobj(src, out)


def check_dev_rows(task, folder, dev_texts, hint):
    for (name, texts), want in zip(dev_texts.items(), DEV_ROWS[task]):
        if len(texts) != want:
            raise DataError(f"{Path(folder) / name} has {len(texts)} examples, GLUE's has {want}: {hint}")


def split_mrpc(corpus, dev_ids, out):
    """Split the MSR paraphrase training file into GLUE's MRPC train.tsv / dev.tsv by the official dev ids."""
    dev = {tuple(line.split("\t")) for line in text_lines(dev_ids) if line}
    lines = list(text_lines(corpus))
    train_rows, dev_rows = [lines[0]], [lines[0]]
    for i, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        cols = line.split("\t")
        if len(cols) != 5:
            raise DataError(f"{corpus}:{i}: expected 5 tab-separated columns, got {len(cols)}")
        (dev_rows if (cols[1], cols[2]) in dev else train_rows).append(line)
    (Path(out) / "train.tsv").write_text("\n".join(train_rows) + "\n", encoding="utf-8")
    (Path(out) / "dev.tsv").write_text("\n".join(dev_rows) + "\n", encoding="utf-8")


# -----------------------------------------------------------------------------
# Reading the TSVs: split on tabs only, every line checked.


def text_lines(path):
    """The lines of a UTF-8 file without line ends (a BOM is dropped); bad bytes are an error naming the line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # the MSR corpus (MRPC) starts with a BOM
                raw = raw[3:]
            try:
                yield raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                f"GLUE files are UTF-8: use the official file unchanged") from None


def read_tsv(task, path):
    """Parse one official GLUE TSV into (texts, labels); texts is a list of 1- or 2-tuples of str.

    GLUE files contain unbalanced quote characters, so rows are split on tabs only (the csv module's
    quoting would silently merge lines). Anything unexpected is an error naming the file and line.
    """
    spec = TASKS[task]
    texts, labels = [], []
    for lineno, line in enumerate(text_lines(path), start=1):
        cols = line.split("\t")
        if spec["header"] and lineno == 1:
            names = tuple(cols[i] if -len(cols) <= i < len(cols) else None for i in spec["text"] + (spec["label"],))
            if names != spec["header"]:
                raise DataError(f"{path}:1: expected {task}'s header line naming columns {', '.join(spec['header'])}, "
                                f"got {line[:60]!r}. Use the official GLUE file, header included")
            continue
        if not line.strip():
            continue  # a blank line (usually the last) carries no example
        if len(cols) not in spec["ncols"]:
            want = " or ".join(map(str, spec["ncols"]))
            raise DataError(f"{path}:{lineno}: expected {want} tab-separated columns for {task}, got "
                            f"{len(cols)}. Use the official GLUE TSV unchanged (a file re-saved by a "
                            f"spreadsheet or with csv quoting loses or adds tabs)")
        raw = cols[spec["label"]].strip()
        if spec["labels"] is None:
            try:
                y = float(raw)
            except ValueError:
                y = float("nan")
            if not math.isfinite(y):
                raise DataError(f"{path}:{lineno}: {task} score must be a finite number, got {raw!r}")
        elif raw in spec["labels"]:
            y = spec["labels"].index(raw)
        else:
            raise DataError(f"{path}:{lineno}: {task} label must be one of {list(spec['labels'])}, got {raw!r}")
        texts.append(tuple(cols[c] for c in spec["text"]))
        labels.append(y)
    if not texts:
        raise DataError(f"{path}: no examples; is this the right file for {task}?")
    return texts, labels
