"""The training loop: text -> tokenizer -> batches -> loss -> step; validation, checkpoints, resume."""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from itertools import chain, islice
from pathlib import Path
from types import FrameType
from typing import Any, Optional, Protocol, Union, cast

import torch
from pydantic import TypeAdapter, ValidationError

from seqtool import __version__
from seqtool.checkpoint import (
    MODEL_FILE,
    STATE_FILE,
    STEP_FILE,
    ModelBundle,
    TrainState,
    append_line,
    atomic_write,
    load_state,
    save_model,
    save_state,
    state_progress,
    step_models,
)
from seqtool.config import Config, TrainingConfig, dump_config
from seqtool.data import Examples, encode_pairs, epoch_batches, make_batch, read_pairs
from seqtool.device import (
    FP32_CPU,
    Precision,
    keep_freed_memory,
    limit_kernel_caches,
    pick_device,
    pick_precision,
    release_freed_memory,
)
from seqtool.distributed import (
    Ranks,
    all_reduce,
    error_left,
    init_from_env,
    job_id,
    leave_error,
    lost_contact,
    main_does,
    my_share,
    rank_device,
    restarts,
    shutdown,
)
from seqtool.errors import ConfigError, DataError, ModelFileError, SeqtoolError
from seqtool.events import Events, check_available
from seqtool.metrics import logged
from seqtool.model.seq2seq import build_model
from seqtool.progress import Reporter
from seqtool.schedule import make_schedule
from seqtool.shards import ShardStream, read_shards, shard_pairs, side_lines
from seqtool.shortlist import MAX_PAIRS, build_shortlist
from seqtool.tokenizer import Tokenizer, train_tokenizer
from seqtool.translate import Translator


