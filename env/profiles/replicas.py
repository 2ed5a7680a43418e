"""Profiling over engine replicas with Ray: one actor per replica, one resumable profile.

    python -m env.profiles.replicas --replicas 8 --gpus-per-replica 1 --address auto \\
        --out data/profiles/<name> --model <target> --train 7500 --test 500 --n-max 64 ...

A profile of a large target on thousands of problems outgrows one engine.  Here every replica
is a Ray actor that starts the profile's engines (``env.profiles.record.build_engines``, the
same engines a single-engine run builds) on the GPUs Ray gives it (``--gpus-per-replica``,
declared to Ray as the actor's ``num_gpus``; a target split with ``--tensor-parallel-size`` /
``--pipeline-parallel-size`` needs that many per replica, see ``engine.distributed``; with
``--executor ray`` vLLM's own placement group reserves them instead, ``actor_gpus``).  The
driver (this process) hands the problems out one at a time to whichever replica is free, so
the shards balance themselves, and it alone writes the profile: it appends each finished
problem's record to the journal (``record.Journal``: flushed, fsynced, a torn last line is
dropped on reading) and rewrites the tables from it, with the single-engine code
(``record.write_profile``).  Hence the same format, rows in the requested order whatever the
order of completion, and no duplicates (a problem is recorded once; the journal is the only
truth about what is done).

Failures: a replica that dies (node lost, process killed) loses the problem it had in flight;
the driver gives that problem to another replica and carries on with the others.  A killed
driver loses what was in flight on every replica (at most one problem each); running the
same command again resumes from the journal.  The timing calibration runs once per profile,
on one replica, before the problems (alone, so that nothing else loads its host).

Sampling: the engines are seeded once at start and vLLM draws from one generator per engine,
so a sampled branch depends on what that engine ran before; a problem sampled on replica 2
differs from the same problem sampled second on a single engine.  Greedy profiles
(``--temperature 0``) are identical row for row (``tests/env/test_replicas.py``); sampled
ones share the format and coverage, and the distribution.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from env.profiles.record import (
    ProfileSettings,
    add_profile_arguments,
    default_methods,
    default_profile_dir,
    open_session,
    select_problems,
    settings_for,
    write_profile,
)
from env.ray_runtime import ray_runtime_env
from env.task.problems import MathProblem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaSpec:
    """What every replica starts: the engines of one profile, and its share of the cluster.

    :param methods: speculative methods, as ``record.build_engines`` takes them.
    :param engine_options: further ``EngineConfig`` fields (``tensor_parallel_size``,
        ``pipeline_parallel_size``, ``distributed_executor_backend``, ``temperature``...).
    :param gpus: GPUs Ray reserves per replica (0 on CPU); at least tensor x pipeline size.
    :param cpus: CPUs Ray reserves per replica (also its torch threads on CPU, via Ray).
    """

    methods: tuple[str, ...]
    settings: ProfileSettings
    kv_cache_gb: float = 1.0
    seed: int = 0
    model: str | None = None
    draft: str | None = None
    engine_options: dict = field(default_factory=dict)
    gpus: float = 0.0
    cpus: float = 1.0

    def __post_init__(self) -> None:
        from engine.distributed import check_distributed_options
        from engine.vllm_engine import EngineConfig

        if self.gpus < 0 or self.cpus <= 0:
            raise ValueError(f"gpus must be >= 0 and cpus > 0, got {self.gpus}, {self.cpus}")
        unknown = set(self.engine_options) - set(EngineConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"engine_options has no EngineConfig fields {sorted(unknown)}")
        config = EngineConfig(**{"spec_method": None, **self.engine_options})
        check_distributed_options(config)
        devices = config.tensor_parallel_size * config.pipeline_parallel_size
        if self.gpus and self.gpus < devices:
            raise ValueError(
                f"a replica with tensor x pipeline parallel size {devices} needs gpus >= "
                f"{devices}, got {self.gpus}"
            )


class ReplicaWorker:
    """One replica's engines; run inside a Ray actor (``start_replicas``)."""

    def __init__(self, spec: ReplicaSpec) -> None:
        from env.profiles.record import build_engines

        started = time.monotonic()
        self.spec = spec
        self.engines = build_engines(spec.methods, spec.settings, spec.kv_cache_gb, spec.seed,
                                     spec.model, spec.draft, spec.engine_options)  # fmt: skip
        self.startup_s = time.monotonic() - started

    def describe(self) -> dict:
        """The journal header, this replica's machine and its start-up seconds."""
        from env.profiles.record import _machine, profile_header

        return {
            "header": profile_header(self.engines, self.spec.settings),
            "machine": _machine(),
            "startup_s": self.startup_s,
            "pid": os.getpid(),
        }

    def calibrate(self, problems: Sequence[tuple[str, MathProblem]]) -> dict:
        """The profile's calibration record, timed on this replica."""
        from env.profiles.record import calibration_record

        return calibration_record(self.engines, problems, self.spec.settings, progress=False)

    def profile(self, split: str, problem: MathProblem) -> dict:
        """One problem's journal record."""
        from env.profiles.record import problem_record

        return problem_record(self.engines, problem, split, self.spec.settings)

    def shutdown(self) -> None:
        for engine in self.engines.values():
            engine.shutdown()
        self.engines = {}


