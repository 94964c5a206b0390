"""Decoding constraints: each rule on what a search may produce is one small object.

Every constraint has the same two duties, in every search (greedy, beam, sampling):
- `mask(lp, t, sents)`: set to -inf, in the log-probabilities `lp` (rows, V) of step t, the tokens it
  forbids; row r is a hypothesis of sentence `sents[r]` of the batch;
- `select(index, tokens, sents)`: its per-hypothesis state for the next step, where new row r continues
  row `index[r]` with `tokens[r]` and belongs to sentence `sents[r]` (a stateless rule returns itself).
A constraint that works towards a goal (phrases to include) also ranks beam candidates by progress
(`ranks`, `bank`, `advancing`): beam search then shares its beam among hypotheses that met different
numbers of constraint tokens, the dynamic beam allocation of Post & Vilar (2018).

`make_rules` builds the list for a batch from the decoding config and each line's own controls
(`LineSpec`); `line_problem` says, before any search, why a line's controls cannot all be met.
Token ids are the search's: with a shortlist, positions in its sorted ids (`space`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple, Optional, cast

import torch

from seqtool.config import DecodingConfig
from seqtool.tokenizer import BOS, EOS, PAD, UNK

NEG = float("-inf")
Phrase = tuple[int, ...]


class Constraint:
    """A rule that forbids nothing and has no state; subclasses override what they need."""

    rule: ClassVar[str] = "the decoding rules"  # what a user set to get this rule, for `prefix_problem`'s messages
    ranks: ClassVar[bool] = False  # whether `bank` and `advancing` say anything
    soft: ClassVar[bool] = False  # a heuristic that yields where it would leave a hypothesis no token at all

    def mask(self, lp: torch.Tensor, t: int, sents: torch.Tensor) -> torch.Tensor:
        """Step t's log-probabilities (rows, V) with the tokens this rule forbids at -inf; it may write into lp,
        which each step makes anew (Rules.mask gives the soft rules a copy)."""
        return lp

    def select(self, index: torch.Tensor, tokens: torch.Tensor, sents: torch.Tensor) -> Constraint:
        return self

    def bank(self, row: int, sent: int, token: int) -> int:
        """Constraint tokens met once row `row` takes `token`."""
        return 0

    def advancing(self, row: int, sent: int) -> Sequence[int]:
        """Tokens that would take row `row` closer to meeting the constraint."""
        return ()


def _column(table: torch.Tensor, t: int, sents: torch.Tensor) -> torch.Tensor:
    """Each row's entry at step t of its sentence's row of a (B, T) table; -1 past the table's end."""
    return table[sents, t] if t < table.size(1) else torch.full_like(sents, -1)


