"""Successive halving per stage (tuning.halving) against a stand-in for Tune's controller: which trials go on at each
stage boundary, what a search spends, and a search restored half-way (Tuner.restore adds every trial again)."""

from __future__ import annotations

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from tuning.halving import StageHalving, halving_cost


class FakeTrial:
    def __init__(self, i: int, quality: float):
        self.trial_id, self.quality = f"t{i}", quality
        self.status, self.is_saving, self.last_result, self.trained = Trial.PENDING, False, {}, []

    def __repr__(self) -> str:
        return self.trial_id


class FakeController:
    """What the scheduler sees of Tune's controller: the trials, stopping one, setting a status."""

    def __init__(self, scheduler: StageHalving, trials: list[FakeTrial], running: int = 2):
        self.scheduler, self.trials, self.running_at_most = scheduler, trials, running

    def get_trials(self):
        return self.trials

    def _set_trial_status(self, trial, status) -> None:
        trial.status = status

    def stop_trial(self, trial) -> None:  # Tune: a PAUSED or PENDING trial leaves through on_trial_remove
        was = trial.status
        trial.status = Trial.TERMINATED
        if was in (Trial.PAUSED, Trial.PENDING):
            self.scheduler.on_trial_remove(self, trial)

    def step(self, n_stages: int) -> bool:
        """Start what the scheduler chooses, then let every running trial train one stage; False when all ended."""
        self.steps = getattr(self, "steps", 0) + 1
        assert self.steps < 100, f"the search never ends: {[(t, t.status, t.trained) for t in self.trials]}"
        while (trial := self.scheduler.choose_trial_to_run(self)) is not None:  # (the slots: at most 2 at once)
            if sum(t.status == Trial.RUNNING for t in self.trials) == self.running_at_most:
                break
            trial.status = Trial.RUNNING
        running = [t for t in self.trials if t.status == Trial.RUNNING]
        for t in running:
            stage = t.last_result.get("stage", 0) + 1
            t.trained.append(stage)
            t.last_result = {"stage": stage, "objective": t.quality * stage}
            decision = self.scheduler.on_trial_result(self, t, t.last_result)
            if decision == TrialScheduler.PAUSE:
                t.status = Trial.PAUSED
            elif decision == TrialScheduler.STOP or stage == n_stages:
                t.status = Trial.TERMINATED
                self.scheduler.on_trial_complete(self, t, t.last_result)
        return any(t.status != Trial.TERMINATED for t in self.trials)


def _search(qualities, stages=3, grace=1, rate=3, restored=None):
    """A fresh scheduler given every trial (new ones, or ``restored``: what Tuner.restore hands it)."""
    scheduler = StageHalving(trials=len(qualities), stages=stages, grace_period=grace, reduction_factor=rate)
    scheduler.set_search_properties("objective", "max")
    trials = restored or [FakeTrial(i, q) for i, q in enumerate(qualities)]
    ctl = FakeController(scheduler, trials)
    for t in trials:
        scheduler.on_trial_add(ctl, t)
    return scheduler, trials, ctl


QUALITIES = [0.3, 0.9, 0.1, 0.5, 0.8, 0.2, 0.7, 0.4]
# rate 3: the best three of stage 1 (t1 0.9, t4 0.8, t6 0.7) train stage 2, the best of those stage 3
STAGES_AT_RATE_3 = {"t0": 1, "t1": 3, "t2": 1, "t3": 1, "t4": 2, "t5": 1, "t6": 2, "t7": 1}


def _each_stage_once(trials) -> bool:
    return all(t.trained == list(range(1, len(t.trained) + 1)) for t in trials)


def test_eight_trials_over_three_stages_at_rate_three_spend_twelve_stage_trainings():
    _, trials, ctl = _search(QUALITIES)
    while ctl.step(3):
        pass
    assert sum(len(t.trained) for t in trials) == 12 == halving_cost(8, 3, 1, 3)
    assert {t.trial_id: len(t.trained) for t in trials} == STAGES_AT_RATE_3 and _each_stage_once(trials)


def test_no_trial_passes_a_rung_before_every_trial_has_reached_it():
    _, trials, ctl = _search(QUALITIES, rate=2)
    while ctl.step(3):
        # while some trial has not finished stage 1, no trial has trained stage 2
        if any(len(t.trained) == 0 for t in trials):
            assert all(len(t.trained) <= 1 for t in trials)
    assert sorted(len(t.trained) for t in trials) == [1, 1, 1, 1, 2, 2, 3, 3]  # 8 -> 4 -> 2
    assert sum(len(t.trained) for t in trials) == halving_cost(8, 3, 1, 2) == 14


@pytest.mark.parametrize("stop_after_steps", [1, 3, 4, 5, 6])
def test_a_restored_search_goes_on_from_the_rung_it_had_reached(stop_after_steps):
    """Kill the driver after some steps; a fresh scheduler gets every trial again, the unfinished ones PENDING with
    their last results (Tune's restore): the search ends as the uninterrupted one does, training nothing twice."""
    _, trials, ctl = _search(QUALITIES)
    for _ in range(stop_after_steps):
        ctl.step(3)
    for t in trials:  # what Tuner.restore does with the trials' saved states
        if t.status != Trial.TERMINATED:
            t.status = Trial.PENDING
    _, _, ctl = _search(QUALITIES, restored=trials)
    while ctl.step(3):
        pass
    assert {t.trial_id: len(t.trained) for t in trials} == STAGES_AT_RATE_3 and _each_stage_once(trials)


def test_halving_cost():
    assert halving_cost(8, 3, 1, 3) == 12 and halving_cost(6, 3, 1, 2) == 11 and halving_cost(8, 3, 2, 3) == 19
    with pytest.raises(ValueError, match="grace_period must be 1..3"):
        StageHalving(trials=8, stages=3, grace_period=4, reduction_factor=2)