def actor_gpus(spec: ReplicaSpec) -> float:
    """GPUs the replica actor itself reserves.  With vLLM's ``"ray"`` executor the engine's
    workers are Ray actors of their own, which vLLM places (its placement group reserves the
    GPUs, possibly on several nodes); an actor holding them too would leave them none.  With
    ``"mp"`` (or one device) the workers are the actor's child processes, on its GPUs."""
    return 0.0 if spec.engine_options.get("distributed_executor_backend") == "ray" else spec.gpus


def start_replicas(spec: ReplicaSpec, count: int) -> list:
    """Start ``count`` replica actors (Ray must be initialised); returns their handles once
    every engine is up, so a bad configuration fails here and not mid-run."""
    import ray

    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"replicas must be an int >= 1, got {count!r}")
    _prepare_bundled_model(spec)
    actor = ray.remote(ReplicaWorker).options(
        num_gpus=actor_gpus(spec), num_cpus=spec.cpus, max_restarts=0, runtime_env=ray_runtime_env()
    )
    actors = [actor.remote(spec) for _ in range(count)]
    ray.get([a.describe.remote() for a in actors])
    return actors


def _prepare_bundled_model(spec: ReplicaSpec) -> None:
    """Convert the bundled model here, once, before replicas start (they would all convert it
    at the same time into an empty cache otherwise).  Other models load as they are."""
    from engine.model_assets import is_bundled, resolve_draft, resolve_model

    if is_bundled(spec.model):
        resolve_model(spec.model)
        if "draft_model" in spec.methods and spec.draft is None:
            from engine.model_assets import DEFAULT_DRAFT_LAYERS

            layers = spec.engine_options.get("draft_layers", DEFAULT_DRAFT_LAYERS)
            resolve_draft(None, layers)


@dataclass
class ReplicaRun:
    """What a replicated session did, beside the profile it wrote.

    :param recorded: problem ids recorded in this session, in completion order.
    :param requeued: ids whose replica died while they were in flight (given to another).
    :param dead: indices of the replicas that died.
    :param by_replica: problems recorded per replica index.
    """

    path: Path
    recorded: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    dead: list[int] = field(default_factory=list)
    by_replica: dict[int, int] = field(default_factory=dict)


