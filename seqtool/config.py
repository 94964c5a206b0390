"""The experiment schema: one YAML file with data, tokenizer, model, training and decoding sections.

Validated when loaded; unknown keys and bad values are reported together, each by its dotted name.
"""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from seqtool.errors import ConfigError
from seqtool.metrics import METRICS, unknown_names

DEVICE = r"^(auto|cpu|cuda(:\d+)?)$"
ContextVector = Literal["last", "last_transform", "mean", "max"]  # model.context_vector: how c is formed
SHORTLIST_TABLE = 100  # associated target tokens a model file keeps per source token (decoding.shortlist's most)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    train_src: Optional[Union[str, list[str]]] = Field(
        default=None, description="a file, a glob pattern, or a list of them (shards)")
    train_tgt: Optional[Union[str, list[str]]] = Field(
        default=None, description="the target files, in the order of train_src")
    valid_src: Optional[str] = None
    valid_tgt: Optional[str] = None
    max_src_len: int = Field(default=100, gt=0, description="training pairs with more source tokens are dropped")
    max_tgt_len: int = Field(default=100, gt=0, description="training pairs with more target tokens are dropped")
    truncate_src: int = Field(
        default=0, ge=0, description="cut sources to this many tokens (training and decoding); 0 = off")
    stream: bool = Field(
        default=False, description="read training pairs from disk each epoch instead of holding them in memory")
    shuffle_buffer: int = Field(
        default=100_000, gt=0, description="stream: pairs held at once for shuffling and length bucketing")


class TokenizerConfig(Section):
    type: Literal["bpe", "unigram", "char", "word"] = "bpe"
    vocab_size: int = Field(default=8000, ge=8, le=1_000_000)
    joint: bool = True
    character_coverage: float = Field(default=1.0, gt=0.0, le=1.0)
    max_sentences: int = Field(default=2_000_000, gt=0, description="lines sampled to train sentencepiece")
    model: Optional[Union[str, list[str]]] = Field(
        default=None, description="an existing sentencepiece model instead of training one: a file (joint: true), "
                                  "or [source, target] (joint: false); vocab_size is then the file's. It travels "
                                  "inside the model file like a trained one")

    @model_validator(mode="after")
    def _own_model(self) -> TokenizerConfig:
        if isinstance(self.model, list) and (len(self.model) != 2 or self.joint):
            raise ValueError("tokenizer.model as a list is [source, target] with tokenizer.joint false; one file "
                             "serves both sides with joint true")
        if isinstance(self.model, str) and not self.joint:
            raise ValueError("tokenizer.model is one file, which both sides share: set tokenizer.joint true, or "
                             "give [source, target]")
        return self


class ModelConfig(Section):
    cell: str = Field(default="gru", description="the RNN of encoder and decoder: a name in "
                      "seqtool.model.encoder.RNN_CELLS (gru, lstm, rnn)")
    embedding_size: int = Field(default=256, gt=0, le=65536)
    encoder_hidden_size: int = Field(default=256, gt=0, le=65536)
    encoder_layers: int = Field(default=1, gt=0, le=16)
    bidirectional: bool = True
    hidden_size: int = Field(default=512, gt=0, le=65536)
    decoder_layers: int = Field(default=1, gt=0, le=16)
    context: Literal["init", "every_step", "attention"] = "attention"
    context_vector: Optional[ContextVector] = Field(
        default=None, description="how the context vector c is formed from the encoder states h_1..h_T: last "
        "(c = h_T), last_transform (c = tanh(W h_T)), mean or max (pooled over the real tokens); init starts the "
        "decoder at c, every_step also reads c at every step (and starts at tanh(V c)), attention starts at tanh(V "
        "c). Unset: the mode's classic c (see c_form)")
    attention: Literal["bahdanau", "luong_dot", "luong_general", "luong_concat"] = "bahdanau"
    input_feeding: bool = False
    dropout: float = Field(default=0.3, ge=0.0, lt=1.0)
    tie_embeddings: bool = False
    init_scale: float = Field(default=0.0, ge=0.0, le=1.0, description="every weight starts uniform in (-s, s), as in "
                              "OpenNMT-py (0.1 there); 0 keeps torch's per-layer defaults")
    copy_source: bool = Field(
        default=False, description="pointer-generator: mix generating a token with copying a source "
                                   "token by attention (context attention and a joint tokenizer)")

    @field_validator("cell")
    @classmethod
    def _known_cell(cls, name: str) -> str:
        # The cells' one home is the encoder's table. Imported here, not at the top, so that this module
        # stays torch-free (fast --help and config checks); a config naming a cell is about to build a model.
        from seqtool.model.encoder import RNN_CELLS

        if name not in RNN_CELLS:
            raise ValueError(f"model.cell {name!r}: choose from {', '.join(RNN_CELLS)}")
        return name

    @property
    def c_form(self) -> ContextVector:
        """How c is formed: context_vector, or where it is unset the mode's classic c, which model files from before
        the key hold: init's first state is tanh(W h_T), the other modes' c is h_T. Resolved here, not stored, so a
        saved config.yaml reused with another model.context gets that mode's classic c."""
        if self.context_vector is not None:
            return self.context_vector
        return "last_transform" if self.context == "init" else "last"

    @model_validator(mode="after")
    def _combinations(self) -> ModelConfig:
        """Combinations the field types alone cannot reject, all reported together."""
        problems = []
        enc_size = self.encoder_hidden_size * (2 if self.bidirectional else 1)
        if self.context == "init" and self.c_form != "last_transform" and enc_size != self.hidden_size:
            problems.append(f"model.context_vector {self.c_form} with context init starts the decoder at c "
                            f"itself: it needs model.hidden_size ({self.hidden_size}) equal to the encoder output "
                            f"size ({enc_size} = encoder_hidden_size x directions); or use last_transform")
        if self.context == "attention" and self.attention == "luong_dot" and enc_size != self.hidden_size:
            problems.append(f"model.attention luong_dot needs model.hidden_size ({self.hidden_size}) equal to the "
                            f"encoder output size ({enc_size} = encoder_hidden_size x directions); use luong_general "
                            "or bahdanau")
        if self.input_feeding and not (self.context == "attention" and self.attention != "bahdanau"):
            problems.append("model.input_feeding applies to luong_* attention only")
        if self.copy_source and self.context != "attention":
            problems.append("model.copy_source copies by attention: it needs model.context attention")
        if problems:
            raise ValueError("; ".join(problems))
        return self