@dataclass
class Progress:
    """Where a run stands; saved with every checkpoint so --resume continues exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    elapsed_s: float = 0.0
    best: Optional[float] = None
    best_step: int = 0
    bad_validations: int = 0
    last_valid: dict = field(default_factory=dict)
    job: str = ""  # the launcher's id of the job that saved it (distributed.job_id): restarted workers resume their own

    @classmethod
    def restored(cls, saved: dict, path: Path) -> Progress:
        """The progress record of a training state, checked field by field (a damaged file is refused)."""
        try:
            progress = TypeAdapter(cls).validate_python(saved, strict=False)
        except ValidationError:
            progress = None
        counts = ("step", "epoch", "batch_in_epoch", "elapsed_s", "best_step", "bad_validations")
        if progress is None or min(getattr(progress, c) for c in counts) < 0:
            raise ModelFileError(f"{path}: damaged training state (progress record)")
        return progress


def rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """The random generators a run draws from: the CPU's, and on CUDA the device's (dropout masks there)."""
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng(states: dict[str, torch.Tensor], device: torch.device) -> bool:
    """Put back the generators `rng_states` saved; False when a CUDA run resumes a CPU run's state (its CUDA
    generator then starts from the seed, and dropout masks differ from an uninterrupted run)."""
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        try:
            torch.cuda.set_rng_state(states["cuda"], device)
        except RuntimeError:  # a state of another size: not this torch's CUDA generator
            raise ModelFileError("--resume: the saved CUDA generator state does not fit this GPU's generator") from None
    return device.type != "cuda" or "cuda" in states


def stop_reason(cfg: TrainingConfig, progress: Progress, signal: Optional[str] = None, stalled: bool = False) -> str:
    """The one place that says why training stops now, or '': a signal, then early stopping (`stalled`: the
    last validations did not improve), then the limits (max_steps, max_minutes, max_epochs)."""
    if signal:
        return f"stopped by {signal}"
    if stalled:
        return f"early stopping: no improvement in {cfg.patience} validations"
    if cfg.max_steps and progress.step >= cfg.max_steps:
        return f"reached training.max_steps={cfg.max_steps}"
    if cfg.max_minutes and progress.elapsed_s >= cfg.max_minutes * 60:
        return f"reached training.max_minutes={cfg.max_minutes:g}"
    if cfg.max_epochs and progress.epoch >= cfg.max_epochs:
        return f"reached training.max_epochs={cfg.max_epochs}"
    return ""


def _not_a_file(path: str) -> str:
    return f"{path} is a directory, not a file" if Path(path).is_dir() else f"file not found: {path}"


def check_data_paths(cfg: Config) -> None:
    """All missing or unset training paths in one error."""
    d = cfg.data
    problems = [f"data.{key} is not set" for key in ("train_src", "train_tgt") if getattr(d, key) is None]
    if not problems:
        assert d.train_src is not None and d.train_tgt is not None  # both are set: no problem above
        try:
            pairs = shard_pairs(d.train_src, d.train_tgt)
        except DataError as exc:
            problems.append(str(exc))
        else:
            problems += [f"data.train_{side}: {_not_a_file(p)}" for pair in pairs
                         for side, p in zip(("src", "tgt"), pair) if not Path(p).is_file()]
    for key in ("valid_src", "valid_tgt"):
        value = getattr(d, key)
        if value is not None and not Path(value).is_file():
            problems.append(f"data.{key}: {_not_a_file(value)}")
    if (d.valid_src is None) != (d.valid_tgt is None):
        problems.append("data.valid_src and data.valid_tgt must be given together")
    own = cfg.tokenizer.model
    for path in [own] if isinstance(own, str) else own or []:
        if not Path(path).is_file():
            problems.append(f"tokenizer.model: {_not_a_file(path)}")
            continue
        try:  # read now: a model seqtool cannot use is refused before the data are read
            Tokenizer.from_file(path)
        except ModelFileError as exc:
            problems.append(f"tokenizer.model: {exc}")
    if problems:
        raise ConfigError("; ".join(problems))


def build_tokenizers(cfg: Config, src_lines: Iterable[str], tgt_lines: Iterable[str]) -> tuple[Tokenizer, Tokenizer]:
    """The tokenizer.model files, or tokenizers trained on the lines (lists or streams from disk: sentencepiece
    samples at most tokenizer.max_sentences)."""
    own, word = cfg.tokenizer.model, cfg.tokenizer.type == "word"
    if isinstance(own, str):  # joint: one object for both sides, as a trained joint tokenizer is
        tok = Tokenizer.from_file(own, word)
        return tok, tok
    if own is not None:
        return Tokenizer.from_file(own[0], word), Tokenizer.from_file(own[1], word)
    if cfg.tokenizer.joint:
        tok = train_tokenizer(chain(src_lines, tgt_lines), cfg.tokenizer)
        return tok, tok
    return train_tokenizer(src_lines, cfg.tokenizer), train_tokenizer(tgt_lines, cfg.tokenizer)


def batch_loss(model, batch, label_smoothing: float, precision: Precision = FP32_CPU) -> torch.Tensor:
    """Summed token cross-entropy of a batch (padding ignored), the forward pass in `precision`."""
    return precision.forward(model, batch.src, batch.src_lens, batch.tgt_in, batch.tgt_out, label_smoothing)


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    # fused: one kernel over all parameters, 3x faster than the default per-tensor loop on the CPU, same numbers.
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True)


@torch.no_grad()
def validation_loss(model, examples: Examples, batch_tokens: int) -> tuple[float, float]:
    """-> (loss per target token, perplexity), without label smoothing."""
    total, tokens = 0.0, 0
    for idx in epoch_batches(examples, batch_tokens, seed=0):
        part = examples.subset(idx)
        batch = make_batch(part.src, part.tgt).to(model.device)
        total += batch_loss(model, batch, 0.0).item()
        tokens += batch.n_tgt_tokens
    loss = total / max(tokens, 1)
    return loss, math.exp(min(loss, 50.0))


class StopFlag:
    """SIGINT / SIGTERM ask the loop to save and stop at the next step boundary."""

    def __init__(self) -> None:
        self.signal: Optional[str] = None
        self._old: dict[int, Union[Callable[[int, Optional[FrameType]], Any], int, None]] = {}  # previous handlers

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name
        signal.signal(signum, self._old[signum])  # a second signal acts as usual

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class TrainingData(Protocol):
    """Training pairs as each epoch's batches: in memory (data.Examples) or streamed from shards each epoch
    (shards.ShardStream); the trainer does not tell them apart."""

    @property
    def known_pairs(self) -> Optional[int]: ...  # pairs kept, once known (a stream's after its first epoch)

    def epoch(self, batch_tokens: int, seed: int, sentences: int = 0
              ) -> tuple[Iterator[Examples], Optional[int]]: ...  # the batches, and their number when known

    def finished_epoch(self) -> str: ...  # a log line on what the epoch read, or ""

    def pairs(self) -> Iterator[tuple[list[int], list[int]]]: ...  # one pass in a fixed order, for counting


@dataclass
class Trainer:
    cfg: Config
    bundle: ModelBundle
    train: TrainingData  # in memory, or streamed from disk each epoch (data.stream)
    valid: Optional[Examples]
    valid_src: list[str]
    valid_ref: list[str]
    reporter: Reporter
    progress: Progress = field(default_factory=Progress)
    ranks: Ranks = field(default_factory=Ranks)
    precision: Precision = FP32_CPU

    def __post_init__(self) -> None:
        self.dir = Path(self.cfg.training.model_dir)
        model = self.bundle.model.to(self.precision.device)
        self.optimizer = make_optimizer(model, self.cfg.training.lr)
        # Higher dev scores are better, except the loss (also the training loss, when there is no dev set).
        self.higher_is_better = self.cfg.training.keep_best_by != "loss" and self.valid is not None
        self.schedule = make_schedule(self.cfg.training, self.optimizer, self.higher_is_better)
        self.scaler = self.precision.scaler()
        # Several processes: DDP averages the gradients; the plain model still validates and is saved.
        gpu = [self.precision.device] if self.precision.device.type == "cuda" else None
        self.net = torch.nn.parallel.DistributedDataParallel(model, device_ids=gpu) if self.ranks.parallel else model
        self.events = Events(self.dir, self.progress.step) if self.cfg.training.tensorboard and self.ranks.main \
            else None  # rank 0 alone writes files

    def end_epoch(self) -> None:
        p = self.progress
        p.epoch += 1
        p.batch_in_epoch = 0
        report = self.train.finished_epoch()
        if report:
            self.reporter.log(f"epoch {p.epoch}: {report}")

    def _on_main(self, fn):
        """Validate / save on rank 0; every rank then continues with rank 0's progress and learning rate."""
        if not self.ranks.parallel:
            return fn()
        result, progress, schedule = main_does(lambda: (fn(), self.progress, self.schedule.state()), self.ranks)
        vars(self.progress).update(vars(progress))
        self.schedule.restore(schedule, "rank 0")
        return result

    # -- checkpoints ---------------------------------------------------------------------------
    def _info(self) -> dict:
        p = self.progress
        return {
            "seqtool_version": __version__, "step": p.step, "epoch": p.epoch, "elapsed_s": round(p.elapsed_s, 1),
            "train_pairs": self.train.known_pairs, "train_src": self.cfg.data.train_src,
            "train_tgt": self.cfg.data.train_tgt,
            "params": sum(t.numel() for t in self.bundle.model.parameters()),
            "precision": f"{self.precision.name} ({self.precision.why})",
            "best": {self.cfg.training.keep_best_by: p.best, "step": p.best_step}, "last_valid": p.last_valid,
        }

    def save_checkpoint(self, best: bool, validated: bool = True) -> None:
        self.bundle.info = self._info()
        if best or not (self.dir / MODEL_FILE).exists():
            save_model(self.dir / MODEL_FILE, self.bundle)
        keep = self.cfg.training.keep_last
        if keep and validated:
            save_model(self.dir / STEP_FILE.format(self.progress.step), self.bundle)
            for old in step_models(self.dir)[:-keep]:
                old.unlink()
        scaler = self.scaler.state_dict() if self.scaler.is_enabled() else {}
        save_state(self.dir / STATE_FILE, TrainState(self.bundle, self.optimizer.state_dict()["state"],
                                                     asdict(self.progress), rng_states(self.precision.device), scaler,
                                                     self.schedule.state()))

    # -- validation ----------------------------------------------------------------------------
    def validate(self, train_loss: float, sent_s: float, tok_s: float, gradients: Optional[dict] = None) -> bool:
        """Score the dev set, log a metrics line, keep the best model; True when it improved."""
        model, t = self.bundle.model, self.cfg.training
        model.eval()
        record = {"step": self.progress.step, "epoch": self.progress.epoch, "time_s": round(self.progress.elapsed_s, 1),
                  "lr": self.schedule.lr, "train_loss": round(train_loss, 4),
                  "train_sent_per_s": round(sent_s, 1), "train_tgt_tok_per_s": round(tok_s, 1), **(gradients or {})}
        if self.valid is not None:
            release_freed_memory()  # the training steps' free blocks, so the decoder's own need not stack on them
            loss, ppl = validation_loss(model, self.valid, t.batch_tokens)
            record.update(valid_loss=round(loss, 4), valid_ppl=round(ppl, 2))
            names = [*t.valid_metrics, *([t.keep_best_by] if t.keep_best_by != "loss" else [])]
            if names:  # the dev decode only when a score asks for it
                n = t.valid_max_sentences or len(self.valid_src)
                # Greedy over the whole vocabulary: the dev score measures the model, not the decoding shortcuts.
                decoding = self.cfg.decoding.model_copy(update={"beam_size": 1, "nbest": 1, "shortlist": 0})
                translator = Translator(model, self.bundle.src_tok, self.bundle.tgt_tok, decoding,
                                        self.cfg.data.truncate_src)
                hyps = [tr.text for tr in translator.translate(self.valid_src[:n])]
                record.update(logged(names, hyps, self.valid_ref[:n], self.valid_src[:n]))
            score = loss if t.keep_best_by == "loss" else record[f"valid_{t.keep_best_by}"]
        else:
            score = train_loss
        model.train()
        release_freed_memory()
        higher, p = self.higher_is_better, self.progress
        improved = math.isfinite(score) and (p.best is None or (score > p.best if higher else score < p.best))
        if improved:
            p.best, p.best_step, p.bad_validations = score, p.step, 0
        else:
            p.bad_validations += 1
        self.schedule.after_validation(score)
        p.last_valid = record
        append_line(self.dir / "metrics.jsonl", json.dumps(record))
        if self.events is not None:
            self.events.record(record)
        shown = {k: v for k, v in record.items() if k.startswith("valid_")}
        self.reporter.log(f"validation at step {p.step}: " + " ".join(f"{k}={v}" for k, v in shown.items())
                          + (" (best)" if improved else ""))
        self.save_checkpoint(best=improved)
        return improved

    # -- the loop ------------------------------------------------------------------------------
    def train_step(self, whole: Examples) -> tuple[Optional[float], Optional[float]]:
        """One update on a global batch: this rank's share forward and backward, the NaN policy, clipping and the
        optimizer step -> (the loss summed over all ranks, the global gradient norm before clipping), (None, None)
        when the batch was skipped."""
        t, p = self.cfg.training, self.progress
        mine, real = whole, True
        if self.ranks.parallel:
            share, real = my_share(range(len(whole)), self.ranks)
            mine = whole.subset(share)
        batch = make_batch(mine.src, mine.tgt).to(self.precision.device)
        loss = batch_loss(self.net, batch, t.label_smoothing, self.precision)
        if not real:  # a stand-in sentence: takes part in the gradient exchange, adds nothing
            loss = loss.nan_to_num(0.0, 0.0, 0.0) * 0.0
        self.optimizer.zero_grad(set_to_none=True)
        local = loss.item()
        total, nonfinite = all_reduce([local if math.isfinite(local) else 0.0, float(not math.isfinite(local))],
                                      self.ranks)
        if nonfinite:
            shown = local if not math.isfinite(local) else float("nan")
            if t.on_nan == "stop":
                raise SeqtoolError(f"step {p.step + 1}: loss is {shown}; stopped (training.on_nan=stop); "
                                   f"the checkpoints in {self.dir} are from before it")
            self.reporter.log(f"step {p.step + 1}: loss is {shown}; batch skipped (training.on_nan=skip)")
            return None, None
        # DDP averages over ranks: scaling by world makes it the global per-token mean.
        self.scaler.scale(loss / target_tokens(whole) * self.ranks.world).backward()
        # The norm of the true gradients (fp16 scales them), all ranks' after DDP's exchange: logged, and clipped
        # to training.clip_grad_norm unless that is 0.
        self.scaler.unscale_(self.optimizer)
        params = list(self.bundle.model.parameters())
        norm = torch.nn.utils.get_total_norm([q.grad for q in params if q.grad is not None])
        if t.clip_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, t.clip_grad_norm, norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return total, norm.item()

    def run(self) -> str:
        """Train until a limit, early stopping or a signal; returns why it stopped."""
        t, p = self.cfg.training, self.progress
        self.bundle.model.train()
        start = time.monotonic() - p.elapsed_s
        window, last_rates = Window(), (0.0, 0.0)
        first_step = p.step
        with StopFlag() as stop:
            reason = stop_reason(t, p)  # a finished run resumed with the same limits does nothing
            while not reason:
                batches, n_batches = self.train.epoch(t.batch_tokens, t.seed + p.epoch, t.batch_sentences)
                limits = [n for n in (t.max_steps, t.max_epochs * (n_batches or 0)) if n]
                self.reporter.set_total(min(limits) if limits else None)
                for whole in islice(batches, p.batch_in_epoch, None):  # resuming mid-epoch skips what was done
                    window.add(*self.train_step(whole), target_tokens(whole), len(whole), t.clip_grad_norm)
                    p.step += 1
                    p.batch_in_epoch += 1
                    self.schedule.after_step()
                    # The slowest rank's clock and any rank's signal decide for all, so all stop together.
                    signalled, p.elapsed_s = all_reduce([float(bool(stop.signal)), time.monotonic() - start],
                                                        self.ranks, "max")
                    if signalled and not stop.signal:
                        stop.signal = "a signal to another rank"
                    sent_s, tok_s = window.rates()
                    self.reporter.step(p.step, f"loss {window.mean_loss():.3f} {tok_s:,.0f} tok/s "
                                               f"lr {self.schedule.lr:.2e}")
                    stalled = False
                    if p.step % t.valid_every == 0:
                        last_rates = (sent_s, tok_s)
                        improved = self._on_main(partial(self.validate, window.mean_loss(), sent_s, tok_s,
                                                         window.gradients()))
                        window = Window()
                        p.elapsed_s = time.monotonic() - start  # validation time counts against max_minutes
                        stalled = not improved and t.patience > 0 and p.bad_validations >= t.patience
                    reason = stop_reason(t, p, stop.signal, stalled)
                    if reason:
                        break
                else:
                    self.end_epoch()
                    reason = stop_reason(t, p, stop.signal)
        if stop.signal:
            self._on_main(lambda: self.save_checkpoint(best=False, validated=False))
        elif p.step % t.valid_every != 0 and p.step > first_step:
            rates = window.rates() if window.tokens else last_rates
            self._on_main(lambda: self.validate(window.mean_loss(), *rates, window.gradients()))
        return reason


