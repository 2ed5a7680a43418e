"""vLLM's distributed options (tensor / pipeline parallelism, executor), checked for this engine.

A large target is split over GPUs by vLLM itself: ``tensor_parallel_size`` GPUs share every
layer, ``pipeline_parallel_size`` stages hold consecutive layers, and an *executor* runs one
worker per GPU: ``"mp"`` (processes on this node) or ``"ray"`` (Ray actors, which may sit on
several nodes).  This module decides which of those combinations the engine can run with its
per-call k, and what they need; ``engine.vllm_engine.EngineConfig`` calls
``check_distributed_options`` when it is built and passes ``distributed_kwargs`` to ``vllm.LLM``.

Why per-call k survives tensor and pipeline parallelism (vLLM 0.32 source, paths under
``vllm/``): the engine sets k by writing the scheduler's dynamic-speculation table
(``VLLMEngine.set_k``).  There is one scheduler per engine, in the engine core, which runs in
this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``InprocClient`` in
``v1/engine/core_client.py``) whatever the executor; the workers only execute what it sends.
It reads the table at every schedule (``v1/core/sched/scheduler.py``, "Dynamic speculative
decoding: compute optimal K", ``num_spec_tokens_to_schedule = self.dynamic_sd_lookup[...]``)
and ships the count in ``SchedulerOutput.num_spec_tokens_to_schedule``
(``v1/core/sched/output.py``) to every worker, which sizes its drafts and verification from it
(``v1/worker/gpu_model_runner.py``, ``num_spec_tokens_to_schedule = scheduler_output...``).  The
mp executor (``v1/executor/multiproc_executor.py``) and both Ray executors
(``ray_executor.py``; ``ray_executor_v2.py``, the default under
``VLLM_USE_RAY_V2_EXECUTOR_BACKEND``, a subclass of the mp one) send that same object.  Under
pipeline parallelism the draft runs on the last stage (``gpu_model_runner.py``: "we put the
entire draft model on the last PP rank"), and the engine core keeps ``pipeline_parallel_size``
batches in flight (``VllmConfig.max_concurrent_batches``, ``step_with_batch_queue`` in
``v1/engine/core.py``): a k set between calls applies to the whole next call, but a k changed
mid-call reaches batches scheduled after the change, up to ``pipeline_parallel_size`` engine
steps later than without pipelining (the engine notes a lag of two steps at PP = 1).

What is refused here, and why:

* ``external_launcher`` (torchrun): every rank runs an engine core and scheduler of its own and
  must schedule identically.  k here is set by a controller reading wall-clock time, which
  differs per rank; vLLM itself switches dynamic speculation off where ranks schedule apart
  (data parallelism: ``VllmConfig._maybe_disable_dynamic_sd_for_data_parallel`` in
  ``config/vllm.py``, "data-parallel ranks can select different speculative-token counts,
  causing DP divergence and deadlocks").  The engine also drives one in-process engine core,
  not one per rank.  Several engines side by side are replicas (``env.profiles.replicas``).
* ``"uni"`` with more than one device: vLLM's single-process executor holds one device.
* executor classes or import paths: the checks above cannot vouch for them.
* on vLLM's CPU build, speculation with more than one worker: the CPU sampler fix
  (``engine.cpu_fixes``, vLLM #55005) patches this process only; mp workers are spawned
  (always so inside a Ray actor: ``utils/system_utils.py``, ``_maybe_force_spawn``) and Ray
  workers are other processes, so their sampled speculative output would be garbage.

vLLM checks the rest itself when the engine starts, with its own messages: heads divisible by
the tensor-parallel size, enough GPUs on the node for ``"mp"``, a model that supports pipeline
stages.  Data parallelism is not an option of this engine: replicas are separate engines.
"""

from __future__ import annotations

import importlib.util
from typing import Any

EXECUTOR_BACKENDS = (None, "mp", "ray", "uni")
"""Accepted ``distributed_executor_backend`` values (``"uni"`` only on one device)."""

REFUSED_BACKENDS = {
    "external_launcher": "every torchrun rank runs its own scheduler and the k a controller "
    "sets from wall-clock time would differ between ranks (vLLM turns dynamic speculation off "
    "for data-parallel ranks for the same reason); run one engine per replica instead "
    "(env.profiles.replicas)",
}