MAX_VALUES = 100_000  # values in a whole config: far more than any setting takes
# A wrong value in an error message: its start, not megabytes of it (a long list under a number's key).
SHOWN = reprlib.Repr()
SHOWN.maxlevel, SHOWN.maxstring, SHOWN.maxother, SHOWN.maxlist, SHOWN.maxdict = 2, 60, 60, 5, 5
SEED_MAX = 2**63 - 1  # torch's generators take a 64-bit seed: a larger one was an internal OverflowError


class TrainingConfig(Section):
    model_dir: str = "runs/model"
    seed: int = Field(default=42, ge=0, le=SEED_MAX)
    batch_tokens: int = Field(default=2000, gt=0, description="padded target tokens per batch")
    batch_sentences: int = Field(
        default=0, ge=0, description="sentences per batch instead of batch_tokens (Joey NMT's and OpenNMT-py's "
                                     "sentence batches); 0 = a token budget")
    lr: float = Field(default=1e-3, gt=0.0, le=10.0)
    schedule: Literal["constant", "plateau", "inverse_sqrt"] = "constant"
    warmup_steps: int = Field(default=1000, ge=0)
    plateau_factor: float = Field(default=0.5, gt=0.0, lt=1.0)
    plateau_patience: int = Field(default=2, ge=0)
    min_lr: float = Field(default=1e-6, ge=0.0)
    clip_grad_norm: float = Field(default=1.0, ge=0.0, description="0 disables clipping")
    label_smoothing: float = Field(default=0.1, ge=0.0, lt=1.0)
    max_epochs: int = Field(default=30, ge=0, description="0 means no limit")
    max_steps: int = Field(default=0, ge=0, description="0 means no limit")
    max_minutes: float = Field(default=0.0, ge=0.0, description="wall-clock budget; 0 means no limit")
    valid_every: int = Field(default=500, gt=0)
    valid_max_sentences: int = Field(
        default=0, ge=0, description="decode only this many dev lines for the dev scores; 0 = all")
    valid_metrics: list[str] = Field(
        default=["bleu"], description="scores of the greedy dev-set decode logged at each validation (names as in "
                                      "seqtool evaluate --metrics)")
    keep_best_by: str = Field(
        default="bleu", description="dev-set score that picks model.safetensors: loss, or a metric (bleu, chrf, "
                                    "bleu_char, rouge = mean of ROUGE-1/2/L F1); computed whether listed or not")
    keep_last: int = Field(
        default=0, ge=0, le=1000, description="also keep the models of the last N validations (seqtool average)")
    tensorboard: bool = Field(default=False, description="also write the metrics as TensorBoard events to "
                              "MODEL_DIR/tensorboard (pip install -e \".[tensorboard]\")")
    patience: int = Field(default=10, ge=0, description="validations without improvement before stopping; 0 = never")
    threads: int = Field(default=0, ge=0, le=4096, description="torch threads; 0 = one per core")
    device: str = Field(
        default="auto", pattern=DEVICE, description="auto (a CUDA GPU if there is one), cpu, cuda or cuda:N")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="auto: bf16 or fp16 mixed precision on CUDA; on the CPU bf16 where it has native bf16 "
                    "(amx_bf16, avx512_bf16: the forward pass on bf16 copies of the fp32 weights), else fp32")
    on_nan: Literal["skip", "stop"] = Field(
        default="skip", description="a batch whose loss is NaN/inf: skip it, or stop training")

    @field_validator("valid_metrics")
    @classmethod
    def _known_metrics(cls, names: list[str]) -> list[str]:
        problem = unknown_names(names)
        if problem is not None:
            raise ValueError(f"training.valid_metrics: {problem}")
        return names

    @field_validator("keep_best_by")
    @classmethod
    def _selecting_metric(cls, name: str) -> str:
        choices = ["loss", *(n for n, m in METRICS.items() if m.selects)]
        if name not in choices:
            raise ValueError(f"training.keep_best_by {name!r}: choose from {', '.join(choices)}")
        return name

    @model_validator(mode="after")
    def _min_lr_below_lr(self) -> TrainingConfig:
        if self.min_lr > self.lr:  # a floor above the rate would silently raise it
            raise ValueError(f"training.min_lr {self.min_lr:g} is above training.lr {self.lr:g}")
        return self


