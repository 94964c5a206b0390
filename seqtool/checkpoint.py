"""Model files and training state: safetensors + JSON metadata, written atomically, never unpickled.

A model file holds the weights, the resolved config, the tokenizer model(s) and training info, so a
user can copy one file and translate with it.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from seqtool.config import Config, validate
from seqtool.errors import ConfigError, ModelFileError, SeqtoolError
from seqtool.model.seq2seq import Seq2Seq, build_model
from seqtool.shortlist import Shortlist
from seqtool.tokenizer import Tokenizer

MODEL_FORMAT = "seqtool-model"
STATE_FORMAT = "seqtool-train-state"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"  # best model, in a model dir
STEP_FILE = "step{:08d}.safetensors"  # with training.keep_last: the model at each validation
STATE_FILE = "train_state.safetensors"  # last model + optimizer, schedule, step, RNG: for --resume


# Names of a process's open descriptors (/dev/stdout, /proc/self/fd/1): whatever the shell opened there, a
# plain file too (`>> log.txt`), is written where it stands, as the shell's own redirection would be.
DESCRIPTOR = re.compile(r"/dev/(stdout|stderr|fd/\d+)|/proc/(self|thread-self|\d+)/fd/\d+")


def write_target(path: Path) -> tuple[Path, bool]:
    """(Where a write to `path` lands, whether it may go through a temporary file renamed over it.) A symlink is
    followed, so the link stays a link and its target gets the new content; a FIFO, a device (/dev/null), a
    socket or a descriptor's name (DESCRIPTOR) is written in place, appending: a rename would replace it with a
    plain file (losing what `>>` kept in it), the reader waiting on it would get nothing, and /dev/null
    would be gone."""
    if DESCRIPTOR.fullmatch(str(path)):
        return path, False
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return path, False
    except OSError:  # not there yet (a dangling link: its target is made), or unreachable: the write will say
        pass
    return Path(os.path.realpath(path)), True


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path` (see `write_target`).

    A crash or a full disk leaves either the old file or the new one under `path`, never a mix.
    """
    path, replaceable = write_target(Path(path))
    tmp = None
    if not replaceable:
        try:
            with open(path, "ab") as f:
                f.write(data)
            return
        except OSError as exc:
            raise SeqtoolError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; a model file is as readable as any output
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise SeqtoolError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def append_line(path: Path, line: str) -> None:
    """Append one line with a single write, so a killed run never leaves half a line."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode("utf-8"))
        finally:
            os.close(fd)
    except OSError as exc:
        raise SeqtoolError(f"cannot write {path}: {exc.strerror or exc}") from None


def _unaliased(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later names of shared tensors (tied embeddings); safetensors stores each tensor once."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out[name] = t.detach().contiguous()
    return out


def _pack(tensors: dict[str, torch.Tensor], kind: str, meta: dict[str, Any]) -> bytes:
    metadata = {"format": kind, "format_version": str(FORMAT_VERSION)}
    metadata.update({k: json.dumps(v) for k, v in meta.items()})
    return st_save({k: v.cpu() for k, v in tensors.items()}, metadata=metadata)


def _utf8_name(path: Path, fd: int) -> str:
    """A name safetensors' reader can take (UTF-8 only) for `path`, open as `fd`: a path holding other bytes
    (Python's surrogates for them) is read through its descriptor, as Linux names it."""
    try:
        str(path).encode("utf-8")
        return str(path)
    except UnicodeEncodeError:
        return f"/proc/self/fd/{fd}"


def _unpack(path: str | Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and check a safetensors file of ours; everything else is one ModelFileError. safetensors' own
    reader (memory-mapped) parses the header and the tensors; the first 8 bytes are looked at first only so
    that a file of another kind (a pickle, a zip, random bytes) is named as such, not as a damaged one."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelFileError(f"{path} is a directory without a {MODEL_FILE}")
    what = "seqtool model" if kind == MODEL_FORMAT else "seqtool training state"
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            start = f.read(8)
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc.strerror}") from None
    if len(start) < 8:
        raise ModelFileError(f"{path} is not a {what} file (too short)")
    (header_len,) = struct.unpack("<Q", start)
    if header_len > size - 8:
        raise ModelFileError(f"{path} is not a {what} file, or it is truncated")
    try:
        with path.open("rb") as opened, safe_open(_utf8_name(path, opened.fileno()), framework="pt") as f:
            raw_meta = f.metadata() or {}
            if raw_meta.get("format") == kind and raw_meta.get("format_version") == str(FORMAT_VERSION):
                tensors = {name: f.get_tensor(name) for name in f.keys()}
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc.strerror}") from None
    except Exception:  # safetensors' own errors: a header that is not one, offsets past the end, bad dtypes
        raise ModelFileError(f"{path} is damaged or truncated, or not a {what} file") from None
    if raw_meta.get("format") != kind:
        raise ModelFileError(f"{path} is a safetensors file but not a {what} file")
    version = raw_meta.get("format_version")
    if version != str(FORMAT_VERSION):
        raise ModelFileError(
            f"{path} has {what} format version {version}; this seqtool reads version {FORMAT_VERSION}"
        )
    try:
        meta = {k: json.loads(v) for k, v in raw_meta.items() if k not in ("format", "format_version")}
    except ValueError:
        raise ModelFileError(f"{path} is damaged (its metadata is not JSON)") from None
    return tensors, meta


