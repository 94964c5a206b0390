"""The learning-rate schedule (training.schedule): a torch.optim.lr_scheduler object over the trainer's optimizer,
stepped after every update (constant, inverse_sqrt) or with every validation score (plateau). Its state_dict is
saved with the training state, so that --resume continues the schedule where it stopped."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau

from seqtool.config import TrainingConfig
from seqtool.errors import ConfigError, ModelFileError

# The config keys a schedule is built from: a resumed run continues the saved schedule, so it must keep them.
SETTINGS = ("schedule", "lr", "warmup_steps", "plateau_factor", "plateau_patience", "min_lr")


@dataclass
class Schedule:
    scheduler: LRScheduler
    settings: dict[str, Any]

    @property
    def lr(self) -> float:
        """The rate the next update uses."""
        return self.scheduler.optimizer.param_groups[0]["lr"]

    def after_step(self) -> None:
        if not isinstance(self.scheduler, ReduceLROnPlateau):
            with warnings.catch_warnings():
                # A step the optimizer skipped (fp16's loss scaler on overflow, training.on_nan=skip) still counts,
                # as it does for the step counter; torch warns when that happens before the first real step.
                warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before"))
                self.scheduler.step()

    def after_validation(self, score: float) -> None:
        if isinstance(self.scheduler, ReduceLROnPlateau):
            self.scheduler.step(score)

    def state(self) -> dict[str, Any]:
        return {"settings": self.settings, "state": self.scheduler.state_dict()}

    def restore(self, saved: Any, where: str) -> None:
        """Continue from `state()`, as saved in `where`: refused when the config's schedule settings changed, or
        when the state is not one this schedule could have written (a damaged file)."""
        if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict) or "state" not in saved:
            raise ModelFileError(f"{where}: damaged training state (learning-rate schedule)")
        changed = [k for k in SETTINGS if saved["settings"].get(k) != self.settings[k]]
        if changed:
            raise ConfigError(f"--resume: {', '.join('training.' + k for k in changed)} differ(s) from the run in "
                              f"{where} ({', '.join(repr(saved['settings'].get(k)) for k in changed)}); the "
                              f"learning-rate schedule continues as it was")
        if not _alike(saved["state"], self.scheduler.state_dict()):
            raise ModelFileError(f"{where}: damaged training state (learning-rate schedule)")
        self.scheduler.load_state_dict(saved["state"])
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr

    def restore_legacy(self, progress: dict[str, Any]) -> None:
        """Continue a state an earlier seqtool saved, with no schedule state but the plateau's record in the progress
        record: the step-wise schedules are a function of the step; the plateau's scale, best and count carry."""
        if isinstance(self.scheduler, ReduceLROnPlateau):
            scale = progress.get("lr_scale", 1.0)
            for group in self.scheduler.optimizer.param_groups:
                group["lr"] = max(self.settings["lr"] * scale, self.settings["min_lr"])
            if progress.get("plateau_best") is not None:
                self.scheduler.best = progress["plateau_best"]
            self.scheduler.num_bad_epochs = progress.get("plateau_bad", 0)
        else:
            self.scheduler.last_epoch = progress["step"] - 1
            self.after_step()


def make_schedule(cfg: TrainingConfig, optimizer: torch.optim.Optimizer, higher_is_better: bool) -> Schedule:
    """The schedule training.schedule names, over `optimizer` (whose rate is cfg.lr); `higher_is_better` says how
    the plateau schedule reads the validation scores."""
    settings = {k: getattr(cfg, k) for k in SETTINGS}
    scheduler: LRScheduler
    if cfg.schedule == "plateau":
        # Strictly better than the best so far resets the count (no relative threshold); after more than
        # plateau_patience validations without, the rate is multiplied by plateau_factor, down to min_lr.
        scheduler = ReduceLROnPlateau(optimizer, mode="max" if higher_is_better else "min", factor=cfg.plateau_factor,
                                      patience=cfg.plateau_patience, threshold=0.0, threshold_mode="abs",
                                      min_lr=cfg.min_lr)
    else:
        scheduler = LambdaLR(optimizer, _factor(cfg))
    return Schedule(scheduler, settings)


def _factor(cfg: TrainingConfig) -> Callable[[int], float]:
    """The multiple of cfg.lr at an update (counted from 0): inverse_sqrt rises linearly over warmup_steps, then
    falls as 1/sqrt(step); never below min_lr."""
    warm, floor = max(cfg.warmup_steps, 1), cfg.min_lr / cfg.lr

    def factor(step: int) -> float:
        if cfg.schedule == "constant":
            return 1.0
        step = max(step, 1)
        return max(min(step / warm, math.sqrt(warm / step)), floor)
    return factor


def _alike(saved: Any, fresh: Any) -> bool:
    """`saved` has the shape of `fresh`, a state_dict: the same keys, list lengths and kinds of value (a number
    for a number, an equal string or None), so that loading it cannot fail later in training."""
    if isinstance(fresh, dict):
        return isinstance(saved, dict) and saved.keys() == fresh.keys() and all(
            _alike(saved[k], fresh[k]) for k in fresh)
    if isinstance(fresh, list):
        return isinstance(saved, list) and len(saved) == len(fresh) and all(map(_alike, saved, fresh))
    if isinstance(fresh, bool):
        return isinstance(saved, bool)
    if fresh is None or isinstance(fresh, str):
        return saved == fresh
    if isinstance(fresh, (int, float)):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool) and not math.isnan(saved)
    return False