class DecodingConfig(Section):
    beam_size: int = Field(default=5, gt=0, le=256)
    length_penalty: float = Field(default=1.0, ge=0.0, le=10.0, description="GNMT alpha; 0 = raw log-probability")
    coverage_penalty: float = Field(
        default=0.0, ge=0.0, le=10.0, description="GNMT beta (attention models, beam search)")
    max_len_a: float = Field(default=1.5, ge=0.0, le=100.0)
    max_len_b: int = Field(default=10, ge=0, le=10000)
    min_len: int = Field(default=1, ge=0, le=10000, description="fewest output tokens")
    max_len: int = Field(default=0, ge=0, le=100000, description="most output tokens; 0 = only max_len_a/b")
    no_repeat_ngram: int = Field(default=0, ge=0, le=100, description="block repeating n-grams of this size; 0 = off")
    sample: bool = Field(
        default=False, description="draw tokens at random instead of searching (beam_size is then ignored)")
    temperature: float = Field(default=1.0, gt=0.0, le=100.0)
    top_k: int = Field(default=0, ge=0, description="sample among the k most probable tokens; 0 = all")
    top_p: float = Field(
        default=1.0, gt=0.0, le=1.0, description="sample within the smallest set of this probability mass")
    seed: int = Field(default=0, ge=0, le=SEED_MAX, description="seed for sampling")
    exact_length: bool = Field(default=False, description="output exactly as many tokens as the input (couplets)")
    copy_punctuation: bool = Field(
        default=False, description="punctuation of the input at the same positions (needs exact_length)")
    final_tone: bool = Field(
        default=False, description="couplets: the last character's tone answers the input's (仄 by 平, 平 by 仄)")
    mirror_repeats: bool = Field(
        default=False, description="couplets: a character repeats exactly where the input's does")
    no_echo: bool = Field(default=False, description="couplets: no character of the input at its own position")
    nbest: int = Field(default=1, gt=0)
    batch_size: int = Field(default=64, gt=0, le=100000, description="sentences per decoding batch")
    buffer_lines: int = Field(default=2000, gt=0, description="lines read ahead and sorted by length")
    max_input_tokens: int = Field(default=1024, gt=0, description="longer inputs are truncated with a warning")
    device: str = Field(
        default="auto", pattern=DEVICE, description="auto (a CUDA GPU if there is one), cpu, cuda or cuda:N")
    quantize: bool = Field(
        default=False, description="lower precision for CPU decoding, of the kind decoding.quantize_kind names")
    quantize_kind: Literal["int8", "bf16"] = Field(
        default="int8", description="with quantize: int8 (dynamic quantization of the linear and RNN layers; the "
                                    "faster) or bf16 (a bf16 copy of the model, BLEU as fp32; CPUs with native bf16)")
    shortlist: int = Field(default=0, ge=0, le=SHORTLIST_TABLE, description="output layer cut to each source token's N "
                           "likeliest target tokens + the most frequent ones (faster decoding); 0 = whole vocabulary")
    shortlist_frequent: int = Field(
        default=300, ge=0, description="with shortlist: the most frequent target tokens every line keeps")

    @model_validator(mode="after")
    def _nbest_fits(self) -> DecodingConfig:
        # A beam holds beam_size hypotheses and sampling draws one: more would be silently fewer.
        if self.sample and self.nbest > 1:
            raise ValueError(f"decoding.nbest {self.nbest} with decoding.sample: sampling draws one output per line")
        if not self.sample and self.nbest > self.beam_size:
            raise ValueError(f"decoding.nbest {self.nbest} is more than decoding.beam_size {self.beam_size}: a beam "
                             f"keeps at most beam_size hypotheses (e.g. --beam {self.nbest} --nbest {self.nbest})")
        return self