def _keep_only(lp: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> None:
    """In place: row rows[i] may only produce tokens[i]."""
    if rows.numel():
        keep = lp[rows, tokens]
        lp[rows] = NEG
        lp[rows, tokens] = keep


@dataclass
class Banned(Constraint):
    """Tokens never produced (PAD, BOS, UNK, pieces that would break a line)."""

    tokens: torch.Tensor  # (n,) their ids in the search

    def mask(self, lp, t, sents):
        # Their columns only, in place: a masked_fill over the (rows, V) scores read and copied all of them,
        # 2.2 against 0.03 ms a step for beam 5 of 64 sentences over 8,000 tokens.
        return lp.index_fill_(1, self.tokens, NEG)


@dataclass
class MinLength(Constraint):
    """No EOS before a sentence has this many tokens."""

    min_len: torch.Tensor  # (B,)

    def mask(self, lp, t, sents):
        lp[:, EOS] = lp[:, EOS].masked_fill(self.min_len[sents] > t, NEG)
        return lp


@dataclass
class Forced(Constraint):
    """Tokens forced at given steps: a target prefix, and for couplets the input's punctuation in place
    and EOS right after the last position (exact length). Elsewhere `free_banned` tokens are banned
    (copied punctuation appears nowhere else)."""

    table: torch.Tensor  # (B, T) token forced at step t, -1 where free
    free_banned: Optional[torch.Tensor] = None  # (V,) bool

    def mask(self, lp, t, sents):
        f = _column(self.table, t, sents)
        free = f < 0
        if self.free_banned is not None:
            lp = lp.masked_fill(free.unsqueeze(1) & self.free_banned.unsqueeze(0), NEG)
        rows = (~free).nonzero().squeeze(1)
        _keep_only(lp, rows, f[rows])
        return lp


@dataclass
class NoRepeatNgram(Constraint):
    """No n-gram twice in a hypothesis, unless the other rules leave nothing else (a phrase to include may
    repeat an n-gram the output already has)."""

    soft: ClassVar[bool] = True

    n: int
    history: Optional[list[Phrase]] = None  # per row, the tokens so far (None: nothing yet)

    def mask(self, lp, t, sents):
        n = self.n
        for row, hist in enumerate(self.history or [()] * lp.size(0)):
            if len(hist) >= n - 1:
                prefix = hist[len(hist) - n + 1:] if n > 1 else ()
                seen = [hist[i + n - 1] for i in range(len(hist) - n + 1) if hist[i:i + n - 1] == prefix]
                if seen:
                    lp[row, seen] = NEG
        return lp

    def select(self, index, tokens, sents):
        old = self.history
        return NoRepeatNgram(self.n, [(old[i] if old else ()) + (tok,)
                                      for i, tok in zip(index.tolist(), tokens.tolist())])


@dataclass
class Avoid(Constraint):
    """Phrases (one or more tokens) that never appear: a phrase's last token is banned right after the rest."""

    singles: torch.Tensor  # (B, V) bool: one-token phrases of each sentence
    follow: list[dict[Phrase, list[int]]]  # per sentence: the tokens before a longer phrase's last -> its last tokens
    keep: int  # tokens of history a row needs (longest phrase - 1)
    tails: Optional[list[Phrase]] = None  # per row, its last `keep` tokens

    def mask(self, lp, t, sents):
        lp = lp.masked_fill(self.singles[sents], NEG)
        if self.tails is not None:
            for row, (s, tail) in enumerate(zip(sents.tolist(), self.tails)):
                follow = self.follow[s]
                banned = [tok for j in range(1, len(tail) + 1) for tok in follow.get(tail[-j:], ())]
                if banned:
                    lp[row, banned] = NEG
        return lp

    def select(self, index, tokens, sents):
        if not self.keep:
            return self
        old = self.tails
        tails = [((old[i] if old else ()) + (tok,))[-self.keep:] for i, tok in zip(index.tolist(), tokens.tolist())]
        return Avoid(self.singles, self.follow, self.keep, tails)


@dataclass
class Mirror(Constraint):
    """Couplets' repetition: a character repeats exactly where the input's does (叠字 AA -> BB, 重字 ABA ->
    CDC) and nowhere else, so that no repetition in the output is an accident."""

    rule: ClassVar[str] = "decoding.mirror_repeats"
    # (B, T) per step: the earlier step whose token it repeats, itself where it must be new, -1: free
    pattern: torch.Tensor
    history: Optional[torch.Tensor] = None  # (rows, t) tokens so far

    def mask(self, lp, t, sents):
        if self.history is None:
            return lp
        p = _column(self.pattern, t, sents)
        rows = ((p >= 0) & (p < t)).nonzero().squeeze(1)
        _keep_only(lp, rows, self.history[rows, p[rows]])
        new = (p == t).unsqueeze(1) & (self.pattern[sents, : min(t, self.pattern.size(1))] >= 0)
        r, c = new.nonzero(as_tuple=True)
        lp[r, self.history[r, c]] = NEG
        return lp

    def select(self, index, tokens, sents):
        step = tokens.unsqueeze(1)
        return Mirror(self.pattern, step if self.history is None else torch.cat([self.history[index], step], 1))


@dataclass
class NoEcho(Constraint):
    """No character of the input at its own position in the output (合掌, an echo of the upper line)."""

    rule: ClassVar[str] = "decoding.no_echo"
    table: torch.Tensor  # (B, T) the token banned at each step, -1 where none

    def mask(self, lp, t, sents):
        e = _column(self.table, t, sents)
        rows = (e >= 0).nonzero().squeeze(1)
        lp[rows, e[rows]] = NEG
        return lp


@dataclass
class Tone(Constraint):
    """Tones asked at given steps: couplets' last character answers the input's (仄 by 平, 平 by 仄), a poem's
    even lines end on 平. Tokens without a tone (seqtool.hanzi) are banned there too."""

    rule: ClassVar[str] = "the tone asked of the line's end (decoding.final_tone; a poem's line ends)"
    table: torch.Tensor  # (B, T) tone asked at each step, -1 where any
    tones: torch.Tensor  # (V,) each token's tone (seqtool.hanzi.NONE / PING / ZE)

    def mask(self, lp, t, sents):
        want = _column(self.table, t, sents).unsqueeze(1)
        return lp.masked_fill((want >= 0) & (self.tones.unsqueeze(0) != want), NEG)


class State(NamedTuple):
    """Where a hypothesis stands with its phrases to include."""

    met: int  # bitmask of the phrases met, counting those the last token completed
    tail: Phrase  # the longest suffix of the output that begins a phrase not in `met`
    pending: int = 0  # of `met`, those the last token completed: a next token that continues the word undoes them
    wider: Phrase = ()  # the same suffix for the phrases not in met & ~pending, to go on from if they are undone


START = State(0, ())


@dataclass
class Include(Constraint):
    """Phrases that each appear somewhere in the output, in any order.

    A hypothesis may not end before all are met, and it may only take a token after which the phrases
    still unmet can be placed, each inside one run of free steps (steps no other rule forces: couplets'
    punctuation cuts a line into runs) before the length limit. So every output meets every constraint
    that fits, and a model is steered only when it must be. Beam search also ranks candidates by
    constraint tokens met (`bank`), so hypotheses that placed a phrase early survive beside those that
    did not (Post & Vilar 2018).

    A phrase ends where a word ends ('Ba' is not met by 'Bavo'): the search may not take a `glue` token right
    after it, and where another rule forces one there (a prefix), the phrase counts as unmet again."""

    ranks: ClassVar[bool] = True
    phrases: list[tuple[Phrase, ...]]  # per sentence
    runs: list[list[tuple[int, int]]]  # per sentence: [start, end) of each run of free steps
    glue: frozenset[int] = frozenset()  # tokens that continue a word, banned right after a phrase
    states: Optional[list[State]] = None  # per row
    memo: dict = field(default_factory=dict)  # shared by the copies `select` makes: everything here is pure

    def _state(self, row: int) -> State:
        return self.states[row] if self.states is not None else START

    def _cached(self, key: tuple, compute):
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]

    def transition(self, sent: int, state: State, token: int) -> State:
        return self._cached(("next", sent, state, token), lambda: self._transition(sent, state, token))

    def _transition(self, sent: int, state: State, token: int) -> State:
        met, tail, pending, wider = state
        if pending and token in self.glue:  # the word goes on: the phrases the last token completed are not met
            met, tail = met & ~pending, wider
        seen = tail + (token,)  # `tail` is long enough to hold any unmet phrase but its last token
        done = sum(1 << i for i, p in enumerate(self.phrases[sent]) if not met >> i & 1 and seen[-len(p):] == p)
        return State(met | done, self._suffix(sent, met | done, seen), done,
                     self._suffix(sent, met, seen) if done else ())

    def _suffix(self, sent: int, met: int, seen: Phrase) -> Phrase:
        """The longest suffix of `seen` that begins (and is shorter than) a phrase not in `met`."""
        unmet = self._unmet(sent, met)
        start = next((k for k in range(len(seen))
                      if any(len(seen) - k < len(p) and p[: len(seen) - k] == seen[k:] for p in unmet)), len(seen))
        return seen[start:]

    def _unmet(self, sent: int, met: int) -> list[Phrase]:
        return [p for i, p in enumerate(self.phrases[sent]) if not met >> i & 1]

    def met_tokens(self, sent: int, state: State) -> int:
        met, tail = state.met, state.tail
        return sum(len(p) for i, p in enumerate(self.phrases[sent]) if met >> i & 1) + len(tail)

    def _candidates(self, sent: int, state: State) -> set[int]:
        """Tokens that continue some unmet phrase from some suffix of the output (the empty one included)."""
        met, tail = state.met, state.tail
        return {p[k] for p in self._unmet(sent, met) for k in range(min(len(tail), len(p) - 1) + 1)
                if p[:k] == tail[len(tail) - k:]}

    def needs(self, sent: int, state: State) -> tuple[int, list[int]]:
        """(Constraint tokens still to produce, the tokens that make progress: more constraint tokens met.)"""
        def compute():
            have = self.met_tokens(sent, state)
            advancing = sorted(tok for tok in self._candidates(sent, state)
                               if self.met_tokens(sent, self.transition(sent, state, tok)) > have)
            return sum(len(p) for p in self.phrases[sent]) - have, advancing
        return self._cached(("needs", sent, state), compute)

    def _room(self, sent: int, t: int) -> tuple[int, tuple[int, ...]]:
        """(Free steps left in the run that step t is in, 0 if t is not free; lengths of the later runs.)"""
        here, later = 0, []
        for start, end in self.runs[sent]:
            if start <= t < end:
                here = end - t
            elif start > t:
                later.append(end - start)
        return here, tuple(later)

    def _packs(self, lengths: tuple[int, ...], room: tuple[int, ...]) -> bool:
        """Whether phrases of these lengths fit, each inside one run with this much room (largest first)."""
        def compute():
            if not lengths:
                return True
            first, rest = lengths[0], lengths[1:]
            tried = set()
            for i, r in enumerate(room):
                if r >= first and r not in tried:
                    tried.add(r)
                    if self._packs(rest, tuple(sorted(room[:i] + (r - first,) + room[i + 1:], reverse=True))):
                        return True
            return False
        return self._cached(("packs", lengths, room), compute)

    def feasible(self, sent: int, state: State, t: int) -> bool:
        """Whether, from step t on, every unmet phrase can still be placed: fresh, or the one the output
        is in the middle of continued right away."""
        met, tail = state.met, state.tail
        here, later = self._room(sent, t)
        unmet = self._unmet(sent, met)
        def lengths(ps):
            return tuple(sorted((len(p) for p in ps), reverse=True))
        if self._packs(lengths(unmet), tuple(sorted((here, *later), reverse=True))):
            return True
        for i, p in enumerate(unmet):
            for k in range(1, min(len(tail), len(p) - 1) + 1):
                rest = len(p) - k
                if p[:k] == tail[len(tail) - k:] and rest <= here and \
                        self._packs(lengths(unmet[:i] + unmet[i + 1:]),
                                    tuple(sorted((here - rest, *later), reverse=True))):
                    return True
        return False

    def allowed(self, sent: int, state: State, t: int) -> Optional[list[int]]:
        """The tokens step t may take (None: any), at a free step."""
        def compute():
            unmet = self._unmet(sent, state.met)
            here, later = self._room(sent, t + 1)
            if self._packs(tuple(sorted((len(p) for p in unmet), reverse=True)),
                           tuple(sorted((here, *later), reverse=True))):
                return None  # whatever comes now, there is room left for every phrase
            ok = sorted(tok for tok in self._candidates(sent, state)
                        if self.feasible(sent, self.transition(sent, state, tok), t + 1))
            return ok or self.needs(sent, state)[1]  # none fits (a rule outside this one forced a token): progress
        return self._cached(("allowed", sent, state, t), compute)

    def mask(self, lp, t, sents):
        rows, tokens = [], []
        glued = []
        for row, s in enumerate(sents.tolist()):
            state = self._state(row)
            if state.pending and self.glue and self._room(s, t)[0]:  # a phrase just ended: so must
                glued.append(row)  # its word (where no other rule forces the token; _transition sees to that)
            if not self.needs(s, state)[0]:
                continue
            lp[row, EOS] = NEG
            if self._room(s, t)[0]:
                allowed = self.allowed(s, state, t)
                if allowed is not None:
                    rows += [row] * len(allowed)
                    tokens += allowed
        if rows:
            keep = torch.zeros_like(lp, dtype=torch.bool)
            keep[rows, tokens] = True
            forced_rows = torch.tensor(sorted(set(rows)), device=lp.device)
            lp[forced_rows] = lp[forced_rows].masked_fill(~keep[forced_rows], NEG)
        if glued:  # the ban yields where it would leave no token (a phrase may go on with one: 6 then 4 6 5)
            index = torch.tensor(glued, device=lp.device)
            columns = self._cached(("glue", lp.device), lambda: torch.tensor(sorted(self.glue), device=lp.device))
            rows = lp[index]
            banned = rows.index_fill(1, columns, NEG)
            dead = torch.isneginf(banned.max(dim=-1).values)
            lp[index] = torch.where(dead.unsqueeze(1), rows, banned)
        return lp

    def select(self, index, tokens, sents):
        states = [self.transition(s, self._state(i), tok)
                  for i, tok, s in zip(index.tolist(), tokens.tolist(), sents.tolist())]
        return Include(self.phrases, self.runs, self.glue, states, self.memo)

    def bank(self, row, sent, token):
        return self.met_tokens(sent, self.transition(sent, self._state(row), token))

    def advancing(self, row, sent):
        return self.needs(sent, self._state(row))[1]


