"""Serve one policy from several engine replicas behind one OpenAI-compatible front end.

    python -m policies.serve_replicas --replicas 2                       # local Ray cluster
    python -m policies.serve_replicas --address auto --replicas 8 --gpus-per-replica 1 \\
        --policy runs/<run>/policy --port 8000 --replica-host 0.0.0.0

Each replica is a Ray actor (its GPU share declared to Ray, as in ``env.profiles.replicas``)
that runs the whole single-engine service (``policies.server.app_for_policy``: engine,
controller, latency model calibrated on its own machine, predictive admission) under uvicorn
on a port of its own.  This process starts them, then serves the front end
(``policies.replica_router``) that asks every replica's admission about each request and sends
it to one predicted to answer in time; it refuses (429, the smallest ``Retry-After``) only when
none is.  Ctrl-C stops the front end and the replicas.

Why replicas and not vLLM's data-parallel front end: the controller sets k per call through the
scheduler's dynamic-speculation table, which vLLM turns off under data parallelism
(``_maybe_disable_dynamic_sd_for_data_parallel``), and vLLM's front end would balance by its own
queue lengths, not by whether a call meets its deadline.  Why Ray actors and a front end of our
own and not a Ray Serve deployment: see ``docs/scale_out.md`` ("Serving behind several
replicas"); in short, Serve's request router (alpha) routes on figures replicas push
periodically and takes back a request only when a replica's queue is full, so it can neither
ask each replica's admission about the request at hand nor move a request that one replica's
admission refuses to another.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from env.ray_runtime import ray_runtime_env

START_TIMEOUT_S = 60.0
"""How long a replica's HTTP server may take to listen once its engine is up."""
APP_OPTIONS = ("served_model_name", "max_calls", "margin_s", "response_margin_s",
               "max_deadline_s", "max_body_bytes")  # fmt: skip
"""``policies.server.create_app`` options a replica accepts (``ServingSpec.app_options``)."""


@dataclass(frozen=True)
class ServingSpec:
    """What every replica serves and the share of the cluster it takes.

    :param policy: the saved race policy folder (the same path on every node).
    :param spec_method: engine speculation (default: the policy's).
    :param max_tokens: per branch; :param max_batch: sequences per engine step;
        :param kv_cache_gb: the engine's KV cache; :param calibrate_s: start-up latency
        calibration budget (0: online correction only) — as ``app_for_policy`` takes them.
    :param app_options: ``create_app`` options (``APP_OPTIONS``).
    :param gpus: GPUs Ray reserves per replica (0 on CPU); :param cpus: CPUs per replica.
    :param host: where replicas listen: ``127.0.0.1`` on one machine, ``0.0.0.0`` on a
        cluster (the front end then reaches them at their node's IP).
    """

    policy: str
    spec_method: str | None = None
    max_tokens: int = 512
    max_batch: int = 64
    kv_cache_gb: float = 2.0
    calibrate_s: float = 60.0
    app_options: dict = field(default_factory=dict)
    gpus: float = 0.0
    cpus: float = 1.0
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if not (Path(self.policy) / "policy.json").is_file():
            raise ValueError(f"no policy at {self.policy} (no policy.json): train one "
                             "(./run train) and pass its policy folder")  # fmt: skip
        unknown = sorted(set(self.app_options) - set(APP_OPTIONS))
        if unknown:
            raise ValueError(f"app_options has no {unknown}; allowed: {APP_OPTIONS}")
        if self.gpus < 0 or self.cpus <= 0:
            raise ValueError(f"gpus must be >= 0 and cpus > 0, got {self.gpus}, {self.cpus}")
        if self.max_tokens < 1 or self.max_batch < 1 or self.kv_cache_gb <= 0:
            raise ValueError("max_tokens and max_batch must be >= 1 and kv_cache_gb > 0")
        if self.calibrate_s < 0:
            raise ValueError(f"calibrate_s must be >= 0, got {self.calibrate_s}")

    def method(self) -> str:
        """The engine's speculative method: the one asked for, else the policy's (as
        ``app_for_policy`` picks it)."""
        if self.spec_method:
            return self.spec_method
        info = json.loads((Path(self.policy) / "policy.json").read_text())
        return info.get("spec_method") or "draft_model"


