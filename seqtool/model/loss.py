"""Output layer + label-smoothed cross-entropy in one pass over chunks of target positions.

The (tokens x vocabulary) logits never exist whole: each chunk's logits are made, turned into its loss
and, when a gradient is wanted, into their gradient while still in cache; the backward pass then only
scales what the forward pass left. On the 12M Multi30k model this removes the separate log-softmax,
its backward and the full-size temporaries of F.cross_entropy (docs/performance.md).

With bf16 features and weights (bf16 training, device.Precision) the three matrix products run in bf16,
where AMX makes them 6-8x faster than fp32, while the softmax statistics of the (bf16-rounded) logits,
the loss and the weight gradient's sum over chunks are fp32: rounding there would bias the loss, not
just blur it.
"""

from __future__ import annotations

from typing import Optional, cast

import torch

CHUNK = 512  # rows per chunk: 512 x 8000 fp32 logits = 16 MB; smaller chunks made the matrix products slower
# bf16 chunks are padded to a multiple of this many rows: oneDNN builds a kernel for every new shape (about
# 3 ms each on AMX, and memory it keeps), and the last chunk's row count is new in almost every batch.
ROWS = 64


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feats: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                targets: torch.Tensor, smoothing: float, chunk: int, grad_enabled: bool) -> torch.Tensor:
        # needs_input_grad follows requires_grad alone, also under no_grad (validation): ask both.
        want_feats, want_weight, want_bias = (grad_enabled and need for need in ctx.needs_input_grad[:3])
        grad_feats = torch.empty_like(feats) if want_feats else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        grad_bias = torch.zeros_like(cast(torch.Tensor, bias), dtype=torch.float32) if want_bias else None
        vocab = weight.size(0)
        total = feats.new_zeros((), dtype=torch.float32)
        for start in range(0, feats.size(0), chunk):
            f, t = feats[start:start + chunk], targets[start:start + chunk, None]
            rows, pad = f.size(0), (-f.size(0) % ROWS if f.dtype != torch.float32 else 0)
            if pad:  # zero rows with target 0: their loss is left out and their gradient rows zeroed
                f, t = torch.nn.functional.pad(f, (0, 0, 0, pad)), torch.nn.functional.pad(t, (0, 0, 0, pad))
            z = (f @ weight.t() if bias is None else torch.addmm(bias, f, weight.t())).float()
            # Row loss: logsumexp - (1 - s) * z[target] - s / V * sum(z), as F.cross_entropy with label_smoothing s.
            picked = z.gather(1, t).squeeze(1)
            row_sum = z.sum(1) if smoothing else None
            top = z.amax(1, keepdim=True)
            probs = z.sub_(top).exp_()  # in place: z is not needed past this point
            norm = probs.sum(1, keepdim=True)
            lse = (top + norm.log()).squeeze(1)
            loss = lse - (1.0 - smoothing) * picked
            if smoothing:
                assert row_sum is not None
                loss = loss - smoothing / vocab * row_sum
            total += loss[:rows].sum()
            if not (want_feats or want_weight or want_bias):
                continue
            # d loss / d z = softmax - (1 - s) * onehot(target) - s / V
            grad = probs.div_(norm)
            if smoothing:
                grad.sub_(smoothing / vocab)
            grad.scatter_add_(1, t, grad.new_full(t.shape, smoothing - 1.0))
            if pad:
                grad[rows:] = 0.0
            if want_bias:
                assert grad_bias is not None
                grad_bias += grad.sum(0)
            grad = grad.to(feats.dtype)  # the products in the inputs' precision
            if want_feats:
                assert grad_feats is not None
                if pad:
                    grad_feats[start:start + rows] = (grad @ weight)[:rows]
                else:
                    torch.mm(grad, weight, out=grad_feats[start:start + chunk])
            if want_weight:
                assert grad_weight is not None
                if f.dtype == torch.float32:
                    grad_weight.addmm_(grad.t(), f)  # no temporary
                else:
                    grad_weight += grad.t() @ f
        # Each gradient in its input's dtype, as autograd expects (a bf16 copy's gradient then reaches the fp32 master).
        ctx.save_for_backward(grad_feats, None if grad_weight is None else grad_weight.to(weight.dtype),
                              None if grad_bias is None else grad_bias.to(cast(torch.Tensor, bias).dtype))
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grads = [None if g is None else g * grad_output for g in ctx.saved_tensors]
        return (*grads, None, None, None, None)


def linear_cross_entropy(feats: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         targets: torch.Tensor, smoothing: float = 0.0, chunk: int = CHUNK) -> torch.Tensor:
    """Summed cross-entropy of softmax(feats @ weight.T + bias) against `targets`: feats (N, O), targets (N,),
    every row a real target (drop padding first). Equals F.cross_entropy(..., label_smoothing, reduction='sum')."""
    return _LinearCrossEntropy.apply(feats, weight, bias, targets, smoothing, chunk, torch.is_grad_enabled())
