"""MATH problems for profiling, training and evaluation, online or from the bundled copies.

Training uses the 7,500 MATH train problems; MATH-500 is held out for evaluation (the two do not
overlap). MATH-500 is loaded from the Hugging Face hub (HuggingFaceH4/MATH-500) when the hub can
be reached and from ``data/math500.jsonl`` otherwise; the train split is always the bundled
``data/math_train.jsonl.gz``. Both bundled files are described in ``data/SOURCES.md``. Set
``TTS_DATA_DIR`` to read the bundled files from another directory.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from urllib.parse import urlparse

import datasets

from env.paths import data_dir
from env.task.grading import extract_boxed_answer

logger = logging.getLogger(__name__)

MATH500_HUB_ID = "HuggingFaceH4/MATH-500"
MATH500_FILE = "math500.jsonl"
MATH_TRAIN_FILE = "math_train.jsonl.gz"
MATH500_SOURCES = ("auto", "hub", "bundled")
SPLITS = ("train", "test")
HUB_CHECK_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class MathProblem:
    """One MATH problem.

    :param id: MATH-500's ``unique_id`` (e.g. ``"test/precalculus/807.json"``); for train
        problems, which have none, ``"train/<subject slug>/<row index in the bundled file>"``.
    :param problem: the problem statement (LaTeX).
    :param answer: the gold answer (LaTeX, the content of the reference solution's last box).
    :param level: difficulty 1 (easiest) to 5; 0 when the source gives none (two train problems).
    :param subject: MATH subject, e.g. ``"Intermediate Algebra"``.
    """

    id: str
    problem: str
    answer: str
    level: int
    subject: str


def _parse_level(level: int | str | None) -> int:
    """Level as an int 1..5 from ``3`` or ``"Level 3"``; 0 when missing or unrecognised."""
    if isinstance(level, int):
        return level if 1 <= level <= 5 else 0
    digits = str(level or "").removeprefix("Level").strip()
    return int(digits) if digits.isdigit() and 1 <= int(digits) <= 5 else 0


def _subject_slug(subject: str) -> str:
    """MATH's directory name for a subject: "Counting & Probability" -> counting_and_probability."""
    return subject.lower().replace("&", "and").replace(" ", "_")


def _to_problem(row: dict, index: int, id_prefix: str) -> MathProblem:
    """Build a MathProblem from a MATH-style record (hub row or bundled JSON line)."""
    subject = row["subject"]
    answer = row["answer"] if "answer" in row else extract_boxed_answer(row["solution"]) or ""
    problem_id = row.get("unique_id") or f"{id_prefix}/{_subject_slug(subject)}/{index}"
    return MathProblem(
        id=problem_id,
        problem=row["problem"],
        answer=answer.strip(),
        level=_parse_level(row.get("level")),
        subject=subject,
    )


def _load_bundled(file_name: str) -> datasets.Dataset:
    path = data_dir() / file_name
    if not path.is_file():
        raise FileNotFoundError(f"bundled data file {path} is missing (see TTS_DATA_DIR)")
    return datasets.load_dataset("json", data_files=str(path), split="train")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout_s: float = HUB_CHECK_TIMEOUT_S) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout_s`` seconds.

    False at once when ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` is set. The check runs in a
    daemon thread so that a slow DNS lookup cannot hold the caller past the timeout. Honours
    ``HF_ENDPOINT`` (hub mirrors).
    """
    if _env_flag("HF_HUB_OFFLINE") or _env_flag("HF_DATASETS_OFFLINE"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname, url.port or (80 if url.scheme == "http" else 443)
    result = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            result.append(True)
        except OSError:
            pass

    checker = threading.Thread(target=connect, daemon=True)
    checker.start()
    checker.join(timeout_s)
    return bool(result)


def load_math500(source: str = "auto") -> list[MathProblem]:
    """The 500 MATH-500 test problems in the dataset's order.

    :param source: ``"hub"`` loads HuggingFaceH4/MATH-500 with ``datasets`` (errors propagate);
        ``"bundled"`` reads ``data/math500.jsonl``; ``"auto"`` uses the hub when
        ``hub_reachable()`` and the bundled copy otherwise or if the hub download fails.
    """
    if source not in MATH500_SOURCES:
        raise ValueError(f"source must be one of {', '.join(MATH500_SOURCES)}; got {source!r}")
    rows = None
    if source == "hub" or (source == "auto" and hub_reachable()):
        try:
            rows = datasets.load_dataset(MATH500_HUB_ID, split="test")
        except Exception as error:
            if source == "hub":
                raise
            logger.warning(
                "loading %s from the hub failed (%s); using bundled copy", MATH500_HUB_ID, error
            )
    elif source == "auto":
        logger.info("Hugging Face hub not reachable; loading bundled %s", MATH500_FILE)
    if rows is None:
        rows = _load_bundled(MATH500_FILE)
    return [_to_problem(row, index, "test") for index, row in enumerate(rows)]


def load_math_train(limit: int | None = None) -> list[MathProblem]:
    """The bundled MATH train problems in file order, the first ``limit`` of them if given."""
    rows = _load_bundled(MATH_TRAIN_FILE)
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    return [_to_problem(row, index, "train") for index, row in enumerate(rows)]


def load_problems(split: str) -> list[MathProblem]:
    """Problems of a split: ``"train"`` (MATH train) or ``"test"`` (MATH-500)."""
    if split == "train":
        return load_math_train()
    if split == "test":
        return load_math500()
    raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
