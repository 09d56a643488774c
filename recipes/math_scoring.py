"""Reading a model's math answers: the official GSM8K and MATH rules (MetaMath's gsm8k_eval.py / MATH_eval.py, which
Uni-LoRA's evaluation runs), MATH's LaTeX normalisation, and a lenient reading reported beside them.

Why it exists: Table 3's accuracy is only comparable if every rule of the official reading holds, point by point,
including its quirks (the LAST "The answer is: ", one thousands separator, Python's round). The lenient reading
is a second number for small models that state an answer in another form; it never replaces the official one.
"""
import math
import re
from collections import defaultdict
from decimal import Decimal, InvalidOperation
from fractions import Fraction


def score_all(task, items, completions):
    """Both readings of every completion (items: the problems, each with its reference, level and subject).
    Returns (one record per problem, the accuracies, the accuracies by_level and by_subject where known)."""
    records, counts = [], defaultdict(lambda: [0, 0])
    for item, completion in zip(items, completions, strict=True):
        pred, ok, lenient, ok_lenient = score(task, completion, item)
        for group in ("all", f"level:{item['level']}", f"subject:{item['subject']}"):
            counts[group][0] += ok
            counts[group][1] += 1
        counts["lenient"][0] += ok_lenient
        counts["no_answer_mark"][0] += ANSWER_MARK not in completion
        records.append(dict(question=item["question"], reference=item["reference"], prediction=pred, correct=ok,
                            prediction_lenient=lenient, correct_lenient=ok_lenient, level=item["level"],
                            subject=item["subject"], completion=completion))
    n, correct = counts["all"][1], counts["all"][0]
    accuracy = dict(task=task, accuracy=correct / n, correct=correct, n=n, accuracy_lenient=counts["lenient"][0] / n,
                    correct_lenient=counts["lenient"][0], no_answer_mark=counts["no_answer_mark"][0])
    groups = {}
    for kind in ("level", "subject"):
        by = {k.split(":", 1)[1]: dict(accuracy=c / m, correct=c, n=m) for k, (c, m) in sorted(counts.items())
              if k.startswith(kind + ":") and k != f"{kind}:None"}
        if by:
            groups[f"by_{kind}"] = by
    return records, accuracy, groups


def score(task, completion, item):
    """(official prediction, correct, lenient prediction, correct) for one completion."""
    if task == "gsm8k":
        pred = official_gsm8k_answer(completion)
        lenient, _ = extract_answer(completion)
        ok = pred is not None and float(pred) == item["reference"]
        return pred, ok, lenient, same_number(lenient, item["reference"])
    pred, lenient = official_math_answer(completion), lenient_math_answer(completion)
    return pred, math_equal(pred, item["reference"]), lenient, lenient_math_equal(lenient, item["reference"])


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
    a, _, b = s.partition("/")
    try:
        if s.count("/") == 1 and s == f"{int(a)}/{int(b)}":
            return f"\\frac{{{int(a)}}}{{{int(b)}}}"
    except ValueError:  # not integers (or thousands of digits)
        pass
    return s


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


def math_equal(prediction, reference):
    """The official is_equiv: equal after normalisation (raw equality where normalising fails)."""
    if prediction is None or reference is None:
        return False
    a, b = normalize_math(prediction), normalize_math(reference)
    return prediction == reference if a is None or b is None else a == b


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
    """math_equal, or equal after also dropping \\boxed, $, %, any trailing \\text{..} unit and trailing zeros."""
    if math_equal(prediction, reference):
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

