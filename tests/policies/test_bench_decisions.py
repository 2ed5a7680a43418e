"""The decision-time benchmark runs and reports every controller (figures: README / report)."""

from __future__ import annotations

from policies.bench_decisions import ADMISSION_CALLS, RULES, main


def test_benchmark_reports_median_and_p99_per_controller(tmp_path):
    report = main(["--races", "5", "--out", str(tmp_path / "decisions.json")])
    admission = {f"admission refusal{how}, {count} calls" for count in ADMISSION_CALLS
                 for how in ("", " reused")}  # fmt: skip
    assert set(report["decide"]) == {"learned (served)", "learned (SB3 predict)", *RULES,
                                     *admission}  # fmt: skip
    for figures in (*report["decide"].values(), report["begin"]):
        assert 0 < figures["median_us"] <= figures["p99_us"] and figures["count"] > 0
    assert (tmp_path / "decisions.json").is_file()