@dataclass
class Rules:
    """All constraints of a batch, and each sentence's length limit in steps (an output reaching it ends
    there without EOS)."""

    max_len: list[int]
    constraints: list[Constraint]

    @property
    def ranks(self) -> bool:
        return any(c.ranks for c in self.constraints)

    def mask(self, lp: torch.Tensor, t: int, sents: torch.Tensor) -> torch.Tensor:
        for c in self.constraints:
            if not c.soft:
                lp = c.mask(lp, t, sents)
        soft = [c for c in self.constraints if c.soft]
        if not soft:
            return lp
        masked = lp.clone()
        for c in soft:
            masked = c.mask(masked, t, sents)
        yields = torch.isneginf(masked.max(dim=-1).values) & ~torch.isneginf(lp.max(dim=-1).values)
        if yields.any():
            masked[yields] = lp[yields]
        return masked

    def select(self, index: torch.Tensor, tokens: torch.Tensor, sents: torch.Tensor) -> Rules:
        return Rules(self.max_len, [c.select(index, tokens, sents) for c in self.constraints])

    def bank(self, row: int, sent: int, token: int) -> int:
        return sum(c.bank(row, sent, token) for c in self.constraints if c.ranks)

    def advancing(self, row: int, sent: int) -> list[int]:
        return [tok for c in self.constraints if c.ranks for tok in c.advancing(row, sent)]


