"""The learning-rate schedules: their rates step by step, and what restoring a saved schedule accepts."""

from __future__ import annotations

import pytest
import torch

from seqtool.config import TrainingConfig
from seqtool.errors import ConfigError, ModelFileError
from seqtool.schedule import Schedule, make_schedule


def _schedule(higher_is_better: bool = True, **settings) -> Schedule:
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=settings.get("lr", 1e-3))
    return make_schedule(TrainingConfig(**settings), optimizer, higher_is_better)


def _rates_at(schedule: Schedule, steps: set[int]) -> dict[int, float]:
    """The rate used by the update after `step` updates, for each step asked."""
    rates = {}
    for step in range(max(steps) + 1):
        if step in steps:
            rates[step] = schedule.lr
        schedule.after_step()
    return rates


def test_inverse_sqrt_rises_over_the_warmup_then_falls_as_one_over_root_step():
    s = _schedule(lr=1.0, schedule="inverse_sqrt", warmup_steps=100, min_lr=0.0)
    assert _rates_at(s, {0, 1, 50, 100, 400}) == pytest.approx({0: 0.01, 1: 0.01, 50: 0.5, 100: 1.0, 400: 0.5})
    floored = _schedule(lr=1.0, schedule="inverse_sqrt", warmup_steps=100, min_lr=0.2)
    assert _rates_at(floored, {1, 10_000}) == pytest.approx({1: 0.2, 10_000: 0.2})


def test_constant_ignores_steps_and_scores():
    s = _schedule(lr=0.003, schedule="constant")
    s.after_validation(1.0)
    s.after_validation(0.0)
    assert _rates_at(s, {0, 5000}) == {0: 0.003, 5000: 0.003}


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_plateau_scales_down_after_patience_validations_without_a_strictly_better_score(higher_is_better):
    s = _schedule(higher_is_better, lr=1.0, schedule="plateau", plateau_patience=1, plateau_factor=0.5, min_lr=0.3)
    sign = 1 if higher_is_better else -1
    rates = []
    for score in (10, 11, 11, 10, 12, 12, 12, 12, 12):  # equal to the best is no improvement
        s.after_validation(sign * score)
        s.after_step()  # steps do not move it
        rates.append(s.lr)
    assert rates == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.3, 0.3, 0.3]  # halved after two misses; min_lr floors it


def test_restore_continues_the_saved_schedule():
    a = _schedule(lr=1.0, schedule="plateau", plateau_patience=0)
    for score in (3, 2):
        a.after_validation(score)
    b = _schedule(lr=1.0, schedule="plateau", plateau_patience=0)
    b.restore(a.state(), "there")
    assert b.lr == a.lr == 0.5
    for s in (a, b):
        s.after_validation(2.5)  # not above the restored best 3
    assert b.lr == a.lr == 0.25


def test_restore_refuses_changed_settings_and_damaged_states():
    saved = _schedule(lr=1.0, schedule="plateau").state()
    with pytest.raises(ConfigError, match=r"training.plateau_factor differ\(s\) from the run in there \(0.5\)"):
        _schedule(lr=1.0, schedule="plateau", plateau_factor=0.25).restore(saved, "there")
    with pytest.raises(ConfigError, match="training.schedule"):
        _schedule(lr=1.0, schedule="inverse_sqrt").restore(saved, "there")
    damaged = [None, [], {"settings": saved["settings"]}, {**saved, "state": {**saved["state"], "best": "x"}},
               {**saved, "state": {**saved["state"], "mode": "sideways"}},
               {**saved, "state": {k: v for k, v in saved["state"].items() if k != "num_bad_epochs"}},
               {**saved, "state": {**saved["state"], "_last_lr": [0.1, 0.2]}}]
    for state in damaged:
        with pytest.raises(ModelFileError, match="there: damaged training state"):
            _schedule(lr=1.0, schedule="plateau").restore(state, "there")


def test_min_lr_above_lr_is_a_config_error():
    with pytest.raises(ValueError, match="training.min_lr 0.1 is above training.lr 0.01"):
        TrainingConfig(lr=0.01, min_lr=0.1)
