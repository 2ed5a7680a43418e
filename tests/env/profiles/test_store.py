"""Profiles may carry each branch's token log-probability summary; older ones load without.

The summary columns are optional (``OPTIONAL_PROBLEM_COLUMNS``): a profile with them round-trips
(None -> NaN), the replayed race hands them to the race state, and a profile without them
(the fake one here, like the synthetic one) still loads and replays with no confidence.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from env.backends.replay import ReplayBackend
from env.backends.replay_race import ReplayRace
from env.profiles.store import OPTIONAL_PROBLEM_COLUMNS, load_profile, save_profile
from tests.fake_profile import make_fake_profile


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return make_fake_profile(tmp_path_factory.mktemp("store") / "plain", 12, 6, n_branches=4)


@pytest.fixture(scope="module")
def with_logprobs(plain, tmp_path_factory):
    """The same profile with summaries; branch 3 of every problem has none (aborted)."""
    profile = load_profile(plain)
    rows = []
    for i, row in enumerate(profile.rows):
        row = {**row, **{c: np.asarray(row[c]).tolist()
                         for c in ("branch_class", "branch_tokens", "branch_finish_s",
                                   "branch_correct")}}  # fmt: skip
        row["branch_mean_logprob"] = [-0.1 * (i + 1), -0.2, -0.3, None]
        row["branch_lowest_window_logprob"] = [-1.0 * (i + 1), -2.0, -3.0, None]
        rows.append(row)
    folder = plain.parent / "with-logprobs"
    return save_profile(folder, {**profile.manifest, "name": folder.name}, rows)


def test_summaries_round_trip_and_older_profiles_load(plain, with_logprobs):
    old, new = load_profile(plain), load_profile(with_logprobs)
    assert not old.has_logprobs and all(c not in old.rows[0] for c in OPTIONAL_PROBLEM_COLUMNS)
    assert new.has_logprobs
    np.testing.assert_array_equal(new.rows[1]["branch_mean_logprob"][:3], [-0.2, -0.2, -0.3])
    assert np.isnan(new.rows[1]["branch_lowest_window_logprob"][3])
    manifest = json.loads((with_logprobs / "manifest.json").read_text())
    assert manifest["format_version"] == 1  # optional columns change no meaning


def test_replayed_race_passes_the_recorded_confidence(plain, with_logprobs):
    assert ReplayBackend(plain, "test", "ngram").branch_confidence is None
    backend = ReplayBackend(with_logprobs, "test", "ngram")
    for p in range(len(backend.problems)):
        race = ReplayRace(backend, p, 1e3, np.random.default_rng(p), checkpoints=())
        race.begin(4, 0)
        while not race.done:
            race.advance()
        recorded = {c: [] for c in range(-1, 8)}
        for b in race._branches[~race._live]:  # the drawn branches that finished
            mean = backend.branch_confidence[p, b, 0]
            if not np.isnan(mean):
                recorded[int(backend.branch_classes[p, b])].append(mean)
        for answer_class, confidences in race.state.confidences.items():
            got = sorted(c.mean_logprob for c in confidences)
            assert got == sorted(recorded[answer_class])