@dataclass(frozen=True)
class LineSpec:
    """One line's controls in target ids: what `make_rules` needs besides the decoding config."""

    src_len: int
    positions: Optional[Phrase] = None  # exact length: the token forced at each position, -1 where free
    prefix: Phrase = ()
    include: tuple[Phrase, ...] = ()
    avoid: tuple[Phrase, ...] = ()
    # couplets' rules, per position of an exact-length output (seqtool.verse.couplet_controls)
    mirror: Optional[Phrase] = None  # the earlier position repeated, the position itself where new, -1: free
    echo: Optional[Phrase] = None  # the token not to produce, -1: none
    tones: Optional[Phrase] = None  # the tone asked (seqtool.hanzi), -1: any

    def fixed(self) -> list[int]:
        """The token each step must take (-1 where free): prefix, positions, and EOS after exact length."""
        width = max(len(self.prefix), len(self.positions) + 1 if self.positions is not None else 0)
        out = [-1] * width
        if self.positions is not None:
            out[: len(self.positions) + 1] = [*self.positions, EOS]
        out[: len(self.prefix)] = self.prefix  # line_problem refused a prefix that disagrees with the positions
        return out

    def needed(self, glue: Collection[int] = ()) -> int:
        """Tokens the prefix and the phrases it does not already hold take (held: not followed by a `glue` token,
        which would continue its word)."""
        return len(self.prefix) + sum(len(p) for p in self.include if not _holds(self.prefix, p, glue))

    def required_tokens(self) -> list[int]:
        """Tokens the output must be able to produce (a shortlist keeps them)."""
        fixed = [tok for tok in self.fixed() if tok >= 0]
        return fixed + [tok for p in self.include for tok in p]


