"""Triton: one decode step of a hybrid layer's FA and GDN heads in one launch (then the FA heads' combine).

A layer with both kinds of heads launched ``kernels/fa_decode``'s split kernel and ``kernels/gdn_decode``'s
kernel: two launches that a captured decode step ran on two streams. ``_hybrid_split_kernel`` runs both sets
of programs in one grid of ``B · H_gdn + B · Hkv · S`` programs: program ``pid < B · H_gdn`` is
:func:`~headscope.kernels.gdn_decode.triton_gdn_decode.gdn_program` ``pid`` (one GDN head of one row: conv
window, RoPE + L2 norm, beta/decay, delta rule, epilogue), every later one
:func:`~headscope.kernels.fa_decode.triton_fa_decode.split_program` ``(p // S, p % S)`` for ``p = pid - B ·
H_gdn`` (one split of one KV head of one row, the new token written into the cache). The GDN programs come
first because they are the longer ones (a ``D x D`` state, the hidden-size dot products), so the short split
programs fill the GPU around them. The bodies are those of the two kernels, called as functions: the results
are those of the two launches (the test compares them bit for bit under the interpreter). The combine
kernel (FA epilogue inside) follows as before: a layer's decode core is two launches instead of three.

Why: at batch 1 a captured decode step is bound by its kernel count (~5 us a kernel on the H200); the hybrid
step had one launch per hybrid layer more than the original (382 against 354 for the Qwen3-1.7B shape) and
was 8% slower than it at 4K tokens (``benchmarks/results/decode_step_speed.md``).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from headscope.kernels.fa_decode.triton_fa_decode import combine, split_launch, split_program
from headscope.kernels.gdn_decode.triton_gdn_decode import NUM_WARPS, gdn_launch, gdn_program

_EPILOGUE = ("out", "gamma", "gate", "norm_eps")  # triton_decode_attention's arguments that go to the combine kernel


@triton.jit
def _hybrid_split_kernel(
    n_gdn,
    # the GDN heads (gdn_program's arguments, prefixed g_)
    g_x_ptr, g_q_ptr, g_k_ptr, g_v_ptr, g_w_ptr, g_cs_ptr, g_cos_ptr, g_sin_ptr, g_bw_ptr, g_aw_ptr, g_alog_ptr, g_dtb_ptr, g_st_ptr, g_mask_ptr, g_o_ptr,
    g_gamma_ptr, g_H, g_hidden, g_scale, g_eps, g_norm_eps,
    g_sx_b, g_sx_c, g_sq_b, g_sq_h, g_sq_d, g_sk_b, g_sk_h, g_sk_d, g_sv_b, g_sv_h, g_sv_d, g_sw_c, g_sw_k, g_scs_b, g_scs_c, g_scs_k,
    g_sc_b, g_sc_d, g_ss_b, g_ss_d, g_sbw_h, g_sbw_c, g_saw_h, g_saw_c, g_sst_b, g_sst_h, g_sst_k, g_sst_v, g_so_b, g_so_h, g_so_d,
    # the FA heads (split_program's arguments)
    q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, valid_ptr, seen_ptr, pos_ptr, qoff_ptr, cos_ptr, sin_ptr, m_ptr, l_ptr, acc_ptr,
    Hkv, Hq, S, chunk, window, scale, attn_scale, floor_scale, spos_b,
    sq_b, sq_h, sq_d, skn_b, skn_h, skn_d, svn_b, svn_h, svn_d,
    skc_b, skc_h, skc_l, skc_d, svc_b, svc_h, svc_l, svc_d, sva_b, sva_l, scs_b, scs_d,
    HALF: tl.constexpr, K: tl.constexpr, HAS_MASK: tl.constexpr, V_BLOCKS: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_X: tl.constexpr, NORM: tl.constexpr,
    D: tl.constexpr, LOG_SCALING: tl.constexpr, WINDOW: tl.constexpr, UPCAST: tl.constexpr, ROPE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < n_gdn:  # the GDN heads first: their programs are the longer ones
        gdn_program(
            pid,
            g_x_ptr, g_q_ptr, g_k_ptr, g_v_ptr, g_w_ptr, g_cs_ptr, g_cos_ptr, g_sin_ptr, g_bw_ptr, g_aw_ptr, g_alog_ptr, g_dtb_ptr, g_st_ptr, g_mask_ptr, g_o_ptr,
            g_gamma_ptr, g_H, g_hidden, g_scale, g_eps, g_norm_eps,
            g_sx_b, g_sx_c, g_sq_b, g_sq_h, g_sq_d, g_sk_b, g_sk_h, g_sk_d, g_sv_b, g_sv_h, g_sv_d, g_sw_c, g_sw_k, g_scs_b, g_scs_c, g_scs_k,
            g_sc_b, g_sc_d, g_ss_b, g_ss_d, g_sbw_h, g_sbw_c, g_saw_h, g_saw_c, g_sst_b, g_sst_h, g_sst_k, g_sst_v, g_so_b, g_so_h, g_so_d,
            HALF, K, HAS_MASK, V_BLOCKS, BLOCK_HALF, BLOCK_K, BLOCK_V, BLOCK_X, NORM,
        )
    else:
        split_pid = pid - n_gdn
        split_program(
            split_pid // S, split_pid % S,
            q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, valid_ptr, seen_ptr, pos_ptr, qoff_ptr, cos_ptr, sin_ptr, m_ptr, l_ptr, acc_ptr,
            Hkv, Hq, S, chunk, window, scale, attn_scale, floor_scale, spos_b,
            sq_b, sq_h, sq_d, skn_b, skn_h, skn_d, svn_b, svn_h, svn_d,
            skc_b, skc_h, skc_l, skc_d, svc_b, svc_h, svc_l, svc_d, sva_b, sva_l, scs_b, scs_d,
            D, LOG_SCALING, WINDOW, UPCAST, ROPE, BLOCK_G, BLOCK_D, BLOCK_N,
        )


def triton_hybrid_decode(attention: dict, delta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``triton_decode_attention(**attention)`` and ``triton_gdn_decode(**delta)`` in one launch plus the combine.

    Args:
        attention, delta: the keyword arguments of the two (what ``kernels/fa_decode.ops.triton_call`` and
            ``kernels/gdn_decode.ops.triton_call`` return), tensors on one device.
    Returns:
        the FA heads' ``(B, 1, Hq, D)`` and the GDN heads' ``(B, 1, H, D)`` outputs (their ``out`` when given);
        both caches, the conv window and the recurrent state updated in place.
    """
    split = {key: value for key, value in attention.items() if key not in _EPILOGUE}
    fa_out = attention.get("out")
    if fa_out is None:
        fa_out = torch.empty_like(split["q"], memory_format=torch.contiguous_format)
    delta = dict(delta)
    if delta.get("out") is None:
        delta["out"] = torch.empty_like(delta["q"], memory_format=torch.contiguous_format)
    (rows, splits), fa_args, fa_constexprs, partials = split_launch(**split)
    n_gdn, gdn_args, gdn_constexprs = gdn_launch(**delta)
    device = fa_out.device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _hybrid_split_kernel[(n_gdn + rows * splits,)](n_gdn, *gdn_args, *fa_args, **gdn_constexprs, **fa_constexprs, num_warps=NUM_WARPS)
        combine(partials, fa_out, attention.get("gamma"), attention.get("gate"), attention.get("norm_eps", 1e-6))
    return fa_out, delta["out"]
