"""The live engine on the real bundled model: k control, deadlines, early stop, bookkeeping."""

from __future__ import annotations

import math
import time

import pytest

from engine.rollout import Rollout

pytestmark = pytest.mark.engine

PROMPT = "What is 12 + 30? Put the final answer in \\boxed{}."
LONG = "Write a long, detailed story about a cat who learns algebra."


@pytest.mark.parametrize("fixture", ["draft_engine", "ngram_engine"])
def test_drafted_tokens_per_step_follow_k(fixture, request):
    """vLLM's own counters: drafted tokens / verification steps equals k on one engine."""
    engine = request.getfixturevalue(fixture)
    for k in (0, 1, 2, 4, 2, 0):
        rollout = engine.run(LONG, n=2, k=k)
        counters = rollout.spec_counters
        if k == 0:
            assert counters["draft_tokens"] == 0
            continue
        assert counters["drafts"] > 0
        per_step = counters["draft_tokens"] / counters["drafts"]
        if fixture == "draft_engine":
            assert per_step == pytest.approx(k)
        else:  # n-gram proposes at most k (fewer when the lookup finds a shorter match)
            assert 0 < per_step <= k + 1e-9
        per_branch = sum(b.drafted_tokens for b in rollout.branches if b.finished)
        assert per_branch <= counters["draft_tokens"] + 1e-9


def test_rollout_records_branches_and_call(draft_engine):
    rollout = draft_engine.run(PROMPT, n=3, k=2)
    assert isinstance(rollout, Rollout)
    assert (rollout.n, rollout.k, rollout.method) == (3, 2, "draft_model")
    assert rollout.prompt_tokens > 10
    assert 0 < rollout.ttft_s <= rollout.wall_s
    assert len(rollout.branches) == 3
    for branch in rollout.branches:
        assert branch.finished and branch.finish_reason in ("stop", "length")
        assert 0 < branch.finish_s <= rollout.wall_s + 1e-6
        assert branch.token_count > 0 and branch.text
        assert 0 <= branch.accepted_tokens <= branch.drafted_tokens
        assert branch.drafted_tokens > 0
    assert rollout.stopped_by == "complete"
    assert not draft_engine.has_unfinished_requests()


@pytest.mark.parametrize("deadline", [0.05, 0.4, 1.5])
def test_deadline_returns_on_time_with_only_finished_branches(draft_engine, deadline):
    started = time.monotonic()
    rollout = draft_engine.run(LONG, n=16, k=1, deadline_s=deadline)
    elapsed = time.monotonic() - started
    assert elapsed <= deadline + 0.1
    assert rollout.stopped_by == "deadline"
    for branch in rollout.branches:
        if branch.finished:
            assert branch.finish_s <= deadline
        else:
            assert branch.finish_reason == "aborted"
    assert not draft_engine.has_unfinished_requests()


def test_infinite_deadline_means_none(draft_engine):
    rollout = draft_engine.run(PROMPT, n=1, k=0, deadline_s=math.inf)
    assert rollout.deadline_s is None and rollout.stopped_by == "complete"


def test_early_stop_aborts_the_rest(draft_engine):
    rollout = draft_engine.run(PROMPT, n=8, k=0, should_stop=lambda done: len(done) >= 2)
    assert rollout.stopped_by == "early_stop"
    assert len(rollout.finished) >= 2
    assert any(b.finish_reason == "aborted" for b in rollout.branches)
    assert not draft_engine.has_unfinished_requests()