def _contains(seq: Sequence[int], phrase: Sequence[int]) -> bool:
    n = len(phrase)
    return any(tuple(seq[i:i + n]) == tuple(phrase) for i in range(len(seq) - n + 1))


def _holds(seq: Sequence[int], phrase: Sequence[int], glue: Collection[int]) -> bool:
    """Whether `seq` holds `phrase` as Include counts it: somewhere not followed by a glue token."""
    n = len(phrase)
    return any(tuple(seq[i:i + n]) == tuple(phrase) and (i + n == len(seq) or seq[i + n] not in glue)
               for i in range(len(seq) - n + 1))


def _repeats_ngram(seq: Sequence[int], n: int) -> bool:
    grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
    return len(grams) != len(set(grams))


def length_limit(line: LineSpec, d: DecodingConfig, glue: Collection[int] = ()) -> int:
    """Steps of the search for this line: exact length + EOS, else max_len_a * n + max_len_b (at most
    max_len), stretched by max_len_b beyond what a prefix and phrases need."""
    if line.positions is not None:
        return len(line.positions) + 1
    limit = max(1, int(d.max_len_a * line.src_len + d.max_len_b))
    need = line.needed(glue)
    if need:
        limit = max(limit, need + d.max_len_b)
    return min(limit, d.max_len) if d.max_len else limit


