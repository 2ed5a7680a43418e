"""The prompt a MATH problem is sent with: one format for profiling, replay features and serving.

Kept apart from ``env.task.problems`` (which loads data with ``datasets``) so the serving path
formats prompts without importing the data stack.
"""

from __future__ import annotations

MATH_INSTRUCTION = (
    "Solve the problem step by step, then give only the final answer inside \\boxed{}."
)


def build_user_message(problem: str) -> str:
    """The user turn for a problem: the statement followed by ``MATH_INSTRUCTION``."""
    return f"{problem}\n\n{MATH_INSTRUCTION}"
