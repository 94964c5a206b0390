"""Search: greedy and batched beam search over a model's `encode` / `step` interface.

Both return, per source sentence, a list of hypotheses (best first); tokens exclude EOS. A model is
anything with Seq2Seq's `encode` / `step` (a shortlist's adapter too: seqtool.shortlist.Shortlisted).
What the next token may be is the business of `Rules` (seqtool.constraints): the search asks them to
mask each step's scores and carries their per-hypothesis state along with its own (`Rows`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Optional, Protocol

import torch

from seqtool.constraints import NEG, Rules
from seqtool.tokenizer import BOS, EOS


class SearchState(Protocol):
    """What a search does with a model's decoder state (a DecoderState, or an ensemble's): repeat each sentence's
    row per beam, keep or reorder rows (DecoderState.select); `mask` (sentences, S) marks real source positions."""

    @property
    def mask(self) -> torch.Tensor: ...

    def grouped(self, group: int) -> SearchState: ...

    def select(self, index: torch.Tensor, sources: torch.Tensor) -> SearchState: ...


class Decodable(Protocol):
    """What a search needs of a model: encode a batch of sources once, then one step for all rows. The state
    is the model's own kind (its `encode` made it), so `step` takes it as Any."""

    def encode(self, src: torch.Tensor, src_lens: torch.Tensor) -> SearchState: ...

    def step(self, prev: torch.Tensor, state: Any) -> tuple[torch.Tensor, SearchState, Optional[torch.Tensor]]: ...


@dataclass
class Hypothesis:
    tokens: list[int]
    score: float  # log-probability / length penalty (+ coverage penalty)
    complete: bool = True  # False: the rules allowed no further token before EOS; the best unfinished one


def length_penalty(length: int, alpha: float) -> float:
    """GNMT length penalty ((5 + L) / 6) ** alpha (Wu et al. 2016); 1 when alpha is 0."""
    return ((5.0 + length) / 6.0) ** alpha


@dataclass
class Rows:
    """Everything a search keeps per hypothesis (row), reordered together by `select`."""

    state: SearchState
    rules: Rules
    sents: torch.Tensor  # (rows,) each row's sentence in the batch
    tokens: torch.Tensor  # (rows, t) the tokens so far
    coverage: Optional[torch.Tensor] = None  # (rows, S) attention received by each source position

    def select(self, index: Optional[torch.Tensor], tokens: torch.Tensor,
               sources: Optional[torch.Tensor] = None) -> Rows:
        """Row r of the result continues row `index[r]` (None: every row, in order) with `tokens[r]`; `sources`:
        the kept sentences' positions on the decoder state's source side (DecoderState.select; default `index`,
        for one row per sentence)."""
        if index is None:
            index, state, sents, coverage = None, self.state, self.sents, self.coverage
        else:
            state = self.state.select(index, index if sources is None else sources)
            sents = self.sents.index_select(0, index)
            coverage = None if self.coverage is None else self.coverage.index_select(0, index)
        kept = self.tokens if index is None else self.tokens.index_select(0, index)
        every = torch.arange(len(sents), device=sents.device) if index is None else index
        return Rows(state, self.rules.select(every, tokens, sents), sents,
                    torch.cat([kept, tokens.unsqueeze(1)], dim=1), coverage)


Picker = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # log-probs -> (chosen log-probs, tokens)


