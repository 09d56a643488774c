"""Reading a model's math answers three ways: the official graders (the Uni-LoRA repository's
math_instruction_tuning/instruction_tuning_eval/: gsm8k_eval.py and MATH_eval.py with utils.is_equiv and
grader.math_equal, as the paper's Table 3 was scored), the strict reading (MetaMath's answer normalisation and
plain string equality) and a lenient one.

Why it exists: Table 3's accuracy is only comparable if every rule of the official grader holds, point by point,
quirks included: the LAST "The answer is: ", one thousands separator, Python's round, a number equal to the
reference x100 or /100 counted correct, and MATH's exception path (where normalising an answer raises, the
official code counts any non-empty answer correct). The strict and lenient readings are reported beside it under
their own names; neither replaces it.
"""
import importlib.metadata
import importlib.util
import json
import math
import queue
import re
import subprocess
import sys
import threading
from collections import defaultdict
from decimal import Decimal, InvalidOperation
from fractions import Fraction

READERS = ("official", "strict", "lenient")


def score_all(task, items, completions, symbolic=True):
    """Every reading of every completion (items: the problems, each with its reference, level and subject).
    symbolic=False leaves sympy out of the official MATH grader. Returns (one record per problem, the
    accuracies, the official accuracy by_level and by_subject where known)."""
    records, counts = [], defaultdict(lambda: [0, 0])
    with OfficialGrader(symbolic and task == "math") as grader:
        for item, completion in zip(items, completions, strict=True):
            r = score(task, completion, item, grader)
            for group in ("all", f"level:{item['level']}", f"subject:{item['subject']}"):
                counts[group][0] += r["correct"]
                counts[group][1] += 1
            for reader in ("strict", "lenient"):
                counts[reader][0] += r[f"correct_{reader}"]
            counts["exception_path"][0] += r.get("exception_path", False)
            counts["no_answer_mark"][0] += ANSWER_MARK not in completion
            records.append(dict(question=item["question"], reference=item["reference"], **r, level=item["level"],
                                subject=item["subject"], completion=completion))
        n, correct = counts["all"][1], counts["all"][0]
        accuracy = dict(task=task, accuracy=correct / n, correct=correct, n=n,
                        **{f"{k}_{reader}": v for reader in ("strict", "lenient")
                           for k, v in (("accuracy", counts[reader][0] / n), ("correct", counts[reader][0]))},
                        no_answer_mark=counts["no_answer_mark"][0])
        if task == "math":
            accuracy.update(exception_path=counts["exception_path"][0], **grader.report())
    groups = {}
    for kind in ("level", "subject"):
        by = {k.split(":", 1)[1]: dict(accuracy=c / m, correct=c, n=m) for k, (c, m) in sorted(counts.items())
              if k.startswith(kind + ":") and k != f"{kind}:None"}
        if by:
            groups[f"by_{kind}"] = by
    return records, accuracy, groups


def summary_lines(accuracy):
    """One line per reader, '<TASK> <reader> <correct>/<total>', and what the official MATH grader used."""
    task, n = accuracy["task"].upper(), accuracy["n"]
    lines = [f"{task} official {accuracy['correct']}/{n}",
             *(f"{task} {reader} {accuracy['correct_' + reader]}/{n}" for reader in ("strict", "lenient"))]
    if "symbolic" in accuracy:
        lines[0] += (f" (symbolic: {accuracy['symbolic']}; {accuracy['exception_path']} counted through the "
                     f"exception path)")
    return lines


