"""Search: greedy and batched beam search over a model's `encode` / `step` interface.

Both return, per source sentence, a list of hypotheses (best first); tokens exclude EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seqtool.model.seq2seq import Seq2Seq
from seqtool.tokenizer import BOS, EOS


@dataclass
class Hypothesis:
    tokens: list[int]
    score: float  # log-probability divided by the length penalty


def length_penalty(length: int, alpha: float) -> float:
    """GNMT length penalty ((5 + L) / 6) ** alpha (Wu et al. 2016); 1 when alpha is 0."""
    return ((5.0 + length) / 6.0) ** alpha


def max_lengths(src_lens: torch.Tensor, a: float, b: int) -> list[int]:
    """Most output tokens (EOS included) per sentence: a * source length + b, at least 1."""
    return [max(1, int(a * n + b)) for n in src_lens.tolist()]


@torch.no_grad()
def greedy(model: Seq2Seq, src: torch.Tensor, src_lens: torch.Tensor, max_len_a: float, max_len_b: int,
           alpha: float = 0.0) -> list[list[Hypothesis]]:
    """Pick the most probable token at each step; finished sentences leave the batch."""
    state = model.encode(src, src_lens)
    limits = max_lengths(src_lens, max_len_a, max_len_b)
    results: list[list[Hypothesis]] = [[] for _ in limits]
    active = list(range(len(limits)))
    tokens: list[list[int]] = [[] for _ in limits]
    logp = [0.0] * len(limits)
    prev = torch.full((len(limits),), BOS, dtype=torch.long)
    for t in range(max(limits)):
        lp, state, _ = model.step(prev, state)
        best_lp, best = lp.max(dim=-1)
        keep = []
        for row, (sent, tok, tok_lp) in enumerate(zip(active, best.tolist(), best_lp.tolist())):
            logp[sent] += tok_lp
            if tok != EOS:
                tokens[sent].append(tok)
            if tok == EOS or t + 1 >= limits[sent]:
                results[sent] = [Hypothesis(tokens[sent], logp[sent] / length_penalty(t + 1, alpha))]
            else:
                keep.append(row)
        if not keep:
            break
        if len(keep) < len(active):
            index = torch.tensor(keep)
            state, best = state.select(index), best.index_select(0, index)
            active = [active[r] for r in keep]
        prev = best
    return results


@torch.no_grad()
def beam_search(model: Seq2Seq, src: torch.Tensor, src_lens: torch.Tensor, beam_size: int, max_len_a: float,
                max_len_b: int, alpha: float = 1.0, nbest: int = 1) -> list[list[Hypothesis]]:
    """Batched beam search: all sentences x beams in one tensor; the encoder runs once per sentence.

    A sentence is done when it has `beam_size` finished hypotheses or reaches its length limit;
    done sentences are dropped from the active tensors.
    """
    K = beam_size
    B = src.size(0)
    limits = max_lengths(src_lens, max_len_a, max_len_b)
    state = model.encode(src, src_lens).select(torch.arange(B).repeat_interleave(K))
    scores = torch.full((B, K), float("-inf"))
    scores[:, 0] = 0.0  # all beams start identical: keep one so the first step is not K copies
    history = torch.full((B * K, 0), BOS, dtype=torch.long)
    prev = torch.full((B * K,), BOS, dtype=torch.long)
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    active = list(range(B))
    for t in range(max(limits)):
        lp, state, _ = model.step(prev, state)
        n, V = len(active), lp.size(-1)
        cand = (scores.view(-1, 1) + lp).view(n, K * V)
        top_scores, top_idx = cand.topk(min(2 * K, K * V), dim=1)
        rows_out: list[int] = []
        toks_out: list[int] = []
        scores_out: list[float] = []
        keep_sents: list[int] = []
        for i, sent in enumerate(active):
            last_step = t + 1 >= limits[sent]
            going: list[tuple[int, int, float]] = []  # (row, token, score) of continuing hypotheses
            for j, (sc, idx) in enumerate(zip(top_scores[i].tolist(), top_idx[i].tolist())):
                if sc == float("-inf") or len(going) == K:
                    break
                beam, tok = divmod(idx, V)
                row = i * K + beam
                if tok == EOS and j < K:  # an EOS outside the top K does not finish a hypothesis
                    finished[sent].append(Hypothesis(history[row].tolist(), sc / length_penalty(t + 1, alpha)))
                elif tok != EOS:
                    going.append((row, tok, sc))
            if last_step:  # out of length: the best continuing hypotheses end here
                for row, tok, sc in going[: max(0, K - len(finished[sent]))]:
                    finished[sent].append(Hypothesis(history[row].tolist() + [tok], sc / length_penalty(t + 1, alpha)))
            if last_step or len(finished[sent]) >= K or not going:
                continue
            going += [(going[0][0], going[0][1], float("-inf"))] * (K - len(going))  # keep K rows per sentence
            keep_sents.append(sent)
            for row, tok, sc in going:
                rows_out.append(row)
                toks_out.append(tok)
                scores_out.append(sc)
        if not keep_sents:
            break
        index = torch.tensor(rows_out)
        state = state.select(index)
        prev = torch.tensor(toks_out)
        history = torch.cat([history.index_select(0, index), prev.unsqueeze(1)], dim=1)
        scores = torch.tensor(scores_out).view(len(keep_sents), K)
        active = keep_sents
    for hyps in finished:
        hyps.sort(key=lambda h: h.score, reverse=True)
        del hyps[nbest:]
    return finished