def target_tokens(batch: Examples) -> int:
    """Target tokens of a (global) batch, EOS included: what the loss is a mean over. Every rank knows the whole
    batch, so the global count needs no message."""
    return sum(len(y) + 1 for y in batch.tgt)


@dataclass
class Window:
    """Loss and throughput since the last validation."""

    loss: float = 0.0  # summed over the steps that were not skipped
    tokens: int = 0
    sents: int = 0
    t0: float = field(default_factory=time.monotonic)
    norms: list[float] = field(default_factory=list)  # each step's gradient norm before clipping
    clipped: int = 0  # steps whose gradients clipping scaled down

    def add(self, loss: Optional[float], grad_norm: Optional[float], tokens: int, sents: int, clip: float) -> None:
        self.loss += 0.0 if loss is None else loss
        self.tokens += tokens
        self.sents += sents
        if grad_norm is not None:
            self.norms.append(grad_norm)
            self.clipped += int(clip > 0 and grad_norm > clip)

    def gradients(self) -> dict[str, float]:
        """The window's gradient norms before clipping (mean and max; NaN or inf stay what they were), and the
        share of its steps that clipping changed."""
        if not self.norms:
            return {}
        n = len(self.norms)
        return {"train_grad_norm": round(sum(self.norms) / n, 4), "train_grad_norm_max": round(max(self.norms), 4),
                "train_clipped": round(self.clipped / n, 4)}

    def mean_loss(self) -> float:
        return self.loss / max(self.tokens, 1)

    def rates(self) -> tuple[float, float]:
        """(sentences/s, target tokens/s)."""
        dt = max(time.monotonic() - self.t0, 1e-9)
        return self.sents / dt, self.tokens / dt


