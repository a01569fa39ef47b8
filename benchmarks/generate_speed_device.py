"""What a ``benchmarks/generate_speed.py`` row asks of the device: the memory guard's estimate, and the SDPA
kernels the attention calls dispatch to.

``memory_need`` estimates the bytes a variant's ``generate()`` allocates beyond the loaded weights (its KV
cache and GDN states, and the prefill's activations at the prefill chunk); ``fits`` skips a variant only when
that estimate plus ``HEADROOM`` exceeds ``free_bytes``, measured right before the variant (after the previous
variant's caches and compiled graphs are gone). Against the H200 rows (Qwen3-1.7B shape, bf16, chunks of 4096,
peaks less the 7.12 GB of weights both models hold): 32K x 24 original_compiled measured 97.6 GB, estimated
97.7; 32K x 32 hybrid_graph measured 23.5 GB, estimated 25.1. At 32K x 32 the originals need ~130 GB (121.2 GB
of KV cache) of the 141 GB an H200 has free with both models loaded; at 128K the largest batch is 8 (~123 GB
on the same kernels, ~129 GB compiled: transformers' ``repeat_kv`` over the static length).

``sdpa_backends`` records, per row, which backend ``torch.nn.functional.scaled_dot_product_attention`` would
dispatch the models' attention calls to on that device (``torch._fused_sdp_choice``: the dispatch decision,
no kernel run), so a row says which kernel its attention ran, e.g. whether transformers' static-cache decode
(a bool mask, KV heads repeated to the query heads) lands on cuDNN, the memory-efficient kernel or the math
fallback, and which kernel headscope's grouped prefill chunks (``causal_lower_right``) get.

``gpu_work`` profiles one call for what it costs the GPU: the summed duration of the kernels, copies and memsets
it enqueued and their number. A TTFT at 4K x 1 is a wall time, and on the lent H200 box the host's speed drifts by
up to 2x from one moment to the next (the Qwen3-1.7B shape hybrid's first token, one process, calls alternating
between models: 34.1 ms in one run, 42.6 in the next, with the same 810 launches and 28.8 ms of kernels each
time): the GPU work says which prefill is cheaper however fast the host happens to be, and the gap between the
two says how host-bound the call was.
"""

from __future__ import annotations

import torch

HEADROOM = 4e9  # bytes the guard keeps free beyond its estimate: allocator rounding, cuBLAS and cuDNN workspaces