def line_problem(line: LineSpec, d: DecodingConfig, free_banned: Sequence[int] = (),
                 glue: Collection[int] = ()) -> Optional[str]:
    """Why this line's controls cannot all be met, or None. Checked before the search, so that a
    request that cannot be met gets a clear answer rather than an output that quietly breaks it.
    `free_banned`: copied punctuation; `glue`: tokens that continue a word (Vocab's)."""
    for p in line.include:
        for a in line.avoid:
            if len(a) <= len(p) and _contains(p, a):
                return "a constraint contains an avoided phrase"
    if line.prefix and any(_contains(line.prefix, a) for a in line.avoid if len(a) <= len(line.prefix)):
        return "the prefix contains an avoided phrase"
    punctuation = set(free_banned)
    if any(punctuation.intersection(p) and not _contains(line.prefix, p) for p in line.include):
        # The search places a phrase in a run of free steps, where copied punctuation is banned.
        return ("a constraint holds punctuation, which the output has only where the input has it: give the words "
                "on either side of it as constraints of their own")
    n = d.no_repeat_ngram
    if n and any(_repeats_ngram(seq, n) for seq in (line.prefix, *line.include)):
        return f"the prefix or a constraint repeats a {n}-gram, which decoding.no_repeat_ngram {n} forbids"
    if line.positions is not None:
        length = len(line.positions)
        if len(line.prefix) > length:
            return f"the prefix has {len(line.prefix)} tokens, more than the exact output length {length}"
        for t, tok in enumerate(line.prefix):
            if line.positions[t] >= 0 and line.positions[t] != tok:
                return f"the prefix's token {t + 1} falls where the input's punctuation is copied"
            if line.positions[t] < 0 and tok in punctuation:
                return f"the prefix's token {t + 1} is punctuation where the input has none"
    elif line.needed(glue) > length_limit(line, d, glue):
        return f"the prefix and constraints need {line.needed(glue)} tokens, more than decoding.max_len {d.max_len}"
    if line.include and not _fits(line, d, glue):
        free = sum(end - start for start, end in free_runs(line.fixed(), length_limit(line, d, glue)))
        return (f"the constraints ({sum(len(p) for p in line.include)} tokens) do not fit in the {free} free positions "
                "of the exact-length output, each phrase between two punctuation marks")
    return None


