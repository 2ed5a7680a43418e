"""The profiling-cost command: its figures, their sanity, and the page that shows them."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from env.synthetic.hardware import LLAMA32_1B
from env.synthetic.profiling_cost import (
    BEGIN,
    DOC,
    END,
    QWEN25_32B,
    RunShape,
    ShardedRoofline,
    markdown_table,
    profiling_costs,
    shard,
    storage_rates,
    write_doc,
)


@pytest.fixture(scope="module")
def costs():
    return profiling_costs()


def test_gpu_counts_are_the_documented_ones(costs):
    tp = {r["target"]: r["tensor_parallel"] for r in costs["rows"]}
    assert tp == {"1B": 1, "7B": 1, "32B": 2}
    page = DOC.read_text()
    assert "| 2 | `--tensor-parallel-size 2 --gpus-per-replica 2 --executor mp` |" in page


def test_bigger_targets_cost_more_and_gpu_hours_add_up(costs):
    rows = {r["target"]: r for r in costs["rows"]}
    assert rows["1B"]["gpu_hours"] < rows["7B"]["gpu_hours"] < rows["32B"]["gpu_hours"]
    for r in rows.values():
        expected = 100_000 * r["call_s_mean"] * r["tensor_parallel"] / 3600
        assert r["gpu_hours"] == pytest.approx(expected, rel=0.01)
        assert r["call_s_p95"] >= r["call_s_mean"] > 0
    # the weights: 1.24B, 7.6B and 32.8B parameters in bf16
    assert [rows[t]["weights_gb"] for t in ("1B", "7B", "32B")] == pytest.approx(
        [2.5, 15.2, 65.5], abs=0.2
    )


def test_costs_scale_linearly_in_problems_and_grow_with_branches():
    small = profiling_costs(RunShape(problems=100_000, branches=16))
    large = profiling_costs(RunShape(problems=200_000, branches=16))
    wide = profiling_costs(RunShape(problems=100_000, branches=64))
    for a, b, w in zip(small["rows"], large["rows"], wide["rows"], strict=True):
        assert b["journal_gb"] == pytest.approx(2 * a["journal_gb"], abs=0.11)
        assert b["call_s_mean"] == a["call_s_mean"]
        assert w["call_s_mean"] > a["call_s_mean"]  # bigger batches, longer longest branch


def test_a_tensor_parallel_shard_is_faster_but_pays_all_reduces():
    whole = ShardedRoofline(target=QWEN25_32B)
    half = ShardedRoofline(target=shard(QWEN25_32B, 2), tp=2, hidden=QWEN25_32B.hidden)
    no_comm = ShardedRoofline(target=shard(QWEN25_32B, 2))
    for batch in (1, 16, 64):
        assert no_comm.step_s(batch, 0, "ngram") < half.step_s(batch, 0, "ngram")
        assert half.step_s(batch, 0, "ngram") < whole.step_s(batch, 0, "ngram")
    assert shard(LLAMA32_1B, 1) is LLAMA32_1B
    quarter = shard(QWEN25_32B, 4)
    assert quarter.layer_params * 4 == QWEN25_32B.layer_params
    assert quarter.kv_bytes_per_token * 4 == QWEN25_32B.kv_bytes_per_token


def test_storage_rates_are_measured_from_the_bundled_profile():
    rates = storage_rates()
    assert rates["problems_measured"] >= 10
    assert 1.5 < rates["journal_bytes_per_token"] < 8  # UTF-8 text of a token, JSON-escaped
    assert 0 < rates["parquet_over_journal"] < 1  # parquet compresses


def test_the_page_shows_what_the_command_computes(costs):
    page = DOC.read_text()
    block = page.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert block == markdown_table(costs), "run: ./run env.synthetic.profiling_cost --write"
    stored = json.loads(DOC.with_name("scale_out_costs.json").read_text())
    assert stored["rows"] == json.loads(json.dumps(costs["rows"]))


def test_write_doc_fills_only_the_marked_block(tmp_path, costs):
    doc = tmp_path / "page.md"
    doc.write_text(f"before\n{BEGIN}\nold\n{END}\nafter\n")
    write_doc(costs, doc)
    text = doc.read_text()
    assert text.startswith("before\n") and text.endswith("\nafter\n") and "old" not in text
    assert "| 32B" in text and (tmp_path / "scale_out_costs.json").is_file()
    doc.write_text("no markers")
    with pytest.raises(ValueError, match="no <!-- profiling-cost:begin -->"):
        write_doc(costs, doc)


def test_the_command_refuses_impossible_shapes():
    from env.synthetic.profiling_cost import main

    with pytest.raises(SystemExit):
        main(["--branches", "257"])
    with pytest.raises(ValueError, match="fewer than branches"):
        profiling_costs(replace(RunShape(), branches=257))
    assert np.isfinite(profiling_costs(RunShape(problems=1, branches=1))["rows"][0]["gpu_hours"])
