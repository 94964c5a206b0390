"""seqtool and OpenNMT-py 3.5.1 on one CUDA GPU, in one run: GEMM peaks, training, decoding, BLEU, one table.

Issue 23's "the same table on the GPU". On a machine with a CUDA GPU this times matrix products on it (fp32
with TF32 off and on, bf16; 8192^3 and the Multi30k model's shapes: the training output layer, the beam-5
output layer, a decoder step), trains configs/multi30k_deen.yaml with training.precision fp32 and auto (bf16
autocast on a GPU with bf16) for MINUTES each, trains OpenNMT-py with ../shared/peers' model and settings
(their harness config plus gpu_ranks [0]) for MINUTES, decodes test2016 greedy and beam 5 at batch 64 with
each model, and prints a markdown table with the ratios seqtool / OpenNMT-py and the share of the GEMM peaks
that training reaches (FLOPs per sentence counted as bench/flop_limit.py does). Training rates are taken as
bench/compare_peers.py takes them (seqtool: metrics.jsonl, windows between validations after the first;
OpenNMT-py: its step log, as the peers' harness parses it); BLEU is sacrebleu 13a on detokenized output.

Every phase is independent: one that fails is logged and the run goes on; each command has a time limit, and
phases that no longer fit in --deadline seconds are skipped, so the run ends in time. Results go to OUT as
they come: results.jsonl (one JSON line a measurement), table.md (rewritten after each phase) and logs.tar.gz
(the commands' logs and outputs); models and logs are written under --work.

    PYTHONUNBUFFERED=1 python bench/gpu_table.py --minutes 2 --deadline 480 --out runs/gpu_table
    python bench/gpu_table.py --phases gemm --out runs/gpu_gemm                 # the GEMM peaks alone
    python bench/gpu_table.py --table runs/gpu_gemm/results.jsonl runs/gpu_table/results.jsonl   # table again
    python bench/gpu_table.py --device cpu --minutes 0.2 --peak-size 2048 --skip onmt   # a CPU rehearsal

OpenNMT-py runs as `python -m onmt.bin.train` of the running interpreter (pip install --no-deps OpenNMT-py==3.5.1
and configargparse, pyonmttok, rapidfuzz, pyahocorasick; --stubs DIR puts a folder with empty spacy and
fasttext packages on its path: it imports them only for transforms not used here). --shared is a copy of
../shared (data/multi30k, peers/lib); --peers-home holds the peers' prepared data (peers/lib/prep_data.py).
--tree runs `python -m seqtool` of another checkout (e.g. a `git archive` of a commit).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import traceback
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import compare_peers
import sacrebleu
import torch
from compare_peers import ROOT, VARIANTS, measure, seqtool_decode, seqtool_train

# (label, m, k, n): the products the Multi30k model spends its time in (batch_tokens 1,200: about 1,000 target
# tokens a batch; 64 sentences x beam 5; a decoder step's GRU gates over embedding + context + state).
MODEL_SHAPES = (("training output layer", 1024, 512, 8000), ("beam-5 output layer", 320, 512, 8000),
                ("decoder step", 66, 1280, 1536))
GEMM_KINDS = {"fp32": "fp32, TF32 off", "tf32": "fp32, TF32 on", "bf16": "bf16"}
RUNS = ("fp32:training.precision=fp32", "auto:training.precision=auto")


class Bench:
    """The run's state: where things go, the deadline, and the rows so far (written as they come)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.rows, self.t0 = args, [], time.monotonic()
        self.out, self.work = args.out, args.work
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.args.deadline - (time.monotonic() - self.t0)

    def log(self, text: str) -> None:
        print(f"[gpu_table {time.monotonic() - self.t0:6.1f}s] {text}", file=sys.stderr, flush=True)

    def keep(self, row: dict) -> dict:
        self.rows.append(row)
        with open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self.log(json.dumps(row))
        (self.out / "table.md").write_text(table(self.rows) + "\n")
        return row

    def phase(self, name: str, need_s: float, fn: Callable[[float], Optional[dict]]) -> Optional[dict]:
        """Run fn(seconds it may take) unless fewer than need_s seconds are left; a failure is kept as a row. The
        commands a phase runs have their own limits; a phase still running 5 s before the deadline (work in this
        process) is left behind in its thread, and the run goes on."""
        left = self.left()
        if left < need_s:
            self.keep({"kind": "skipped", "phase": name, "need_s": round(need_s), "left_s": round(left)})
            return None
        self.log(f"{name}: start ({left:.0f} s left)")
        result: dict = {}

        def body() -> None:
            try:
                result["row"] = fn(left)
            except Exception as e:  # a phase's failure is a result; the run goes on
                result["error"] = {"error": repr(e)[-800:], "trace": traceback.format_exc()[-1500:]}

        worker = threading.Thread(target=body, name=name, daemon=True)
        worker.start()
        worker.join(max(left - 5, 1))
        if worker.is_alive():
            result["error"] = {"error": f"still running after {left - 5:.0f} s, left behind"}
        if "error" in result:
            self.keep({"kind": "error", "phase": name, **result["error"]})
        return result.get("row")