def profile_on_replicas(
    actors: Sequence,
    problems: Sequence[tuple[str, MathProblem]],
    out_dir: Path,
    command: str = "",
    limit: int | None = None,
    progress: bool = True,
    recalibrate: bool = False,
    on_event: Callable[[str, int, str], None] | None = None,
) -> ReplicaRun:
    """Profile ``(split, problem)`` pairs over replica actors into ``out_dir`` (resumable).

    Over the ~60-line guide: the body is the dispatch loop (hand out, collect, requeue on a
    dead replica, drain on an error), which reads best in one piece.

    :param actors: handles from ``start_replicas`` (one profile's engines each).
    :param limit: record at most this many new problems in this session, then stop.
    :param on_event: called as ``on_event(kind, replica, problem_id)`` with kind
        ``"dispatched"`` or ``"recorded"`` (progress displays, tests that kill a replica).
    :returns: the session's ``ReplicaRun``; the profile folder is ``out_dir``.
    :raises RuntimeError: when every replica has died (the journal keeps what was done).
    """
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    if not actors:
        raise ValueError("profile_on_replicas needs at least one replica actor")
    out_dir = Path(out_dir)
    dead_errors = (ActorDiedError, ActorUnavailableError, RayActorError)
    described: dict[int, dict] = {}
    for index, actor in enumerate(actors):  # a replica that died since it started is skipped
        try:
            described[index] = ray.get(actor.describe.remote())
        except dead_errors:
            log.warning("replica %d is dead; continuing without it", index)
    if not described:
        raise RuntimeError("every replica is dead; start new ones (start_replicas)")
    first = next(iter(described.values()))
    header = first["header"]
    if any(d["header"] != header for d in described.values()):
        raise ValueError("replicas started different engines; give them one ReplicaSpec")
    startup_s = max(d["startup_s"] for d in described.values())  # they start side by side
    journal = open_session(out_dir, header, lambda: first["machine"], command, startup_s)
    if recalibrate or not journal.of_kind("calibration"):
        journal.append(_calibrate_on_one(actors, list(described), problems, dead_errors))
    done = {r["row"]["id"] for r in journal.of_kind("problem")}
    wanted = {p.id for _, p in problems}
    todo = deque([(s, p) for s, p in problems if p.id not in done][:limit])
    run = ReplicaRun(path=out_dir, by_replica=dict.fromkeys(described, 0))
    run.dead = [i for i in range(len(actors)) if i not in described]
    idle, in_flight, failure = deque(described), {}, None
    notify = on_event or (lambda kind, replica, problem_id: None)
    bar = tqdm(total=len(problems), initial=len(done & wanted), desc="profile",
               unit="problem", disable=not progress)  # fmt: skip
    try:
        while todo or in_flight:
            while todo and idle and failure is None:
                index = idle.popleft()
                split, problem = todo.popleft()
                in_flight[actors[index].profile.remote(split, problem)] = (index, split, problem)
                notify("dispatched", index, problem.id)
            if not in_flight:
                break
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            index, split, problem = in_flight.pop(ref)
            try:
                record = ray.get(ref)
            except dead_errors as exc:
                log.warning("replica %d died with %s in flight (%s); giving it to another",
                            index, problem.id, type(exc).__name__)  # fmt: skip
                run.dead.append(index)
                run.requeued.append(problem.id)
                todo.appendleft((split, problem))
                if len(run.dead) == len(actors):
                    raise RuntimeError(
                        f"every replica died; {len(done)} problems are in {out_dir}, run the "
                        "same command again to resume"
                    ) from exc
                bar.set_postfix(replicas=len(actors) - len(run.dead))
                continue
            except Exception as exc:  # a bug or a bad problem: keep what the others finish
                failure = failure or exc
                idle.append(index)
                continue
            if record["row"]["id"] not in done:  # a problem listed twice is recorded once
                journal.append(record)
                done.add(record["row"]["id"])
                run.recorded.append(record["row"]["id"])
                run.by_replica[index] += 1
                bar.update()
                notify("recorded", index, record["row"]["id"])
                if len(run.recorded) % problems_between_saves(journal) == 0:
                    write_profile(out_dir, journal, problems)
            idle.append(index)
    finally:
        bar.close()
        if journal.of_kind("problem"):  # (an empty profile has no tables to write)
            write_profile(out_dir, journal, problems)
    if failure is not None:
        raise failure
    return run


def _calibrate_on_one(actors: Sequence, alive: list[int], problems, dead_errors) -> dict:
    """The calibration record, timed on the first replica that survives the timing (one that
    dies here is found dead again, and dropped, when the problems are handed out)."""
    import ray

    for index in alive:
        try:
            return ray.get(actors[index].calibrate.remote(list(problems)))
        except dead_errors:
            log.warning("replica %d died while timing the engines; trying the next", index)
    raise RuntimeError("every replica died while timing the engines")


def problems_between_saves(journal) -> int:
    """The profile's own ``save_every`` (tables rewritten from the journal that often)."""
    return int(journal.of_kind("header")[0]["settings"].get("save_every", 5))