def memory_need(variant: str, config, fingerprint, mask, conv_size: int, element_bytes: int, batch: int,
                context: int, new: int, prefill_chunk: int | None) -> dict[str, int]:
    """Bytes ``variant``'s generate() allocates beyond the loaded weights: ``{"cache", "activations", "total"}``.

    cache: the KV cache (and the hybrid's GDN states) for ``context + new`` tokens, rounded up to the static
    hybrid cache's length step for the graph variants; the originals keep every KV head of every layer, the
    hybrid the KV groups and GDN states of its ``mask`` (``headscope.quality``'s ``kv_cache_bytes_per_token`` and
    ``recurrent_state_bytes`` of ``fingerprint``). The dynamic caches (original, hybrid_eager)
    add one layer's copy (``torch.cat`` grows it), the original ``group`` more (transformers' sdpa repeats the KV
    heads to the query heads, ``repeat_kv``: ``group`` = query heads per KV head). activations: the prefill's peak
    at ``min(context, prefill_chunk)`` tokens per row, ``batch x tokens x (8 hidden + 3 intermediate)`` elements (the
    MLP's three intermediates and a few hidden states); generate() asks for the last position's logits only
    (``logits_to_keep=1``), so no ``(B, T, vocab)`` tensor. For original_compiled, at least one layer's keys and
    values repeated over the whole static length (its ``repeat_kv`` at every chunk and step): at 32K the two are
    alike (6.9 and 6.5 GB at batch 24), at 128K the repeat is 3.8x the activations (8.6 GB at batch 8).
    Calibration: the module docstring.
    """
    from headscope.hybrid.generation import LENGTH_STEP
    from headscope.quality import kv_cache_bytes_per_token, recurrent_state_bytes

    layers = config.num_hidden_layers
    tokens = context + new
    if variant.endswith("_graph"):
        tokens = -(-tokens // LENGTH_STEP) * LENGTH_STEP
    kept = None if variant.startswith("original") else mask  # None: the original, every KV group and no GDN state
    kv = kv_cache_bytes_per_token(fingerprint, kept, element_bytes) * batch * tokens
    group = config.num_attention_heads // config.num_key_value_heads
    cache = kv + batch * recurrent_state_bytes(fingerprint, kept, conv_size, element_bytes)
    cache += {"original": 1 + group, "hybrid_eager": 1}.get(variant, 0) * kv // layers
    chunk = min(context, prefill_chunk or context)
    activations = batch * chunk * (8 * config.hidden_size + 3 * config.intermediate_size) * element_bytes
    if variant == "original_compiled":
        activations = max(activations, group * kv // layers)
    return {"cache": cache, "activations": activations, "total": cache + activations}


def fits(need: int, free: int) -> bool:
    """The guard: the estimate plus ``HEADROOM`` (allocator rounding, cuBLAS and cuDNN workspaces) within the free memory."""
    return need + HEADROOM <= free


def free_bytes(device: torch.device) -> int:
    """Memory a variant can have: free on the device plus what torch's allocator holds unused."""
    return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def work_of(spans: list[tuple[float, float]]) -> dict:
    """``{"kernel_ms", "launches"}`` of a call's device activities given as ``(start_us, end_us)``."""
    return {"kernel_ms": sum(end - start for start, end in spans) / 1e3, "launches": len(spans)}


def gpu_work(fn, by_kernel: int = 0) -> dict | None:
    """``work_of`` the CUDA activities (kernels, memcpy, memset) of one call of ``fn`` under the torch profiler,
    the GPU synchronised before and after; None without CUDA; ``{"failed": why}`` when the profiler cannot run
    (CUPTI held by another profiler). With ``by_kernel`` > 0 also ``"by_kernel"``: the that many kernel names
    with the most GPU time, each ``[launches, total us]``, most first."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    except RuntimeError as err:
        return {"failed": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    work = work_of([(e.time_range.start, e.time_range.end) for e in events])
    if by_kernel:
        names: dict[str, list] = {}
        for e in events:
            entry = names.setdefault(e.name[:80], [0, 0.0])
            entry[0] += 1
            entry[1] += e.time_range.end - e.time_range.start
        work["by_kernel"] = dict(sorted(names.items(), key=lambda item: -item[1][1])[:by_kernel])
    return work


def sdpa_backends(config, length: int, prefill_chunk: int | None, device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """The SDPA backend torch would pick (``torch._fused_sdp_choice``: a dispatch decision, no kernel run) for the
    attention calls of the timed paths, at batch 1 with the row's ``length`` (prompt + new tokens) and the real layouts:

    * ``hf_static_decode``: transformers' sdpa against a StaticCache (what original_compiled runs): a bool
      mask ``(B, 1, 1, L)`` over the static length, so ``use_gqa_in_sdpa`` is false and the keys and values
      come repeated to every query head (``repeat_kv``, contiguous ``(B, Hq, L, D)``);
    * ``gqa_masked_decode``: the same with the KV heads grouped (``enable_gqa``) instead of repeated;
    * ``gqa_decode``: grouped, no mask (the keys sliced to the tokens seen: what a dynamic cache gives);
    * ``gqa_chunk_prefill``: a later prefill chunk of headscope's ``causal_attention`` (original_graph and the
      hybrid's FA heads): ``causal_lower_right``, grouped KV sliced from the static cache; the backend
      ``CausalBias`` picks (flash, memory-efficient, else a materialised mask and that call's backend).
    """
    from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention
    from torch.nn.attention import SDPBackend

    n_q, n_kv = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // n_q
    chunk = min(length, prefill_chunk or length)
    with torch.device(device):
        q = torch.empty(1, 1, n_q, d, dtype=dtype).transpose(1, 2)  # (1, Hq, 1, D) from (1, 1, Hq, D), as the models make it
        kv = torch.empty(1, n_kv, length, d, dtype=dtype)  # (1, Hkv, L, D): the static caches' layout
        repeated = torch.empty(1, n_q, length, d, dtype=dtype)
        q_chunk = torch.empty(1, chunk, n_q, d, dtype=dtype).transpose(1, 2)
        decode_mask = torch.ones(1, 1, 1, length, dtype=torch.bool)
        chunk_mask = torch.ones(1, 1, chunk, length, dtype=torch.bool)
    calls = {"hf_static_decode": (q, repeated, decode_mask, False), "gqa_masked_decode": (q, kv, decode_mask, True),
             "gqa_decode": (q, kv, None, True), "gqa_chunk_prefill": (q_chunk, kv, chunk_mask, True)}
    picked = {name: SDPBackend(torch._fused_sdp_choice(query, keys, keys, attn_mask=mask, enable_gqa=gqa)).name
              for name, (query, keys, mask, gqa) in calls.items()}
    lower_right = SDPAParams(q_chunk, kv, kv, None, 0.0, False, True)  # what CausalBias checks, in its order
    if can_use_flash_attention(lower_right):
        picked["gqa_chunk_prefill"] = SDPBackend.FLASH_ATTENTION.name
    elif can_use_efficient_attention(lower_right):
        picked["gqa_chunk_prefill"] = SDPBackend.EFFICIENT_ATTENTION.name
    else:
        picked["gqa_chunk_prefill"] = f"materialised mask, {picked['gqa_chunk_prefill']}"
    return picked