@dataclass
class ModelBundle:
    """Everything needed to translate: model, config, tokenizers and the shortlist table."""

    model: Seq2Seq
    config: Config
    src_tok: Tokenizer
    tgt_tok: Tokenizer
    info: dict[str, Any]
    shortlist: Optional[Shortlist] = None


def bundle_tensors(bundle: ModelBundle) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {f"model.{k}": v for k, v in _unaliased(bundle.model.state_dict()).items()}
    tensors["tokenizer.src"] = torch.frombuffer(bytearray(bundle.src_tok.model_bytes), dtype=torch.uint8)
    if bundle.tgt_tok is not bundle.src_tok:
        tensors["tokenizer.tgt"] = torch.frombuffer(bytearray(bundle.tgt_tok.model_bytes), dtype=torch.uint8)
    if bundle.shortlist is not None:
        tensors.update(bundle.shortlist.tensors())
    return tensors, {"config": bundle.config.model_dump(), "info": bundle.info}


def _tokenizer(tensors: dict[str, torch.Tensor], name: str, word: bool, path: Path) -> Tokenizer:
    blob = tensors[name]
    if blob.dtype != torch.uint8 or blob.dim() != 1:
        raise ModelFileError(f"{path}: the tokenizer inside the model is damaged ({name} is not a byte string)")
    return Tokenizer.from_bytes(blob.numpy().tobytes(), word)


def _as_checked_now(raw: Any) -> Any:
    """A saved config, for this seqtool's checks. Files from before decoding.nbest was checked against the
    beam may hold a larger nbest (or one with sampling), which decoding silently capped: cap it the same way,
    so that such a model still loads and decodes as it did."""
    d = raw.get("decoding") if isinstance(raw, dict) else None
    if isinstance(d, dict) and type(d.get("nbest")) is int and type(d.get("beam_size")) is int:
        d["nbest"] = 1 if d.get("sample") is True else min(d["nbest"], max(d["beam_size"], 1))
    return raw


def bundle_from(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path) -> ModelBundle:
    try:
        config = validate(_as_checked_now(meta.get("config")))
    except ConfigError as exc:
        raise ModelFileError(f"{path}: its config is not valid for this seqtool ({exc})") from None
    info = meta.get("info") or {}
    if not isinstance(info, dict):
        raise ModelFileError(f"{path}: its training info is damaged (not a mapping)")
    if "tokenizer.src" not in tensors:
        raise ModelFileError(f"{path}: no tokenizer inside the model file")
    word = config.tokenizer.type == "word"
    src_tok = _tokenizer(tensors, "tokenizer.src", word, path)
    tgt_tok = src_tok if "tokenizer.tgt" not in tensors else _tokenizer(tensors, "tokenizer.tgt", word, path)
    try:  # the shapes are checked against the model built: a damaged config may ask for more than there is
        model = build_model(config.model, src_tok.vocab_size, tgt_tok.vocab_size)
    except (MemoryError, RuntimeError) as exc:  # torch's CPU allocator says "can't allocate memory"
        if not isinstance(exc, MemoryError) and "can't allocate memory" not in str(exc):
            raise
        raise ModelFileError(f"{path}: its config asks for a model too large for this machine's memory, "
                             "far from its weights' sizes: the file is damaged") from None
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    expected = model.state_dict()
    aliases = set(expected) - set(_unaliased(expected))
    missing = set(expected) - set(weights) - aliases
    unexpected = set(weights) - set(expected)
    wrong = [k for k in set(weights) & set(expected)
             if weights[k].shape != expected[k].shape or weights[k].dtype != expected[k].dtype]
    if missing or unexpected or wrong:
        raise ModelFileError(f"{path}: weights do not match its config (missing {len(missing)}, "
                             f"unexpected {len(unexpected)}, wrong shape or dtype {len(wrong)})")
    broken = sorted(k for k, v in weights.items() if v.is_floating_point() and not bool(v.isfinite().all()))
    if broken:  # it would translate every line to the same junk, with exit 0
        raise ModelFileError(f"{path}: damaged: {len(broken)} weight tensor(s) hold NaN or infinity ({broken[0]})")
    model.load_state_dict(weights, strict=False)
    model.eval()
    shortlist = Shortlist.from_tensors(tensors)
    if shortlist is not None and not shortlist.fits(src_tok.vocab_size, tgt_tok.vocab_size):
        raise ModelFileError(f"{path}: its shortlist table does not match its vocabularies")
    return ModelBundle(model, config, src_tok, tgt_tok, info, shortlist)


