"""Training metrics as TensorBoard events too (training.tensorboard), so `tensorboard --logdir runs` shows
seqtool runs beside other projects'. The same records as metrics.jsonl, one scalar per number, grouped
as train/..., valid/... and lr; written by rank 0 to MODEL_DIR/tensorboard and flushed at each validation.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from seqtool.errors import ConfigError

DIR = "tensorboard"


def check_available() -> None:
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("training.tensorboard needs the tensorboard package: pip install -e \".[tensorboard]\" "
                          "(or pip install tensorboard)")


class Events:
    def __init__(self, model_dir: Path, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a run resumed at its checkpoint's step hides what a killed run logged after that step (as
        # metrics.jsonl is trimmed); the checkpoint's own validation stays.
        self.writer = SummaryWriter(log_dir=str(model_dir / DIR), purge_step=first_step + 1 if first_step else None)

    def record(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag(key), value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def tag(key: str) -> str:
    """metrics.jsonl's train_loss, valid_bleu ... as TensorBoard groups them: train/loss, valid/bleu."""
    side, _, name = key.partition("_")
    return f"{side}/{name}" if side in ("train", "valid") and name else key