def _fits(line: LineSpec, d: DecodingConfig, glue: Collection[int]) -> bool:
    """Whether the phrases can be placed after the prefix (which may already hold some of them)."""
    include = Include([tuple(dict.fromkeys(line.include))], [free_runs(line.fixed(), length_limit(line, d, glue))],
                      frozenset(glue))
    state = START
    for tok in line.prefix:
        state = include.transition(0, state, tok)
    return include.feasible(0, state, len(line.prefix))


@dataclass(frozen=True)
class Vocab:
    """What the rules need to know of the target vocabulary (target ids)."""

    size: int
    banned: tuple[int, ...] = ()  # never produced, besides PAD, BOS and UNK
    free_banned: tuple[int, ...] = ()  # only where a position forces them (copied punctuation)
    glue: tuple[int, ...] = ()  # pieces inside a word: never right after a phrase to include
    tones: tuple[int, ...] = ()  # each token's tone (seqtool.hanzi), for rules that ask one


def make_rules(lines: Sequence[LineSpec], d: DecodingConfig, vocab: Vocab, space: Optional[torch.Tensor] = None,
               device: torch.device | str = "cpu") -> Rules:
    """The rules of a batch of lines that passed `line_problem`. With a shortlist, `space` holds its sorted
    target ids and the rules are over positions in it."""
    to = _Space(vocab.size, space, device)
    limits = [length_limit(line, d, vocab.glue) for line in lines]
    banned = cast(torch.Tensor, to.mask([PAD, BOS, UNK, *vocab.banned]))  # a list never empty: never None
    rules: list[Constraint] = [Banned(banned.nonzero().squeeze(1))]
    mins = [len(line.positions) if line.positions is not None else min(d.min_len, limit)
            for line, limit in zip(lines, limits)]
    rules.append(MinLength(torch.tensor(mins, device=device)))
    fixed = [line.fixed() for line in lines]
    if any(fixed):
        rules.append(Forced(_table([to.ids(f) for f in fixed], device), to.mask(vocab.free_banned)))
    if d.no_repeat_ngram:
        rules.append(NoRepeatNgram(d.no_repeat_ngram))
    if any(line.avoid for line in lines):
        rules.append(_avoid(lines, to, device))
    if any(line.include for line in lines):
        phrases = [tuple(dict.fromkeys(tuple(to.ids(p)) for p in line.include)) for line in lines]
        assert all(min(p) >= 0 for line in phrases for p in line), "a constraint token is not in the shortlist"
        rules.append(Include(phrases, [free_runs(f, limit) for f, limit in zip(fixed, limits)],
                             frozenset(i for i in to.ids(vocab.glue) if i >= 0)))
    if any(line.mirror for line in lines):
        rules.append(Mirror(_table([line.mirror or () for line in lines], device)))
    if any(line.echo for line in lines):
        rules.append(NoEcho(_table([to.ids(line.echo or ()) for line in lines], device)))
    if any(line.tones for line in lines):
        tones = torch.tensor(vocab.tones, dtype=torch.long)
        rules.append(Tone(_table([line.tones or () for line in lines], device),
                          (tones if space is None else tones[space.cpu()]).to(device)))
    return Rules(limits, rules)