def gpu_memory_used() -> Optional[Callable[[], int]]:
    """A reader of GPU 0's memory in use, MiB (NVML through pynvml, else nvidia-smi), or None where neither is."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used) // 2**20
    except Exception:  # no NVML here: nvidia-smi, if there is one
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return None
        query = [smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"]
        return lambda: int(subprocess.run(query, capture_output=True, text=True, timeout=10).stdout.split()[0])


@contextmanager
def gpu_memory(into: dict):
    """Peak GPU memory in use (GPU 0, all processes, sampled every 0.1 s) while the block runs, less what was in use
    when it began: into['gpu_mem_peak_mb'] (and gpu_mem_base_mb). Left out where it cannot be read."""
    read = gpu_memory_used()
    if read is None:
        yield
        return
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                samples.append(read())
            except Exception:  # a failed reading is a missing sample
                pass
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield
    finally:
        stop.set()
        sampler.join(15)
        if samples:
            into.update(gpu_mem_peak_mb=max(samples) - samples[0], gpu_mem_base_mb=samples[0])


@contextmanager
def environment(**changes: str):
    """os.environ with `changes` while the block runs (the measured commands inherit it)."""
    old = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------------------------- machine, GEMMs
def machine(device: str, tree: Path) -> dict:
    """What the run ran on: GPU, driver, torch, CUDA, cuDNN, TF32 defaults, and the seqtool revision."""
    row = {"kind": "env", "device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
           "cpus": os.cpu_count(), "python": sys.version.split()[0],
           "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
           "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}
    revision = tree / "REVISION"
    if revision.exists():
        row["seqtool_revision"] = revision.read_text().strip()
    else:
        proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "seqtool"], cwd=tree, capture_output=True, text=True)
        row["seqtool_revision"] = proc.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        row.update(gpu=props.name, gpu_mem_gb=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version(),
                   bf16=torch.cuda.is_bf16_supported())
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True) if shutil.which("nvidia-smi") else None
        if smi and smi.returncode == 0:
            row["driver"] = smi.stdout.strip()
    return row


def gemm_tflops(m: int, k: int, n: int, kind: str, device: str, seconds: float = 0.4) -> float:
    """TFLOP/s of (m x k) @ (k x n) products in `kind` (fp32 with TF32 off, tf32, bf16), back to back for about
    `seconds` after a warm-up; on CUDA timed with CUDA events, so the figure is the GPU's (as eager code launching
    one product after another sees it: the small shapes include launch gaps, if any)."""
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    c = torch.empty(m, n, device=device, dtype=dtype)
    cuda = device.startswith("cuda")
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = kind == "tf32"
    try:
        def timed(reps: int) -> float:  # seconds for reps products
            if not cuda:
                start = time.perf_counter()
                for _ in range(reps):
                    torch.mm(a, b, out=c)
                return time.perf_counter() - start
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(reps):
                torch.mm(a, b, out=c)
            end.record()
            end.synchronize()
            return begin.elapsed_time(end) / 1000

        timed(3)  # warm-up: kernels chosen, clocks up
        once = timed(3) / 3
        reps = max(3, min(10_000, int(seconds / max(once, 1e-7))))
        return 2 * m * k * n * reps / timed(reps) / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def gemms(bench: Bench) -> None:
    device = bench.args.device
    kinds = ("fp32", "tf32", "bf16") if device.startswith("cuda") else ("fp32",)
    size = bench.args.peak_size
    for label, m, k, n in ((f"{size}^3 (peak)", size, size, size), *MODEL_SHAPES):
        for kind in kinds:
            bench.keep({"kind": "gemm", "shape": label, "m": m, "k": k, "n": n, "dtype": kind,
                        "tflops": round(gemm_tflops(m, k, n, kind, device), 3)})
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the sampled GPU memory of the next phases should be theirs


# ----------------------------------------------------------------------------------------------- seqtool
def seqtool_run(bench: Bench, name: str, sets: tuple[str, ...], left: float) -> dict:
    a = bench.args
    data = a.shared / "data" / "multi30k"
    sets = (f"training.device={a.device}", *(f"data.{side}={data / file}" for side, file in (
        ("train_src", "train.de"), ("train_tgt", "train.en"), ("valid_src", "val.de"), ("valid_tgt", "val.en"))),
        *sets)
    mem: dict = {}
    with gpu_memory(mem):
        row = seqtool_train(bench.work, a.minutes, name, sets, tree=a.tree,
                            limit_s=min(a.minutes * 60 + 150, left - 30))
    metrics = [json.loads(line) for line in Path(row["model_dir"], "metrics.jsonl").read_text().splitlines()]
    last = metrics[-1]
    said = re.findall(r"^training on (\S+) in (.+)$", (bench.work / f"train_{name}.log").read_text(), re.M)
    return bench.keep({**row, **mem, "last_valid_bleu": last.get("valid_bleu"), "last_step": last["step"],
                       "precision": said[-1][1] if said else None, "sets": list(sets)})


def seqtool_decodes(bench: Bench, train: dict, beam: int, left: float) -> dict:
    a = bench.args
    extra = (*VARIANTS["fp32"], "--device", a.device)  # the whole vocabulary, the model's own weights
    try:
        row = seqtool_decode(bench.work, train["model_dir"], beam, extra, ".full", tree=a.tree,
                             limit_s=min(120, left - 15))
    except (IndexError, FileNotFoundError) as e:  # no "translated N lines" line, or no output
        log = bench.work / f"decode_{Path(train['model_dir']).name}.b{beam}.full.log"
        tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
        raise RuntimeError(f"seqtool translate did not finish (stopped at its limit?): {tail}") from e
    return bench.keep({**row, "run": train["run"], "variant": "full vocabulary"})


def flops(bench: Bench, model_dir: str) -> dict:
    """Matrix-product FLOPs of a training step per sentence (forward and backward, on the CPU: the count does not
    depend on the device), on the trainer's own first batches, as bench/flop_limit.py counts them."""
    from flop_limit import addmm_flops, trainer_batches
    from torch.utils.flop_counter import FlopCounterMode

    from seqtool.checkpoint import load_model
    from seqtool.train import batch_loss

    bundle = load_model(model_dir)
    model = bundle.model.cpu().train()
    batches = trainer_batches(bundle, 3000, bench.args.flop_batches)
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_flops})
    with counter:
        for batch in batches:
            (batch_loss(model, batch, bundle.config.training.label_smoothing) / batch.n_tgt_tokens).backward()
    sents, tokens = sum(b.size for b in batches), sum(b.n_tgt_tokens for b in batches)
    output = 6 * tokens * model.output.in_features * model.output.out_features
    total = counter.get_total_flops()
    return bench.keep({"kind": "flops", "batches": len(batches), "sentences": sents, "tgt_tokens": tokens,
                       "gflop_per_sentence": round(total / sents / 1e9, 4),
                       "output_layer_share": round(output / total, 3)})


