"""Every controller family's settings replayed on a set of draws: the candidates the hindsight
bound (``policies.saving_bound``) chooses among.

The vote rules come from one ``policies.race_eval.sweep_rules`` sweep, the run's value network
from one set of ``policies.stop_value_training.race_traces``; both keep each draw apart, so the
same replay serves every subset of problems (the halves the bound cross-validates on) without
replaying again.  Any setting may also act as under a shorter deadline of the grid, or of the
deadlines a stop-value policy was tuned at (``with_shorter_horizons``), as its tuning allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from env.backends.replay import ReplayBackend
from env.config import RaceEnvConfig
from env.features import ProblemFeaturizer
from policies.evaluate import HEURISTICS, REFERENCE
from policies.race_eval import RULE_SWEEP_LABEL, SweepResult, sweep_rules
from policies.stop_value import StopSetting, StopValuePolicy
from policies.stop_value_training import (
    PRICES,
    SweepTable,
    Traces,
    TuningReplay,
    prompt_table,
    race_traces,
    stop_value_configs,
    sweep_stop_value,
)

if TYPE_CHECKING:
    from policies.saved_policy import RaceModel

STOP_VALUE = "stop_value"
"""The value network's family name."""


@dataclass(frozen=True)
class Candidates:
    """A family's settings at one deadline: mean accuracy and mean latency of each."""

    accuracy: np.ndarray
    latency: np.ndarray


def with_shorter_horizons(per_deadline: Sequence[Candidates]) -> list[Candidates]:
    """At each deadline, the settings there and every setting read at a shorter deadline of the
    grid: any controller may act as under a shorter deadline (a budget, as the stop-value
    tuning allows)."""
    return [
        Candidates(np.concatenate([c.accuracy for c in per_deadline[: d + 1]]),
                   np.concatenate([c.latency for c in per_deadline[: d + 1]]))
        for d in range(len(per_deadline))
    ]  # fmt: skip


def rule_candidates(
    sweep: SweepResult, draws: np.ndarray | slice = slice(None)
) -> dict[str, list[Candidates]]:
    """Every vote-rule family's settings (a ``policies.race_eval.sweep_rules`` sweep) on the
    flagged draws (all by default), with shorter horizons."""
    out: dict[str, list[Candidates]] = {}
    for family in sorted({config[0] for config in sweep.correct}):  # a fixed order for "all"
        configs = [c for c in sweep.correct if c[0] == family]
        out[family] = with_shorter_horizons([
            Candidates(np.array([sweep.correct[c][d][draws].mean() for c in configs]),
                       np.array([sweep.latency[c][d][draws].mean() for c in configs]))
            for d in range(len(sweep.deadlines_s))
        ])  # fmt: skip
    return out


@dataclass
class StopValueReplay:
    """The run's value network replayed on some problems' draws under every (n, k) it tunes
    over."""

    model: StopValuePolicy
    featurizer: ProblemFeaturizer
    traces: Traces
    prompts: np.ndarray
    deadlines: Sequence[float]
    prices: Sequence[float] = PRICES
    table: SweepTable | None = None
    """the sweep of every trace at ``deadlines`` and ``prices``, when already computed"""

    @classmethod
    def on(
        cls,
        model: StopValuePolicy,
        featurizer: ProblemFeaturizer,
        backend: ReplayBackend,
        problems: Sequence[int],
        deadlines: Sequence[float],
        repeats: int,
        seed: int,
        n_grid: Sequence[int],
        tuning: TuningReplay | None = None,
    ) -> StopValueReplay:
        """Replay ``model``'s network on ``problems`` x ``repeats`` draws of ``backend``; read
        ``tuning`` instead where it holds exactly these draws and this network's sweep at
        ``deadlines`` (``TuningReplay.serves``)."""
        n_min = model.info.get("args", {}).get("n_min", min(n_grid))
        configs = stop_value_configs(n_grid, backend.k_grid, n_min)
        if tuning is not None and tuning.serves(model.net, problems, repeats, seed, deadlines,
                                                configs, PRICES):  # fmt: skip
            return cls(model, featurizer, tuning.traces, tuning.prompts, deadlines,
                       table=tuning.table)  # fmt: skip
        traces = race_traces(backend, problems, repeats, seed, configs)
        return cls(model, featurizer, traces, prompt_table(backend, featurizer), deadlines)

    def candidates(self, problems: np.ndarray | None = None) -> list[Candidates]:
        """Every (n, k, price) on the draws of the flagged problems (all when None), with
        shorter horizons (as its tuning)."""
        counted = None if problems is None else problems[self.traces.problem]
        table = self.table if problems is None else None
        if table is None:
            table = sweep_stop_value(self.model.net, self.traces, self.prompts, self.featurizer,
                                     self.deadlines, self.prices, counted)  # fmt: skip
        return with_shorter_horizons([
            Candidates(table.accuracy[:, :, d].ravel(), table.latency[:, :, d].ravel())
            for d in range(len(self.deadlines))
        ])  # fmt: skip

    def setting(self, index: int, d: int) -> StopSetting:
        """The setting behind candidate ``index`` at deadline ``d`` of ``candidates()``: grid
        deadlines up to ``d`` in turn (the horizon), then (n, k), then price."""
        horizon, rest = divmod(index, len(self.traces.configs) * len(self.prices))
        config, price = divmod(rest, len(self.prices))
        n, k = self.traces.configs[config]
        return StopSetting(n, k, self.prices[price], self.deadlines[horizon] / self.deadlines[d])


