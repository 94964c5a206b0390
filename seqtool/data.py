"""Lines -> ids -> batches: checked UTF-8 reading, aligned pairs, length filter, token-budget buckets."""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional

import torch

from seqtool.errors import DataError
from seqtool.tokenizer import BOS, EOS, PAD, Tokenizer


def decode_line(raw: bytes, name: str, lineno: int) -> str:
    """One raw line -> text without its line end; a clear error for bytes that are not UTF-8 text."""
    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a BOM is accepted and dropped
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}:{lineno}: invalid UTF-8 at byte {exc.start + 1}") from None
    if "\x00" in text:
        raise DataError(f"{name}:{lineno}: contains a NUL byte; is this a binary file?")
    return text.rstrip("\r\n")


def open_binary(path: str | Path) -> BinaryIO:
    """Open a text file for reading, or stdin for '-', turning OS errors into one clear line."""
    if str(path) == "-":
        return sys.stdin.buffer
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p} is a directory, not a text file")
    try:
        return open(p, "rb")
    except FileNotFoundError:
        raise DataError(f"file not found: {p}") from None
    except OSError as exc:
        raise DataError(f"cannot read {p}: {exc.strerror}") from None


def iter_lines(path: str | Path) -> Iterator[str]:
    """Stream the lines of a UTF-8 file ('-' is stdin), CRLF and BOM accepted."""
    name = "<stdin>" if str(path) == "-" else str(path)
    f = open_binary(path)
    try:
        for lineno, raw in enumerate(f, 1):
            yield decode_line(raw, name, lineno)
    except OSError as exc:  # mid-file (a closed stdin, a failing disk): a reading error, not the output's
        raise DataError(f"cannot read {name}: {exc.strerror or exc}") from None
    finally:
        if f is not sys.stdin.buffer:
            f.close()


def count_lines(path: str | Path) -> int:
    """Lines in a file as iter_lines reads them (a last line without its newline counts), without decoding."""
    n, last = 0, b"\n"
    with open_binary(path) as f:
        while block := f.read(1 << 20):
            n, last = n + block.count(b"\n"), block[-1:]
    return n + (last != b"\n")


def read_lines(path: str | Path) -> list[str]:
    lines = list(iter_lines(path))
    if not lines:
        raise DataError(f"{path} is empty")
    return lines


def read_pairs(src_path: str | Path, tgt_path: str | Path) -> tuple[list[str], list[str]]:
    """Read two line-aligned files; different line counts are an error naming both counts."""
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DataError(
            f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}; the files must be line-aligned"
        )
    return src, tgt


@dataclass
class Examples:
    """Encoded parallel data, with what was dropped and why."""

    src: list[list[int]]
    tgt: list[list[int]]
    dropped_empty: int = 0
    dropped_long: int = 0

    def __len__(self) -> int:
        return len(self.src)

    def subset(self, idx: Sequence[int]) -> Examples:
        return Examples([self.src[i] for i in idx], [self.tgt[i] for i in idx])

    # As training data (train.TrainingData, which shards.ShardStream also is):
    @property
    def known_pairs(self) -> int:
        return len(self)

    def epoch(self, batch_tokens: int, seed: int, sentences: int = 0) -> tuple[Iterator[Examples], Optional[int]]:
        """An epoch's batches in training order, and how many there are."""
        batches = epoch_batches(self, batch_tokens, seed, sentences)
        return (self.subset(idx) for idx in batches), len(batches)

    def finished_epoch(self) -> str:
        return ""  # what was kept and dropped is logged once, when the data is read

    def pairs(self) -> Iterator[tuple[list[int], list[int]]]:
        return zip(self.src, self.tgt)


def encode_pairs(
    src_lines: Sequence[str],
    tgt_lines: Sequence[str],
    src_tok: Tokenizer,
    tgt_tok: Tokenizer,
    max_src_len: int,
    max_tgt_len: int,
    truncate_src: int = 0,
) -> Examples:
    """Encode pairs, cutting sources to `truncate_src` tokens (if set), then dropping empty pairs and
    those over the length limits (counted, for the log)."""
    src_ids, tgt_ids = src_tok.encode_batch(list(src_lines)), tgt_tok.encode_batch(list(tgt_lines))
    out = Examples([], [])
    for s, t in zip(src_ids, tgt_ids):
        if truncate_src:
            s = s[:truncate_src]
        if not s or not t:
            out.dropped_empty += 1
        elif len(s) > max_src_len or len(t) > max_tgt_len:
            out.dropped_long += 1
        else:
            out.src.append(s)
            out.tgt.append(t)
    return out


@dataclass
class Batch:
    src: torch.Tensor  # (B, S) source ids, PAD after each sentence's end
    src_lens: torch.Tensor  # (B,)
    tgt_in: torch.Tensor  # (B, T) BOS + target
    tgt_out: torch.Tensor  # (B, T) target + EOS
    n_tgt_tokens: int  # non-pad target tokens (EOS included)

    @property
    def size(self) -> int:
        return self.src.size(0)

    def to(self, device: torch.device) -> Batch:
        return Batch(self.src.to(device), self.src_lens.to(device), self.tgt_in.to(device), self.tgt_out.to(device),
                     self.n_tgt_tokens)


def pad(seqs: Sequence[Sequence[int]], prefix: Sequence[int] = (), suffix: Sequence[int] = ()) -> torch.Tensor:
    width = max(len(s) for s in seqs) + len(prefix) + len(suffix)
    out = torch.full((len(seqs), width), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        row = [*prefix, *s, *suffix]
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def make_batch(src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]]) -> Batch:
    tgt_out = pad(tgt, suffix=[EOS])
    return Batch(
        src=pad(src),
        src_lens=torch.tensor([len(s) for s in src], dtype=torch.long),
        tgt_in=pad(tgt, prefix=[BOS]),
        tgt_out=tgt_out,
        n_tgt_tokens=int((tgt_out != PAD).sum()),
    )


def bucket_batches(src_lens: Sequence[int], tgt_lens: Sequence[int], batch_tokens: int, seed: int,
                   sentences: int = 0) -> list[list[int]]:
    """Group example indices into batches of about `batch_tokens` padded tokens, or of exactly `sentences`
    examples (the last batch may hold fewer) when that is set, shuffled by `seed`.

    Examples are sorted by length (ties broken at random) so each batch holds similar lengths and
    little padding; the batch order is then shuffled. A fixed sentence count gives far fewer matrix shapes
    than a token budget: on the CPU in bf16, oneDNN builds and keeps a kernel for each new shape.
    """
    rng = random.Random(seed)
    noise = [rng.random() for _ in src_lens]
    order = sorted(range(len(src_lens)), key=lambda i: (tgt_lens[i], src_lens[i], noise[i]))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = max(src_lens[i], tgt_lens[i] + 1)
        full = len(current) == sentences if sentences else max(longest, n) * (len(current) + 1) > batch_tokens
        if current and full:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def epoch_batches(examples: Examples, batch_tokens: int, seed: int, sentences: int = 0) -> list[list[int]]:
    return bucket_batches([len(s) for s in examples.src], [len(t) for t in examples.tgt], batch_tokens, seed,
                          sentences)