# ----------------------------------------------------------------------------------------------- OpenNMT-py
def harness(shared: Path):
    """The peers' harness module (configs and log parsing), imported from the shared copy."""
    spec = importlib.util.spec_from_file_location("peers_harness", shared / "peers" / "lib" / "harness.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def onmt_env(stubs: Optional[Path]):
    path = os.pathsep.join(filter(None, [str(stubs) if stubs else "", os.environ.get("PYTHONPATH", "")]))
    return environment(TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", PYTHONWARNINGS="ignore", PYTHONPATH=path)


def onmt_train(bench: Bench, left: float) -> dict:
    a = bench.args
    peers = harness(a.shared)
    peers.DATA = str(a.peers_home / "data")
    peers.ONMT_SAVE_EVERY = a.onmt_save_every
    run = bench.work / "onmt"
    (run / "model").mkdir(parents=True, exist_ok=True)
    cfg = run / "config.yaml"
    cfg.write_text(peers.onmt_cfg(str(run), "gru") + ("gpu_ranks: [0]\n" if a.device.startswith("cuda") else ""))
    cmd = [sys.executable, "-m", "onmt.bin.train", "-config", str(cfg), "-log_file", str(run / "train.log")]
    mem: dict = {}
    with onmt_env(a.stubs), gpu_memory(mem):
        rep = measure(cmd, run / "measure.json", budget=min(a.minutes * 60, left - 40), stdout=run / "stdout.txt",
                      stderr=run / "stderr.txt", grace=20)
    pts = peers.onmt_log(str(run / "stderr.txt"))  # the step lines go to stderr only
    sps, tps, window = peers.steady(pts)
    ckpt, updates = None, None
    saved = sorted(run.glob("model/model_step_*.pt"), key=lambda p: int(re.findall(r"_step_(\d+)\.pt$", p.name)[0]))
    for path in reversed(saved):  # the newest complete checkpoint (a save cut by the signal is skipped)
        if zipfile.is_zipfile(path):
            ckpt, updates = str(path), int(re.findall(r"_step_(\d+)\.pt$", path.name)[0])
            break
    if not pts:
        tail = (run / "stderr.txt").read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"OpenNMT-py logged no step (rc {rep['rc']}): {tail}")
    return bench.keep({"tool": "onmt", "kind": "train", "run": "onmt", "wall_s": rep["wall_s"], "rc": rep["rc"],
                       "steps": pts[-1][1], "updates": updates, "save_every": a.onmt_save_every,
                       "train_sent_per_s": round(sps, 1) if sps else None,
                       "train_tgt_tok_per_s": round(tps, 1) if tps else None, "steady_window_s": round(window, 1),
                       "peak_rss_mb": rep["peak_rss_mb"], **mem, "checkpoint": ckpt})


def onmt_decode(bench: Bench, train: dict, beam: int, left: float) -> dict:
    """onmt_translate as the peers' decode.sh runs it (sentence batches of 64, GNMT length penalty 1.0 for beam
    search), on the GPU; scored as their harness scores (spm decode_pieces, sacrebleu)."""
    import sentencepiece as spm

    a = bench.args
    data = a.peers_home / "data"
    out = bench.work / "onmt" / f"decode-b{beam}"
    out.mkdir(parents=True, exist_ok=True)
    hyp = out / "hyp.sp"
    cmd = [sys.executable, "-m", "onmt.bin.translate", "-model", train["checkpoint"], "-src", str(data / "test2016.de"),
           "-output", str(hyp), "-beam_size", str(beam), "-batch_size", "64", "-batch_type", "sents", "-max_length",
           "100", "-report_time", "-gpu", "0" if a.device.startswith("cuda") else "-1", "-seed", "42"]
    if beam > 1:
        cmd += ["-length_penalty", "wu", "-alpha", "1.0"]
    with onmt_env(a.stubs):
        rep = measure(cmd, out / "measure.json", budget=min(150, left - 15), stdout=out / "stdout.txt",
                      stderr=out / "stderr.txt", grace=10)
    said = (out / "stdout.txt").read_text(errors="replace") + (out / "stderr.txt").read_text(errors="replace")
    found = re.findall(r"Total translation time \(s\): ([\d.]+)", said)
    tool_s = float(found[-1]) if found else None
    sp = spm.SentencePieceProcessor(model_file=str(data / "spm.model"))
    hyps = [sp.decode_pieces(line.split()) for line in hyp.read_text(encoding="utf-8").split("\n")[:-1]]
    (out / "hyp.txt").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    refs = (a.shared / "data" / "multi30k" / "test2016.en").read_text(encoding="utf-8").splitlines()
    return bench.keep({"tool": "onmt", "kind": "decode", "run": "onmt", "beam": beam, "batch": 64,
                       "n_src": len(hyps), "rc": rep["rc"], "wall_s": rep["wall_s"], "tool_s": tool_s,
                       "sent_per_s_wall": round(len(hyps) / rep["wall_s"], 1),
                       "sent_per_s_tool": round(len(hyps) / tool_s, 1) if tool_s else None,
                       "bleu": round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2),
                       "chrf": round(sacrebleu.corpus_chrf(hyps, [refs]).score, 2)})


