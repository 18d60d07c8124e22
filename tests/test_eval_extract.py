import pytest

from llama3.eval.extract import (
    extract_gsm8k_answer,
    extract_math_answer,
    gsm8k_reference,
    last_boxed,
    math_answers_match,
    normalize_math_answer,
    normalize_number,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She pays 3 * 4 = <<3*4=12>>12 dollars.\nThe answer is 12.", "12"),
        ("The answer is $1,234.50.", "1234.5"),
        ("The answer is: **42**", "42"),
        ("So the total is 7 + 8 = 15.\n#### 15", "15"),
        ("He ends with \u22123 degrees. The answer is \u22123.", "-3"),
        # the first announced answer wins over numbers the model invents afterwards
        ("The answer is 5.\n\nQuestion: Tom has 17 apples and eats 2", "5"),
        # no announcement: the last number
        ("First 2 + 3 = 5, then 5 * 10 = 50 cookies", "50"),
        ("Therefore the final result is \\boxed{18}.", "18"),
        ("The answer is 7.00", "7"),
        ("It costs .5 dollars more, so the answer is 0.75", "0.75"),
        ("25% of 80 is 20, so 20 remain. The answer is 20%", "20"),
        ("I cannot tell.", None),
    ],
)
def test_extract_gsm8k_answer(text, expected):
    assert extract_gsm8k_answer(text) == expected


def test_gsm8k_reference_reads_the_hash_line_and_drops_commas():
    assert gsm8k_reference("He earns 1,000 + 200 = <<1000+200=1200>>1,200.\n#### 1,200") == "1200"
    with pytest.raises(ValueError, match="####"):
        gsm8k_reference("no final line")


def test_normalize_number():
    assert normalize_number(" $3.0 ") == "3"
    assert normalize_number("-0.0") == "0"
    assert normalize_number("1,234.56789") == "1234.56789"
    assert normalize_number("twelve") == "twelve"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("first \\boxed{3} then \\boxed{\\sqrt{x^{2}+1}}", "\\sqrt{x^{2}+1}"),
        ("\\boxed 5", "5"),
        ("cut off \\boxed{\\frac{1}{", None),
        ("no box here", None),
        ("\\fbox{7}", "7"),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", "\\frac{3}{4}"),
        ("Final Answer: The final answer is $x=3$. I hope it is correct.", "x=3"),
        ("Final Answer: The final answer is $\\boxed{12}$. I hope it is correct.", "12"),
        ("Final Answer: The final answer is 10", "10"),
        ("Thus the area is $\\boxed{24\\text{ square units}}$.", "24\\text{ square units}"),
        ("I give up.", None),
    ],
)
def test_extract_math_answer(text, expected):
    assert extract_math_answer(text) == expected


@pytest.mark.parametrize(
    "a, b",
    [
        ("\\dfrac{1}{2}", "\\frac12"),
        ("0.5", "\\frac{1}{2}"),
        ("x = 5", "5"),
        ("10^\\circ", "10"),
        ("10^{\\circ}", "10"),
        ("\\$5.00", "5"),
        ("24\\text{ square units}", "24"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("\\sqrt2", "\\sqrt{2}"),
        ("\\text{(B)}", "B"),
        ("1,000", "1000"),
        ("-\\frac{6}{8}", "-0.75"),
        ("50\\%", "50"),
        ("\\tfrac{x}{2}", "\\frac{x}2"),
    ],
)
def test_math_equivalent_answers_match(a, b):
    assert normalize_math_answer(a) == normalize_math_answer(b)
    assert math_answers_match(a, b)


@pytest.mark.parametrize(
    "a, b",
    [("\\frac{1}{3}", "0.33"), ("(3,4)", "(4,3)"), ("\\sqrt{2}", "2"), ("x+1", "x-1"), ("12", "21")],
)
def test_math_different_answers_do_not_match(a, b):
    assert not math_answers_match(a, b)


def test_math_missing_prediction_does_not_match():
    assert not math_answers_match(None, "3")
