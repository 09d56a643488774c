"""The answer readings (recipes/math_scoring.py): the official GSM8K and MATH rules, checked on hand-written
generations and on a table of answers taken from real MATH solutions, and the lenient reading beside them."""
import pytest

from recipes.math_scoring import (OfficialGrader, extract_answer, grader_math_equal, official_is_equiv, gsm8k_reference, last_boxed, lenient_math_answer,
                                  lenient_math_equal, official_gsm8k_answer, official_math_answer,
                                  same_number, score, score_all, strict_math_equal, summary_lines)


# ------------------------------------------------------------------------------------ official scoring: GSM8K

@pytest.mark.parametrize("completion, number", [
    ("3 + 4 = 7.\nThe answer is: 7", 7),
    ("The answer is 2 * 1.5 = 3.", None),          # no 'The answer is: ': wrong, whatever follows
    ("The answer is: 17.6", 18),                   # round(float(...))
    ("The answer is: 2.5", 2),                     # Python's round: halves to even
    ("The answer is: 3.5", 4),
    ("The answer is: 1,234", 1234),
    ("The answer is: 1,234,567", 1234),            # one separator only: the official pattern stops there
    ("The answer is: 3/4", 1),                     # a fraction, rounded
    ("The answer is: 7/0", 7),                     # a zero denominator gives the numerator
    ("The answer is: /5", None),
    ("The answer is: $-12.", -12),
    ("The answer is: .5", 0),
    ("The answer is: 7\nWait.\nThe answer is: 9", 9),   # the LAST marker
    ("The answer is: x = 5 apples", 5),            # the first number after it
    ("The answer is: 3 or 4", 3),
    ("The answer is: seven", None),
    ("The answer is:5", None),                     # the marker includes its space
    ("the answer is: 5", None),                    # and its capital
    ("so 5 + 6 = 11\n#### 11", None),
    ("The answer is: " + "9" * 400, None),         # float overflows to inf: no number
    ("The answer is: " + "9" * 400 + "/7", None),
    ("The answer is: " + "9" * 5000 + "/0", None),
])
def test_official_gsm8k_reading(completion, number):
    assert official_gsm8k_answer(completion) == number


@pytest.mark.parametrize("completion, reference, official, strict, lenient", [
    ("The answer is 2 * 1.5 = 3.", 3.0, False, False, False),  # official: no 'The answer is: '; lenient reads 2
    ("The answer is: 17.6", 18.0, True, True, False),          # both official readings round; lenient wants 18
    ("The answer is: 1,234,567", 1234567.0, False, False, True),
    ("So 5 apples.\n#### 5", 5.0, False, False, True),
    ("The answer is: 42", 42.0, True, True, True),
    ("The answer is: 50", 5000.0, True, False, False),         # the percent rule: reference / 100
    ("The answer is: 5000", 50.0, True, False, False),         # and reference * 100
    ("The answer is: 10001", 10000.0, True, False, False),     # isclose(rel_tol=1e-4): 1 off in 10,000
    ("The answer is: 10002", 10000.0, False, False, False),
    ("The answer is: 49", 5000.0, False, False, False),
])
def test_gsm8k_readings(completion, reference, official, strict, lenient):
    """gsm8k_eval.py, gsm8k_test: `float(y_pred) == float(prompt_answer) or math_equal(y_pred, prompt_answer)`,
    y_pred from extract_answer_number (round(float(...)) of the first number after the last 'The answer is: ');
    grader.py, math_equal: numbers within isclose(rel_tol=1e-4) of reference/100, reference or reference*100."""
    r = score("gsm8k", completion, {"reference": reference})
    assert (r["correct"], r["correct_strict"], r["correct_lenient"]) == (official, strict, lenient)



def test_official_gsm8k_references():
    assert gsm8k_reference("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1,234") == 1234.0
    assert gsm8k_reference("So she has 18.\nThe answer is: 18") == 18.0
    assert gsm8k_reference("no final answer here") is None


# ------------------------------------------------------------------------------------- official scoring: MATH

@pytest.mark.parametrize("completion, answer", [
    ("So x = 9/7.\nThe answer is: \\frac{9}{7}", "\\frac{9}{7}"),
    ("The answer is: \\frac{9}{7}.\nThat is all.", "\\frac{9}{7}"),     # up to '.\n', the final '.' dropped
    ("The answer is: 3.5.", "3.5"),
    ("The answer is: 1.\nNo: The answer is: 2", "2"),
    ("The answer is \\boxed{2}", None),
])
def test_official_math_reading(completion, answer):
    assert official_math_answer(completion) == answer


