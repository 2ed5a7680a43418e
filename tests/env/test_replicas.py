"""Profiling over Ray replicas: a real local Ray cluster, two CPU replicas of the bundled model.

One greedy profile of five problems is recorded over the replicas in two sessions (the first
stops after two problems; in the second, replica 1 is killed while it has a problem in
flight), and the same problems once on a single in-process engine with the single-engine code
(``record.profile_problems``).  Greedy, because the engines draw sampled tokens from one
generator per engine, so sampled rows depend on what each engine ran before (see
``env.profiles.replicas``); greedy rows must match column for column, timings aside.  The
module costs about three minutes on 2 cores: three n-gram engines with small KV caches,
2 branches of 16 tokens per problem, one tiny calibration.
"""

from __future__ import annotations

import json
import threading
from collections import Counter

import numpy as np
import pytest

from env.profiles.record import (
    JOURNAL,
    Journal,
    ProfileSettings,
    build_engines,
    profile_problems,
)
from env.profiles.replicas import (
    ReplicaSpec,
    actor_gpus,
    profile_on_replicas,
    start_replicas,
)
from env.profiles.store import load_profile, read_table
from env.ray_runtime import ray_runtime_env
from env.task.problems import load_math500, load_math_train

SETTINGS = ProfileSettings(
    n_max=2,
    max_tokens=16,
    k_grid=(0, 1),
    spec_branches=1,
    spec_max_tokens=8,
    calib_batches=(1, 2),
    calib_tokens=8,
    calib_repeats=1,
    calib_prefill_ns=(1, 2),
    save_every=2,
)
GREEDY = {"temperature": 0.0}
SPEC = ReplicaSpec(methods=("ngram",), settings=SETTINGS, kv_cache_gb=0.25,
                   engine_options=GREEDY, cpus=1)  # fmt: skip
TIMING_COLUMNS = {"branch_finish_s", "wall_s"}  # wall-clock: differ between any two runs
LOGPROB_COLUMNS = {"branch_mean_logprob", "branch_lowest_window_logprob"}


@pytest.fixture(scope="module")
def problems():
    test, train = load_math500(source="bundled"), load_math_train(20)
    return [("test", test[3]), ("train", train[7]), ("test", test[5]), ("train", train[9]),
            ("test", test[8])]  # fmt: skip


@pytest.fixture(scope="module")
def cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20,
             runtime_env=ray_runtime_env(), log_to_driver=False)  # fmt: skip
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def replicated(cluster, problems, tmp_path_factory):
    """Two sessions over two replicas; replica 1 is killed mid-problem in the second."""
    out = tmp_path_factory.mktemp("replicas") / "greedy"
    actors = start_replicas(SPEC, 2)
    first = profile_on_replicas(actors, problems, out, "first", limit=2, progress=False)
    after_first = Journal(out / JOURNAL)
    killed = threading.Event()

    def kill_replica_1(kind: str, replica: int, problem_id: str) -> None:
        if kind == "dispatched" and replica == 1 and not killed.is_set():
            killed.set()  # half a second into its problem (a problem takes seconds here)
            threading.Timer(0.5, cluster.kill, args=(actors[1],)).start()

    second = profile_on_replicas(actors, problems, out, "second", progress=False,
                                 on_event=kill_replica_1)  # fmt: skip
    yield {"out": out, "first": first, "second": second, "after_first": after_first,
           "actors": actors}  # fmt: skip
    for actor in actors:
        cluster.kill(actor)


@pytest.fixture(scope="module")
def single(replicated, problems, tmp_path_factory):
    """The same problems on one engine, with the single-engine recorder.

    Its journal starts with the replicated one's header and calibration: the single-engine
    recorder must accept them as its own (same format), and the calibration (half a minute
    here) is not timed twice.
    """
    out = tmp_path_factory.mktemp("single") / "greedy"
    out.mkdir()
    journal = Journal(out / JOURNAL)
    for record in Journal(replicated["out"] / JOURNAL).records:
        if record["kind"] in ("header", "calibration"):
            journal.append(record)
    engines = build_engines(SPEC.methods, SETTINGS, SPEC.kv_cache_gb, SPEC.seed,
                            engine_options=GREEDY)  # fmt: skip
    try:
        profile_problems(engines, problems, out, SETTINGS, "single", progress=False)
    finally:
        for engine in engines.values():
            engine.shutdown()
    return out


@pytest.mark.engine
def test_both_replicas_work_and_resume_skips_what_is_recorded(replicated, problems):
    first, second = replicated["first"], replicated["second"]
    ids = [p.id for _, p in problems]
    assert len(first.recorded) == 2 and first.by_replica == {0: 1, 1: 1}  # sharded
    assert not set(first.recorded) & set(second.recorded)  # nothing redone on resume
    assert sorted(first.recorded + second.recorded) == sorted(ids)
    journal = Journal(replicated["out"] / JOURNAL)
    assert len(journal.of_kind("session")) == 2 and len(journal.of_kind("calibration")) == 1
    assert [r["row"]["id"] for r in replicated["after_first"].of_kind("problem")] == first.recorded