def check_before_start(cfg: Config, resume: bool) -> None:
    """The data files exist, and the model dir holds a run to resume, or none to overwrite."""
    check_data_paths(cfg)
    if cfg.training.tensorboard:
        check_available()
    model_dir = Path(cfg.training.model_dir)
    state_path = model_dir / STATE_FILE
    if resume and not state_path.exists() and not (model_dir / MODEL_FILE).exists():
        raise SeqtoolError(f"nothing to resume: {state_path} does not exist")
    if not resume and (state_path.exists() or (model_dir / MODEL_FILE).exists()):
        raise SeqtoolError(f"{model_dir} already holds a run; use --resume, or choose another training.model_dir")


def make_model_dir(model_dir: Path) -> None:
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SeqtoolError(f"cannot create the model dir {model_dir}: {exc.strerror}") from None


def tidy_after_crash(model_dir: Path, step: int) -> None:
    """Before resuming at `step`: remove temporary files a killed run left, and metrics lines after `step`.

    A run killed between logging a validation and saving its state redoes those steps; without the
    trim, metrics.jsonl would hold two records for them.
    """
    for stale in model_dir.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    path = model_dir / "metrics.jsonl"
    if path.exists():
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if _record_step(line) <= step]
        if len(kept) != len(lines):
            atomic_write(path, "".join(kept).encode("utf-8"))


