"""Search: greedy and batched beam search over a model's `encode` / `step` interface.

Both return, per source sentence, a list of hypotheses (best first); tokens exclude EOS.
With a shortlist (`BatchVocab`), tokens are positions in its ids until the results are mapped back.
`Rules` say what the next token may be: length limits, tokens never generated, tokens forced at
a position (couplets: exact length, punctuation copied in place) and n-gram repeat blocking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from seqtool.model.seq2seq import Seq2Seq
from seqtool.shortlist import BatchVocab
from seqtool.tokenizer import BOS, EOS, PAD, UNK

NEG = float("-inf")


@dataclass
class Hypothesis:
    tokens: list[int]
    score: float  # log-probability / length penalty (+ coverage penalty)
    complete: bool = True  # False: the rules allowed no further token before EOS; the best unfinished one


def length_penalty(length: int, alpha: float) -> float:
    """GNMT length penalty ((5 + L) / 6) ** alpha (Wu et al. 2016); 1 when alpha is 0."""
    return ((5.0 + length) / 6.0) ** alpha


@dataclass
class Rules:
    """Per-sentence constraints on the next token, applied to the log-probabilities of each step."""

    min_len: torch.Tensor  # (B,) EOS is banned until this many tokens were produced
    max_len: list[int]  # most steps per sentence (output tokens, or output tokens + EOS)
    banned: torch.Tensor  # (V,) bool: never produced (PAD, BOS, UNK, pieces that would break a line)
    forced: Optional[torch.Tensor] = None  # (B, T) token forced at step t, -1 where free
    free_banned: Optional[torch.Tensor] = None  # (V,) bool: banned wherever no token is forced
    no_repeat_ngram: int = 0

    def to(self, device: torch.device) -> "Rules":
        def move(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.to(device)

        return Rules(self.min_len.to(device), self.max_len, self.banned.to(device), move(self.forced),
                     move(self.free_banned), self.no_repeat_ngram)

    def restricted(self, ids: torch.Tensor) -> "Rules":
        """These rules over the positions of a shortlist's sorted target `ids`, which hold every forced token."""
        position = torch.full(self.banned.shape, -1, dtype=torch.long, device=ids.device)
        position[ids] = torch.arange(len(ids), device=ids.device)
        forced = None
        if self.forced is not None:
            forced = torch.where(self.forced >= 0, position[self.forced.clamp_min(0)], -1)
            assert int((forced >= 0).sum()) == int((self.forced >= 0).sum()), "a forced token is not in the shortlist"
        free_banned = None if self.free_banned is None else self.free_banned[ids]
        return Rules(self.min_len, self.max_len, self.banned[ids], forced, free_banned, self.no_repeat_ngram)

    def forced_tokens(self) -> torch.Tensor:
        return self.forced[self.forced >= 0] if self.forced is not None else torch.zeros(0, dtype=torch.long)

    def apply(self, lp: torch.Tensor, t: int, sents: torch.Tensor, history: Optional[list[list[int]]]) -> torch.Tensor:
        """Mask log-probabilities `lp` (rows, V) for step t; `sents` maps rows to sentences."""
        lp = lp.masked_fill(self.banned, NEG)
        lp[:, EOS] = lp[:, EOS].masked_fill(self.min_len[sents] > t, NEG)
        if self.forced is not None:
            f = self.forced[sents, t] if t < self.forced.size(1) else torch.full_like(sents, -1)
            free = f < 0
            if self.free_banned is not None:
                lp = lp.masked_fill(free.unsqueeze(1) & self.free_banned.unsqueeze(0), NEG)
            rows = (~free).nonzero().squeeze(1)
            if rows.numel():
                keep = lp[rows, f[rows]]
                lp[rows] = NEG
                lp[rows, f[rows]] = keep
        if self.no_repeat_ngram and history is not None:
            n = self.no_repeat_ngram
            for row, hist in enumerate(history):
                if len(hist) >= n - 1:
                    prefix = hist[len(hist) - n + 1:] if n > 1 else []
                    seen = [hist[i + n - 1] for i in range(len(hist) - n + 1) if hist[i:i + n - 1] == prefix]
                    if seen:
                        lp[row, seen] = NEG
        return lp