def argmax(lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return lp.max(dim=-1)


def sampler(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> Picker:
    """Draw the next token from the (temperature-scaled, top-k / top-p cut) distribution, seeded."""
    generator = torch.Generator().manual_seed(seed)

    def pick(lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # In fp64, from each row's best: a tiny temperature (1e-300 is 0 in fp32) gives the best 0, not NaN.
        logits = (lp.double() - lp.max(dim=-1, keepdim=True).values.double()) / temperature
        if top_k:
            kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, NEG)
        if top_p < 1.0:
            ordered, order = logits.sort(dim=-1, descending=True)
            probs = torch.softmax(ordered, dim=-1)
            outside = probs.cumsum(dim=-1) - probs >= top_p  # keep the smallest head with mass >= top_p
            outside[:, 0] = False  # the best token at least, whatever p underflows to
            logits = torch.full_like(logits, NEG).scatter(1, order, ordered.masked_fill(outside, NEG))
        # Drawn on the CPU, where the seeded generator lives: the same draws on every device.
        probs = torch.softmax(logits.float(), dim=-1).cpu()
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(lp.device)
        return lp.gather(1, tokens.unsqueeze(1)).squeeze(1), tokens

    return pick


@torch.no_grad()
def greedy(model: Decodable, src: torch.Tensor, src_lens: torch.Tensor, rules: Rules,
           alpha: float = 0.0, pick: Picker = argmax) -> list[list[Hypothesis]]:
    """One hypothesis per sentence, token by token: the most probable allowed token, or one drawn
    by `pick` (see `sampler`); finished sentences leave the batch."""
    B = src.size(0)
    state = model.encode(src, src_lens)
    rows = Rows(state, rules, torch.arange(B, device=src.device), src.new_zeros((B, 0)))
    results: list[list[Hypothesis]] = [[] for _ in range(B)]
    logp = torch.zeros(B, dtype=torch.float64)
    prev = src.new_full((B,), BOS)
    for t in range(max(rules.max_len)):
        lp, state, _ = model.step(prev, rows.state)
        rows = replace(rows, state=state)
        lp = rows.rules.mask(lp, t, rows.sents)
        stuck = torch.isneginf(lp.max(dim=-1).values)  # the rules allow no token at all: the sentence ends here
        if stuck.any():
            lp[stuck, EOS] = 0.0
        best_lp, best = pick(lp)
        logp += best_lp.double().cpu()
        keep = []
        for row, (sent, tok, dead) in enumerate(zip(rows.sents.tolist(), best.tolist(), stuck.tolist())):
            if tok == EOS or t + 1 >= rules.max_len[sent]:
                tokens = rows.tokens[row].tolist() + ([] if tok == EOS else [tok])
                # Counted as beam search counts: EOS is a step, a stuck sentence ends before step t.
                length = t if dead else t + 1
                results[sent] = [Hypothesis(tokens, float(logp[row]) / length_penalty(length, alpha), not dead)]
            else:
                keep.append(row)
        if not keep:
            break
        index = None if len(keep) == len(best) else src.new_tensor(keep)
        prev = best if index is None else best.index_select(0, index)
        rows = rows.select(index, prev)
        if index is not None:
            logp = logp[index.cpu()]
    return results


def coverage_score(coverage: torch.Tensor, mask: torch.Tensor, beta: float) -> float:
    """GNMT coverage penalty: beta * sum over source words of log(min(attention received, 1))."""
    return beta * float(torch.log(coverage.clamp(1e-6, 1.0)).masked_fill(~mask, 0.0).sum())


def _finisher(rows: Rows, K: int, alpha: float, beta: float) -> Callable[[int, float, int], float]:
    """The final score of a hypothesis of `rows` (K per sentence): (row, log-probability, length) -> log-probability
    / length penalty, + the coverage penalty when the search keeps coverage."""
    def finish(row: int, logp: float, length: int) -> float:
        score = logp / length_penalty(length, alpha)
        if rows.coverage is not None:
            score += coverage_score(rows.coverage[row], rows.state.mask[row // K], beta)
        return score
    return finish


Candidate = tuple[float, int, int]  # (score, row, token)


def by_bank(options: list[Candidate], rules: Rules, sent: int) -> list[Candidate]:
    """Dynamic beam allocation (Post & Vilar 2018): candidates grouped by constraint tokens met ("banks")
    and taken in turn from each bank, fullest bank first, best score first within a bank, so that a beam
    keeps hypotheses at every stage of meeting its constraints."""
    banked = sorted(((rules.bank(row, sent, tok), sc, row, tok) for sc, row, tok in options),
                    key=lambda o: (-o[0], -o[1]))
    turn: dict[int, int] = {}
    order = []
    for bank, sc, row, tok in banked:
        turn[bank] = turn.get(bank, -1) + 1
        order.append((turn[bank], -bank, (sc, row, tok)))
    order.sort(key=lambda o: (o[0], o[1]))
    return [o[2] for o in order]


@torch.no_grad()
def beam_search(model: Decodable, src: torch.Tensor, src_lens: torch.Tensor, rules: Rules, beam_size: int,
                alpha: float = 1.0, nbest: int = 1, coverage_penalty: float = 0.0) -> list[list[Hypothesis]]:
    """Batched beam search: all sentences x beams in one tensor; the encoder runs once per sentence, and its
    states and attention keys are kept once per sentence for all its beams.

    A sentence is done when it has `beam_size` finished hypotheses or reaches its length limit;
    done sentences are dropped from the active tensors.
    """
    K = beam_size
    B = src.size(0)
    dev = src.device
    state = model.encode(src, src_lens).grouped(K)
    rows = Rows(state, rules, torch.arange(B, device=dev).repeat_interleave(K), src.new_zeros((B * K, 0)),
                torch.zeros(B * K, src.size(1), device=dev) if coverage_penalty else None)
    scores = torch.full((B, K), NEG, device=dev)
    scores[:, 0] = 0.0  # all beams start identical: keep one so the first step is not K copies
    prev = src.new_full((B * K,), BOS)
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    active = list(range(B))

    for t in range(max(rules.max_len)):
        lp, state, weights = model.step(prev, rows.state)
        coverage = rows.coverage
        if coverage is not None:  # only attention models report weights; without them there is no coverage
            coverage = None if weights is None else coverage + weights
        rows = replace(rows, state=state, coverage=coverage)
        n, V = len(active), lp.size(-1)
        finish = _finisher(rows, K, alpha, coverage_penalty)
        lp = rows.rules.mask(lp, t, rows.sents)
        cand = (scores.view(-1, 1) + lp).view(n, K * V)
        top_scores, top_idx = cand.topk(min(2 * K, K * V), dim=1)
        banks = rows.rules.ranks
        best = lp.argmax(dim=1).tolist() if banks else []
        rows_out: list[int] = []
        toks_out: list[int] = []
        scores_out: list[float] = []
        keep_sents: list[int] = []
        kept_at: list[int] = []  # their positions in `active`: on the decoder state's source side
        for i, sent in enumerate(active):
            options = [(sc, i * K + idx // V, idx % V) for sc, idx in zip(top_scores[i].tolist(), top_idx[i].tolist())]
            if banks:  # also each hypothesis' best token and those that advance its constraints
                seen = {(row, tok) for _, row, tok in options}
                for row in range(i * K, i * K + K):
                    for tok in [best[row], *rows.rules.advancing(row, sent)]:
                        if (row, tok) not in seen:
                            seen.add((row, tok))
                            options.append((float(cand[i, (row - i * K) * V + tok]), row, tok))
                options = by_bank([o for o in options if o[0] != NEG], rows.rules, sent)
            last_step = t + 1 >= rules.max_len[sent]
            going: list[Candidate] = []  # continuing hypotheses
            for j, (sc, row, tok) in enumerate(options):
                if sc == NEG or len(going) == K:
                    break
                if tok == EOS and j < K:  # an EOS outside the top K does not finish a hypothesis
                    finished[sent].append(Hypothesis(rows.tokens[row].tolist(), finish(row, sc, t + 1)))
                elif tok != EOS:
                    going.append((sc, row, tok))
            if last_step:  # out of length: the best continuing hypotheses end here
                for sc, row, tok in going[: max(0, K - len(finished[sent]))]:
                    finished[sent].append(Hypothesis(rows.tokens[row].tolist() + [tok], finish(row, sc, t + 1)))
            if not finished[sent] and not going:  # no token allowed anywhere: keep the best unfinished hypothesis
                beam = int(scores[i].argmax())
                finished[sent].append(Hypothesis(rows.tokens[i * K + beam].tolist(),
                                                 finish(i * K + beam, float(scores[i, beam]), t), False))
            if last_step or len(finished[sent]) >= K or not going:
                continue
            going += [(NEG, going[0][1], going[0][2])] * (K - len(going))  # keep K rows per sentence
            keep_sents.append(sent)
            kept_at.append(i)
            for sc, row, tok in going:
                rows_out.append(row)
                toks_out.append(tok)
                scores_out.append(sc)
        if not keep_sents:
            break
        prev = torch.tensor(toks_out, device=dev)
        rows = rows.select(torch.tensor(rows_out, device=dev), prev, torch.tensor(kept_at, device=dev))
        scores = torch.tensor(scores_out, device=dev).view(len(keep_sents), K)
        active = keep_sents
    for hyps in finished:
        hyps.sort(key=lambda h: h.score, reverse=True)
        del hyps[nbest:]
    return finished
