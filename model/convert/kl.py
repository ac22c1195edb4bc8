"""KL(teacher || student) of next-token distributions, from the student's logits, in row chunks.

    loss = mean over tokens of  sum_v p_t(v) * (log p_t(v) - log p_s(v))
    d loss / d student_logits = (softmax(student_logits) - p_t) / n_tokens

The gradient is computed in the forward, a chunk of rows at a time, so no (tokens, vocab)
temporaries of autograd's log_softmax / kl_div chain are kept: at SmolLM2's 49,152-token
vocabulary those elementwise passes cost a tenth of a distillation step on this CPU.
`kl_reference` is the plain autograd formula the tests compare against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

CHUNK_ROWS = 64  # 64 x 49152 float32 = 12.6 MB per temporary


class _KLDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, student_logits: Tensor, teacher_logp: Tensor) -> Tensor:
        n = student_logits.shape[0]
        grad = torch.empty(student_logits.shape, dtype=torch.float32, device=student_logits.device)
        total = torch.zeros((), dtype=torch.float64, device=student_logits.device)
        for r in range(0, n, CHUNK_ROWS):
            s = student_logits[r:r + CHUNK_ROWS].float()  # (rows, V)
            t = teacher_logp[r:r + CHUNK_ROWS].float()
            m = s.amax(dim=-1, keepdim=True)
            p_s = (s - m).exp_()
            z = p_s.sum(dim=-1, keepdim=True)
            p_s.div_(z)
            log_p_s = s - m.add_(z.log_())
            p_t = t.exp()
            total += (p_t * (t - log_p_s)).sum(dtype=torch.float64)
            torch.sub(p_s, p_t, out=grad[r:r + CHUNK_ROWS])
        ctx.save_for_backward(grad)
        ctx.n = n  # type: ignore[attr-defined]
        return (total / n).to(torch.float32)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor, None]:
        (grad,) = ctx.saved_tensors
        return grad * (grad_loss / ctx.n), None


def kl_divergence(student_logits: Tensor, teacher_logp: Tensor) -> Tensor:
    """Mean KL(teacher || student) over rows: student logits and teacher log-probs, both (N, V)."""
    if student_logits.shape != teacher_logp.shape or student_logits.dim() != 2:
        raise ValueError(f"expected two (tokens, vocab) tensors of one shape, got {tuple(student_logits.shape)} "
                         f"and {tuple(teacher_logp.shape)}")
    return _KLDivergence.apply(student_logits, teacher_logp)


def kl_reference(student_logits: Tensor, teacher_logp: Tensor) -> Tensor:
    """The same quantity by autograd: log_softmax and torch's kl_div."""
    return F.kl_div(F.log_softmax(student_logits.float(), dim=-1), teacher_logp.float(), log_target=True,
                    reduction="batchmean")