class Config(Section):
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    decoding: DecodingConfig = DecodingConfig()

    @model_validator(mode="after")
    def _cross_section_constraints(self) -> Config:
        d, problems = self.decoding, []
        if d.copy_punctuation and not d.exact_length:
            problems.append("decoding.copy_punctuation needs decoding.exact_length: true")
        for rule in ("final_tone", "mirror_repeats", "no_echo"):
            if getattr(d, rule) and not (d.exact_length and d.copy_punctuation):
                problems.append(f"decoding.{rule} needs decoding.exact_length and copy_punctuation: true (it compares "
                                "the characters of the two lines position by position)")
        if d.exact_length and self.tokenizer.type != "word":
            problems.append("decoding.exact_length needs tokenizer.type word (one token per character, as couplets)")
        if self.model.copy_source and not self.tokenizer.joint:
            problems.append("model.copy_source needs tokenizer.joint: true (a copied source token must be a target "
                            "token)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _section_fields(loc: tuple) -> list[str]:
    """Valid key names at the place an unknown key was found."""
    model: Any = Config
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        model = field.annotation
    return list(model.model_fields) if hasattr(model, "model_fields") else []


def _describe(err: ErrorDetails) -> str:
    loc = tuple(err["loc"])
    name = ".".join(str(p) for p in loc) or "config"
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _section_fields(loc), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"unknown key {name}{hint}"
    if err["type"] == "value_error":  # cross-field checks say their own names
        return err["msg"].removeprefix("Value error, ")
    return f"{name}: {err['msg']} (got {SHOWN.repr(err['input'])})"


def _too_big(raw: Any) -> bool:
    """Whether `raw` holds more than MAX_VALUES values, counted as validation would walk them: YAML aliases
    repeat a value in place, and nine levels of them in 400 bytes are a billion."""
    stack, seen = [raw], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            return True
        if isinstance(node, dict):
            stack += [*node.keys(), *node.values()]
        elif isinstance(node, list):
            stack += node
    return False


def validate(raw: Any) -> Config:
    """Build a Config from plain data, turning every problem into one ConfigError."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("config must be a mapping of sections (data, tokenizer, model, training, decoding)")
    if _too_big(raw):
        raise ConfigError(f"the config holds more than {MAX_VALUES:,} values (YAML aliases repeat theirs in place); "
                          "no setting takes that many")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("invalid config: " + "; ".join(_describe(e) for e in exc.errors())) from None


def parse_override(expr: str) -> tuple[list[str], Any]:
    """'section.key=value' -> (['section', 'key'], value parsed as YAML)."""
    key, sep, value = expr.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set expects section.key=value, got {expr!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except (yaml.YAMLError, ValueError):  # ValueError: an integer past Python's 4,300 digits
        raise ConfigError(f"--set {key}: cannot parse value {SHOWN.repr(value)}") from None
    return parts, parsed


def apply_overrides(raw: dict, overrides: Sequence[str], settings: Optional[dict[str, Any]] = None) -> dict:
    """The one way a command changes a config: `--set section.key=value` strings (values parsed as YAML), then
    `settings`, {"section.key": value} from a command's own flags (values as given: a file name is never YAML)."""
    pairs = [parse_override(expr) for expr in overrides] + [(k.split("."), v) for k, v in (settings or {}).items()]
    for (section, key), value in pairs:
        node = raw.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {section}.{key}: {section} is not a section")
        node[key] = value
    return raw


def load_config(path: Optional[str | Path], overrides: Sequence[str] = (),
                settings: Optional[dict[str, Any]] = None) -> Config:
    """Read a YAML config (or start from defaults when path is None), apply the overrides and settings
    (apply_overrides) and validate the result."""
    raw: Any = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"{path} is a directory, not a config file")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise ConfigError(f"{path}: not valid YAML{where}") from None
        except ValueError:  # int() of a number past Python's 4,300 digits
            raise ConfigError(f"{path}: a number in it is too long (over 4,300 digits)") from None
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return validate(apply_overrides(raw, overrides, settings))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False, allow_unicode=True)