@pytest.mark.parametrize("solution, boxed", [
    ("the graph has $\\boxed{2}$ vertical asymptotes.", "2"),
    ("$1+\\dfrac{2}{7}=\\boxed{\\dfrac{9}{7}}$.", "\\dfrac{9}{7}"),
    ("is $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("first $\\boxed{1}$, then $\\boxed{\\{1, 2\\}}$", "\\{1, 2\\}"),
    ("an old \\fbox{5}", None),     # the official remove_boxed accepts '\\boxed{' only
    ("$\\boxed 5$", None),
    ("$\\boxed{5$", None),
    ("no box at all", None),
])
def test_reference_is_the_last_boxed(solution, boxed):
    assert last_boxed(solution) == boxed


# (prediction after 'The answer is: ', reference from a real MATH solution's \boxed{}, equal under MetaMath's
# normalisation).  The False rows are differences the official rules do not forgive.
MATH_PAIRS = [
    ("\\frac{1}{3}", "\\frac 13", True),
    ("1/3", "\\frac 13", True),
    ("0.5", "\\frac{1}{2}", True),
    (".5", "\\frac{1}{2}", True),
    ("\\frac{33}{100}", "\\dfrac{33}{100}", True),
    ("9/7", "\\dfrac{9}{7}", True),
    ("1.2857", "\\dfrac{9}{7}", False),
    ("(-\\infty,\\frac{3}{7}]\\cup[\\frac{3}{5},\\infty)", "(-\\infty, \\tfrac37] \\cup [\\tfrac35, \\infty) ", True),
    ("120", "120^\\circ", True),
    ("139^{\\circ}", "139^\\circ", True),
    ("16,386.16", "\\$16,\\!386.16", True),
    ("16386.16", "\\$16,\\!386.16", False),     # commas are kept
    ("30240", "30,\\!240", False),
    ("2.50", "\\$2.50", True),
    ("-0.5", "-\\$0.50", False),                # trailing zeros are kept
    ("7", "7\\%", True),
    ("7%", "7\\%", False),                      # only the escaped \\% is removed
    ("4", "x = 4", True),
    ("2x", "y = 2x", True),
    ("10x-4y-5z-20=0", "10x - 4y - 5z - 20 = 0", True),
    ("65", "65 \\text{ children tickets }", True),
    ("135", "135\\text{ square feet}", True),
    ("(C)", "\\text{(C)}", False),              # '\\text{' without a space is not a unit
    ("7, -2, -5", "7, -2, \\text{ and } -5", False),   # everything from '\\text{ ' on is dropped
    ("6\\sqrt3", "6\\sqrt{3}", True),
    ("36\\sqrt{3}", "36 \\sqrt{3}", True),
    ("(3\\sqrt{3}, -9, -2)", "(3 \\sqrt{3}, -9, -2)", True),
    ("\\frac{3\\pi}{4}", "\\frac{3 \\pi}{4}", True),
    ("[-\\frac{\\pi}{2},\\frac{\\pi}{2}]", "\\left[ -\\frac{\\pi}{2}, \\frac{\\pi}{2} \\right]", True),
    ("\\frac{3}{2}+\\frac{3}{2}i", "\\frac{3}{2} + \\frac{3}{2} i", True),
    ("\\frac{7}{15}", " \\frac{7}{15}", True),
    ("-\\frac{1}{3}, 3", "3, -\\frac{1}{3}", False),
    ("2.0", "2", False),
    ("\\frac{1}{16}", "\\frac{1}{8}", False),
    ("23.3", "23.31", False),
    ("2\\sqrt", "2\\sqrt", True),               # normalising raises officially: the raw strings are compared
    ("2\\sqrt", "2\\sqrt{}", False),
    ("1" * 5000 + "/2", "\\frac{1}{2}", False),
    (None, "5", False),
]


@pytest.mark.parametrize("prediction, reference, equal", MATH_PAIRS)
def test_math_answers_compare_like_metamath(prediction, reference, equal):
    assert strict_math_equal(prediction, reference) is equal


def test_lenient_math_reading_is_separate():
    """The lenient reading forgives what the official one does not, and never changes the official verdict."""
    assert lenient_math_equal("30240", "30,\\!240") and not strict_math_equal("30240", "30,\\!240")
    assert lenient_math_equal("2.0", "2") and lenient_math_equal("7%", "7\\%")
    assert not lenient_math_equal("23.3", "23.31")
    assert lenient_math_answer("so the answer is \\boxed{5}.") == "\\boxed{5}"
    assert lenient_math_answer("hence $\\boxed{\\frac{1}{2}}$") == "\\frac{1}{2}"


# -------------------------------------------------------------------------------------- lenient GSM8K reading

@pytest.mark.parametrize("text, answer, rule", [
    ("She has 3 left.\nThe answer is: 18", "18", "answer_is"),
    ("The answer is: $1,234.00.", "1234", "answer_is"),
    ("the answer is 7, not 9", "7", "answer_is"),
    ("The answer is: -0.50", "-0.5", "answer_is"),
    ("2 + 3 = 5\n#### 72", "72", "####"),
    ("It costs $12 and then 1,000 more.", "1000", "last_number"),
    ("I count 4 apples. The answer is: unknown", "4", "last_number"),
    ("no digits at all", None, "none"),
    ("The answer is: " + "9" * 5000, None, "answer_is"),
])
def test_lenient_reading(text, answer, rule):
    assert extract_answer(text) == (answer, rule)


def test_same_number():
    assert same_number("18", "18") and same_number("0.5", "0.50") and same_number("1000", "1000.0")
    assert not same_number("18", "19") and not same_number(None, "1")


# ------------------------------------------------------------------------- the official MATH grader, rule by rule

def math_verdicts(completion, solution, grader=None):
    """(official, strict) for a completion against a MATH solution, as MATH_eval.py reads both."""
    r = score("math", completion, {"reference": last_boxed(solution)}, grader)
    return r["correct"], r["correct_strict"]


@pytest.mark.parametrize("completion, solution, official, strict", [
    # MATH_eval.py, process_results: the text after the LAST 'The answer is: ', cut at the first '.\n', one '.'
    ("The answer is: 5.\nSo the answer is 6", "so \\boxed{5}", True, True),
    ("The answer is: 3\nThe answer is: 5.", "\\boxed{5}", True, True),
    ("the answer is 5", "\\boxed{5}", False, False),                    # no marker: wrong, before is_equiv
    # remove_boxed(last_boxed_only_string(solution)): the last \boxed{...}, braces balanced; \fbox gives None
    ("The answer is: \\frac{1}{2}", "first \\boxed{3}, then \\boxed{\\frac{1}{2}}", True, True),
    ("The answer is: 5", "\\fbox{5}", False, False),
    # utils.strip_string: 0.5 <-> \frac{1}{2}, \frac12, a/b, units after '\text{ ', 'x = '
    ("The answer is: 0.5", "\\boxed{\\frac12}", True, True),
    ("The answer is: 3/4", "\\boxed{\\frac{3}{4}}", True, True),
    ("The answer is: 5", "\\boxed{5 \\text{ cm}}", True, True),
    ("The answer is: x = 4", "\\boxed{4}", True, True),
    # grader.math_equal, numbers: rel_tol 1e-4 and the percent rule; strict wants the same string
    ("The answer is: 0.3333", "\\boxed{0.33333}", True, False),
    ("The answer is: 25", "\\boxed{0.25}", True, False),
    ("The answer is: 0.25", "\\boxed{25}", True, False),
    ("The answer is: 2.0", "\\boxed{2}", True, False),
    ("The answer is: 3", "\\boxed{4}", False, False),
    # grader.math_equal, brackets: outer [] or () of the prediction dropped on both sides, then all {}() dropped
    ("The answer is: [3]", "\\boxed{3}", True, False),
    ("The answer is: (1,2)", "\\boxed{(1,2)}", True, True),
    # grader.math_equal, tuples and intervals: element-wise, only when both use the same brackets
    ("The answer is: (1, 2.00001)", "\\boxed{(1,2)}", True, False),
    ("The answer is: [0.5, 1]", "\\boxed{[0.50001, 1]}", True, False),
    ("The answer is: [0.5, 1]", "\\boxed{[\\frac{1}{2}, 1]}", False, False),  # elements compare as numbers or sympy
    ("The answer is: (2,1)", "\\boxed{(1,2)}", False, False),
    ("The answer is: [1, 2]", "\\boxed{(1, 2)}", False, False),
    # utils.is_equiv, the exception path: fix_a_slash_b's int() raises ValueError (its except catches only
    # AssertionError), remove_right_units asserts one '\text{ ', fix_sqrt indexes past the end; the official code
    # then returns math_equal(str1, str1) or str1 == str2: true for any non-empty answer that is not NaN
    ("The answer is: \\pi/2", "\\boxed{\\frac{\\pi}{3}}", True, False),
    ("The answer is: 7", "\\boxed{3 \\text{ cm} and 4 \\text{ cm}}", True, False),
    ("The answer is: 2\\sqrt", "\\boxed{9}", True, False),
    ("The answer is: nan", "\\boxed{x/y}", False, False),
    ("The answer is: x/y", "\\boxed{x/y}", True, True),
])
def test_official_math_grader_rules(completion, solution, official, strict):
    """MATH_eval.py, process_results -> utils.is_equiv(extract_ans, answer) -> grader.math_equal(ss1, ss2) or
    ss1 == ss2, each rule on a hand-written case (the symbolic step is left out here: grader=None)."""
    assert math_verdicts(completion, solution) == (official, strict)


def test_exception_path_is_counted():
    """The official verdicts that come from utils.is_equiv's except branch are counted, so a reader sees how many
    of the official number's correct answers no comparison backs."""
    items = [dict(question="q", reference=ref, level=None, subject=None) for ref in ("\\frac{\\pi}{3}", "5", "6")]
    completions = ["The answer is: \\pi/2", "The answer is: 5", "The answer is: 7"]
    records, acc, _ = score_all("math", items, completions, symbolic=False)
    assert (acc["correct"], acc["correct_strict"], acc["exception_path"]) == (2, 1, 1)
    assert [r["exception_path"] for r in records] == [True, False, False]
    assert acc["symbolic"] == "off"
    assert summary_lines(acc)[:3] == ["MATH official 2/3 (symbolic: off; 1 counted through the exception path)",
                                      "MATH strict 1/3", "MATH lenient 1/3"]
    assert official_is_equiv(None, None) == (True, False)  # is_equiv itself calls two Nones equal...
    assert math_verdicts("no marker", "no box either") == (False, False)  # ...but process_results never asks



@pytest.mark.parametrize("prediction, reference, equal", [
    ("2*x+1", "1+2*x", True),                  # simplify(a - b) == 0
    ("sqrt(2)*sqrt(2)", "2", True),
    ("1.4142", "sqrt(2)", True),               # N(a) within rel_tol 1e-3 of N(b)
    ("1.5", "sqrt(2)", False),
    ("x+1", "x+2", False),
])
def test_symbolic_step_with_sympy(prediction, reference, equal):
    """grader.py, symbolic_equal: parse_expr both sides (parse_latex always failed in the pinned environment),
    then simplify(a - b) == 0, else isclose(N(a), N(b), rel_tol=1e-3); checked against sympy called directly."""
    sympy = pytest.importorskip("sympy")
    from sympy.parsing.sympy_parser import parse_expr
    a, b = parse_expr(prediction), parse_expr(reference)
    expected = sympy.simplify(a - b) == 0
    if not expected and a.is_number and b.is_number:
        expected = abs(float(sympy.N(a)) - float(sympy.N(b))) <= 1e-3 * max(abs(float(sympy.N(a))), abs(float(sympy.N(b))))
    assert expected is equal
    with OfficialGrader() as grader:
        assert grader_math_equal(prediction, reference, grader) is equal
        assert grader.report()["symbolic"] == f"sympy {sympy.__version__}"
    assert grader_math_equal(prediction, reference, None) is False  # without the symbolic step: never equal here


def test_symbolic_step_is_guarded():
    """parse_expr evaluates its input as Python: anything but a plain expression is kept from it (counted), and a
    simplify that hangs is stopped and counts as not equal, the next pair answered by a fresh worker."""
    pytest.importorskip("sympy")
    with OfficialGrader(timeout=1.0) as grader:
        for unsafe in ("__import__('os').getpid()", "S(1)", "exec(1)", "open(x)"):
            assert grader_math_equal(unsafe, "1", grader) is False
        assert grader.report()["symbolic_skipped"] == 4 and grader.report()["symbolic_calls"] == 0
        assert grader_math_equal("9**9**9**9", "1", grader) is False
        assert grader.report()["symbolic_timeouts"] == 1
        assert grader_math_equal("2*x+1", "1+2*x", grader) is True
    assert OfficialGrader(symbolic=False).report()["symbolic"] == "off"