@pytest.mark.engine
def test_killed_replica_loses_only_its_problem_in_flight(replicated, problems):
    second = replicated["second"]
    assert second.dead == [1]
    assert len(second.requeued) == 1  # the one problem replica 1 had in flight
    assert second.requeued[0] in second.recorded  # redone by replica 0
    counts = Counter(
        r["row"]["id"] for r in Journal(replicated["out"] / JOURNAL).of_kind("problem")
    )
    assert counts == Counter(p.id for _, p in problems)  # every problem once, no duplicates
    manifest = json.loads((replicated["out"] / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["num_problems"] == len(problems)


@pytest.mark.engine
def test_replicated_profile_equals_single_engine_row_for_row(replicated, single):
    multi, one = load_profile(replicated["out"]), load_profile(single)
    assert [r["id"] for r in multi.rows] == [r["id"] for r in one.rows]  # requested order
    for a, b in zip(multi.rows, one.rows, strict=True):
        assert set(a) == set(b)
        for column in set(a) - TIMING_COLUMNS - LOGPROB_COLUMNS:
            assert np.array_equal(a[column], b[column]) if isinstance(a[column], np.ndarray) \
                else a[column] == b[column], column  # fmt: skip
        for column in LOGPROB_COLUMNS:  # same tokens; float sums may differ in the last bits
            np.testing.assert_allclose(a[column], b[column], rtol=1e-4, atol=1e-5)
        assert np.all(a["branch_finish_s"] > 0)
    assert any(r["branch_text"][0] for r in multi.rows)  # not empty against empty
    journal = Journal(single / JOURNAL)
    assert len(journal.of_kind("calibration")) == 1  # the replicas' one, accepted as is
    spec_multi = read_table(replicated["out"] / "spec.parquet")
    spec_one = read_table(single / "spec.parquet")
    strip = [{k: v for k, v in s.items() if k not in TIMING_COLUMNS} for s in spec_one]
    assert [{k: v for k, v in s.items() if k not in TIMING_COLUMNS} for s in spec_multi] == strip
    assert set(multi.manifest) == set(one.manifest)  # same manifest format
    for key in ("n_max", "k_grid", "splits", "requested", "spec_methods", "model", "sampling"):
        assert multi.manifest[key] == one.manifest[key], key


@pytest.mark.engine
def test_a_complete_profile_resumes_to_nothing_without_the_dead_replica(replicated, problems):
    before = (replicated["out"] / JOURNAL).read_text().count('"kind": "problem"')
    run = profile_on_replicas(replicated["actors"], problems, replicated["out"], "third",
                              progress=False)  # fmt: skip
    assert run.recorded == [] and run.dead == [1]  # replica 1 was killed in the second session
    journal = Journal(replicated["out"] / JOURNAL)
    assert len(journal.of_kind("problem")) == before == len(problems)
    assert [s["command"] for s in journal.of_kind("session")] == ["first", "second", "third"]


def test_replica_spec_names_what_is_allowed():
    with pytest.raises(ValueError, match="no EngineConfig fields"):
        ReplicaSpec(methods=("ngram",), settings=SETTINGS, engine_options={"tp": 2})
    with pytest.raises(ValueError, match="needs gpus >= 4"):
        ReplicaSpec(
            methods=("ngram",),
            settings=SETTINGS,
            gpus=2,
            engine_options={"tensor_parallel_size": 2, "pipeline_parallel_size": 2},
        )
    with pytest.raises(ValueError, match="external_launcher"):
        ReplicaSpec(
            methods=("ngram",),
            settings=SETTINGS,
            engine_options={"distributed_executor_backend": "external_launcher"},
        )
    with pytest.raises(ValueError, match="gpus must be >= 0"):
        ReplicaSpec(methods=("ngram",), settings=SETTINGS, gpus=-1)  # fmt: skip


def test_gpus_are_declared_by_the_actor_or_by_vllms_ray_executor():
    tp2 = {"tensor_parallel_size": 2}
    mp = ReplicaSpec(("ngram",), SETTINGS, gpus=2, engine_options={**tp2,
                     "distributed_executor_backend": "mp"})  # fmt: skip
    assert actor_gpus(mp) == 2  # workers are the actor's child processes, on its GPUs
    ray_pp = ReplicaSpec(("ngram",), SETTINGS, gpus=4, engine_options={
        **tp2, "pipeline_parallel_size": 2, "distributed_executor_backend": "ray"})  # fmt: skip
    assert actor_gpus(ray_pp) == 0  # vLLM's placement group reserves them