def score(task, completion, item, grader=None):
    """One completion read three ways: a dict of prediction, correct (official), correct_strict,
    prediction_lenient, correct_lenient (MATH: and exception_path, true where the official verdict came from it)."""
    ref = item["reference"]
    if task == "gsm8k":
        pred = official_gsm8k_answer(completion)
        lenient, _ = extract_answer(completion)
        strict = pred is not None and ref is not None and float(pred) == ref
        return dict(prediction=pred, correct=strict or (pred is not None and ref is not None
                                                        and grader_math_equal(pred, ref)),
                    correct_strict=strict, prediction_lenient=lenient, correct_lenient=same_number(lenient, ref))
    pred, lenient = official_math_answer(completion), lenient_math_answer(completion)
    # MATH_eval.process_results: no marker is wrong before is_equiv is asked (which calls two Nones equal)
    ok, through_exception = official_is_equiv(pred, ref, grader) if pred is not None else (False, False)
    return dict(prediction=pred, correct=ok, exception_path=through_exception,
                correct_strict=strict_math_equal(pred, ref), prediction_lenient=lenient,
                correct_lenient=lenient_math_equal(lenient, ref))


# ----------------------------------------------------------------------------------------------------------
# Scoring, official: exactly the rules of the official gsm8k_eval.py / MATH_eval.py (MetaMath's evaluation).

ANSWER_MARK = "The answer is: "
OFFICIAL_NUMBER = re.compile(r"[-+]?\d*[.,/]?\d+")


def official_gsm8k_answer(completion):
    """The first number after the LAST 'The answer is: ', as round(float(...)); None if there is none.  The
    pattern allows one separator, so '1,234' is 1234 but '1,234,567' reads as 1234; 'a/b' is a fraction (b = 0
    gives a); round() is Python's, halves to even (2.5 -> 2)."""
    if ANSWER_MARK not in completion:
        return None
    m = OFFICIAL_NUMBER.search(completion.split(ANSWER_MARK)[-1].strip())
    if not m:
        return None
    token = m.group()
    numerator, _, denominator = token.partition("/")
    if denominator and not numerator.lstrip("+-").isdigit():  # '/5': the official code finds no number either
        return None
    try:
        if not denominator:
            value = float(token.replace(",", ""))
        elif int(denominator) == 0:  # the official code returns the numerator
            value = float(numerator)
        else:
            value = float(Fraction(int(numerator), int(denominator)))
    except (OverflowError, ValueError):  # thousands of digits: no answer (the official code would crash)
        return None
    return None if math.isinf(value) else round(value)


def gsm8k_reference(solution):
    """The number after the last '####' (GSM8K) or 'The answer is:' (MetaMath style), commas removed."""
    for mark in ("####", "The answer is:"):
        if mark in solution:
            text = solution.rsplit(mark, 1)[1].strip().replace(",", "")
            try:
                value = Decimal(text)
            except InvalidOperation:
                return None
            return float(value) if value.is_finite() else None
    return None


def official_math_answer(completion):
    """The text after the last 'The answer is: ', up to the first '.\\n', one trailing '.' dropped."""
    if ANSWER_MARK not in completion:
        return None
    text = completion.split(ANSWER_MARK)[-1].split(".\n")[0].strip()
    return text[:-1].strip() if text.endswith(".") else text


def last_boxed(solution):
    """The content of the last \\boxed{...} (braces balanced), or None; as the official code, a \\fbox or a
    \\boxed without braces gives None, which scores every answer wrong."""
    start = solution.rfind("\\boxed")
    start = start if start >= 0 else solution.rfind("\\fbox")
    if start < 0:
        return None
    depth = 0
    for i in range(start, len(solution)):
        depth += {"{": 1, "}": -1}.get(solution[i], 0)
        if solution[i] == "}" and depth == 0:
            boxed = solution[start:i + 1]
            return boxed[len("\\boxed{"):-1] if boxed.startswith("\\boxed{") else None
    return None


def _brace_first_char(s, command):
    """'\\sqrt2' -> '\\sqrt{2}'; None where the command ends the string (the official code raises there)."""
    head, *parts = s.split(command)
    for part in parts:
        if not part:
            return None
        head += command + (part if part[0] == "{" else "{" + part[0] + "}" + part[1:])
    return head


