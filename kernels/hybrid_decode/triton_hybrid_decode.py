"""Triton: one decode step of a hybrid layer's FA and GDN heads in two launches, as many as its FA heads alone take.

A layer with both kinds of heads launched ``kernels/fa_decode``'s split and combine kernels and
``kernels/gdn_decode``'s kernel: three launches, the GDN one a single program per head that walks the head's
``D x D`` state in ``V_BLOCKS`` blocks of value columns one after the other. Here:

* ``_hybrid_split_kernel``: the GDN programs first (they are the longer ones, so the short split programs fill the
  GPU around them), then :func:`~headscope.kernels.fa_decode.triton_fa_decode.split_program` ``(p // S, p % S)``
  for every later program ``p`` (one split of one KV head of one row, the new token written into the cache). With
  fewer GDN heads than the GPU has multiprocessors (``B · H < SMs``: batch 1 at the Qwen3-1.7B shape, 14 heads),
  :func:`~headscope.kernels.gdn_decode.triton_gdn_decode.gdn_program` runs one program per value block of each
  head (``SPLIT_V``: ``B · H · V_BLOCKS`` programs, each a ``D x BLOCK_V`` slice of the state, the q/k conv, RoPE,
  norm and gates computed again by each block, the q/k conv windows left as they were, o unscaled); otherwise one
  program per head does the whole step, as ``kernels/gdn_decode``'s kernel.
* ``_hybrid_combine_kernel``: :func:`~headscope.kernels.fa_decode.triton_fa_decode.combine_program` for each FA
  query head (the FA epilogue inside), then, after value-block programs,
  :func:`~headscope.kernels.gdn_decode.triton_gdn_decode.gdn_finish_program` for each GDN head: the shifted q/k
  windows stored (safe only now: every value block of the previous launch read the old ones) and the epilogue,
  its sum of squares in the whole-head program's order.

The bodies are the two kernels' own, called as functions, so the results are those of the separate launches bit
for bit under the interpreter (the test compares them); compiled, the finish program's sum of squares may reduce in
another thread layout than the whole-head program's (an ulp in the epilogue's scale). Why: a captured batch-1 decode step of the hybrid was 8%
slower than the original's on the same kernels (Qwen3-1.7B shape, 4K; ``benchmarks/results/decode_step_speed.md``):
one launch more per layer, and a GDN program of ~12 us against the FA split kernel's ~10 (the projections of
the GDN heads' own keys and values, 1.6x the original's rows, cost the rest).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from headscope.kernels.fa_decode.triton_fa_decode import combine_launch, combine_program, split_launch, split_program
from headscope.kernels.gdn_decode.triton_gdn_decode import NUM_WARPS, gdn_finish_program, gdn_launch, gdn_program
from headscope.kernels.launch import sm_count

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
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_V: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < n_gdn:  # the GDN heads first: their programs are the longer ones
        gdn_program(
            pid,
            g_x_ptr, g_q_ptr, g_k_ptr, g_v_ptr, g_w_ptr, g_cs_ptr, g_cos_ptr, g_sin_ptr, g_bw_ptr, g_aw_ptr, g_alog_ptr, g_dtb_ptr, g_st_ptr, g_mask_ptr, g_o_ptr,
            g_gamma_ptr, g_H, g_hidden, g_scale, g_eps, g_norm_eps,
            g_sx_b, g_sx_c, g_sq_b, g_sq_h, g_sq_d, g_sk_b, g_sk_h, g_sk_d, g_sv_b, g_sv_h, g_sv_d, g_sw_c, g_sw_k, g_scs_b, g_scs_c, g_scs_k,
            g_sc_b, g_sc_d, g_ss_b, g_ss_d, g_sbw_h, g_sbw_c, g_saw_h, g_saw_c, g_sst_b, g_sst_h, g_sst_k, g_sst_v, g_so_b, g_so_h, g_so_d,
            HALF, K, HAS_MASK, V_BLOCKS, BLOCK_HALF, BLOCK_K, BLOCK_V, BLOCK_X, NORM, SPLIT_V,
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


@triton.jit
def _hybrid_combine_kernel(
    n_fa,
    # the FA heads (combine_program's arguments, prefixed c_)
    c_m_ptr, c_l_ptr, c_acc_ptr, c_o_ptr, c_gamma_ptr, c_gate_ptr, c_Hq, c_S, c_norm_eps, c_so_b, c_so_h, c_so_d, c_sg_b, c_sg_h, c_sg_d,
    # the GDN heads (gdn_finish_program's arguments, prefixed g_)
    g_x_ptr, g_q_ptr, g_k_ptr, g_v_ptr, g_w_ptr, g_cs_ptr, g_cos_ptr, g_sin_ptr, g_bw_ptr, g_aw_ptr, g_alog_ptr, g_dtb_ptr, g_st_ptr, g_mask_ptr, g_o_ptr,
    g_gamma_ptr, g_H, g_hidden, g_scale, g_eps, g_norm_eps,
    g_sx_b, g_sx_c, g_sq_b, g_sq_h, g_sq_d, g_sk_b, g_sk_h, g_sk_d, g_sv_b, g_sv_h, g_sv_d, g_sw_c, g_sw_k, g_scs_b, g_scs_c, g_scs_k,
    g_sc_b, g_sc_d, g_ss_b, g_ss_d, g_sbw_h, g_sbw_c, g_saw_h, g_saw_c, g_sst_b, g_sst_h, g_sst_k, g_sst_v, g_so_b, g_so_h, g_so_d,
    C_D: tl.constexpr, C_BLOCK_S: tl.constexpr, C_BLOCK_D: tl.constexpr, C_NORM: tl.constexpr, C_GATE: tl.constexpr,
    HALF: tl.constexpr, K: tl.constexpr, HAS_MASK: tl.constexpr, V_BLOCKS: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_X: tl.constexpr, NORM: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < n_fa:
        combine_program(pid, c_m_ptr, c_l_ptr, c_acc_ptr, c_o_ptr, c_gamma_ptr, c_gate_ptr, c_Hq, c_S, c_norm_eps, c_so_b, c_so_h,
                        c_so_d, c_sg_b, c_sg_h, c_sg_d, C_D, C_BLOCK_S, C_BLOCK_D, C_NORM, C_GATE)
    else:
        gdn_finish_program(
            pid - n_fa,
            g_x_ptr, g_q_ptr, g_k_ptr, g_v_ptr, g_w_ptr, g_cs_ptr, g_cos_ptr, g_sin_ptr, g_bw_ptr, g_aw_ptr, g_alog_ptr, g_dtb_ptr, g_st_ptr, g_mask_ptr, g_o_ptr,
            g_gamma_ptr, g_H, g_hidden, g_scale, g_eps, g_norm_eps,
            g_sx_b, g_sx_c, g_sq_b, g_sq_h, g_sq_d, g_sk_b, g_sk_h, g_sk_d, g_sv_b, g_sv_h, g_sv_d, g_sw_c, g_sw_k, g_scs_b, g_scs_c, g_scs_k,
            g_sc_b, g_sc_d, g_ss_b, g_ss_d, g_sbw_h, g_sbw_c, g_saw_h, g_saw_c, g_sst_b, g_sst_h, g_sst_k, g_sst_v, g_so_b, g_so_h, g_so_d,
            HALF, K, HAS_MASK, V_BLOCKS, BLOCK_HALF, BLOCK_K, BLOCK_V, BLOCK_X, NORM,
        )


def value_blocks(heads: int, v_blocks: int, device: torch.device) -> bool:
    """Whether the GDN heads run one program per value block (``SPLIT_V``): when there is more than one block and
    fewer heads (``B · H``) than the GPU has multiprocessors, so that whole-head programs would leave it idle."""
    return v_blocks > 1 and heads < sm_count(device)


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
    heads, gdn_args, gdn_constexprs = gdn_launch(**delta)
    device = fa_out.device
    split_v = value_blocks(heads, gdn_constexprs["V_BLOCKS"], device)
    n_gdn = heads * gdn_constexprs["V_BLOCKS"] if split_v else heads
    n_fa, combine_args, combine_constexprs = combine_launch(partials, fa_out, attention.get("gamma"), attention.get("gate"),
                                                            attention.get("norm_eps", 1e-6))
    combine_constexprs = {f"C_{key}": value for key, value in combine_constexprs.items()}
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _hybrid_split_kernel[(n_gdn + rows * splits,)](n_gdn, *gdn_args, *fa_args, **gdn_constexprs, **fa_constexprs, SPLIT_V=split_v,
                                                       num_warps=NUM_WARPS)
        # the GDN finish programs (q/k windows, epilogue) only after value-block programs; whole heads did both themselves
        _hybrid_combine_kernel[(n_fa + (heads if split_v else 0),)](n_fa, *combine_args, *gdn_args, **combine_constexprs,
                                                                    **gdn_constexprs, num_warps=NUM_WARPS)
    return fa_out, delta["out"]
