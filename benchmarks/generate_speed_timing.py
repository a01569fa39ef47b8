"""The timed calls of ``benchmarks/generate_speed.py``: one ``generate()`` per variant with a CUDA event at every
step (``StepClock``), the graph check, and the interleaved rounds that time every variant again, alternating,
because the lent box's host speed drifts by up to 2x for seconds at a time (``ttft_rounds``)."""

from __future__ import annotations

import time
from functools import partial

import torch

from generate_speed_device import gpu_work
from generate_speed_models import Bench
from generate_speed_report import VARIANTS
from headscope.hybrid.generation import kept_static_cache


class StepClock:
    """A logits processor that timestamps every generation step (CUDA events, no synchronisation)."""

    def __init__(self, device: torch.device, keep_rows: int = 0) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.keep_rows, self.first_scores = keep_rows, None  # (keep_rows, V): the first step's scores, for the checks

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def __call__(self, input_ids, scores):
        self.marks.append(self.mark())
        if self.first_scores is None and self.keep_rows:
            self.first_scores = scores[: self.keep_rows].float().clone()  # a small device copy, no synchronisation
        return scores

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


def generation_kwargs(variant: str, new: int, processors=(), stop_after: int | None = None, prefill_chunk: int | None = None,
                      cache=None) -> dict:
    """generate()'s keywords for ``variant``; ``cache``: the ``StaticCache`` of ``original_compiled`` (required there)."""
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    from headscope.hybrid.modeling import CACHE_FIELD

    class StopAfter(StoppingCriteria):
        def __init__(self, steps: int) -> None:
            self.steps, self.calls = steps, 0

        def __call__(self, input_ids, scores, **kwargs):
            self.calls += 1
            return torch.full((input_ids.shape[0],), self.calls >= self.steps, dtype=torch.bool, device=input_ids.device)

    config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, prefill_chunk_size=prefill_chunk)
    kwargs = {"generation_config": config, "logits_processor": LogitsProcessorList(list(processors))}
    if variant == "original_compiled":
        kwargs[CACHE_FIELD] = cache  # generate()'s keyword: past_key_values before transformers 5.24, cache after
    if stop_after:
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopAfter(stop_after)])
    if variant == "hybrid_eager":
        kwargs["decode_mode"] = "dynamic"
    elif variant.endswith("_graph"):  # the hybrid and the original's twin: HybridForCausalLM.generate
        kwargs["decode_mode"] = "graph" if torch.cuda.is_available() else "static"
    return kwargs


def timed_generate(bench: Bench, variant: str, ids: torch.Tensor, new: int, prefill_chunk: int | None = None,
                   keep_rows: int = 0) -> tuple[dict, torch.Tensor | None]:
    """The row's result of one variant, and the first step's scores ``(keep_rows, V)`` (None without ``keep_rows``)."""
    model = bench.model_of(variant)
    mask = torch.ones_like(ids)
    cache = (lambda: bench.static_cache(ids.shape[0], ids.shape[1] + new)) if variant == "original_compiled" else (lambda: None)
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, **generation_kwargs(variant, new, stop_after=3, prefill_chunk=prefill_chunk, cache=cache()))  # warm-up
        clock = StepClock(bench.device, keep_rows)
        kwargs = generation_kwargs(variant, new, processors=[clock], prefill_chunk=prefill_chunk, cache=cache())  # (the reset: untimed)
        if bench.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = clock.mark()
        out = model.generate(ids, attention_mask=mask, **kwargs)
        end = clock.mark()
        if bench.device.type == "cuda":
            torch.cuda.synchronize()
    marks = clock.marks
    total_ms = clock.ms(start, end)
    steps = [clock.ms(a, b) for a, b in zip(marks, marks[1:])]
    result = {"ttft_ms": clock.ms(start, marks[0]), "per_token_ms": sum(steps) / max(1, len(steps)), "total_s": total_ms / 1e3,
              "tokens_per_s": ids.shape[0] * new / (total_ms / 1e3), "prefill_chunk": prefill_chunk, "new_tokens": out[:, ids.shape[1]:].tolist()}
    if bench.device.type == "cuda":
        result["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    static = kept_static_cache(bench.model_of(variant)) if variant.endswith("_graph") else None
    if static is not None and bench.device.type == "cuda":  # a failed capture warns and decodes eagerly: say so in the row
        result["graph_captured"] = static._graph is not None
    return result, clock.first_scores


def graph_check(bench: Bench, variant: str, ids: torch.Tensor, graph_tokens: list, n: int, prefill_chunk: int | None = None) -> bool:
    """A graph variant's first ``n`` tokens equal its static path run eagerly with the timed call's prefill
    (``prefill_chunk``): the same kernels on the same inputs, no graph. (A whole prefill where the timed call
    chunked rounds differently in bf16, and greedy decoding parts at the first near-tie.)"""
    with torch.inference_mode():
        kwargs = generation_kwargs(variant, n, prefill_chunk=prefill_chunk)
        kwargs["decode_mode"] = "static"
        eager = bench.model_of(variant).generate(ids, attention_mask=torch.ones_like(ids), **kwargs)[:, ids.shape[1]:]
    return eager.tolist() == [row[:n] for row in graph_tokens]


def first_token_ms(bench: Bench, variant: str, ids: torch.Tensor, prefill_chunk: int | None, new: int) -> float:
    """ms from ``generate()`` entered to the first logits of one call stopped there (``max_new_tokens=1``): the
    prefill and the set-up, as the timed call's TTFT (``original_compiled`` keeps the timed call's cache size,
    ``new``, so nothing recompiles)."""
    return clocked_call(bench, variant, ids, prefill_chunk, 1, new)[0]


def per_token_call_ms(bench: Bench, variant: str, ids: torch.Tensor, prefill_chunk: int | None, new: int) -> float:
    """The per-token latency of one more call of ``new`` tokens, as the timed call's (mean of the steps after the
    first)."""
    marks = clocked_call(bench, variant, ids, prefill_chunk, new, new)
    return (marks[-1] - marks[0]) / max(1, len(marks) - 1)


def clocked_call(bench: Bench, variant: str, ids: torch.Tensor, prefill_chunk: int | None, tokens: int, new: int) -> list[float]:
    """One more ``generate()`` of ``tokens`` new tokens: ms from its start to each step's logits (``StepClock``);
    ``new``: the timed call's new tokens (``original_compiled``'s cache size)."""
    cache = bench.static_cache(ids.shape[0], ids.shape[1] + new) if variant == "original_compiled" else None
    with torch.inference_mode():
        clock = StepClock(bench.device)
        kwargs = generation_kwargs(variant, tokens, processors=[clock], prefill_chunk=prefill_chunk, cache=cache)
        if bench.device.type == "cuda":
            torch.cuda.synchronize()
        start = clock.mark()
        bench.model_of(variant).generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        if bench.device.type == "cuda":
            torch.cuda.synchronize()
    return [clock.ms(start, mark) for mark in clock.marks]


def interleaved(names: list[str], call, rounds: int, deadline: float) -> dict[str, list[float]]:
    """``call(name)`` of every name once per round, the order rotated each round, after one untimed round (caches
    and kernels of every variant in place); stops after the round that passes ``deadline``. ms per name."""
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds + 1):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            ms = call(name)
            if round_:
                times[name].append(ms)
        if time.perf_counter() > deadline:
            break
    return times


