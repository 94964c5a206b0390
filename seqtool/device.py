"""Where the model runs and in what precision, chosen from what the machine has, never assumed.

`auto` takes a CUDA GPU when torch sees one, else the CPU. On CUDA, training uses mixed precision:
bf16 where the GPU supports it, else fp16 with a gradient scaler. On the CPU it is fp32: bf16 on a
CPU without native bf16 instructions was measured 20-50x slower (bench/precision.py measures it
on yours), so bf16 there must be asked for, and is refused where the CPU lacks it. Decoding on the
CPU may also quantize: int8 weights for the linear and RNN layers (`decoding.quantize`).
"""

from __future__ import annotations

import ctypes
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import ContextManager, Optional

import torch

from seqtool.errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a torch device that exists here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name}: torch sees no CUDA GPU here (torch {torch.__version__}); use cpu or auto")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name}: there are {torch.cuda.device_count()} CUDA GPUs")
        return device
    return torch.device("cpu")


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """avx512_bf16 or amx_bf16 among the CPU flags (Linux); False where that cannot be read."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: autocast to `dtype` (None: plain fp32); `scaled`: fp16 loss scaling."""

    device: torch.device
    dtype: Optional[torch.dtype] = None
    scaled: bool = False

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")

    def autocast(self) -> ContextManager:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

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
            requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if requested == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError("training.precision bf16: this GPU has no bf16; use fp16 or auto")
        return Precision(device, DTYPES[requested], scaled=requested == "fp16")
    if requested == "auto":
        return Precision(device)
    if requested == "fp16":
        raise ConfigError("training.precision fp16 is for CUDA GPUs; on the CPU use fp32 (or bf16 where the CPU has it)")
    if not cpu_has_native_bf16():
        raise ConfigError("training.precision bf16: this CPU has no native bf16 (no avx512_bf16 / amx_bf16), where it "
                          "runs 20-50x slower than fp32; use fp32 or auto")
    return Precision(device, torch.bfloat16)


def quantized(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """An int8 dynamically quantized copy of `model` for CPU inference (torch.ao: nn.Linear, GRU, LSTM)."""
    if device.type != "cpu":
        raise ConfigError(f"decoding.quantize is int8 inference on the CPU; the model is on {device}")
    if "fbgemm" not in torch.backends.quantized.supported_engines and "x86" not in torch.backends.quantized.supported_engines:
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


def release_freed_memory() -> None:
    """Hand memory that freed tensors left in the C heap back to the system. glibc keeps it otherwise, and
    each phase (shortlist counting, validation decoding) would add its own high-water mark to the process's
    RSS; measured on Multi30k: 128 MB back after the shortlist table, in 12 ms. Nothing where malloc_trim is absent."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)
