"""Synchronous successive halving with a rung at every stage boundary: the search's ``scheduler: {kind: halving}``.

Every trial trains the first ``grace_period`` stages; then, at each stage boundary, the trials wait (paused, holding no
CPU) until every live trial of the search has reached it, and only the best ``ceil(n / reduction_factor)`` go on to
the next stage. Eight configurations over three stages at rate 3 cost 8 + 3 + 1 = 12 stage-trainings, half of running
all of them to the end; ASHA, which decides as each trial arrives, passes the first trials at every rung and cannot
promise that (README, "Tuning").

Ray Tune's :class:`~ray.tune.schedulers.HyperBandScheduler` does the pausing, the halving and the resuming; this module
changes only its brackets: one bracket holding every trial of the search (HyperBand would split eight trials into
brackets of two and three), and rungs one stage apart (HyperBand multiplies the milestone by the rate: at rate 3 on a
3-stage stream it would go from stage 1 straight to stage 3).

Concurrency: a bracket must hold every trial before it halves, so all of the search's trials exist from the start, and
Tune's own limit (the search algorithm's) counts a paused trial as running. :class:`TrialSlots` limits instead: a
trial's driver takes a slot before its worker group starts and gives it back before the report that may pause it.

A paused trial is stopped at the stage boundary and started again from its last report's checkpoint
(:mod:`tuning.trial`): nothing is trained twice.

``Tuner.restore`` (``gorp tune --resume``) builds a fresh scheduler and adds every trial again, the unfinished ones as
PENDING with their last results. :meth:`StageHalving._realign` puts the bracket back at the rung those results show:
ended trials leave it, trials waiting at the rung wait again (PAUSED), and a rung every live trial had reached is
halved at once.
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import ray
from ray.tune.experiment import Trial
from ray.tune.schedulers import HyperBandScheduler
from ray.tune.schedulers.hyperband import _Bracket


class StageHalving(HyperBandScheduler):
    def __init__(self, *, trials: int, stages: int, grace_period: int, reduction_factor: float):
        if not 0 < grace_period <= stages:
            raise ValueError(f"grace_period must be 1..{stages} (the stream's stages), got {grace_period}")
        super().__init__(time_attr="stage", max_t=stages, reduction_factor=reduction_factor)
        self._s_max_1 = 1  # a band holds one bracket; the bracket holds every trial
        self._trials, self._grace = trials, grace_period
        self._restored = False

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        bracket, _ = self._trial_info[trial]
        if trial.status in (Trial.TERMINATED, Trial.ERROR):  # a restored search's ended trial: nothing to wait for
            bracket.cleanup_trial(trial)
        elif "stage" in (trial.last_result or {}):  # a restored trial that reported before the driver died
            bracket.update_trial_stats(trial, trial.last_result)
            self._restored = True

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        self._realign(tune_controller)
        return super().on_trial_result(tune_controller, trial, result)

    def _create_bracket(self, s: int) -> _Bracket:
        return _StageBracket(
            time_attr=self._time_attr,
            max_trials=self._trials,
            init_t_attr=self._grace,
            max_t_attr=self._max_t_attr,
            eta=self._eta,
            s=self._max_t_attr - self._grace,  # one halving per stage boundary after the grace period
        )

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        self._realign(tune_controller)
        return super().choose_trial_to_run(tune_controller)

    def _realign(self, tune_controller) -> None:
        """After a restore: the bracket's rung from its trials' last results, the waiting trials paused again."""
        if not self._restored:
            return
        self._restored = False
        for bracket in {b for b, _ in self._trial_info.values()}:
            bracket.realign()
            for t, result in bracket._live_trials.items():
                if t.status == Trial.PENDING and bracket._get_result_time(result) >= bracket._cumul_r:
                    tune_controller._set_trial_status(t, Trial.PAUSED)  # Tune's schedulers may (PBT does)
            if bracket.cur_iter_done():
                self._process_bracket(tune_controller, bracket)

    def debug_string(self) -> str:
        return super().debug_string().replace("Using HyperBand", "Using successive halving per stage")


class _StageBracket(_Bracket):
    """HyperBand's bracket with the next milestone one stage on (not ``reduction_factor`` times as far)."""

    def realign(self) -> None:
        """The rung is the furthest stage a live trial reached; the trials that may go on there, the schedule's."""
        reached = max((self._get_result_time(r) for r in self._live_trials.values()), default=0)
        total = self._max_t_attr - self._r0
        done = int(min(max(reached - self._r0, 0), total))  # halvings already made
        self._r = self._cumul_r = self._r0 + done
        self._halves = total - done
        self._n = self._n0
        for _ in range(done):
            self._n = math.ceil(self._n / self._eta)

    def successive_halving(self, metric: str, metric_op: float):
        rung = self._cumul_r
        good, bad = super().successive_halving(metric, metric_op)
        self._r = self._cumul_r = min(rung + 1, self._max_t_attr)
        return good, bad

    def _calculate_total_work(self, n: int, r: float, s: int) -> int:
        return halving_cost(n, int(r) + s, int(r), self._eta)


def halving_cost(trials: int, stages: int, grace_period: int, reduction_factor: float) -> int:
    """Stage-trainings the schedule spends when every trial finishes every stage it is given: ``trials * grace``,
    then ``ceil(n / rate)``, ``ceil(n / rate^2)``, ... one stage each."""
    work, n = trials * grace_period, trials
    for _ in range(stages - grace_period):
        n = math.ceil(n / reduction_factor)
        work += n
    return work


@ray.remote(num_cpus=0)
class _Slots:
    def __init__(self, n: int):
        self.free = asyncio.Semaphore(n)

    async def acquire(self) -> None:
        await self.free.acquire()

    def release(self) -> None:
        self.free.release()


def start_slots(name: str, n: int):
    """The search's slots (a named actor the trials find); the search's driver holds the handle for its lifetime."""
    return _Slots.options(name=name).remote(n)


class TrialSlots:
    """A trial driver's slot while its worker group runs: ``with slots:`` waits for one; ``release()`` (before the
    report that may pause the trial, and on the way out) gives it back. ``name=None``: no limit (ASHA, random, grid,
    whose trials never pause: Tune's own limit holds). Each take and give is a line in ``log`` (trial, event, time)."""

    def __init__(self, name: str | None, trial_id: str, log: Path):
        self.actor = ray.get_actor(name) if name else None
        self.trial_id, self.log, self.held = trial_id, log, False

    def __enter__(self) -> TrialSlots:
        if self.actor is not None:
            ray.get(self.actor.acquire.remote())
            self.held = True
            self._note("take")
        return self

    def release(self) -> None:
        if self.held:
            self._note("give")
            ray.get(self.actor.release.remote())
            self.held = False

    def __exit__(self, *exc) -> None:
        self.release()

    def _note(self, event: str) -> None:
        with open(self.log, "a", encoding="utf-8") as f:
            f.write(f"{self.trial_id} {event} {time.time():.3f}\n")