class ServerReplica:
    """One replica: ``policies.server`` with its own engine on its own port; run inside a Ray
    actor (``start_server_replicas``).  The HTTP server runs on a thread of the actor, the
    engine on its own thread (``engine.engine_thread``), as in a single server process."""

    def __init__(self, spec: ServingSpec) -> None:
        import uvicorn

        from policies.server import app_for_policy

        started = time.monotonic()
        try:
            app = app_for_policy(spec.policy, spec.spec_method, spec.max_tokens, spec.max_batch,
                                 spec.kv_cache_gb, spec.calibrate_s,
                                 **spec.app_options)  # fmt: skip
        except SystemExit as exc:  # its messages say what is wrong; an actor must raise
            raise RuntimeError(str(exc)) from None
        config = uvicorn.Config(app, host=spec.host, port=0, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="tts-replica-http",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        limit = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > limit:
                raise RuntimeError(f"the replica's HTTP server did not start on {spec.host}")
            time.sleep(0.05)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{_reachable_host(spec.host)}:{port}"
        self.startup_s = time.monotonic() - started

    def describe(self) -> dict:
        """Its URL, process and start-up seconds (engine, calibration, HTTP server)."""
        return {"url": self.url, "pid": os.getpid(), "startup_s": self.startup_s}

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


def _reachable_host(host: str) -> str:
    """The address others reach a server listening on ``host`` at (a wildcard: this node's)."""
    if host in ("0.0.0.0", "::", ""):
        import ray

        return ray.util.get_node_ip_address()
    return host


def start_server_replicas(spec: ServingSpec, count: int) -> tuple[list, list[dict]]:
    """Start ``count`` replica actors (Ray must be initialised) and wait until every one
    listens; returns their handles and ``describe()``s (URL first), so a bad configuration
    fails here and not at the first request."""
    import ray

    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"replicas must be an int >= 1, got {count!r}")
    _prepare_bundled_model(spec)
    actor = ray.remote(ServerReplica).options(
        num_gpus=spec.gpus, num_cpus=spec.cpus, max_restarts=0, runtime_env=ray_runtime_env()
    )
    actors = [actor.remote(spec) for _ in range(count)]
    try:
        described = ray.get([a.describe.remote() for a in actors])
    except Exception:
        stop_server_replicas(actors)
        raise
    return actors, described


def stop_server_replicas(actors: list) -> None:
    """Stop the replicas' HTTP servers (briefly) and end their actors."""
    import ray

    stops = [a.stop.remote() for a in actors]
    ray.wait(stops, num_returns=len(stops), timeout=10)
    for a in actors:
        ray.kill(a)


def _prepare_bundled_model(spec: ServingSpec) -> None:
    """Convert the bundled model here, once, before replicas start (they would all convert it
    at the same time into an empty cache otherwise)."""
    from engine.model_assets import DEFAULT_DRAFT_LAYERS, resolve_draft, resolve_model

    resolve_model(None)
    if spec.method() == "draft_model":
        resolve_draft(None, DEFAULT_DRAFT_LAYERS)


def main(argv: list[str] | None = None) -> None:
    """Command line: start the replicas on a Ray cluster, then serve the front end."""
    import ray
    import uvicorn

    from policies.replica_router import create_router_app
    from policies.serving_options import add_serving_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=2, help="engine replicas (Ray actors)")
    parser.add_argument("--address", help="Ray cluster address ('auto' on a cluster node); "
                        "default: start a local cluster")  # fmt: skip
    parser.add_argument("--gpus-per-replica", type=float, default=0.0, help="0 on CPU")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--host", default="127.0.0.1", help="where the front end listens")
    parser.add_argument("--port", type=int, default=8000, help="the front end's port")
    parser.add_argument("--replica-host", default="127.0.0.1",
                        help="where replicas listen (0.0.0.0 on a multi-node cluster)")  # fmt: skip
    add_serving_arguments(parser, per="replica")
    parser.add_argument(
        "--replica-logs",
        action="store_true",
        help="print the replicas' logs here (default: Ray's log folder)",
    )
    args = parser.parse_args(argv)
    options = {"served_model_name": args.served_model_name, "max_calls": args.max_calls,
               "margin_s": args.margin_s, "max_deadline_s": args.max_deadline_s}  # fmt: skip
    try:
        spec = ServingSpec(args.policy, args.spec_method, args.max_tokens, args.max_batch,
                           args.kv_cache_gb, args.calibrate_s, options, args.gpus_per_replica,
                           args.cpus_per_replica, args.replica_host)  # fmt: skip
    except ValueError as error:
        parser.error(str(error))
    ray.init(address=args.address, include_dashboard=False, runtime_env=ray_runtime_env(),
             log_to_driver=args.replica_logs)  # fmt: skip
    try:
        started = time.monotonic()
        actors, described = start_server_replicas(spec, args.replicas)
        for i, d in enumerate(described):
            print(f"replica {i}: {d['url']} (pid {d['pid']}, up in {d['startup_s']:.0f} s)")
        print(f"{args.replicas} replicas up in {time.monotonic() - started:.0f} s; front end on "
              f"http://{args.host}:{args.port}/v1")  # fmt: skip
        app = create_router_app([d["url"] for d in described],
                                served_model_name=args.served_model_name,
                                max_deadline_s=args.max_deadline_s)  # fmt: skip
        try:
            uvicorn.run(app, host=args.host, port=args.port)
        finally:
            stop_server_replicas(actors)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