def _fix_fracs(s):
    """'\\frac12' -> '\\frac{1}{2}', '\\frac1{72}' -> '\\frac{1}{72}'; None where the official code raises."""
    head, *parts = s.split("\\frac")
    for part in parts:
        if not part:
            return None
        if part[0] == "{":
            head += "\\frac" + part
        elif len(part) < 2:
            return s  # the official code gives up and keeps the string as it was
        elif part[1] == "{":
            head += "\\frac{" + part[0] + "}" + part[1:]
        else:
            head += "\\frac{" + part[0] + "}{" + part[1] + "}" + part[2:]
    return head


def _slash_to_frac(s):
    """'3/4' -> '\\frac{3}{4}'. None where utils.fix_a_slash_b raises: one '/' between things int() refuses
    ('\\pi/2', 'x/3'; its except catches AssertionError only, so their ValueError escapes)."""
    if s.count("/") != 1:
        return s
    a, b = s.split("/")
    try:
        a, b = int(a), int(b)
    except ValueError:
        return None
    return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


def normalize_math(s):
    """MetaMath's (and the MATH paper's) answer normalisation, step by step; None where their code raises, in
    which case the raw strings are compared."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")):
        s = s.replace(old, new)
    if "\\text{ " in s:  # units: only a '\text{ ' with a space, and only once
        parts = s.split("\\text{ ")
        if len(parts) != 2:
            return None
        s = parts[0]
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # 'x = 5', 'k=5' -> '5'
        s = sides[1]
    s = _brace_first_char(s, "\\sqrt")
    if s is None:
        return None
    s = _fix_fracs(s.replace(" ", ""))
    if s is None:
        return None
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _slash_to_frac(s)


def strict_math_equal(prediction, reference):
    """The strict reading (MetaMath's and the MATH paper's is_equiv): equal after normalisation, and where
    normalising raises, equal as raw strings. No numeric or symbolic step."""
    if prediction is None or reference is None:
        return False
    a, b = normalize_math(prediction), normalize_math(reference)
    return prediction == reference if a is None or b is None else a == b


# ----------------------------------------------------------------------------------------------------------
# The official grader: utils.is_equiv around grader.math_equal, rule by rule.

def official_is_equiv(prediction, reference, grader=None):
    """utils.is_equiv(prediction, reference): (correct, through the exception path). Normalise both; then
    math_equal or string equality. Where normalising raises, the official code returns
    `math_equal(str1, str1) or str1 == str2`, which is true for any non-empty prediction (unless it reads as
    NaN), whatever the reference: that path is part of the paper's numbers, so it is kept and counted."""
    if prediction is None or reference is None:
        return prediction is None and reference is None, False
    a, b = normalize_math(prediction), normalize_math(reference)
    if a is None or b is None:
        ok = grader_math_equal(prediction, prediction, grader) or prediction == reference
        return ok, ok
    return grader_math_equal(a, b, grader) or a == b, False


def _is_digit(s):
    try:
        float(str(s).replace(",", ""))
        return True
    except ValueError:
        return False