def profile_model_on_replicas(
    spec: ReplicaSpec,
    replicas: int,
    out: Path | str | None = None,
    *,
    train: int = 24,
    test: int = 24,
    command: str = "",
    recalibrate: bool = False,
    progress: bool = True,
) -> ReplicaRun:
    """Start the replicas, profile ``select_problems(train, test, seed)`` and stop them.

    Ray must be initialised (``ray.init``: a local cluster, or ``address="auto"`` on a node of
    a running one).
    """
    import ray

    out = Path(out) if out else default_profile_dir(spec.model, spec.settings)
    problems = select_problems(train, test, spec.seed)
    actors = start_replicas(spec, replicas)
    try:
        return profile_on_replicas(actors, problems, out, command, progress=progress,
                                   recalibrate=recalibrate)  # fmt: skip
    finally:
        for actor in actors:
            ray.kill(actor)


def spec_from_args(args: argparse.Namespace) -> ReplicaSpec:
    """The ``ReplicaSpec`` of a parsed command line (``add_profile_arguments`` + ours)."""
    settings = settings_for(
        args.n_max, args.max_tokens, args.k_grid, args.spec_branches,
        args.spec_max_tokens, args.calib_tokens, args.calib_repeats,
    )  # fmt: skip
    options: dict = {}
    if args.temperature is not None:
        options["temperature"] = args.temperature
    if args.tensor_parallel_size != 1:
        options["tensor_parallel_size"] = args.tensor_parallel_size
    if args.pipeline_parallel_size != 1:
        options["pipeline_parallel_size"] = args.pipeline_parallel_size
    if args.executor is not None:
        options["distributed_executor_backend"] = args.executor
    if args.gpu_memory_utilization is not None:
        options["gpu_memory_utilization"] = args.gpu_memory_utilization
    methods = tuple(args.methods or default_methods(args.model, args.draft))
    return ReplicaSpec(methods=methods, settings=settings, kv_cache_gb=args.kv_cache_gb,
                       seed=args.seed, model=args.model, draft=args.draft, engine_options=options,
                       gpus=args.gpus_per_replica, cpus=args.cpus_per_replica)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_profile_arguments(parser)
    group = parser.add_argument_group("replicas (Ray)")
    group.add_argument("--replicas", type=int, default=2, help="engine replicas (Ray actors)")
    group.add_argument("--address", help="Ray cluster address ('auto' on a cluster node); "
                       "default: start a local cluster")  # fmt: skip
    group.add_argument(
        "--gpus-per-replica",
        type=float,
        default=0.0,
        help="GPUs per replica (>= tensor x pipeline parallel size; 0 on CPU)",
    )
    group.add_argument("--cpus-per-replica", type=float, default=1.0)
    group.add_argument("--tensor-parallel-size", type=int, default=1)
    group.add_argument("--pipeline-parallel-size", type=int, default=1)
    group.add_argument(
        "--executor",
        choices=("mp", "ray"),
        help="vLLM's executor inside a replica (default: vLLM's choice)",
    )
    group.add_argument("--gpu-memory-utilization", type=float)
    group.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy)")
    group.add_argument(
        "--replica-logs",
        action="store_true",
        help="print the replicas' engine logs here (default: Ray's log folder)",
    )
    args = parser.parse_args(argv)  # fmt: skip
    spec = spec_from_args(args)
    command = "python -m env.profiles.replicas " + " ".join(sys.argv[1:] if argv is None else argv)
    import ray

    ray.init(address=args.address, include_dashboard=False, runtime_env=ray_runtime_env(),
             log_to_driver=args.replica_logs)  # the progress bar stays readable  # fmt: skip
    if not args.replica_logs:
        print("replica logs: /tmp/ray/session_latest/logs/worker-*.err on each node")
    started = time.monotonic()
    try:
        run = profile_model_on_replicas(spec, args.replicas, args.out, train=args.train,
                                        test=args.test, command=command.strip(),
                                        recalibrate=args.recalibrate)  # fmt: skip
    finally:
        ray.shutdown()
    print(
        f"wrote {run.path}: {len(run.recorded)} problems this session in "
        f"{time.monotonic() - started:.0f} s over {args.replicas} replicas "
        f"(per replica {run.by_replica}; died: {run.dead or 'none'})"
    )


if __name__ == "__main__":
    main()
