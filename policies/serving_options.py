"""The command-line options that size a serving engine and its admission, shared by the single
server (``policies.server``) and the launcher of several replicas (``policies.serve_replicas``),
so that both take the same names, defaults and help."""

from __future__ import annotations

import argparse

from env.paths import policies_dir
from policies.openai_api import MAX_DEADLINE_S, SERVED_MODEL_NAME


def add_serving_arguments(parser: argparse.ArgumentParser, per: str = "engine") -> None:
    """Add the policy, engine and admission options (``per``: what one engine is, for the
    help texts, e.g. ``"replica"``)."""
    parser.add_argument("--policy", default=str(policies_dir() / "default"), help="policy folder")
    parser.add_argument("--served-model-name", default=SERVED_MODEL_NAME)
    parser.add_argument(
        "--spec-method",
        help="engine speculation: ngram, draft_model or none (default: the policy's, else "
        "draft_model)",
    )
    parser.add_argument("--max-tokens", type=int, default=512, help="per branch")
    parser.add_argument(
        "--max-calls", type=int, default=64, help=f"calls running at once per {per}"
    )
    parser.add_argument("--max-batch", type=int, default=64, help="sequences per engine step")
    parser.add_argument("--kv-cache-gb", type=float, default=2.0, help=f"KV cache per {per}")
    parser.add_argument("--margin-s", type=float, default=0.5, help="admission margin")
    parser.add_argument(
        "--calibrate-s",
        type=float,
        default=60.0,
        help=f"start-up latency calibration budget per {per} (0: online correction only)",
    )
    parser.add_argument("--max-deadline-s", type=float, default=MAX_DEADLINE_S)
