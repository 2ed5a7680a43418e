"""Versioned on-disk profiles: recorded (or synthetic) engine behaviour that training replays.

A profile is a folder::

    <name>/manifest.json      what was profiled and how (model, draft, hardware, vLLM version,
                              sampling, grids, date, command, duration, synthetic flag,
                              latency model, calibration samples, generator parameters)
    <name>/problems.parquet   one row per problem (columns in PROBLEM_COLUMNS)
    <name>/spec.parquet       optional: one row per (problem, method, k) speculative run

Tables are written with `datasets` (Arrow/Parquet).  Every file is written to a temporary name
and renamed, so a killed writer never leaves a half-written profile.  ``FORMAT_VERSION`` is
bumped whenever a column or manifest field changes meaning.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from env.latency_model import LatencyModel
from env.paths import profiles_dir

SYNTHETIC_LABEL = "synthetic profile"
"""The words every number from a synthetic profile carries beside it (labels, tables, plots)."""

FORMAT_VERSION = 1

# name -> meaning; list columns have one entry per recorded branch (N_max of them, k = 0 run).
PROBLEM_COLUMNS = {
    "id": "problem id (MATH unique_id)",
    "split": "'train' or 'test' (MATH-500)",
    "problem": "problem text",
    "answer": "gold answer",
    "level": "difficulty level 1..5",
    "subject": "MATH subject",
    "prompt_tokens": "tokens of the chat-formatted prompt",
    "branch_text": "list[str]: generated text ('' in synthetic profiles)",
    "branch_answer": "list[str|None]: extracted \\boxed{} answer",
    "branch_class": "list[int]: answer equivalence class within the problem, -1 = no answer",
    "branch_correct": "list[bool]: graded against the gold answer",
    "branch_tokens": "list[int]: generated tokens",
    "branch_finish_s": "list[float]: finish time from call start in the k=0 profiling run",
    "branch_finish_reason": "list[str]: 'stop' or 'length'",
    "accept": "dict[str, float] as JSON string: per-token draft acceptance alpha per method",
}

OPTIONAL_PROBLEM_COLUMNS = {
    "branch_mean_logprob": "list[float|None]: mean log-probability of the branch's sampled "
    "tokens (``env.race.BranchConfidence``)",
    "branch_lowest_window_logprob": "list[float|None]: lowest mean log-probability over "
    "``env.race.CONFIDENCE_WINDOW`` consecutive tokens (DeepConf's lowest group confidence)",
}
"""Columns a profile may lack: live profiles recorded with token log-probabilities have them;
older and synthetic profiles do not (the manifest's ``token_logprobs`` says which).  Loaded,
they are float arrays with NaN where a branch has none."""

SPEC_COLUMNS = {
    "id": "problem id",
    "method": "speculative method ('ngram', 'draft_model', ...)",
    "k": "draft tokens per step",
    "branch_tokens": "list[int]: generated tokens per branch",
    "branch_drafted": "list[int]: drafted tokens per branch",
    "branch_accepted": "list[int]: accepted draft tokens per branch",
    "wall_s": "wall time of the call",
}


def problem_fields(problem, split: str) -> dict:
    """The per-problem columns every profile row starts with, from a ``MathProblem``."""
    return {
        "id": problem.id,
        "split": split,
        "problem": problem.problem,
        "answer": problem.answer,
        "level": problem.level,
        "subject": problem.subject,
    }


@dataclass
class Profile:
    """An in-memory profile: manifest plus per-problem arrays ready for fast replay."""

    path: Path | None
    manifest: dict
    rows: list[dict]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def synthetic(self) -> bool:
        return bool(self.manifest.get("synthetic", False))

    @property
    def label(self) -> str:
        """Name as shown beside numbers; synthetic profiles say so."""
        return f"{self.name} ({SYNTHETIC_LABEL})" if self.synthetic else self.name

    def latency_model(self) -> LatencyModel:
        return LatencyModel.from_dict(self.manifest["latency_model"])

    def split(self, split: str) -> list[dict]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return [r for r in self.rows if r["split"] == split]

    @property
    def has_logprobs(self) -> bool:
        """Whether the rows carry the branches' log-probability summaries."""
        return bool(self.rows) and all("branch_mean_logprob" in r for r in self.rows)

    def acceptance(self, row: dict, method: str) -> float:
        """Per-token acceptance of ``method`` on this problem (0 when not profiled)."""
        value = row["accept"].get(method)
        return 0.0 if value is None or not np.isfinite(value) else float(value)


def _atomic_write_bytes(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temporary file + rename)."""

    def write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")

    _atomic_write_bytes(Path(path), write)


def _check_rows(rows: list[dict], columns: dict) -> None:
    for i, row in enumerate(rows):
        missing = set(columns) - set(row)
        if missing:
            raise ValueError(f"profile row {i} misses columns {sorted(missing)}")


def write_table(
    path: Path, rows: Iterable[dict], columns: dict, optional: Collection[str] = ()
) -> None:
    """Write rows as Parquet through `datasets`, atomically.  An ``optional`` column is written
    when some row has it (None in the rows without)."""
    from datasets import Dataset

    rows = list(rows)
    _check_rows(rows, columns)
    present = [c for c in optional if any(c in r for r in rows)]
    data = {c: [r.get(c) for r in rows] for c in (*columns, *present)}
    if "accept" in data:
        data["accept"] = [json.dumps(a) if isinstance(a, dict) else a for a in data["accept"]]
    _atomic_write_bytes(Path(path), lambda tmp: Dataset.from_dict(data).to_parquet(tmp))


def read_table(path: Path) -> list[dict]:
    from datasets import Dataset

    rows = Dataset.from_parquet(str(path), keep_in_memory=True).to_list()
    for row in rows:
        if "accept" in row and isinstance(row["accept"], str):
            row["accept"] = json.loads(row["accept"])
    return rows


def save_profile(
    folder: Path, manifest: dict, rows: list[dict], spec_rows: list[dict] | None = None
) -> Path:
    """Write a complete profile folder (tables first, manifest last)."""
    folder = Path(folder)
    manifest = {**manifest, "format_version": FORMAT_VERSION, "num_problems": len(rows)}
    for key in ("name", "synthetic", "latency_model"):
        if key not in manifest:
            raise ValueError(f"profile manifest needs {key!r}")
    write_table(folder / "problems.parquet", rows, PROBLEM_COLUMNS, OPTIONAL_PROBLEM_COLUMNS)
    if spec_rows:
        write_table(folder / "spec.parquet", spec_rows, SPEC_COLUMNS)
    write_json(folder / "manifest.json", manifest)
    return folder


def resolve_profile_path(name_or_path: str | Path) -> Path:
    """A profile folder from a path, or a name under data/profiles/."""
    candidate = Path(name_or_path)
    if (candidate / "manifest.json").is_file():
        return candidate
    named = profiles_dir() / str(name_or_path)
    if (named / "manifest.json").is_file():
        return named
    known = sorted(p.name for p in profiles_dir().glob("*") if (p / "manifest.json").is_file())
    raise FileNotFoundError(
        f"no profile {str(name_or_path)!r} (a folder with manifest.json); bundled profiles: {known}"
    )


def load_profile(name_or_path: str | Path) -> Profile:
    """Load a profile by name (under data/profiles/) or folder path."""
    folder = resolve_profile_path(name_or_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"profile {folder} has format_version {version}; this code reads {FORMAT_VERSION}"
        )
    rows = read_table(folder / "problems.parquet")
    for row in rows:
        for col in ("branch_class", "branch_tokens", "branch_finish_s"):
            row[col] = np.asarray(row[col])
        row["branch_correct"] = np.asarray(row["branch_correct"], dtype=bool)
        for col in OPTIONAL_PROBLEM_COLUMNS:
            if col in row:
                values = row[col] or [None] * len(row["branch_tokens"])
                row[col] = np.array([np.nan if v is None else v for v in values], dtype=float)
    return Profile(path=folder, manifest=manifest, rows=rows)