def grader_math_equal(prediction, reference, grader=None):
    """grader.math_equal (include_percentage, is_close, no timeout): numbers, then brackets, then tuples and
    intervals element-wise, then sympy (through `grader`, an OfficialGrader; None: no symbolic step)."""
    # 1. Numbers: within rel_tol 1e-4 of the reference, of reference/100 or of reference*100 (the percent rule).
    #    When both read as numbers, this is the verdict: the later steps are not tried.
    if _is_digit(prediction) and _is_digit(reference):
        p, r = float(str(prediction).replace(",", "")), float(str(reference).replace(",", ""))
        return any(math.isclose(x, p, rel_tol=1e-4) for x in (r / 100, r, r * 100))
    if not prediction and prediction not in (0, False):
        return False
    reference, prediction = str(reference).strip(), str(prediction).strip()
    # 2. Brackets: a prediction in [...] (reference not in (...)) or in (...) (reference not in [...]) loses its
    #    outer brackets on both sides; then every {, }, ( and ) is dropped and the strings compared.
    p, r = prediction, reference
    if (p.startswith("[") and p.endswith("]") and not r.startswith("(")) or \
            (p.startswith("(") and p.endswith(")") and not r.startswith("[")):
        p, r = p.strip("[]()"), r.strip("[]()")
    if _drop_braces(p) == _drop_braces(r):
        return True
    # 3. Tuples and intervals: both in [...] or both in (...), the same number of commas, equal element-wise.
    if (prediction[:1] + prediction[-1:] in ("[]", "()")) and \
            prediction[:1] + prediction[-1:] == reference[:1] + reference[-1:]:
        parts, ref_parts = prediction[1:-1].split(","), reference[1:-1].split(",")
        if len(parts) == len(ref_parts) and all(grader_math_equal(x, y, grader) for x, y in zip(parts, ref_parts)):
            return True
    # 4. Symbolic: sympy's simplify(a - b) == 0, or N(a) within rel_tol 1e-3 of N(b).
    return grader is not None and grader.symbolic_equal(prediction, reference)


def _drop_braces(s):
    for c in "{}()":
        s = s.replace(c, "")
    return s


class OfficialGrader:
    """grader.symbolic_equal, run by sympy in a worker process (this file run as a script, JSON lines over its
    stdin and stdout): sympy's parse_expr evaluates its input as Python, so only plain expressions are handed to it
    (SAFE_EXPRESSION: digits, operators, brackets, short names and common functions; no quotes, backslashes,
    underscores or other names), and a simplify that hangs is stopped after `timeout` seconds and counts as not
    equal. Pairs kept from sympy are counted (skipped, timeouts).

    The official environment pins sympy 1.12 without the antlr4 4.11 runtime parse_latex needs, so its
    parse_latex always failed and parse_expr did the parsing; the worker goes straight to parse_expr."""

    def __init__(self, symbolic=True, timeout=10.0):
        self.enabled = symbolic and importlib.util.find_spec("sympy") is not None
        self.timeout, self.worker, self.answers = timeout, None, None
        self.calls = self.skipped = self.timeouts = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def report(self):
        version = f"sympy {importlib.metadata.version('sympy')}" if self.enabled else "off"
        return dict(symbolic=version, symbolic_calls=self.calls, symbolic_skipped=self.skipped,
                    symbolic_timeouts=self.timeouts)

    def symbolic_equal(self, a, b):
        if not self.enabled:
            return False
        if not (SAFE_EXPRESSION.fullmatch(a) and SAFE_EXPRESSION.fullmatch(b) and _safe_names(a + " " + b)):
            self.skipped += 1
            return False
        if self.worker is None:
            self.worker = subprocess.Popen([sys.executable, "-I", __file__], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True, encoding="utf-8")
            self.answers = queue.Queue()
            threading.Thread(target=lambda out, q: [q.put(line) for line in out], daemon=True,
                             args=(self.worker.stdout, self.answers)).start()
        self.calls += 1
        try:
            self.worker.stdin.write(json.dumps([a, b]) + "\n")
            self.worker.stdin.flush()
            return json.loads(self.answers.get(timeout=self.timeout))
        except (queue.Empty, OSError):  # hung, or the worker is gone: not equal, and a fresh worker next time
            self.timeouts += 1
            self.close()
            return False

    def close(self):
        if self.worker is not None:
            self.worker.kill()
            self.worker.wait()
            self.worker = None


SAFE_EXPRESSION = re.compile(r"[0-9A-Za-z\s+\-*/^().,=<>!\[\]{}]{1,200}")
MATH_NAMES = {"pi", "oo", "sqrt", "sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan", "sinh", "cosh",
              "tanh", "log", "ln", "exp", "Abs", "abs", "floor", "ceiling", "factorial", "binomial", "gcd", "lcm",
              "Max", "Min", "max", "min", "Rational", "Integer", "Float", "and", "or", "not", "in", "is"}