def save_model(path: Path, bundle: ModelBundle) -> None:
    tensors, meta = bundle_tensors(bundle)
    atomic_write(path, _pack(tensors, MODEL_FORMAT, meta))


def resolve_model_path(path: str | Path) -> Path:
    p = Path(path)
    return p / MODEL_FILE if p.is_dir() else p


def load_model(path: str | Path) -> ModelBundle:
    """Load a model file (or a model dir's best model) for inference."""
    if Path(path).is_dir() and not (Path(path) / MODEL_FILE).exists():
        raise ModelFileError(f"{path} is a directory without a {MODEL_FILE}")
    path = resolve_model_path(path)
    return bundle_from(*_unpack(path, MODEL_FORMAT), path)


def model_card(bundle: ModelBundle, path: Path) -> dict[str, Any]:
    """What `seqtool info` and the server's /info show: architecture, sizes, data, steps, scores."""
    m = bundle.config.model
    attention = f" ({m.attention}{', input feeding' if m.input_feeding else ''})" if m.context == "attention" else ""
    return {
        "file": str(path),
        "format_version": FORMAT_VERSION,
        "architecture": f"{m.cell} encoder {m.encoder_layers}x{m.encoder_hidden_size}"
        f"{' bidirectional' if m.bidirectional else ''}, decoder {m.decoder_layers}x{m.hidden_size}, "
        f"context {m.context}{attention}, c = {m.c_form}",
        "parameters": sum(p.numel() for p in bundle.model.parameters()),
        "vocab": {"src": bundle.src_tok.vocab_size, "tgt": bundle.tgt_tok.vocab_size,
                  "tokenizer": bundle.config.tokenizer.type, "joint": bundle.src_tok is bundle.tgt_tok,
                  "shortlist_table": bundle.shortlist is not None},
        **{k: v for k, v in bundle.info.items() if k != "params"},
        "config": bundle.config.model_dump(),
    }


@dataclass
class TrainState:
    """What `--resume` restores: the model, each parameter's optimizer slots, the progress record, the RNG
    states (the CPU's, and the CUDA device's when training ran on one), the fp16 gradient scaler's state and the
    learning-rate schedule's (checked against the config when it is restored: `Schedule.restore`)."""

    bundle: ModelBundle
    optimizer: dict[int, dict[str, torch.Tensor]]  # parameter index -> Adam's step, exp_avg, exp_avg_sq
    progress: dict[str, Any]
    rng: dict[str, torch.Tensor]  # "torch", and "cuda" for a CUDA run
    scaler: dict[str, Any] = field(default_factory=dict)  # GradScaler.state_dict(); empty unless fp16 scaled
    schedule: dict[str, Any] = field(default_factory=dict)  # Schedule.state(); empty from an earlier seqtool


