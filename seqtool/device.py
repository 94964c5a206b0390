"""Where the model runs and in what precision, chosen from what the machine has, never assumed.

`auto` takes a CUDA GPU when torch sees one, else the CPU. On CUDA, training uses mixed precision:
bf16 where the GPU supports it, else fp16 with a gradient scaler. On the CPU, `auto` reads the CPU's
flags: bf16 where it has native bf16 (AMX's `amx_bf16` matrix units, or `avx512_bf16`), fp32
elsewhere, as bf16 on a CPU without it was measured 20-50x slower (bench/precision.py measures it on
yours), and there bf16 is refused. CPU bf16 is not autocast: autocast leaves the recurrent cells, the
elementwise work and the fused loss in fp32 (bench/precision.py on a Xeon with AMX: 1.31x fp32 at 64
sentences a batch); instead the whole forward pass runs on bf16 copies of the fp32 weights, made once
per step, whose gradients autograd hands back to the fp32 masters the optimizer keeps (1.49x at 64
sentences, 1.87x at 256; less on real batches, docs/performance.md).

Decoding on the CPU may lower the precision (`decoding.quantize`): int8 weights for the linear and RNN
layers, or (decoding.quantize_kind bf16, where the CPU has native bf16) the whole model in bf16.
"""

from __future__ import annotations

import copy
import ctypes
import os
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from seqtool.errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a torch device that exists here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name}: torch sees no CUDA GPU here (torch {torch.__version__}); "
                              "use cpu or auto")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name}: there are {torch.cuda.device_count()} CUDA GPUs")
        return device
    return torch.device("cpu")


BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # native bf16: AMX tiles first, then AVX-512's bf16 dot products
NO_BF16 = f"this CPU has no native bf16 (no {' or '.join(BF16_FLAGS)})"


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where that cannot be read, so nothing is assumed."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def cpu_bf16_flag() -> Optional[str]:
    """The flag that gives this CPU native bf16 (amx_bf16 before avx512_bf16), or None."""
    return next((f for f in BF16_FLAGS if f in cpu_flags()), None)


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: in `dtype` (None: plain fp32), by autocast or, with `cast_weights`, on copies
    of the weights in `dtype`; `scaled`: fp16 loss scaling; `why`: how it was chosen, for the training log."""

    device: torch.device
    dtype: Optional[torch.dtype] = None
    scaled: bool = False
    cast_weights: bool = False
    why: str = field(default="asked for", compare=False)

    @property
    def name(self) -> str:
        names: dict[Optional[torch.dtype], str] = {torch.bfloat16: "bf16", torch.float16: "fp16"}
        return names.get(self.dtype, "fp32")

    def autocast(self) -> AbstractContextManager:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def forward(self, module: torch.nn.Module, *args):
        """module(*args) in this precision. The weight copies are made by differentiable casts, so each
        copy's gradient (summed over its uses in `dtype`) reaches its fp32 parameter in fp32."""
        if not self.cast_weights:
            with self.autocast():
                return module(*args)
        copies = {name: p.to(self.dtype) for name, p in module.named_parameters()}  # tied weights: one copy
        return torch.func.functional_call(module, copies, args)

    def scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler that does nothing unless fp16 needs it."""
        return torch.amp.GradScaler(self.device.type, enabled=self.scaled)


FP32_CPU = Precision(torch.device("cpu"))


def pick_precision(device: torch.device, requested: str) -> Precision:
    """'auto' | 'fp32' | 'bf16' | 'fp16' for training on `device`; a choice the machine cannot run is refused."""
    if requested == "fp32":
        return Precision(device)
    if device.type == "cuda":
        if requested == "auto":
            bf16 = torch.cuda.is_bf16_supported()
            return Precision(device, DTYPES["bf16" if bf16 else "fp16"], scaled=not bf16,
                             why=f"auto: this GPU {'has' if bf16 else 'lacks'} bf16")
        if requested == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError("training.precision bf16: this GPU has no bf16; use fp16 or auto")
        return Precision(device, DTYPES[requested], scaled=requested == "fp16")
    flag = cpu_bf16_flag()
    if requested == "auto":
        if flag is None:
            return Precision(device, why=f"auto: {NO_BF16}")
        return Precision(device, torch.bfloat16, cast_weights=True, why=f"auto: this CPU has {flag}")
    if requested == "fp16":
        raise ConfigError("training.precision fp16 is for CUDA GPUs; on the CPU use fp32 "
                          "(or bf16 where the CPU has it)")
    if flag is None:
        raise ConfigError(f"training.precision bf16: {NO_BF16}, where it runs 20-50x slower than fp32; "
                          "use fp32 or auto")
    return Precision(device, torch.bfloat16, cast_weights=True)


def quantized(model: torch.nn.Module, device: torch.device, kind: str = "int8") -> torch.nn.Module:
    """A lower-precision copy of `model` for CPU inference: 'int8', torch's dynamic quantization (nn.Linear, GRU,
    LSTM), or 'bf16', the whole model in bf16 (only where the CPU has native bf16). On a Xeon with AMX, beam 5
    of Multi30k: int8 1.73x fp32 at -0.18 BLEU, bf16 1.65x at BLEU equal to fp32's and twice the memory, the
    oneDNN kernels it builds for each new matrix shape (docs/performance.md). Log-probabilities stay fp32."""
    if device.type != "cpu":
        raise ConfigError(f"decoding.quantize is lower-precision inference on the CPU; the model is on {device}")
    if kind == "bf16":
        if cpu_bf16_flag() is None:
            raise ConfigError(f"decoding.quantize_kind bf16: {NO_BF16}, where it runs 20-50x slower; use int8")
        return copy.deepcopy(model).to(torch.bfloat16)
    if ("fbgemm" not in torch.backends.quantized.supported_engines
            and "x86" not in torch.backends.quantized.supported_engines):
        raise ConfigError("decoding.quantize: this torch build has no x86 quantized engine")
    return int8_dynamic(model)


def int8_dynamic(model: torch.nn.Module) -> torch.nn.Module:
    """torch's dynamic int8 quantization of the linear and GRU/LSTM layers (Elman RNNs have no int8 kernel),
    without the deprecation warnings it prints on every call: they are torch's plans, not the user's concern.
    A linear layer with one output (attention's v, the copy gate) stays fp32: quantizing its large input at
    every call costs more than the int8 product saves (1.2 against 0.3 ms per beam-5 attention step)."""
    # quantize_dynamic converts a module's children, never the module itself: a bare layer would stay fp32.
    box = torch.nn.Sequential(model)
    spec = {name: torch.ao.quantization.default_dynamic_qconfig for name, m in box.named_modules()
            if isinstance(m, (torch.nn.GRU, torch.nn.LSTM)) or (isinstance(m, torch.nn.Linear) and m.out_features > 1)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        return torch.ao.quantization.quantize_dynamic(box, spec, dtype=torch.qint8)[0]


def _libc(name: str):
    """A C library function of this process (glibc's malloc controls), or None where there is none."""
    try:
        return getattr(ctypes.CDLL(None), name, None)
    except OSError:  # no C library to open by that route (Windows)
        return None


def release_freed_memory() -> None:
    """Hand memory that freed tensors left in the C heap back to the system. glibc keeps it otherwise, and
    each phase (shortlist counting, validation decoding) would add its own high-water mark to the process's
    RSS; measured on Multi30k: 128 MB back after the shortlist table, in 12 ms. Nothing where malloc_trim is absent."""
    trim = _libc("malloc_trim")
    if trim is not None:
        trim(0)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEEP_BELOW = 32 << 20  # glibc's largest mmap threshold on 64-bit systems


def keep_freed_memory() -> None:
    """Let glibc reuse the memory of freed tensors instead of returning it to the system after each step.

    By default glibc maps blocks from a few MB up (the threshold adapts) and unmaps them when freed, and it
    trims the heap's top: a training step then writes its per-step tensors (the output layer's fp32 logits,
    its weight-gradient temporaries, tens of MB each) into fresh pages, and each fresh page is a fault.
    On a 2-core Xeon VM a 16 MB copy took 3-4 ms into fresh pages against 0.5 ms into reused ones, and bf16
    training at 1,200-token batches ran 14% faster with the memory kept, at the same peak RSS (the next
    step's tensors take the same blocks; docs/performance.md). Blocks of 32 MB and more are still mapped and
    unmapped; release_freed_memory still gives the heap back between phases. Nothing where mallopt is absent.
    """
    mallopt = _libc("mallopt")
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, KEEP_BELOW)
        mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # an int: trim only a top of 2 GB or more


KERNEL_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")  # oneDNN's and ideep's (torch's)
KERNELS_KEPT = 128  # per cache; both default to 1,024


def limit_kernel_caches() -> None:
    """Keep at most KERNELS_KEPT compiled kernels in each of oneDNN's and ideep's caches, unless the environment
    already says how many.

    In bf16 on the CPU, oneDNN JIT-builds a kernel for each new matrix shape and keeps it (about 0.45 MB in
    each cache); real batches bring new shapes for the whole run (source and target lengths), so a 20-minute
    bf16 run on Multi30k held 4.0 GB. Measured on a 2-core AMX Xeon, 6 minutes of bf16 training at 256
    sentences: peak RSS 2,867 -> 1,969 MB at 300.9 -> 295.5 sent/s (docs/performance.md). Both libraries read
    the variables when first used, so this works before the process's first oneDNN product (the start of
    training) and does nothing after."""
    for name in KERNEL_CACHES:
        os.environ.setdefault(name, str(KERNELS_KEPT))
