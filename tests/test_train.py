"""The trainer: exact resume, clean stop on signals, and the schedules."""

from __future__ import annotations

import copy
import math
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from conftest import ROOT, read_metrics, run_cli, tiny_config, write_config
from seqtool.checkpoint import STATE_FILE, TrainState, load_state, save_state
from seqtool.config import validate
from seqtool.data import make_batch
from seqtool.device import Precision
from seqtool.progress import Reporter
from seqtool.train import prepare, restore_rng, rng_states, run_training

SMALL = {"max_steps": 40, "valid_every": 20, "valid_max_sentences": 30, "batch_tokens": 600}


# The dev BLEU of 40 steps stalls (at 0), so the plateau schedule halves the rate after a first validation.
SCHEDULES = {"constant": {}, "inverse_sqrt": {"schedule": "inverse_sqrt", "warmup_steps": 15},
             "plateau": {"schedule": "plateau", "plateau_patience": 0, "valid_every": 5}}


def _legacy(path):
    """Rewrite a training state as a seqtool before saved schedules wrote it: the plateau's record in the
    progress record, no schedule state."""
    state = load_state(path)
    plateau = state.schedule["state"]
    state.progress.update(lr_scale=plateau["_last_lr"][0] / state.schedule["settings"]["lr"],
                          plateau_best=plateau["best"], plateau_bad=plateau["num_bad_epochs"])
    save_state(path, replace(state, schedule={}))


@pytest.mark.parametrize("schedule", [*SCHEDULES, "legacy plateau"])
def test_resumed_run_matches_uninterrupted_run_bitwise(tmp_path, schedule):
    training = {**SMALL, **SCHEDULES[schedule.removeprefix("legacy ")]}
    straight = validate(tiny_config(tmp_path / "a", training=training))
    run_training(straight, quiet=True)
    first_half = validate(tiny_config(tmp_path / "b", training={**training, "max_steps": 20}))
    run_training(first_half, quiet=True)
    if schedule.startswith("legacy"):
        _legacy(tmp_path / "b" / STATE_FILE)
    second_half = validate(tiny_config(tmp_path / "b", training=training))
    run_training(second_half, resume=True, quiet=True)
    a, b = load_state(tmp_path / "a" / STATE_FILE), load_state(tmp_path / "b" / STATE_FILE)
    assert a.progress["step"] == b.progress["step"] == 40
    for (name, wa), (_, wb) in zip(a.bundle.model.state_dict().items(), b.bundle.model.state_dict().items()):
        assert torch.equal(wa, wb), name
    rates = [r["lr"] for r in read_metrics(tmp_path / "a")]
    assert [r["lr"] for r in read_metrics(tmp_path / "b")] == rates
    assert len(rates) == 40 // training["valid_every"]
    if "plateau" in schedule:
        assert rates[-1] < rates[0]  # it did scale down, and the resumed run continued the same way


def test_batch_sentences_gives_the_trainer_batches_of_that_many_sentences(tmp_path):
    cfg = validate(tiny_config(tmp_path / "m", training={**SMALL, "batch_sentences": 7}))
    trainer = prepare(cfg, Reporter(quiet=True), False)
    batches, count = trainer.train.epoch(cfg.training.batch_tokens, 0, cfg.training.batch_sentences)
    sizes = sorted(len(b) for b in batches)
    assert count == len(sizes) and sizes[1:] == [7] * (len(sizes) - 1) and sum(sizes) == len(trainer.train)


def _scaled_run(model_dir, max_steps: int, resume: bool = False):
    """Train with loss scaling (fp16's GradScaler; torch has one on the CPU too, in fp32) up to max_steps."""
    scaled = Precision(torch.device("cpu"), scaled=True)
    cfg = validate(tiny_config(model_dir, training={**SMALL, "max_steps": max_steps}))
    trainer = prepare(cfg, Reporter(quiet=True), resume, precision=scaled)
    assert trainer.scaler.is_enabled()
    trainer.run()
    return trainer