def make_rules(src_lens: Sequence[int], vocab_size: int, max_len_a: float, max_len_b: int, min_len: int = 1,
               max_len: int = 0, forced: Optional[list[list[int]]] = None,
               free_banned: Optional[list[int]] = None, no_repeat_ngram: int = 0, banned: Sequence[int] = ()) -> Rules:
    """Rules for a batch. With `forced` (one list per sentence, -1 = free), each output has exactly
    that list's length: EOS is banned before it and forced right after it. `banned` tokens are never
    produced, besides PAD, BOS and UNK (the target tokenizer's `unsafe_ids`: no line break in a line)."""
    limits = [max(1, int(max_len_a * n + max_len_b)) for n in src_lens]  # steps; an output ending there has no EOS
    if max_len:
        limits = [min(x, max_len) for x in limits]
    mins = [min(min_len, x) for x in limits]
    never = torch.zeros(vocab_size, dtype=torch.bool)
    never[[PAD, BOS, UNK, *banned]] = True
    forced_t = free_t = None
    if forced is not None:
        width = max(len(f) for f in forced) + 1
        forced_t = torch.full((len(forced), width), -1, dtype=torch.long)
        for i, f in enumerate(forced):
            forced_t[i, : len(f) + 1] = torch.tensor([*f, EOS])
        limits = [len(f) + 1 for f in forced]
        mins = [len(f) for f in forced]
    if free_banned:
        free_t = torch.zeros(vocab_size, dtype=torch.bool)
        free_t[free_banned] = True
    return Rules(torch.tensor(mins), limits, never, forced_t, free_t, no_repeat_ngram)


Picker = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # log-probs -> (chosen log-probs, tokens)