def rows_on(
    sweep: SweepResult, controllers: Sequence[dict], draws: np.ndarray | slice, at: Sequence[int]
) -> list[dict]:
    """A tuned rule controller's rows (accuracy, mean latency per deadline; ``controllers``: its
    report entries, one per deadline, at the sweep's deadlines ``at``) on the flagged draws,
    read off the sweep."""
    rows = []
    for c, d in zip(controllers, at, strict=True):
        key = (c["family"], c["threshold"], c["n"], c["k"])
        rows.append({"accuracy": float(sweep.correct[key][d][draws].mean()),
                     "mean_latency_s": float(sweep.latency[key][d][draws].mean())})  # fmt: skip
    return rows


@dataclass
class Draws:
    """Every controller family replayed on a set of draws: the rule sweep, the value network's
    replay (when the run has one) and which problem each draw of the sweep belongs to, at the
    deadlines asked for and at the shorter horizons a setting may act as under (``at``: where
    each deadline asked for is among the replayed ones)."""

    sweep: SweepResult
    replay: StopValueReplay | None
    problem_of_draw: np.ndarray
    at: list[int]

    @classmethod
    def of(
        cls, model: RaceModel, featurizer: ProblemFeaturizer, config: RaceEnvConfig,
        backend: ReplayBackend, problems: Sequence[int], deadlines: Sequence[float],
        repeats: int, seed: int, sweep: SweepResult | None = None,
        rule_pairs: Sequence[tuple[int, int]] | None = None, label: str = RULE_SWEEP_LABEL,
        tuning: TuningReplay | None = None,
    ) -> Draws:  # fmt: skip
        """Replay every family on ``problems`` x ``repeats`` draws of ``backend`` (a policy's
        ``model``, ``featurizer`` and race ``config``; the value network's family only when
        the model is a stop-value policy) at ``deadlines`` and, for a stop-value policy, at the
        deadlines its settings were tuned at (horizons it may act as under: since this round
        also between the grid's).  ``sweep``: the rules' sweep of exactly these draws and
        deadlines when the caller has it already (it is not replayed again).  ``rule_pairs``:
        replay the vote rules at these (n, k) only (the rule families' candidates then cover
        only them; the lead tuning's check needs no more than the tuned baselines' rows);
        ``label``: the rule sweep's progress bar; ``tuning``: the learner's replay of its
        tuning draws, read instead of replaying where it holds these draws
        (``StopValueReplay.on``)."""
        tuned_at = model.deadlines_s if isinstance(model, StopValuePolicy) else ()
        grid = tuple(sorted({float(d) for d in (*deadlines, *tuned_at)}))
        if sweep is None:
            sweep = sweep_rules(backend, grid, problems, repeats, seed, config.n_grid,
                                config.k_grid, pairs=rule_pairs, label=label)  # fmt: skip
        elif tuple(sweep.deadlines_s) != grid:
            raise ValueError(f"the sweep covers {sweep.deadlines_s}, the draws need {grid}")
        replay = None
        if isinstance(model, StopValuePolicy):
            replay = StopValueReplay.on(model, featurizer, backend, problems, grid, repeats,
                                        seed, config.n_grid, tuning)  # fmt: skip
        at = [grid.index(float(d)) for d in deadlines]
        return cls(sweep, replay, np.repeat(np.asarray(problems), repeats), at)  # sweep's order

    def setting(self, index: int, d: int) -> StopSetting:
        """The stop-value setting behind candidate ``index`` at the ``d``-th deadline asked for
        (``StopValueReplay.setting``)."""
        if self.replay is None:
            raise ValueError("these draws replay no stop-value policy")
        return self.replay.setting(index, self.at[d])

    def draws(self, problems: np.ndarray | None) -> np.ndarray | slice:
        """The sweep's draws of the flagged problems (a flag per problem of the backend; every
        draw when None)."""
        return slice(None) if problems is None else problems[self.problem_of_draw]

    def families(self, problems: np.ndarray | None = None) -> dict[str, list[Candidates]]:
        """Each family's candidates on the draws of the flagged problems (all when None), and
        all of them together."""
        families = rule_candidates(self.sweep, self.draws(problems))
        if self.replay is not None:
            families[STOP_VALUE] = self.replay.candidates(problems)
        families = {name: [per_deadline[d] for d in self.at]
                    for name, per_deadline in families.items()}  # fmt: skip
        families["all"] = [
            Candidates(np.concatenate([f[d].accuracy for f in families.values()]),
                       np.concatenate([f[d].latency for f in families.values()]))
            for d in range(len(self.at))
        ]  # fmt: skip
        return families

    def world(self, report: dict, problems: np.ndarray | None = None) -> World:
        """The tuned baselines' rows (the report's controllers) and the families' candidates on
        the flagged problems' draws."""
        tuned = {name: rows_on(self.sweep, report["controllers"][name], self.draws(problems),
                               self.at)
                 for name in (REFERENCE, *HEURISTICS) if name in report["controllers"]}  # fmt: skip
        return tuned, self.families(problems)


World = tuple[dict, dict[str, list[Candidates]]]
"""Draws as the cross-validation sees them: the tuned baselines' rows there (``rows_on``) and
each family's candidates there."""
