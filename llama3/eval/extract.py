"""Answer extraction and normalization for generative tasks (GSM-8K, MATH).

A model's chain of thought ends in an answer written many ways: "The answer is $1,234.", "#### 18",
"\\boxed{\\dfrac{1}{2}}", "Final Answer: The final answer is $x=3$. I hope it is correct." The functions here
pull the answer out and bring it to a canonical string so that exact match compares meaning, not typography.
"""

from __future__ import annotations

import re
from fractions import Fraction

# ---------------------------------------------------------------------------------------------------------------
# GSM-8K: the answer is a number


_NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
# Phrases a chain of thought uses to announce its result, most explicit first.
_GSM_ANSWER_PATTERNS = [
    re.compile(r"####\s*\$?\s*(" + _NUMBER + ")"),
    re.compile(r"\\boxed\{\s*\\?\$?\s*(" + _NUMBER + r")"),
    re.compile(r"answer is[:\s]*\**\s*\\?\$?\s*(" + _NUMBER + ")", re.IGNORECASE),
]


def gsm8k_reference(answer_field: str) -> str:
    """The gold number from a GSM-8K `answer` field ("...reasoning...\\n#### 72")."""
    _, sep, tail = answer_field.rpartition("####")
    if not sep:
        raise ValueError(f"GSM-8K answer has no '####' line: {answer_field[-80:]!r}")
    return normalize_number(tail)


def extract_gsm8k_answer(text: str) -> str | None:
    """The number a chain of thought gives as its answer, or None when it gives none.

    An announced answer ("The answer is 5", "#### 5", "\\boxed{5}") wins over numbers elsewhere; the first such
    announcement counts, because a model that keeps talking afterwards starts inventing new questions. Without
    one, the last number in the text is the answer.
    """
    text = text.replace("\u2212", "-")  # unicode minus
    for pattern in _GSM_ANSWER_PATTERNS:
        match = pattern.search(text)
        if match:
            return normalize_number(match.group(1))
    numbers = _NUMBER_RE.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def normalize_number(text: str) -> str:
    """'$1,234.50.' -> '1234.5'; '-0.0' -> '0'; '7.00' -> '7'. Non-numbers come back stripped."""
    cleaned = text.strip().replace("\u2212", "-").replace(",", "").replace("$", "").strip()
    cleaned = cleaned.rstrip(".%").strip()
    try:
        value = Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return cleaned
    if value.denominator == 1:
        return str(value.numerator)
    return str(float(value))


# ---------------------------------------------------------------------------------------------------------------
# MATH: the answer is a LaTeX expression


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) with balanced braces; also '\\boxed 5'."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if text.startswith(" ", i):  # "\boxed 5" form
        match = re.match(r"\s*([^\s$]+)", text[i:])
        return match.group(1) if match else None
    if not text.startswith("{", i):
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None  # unbalanced: the generation was cut off inside the box


_MINERVA_FINAL = re.compile(r"final answer is\s*(.+?)\.?\s*(?:I hope it is correct|$)", re.IGNORECASE | re.DOTALL)


def extract_math_answer(text: str) -> str | None:
    """The answer of a MATH solution: the Minerva "Final Answer: The final answer is X." line, else the last
    \\boxed{}, else None."""
    match = _MINERVA_FINAL.search(text)
    if match:
        answer = match.group(1).strip()
        boxed = last_boxed(answer)
        if boxed is not None:
            return boxed
        if answer.startswith("$") and answer.endswith("$") and len(answer) > 1:
            answer = answer.strip("$")
        return answer
    return last_boxed(text)


_LATEX_REMOVALS = [
    "\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\displaystyle", "^\\circ", "^{\\circ}", "\\circ",
    "\\$", "$", "\\%", "%",
]
_UNIT_TEXT = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{\s*(?:[a-zA-Z ]*(?:units?|degrees?|cm|m|inches|feet|cents|dollars|square|sq|hours?|minutes?|seconds?|days?|meters?)[a-zA-Z ]*)\}")


def normalize_math_answer(answer: str) -> str:
    """Bring a LaTeX answer to a canonical string: '\\dfrac12' -> '\\frac{1}{2}', 'x = 5' -> '5',
    '0.50' -> '\\frac{1}{2}', '10^\\circ' -> '10', '\\text{(B)}' -> 'B'."""
    s = answer.strip().replace("\n", "")
    s = s.rstrip(".").strip()
    s = _UNIT_TEXT.sub("", s)
    s = re.sub(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}", r"\1", s)
    for token in _LATEX_REMOVALS:
        s = s.replace(token, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("^{\\prime}", "'")
    s = s.replace(" ", "")
    # "x=5" or "k = 5" -> "5" (a single name on the left is a label, not part of the answer)
    match = re.fullmatch(r"[a-zA-Z](?:_\{?\w+\}?)?=(.+)", s)
    if match:
        s = match.group(1)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)  # \sqrt2 -> \sqrt{2}
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2}
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)  # \frac1{x} -> \frac{1}{x}
    s = re.sub(r"\\frac\{([^{}]+)\}(\d)", r"\\frac{\1}{\2}", s)  # \frac{x}2 -> \frac{x}{2}
    s = re.sub(r"^\(([A-E])\)$", r"\1", s)  # "(B)" -> "B"
    s = re.sub(r"(?<![\d.])\.(\d)", r"0.\1", s)  # ".5" -> "0.5"
    value = _as_fraction(s)
    if value is not None:
        if value.denominator == 1:
            return str(value.numerator)
        sign = "-" if value < 0 else ""
        return f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"
    return s


def _as_fraction(s: str) -> Fraction | None:
    """'0.5', '1/2', '\\frac{1}{2}', '-\\frac{3}{4}', '1,000' as exact fractions; None if not a plain number."""
    match = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if match:
        sign, num, den = match.groups()
        if int(den) == 0:
            return None
        return Fraction(int(num), int(den)) * (-1 if sign else 1)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"-?\d+(\.\d+)?(/\d+)?", s):
        try:
            return Fraction(s)
        except ZeroDivisionError:
            return None
    return None


def math_answers_match(prediction: str | None, reference: str) -> bool:
    """Exact match of normalized MATH answers."""
    if prediction is None:
        return False
    return normalize_math_answer(prediction) == normalize_math_answer(reference)