# ----------------------------------------------------------------------------------------------- the table
def fmt(x, spec: str = ",.1f") -> str:
    return "" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    """Markdown from the rows so far (any subset: what is missing stays blank)."""
    env = next((r for r in rows if r["kind"] == "env"), {})
    lines = []
    if env:
        lines.append(f"{env.get('gpu', env.get('device'))}, torch {env.get('torch')} (CUDA {env.get('cuda')}, "
                     f"cuDNN {env.get('cudnn')}, driver {env.get('driver')}), {env.get('cpus')} CPUs; seqtool "
                     f"{env.get('seqtool_revision')}; TF32 defaults: matmul {env.get('matmul_allow_tf32')}, "
                     f"cuDNN {env.get('cudnn_allow_tf32')}\n")
    gemm = {(r["shape"], r["dtype"]): r for r in rows if r["kind"] == "gemm"}
    if gemm:
        shapes = list(dict.fromkeys(s for s, _ in gemm))
        kinds = [k for k in GEMM_KINDS if any(d == k for _, d in gemm)]
        lines += ["| GEMM (m x k x n) | " + " | ".join(f"{GEMM_KINDS[k]} TFLOP/s" for k in kinds) + " |",
                  "|---|" + "---:|" * len(kinds)]
        for shape in shapes:
            r0 = next(r for (s, _), r in gemm.items() if s == shape)
            lines.append(f"| {shape} ({r0['m']} x {r0['k']} x {r0['n']}) | " + " | ".join(
                fmt(gemm.get((shape, k), {}).get("tflops"), ".3g") for k in kinds) + " |")
        lines.append("")

    def find(kind: str, run: str, beam: Optional[int] = None) -> dict:
        return next((r for r in rows if r["kind"] == kind and r.get("run") == run and r.get("beam") == beam), {})

    runs = list(dict.fromkeys(r["run"] for r in rows if r["kind"] in ("train", "decode")))
    if runs:
        lines += ["| tool | train sent/s | tgt tok/s | steps | GPU memory peak MB | dev BLEU at the end | "
                  "BLEU greedy | greedy s (tool / whole command) | BLEU beam 5 | beam-5 s (tool / whole command) |",
                  "|---|" + "---:|" * 9]
        for run in runs:
            tr = find("train", run)
            name = "OpenNMT-py 3.5.1 (fp32)" if run == "onmt" else f"seqtool {run}" + (
                f": {tr['precision']}" if tr.get("precision") else "")
            dev = "" if run == "onmt" else f"{fmt(tr.get('last_valid_bleu'), '.2f')}"
            cells = [f"{fmt(d.get('bleu'), '.2f')} | {fmt(d.get('tool_s'))} / {fmt(d.get('wall_s'))}" if d else " | "
                     for d in (find("decode", run, 1), find("decode", run, 5))]
            lines.append(f"| {name} | {fmt(tr.get('train_sent_per_s'))} | {fmt(tr.get('train_tgt_tok_per_s'), ',.0f')} "
                         f"| {fmt(tr.get('steps'), ',')} | {fmt(tr.get('gpu_mem_peak_mb'), ',')} | {dev} | "
                         f"{cells[0]} | {cells[1]} |")
        peer = find("train", "onmt")
        ours = [run for run in runs if run != "onmt"]
        if peer and ours:
            lines += ["", "| seqtool / OpenNMT-py | train sent/s | greedy BLEU diff | greedy speed (tool / whole) | "
                      "beam-5 BLEU diff | beam-5 speed (tool / whole) |", "|---|" + "---:|" * 5]
            for run in ours:
                tr, cells = find("train", run), []
                for beam in (1, 5):
                    o, p = find("decode", run, beam), find("decode", "onmt", beam)
                    ok = o and p and o.get("tool_s") and p.get("tool_s")
                    cells.append(f"{o['bleu'] - p['bleu']:+.2f} | {p['tool_s'] / o['tool_s']:.2f}x / "
                                 f"{p['wall_s'] / o['wall_s']:.2f}x" if ok else " | ")
                ratio = (f"{tr['train_sent_per_s'] / peer['train_sent_per_s']:.2f}x"
                         if tr.get("train_sent_per_s") and peer.get("train_sent_per_s") else "")
                lines.append(f"| seqtool {run} | {ratio} | {cells[0]} | {cells[1]} |")
    work = next((r for r in rows if r["kind"] == "flops"), None)
    peak = {k: r["tflops"] for (s, k), r in gemm.items() if s.endswith("(peak)")}
    if work:
        lines += ["", f"Training FLOPs (matrix products, forward and backward): {work['gflop_per_sentence']:.3f} "
                      f"GFLOP a sentence, {work['output_layer_share']:.0%} of it the output layer.", ""]
        trains = [r for r in rows if r["kind"] == "train" and r.get("train_sent_per_s")]
        if trains and peak:
            kinds = [k for k in GEMM_KINDS if k in peak]
            shares = " | ".join(f"share of the {GEMM_KINDS[k]} peak" for k in kinds)
            lines += [f"| training | TFLOP/s reached | {shares} |", "|---|---:|" + "---:|" * len(kinds)]
            for r in trains:
                reached = work["gflop_per_sentence"] * r["train_sent_per_s"] / 1e3
                name = "OpenNMT-py (at seqtool's FLOPs a sentence)" if r["run"] == "onmt" else f"seqtool {r['run']}"
                lines.append(f"| {name} | {reached:.2f} | " + " | ".join(f"{reached / peak[k]:.1%}" for k in kinds)
                             + " |")
    problems = [r for r in rows if r["kind"] in ("skipped", "error")]
    if problems:
        lines += [""] + [f"- {r['kind']}: {r['phase']}" + (f" ({r['error'][:200]})" if r.get("error") else
                                                          f" (needed {r['need_s']} s, {r['left_s']} s left)")
                         for r in problems]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=2.0, help="training budget of each model")
    ap.add_argument("--deadline", type=float, default=480.0, help="the whole run ends within this many seconds")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "runs" / "gpu_table"))
    ap.add_argument("--work", type=Path, default=None, help="models and logs (default: OUT-work, beside OUT)")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a rehearsal of the script")
    ap.add_argument("--phases", default="gemm,seqtool,onmt,flops,decode",
                    help="comma-separated, run in this order: gemm,seqtool,onmt,flops,decode")
    ap.add_argument("--skip", default="", help="phases to leave out")
    ap.add_argument("--seqtool", action="append", metavar="NAME:KEY=VALUE,...",
                    help=f"a seqtool model to train, with config overrides (repeatable; default {' and '.join(RUNS)})")
    ap.add_argument("--peak-size", type=int, default=8192, help="the square GEMM taken as each kind's peak")
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared", help="holds data/multi30k and peers/lib")
    ap.add_argument("--peers-home", type=Path,
                    default=Path(os.environ.get("PEERS_HOME") or "~/.cache/seqtool-peers").expanduser(),
                    help="holds the peers' prepared data in data/")
    ap.add_argument("--stubs", type=Path, default=None, help="put on OpenNMT-py's PYTHONPATH first")
    ap.add_argument("--tree", type=Path, default=ROOT, help="the seqtool checkout that trains and decodes")
    ap.add_argument("--onmt-save-every", type=int, default=500, help="OpenNMT-py's checkpoint interval (updates)")
    ap.add_argument("--flop-batches", type=int, default=10)
    ap.add_argument("--table", type=Path, nargs="+", help="only print the table of these results.jsonl files")
    args = ap.parse_args()
    if args.table:
        print(table([json.loads(line) for path in args.table for line in path.read_text().splitlines() if line]))
        return
    args.work = args.work or args.out.with_name(args.out.name + "-work")
    for name in ("shared", "peers_home", "tree", "out", "work"):
        setattr(args, name, getattr(args, name).resolve())
    compare_peers.MEASURE = args.shared / "peers" / "lib" / "measure.py"  # the shared copy's, as compare_peers'
    compare_peers.DATA = args.shared / "data" / "multi30k"  # test2016 for seqtool_decode
    phases = [p for p in args.phases.split(",") if p and p not in args.skip.split(",")]
    bench = Bench(args)
    bench.keep(machine(args.device, args.tree))
    if "gemm" in phases:
        bench.phase("gemm", 20, lambda left: gemms(bench))
    runs = [(name, tuple(filter(None, sets.split(",")))) for name, _, sets in
            (opt.partition(":") for opt in args.seqtool or RUNS)]
    trained = []
    if "seqtool" in phases:
        for name, sets in runs:
            row = bench.phase(f"train seqtool {name}", args.minutes * 60 + 60,
                              lambda left, name=name, sets=sets: seqtool_run(bench, name, sets, left))
            if row and row.get("model_dir"):
                trained.append(row)
    peer = None
    if "onmt" in phases:
        peer = bench.phase("train onmt", args.minutes * 60 + 45, lambda left: onmt_train(bench, left))
        if peer and not peer.get("checkpoint"):
            bench.keep({"kind": "error", "phase": "train onmt", "error": "no complete checkpoint was saved"})
            peer = None
    for beam in (5, 1):  # beam 5 first, then the FLOP count, then greedy: what goes if time runs short
        if "decode" in phases:
            for train in trained:
                bench.phase(f"decode seqtool {train['run']} beam {beam}", 25,
                            lambda left, train=train, beam=beam: seqtool_decodes(bench, train, beam, left))
            if peer:
                bench.phase(f"decode onmt beam {beam}", 30,
                            lambda left, beam=beam: onmt_decode(bench, peer, beam, left))
        if beam == 5 and "flops" in phases and trained:
            bench.phase("flops", 30, lambda left: flops(bench, trained[0]["model_dir"]))
    with tarfile.open(args.out / "logs.tar.gz", "w:gz") as tar:  # logs and outputs, no models
        for path in sorted(args.work.rglob("*")):
            if path.is_file() and path.suffix in (".log", ".json", ".jsonl", ".txt", ".yaml", ".en", ".sp"):
                tar.add(path, arcname=str(path.relative_to(args.work)))
    bench.log(f"done in {time.monotonic() - bench.t0:.0f} s; results in {args.out}")
    print(table(bench.rows))


if __name__ == "__main__":
    main()