def test_resume_restores_the_gradient_scaler(tmp_path):
    """The loss scale and its growth tracker continue where they stopped, as the weights do."""
    straight = _scaled_run(tmp_path / "a", 40)
    _scaled_run(tmp_path / "b", 20)
    resumed = _scaled_run(tmp_path / "b", 40, resume=True)
    assert straight.scaler.state_dict() == resumed.scaler.state_dict()
    assert straight.scaler.state_dict()["_growth_tracker"] == 40  # 20 if the tracker restarted at the resume
    assert load_state(tmp_path / "b" / STATE_FILE).scaler == straight.scaler.state_dict()
    for (name, wa), (_, wb) in zip(straight.bundle.model.state_dict().items(),
                                   resumed.bundle.model.state_dict().items()):
        assert torch.equal(wa, wb), name


def test_cuda_generator_state_is_saved_and_restored(tmp_path, monkeypatch):
    """Without a GPU here, a fake CUDA generator stands in: its state goes into the file and back."""
    fake = {"state": torch.arange(16, dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": fake["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": fake.update(state=state.clone()))
    cuda = torch.device("cuda")
    run = _scaled_run(tmp_path / "m", 3)
    path = tmp_path / "state.safetensors"
    save_state(path, TrainState(run.bundle, run.optimizer.state_dict()["state"], {"step": 3}, rng_states(cuda)))
    fake["state"] = torch.zeros(16, dtype=torch.uint8)
    loaded = load_state(path)
    assert restore_rng(loaded.rng, cuda) and torch.equal(fake["state"], torch.arange(16, dtype=torch.uint8))
    assert not restore_rng(rng_states(torch.device("cpu")), cuda)  # a CPU run's state on a GPU: said, not hidden


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_resumed_fp16_gpu_run_matches_uninterrupted_run(tmp_path):
    gpu = {**SMALL, "device": "cuda", "precision": "fp16"}
    run_training(validate(tiny_config(tmp_path / "a", training=gpu)), quiet=True)
    run_training(validate(tiny_config(tmp_path / "b", training={**gpu, "max_steps": 20})), quiet=True)
    run_training(validate(tiny_config(tmp_path / "b", training=gpu)), resume=True, quiet=True)
    a, b = load_state(tmp_path / "a" / STATE_FILE), load_state(tmp_path / "b" / STATE_FILE)
    assert a.scaler == b.scaler and torch.equal(a.rng["cuda"], b.rng["cuda"])
    for (name, wa), (_, wb) in zip(a.bundle.model.state_dict().items(), b.bundle.model.state_dict().items()):
        assert torch.equal(wa, wb), name


def test_refuses_to_overwrite_a_run_and_resume_needs_a_run(tmp_path):
    cfg = tiny_config(tmp_path / "m", training={**SMALL, "max_steps": 5, "valid_every": 5})
    path = write_config(tmp_path / "c.yaml", cfg)
    run_cli("train", "-c", str(path), "-q", check=True)
    again = run_cli("train", "-c", str(path), "-q")
    assert again.returncode == 1 and "already holds a run" in again.stderr
    other = write_config(tmp_path / "d.yaml", tiny_config(tmp_path / "none", training=SMALL))
    proc = run_cli("train", "-c", str(other), "--resume")
    assert proc.returncode == 1 and "nothing to resume" in proc.stderr
    # Stopped between the first checkpoint's model file and its training state: --resume starts afresh.
    (tmp_path / "m" / STATE_FILE).unlink()
    assert run_cli("train", "-c", str(path), "-q").returncode == 1  # still a run: not overwritten unasked
    fresh = run_cli("train", "-c", str(path), "--resume")
    assert fresh.returncode == 0, fresh.stderr
    assert "holds a model but no training state" in fresh.stderr and "resuming at" not in fresh.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "m")] == [5]  # the lost run's record went, not doubled
    assert (tmp_path / "m" / STATE_FILE).exists()
    changed = run_cli("train", "-c", str(path), "--resume", "--set", "model.hidden_size=48")
    assert changed.returncode == 2 and "model section differs" in changed.stderr
    faster = run_cli("train", "-c", str(path), "--resume", "--set", "training.lr=0.01")
    assert faster.returncode == 2 and "--resume: training.lr differ(s) from the run in" in faster.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_resumable_checkpoint_and_exits_zero(tmp_path, sig):
    cfg = tiny_config(tmp_path / "m", training={**SMALL, "max_steps": 100000, "valid_every": 10})
    path = write_config(tmp_path / "c.yaml", cfg)
    proc = subprocess.Popen([sys.executable, "-m", "seqtool", "train", "-c", str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "m" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"stopped by {sig.name}" in err and "Traceback" not in err
    progress = load_state(tmp_path / "m" / STATE_FILE).progress
    assert progress["step"] >= 20
    resumed = run_cli("train", "-c", str(path), "--resume", "--set", f"training.max_steps={progress['step'] + 5}")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {progress['step']}" in resumed.stderr


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nan_loss_is_reported_with_its_step(tmp_path, monkeypatch, policy, capsys):
    import seqtool.train as train_module

    real = train_module.batch_loss
    calls = {"n": 0}

    def sometimes_nan(model, batch, smoothing, precision=train_module.FP32_CPU):
        calls["n"] += 1
        loss = real(model, batch, smoothing, precision)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(train_module, "batch_loss", sometimes_nan)
    cfg = validate(tiny_config(tmp_path / "m", training={**SMALL, "max_steps": 6, "valid_every": 6, "on_nan": policy}))
    if policy == "stop":
        with pytest.raises(train_module.SeqtoolError, match=r"step 3: loss is nan"):
            run_training(cfg)
    else:
        trainer = run_training(cfg)
        assert trainer.progress.step == 6
        assert "step 3: loss is nan; batch skipped" in capsys.readouterr().err
        assert all(torch.isfinite(p).all() for p in trainer.bundle.model.parameters())


def test_keep_last_and_average(tmp_path):
    cfg = tiny_config(tmp_path / "m", training={**SMALL, "max_steps": 40, "valid_every": 10, "keep_last": 2})
    path = write_config(tmp_path / "c.yaml", cfg)
    run_cli("train", "-c", str(path), "-q", check=True)
    kept = sorted(p.name for p in (tmp_path / "m").glob("step*.safetensors"))
    assert kept == ["step00000030.safetensors", "step00000040.safetensors"]
    out = tmp_path / "avg.safetensors"
    run_cli("average", str(tmp_path / "m"), "-o", str(out), "--last", "2", check=True)
    from seqtool.checkpoint import load_model

    a, b, avg = (load_model(p) for p in (tmp_path / "m" / kept[0], tmp_path / "m" / kept[1], out))
    for (name, wa), wb, wavg in zip(a.model.state_dict().items(), b.model.state_dict().values(),
                                    avg.model.state_dict().values()):
        torch.testing.assert_close(wavg, (wa + wb) / 2, msg=name)
    assert len(avg.info["averaged"]) == 2
    none = run_cli("average", str(tmp_path), "-o", str(out))
    assert none.returncode == 1 and "keep_last" in none.stderr


def test_keep_best_by_rouge_keeps_the_highest_dev_rouge(tmp_path):
    cfg = validate(tiny_config(tmp_path / "m", training={**SMALL, "keep_best_by": "rouge"}))
    trainer = run_training(cfg, quiet=True)
    from seqtool.plot import read_metrics

    rows = read_metrics(tmp_path / "m" / "metrics.jsonl")
    assert len(rows) == 2 and all(0 <= r["valid_rouge"] <= 100 for r in rows)
    # rouge picks by the mean of its three scores; each is logged too, and valid_metrics' BLEU beside them
    for r in rows:
        assert r["valid_rouge"] == pytest.approx((r["valid_rouge1"] + r["valid_rouge2"] + r["valid_rougeL"]) / 3,
                                                 abs=0.01)
        assert "valid_bleu" in r
    best = max(rows, key=lambda r: r["valid_rouge"])
    assert (trainer.progress.best, trainer.progress.best_step) == (best["valid_rouge"], best["step"])


def test_validation_scores_only_what_the_config_asks(tmp_path):
    """valid_metrics chooses the logged scores (chrf picks the model here); none at all skips the dev decode."""
    from seqtool.plot import read_metrics

    cfg = validate(tiny_config(tmp_path / "c", training={**SMALL, "valid_metrics": ["chrf"], "keep_best_by": "chrf"}))
    trainer = run_training(cfg, quiet=True)
    rows = read_metrics(tmp_path / "c")
    assert all(set(r) >= {"valid_loss", "valid_chrf"} and "valid_bleu" not in r for r in rows)
    best = max(rows, key=lambda r: r["valid_chrf"])
    assert (trainer.progress.best, trainer.progress.best_step) == (best["valid_chrf"], best["step"])
    cfg = validate(tiny_config(tmp_path / "l", training={**SMALL, "valid_metrics": [], "keep_best_by": "loss"}))
    run_training(cfg, quiet=True)
    assert all(not any(k.startswith("valid_") and k not in ("valid_loss", "valid_ppl") for k in r)
               for r in read_metrics(tmp_path / "l"))


def test_tensorboard_events_hold_the_metrics_records_and_a_resume_replaces_what_came_after(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(tmp_path / "m", training={"max_steps": 20, "valid_every": 10, "tensorboard": True,
                                                "valid_metrics": ["bleu", "chrf"]})
    config = str(write_config(tmp_path / "c.yaml", cfg))
    run_cli("train", "-c", config, "-q", check=True)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "m" / "tensorboard")) as late:  # as if a killed run logged past its checkpoint
        late.add_scalar("train/loss", 99.0, 25)
    run_cli("train", "-c", config, "--set", "training.max_steps=30", "--resume", "-q", check=True)
    events = EventAccumulator(str(tmp_path / "m" / "tensorboard"))
    events.Reload()
    records = read_metrics(tmp_path / "m")
    assert [r["step"] for r in records] == [10, 20, 30]
    tags = events.Tags()["scalars"]
    assert {"train/loss", "valid/loss", "valid/ppl", "valid/bleu", "valid/chrf", "lr", "train/sent_per_s"} <= set(tags)
    for key, tag in (("train_loss", "train/loss"), ("valid_bleu", "valid/bleu"), ("lr", "lr")):
        seen = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in seen] == [10, 20, 30]
        assert [v for _, v in seen] == pytest.approx([r[key] for r in records], rel=1e-6)