def argmax(lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return lp.max(dim=-1)


def sampler(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> Picker:
    """Draw the next token from the (temperature-scaled, top-k / top-p cut) distribution, seeded."""
    generator = torch.Generator().manual_seed(seed)

    def pick(lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = lp / temperature
        if top_k:
            kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, NEG)
        if top_p < 1.0:
            ordered, order = logits.sort(dim=-1, descending=True)
            probs = torch.softmax(ordered, dim=-1)
            outside = probs.cumsum(dim=-1) - probs > top_p  # keep the smallest head with mass >= top_p
            logits = torch.full_like(logits, NEG).scatter(1, order, ordered.masked_fill(outside, NEG))
        # Drawn on the CPU, where the seeded generator lives: the same draws on every device.
        probs = torch.softmax(logits.float(), dim=-1).cpu()
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(lp.device)
        return lp.gather(1, tokens.unsqueeze(1)).squeeze(1), tokens

    return pick


@torch.no_grad()
def greedy(model: Seq2Seq, src: torch.Tensor, src_lens: torch.Tensor, rules: Rules,
           alpha: float = 0.0, pick: Picker = argmax, vocab: Optional[BatchVocab] = None) -> list[list[Hypothesis]]:
    """One hypothesis per sentence, token by token: the most probable allowed token, or one drawn
    by `pick` (see `sampler`); finished sentences leave the batch."""
    state = model.encode(src, src_lens, None if vocab is None else vocab.ids)
    output = None if vocab is None else vocab.output
    B = src.size(0)
    results: list[list[Hypothesis]] = [[] for _ in range(B)]
    active = torch.arange(B, device=src.device)
    tokens: list[list[int]] = [[] for _ in range(B)]
    logp = [0.0] * B
    prev = src.new_full((B,), BOS)
    for t in range(max(rules.max_len)):
        lp, state, _ = model.step(_target_ids(prev, vocab), state, output)
        history = [tokens[s] for s in active.tolist()] if rules.no_repeat_ngram else None
        lp = rules.apply(lp, t, active, history)
        stuck = torch.isneginf(lp.max(dim=-1).values)  # the rules allow no token at all: the sentence ends here
        if stuck.any():
            lp[stuck, EOS] = 0.0
        best_lp, best = pick(lp)
        keep = []
        for row, (sent, tok, tok_lp, dead) in enumerate(zip(active.tolist(), best.tolist(), best_lp.tolist(),
                                                            stuck.tolist())):
            logp[sent] += tok_lp
            if tok != EOS:
                tokens[sent].append(tok)
            if tok == EOS or t + 1 >= rules.max_len[sent]:
                results[sent] = [Hypothesis(tokens[sent], logp[sent] / length_penalty(t + 1, alpha), not dead)]
            else:
                keep.append(row)
        if not keep:
            break
        if len(keep) < len(active):
            index = src.new_tensor(keep)
            state, best, active = state.select(index), best.index_select(0, index), active.index_select(0, index)
        prev = best
    return _mapped(results, vocab)


def _target_ids(tokens: torch.Tensor, vocab: Optional[BatchVocab]) -> torch.Tensor:
    return tokens if vocab is None else vocab.ids[tokens]


def _mapped(results: list[list[Hypothesis]], vocab: Optional[BatchVocab]) -> list[list[Hypothesis]]:
    """Hypotheses over shortlist positions -> over target ids."""
    if vocab is not None:
        ids = vocab.ids.tolist()
        for hyps in results:
            for h in hyps:
                h.tokens = [ids[t] for t in h.tokens]
    return results


def coverage_score(coverage: torch.Tensor, mask: torch.Tensor, beta: float) -> float:
    """GNMT coverage penalty: beta * sum over source words of log(min(attention received, 1))."""
    return beta * float(torch.log(coverage.clamp(1e-6, 1.0)).masked_fill(~mask, 0.0).sum())


@torch.no_grad()
def beam_search(model: Seq2Seq, src: torch.Tensor, src_lens: torch.Tensor, rules: Rules, beam_size: int,
                alpha: float = 1.0, nbest: int = 1, coverage_penalty: float = 0.0,
                vocab: Optional[BatchVocab] = None) -> list[list[Hypothesis]]:
    """Batched beam search: all sentences x beams in one tensor; the encoder runs once per sentence, and its
    states and attention keys are kept once per sentence for all its beams.

    A sentence is done when it has `beam_size` finished hypotheses or reaches its length limit;
    done sentences are dropped from the active tensors.
    """
    K = beam_size
    B = src.size(0)
    dev = src.device
    state = model.encode(src, src_lens, None if vocab is None else vocab.ids)
    state = state.grouped(K)
    output = None if vocab is None else vocab.output
    scores = torch.full((B, K), NEG, device=dev)
    scores[:, 0] = 0.0  # all beams start identical: keep one so the first step is not K copies
    history = src.new_full((B * K, 0), BOS)
    prev = src.new_full((B * K,), BOS)
    coverage = torch.zeros(B * K, src.size(1), device=dev) if coverage_penalty else None
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    active = list(range(B))

    def final_score(row: int, sc: float, length: int) -> float:
        score = sc / length_penalty(length, alpha)
        if coverage is not None:
            score += coverage_score(coverage[row], state.mask[row // K], coverage_penalty)
        return score

    for t in range(max(rules.max_len)):
        lp, state, weights = model.step(_target_ids(prev, vocab), state, output)
        if coverage is not None:  # only attention models report weights; without them there is no coverage
            coverage = None if weights is None else coverage + weights
        n, V = len(active), lp.size(-1)
        sents = torch.tensor(active, device=dev).repeat_interleave(K)
        lp = rules.apply(lp, t, sents, history.tolist() if rules.no_repeat_ngram else None)
        cand = (scores.view(-1, 1) + lp).view(n, K * V)
        top_scores, top_idx = cand.topk(min(2 * K, K * V), dim=1)
        rows_out: list[int] = []
        toks_out: list[int] = []
        scores_out: list[float] = []
        keep_sents: list[int] = []
        for i, sent in enumerate(active):
            last_step = t + 1 >= rules.max_len[sent]
            going: list[tuple[int, int, float]] = []  # (row, token, score) of continuing hypotheses
            for j, (sc, idx) in enumerate(zip(top_scores[i].tolist(), top_idx[i].tolist())):
                if sc == NEG or len(going) == K:
                    break
                beam, tok = divmod(idx, V)
                row = i * K + beam
                if tok == EOS and j < K:  # an EOS outside the top K does not finish a hypothesis
                    finished[sent].append(Hypothesis(history[row].tolist(), final_score(row, sc, t + 1)))
                elif tok != EOS:
                    going.append((row, tok, sc))
            if last_step:  # out of length: the best continuing hypotheses end here
                for row, tok, sc in going[: max(0, K - len(finished[sent]))]:
                    finished[sent].append(Hypothesis(history[row].tolist() + [tok], final_score(row, sc, t + 1)))
            if not finished[sent] and not going:  # no token allowed anywhere: keep the best unfinished hypothesis
                beam = int(scores[i].argmax())
                finished[sent].append(Hypothesis(history[i * K + beam].tolist(),
                                                 final_score(i * K + beam, float(scores[i, beam]), t), False))
            if last_step or len(finished[sent]) >= K or not going:
                continue
            going += [(going[0][0], going[0][1], NEG)] * (K - len(going))  # keep K rows per sentence
            keep_sents.append(sent)
            for row, tok, sc in going:
                rows_out.append(row)
                toks_out.append(tok)
                scores_out.append(sc)
        if not keep_sents:
            break
        index = torch.tensor(rows_out, device=dev)
        state = state.select(index)
        if coverage is not None:
            coverage = coverage.index_select(0, index)
        prev = torch.tensor(toks_out, device=dev)
        history = torch.cat([history.index_select(0, index), prev.unsqueeze(1)], dim=1)
        scores = torch.tensor(scores_out, device=dev).view(len(keep_sents), K)
        active = keep_sents
    for hyps in finished:
        hyps.sort(key=lambda h: h.score, reverse=True)
        del hyps[nbest:]
    return _mapped(finished, vocab)
