"""The answer readings (recipes/math_scoring.py): the official GSM8K and MATH rules, checked on hand-written
generations and on a table of answers taken from real MATH solutions, and the lenient reading beside them."""
import pytest

from recipes.math_scoring import (extract_answer, gsm8k_reference, last_boxed, lenient_math_answer,
                                  lenient_math_equal, math_equal, official_gsm8k_answer, official_math_answer,
                                  same_number, score)


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


@pytest.mark.parametrize("completion, reference, official, lenient", [
    ("The answer is 2 * 1.5 = 3.", 3.0, False, False),     # official: no 'The answer is: '; lenient reads 2
    ("The answer is: 17.6", 18.0, True, False),            # official rounds; lenient wants 18 exactly
    ("The answer is: 1,234,567", 1234567.0, False, True),
    ("So 5 apples.\n#### 5", 5.0, False, True),
    ("The answer is: 42", 42.0, True, True),
])
def test_official_and_lenient_verdicts(completion, reference, official, lenient):
    _, ok, _, ok_lenient = score("gsm8k", completion, {"reference": reference})
    assert (ok, ok_lenient) == (official, lenient)



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
    assert math_equal(prediction, reference) is equal


def test_lenient_math_reading_is_separate():
    """The lenient reading forgives what the official one does not, and never changes the official verdict."""
    assert lenient_math_equal("30240", "30,\\!240") and not math_equal("30240", "30,\\!240")
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
