"""Answer extraction and equivalence checking for MATH problems.

Every stage that judges a branch (profiling, the replay and live backends, evaluation, the
deployed controller) must agree on what "correct" and "the same answer" mean, so the rules live
here, separate from generation (how answers are combined is ``env.task.voting``'s).
Equivalence is math-verify's (``verify(parse(gold), parse(pred))``), the grader used by the
MATH-500 reference figures bundled in ``data/``.

math-verify guards parsing and comparison with ``signal.alarm``, which only works on a process's
main thread. We keep those timeouts on the main thread and switch them off elsewhere (worker
threads of a server or thread pool); there, answers longer than ``MAX_ANSWER_CHARS`` are refused
instead, which keeps sympy away from the pathological inputs a timeout would otherwise catch.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

from math_verify import parse, verify

MAX_ANSWER_CHARS = 500
"""Longer answers are judged wrong without parsing (the longest MATH gold answer has 159)."""

MATH_VERIFY_TIMEOUT_S = 5
"""Per-parse and per-comparison timeout on the main thread (math-verify's own default)."""

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _find_box_command(text: str, start: int) -> tuple[int, int] | None:
    """(start, end) of the next ``\\boxed``/``\\fbox`` command at or after ``start``."""
    hits = [(text.find(cmd, start), cmd) for cmd in _BOX_COMMANDS]
    hits = [(pos, cmd) for pos, cmd in hits if pos >= 0]
    if not hits:
        return None
    pos, cmd = min(hits)
    return pos, pos + len(cmd)


def _read_braced(text: str, open_pos: int) -> int | None:
    """Index just past the ``}`` closing the ``{`` at ``open_pos``; None if never closed.

    A backslash escapes the next character, so ``\\{``, ``\\}`` and ``\\\\`` never count.
    """
    depth = 0
    i = open_pos
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def extract_boxed_answer(text: str) -> str | None:
    """Return the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    Boxes nested inside another box belong to it; the outermost box that comes last is the
    answer. The brace-less form ``\\boxed 5`` yields the token after the space, without trailing
    ``.``/``,``/``;``. Returns None when there is no box, when the last box is empty, or when it
    is never closed (typically a branch cut off mid-answer).
    """
    answer = None
    pos = 0
    while (found := _find_box_command(text, pos)) is not None:
        cmd_end = found[1]
        after = cmd_end
        while after < len(text) and text[after].isspace():
            after += 1
        if after < len(text) and text[after] == "{":
            close = _read_braced(text, after)
            if close is None:
                return None
            answer = text[after + 1 : close - 1].strip()
            pos = close
        elif after > cmd_end:
            token_end = after
            while (
                token_end < len(text) and not text[token_end].isspace() and text[token_end] != "$"
            ):
                token_end += 1
            answer = text[after:token_end].rstrip(".,;")
            pos = token_end
        else:
            pos = cmd_end  # e.g. "\boxedfoo": not a box command
    return answer or None


def _timeout() -> int | None:
    """math-verify timeout usable on the current thread (None disables its signal alarm)."""
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=65536)
def _parse_answer(answer: str) -> tuple:
    """math-verify parse of a bare answer, boxed so its LaTeX extractor picks it up whole."""
    if not answer.strip() or len(answer) > MAX_ANSWER_CHARS:
        return ()
    try:
        return tuple(parse(f"\\boxed{{{answer}}}", parsing_timeout=_timeout()))
    except Exception:  # math-verify should not raise; a grader must never crash
        return ()


@functools.lru_cache(maxsize=65536)
def matches_gold(gold: str, predicted: str | None) -> bool:
    """True when math-verify judges the predicted answer equal to the gold answer.

    Both are bare answers (box contents), e.g. ``"\\frac{1}{2}"`` and ``"0.5"``. The comparison
    is math-verify's and is not symmetric in general (the gold decides, e.g., whether a set or
    an interval is meant). A missing, empty, overlong or unparsable answer is simply False.
    """
    if predicted is None:
        return False
    gold_parsed, pred_parsed = _parse_answer(gold), _parse_answer(predicted)
    if not gold_parsed or not pred_parsed:
        return False
    try:
        return verify(list(gold_parsed), list(pred_parsed), timeout_seconds=_timeout())
    except Exception:  # as in _parse_answer
        return False


def same_answer(first: str, second: str) -> bool:
    """Whether two sampled answers count as the same vote: identical text or equivalent.

    Identical text also covers answers math-verify cannot parse (they never match a gold
    answer but still vote together); otherwise ``first`` plays the gold's part.
    """
    return first.strip() == second.strip() or matches_gold(first, second)


@dataclass(frozen=True)
class GradeResult:
    """Grade of one response: the extracted answer (None if no box) and whether it is right."""

    answer: str | None
    correct: bool


def grade(gold: str, response_text: str) -> GradeResult:
    """Grade a full model response against the gold answer by its last boxed answer."""
    answer = extract_boxed_answer(response_text)
    return GradeResult(answer=answer, correct=matches_gold(gold, answer))