def ttft_rounds(bench: Bench, variants: dict, ids: torch.Tensor, args, deadline: float, device: str = "") -> None:
    """Each timed variant of the row (this run's and those recorded before) TTFT again in ``args.ttft_rounds``
    interleaved rounds (``interleaved``), kept as ``ttft_rounds_ms`` with the GPU they ran on
    (``rounds_device``), then, for the graph variants, their per-token latency in as many rounds of whole calls
    (``per_token_rounds_ms``). Why: the host of the lent box slows by up to 2x for seconds at a time, so one call
    per variant, each at another moment, can rank two host-bound prefills either way, and at batch 1 a
    graph-replayed step is ~15% host work (the step's small launches and ``generate()``'s own), so the same
    drift moves a per-token ratio of ~1 by several percent; rounds spread it over all of them. Each variant
    prefills as its timed call did (its recorded ``prefill_chunk``). Rounds left from an earlier run are dropped
    first, so a row's rounds all come from one run (a run cut short keeps the rounds it finished).
    ``original_compiled`` is left out: the memory release between its variants resets torch.compile (it would
    recompile); its TTFT stays the timed call's. The eager variants get no per-token rounds (a call of 256
    tokens takes them 10-20 s at the Qwen3 shape). After the rounds, on CUDA, one more first-token call of each
    under the profiler gives its ``ttft_gpu`` (``gpu_work``: kernel ms and launches, whatever the host's speed)."""
    names = [name for name in VARIANTS if name != "original_compiled" and "per_token_ms" in variants.get(name, {})]
    for name in names:
        for key in ("ttft_rounds_ms", "per_token_rounds_ms", "ttft_gpu", "rounds_device"):
            variants[name].pop(key, None)
    if not names or args.ttft_rounds < 1 or time.perf_counter() > deadline:
        return
    graphs = [name for name in names if name.endswith("_graph")]
    ttft, per_token = {}, {}
    try:
        ttft = interleaved(names, lambda name: first_token_ms(bench, name, ids, variants[name].get("prefill_chunk"), args.new_tokens),
                           args.ttft_rounds, deadline)
        if graphs and time.perf_counter() < deadline:
            per_token = interleaved(graphs, lambda name: per_token_call_ms(bench, name, ids, variants[name].get("prefill_chunk"),
                                                                           args.new_tokens), args.ttft_rounds, deadline)
        for name in names:
            if time.perf_counter() > deadline:
                break
            work = gpu_work(partial(first_token_ms, bench, name, ids, variants[name].get("prefill_chunk"), args.new_tokens))
            if work is not None:
                variants[name]["ttft_gpu"] = work
    finally:
        for key, times in (("ttft_rounds_ms", ttft), ("per_token_rounds_ms", per_token)):
            for name, ms in times.items():
                if ms:
                    variants[name][key] = ms
                    variants[name]["rounds_device"] = device
        bench.release()