def test_error_in_callback_leaves_clean_engine(draft_engine):
    def explode(done):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        draft_engine.run(PROMPT, n=4, k=1, should_stop=explode)
    assert not draft_engine.has_unfinished_requests()
    assert draft_engine.run(PROMPT, n=1, k=0).branches[0].finished


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must be an int in 1..16"),
        ({"n": 17}, "n must be an int in 1..16"),
        ({"n": 2.0}, "n must be an int"),
        ({"k": -1}, "k must be an int in 0..4"),
        ({"k": 5}, "k must be an int in 0..4"),
        ({"deadline_s": 0}, "deadline_s must be > 0"),
        ({"deadline_s": -1.0}, "deadline_s must be > 0"),
        ({"deadline_s": float("nan")}, "deadline_s must be > 0"),
        ({"deadline_s": "1"}, "deadline_s must be a number"),
        ({"prompt": ""}, "prompt must be a non-empty string"),
        ({"prompt": "   "}, "prompt must be a non-empty string"),
        ({"prompt": "word " * 5000}, "context allows at most"),
        ({"prompt": []}, "non-empty string or its token ids"),
        ({"prompt": [1] * 5000}, "context allows at most"),
        ({"temperature": -0.5}, "temperature must be"),
    ],
)
def test_bad_input_is_rejected_before_the_engine(draft_engine, kwargs, message):
    before = draft_engine.spec_counters()
    call = {"prompt": PROMPT, "n": 1, "k": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        draft_engine.run(**call)
    assert draft_engine.spec_counters() == before
    assert not draft_engine.has_unfinished_requests()


def test_token_ids_run_like_their_message(draft_engine):
    """A prompt tokenized once (``prompt_token_ids``) runs exactly like its message."""
    ids = draft_engine.prompt_token_ids(PROMPT)
    by_text = draft_engine.run(PROMPT, n=1, k=0, temperature=0, max_tokens=8)
    by_ids = draft_engine.run(ids, n=1, k=0, temperature=0, max_tokens=8)
    assert by_ids.prompt_tokens == by_text.prompt_tokens == len(ids)
    assert by_ids.branches[0].text == by_text.branches[0].text


def test_greedy_output_identical_at_every_k(draft_engine):
    """Speculation is lossless: greedy float32 output does not depend on k."""
    texts = {k: draft_engine.run(LONG, n=1, k=k, temperature=0).branches[0].text for k in range(5)}
    assert len(texts[0]) > 20
    for k in range(1, 5):
        assert texts[k] == texts[0], f"k={k} differs from k=0"


def test_cancel_event_aborts_the_call(draft_engine):
    import threading

    cancel = threading.Event()
    timer = threading.Timer(0.5, cancel.set)
    timer.start()
    started = time.monotonic()
    rollout = draft_engine.run(LONG, n=4, k=0, cancel=cancel)
    timer.join()
    assert rollout.stopped_by == "cancelled"
    assert time.monotonic() - started < 3.0
    assert not draft_engine.has_unfinished_requests()


def test_per_call_max_tokens_and_ignore_eos(draft_engine):
    rollout = draft_engine.run(PROMPT, n=2, k=1, max_tokens=7, ignore_eos=True)
    assert [b.token_count for b in rollout.branches] == [7, 7]
    assert all(b.finish_reason == "length" for b in rollout.branches)


def test_step_hook_sees_every_step_and_logprobs_are_recorded(draft_engine):
    """``on_step`` gets each step's tokens and finished branches; its stop ends the call;
    ``logprobs`` gives one log-probability per sampled token."""
    from engine.call_state import StepControl

    reports = []

    def hook(report):
        reports.append(report)
        return StepControl(stop=len(reports) >= 6)

    rollout = draft_engine.run(LONG, n=2, k=2, on_step=hook, logprobs=True)
    assert len(reports) == 6 and rollout.stopped_by == "early_stop"
    assert sum(r.new_tokens for r in reports) == rollout.generated_tokens
    assert [r.elapsed_s for r in reports] == sorted(r.elapsed_s for r in reports)
    for branch in rollout.branches:
        assert len(branch.token_logprobs) == branch.token_count
        assert all(lp <= 0.0 for lp in branch.token_logprobs)
    assert draft_engine.run(PROMPT, n=1, k=0, max_tokens=4).branches[0].token_logprobs is None
    assert not draft_engine.has_unfinished_requests()
