"""Grading with the real math-verify, on the answer forms MATH responses produce."""

from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context

import pytest

from env.task.grading import (
    MAX_ANSWER_CHARS,
    GradeResult,
    extract_boxed_answer,
    grade,
    matches_gold,
    same_answer,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so the answer is $\boxed{42}$.", "42"),
        (r"first $\boxed{1}$, on reflection $\boxed{2}$", "2"),
        (r"$\boxed{\frac{\sqrt{3}}{2}}$", r"\frac{\sqrt{3}}{2}"),
        (r"$\boxed{\{1, 2\}}$", r"\{1, 2\}"),
        (r"\boxed{\begin{pmatrix}1\\2\end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}"),
        (r"\fbox{7}", "7"),
        (r"The answer is \boxed 5.", "5"),
        (r"$\boxed {x+1}$", "x+1"),
        (r"\boxed{\boxed{3}} and later \boxed{4}", "4"),
        (r"\boxed{\boxed{3}}", r"\boxed{3}"),
        ("no box here, the answer is 5", None),
        (r"cut off: \boxed{\frac{1}{2", None),
        (r"\boxed{1} then cut off: \boxed{2", None),
        (r"\boxed{}", None),
        (r"\boxedx is not a box", None),
    ],
)
def test_extract_boxed_answer(text, expected):
    assert extract_boxed_answer(text) == expected


@pytest.mark.parametrize(
    ("gold", "predicted"),
    [
        (r"\frac{1}{2}", "0.5"),
        (r"\frac12", r"\dfrac{1}{2}"),
        (r"\text{(C)}", "C"),
        (r"\text{(C)}", "(C)"),
        ("5", r"5\text{ cm}"),
        (r"5\text{ cm}", "5"),
        (r"30^\circ", "30"),
        ("30", r"30^{\circ}"),
        (r"(-\infty, 3]", r"(-\infty,3]"),
        (r"\pm 2", "2, -2"),
        (r"\pm 2", r"\{-2, 2\}"),
        (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3, \pi/2)"),
        (r"\frac{\sqrt{2}}{2}", r"\sqrt2/2"),
        ("x+1", "1+x"),
        ("1,000", "1000"),
        # math-verify reads "x = 3" as its right-hand side when compared with a number.
        ("3", "x = 3"),
    ],
)
def test_equivalent_forms(gold, predicted):
    assert matches_gold(gold, predicted)


@pytest.mark.parametrize(
    ("gold", "predicted"),
    [
        (r"(-\infty, 3]", r"(-\infty, 3)"),
        (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix}1\\3\end{pmatrix}"),
        # One root of two is not the answer.
        (r"\pm 2", "2"),
        # A rounded decimal is not an exact fraction.
        (r"\frac{1}{3}", "0.333"),
        ("10", "asdf qwe"),
        ("10", "}{"),
        ("10", ""),
        ("10", None),
        # An empty gold answer (two MATH train problems have one) matches nothing.
        ("", ""),
        ("10", "1" * (MAX_ANSWER_CHARS + 1)),
    ],
)
def test_not_equivalent(gold, predicted):
    assert not matches_gold(gold, predicted)


def test_grade_uses_last_box():
    response = r"Maybe $\boxed{3}$? No: the sum is $\frac{4}{8}$, so $\boxed{\frac{1}{2}}$."
    assert grade("0.5", response) == GradeResult(answer=r"\frac{1}{2}", correct=True)
    assert grade("3", response).correct is False


def test_grade_without_box_is_wrong_not_an_error():
    assert grade("5", "I think the answer is 5") == GradeResult(answer=None, correct=False)
    assert grade("5", "") == GradeResult(answer=None, correct=False)


# Answers used nowhere else in this module, so that no cached grade hides the worker's own work.
CASES = [
    ("0.25", r"so $\boxed{\frac{1}{4}}$"),
    (r"45^\circ", r"$\boxed{45}$"),
    (r"\pm 3", r"$\boxed{3}$"),
    ("8", "no box"),
]
EXPECTED = [True, True, False, False]


def test_grading_in_worker_threads():
    # math-verify's signal-based timeouts would raise off the main thread; grading must not.
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(grade, *zip(*CASES, strict=True)))
    assert [r.correct for r in results] == EXPECTED


def test_grading_in_worker_process():
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(grade, *zip(*CASES, strict=True)))
    assert [r.correct for r in results] == EXPECTED


def test_same_answer_is_textual_or_math_verify():
    assert same_answer(" x ", "x")
    assert same_answer(r"\frac12", "0.5")
    assert not same_answer("1", "2")