def _safe_names(text):
    """Every name is one or two letters (a variable; not S, whose S('...') parses a string, nor id) with digits
    after, or a common math function."""
    return all((len(name.rstrip("0123456789")) <= 2 and name.rstrip("0123456789") not in ("S", "id"))
               or name in MATH_NAMES for name in re.findall(r"[A-Za-z][A-Za-z0-9]*", text))


def _symbolic_worker():
    """The worker: grader.symbolic_equal on every [a, b] line of stdin, true or false on stdout."""
    from sympy import N, simplify
    from sympy.parsing.sympy_parser import parse_expr

    def parse(s):
        try:
            return parse_expr(s)
        except Exception:
            return s

    for line in sys.stdin:
        a, b = (parse(s) for s in json.loads(line))
        equal = False
        try:
            equal = bool(simplify(a - b) == 0)
        except Exception:
            pass
        if not equal:
            try:
                equal = math.isclose(N(a), N(b), rel_tol=1e-3)
            except Exception:
                pass
        print(json.dumps(equal), flush=True)


# ----------------------------------------------------------------------------------------------------------
# Scoring, lenient: a second number for reading small models, never in place of the official one.

NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")


def normalize_number(s):
    """'1,234.00' -> '1234', '$5' -> '5', '0.50' -> '0.5'; None if it is not a number."""
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        x = Decimal(s)
        if not x.is_finite():
            return None
        return str(int(x)) if x == x.to_integral_value() else format(x.normalize(), "f")
    except (InvalidOperation, ValueError):  # not a number, or too many digits to print
        return None


def extract_answer(text):
    """Lenient GSM8K reading: (answer or None, rule).  The number after the last 'The answer is' (colon and
    case optional), after the last '####', else the last number in the text; '$' is dropped first."""
    text = text.replace("$", "")
    markers = list(re.finditer(r"the answer is:?", text, re.IGNORECASE))
    if markers:
        m = NUMBER.search(text, markers[-1].end())
        if m:
            return normalize_number(m.group()), "answer_is"
    if "####" in text:
        m = NUMBER.search(text, text.rindex("####"))
        if m:
            return normalize_number(m.group()), "####"
    numbers = NUMBER.findall(text)
    if numbers:
        return normalize_number(numbers[-1]), "last_number"
    return None, "none"


def same_number(pred, ref):
    if pred is None or ref is None:
        return False
    return math.isclose(float(pred), float(ref), rel_tol=1e-9, abs_tol=1e-6)


def lenient_math_answer(completion):
    """The text after the last 'The answer is' (any case, colon optional), else the last \\boxed{...}."""
    markers = list(re.finditer(r"the answer is:?", completion, re.IGNORECASE))
    if markers:
        return completion[markers[-1].end():].split(".\n")[0].strip().rstrip(".").strip(" $")
    return last_boxed(completion)


def lenient_math_equal(prediction, reference):
    """strict_math_equal, or equal after also dropping \\boxed, $, %, any trailing \\text{..} unit and trailing zeros."""
    if strict_math_equal(prediction, reference):
        return True
    if prediction is None or reference is None:
        return False

    def clean(s):
        s = (last_boxed(s) if s.startswith("\\boxed{") else None) or s
        for mark in ("\\$", "$", "\\%", "%"):
            s = s.replace(mark, "")
        s = re.sub(r"\\(?:text|mbox|mathrm)\{[^{}]*\}\s*$", "", s).strip()
        s = normalize_math(s) or s
        return re.sub(r"^(-?\d+)\.0+$", r"\1", s.replace(",", ""))
    return clean(prediction) == clean(reference)


if __name__ == "__main__":  # run by OfficialGrader as its sympy worker
    _symbolic_worker()