def world_size(config: Any) -> int:
    """Devices (GPUs, or CPU workers) one engine occupies: tensor x pipeline parallel size."""
    return config.tensor_parallel_size * config.pipeline_parallel_size


def check_distributed_options(config: Any) -> None:
    """Raise ValueError, naming what is allowed, for a combination this engine cannot run.

    Cheap and platform-free (no vLLM import), so that a bad configuration fails where it is
    written; the platform-dependent check runs when the engine starts (``distributed_kwargs``).
    """
    for name in ("tensor_parallel_size", "pipeline_parallel_size"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    backend = config.distributed_executor_backend
    if isinstance(backend, str) and backend in REFUSED_BACKENDS:
        raise ValueError(
            f"distributed_executor_backend={backend!r} cannot run with per-call k: "
            f"{REFUSED_BACKENDS[backend]}; use one of {EXECUTOR_BACKENDS}"
        )
    if backend not in EXECUTOR_BACKENDS:
        raise ValueError(
            f"distributed_executor_backend must be one of {EXECUTOR_BACKENDS} (None = vLLM's "
            f"choice: 'uni' on one device, else 'mp'), got {backend!r}"
        )
    size = world_size(config)
    if backend == "uni" and size > 1:
        raise ValueError(
            f"distributed_executor_backend='uni' runs one device, but tensor_parallel_size x "
            f"pipeline_parallel_size = {size}; use 'mp' (one node) or 'ray' (several nodes)"
        )
    if backend == "ray" and importlib.util.find_spec("ray") is None:
        raise ValueError("distributed_executor_backend='ray' needs the ray package installed")


def check_platform(config: Any, cpu_platform: bool) -> None:
    """The check that depends on where the engine runs (see the module docstring, last item).

    :param cpu_platform: whether vLLM runs on its CPU build (``current_platform.is_cpu()``).
    """
    size = world_size(config)
    if cpu_platform and size > 1 and getattr(config, "k_max", 0) > 0:
        raise ValueError(
            f"on vLLM's CPU build, speculation (k_max={config.k_max}) needs one worker, but "
            f"tensor_parallel_size x pipeline_parallel_size = {size}: the CPU sampler fix "
            "(engine.cpu_fixes, vLLM #55005) reaches this process only, not the executor's "
            "worker processes; use spec_method=None or a world size of 1 on CPU"
        )


def distributed_kwargs(config: Any) -> dict[str, Any]:
    """The keyword arguments for ``vllm.LLM`` that carry the distributed options.

    Called at engine start, after vLLM is importable, so the platform check runs here.
    """
    from vllm.platforms import current_platform

    check_distributed_options(config)
    check_platform(config, current_platform.is_cpu())
    kwargs: dict[str, Any] = {
        "tensor_parallel_size": config.tensor_parallel_size,
        "pipeline_parallel_size": config.pipeline_parallel_size,
    }
    if config.distributed_executor_backend is not None:
        kwargs["distributed_executor_backend"] = config.distributed_executor_backend
    return kwargs


def gpus_needed(
    weight_gb: float,
    kv_gb_needed: float,
    gpu_gb: float,
    utilization: float = 0.9,
    reserve_gb: float = 2.0,
    divides: tuple[int, ...] = (),
    sizes: tuple[int, ...] = (1, 2, 4, 8),
) -> int:
    """Smallest tensor-parallel size whose per-GPU share of weights and KV cache fits.

    Each of ``tp`` GPUs holds ``weight_gb / tp`` of weights and ``kv_gb_needed / tp`` of KV
    cache inside ``utilization x gpu_gb`` minus ``reserve_gb`` (activations, CUDA graphs,
    sampler buffers: an assumption, vLLM profiles it at start).  ``divides``: head counts the
    size must divide (vLLM splits attention heads evenly).

    :raises ValueError: when no size in ``sizes`` fits (more than one node: add pipeline
        stages across nodes with the ``"ray"`` executor).
    """
    room = utilization * gpu_gb - reserve_gb
    for tp in sizes:
        if any(heads % tp for heads in divides):
            continue
        if (weight_gb + kv_gb_needed) / tp <= room:
            return tp
    raise ValueError(
        f"{weight_gb:.0f} GB of weights plus {kv_gb_needed:.0f} GB of KV cache fit no "
        f"tensor-parallel size in {sizes} on {gpu_gb:.0f} GB GPUs; add pipeline stages"
    )