def save_state(path: Path, state: TrainState) -> None:
    """One file with all a resumed run needs: model, tokenizers, optimizer, progress, RNG, loss scale and
    learning-rate schedule."""
    tensors, meta = bundle_tensors(state.bundle)
    for pid, slots in state.optimizer.items():
        for name, value in slots.items():
            tensors[f"optim.{pid}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors.update({f"rng.{name}": t for name, t in state.rng.items()})
    meta.update(progress=state.progress, scaler=state.scaler, schedule=state.schedule)
    atomic_write(path, _pack(tensors, STATE_FORMAT, meta))


SLOTS = ("exp_avg", "exp_avg_sq")  # Adam's per-parameter moments: the parameter's shape and dtype
SCALER_KEYS = {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}  # GradScaler's


def load_state(path: Path) -> TrainState:
    """Read a training state and check every part against the model it holds, so that what it returns
    can be restored: a damaged or foreign file is one ModelFileError, never a failure later in training."""
    tensors, meta = _unpack(path, STATE_FORMAT)
    bundle = bundle_from(tensors, meta, path)
    params = list(bundle.model.parameters())
    optimizer: dict[int, dict[str, torch.Tensor]] = {}
    problems = []
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, slot = (name.split(".", 2) + ["", ""])[:3]  # optim.INDEX.SLOT
            index = int(pid) if pid.isascii() and pid.isdigit() else -1
            if not 0 <= index < len(params):
                problems.append(f"{name}: no such parameter")
            elif slot in SLOTS and (value.shape != params[index].shape or value.dtype != params[index].dtype):
                problems.append(f"{name}: shape or dtype differs from the parameter")
            elif slot == "step" and (value.numel() != 1 or not value.is_floating_point()):
                problems.append(f"{name}: not a step count")
            elif slot not in (*SLOTS, "step"):
                problems.append(f"{name}: unknown optimizer slot")
            else:
                optimizer.setdefault(index, {})[slot] = value
    if any(set(slots) != {"step", *SLOTS} for slots in optimizer.values()):
        problems.append("optimizer state incomplete")
    rng = {name[len("rng."):]: t for name, t in tensors.items() if name.startswith("rng.")}
    if "torch" not in rng or rng["torch"].dtype != torch.uint8 or rng["torch"].shape != torch.get_rng_state().shape:
        problems.append("no CPU random generator state")
    if "cuda" in rng and (rng["cuda"].dtype != torch.uint8 or rng["cuda"].dim() != 1):
        problems.append("damaged CUDA random generator state")
    scaler = meta.get("scaler") or {}
    if not isinstance(scaler, dict) or (scaler and set(scaler) != SCALER_KEYS) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in scaler.values()):
        problems.append("damaged gradient scaler state")
    if not isinstance(meta.get("progress"), dict):
        problems.append("no progress record")
    if not isinstance(meta.get("schedule", {}), dict):
        problems.append("damaged learning-rate schedule state")
    if problems:
        raise ModelFileError(f"{path}: damaged training state ({'; '.join(problems[:3])})")
    return TrainState(bundle, optimizer, meta["progress"], rng, scaler, meta.get("schedule", {}))


def state_progress(path: Path) -> dict[str, Any]:
    """The progress record of a training state, read from its header alone (no tensors); {} when the file is
    not a readable state (load_state then says what is wrong with it)."""
    try:
        with safe_open(path, framework="pt") as f:
            progress = json.loads((f.metadata() or {}).get("progress", "{}"))
    except Exception:  # safetensors' own errors, OSError, bad JSON: whatever it is, it is not a record to read
        return {}
    return progress if isinstance(progress, dict) else {}


def step_models(model_dir: Path) -> list[Path]:
    """The per-validation model files of a run, oldest first."""
    return sorted(Path(model_dir).glob("step" + "[0-9]" * 8 + ".safetensors"))


def average_models(paths: list[Path]) -> ModelBundle:
    """Average the weights of models with the same config and tokenizers (checkpoint averaging)."""
    bundles = [load_model(p) for p in paths]
    first = bundles[0]
    for path, b in zip(paths[1:], bundles[1:]):
        if b.config.model != first.config.model or b.src_tok.model_bytes != first.src_tok.model_bytes \
                or b.tgt_tok.model_bytes != first.tgt_tok.model_bytes:
            raise ModelFileError(f"{path} has another architecture or vocabulary than {paths[0]}; cannot average")
    states = [b.model.state_dict() for b in bundles]
    averaged = {k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
                for k, v in states[0].items()}
    first.model.load_state_dict(averaged)
    first.info = {**bundles[-1].info, "averaged": [str(p) for p in paths]}
    return first
