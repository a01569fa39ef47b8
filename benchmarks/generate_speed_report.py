"""What ``benchmarks/generate_speed.py`` checks besides the timings (its summary tables: ``generate_speed_summary``).

Two kernel paths of one model (a compiled step and an eager one, a chunked prefill and a whole one) round
differently in bf16, and greedy decoding follows the rounding at the first near-tie: from there on the two
token streams have nothing in common, so the fraction of equal tokens says little about correctness (a
random model's logits are all near-ties). ``agreement`` still records it, and where the streams part.

``reference_gaps`` asks instead, token by token, whether the candidate's choice was a (near-)best choice of
the exact model, given the candidate's own earlier tokens (teacher forcing): one forward of the same model
with float32 copies of its weights (``weights_in``), no cache, over the first ``--check-rows`` rows of the
prompt and the candidate's first ``n - 1`` tokens gives the reference logits of each of the ``n`` steps: free of
the candidate's static cache, graph or compile, and of its prefill chunking up to ``REFERENCE_CHUNK`` tokens.
Longer prompts go through a float32 dynamic cache in chunks of ``REFERENCE_CHUNK`` tokens, fewer past 32K
(``REFERENCE_SCORES`` bounds chunk x length; the last ``n`` positions in one call): float32 attention with grouped KV heads only has PyTorch's math kernel, whose (heads x T x T)
score matrix would not fit at 32K for the original or at 128K for the hybrid; in float32 a chunked prefill
equals a whole one to ~1e-6 (the tests). That forward
takes the torch path of every ``headscope.kernels`` op (``torch_paths``: GDN's chunked recurrence, the FA heads'
SDPA, the torch norms, conv and RoPE), not the Triton and fla kernels the candidate runs on CUDA, several of which
also take float32: a fault of one of them shows as gaps instead of being in the reference too, and the reference
compiles nothing (through fla, the hybrid's first float32 forward on a fresh H100 spent 256 s compiling and
autotuning, ``phase_s`` of the 2026-12-05 SmolLM2 row; rows checked before that date ran the reference through the
Triton and fla paths, bar the q/k norm; ``reference_kernels`` says which). Per step::

    gap_t = max_v ref_t[v] - ref_t[token_t] = log(p_best / p_chosen)     (0: the exact model agrees)
    consistent_t = gap_t <= max(gap_tol, 2 ulp of max_v |ref_t[v]| in the candidate's dtype)

in nats, over the tokens the candidate could choose (those ``generate()``'s processors set to -inf, eos
before ``min_new_tokens``, left out); the second term is the resolution of the candidate's own logits
(bf16: 0.25 at logits of 16-32). ``first_step_max_abs_diff``: the largest |candidate - reference| logit
at the first step (the prefill's logits, before any of the candidate's tokens enters).

Why float32: the bf16 plain forward is no exact reference either. On the CPU (bf16, SmolLM2-135M and its
untrained 7:1 hybrid, 1024 tokens of text, 32 steps) the hybrid's bf16 forward is off its float32 forward by
up to 6.6 nats at some steps (the original's by up to 0.6), so against a bf16 reference the static path showed
a 4.75-nat gap that was the reference's error; against float32: original 0.02 max / 0.0007 mean, hybrid
eager 1.04 / 0.13, hybrid static 1.37 / 0.07, while planted bugs in the static path give 8.4 / 1.6 (decode
positions off by one) and 19.5 / 10.1 (GDN states lost after the prefill). A fast path is correct when its
gaps look like its eager twin's: a variant with tokens beyond ``gap_tol`` still passes when its eager twin
(``TWIN``) ran in the same row and its largest gap is no larger than the twin's (bf16 near-ties: on the H200 the
hybrid_graph at 4K x 32 took a token 0.104 nats below the exact model's best, where the tolerance is 0.1).
Why the untrained real SmolLM2 hybrid fails these checks (``benchmarks/bf16_sensitivity.py``, CPU, 512 tokens):
it is no language model yet (float32 NLL 16.3 nats against the original's 4.4) and any bf16 rounding moves it
(KL 0.12-0.16 nats per token whether only its attention, everything but its attention or all of it runs in bf16;
the original 0.0006-0.0022), while each of its attention layers fed float32 inputs is off by 0.3-0.9% in bf16,
as bf16 should be: the model's sensitivity, not a fault of its attention path; its gamma-calibrated start
(NLL 10.1) drifts less (KL 0.011-0.041).
Cost: one float32 prefill of the checked rows per variant.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager

import torch

from headscope.kernels.switch import torch_paths

VARIANTS = ("original", "original_compiled", "original_graph", "hybrid_eager", "hybrid_graph")
TWIN = {"hybrid_graph": "hybrid_eager", "original_compiled": "original", "original_graph": "original"}
RANDOM_PROMPT = "random ids"
REFERENCE_CHUNK = 4096  # tokens per call of the reference forward beyond which it goes through a cache
REFERENCE_SCORES = 1 << 27  # chunk x total length of one call's score matrix per head (16 heads in float32: 8.6 GB)


def default_gap_tol(dtype: torch.dtype) -> float:
    """Nats: 0.1 for 16-bit models, 1e-4 for float32 ones."""
    return 1e-4 if dtype == torch.float32 else 0.1


def agreement(tokens: list, reference: list) -> dict:
    """Greedy tokens of two paths: fraction equal, rows identical, first mismatch per row (None: none)."""
    a, b = torch.tensor(tokens), torch.tensor(reference)
    same = a == b
    first = [int(row.logical_not().nonzero()[0]) if not row.all() else None for row in same]
    return {"match_fraction": float(same.float().mean()), "rows_identical": int(same.all(1).sum()), "first_mismatch": first}


def twin_agreements(record: dict) -> None:
    """Each variant's ``vs_<twin>`` (``agreement``) where it and its eager twin (``TWIN``) were timed on the same GPU;
    dropped where not (two GPUs round apart: another GPU's greedy stream is no comparison)."""
    variants = record.get("variants", {})
    for name, twin in TWIN.items():
        variants.get(name, {}).pop(f"vs_{twin}", None)
        if "new_tokens" in variants.get(name, {}) and "new_tokens" in variants.get(twin, {}) \
                and variant_device(variants[name], record) == variant_device(variants[twin], record):
            variants[name][f"vs_{twin}"] = agreement(variants[name]["new_tokens"], variants[twin]["new_tokens"])


@contextmanager
def weights_in(model, dtype: torch.dtype):
    """Inside the block ``model``'s floating parameters and buffers are ``dtype`` copies; after it, the very
    tensors they were (same storage: captured graphs and compiled calls that hold their addresses stay valid)."""
    saved = [(t, t.data) for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()]
    try:
        for t, data in saved:
            t.data = data.to(dtype)
        yield model
    finally:
        for t, data in saved:
            t.data = data


def teacher_forced_logits(model, ids: torch.Tensor, n: int, chunk: int) -> torch.Tensor:
    """``(r, n, V)`` logits of the last ``n`` positions of ``ids`` ``(r, T)``: one call without a cache when
    ``T <= chunk``, else the first ``T - n`` tokens in calls of ``chunk`` through the model's dynamic cache."""
    if ids.shape[1] <= chunk:
        return model(input_ids=ids, use_cache=False, logits_to_keep=n).logits
    from headscope.hybrid.modeling import CACHE_FIELD  # the installed transformers' name of the cache (keyword and field)

    cache = None
    for start in range(0, ids.shape[1] - n, chunk):
        piece = ids[:, start: min(start + chunk, ids.shape[1] - n)]
        cache = getattr(model(input_ids=piece, **{CACHE_FIELD: cache}, use_cache=True, logits_to_keep=1), CACHE_FIELD)
    return model(input_ids=ids[:, -n:], **{CACHE_FIELD: cache}, use_cache=True, logits_to_keep=n).logits


def reference_gaps(model, prompt: torch.Tensor, tokens: torch.Tensor, first_scores: torch.Tensor, gap_tol: float,
                   reference_dtype: torch.dtype | None = torch.float32, chunk: int = REFERENCE_CHUNK) -> dict:
    """Teacher-forced check of a candidate's greedy tokens against ``model``'s plain forward (module docstring).

    Args:
        model: the candidate's model (the original, or the hybrid), on the prompt's device.
        prompt: ``(r, C)`` the checked rows' prompt ids.
        tokens: ``(r, n)`` the candidate's first ``n`` new tokens of those rows.
        first_scores: ``(r, V)`` float32: the candidate's first-step scores as ``generate()``'s logits
            processors saw them (-inf where a processor banned a token).
        gap_tol: nats (``default_gap_tol``).
        reference_dtype: the reference forward's weights (float32: the exact model), or None: the model's own.
        chunk: longest call of the reference forward (``teacher_forced_logits``).
    Returns:
        ``{"rows", "checked_tokens", "max_gap", "mean_gap", "consistent", "first_inconsistent", "tolerance",
        "first_step_max_abs_diff", "reference_dtype", "reference_kernels"}``: ``consistent`` of ``rows x checked_tokens``;
        ``first_inconsistent`` the first step with an inconsistent token in any row (None: all consistent).
    """
    rows, n = tokens.shape
    dtype = next(model.parameters()).dtype  # the candidate's: its logits' resolution
    ids = torch.cat((prompt, tokens[:, : n - 1].to(prompt.device)), dim=1)  # (r, C + n - 1)
    with weights_in(model, reference_dtype or dtype), torch_paths(), torch.inference_mode():
        chunk = min(chunk, max(256, REFERENCE_SCORES // ids.shape[1]))  # 4096 up to 32K, 1024 at 128K
        ref = teacher_forced_logits(model, ids, n, chunk).float()  # (r, n, V)
    allowed = torch.isfinite(first_scores).to(ref.device)[:, None]  # (r, 1, V)
    ref = ref.masked_fill(~allowed, float("-inf"))
    gap = ref.amax(-1) - ref.gather(-1, tokens.to(ref.device)[..., None])[..., 0]  # (r, n), inf for a banned token
    finfo = torch.finfo(dtype)
    scale = ref.masked_fill(~allowed, 0).abs().amax(-1).clamp_min(finfo.tiny)  # (r, n)
    ok = gap <= torch.clamp_min(2 * finfo.eps * torch.exp2(torch.floor(torch.log2(scale))), gap_tol)
    bad_steps = (~ok).any(0).nonzero()
    diff = (first_scores.to(ref.device) - ref[:, 0]).abs().masked_fill(~allowed[:, 0], 0)
    return {"rows": rows, "checked_tokens": n, "max_gap": float(gap.max()), "mean_gap": float(gap.mean()), "consistent": int(ok.sum()),
            "first_inconsistent": int(bad_steps[0]) if len(bad_steps) else None, "tolerance": gap_tol,
            "first_step_max_abs_diff": float(diff.max()), "reference_dtype": str(reference_dtype or dtype).removeprefix("torch."),
            "reference_kernels": "torch"}


def variant_device(result: dict, record: dict) -> str:
    """The GPU that timed a variant: its own ``device`` (recorded since 2026-12-05), else its row's."""
    return result.get("device", record.get("device", "?"))


def twin_gap(check: dict | None, twin_check: dict | None) -> float | None:
    """The eager twin's max gap when it bounds the variant's (the variant is no further from the exact model than
    the eager path it stands in for, over the same number of checked tokens), else None."""
    done = lambda c: isinstance(c, dict) and "max_gap" in c  # noqa: E731
    if not (done(check) and done(twin_check)) or twin_check["checked_tokens"] * twin_check["rows"] < check["checked_tokens"] * check["rows"]:
        return None
    return twin_check["max_gap"] if check["max_gap"] <= twin_check["max_gap"] else None


UNCHECKED = "checks_not_finished"  # a timed variant's row field until its checks are recorded, naming the check under way (a rerun times it again)


def failed_check(result: dict, twin: dict | None = None) -> str | None:
    """Why a timed variant's tokens cannot be trusted (its teacher-forced check has tokens beyond the tolerance
    that its eager ``twin``'s max gap in the same row does not bound either, or its graph's tokens differ from
    its static eager run, or its checks never finished), or None."""
    if result.get(UNCHECKED):  # True in rows of before 2026-12-05, else the check it was in
        return "checks not finished" + (f" (in {result[UNCHECKED]})" if isinstance(result[UNCHECKED], str) else "")
    check = result.get("reference_check")
    if isinstance(check, dict) and "consistent" in check and check["consistent"] < check["rows"] * check["checked_tokens"] \
            and twin_gap(check, (twin or {}).get("reference_check")) is None:
        return f"ref check {check['consistent']}/{check['rows'] * check['checked_tokens']}"
    if result.get("graph_equals_static_eager") is False:
        return "graph != static eager"
    return None