def _table(rows: Sequence[Sequence[int]], device: torch.device | str) -> torch.Tensor:
    """(B, T) long tensor of per-step entries, -1 past each row's end."""
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([list(r) + [-1] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def prefix_problem(line: LineSpec, d: DecodingConfig, vocab: Vocab) -> Optional[str]:
    """Why the line's prefix breaks a couplet rule (a tone, a repeat), or None. The prefix is run through those
    rules as the search would take it; `line_problem` checks what the other rules ask of a prefix."""
    if not line.prefix or not (line.mirror or line.echo or line.tones):
        return None
    rules = make_rules([LineSpec(line.src_len, line.positions, line.prefix, mirror=line.mirror, echo=line.echo,
                                 tones=line.tones)], d, vocab)
    sents = torch.zeros(1, dtype=torch.long)
    for t, tok in enumerate(line.prefix):
        for c in rules.constraints:
            if not c.soft and torch.isneginf(c.mask(torch.zeros(1, vocab.size), t, sents)[0, tok]):
                return f"the prefix's token {t + 1} breaks {c.rule}"
        rules = rules.select(torch.zeros(1, dtype=torch.long), torch.tensor([tok]), sents)
    return None


def free_runs(fixed: list[int], limit: int) -> list[tuple[int, int]]:
    """[start, end) of each run of steps before `limit` that no token is forced at."""
    runs: list[tuple[int, int]] = []
    for t in range(limit):
        if t >= len(fixed) or fixed[t] < 0:
            if runs and runs[-1][1] == t:
                runs[-1] = (runs[-1][0], t + 1)
            else:
                runs.append((t, t + 1))
    return runs


def _avoid(lines: Sequence[LineSpec], to: _Space, device) -> Avoid:
    """Phrases with a token the search cannot produce (outside a shortlist) cannot appear: dropped. Lines
    with the same list (an avoid file gives every line the same) share one table."""
    singles = torch.zeros(len(lines), len(to), dtype=torch.bool)
    follow: list[dict[Phrase, list[int]]] = []
    tables: dict[tuple[Phrase, ...], tuple[list[int], dict[Phrase, list[int]]]] = {}
    for s, line in enumerate(lines):
        if line.avoid not in tables:
            table: dict[Phrase, list[int]]
            ones, table = [], {}
            for p in map(to.ids, line.avoid):
                if min(p) < 0:
                    continue
                if len(p) == 1:
                    ones.append(p[0])
                else:
                    table.setdefault(tuple(p[:-1]), []).append(p[-1])
            tables[line.avoid] = ones, table
        ones, table = tables[line.avoid]
        singles[s, ones] = True
        follow.append(table)
    keep = max((len(key) for table in follow for key in table), default=0)
    return Avoid(singles.to(device), follow, keep)


class _Space:
    """Target ids -> the search's token ids (positions in a shortlist's sorted ids, -1 if not in it)."""

    def __init__(self, vocab_size: int, space: Optional[torch.Tensor], device: torch.device | str) -> None:
        self.vocab_size, self.space, self.device = vocab_size, space, device
        self.size = vocab_size if space is None else len(space)
        self.position = None
        if space is not None:
            position = torch.full((vocab_size,), -1, dtype=torch.long)
            position[space.cpu()] = torch.arange(len(space))
            self.position = position.tolist()  # looked up token by token: a list, not tensor indexing

    def __len__(self) -> int:
        return self.size

    def ids(self, tokens: Sequence[int]) -> list[int]:
        if self.position is None:
            return list(tokens)
        return [self.position[t] if t >= 0 else -1 for t in tokens]

    def mask(self, tokens: Iterable[int]) -> Optional[torch.Tensor]:
        """(V,) bool over the search's ids, True at these target ids; None if there are none."""
        tokens = list(tokens)
        if not tokens:
            return None
        full = torch.zeros(self.vocab_size, dtype=torch.bool)
        full[tokens] = True
        return (full if self.space is None else full[self.space.cpu()]).to(self.device)