def test_tensorboard_without_the_package_is_one_line(tmp_path, monkeypatch):
    import importlib.util

    from seqtool.errors import ConfigError
    from seqtool.train import check_before_start

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "tensorboard" else real(name))
    with pytest.raises(ConfigError, match=r"pip install -e \"\.\[tensorboard\]\""):
        check_before_start(validate(tiny_config(tmp_path / "m", training={"tensorboard": True})), resume=False)


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_the_gradient_norm_logged_is_torchs_and_clipping_applies_only_when_set(tmp_path, clip):
    cfg = validate(tiny_config(tmp_path / "m", training={**SMALL, "clip_grad_norm": clip},
                               model={"dropout": 0.0}))
    trainer = prepare(cfg, Reporter(quiet=True), False)
    batches, _ = trainer.train.epoch(cfg.training.batch_tokens, 0)
    whole = next(batches)
    # The same gradients computed apart, on a copy of the model before the step.
    twin = copy.deepcopy(trainer.bundle.model)
    batch = make_batch(whole.src, whole.tgt)
    loss = twin(batch.src, batch.src_lens, batch.tgt_in, batch.tgt_out, label_smoothing=cfg.training.label_smoothing)
    (loss / batch.n_tgt_tokens).backward()
    want = math.sqrt(sum(float((q.grad.double() ** 2).sum()) for q in twin.parameters() if q.grad is not None))
    _, norm = trainer.train_step(whole)
    assert norm == pytest.approx(want, rel=1e-4) and norm > 0.5  # the tiny model's first gradients are larger
    # After the step the gradients are still there: unclipped with 0, scaled to the limit otherwise.
    after = math.sqrt(sum(float((q.grad.double() ** 2).sum()) for q in trainer.bundle.model.parameters()
                          if q.grad is not None))
    assert after == pytest.approx(want if clip == 0 else clip, rel=1e-4)


def test_metrics_records_hold_the_gradient_norms_and_the_clipped_share(tmp_path):
    cfg = tiny_config(tmp_path / "m", training={"max_steps": 20, "valid_every": 10, "clip_grad_norm": 1e-3})
    run_cli("train", "-c", str(write_config(tmp_path / "c.yaml", cfg)), "-q", check=True)
    records = read_metrics(tmp_path / "m")
    assert all(r["train_clipped"] == 1.0 and r["train_grad_norm_max"] >= r["train_grad_norm"] > 1e-3 for r in records)
