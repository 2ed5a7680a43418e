"""vLLM's distributed options as this engine checks and passes them (no engine is started).

What per-call k needs under each mode is argued in ``engine.distributed``'s docstring from the
vLLM 0.32 source; the last test pins the source facts that argument rests on, so a vLLM
upgrade that moves them fails here instead of silently changing what k does.
"""

from __future__ import annotations

import inspect

import pytest

from engine.distributed import (
    EXECUTOR_BACKENDS,
    check_platform,
    distributed_kwargs,
    gpus_needed,
)
from engine.vllm_engine import EngineConfig


def test_defaults_pass_through_as_one_device():
    config = EngineConfig()
    assert distributed_kwargs(config) == {"tensor_parallel_size": 1, "pipeline_parallel_size": 1}


def test_tensor_and_pipeline_parallel_pass_through_with_the_executor():
    config = EngineConfig(
        spec_method=None,
        tensor_parallel_size=4,
        pipeline_parallel_size=2,
        distributed_executor_backend="mp",
    )
    assert distributed_kwargs(config) == {
        "tensor_parallel_size": 4,
        "pipeline_parallel_size": 2,
        "distributed_executor_backend": "mp",
    }
    for backend in ("mp", "ray", None):  # with speculation: accepted before the platform check
        config = EngineConfig(tensor_parallel_size=2, distributed_executor_backend=backend)
        check_platform(config, cpu_platform=False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tensor_parallel_size": 0}, "tensor_parallel_size must be an int >= 1, got 0"),
        ({"pipeline_parallel_size": 1.5}, "pipeline_parallel_size must be an int >= 1"),
        ({"tensor_parallel_size": True}, "tensor_parallel_size must be an int >= 1"),
        ({"distributed_executor_backend": "external_launcher"}, "cannot run with per-call k"),
        ({"distributed_executor_backend": "slurm"}, "must be one of"),
        (
            {"distributed_executor_backend": "uni", "pipeline_parallel_size": 2},
            "'uni' runs one device",
        ),
    ],
)
def test_bad_combinations_are_refused_naming_what_is_allowed(options, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**options)


def test_the_refusal_lists_the_allowed_executors():
    with pytest.raises(ValueError) as info:
        EngineConfig(distributed_executor_backend="external_launcher")
    for backend in EXECUTOR_BACKENDS:
        assert repr(backend) in str(info.value)


def test_cpu_build_refuses_speculation_over_several_workers_only():
    speculative = EngineConfig(spec_method="ngram", pipeline_parallel_size=2)
    with pytest.raises(ValueError, match="CPU sampler fix"):
        check_platform(speculative, cpu_platform=True)
    check_platform(speculative, cpu_platform=False)  # a GPU build runs it
    check_platform(EngineConfig(spec_method=None, pipeline_parallel_size=2), cpu_platform=True)
    check_platform(EngineConfig(spec_method="ngram"), cpu_platform=True)  # one worker
    # on this machine's real (CPU) platform, the start-up path refuses it too
    with pytest.raises(ValueError, match="CPU sampler fix"):
        distributed_kwargs(speculative)


def test_gpus_needed_for_7b_and_32b_targets_on_80gb():
    # bf16 weights: Qwen2.5-7B 15.2 GB, Qwen2.5-32B 65.5 GB; KV for 64 branches x 2.5k tokens
    assert gpus_needed(15.2, 64 * 2500 * 57344 / 1e9, 80, divides=(28, 4)) == 1
    assert gpus_needed(65.5, 64 * 2500 * 262144 / 1e9, 80, divides=(40, 8)) == 2
    with pytest.raises(ValueError, match="add pipeline stages"):
        gpus_needed(800, 100, 80, divides=(64, 8))
    assert gpus_needed(70, 0, 80, divides=(3,)) == 1  # 1 always divides
    with pytest.raises(ValueError):
        gpus_needed(100, 0, 80, divides=(3,))  # 2, 4, 8 do not divide 3 heads


def test_vllm_source_still_does_what_per_call_k_relies_on():
    """The scheduler reads the dynamic table every schedule and ships k to the workers;
    data-parallel ranks turn it off; PP keeps several batches in flight."""
    from vllm.config import VllmConfig
    from vllm.v1.core.sched import output, scheduler

    schedule = inspect.getsource(scheduler.Scheduler.schedule)
    assert "self.dynamic_sd_lookup[" in schedule
    assert "num_spec_tokens_to_schedule" in schedule
    assert "num_spec_tokens_to_schedule" in inspect.getsource(output.SchedulerOutput)
    disable = inspect.getsource(VllmConfig._maybe_disable_dynamic_sd_for_data_parallel)
    assert "data_parallel_size" in disable and "= None" in disable
    batches = inspect.getsource(VllmConfig.max_concurrent_batches.fget)
    assert "pipeline_parallel_size" in batches
