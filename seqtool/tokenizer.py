"""Text <-> pieces <-> ids with sentencepiece (bpe, unigram, char, or pre-segmented words)."""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property

import sentencepiece as spm

from seqtool.config import TokenizerConfig
from seqtool.errors import LINE_BREAKERS, DataError, ModelFileError, SeqtoolError
from seqtool.hanzi import is_punct, is_wide

PAD, UNK, BOS, EOS = 0, 1, 2, 3

# sentencepiece reads U+2581 (its word marker) in the input as a space, so a literal one would be
# lost. It travels escaped as two private-use characters instead; the escape character escapes itself.
_ESC, _ESC_SELF, _ESC_MARK = "\ue000", "\ue001", "\ue002"
_ESCAPED = re.compile(_ESC + "([" + _ESC_SELF + _ESC_MARK + "])")


def _escape(text: str) -> str:
    return text.replace(_ESC, _ESC + _ESC_SELF).replace("\u2581", _ESC + _ESC_MARK)


def _unescape(text: str) -> str:
    return _ESCAPED.sub(lambda m: _ESC if m.group(1) == _ESC_SELF else "\u2581", text)


@dataclass(frozen=True)
class Tokenizer:
    """A loaded sentencepiece model; `model_bytes` is what travels inside a seqtool model file."""

    model_bytes: bytes
    sp: spm.SentencePieceProcessor
    word: bool = False  # tokenizer.type word: exactly one id per space-separated token

    @classmethod
    def from_bytes(cls, data: bytes, word: bool = False, origin: str = "") -> Tokenizer:
        """A serialized sentencepiece model: from inside a model file, or read from the file `origin` (a user's
        own, tokenizer.model), whose errors then say how to make one seqtool can use."""
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(data)
        except (RuntimeError, OSError, TypeError):
            raise ModelFileError(f"{origin} is not a sentencepiece model" if origin else
                                 "the tokenizer inside the model is damaged") from None
        ids = (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id())
        if ids != (PAD, UNK, BOS, EOS) and not origin:
            raise ModelFileError("tokenizer was not made by seqtool (unexpected special ids)")
        if ids != (PAD, UNK, BOS, EOS):
            raise ModelFileError(f"{origin}: its special ids are pad={ids[0]} unk={ids[1]} bos={ids[2]} eos={ids[3]}; "
                                 f"seqtool needs pad={PAD} unk={UNK} bos={BOS} eos={EOS}: train it with `seqtool "
                                 f"tokenizer train`, or spm_train --pad_id={PAD} --unk_id={UNK} --bos_id={BOS} "
                                 f"--eos_id={EOS}")
        return cls(data, sp, word)

    @classmethod
    def from_file(cls, path: str, word: bool = False) -> Tokenizer:
        try:
            with open(path, "rb") as f:
                return cls.from_bytes(f.read(), word, origin=path)
        except OSError as exc:
            raise ModelFileError(f"cannot read tokenizer {path}: {exc.strerror}") from None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        if self.word:  # sentencepiece would merge neighbouring unknown words into one <unk>
            return [self.sp.piece_to_id("\u2581" + _escape(w)) for w in self.words(text)]
        return self.sp.encode(_escape(text))

    def words(self, text: str) -> list[str]:
        """tokenizer.type word: a line's tokens, one id each. A token the vocabulary lacks that holds a CJK
        character is read as its characters: couplets are one character per token, and people type
        春风得意… without spaces."""
        out: list[str] = []
        for w in text.split():
            if len(w) > 1 and self.sp.piece_to_id("\u2581" + _escape(w)) == UNK and any(map(is_wide, w)):
                out += w
            else:
                out.append(w)
        return out

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.word:
            return [self.encode(t) for t in texts]
        return self.sp.encode([_escape(t) for t in texts])

    def pieces(self, text: str) -> list[str]:
        return [self.sp.id_to_piece(i) for i in self.encode(text)]

    def decode(self, ids: list[int]) -> str:
        """Ids -> one line of text. The search never picks an `unsafe_ids` piece; byte pieces that only
        together spell a separator (U+2028 is three bytes) are caught here: each such character is a space."""
        return LINE_BREAKERS.sub(" ", _unescape(self.sp.decode(ids)))

    def id_pieces(self, ids: Iterable[int]) -> list[str]:
        """Each id's piece as text (a literal U+2581 shown as itself, the word marker as '▁')."""
        return [_unescape(self.sp.id_to_piece(i)) for i in ids]

    def decode_pieces(self, pieces: list[str]) -> str:
        """Pieces -> one line of text, as `decode` (a byte piece <0x0A> is a space, not a line break)."""
        return LINE_BREAKERS.sub(" ", _unescape(self.sp.decode_pieces(pieces)))

    def spellings(self, text: str, limit: int = 256) -> list[list[int]]:
        """The piece sequences that decode to `text` where a word begins, canonical (`encode`) first, at most
        `limit`: a model may spell a word with other pieces than the tokenizer would ("▁r ug ed" for
        "▁r uge d"), so a phrase to avoid is banned in each of them."""
        canonical = self.encode(text)
        if self.word:
            return [canonical]
        marked = "\u2581" + "\u2581".join(_escape(text).split())
        sp = self.sp
        steps = [[(j, i) for j in range(len(marked), start, -1)  # longest pieces first: likely spellings first
                  if (i := sp.piece_to_id(marked[start:j])) != UNK and not sp.is_control(i) and not sp.is_byte(i)]
                 for start in range(len(marked))]
        out, seen = [canonical], {tuple(canonical)}

        def walk(at: int, ids: list[int]) -> None:
            if len(out) >= limit:
                return
            if at == len(marked):
                if tuple(ids) not in seen:
                    seen.add(tuple(ids))
                    out.append(list(ids))
                return
            for end, i in steps[at]:
                walk(end, ids + [i])

        walk(0, [])
        return out

    @cached_property
    def glue_ids(self) -> list[int]:
        """Pieces that continue a word (no word marker, a letter or digit first; CJK characters excepted, as
        they are words without spaces): a phrase to include ends where a word ends, not inside a longer one."""
        if self.word:
            return []
        out = []
        for i in range(self.vocab_size):
            piece = self.sp.id_to_piece(i)
            if self.sp.is_control(i) or self.sp.is_byte(i) or self.sp.is_unknown(i) or piece.startswith("\u2581"):
                continue
            if piece[0].isalnum() and not is_wide(piece[0]):
                out.append(i)
        return out

    @cached_property
    def unsafe_ids(self) -> list[int]:
        """Pieces that decode to a control character or a line separator (the byte pieces <0x0A>, <0x0D>,
        <0x1B>, ... of bpe/unigram's byte fallback, or such a character learned from the data)."""
        out = []
        for i in range(self.vocab_size):
            piece = self.sp.id_to_piece(i)
            if self.sp.is_byte(i):
                byte = int(piece[3:5], 16)  # <0xNN>; from 0x80 on, bytes are parts of longer characters
                if byte < 0x80 and LINE_BREAKERS.match(chr(byte)):
                    out.append(i)
            elif not self.sp.is_control(i) and LINE_BREAKERS.search(piece):
                out.append(i)
        return out

    @cached_property
    def punctuation(self) -> dict[str, int]:
        """Pieces made only of punctuation (，。！ etc., with or without the word marker) -> ids."""
        out = {}
        for i in range(self.vocab_size):
            text = self.sp.id_to_piece(i).lstrip("\u2581")
            if not self.sp.is_control(i) and not self.sp.is_byte(i) and is_punct(text):
                out[self.sp.id_to_piece(i)] = i
        return out