def _record_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf  # a torn or foreign line goes too


def prepare(cfg: Config, reporter: Reporter, resume: bool, ranks: Ranks = Ranks(),
            precision: Precision = FP32_CPU) -> Trainer:
    """Read data, build or restore tokenizers and model, and return a Trainer ready to run.

    With several ranks, rank 0 alone touches the model dir and trains the tokenizer; all ranks
    read the data and build the same model from the same seed.
    """
    check_before_start(cfg, resume)
    model_dir = Path(cfg.training.model_dir)
    state_path = model_dir / STATE_FILE
    progress = Progress()
    if resume and not state_path.exists():
        # The first checkpoint writes the model file, then the state: a run stopped between the two has nothing to
        # continue from, and refusing both a fresh start (the dir holds a run) and a resume would leave it stuck.
        reporter.log(f"{model_dir} holds a model but no training state (the run stopped while saving its first "
                     f"checkpoint): starting afresh")
        resume = False
        main_does(lambda: tidy_after_crash(model_dir, 0), ranks)
    if resume:
        saved = load_state(state_path)
        bundle = saved.bundle
        for section in ("data", "tokenizer", "model"):
            if getattr(bundle.config, section) != getattr(cfg, section):
                raise ConfigError(f"--resume: the {section} section differs from the run in {model_dir}")
        bundle.config = cfg
        progress = Progress.restored(saved.progress, state_path)
        bundle.model.train()
        main_does(lambda: tidy_after_crash(model_dir, progress.step), ranks)
    else:
        main_does(lambda: make_model_dir(model_dir), ranks)
    torch.manual_seed(cfg.training.seed)
    if cfg.training.threads:
        torch.set_num_threads(cfg.training.threads)
    keep_freed_memory()  # each step reuses the last one's blocks instead of faulting in fresh pages

    d = cfg.data
    assert d.train_src is not None and d.train_tgt is not None  # check_before_start checked them
    shards = shard_pairs(d.train_src, d.train_tgt)
    # In memory, the files are read (and checked) before anything else; streamed, they are read when used.
    src_lines, tgt_lines = (side_lines(shards, 0), side_lines(shards, 1)) if d.stream else read_shards(shards)
    if not resume:
        own = cfg.tokenizer.model
        reporter.log(f"tokenizer from {own if isinstance(own, str) else ' and '.join(own)}" if own else
                     f"training {cfg.tokenizer.type} tokenizer ({'joint' if cfg.tokenizer.joint else 'separate'}, "
                     f"up to {cfg.tokenizer.vocab_size} pieces)")
        blobs = main_does(lambda: tuple(t.model_bytes for t in build_tokenizers(cfg, src_lines, tgt_lines)), ranks)
        word = cfg.tokenizer.type == "word"
        src_tok = Tokenizer.from_bytes(blobs[0], word)
        tgt_tok = src_tok if cfg.tokenizer.joint else Tokenizer.from_bytes(blobs[1], word)
        model = build_model(cfg.model, src_tok.vocab_size, tgt_tok.vocab_size)
        bundle = ModelBundle(model, cfg, src_tok, tgt_tok, {})
    train: Union[Examples, ShardStream]
    if d.stream:
        train = ShardStream(shards, bundle.src_tok, bundle.tgt_tok, d.max_src_len, d.max_tgt_len, d.truncate_src,
                            d.shuffle_buffer)
        reporter.log(f"streaming training pairs from {len(shards)} file pair(s), shuffle buffer {d.shuffle_buffer:,}")
    else:
        # not streamed: read_shards read both sides into lists
        train = encode_pairs(cast(list[str], src_lines), cast(list[str], tgt_lines), bundle.src_tok, bundle.tgt_tok,
                             d.max_src_len, d.max_tgt_len, d.truncate_src)
        del src_lines, tgt_lines
        reporter.log(f"{len(train)} training pairs ({train.dropped_long} over the length limits and "
                     f"{train.dropped_empty} with an empty side dropped)")
        if not len(train):
            raise SeqtoolError("no training pairs left after filtering; check data.max_src_len / max_tgt_len")
    if not resume:
        start = time.time()
        bundle.shortlist = build_shortlist(train.pairs(), bundle.src_tok.vocab_size, bundle.tgt_tok.vocab_size)
        reporter.log(f"shortlist table (decoding.shortlist) from up to {MAX_PAIRS:,} pairs in "
                     f"{time.time() - start:.1f} s")
        release_freed_memory()
    valid_src: list[str]
    valid_ref: list[str]
    valid, valid_src, valid_ref = None, [], []
    if cfg.data.valid_src:
        assert cfg.data.valid_tgt is not None  # check_before_start: given together
        valid_src, valid_ref = read_pairs(cfg.data.valid_src, cfg.data.valid_tgt)
        valid = encode_pairs(valid_src, valid_ref, bundle.src_tok, bundle.tgt_tok, 1 << 30, 1 << 30,
                             cfg.data.truncate_src)
    main_does(lambda: atomic_write(model_dir / "config.yaml", dump_config(cfg).encode("utf-8")), ranks)
    params = sum(t.numel() for t in bundle.model.parameters())
    reporter.log(f"model: {cfg.model.cell} {cfg.model.context} (c = {cfg.model.c_form}), {params:,} "
                 f"parameters, vocab {bundle.src_tok.vocab_size}/{bundle.tgt_tok.vocab_size}")
    trainer = Trainer(cfg, bundle, train, valid, valid_src, valid_ref, reporter, progress, ranks, precision)
    if resume:
        # The parameter groups (lr, betas, ...) come from the config: only the per-parameter slots are saved.
        trainer.optimizer.load_state_dict({"state": saved.optimizer,
                                           "param_groups": trainer.optimizer.state_dict()["param_groups"]})
        if saved.schedule:
            trainer.schedule.restore(saved.schedule, str(state_path))
        else:  # saved by an earlier seqtool, which kept the plateau's record in the progress record
            trainer.schedule.restore_legacy(saved.progress)
        if not restore_rng(saved.rng, precision.device):
            reporter.log("the saved state has no CUDA generator (it trained on the CPU, or an older seqtool saved it): "
                         "dropout continues from a fresh seed")
        if trainer.scaler.is_enabled():
            if saved.scaler:
                trainer.scaler.load_state_dict(saved.scaler)
            else:
                reporter.log("the saved state has no loss scale (it trained without fp16, or an older seqtool saved "
                             "it): fp16 loss scaling starts afresh")
        reporter.log(f"resuming at step {progress.step} (epoch {progress.epoch})")
    progress.job = job_id()
    if ranks.parallel:  # the same weights everywhere (DDP checked), but different dropout masks per rank
        torch.manual_seed(cfg.training.seed + 1000 * ranks.rank + progress.step)
    return trainer


