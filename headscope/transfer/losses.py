"""The three transfer losses as plain tensor functions, each next to a float64 reference twin.

* Layer-wise alignment (stage 1): the paper's loss is ``sum_l ||H_FA^(l)(x) - H_Hybrid^(l)(x)||^2``.
  We use ``sum_l mean_{b,t,d} (H_FA^(l) - H_Hybrid^(l))^2``: the same minimiser, with each layer's
  squared norm divided by its element count ``B * T * d`` so the value does not grow with batch size
  or sequence length (learning rates then transfer across those settings). ``H^(l)`` is the output of
  decoder layer ``l`` (the residual stream after that layer, before the final norm). Option
  ``normalize``: each layer's error divided by ``mean(H_teacher^(l)^2)`` (relative error), for models
  whose residual norm grows with depth so much that the last layers would dominate the raw sum.
* Logit distillation (stage 2): ``T^2 * mean_tokens KL(softmax(z_teacher / T) || softmax(z_student / T))``;
  the ``T^2`` factor keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015).
* Next-token cross-entropy (stages 2 and 3): mean over the ``B * (T - 1)`` predicted positions.

All losses are computed in float32 whatever the input dtype (bf16 under autocast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_alignment_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over layers of the per-element mean squared error between hidden states.

    Args:
        student, teacher: one ``(B, T, d)`` tensor per layer, same length and shapes.
        normalize: divide each layer's error by the teacher's mean square ``mean(H_teacher^2)`` of that
            layer (a relative error: deep layers with large residual norms no longer dominate the sum).
    Returns:
        ``(total, per_layer)``: a scalar float32 and a ``(L,)`` float32 tensor (``per_layer`` detached).
    """
    if len(student) != len(teacher) or not student:
        raise ValueError(f"got {len(student)} student and {len(teacher)} teacher layers")
    per_layer = []
    for s, t in zip(student, teacher):
        t = t.float().detach()
        error = F.mse_loss(s.float(), t)
        per_layer.append(error / t.square().mean().clamp_min(1e-12) if normalize else error)
    per_layer = torch.stack(per_layer)  # (L,)
    return per_layer.sum(), per_layer.detach()


def layer_alignment_loss_reference(student: list[torch.Tensor], teacher: list[torch.Tensor], normalize: bool = False) -> torch.Tensor:
    """float64 twin of :func:`layer_alignment_loss`: ``sum_l ||s_l - t_l||^2 / numel`` (``/ ||t_l||^2``)."""
    total = torch.zeros((), dtype=torch.float64)
    for s, t in zip(student, teacher):
        diff = s.double() - t.double()
        total = total + (diff * diff).sum() / ((t.double() ** 2).sum() if normalize else diff.numel())
    return total


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Temperature-scaled KL(teacher || student), mean over tokens, times ``temperature^2``.

    Args:
        student_logits, teacher_logits: ``(B, T, V)`` logits over the same vocabulary.
        temperature: softmax temperature ``T > 0``.
    Returns:
        A float32 scalar.
    """
    vocab = student_logits.shape[-1]
    log_q = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)  # (N, V)
    log_p = F.log_softmax(teacher_logits.float().reshape(-1, vocab).detach() / temperature, dim=-1)  # (N, V)
    kl = F.kl_div(log_q, log_p, reduction="sum", log_target=True) / log_q.shape[0]
    return kl * temperature**2


def distillation_kl_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """float64 twin of :func:`distillation_kl` from the definition ``sum_v p_v (log p_v - log q_v)``."""

    def log_softmax(z: torch.Tensor) -> torch.Tensor:
        z = z.double() / temperature
        shifted = z - z.max(dim=-1, keepdim=True).values
        return shifted - shifted.exp().sum(dim=-1, keepdim=True).log()

    log_p, log_q = log_softmax(teacher_logits), log_softmax(student_logits)  # (B, T, V)
    per_token = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # (B, T)
    return per_token.mean() * temperature**2


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting ``ids[:, t + 1]`` from position ``t``.

    Args:
        logits: ``(B, T, V)``.
        ids: ``(B, T)`` the input ids.
    Returns:
        A float32 scalar, the mean over ``B * (T - 1)`` targets.
    """
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), ids[:, 1:].reshape(-1))


def next_token_loss_reference(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """float64 twin of :func:`next_token_loss`: ``-mean log softmax(logits)[target]``."""
    z = logits[:, :-1].double()  # (B, T-1, V)
    log_probs = z - z.logsumexp(dim=-1, keepdim=True)
    return -log_probs.gather(-1, ids[:, 1:, None]).mean()