def train_tokenizer(lines: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    """Train a sentencepiece model in memory on `lines`."""
    model = io.BytesIO()
    failed: list[SeqtoolError] = []  # a bad line read from a file inside sentencepiece's loop: raised below
    # 'word' means the text is already segmented (e.g. couplets: one character per token).
    model_type = cfg.type
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(lines, failed),
            model_writer=model,
            model_type=model_type,
            vocab_size=cfg.vocab_size,
            hard_vocab_limit=False,  # vocab_size is an upper bound, so small corpora still train
            character_coverage=cfg.character_coverage,
            input_sentence_size=cfg.max_sentences,
            shuffle_input_sentence=True,
            normalization_rule_name="identity",  # keep the text exactly (no NFKC: couplet punctuation)
            byte_fallback=model_type in ("bpe", "unigram"),  # unseen characters still round-trip
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
            max_sentence_length=1 << 16,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as exc:
        if failed:
            raise failed[0] from None
        need = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(exc))
        if need:
            raise DataError(f"tokenizer.vocab_size {need.group(1)} is too small: this data needs at least "
                            f"{need.group(2)} pieces (its characters"
                            f"{', plus 256 byte pieces' if model_type in ('bpe', 'unigram') else ''})") from None
        if "!sentences_.empty()" in str(exc):
            raise DataError("no text to learn the tokenizer from: the input is empty or only blank lines") from None
        raise DataError(f"sentencepiece training failed: {str(exc).strip().splitlines()[-1]}") from None
    if failed:
        raise failed[0]
    return Tokenizer.from_bytes(model.getvalue(), word=model_type == "word")


def _training_lines(lines: Iterable[str], failed: list[SeqtoolError]) -> Iterator[str]:
    """Non-empty lines, escaped as encode() will see them; a user error reading them is kept in `failed`
    (sentencepiece would turn it into its own message)."""
    try:
        for line in lines:
            if line.strip():
                yield _escape(line)
    except SeqtoolError as exc:
        failed.append(exc)