def _prepared(cfg: Config, reporter: Reporter, resume: bool, ranks: Ranks, precision: Precision) -> Trainer:
    """`prepare`; a model dir it made is removed again if it fails before writing anything there (a tokenizer
    that cannot train, data that filter to nothing): no empty dir is left to puzzle over."""
    model_dir = Path(cfg.training.model_dir)
    existed = model_dir.exists()
    try:
        return prepare(cfg, reporter, resume, ranks, precision)
    except BaseException:
        if not existed and ranks.main:
            try:
                model_dir.rmdir()  # only if still empty
            except OSError:
                pass
        raise


def restarted_job_resumes(cfg: Config) -> bool:
    """torchrun started this job's workers again after one died (--max-restarts): they resume from the checkpoint
    the job saved, if it saved one (else they start afresh). A state another job saved is refused as usual."""
    state_path = Path(cfg.training.model_dir) / STATE_FILE
    if not restarts()[0] or not state_path.exists():
        return False
    if not job_id():
        raise SeqtoolError(f"the launcher restarted the workers, but under torchrun's default --rdzv-id they cannot "
                           f"tell this job's checkpoint in {state_path.parent} from an earlier job's: give each job "
                           f"its own --rdzv-id (or use --standalone); `seqtool train --resume` continues the run")
    return state_progress(state_path).get("job") == job_id()


def lost_rank(cfg: Config, step: Optional[int]) -> SeqtoolError:
    """What a rank says when another one is gone without a word (killed, out of memory, its machine lost) while
    this one was at `step` (None: before training began)."""
    state_path = Path(cfg.training.model_dir) / STATE_FILE
    saved = state_progress(state_path).get("step") if state_path.exists() else None
    where = f"the checkpoint at step {saved}" if saved is not None else "the start (no checkpoint yet)"
    done, allowed = restarts()
    then = (f"the launcher restarts the workers (restart {done + 1} of {allowed}), which resume from {where}"
            if done < allowed else f"`seqtool train --resume` continues from {where}")
    when = f"after step {step}" if step is not None else "before training began"
    return SeqtoolError(f"lost contact with another rank of this job {when} (killed, out of memory, or its machine "
                        f"went away); {then}")


def run_training(cfg: Config, resume: bool = False, quiet: bool = False, verbose: bool = False) -> Trainer:
    """Train on one process, or on each of the ranks torchrun started (then rank 0 alone reports)."""
    device = pick_device(cfg.training.device)
    precision = pick_precision(device, cfg.training.precision)  # before any process starts: errors once
    if precision.cast_weights:
        limit_kernel_caches()  # bf16 on the CPU: a kernel per matrix shape; before the first product
    ranks = init_from_env(cuda=device.type == "cuda")
    precision = replace(precision, device=rank_device(device, ranks))
    reporter = Reporter(quiet=quiet or not ranks.main, verbose=verbose)
    if verbose:
        reporter.log("config:\n" + dump_config(cfg).rstrip())
    if ranks.parallel:
        reporter.log(f"data-parallel training on {ranks.world} processes (torch.distributed, "
                     f"{'nccl' if device.type == 'cuda' else 'gloo'})")
    trainer: Optional[Trainer] = None
    try:
        if not resume and restarted_job_resumes(cfg):
            resume = True
            reporter.log(f"the launcher restarted the workers (restart {restarts()[0]} of {restarts()[1]}) after one "
                         f"stopped: resuming from the job's last checkpoint")
        trainer = _prepared(cfg, reporter, resume, ranks, precision)
        reporter.log(f"training on {precision.device} in {precision.name} ({precision.why})")
        reason = trainer.run()
    except SeqtoolError as exc:
        leave_error(exc, ranks)
        raise
    except Exception as exc:
        if not lost_contact(exc, ranks):
            raise
        raise error_left(ranks) or lost_rank(cfg, trainer.progress.step if trainer else None) from None
    finally:
        reporter.close()
        if trainer is not None and trainer.events is not None:
            trainer.events.close()  # a rank ends without the interpreter's teardown (cli._leave_as_rank)
        shutdown(ranks)
    p = trainer.progress
    reporter.log(f"{reason}; step {p.step}, best {cfg.training.keep_best_by} {p.best} at step {p.best_step}; "
                 f"model in {Path(cfg.training.model_dir) / MODEL_FILE}")
    return trainer
