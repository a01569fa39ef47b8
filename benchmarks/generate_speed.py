"""End-to-end ``generate()`` speed: the original model against its 7:1 head-wise hybrid, side by side, resumable.

Models (bf16 on CUDA): ``qwen3-1.7b``, a random Qwen3 with Qwen3-1.7B's shape built from a config (no
download), whose hybrid keeps KV group 0 of every layer at full attention (2 of 16 heads: 7:1); and
``smollm2`` (``--model DIR``, e.g. SmolLM2-135M), whose hybrid uses ``--mask`` (default the KV-aware fused
mask ``benchmarks/results/smollm2/kv_aware_mask.json``; a random KV-aware 7:1 mask when that file was
made for another model), or is ``--hybrid DIR``, a trained hybrid of ``--model`` (``headscope transfer``'s
``final/``; its row files carry its name: an untrained hybrid is no language model, so its float32 checks
say little, ``benchmarks/bf16_sensitivity.py``); and ``smollm2-shape``, a random Llama with SmolLM2-135M's shape built from a config
(speed does not depend on the weights; its positions raised to 128K), with the same mask. The hybrid is ``build_hybrid`` of the same weights. Each row is one (model,
context, batch). Prompts are random ids, except that with ``--prompt-file`` (a .txt / .jsonl file, read and
tokenised once with ``--model``'s tokenizer, eos between documents) the smollm2 rows get real text: the
file's tokens tiled end to end, row ``i`` starting ``i x context`` tokens in. A row file records its prompt;
a text's row files carry its name (``smollm2_4096_b1_text-python_docs.json``), so random-id and text rows
of one shape sit side by side in the summary, each labelled; a run that would add variants with another
prompt to a row file (another text under the same name) stops with one line (exit 2). In one process a
row times ``generate()`` (greedy, exactly ``--new-tokens`` new tokens) for each variant:

* ``original``: transformers' default (``DynamicCache``, eager);
* ``original_compiled``: transformers' ``StaticCache``, which ``generate()`` compiles on CUDA
  (``torch.compile``, mode reduce-overhead): the original's fast path as shipped. One cache serves the warm-up
  and the timed call (reset in between), as the hybrid's does: the compiled graphs treat the cache tensors as
  static addresses, and a fresh cache per call (``cache_implementation="static"``) would re-record them in the
  timed call. Its sdpa attention gets a bool mask over the static length, so transformers repeats the KV heads
  to the query heads (``repeat_kv``: twice the cache written and read again per layer and step; 5.17 always,
  5.25 when compiling) before the kernel (``sdpa_backends`` records which);
* ``original_graph``: the original on the hybrid's kernels: ``build_full_attention`` (the same weight
  tensors as an all-FA ``HybridForCausalLM``) decoded as ``hybrid_graph`` is (static cache, one CUDA graph per
  step, ``kernels/fa_decode`` reading each KV head once for its query heads, over the tokens seen only). The
  fastest exact baseline at hand: transformers' compiled path pays ``repeat_kv``; SDPA's grouped kernels want
  no mask (flash; the keys then sliced to a length that changes every step, which a CUDA graph cannot hold),
  and a masked grouped call has cuDNN as its only fused kernel in torch 2.11 (the memory-efficient kernel
  takes no grouped heads; math otherwise), over the whole static buffer. Its reference check runs the
  original's own float32 forward;
* ``hybrid_eager``: the hybrid with ``decode_mode="dynamic"`` (``DynamicCache``, eager: the reference);
* ``hybrid_graph``: the hybrid's default on CUDA (``HybridStaticCache``, decode steps replayed as one
  CUDA graph; ``--smoke``: the same static path, eager, on the CPU; original_graph likewise).

Per variant: a warm-up ``generate()`` of the same shape stopped after 3 tokens (kernels compile, the
static caches and graphs are built and then reused), then the timed call (``--prefill-chunk``: all
variants prefill in chunks, transformers' ``prefill_chunk_size``, for batch x context that does not fit at
once; recorded per variant). A logits processor records a CUDA event at every step, so one call gives the
time to first token (``generate()`` entered -> first logits: prefill and set-up) and the per-token latency
(mean over the remaining steps); tokens/s = batch x new tokens / total. In rows of at most ``TTFT_ROUNDS_MAX_TOKENS``
tokens (batch x context), where the prefill is short enough to be bound by the host, whose speed on the lent box
drifts by up to 2x for seconds at a time, each variant's TTFT is measured again after all of them ran, in
``--ttft-rounds`` interleaved rounds of calls stopped at the first token (``ttft_rounds_ms``; the summary's TTFT is
their median there, and their ratios get a table of their own). ``graph_captured`` (CUDA): whether
a graph variant's decode step really was captured (a failed capture warns and decodes eagerly; the summary
flags it). Correctness, after the timed call, on its first ``--check-tokens`` tokens
(``generate_speed_report``): ``graph_equals_static_eager``: a graph variant's tokens against the same static
path run eagerly with the same prefill (chunks included: identical kernels on identical inputs, must be
equal); ``reference_check``: each variant's tokens teacher-forced through a plain forward with float32
weights (``--reference-dtype``; the hybrid's, or the original's for every original variant) on the torch path of
every ``headscope.kernels`` op (no Triton or fla kernel of the candidate's, nothing compiled), on the first
``--check-rows`` rows: how far below the exact model's best each chosen token is (nats; ``--gap-tol``), and
the first step's logit error; ``vs_<twin>``: where the greedy tokens part from the eager twin's
(``hybrid_graph`` vs ``hybrid_eager``, ``original_compiled`` and ``original_graph`` vs ``original``; in bf16
they part at the first near-tie). A check that fails (out of memory) is recorded and the timing kept. Memory
(``generate_speed_device``): before each variant its need beyond the weights is estimated (cache + prefill
activations, recorded as ``estimated_*_gb``; the row records ``weights_gb``) and the variant is skipped,
with the estimate, only when that plus ``HEADROOM`` exceeds the memory free at that moment; an
out-of-memory error is recorded, not raised. Each row also records ``sdpa_backends``.

Usage (GPU, after ``. benchmarks/gpu_setup.sh``)::

    python benchmarks/generate_speed.py --rows qwen3-1.7b:4096:b1,qwen3-1.7b:4096:b32
    python benchmarks/generate_speed.py --rows qwen3-1.7b:32768:b32 --prefill-chunk 4096 --variants original_graph,hybrid_graph,original_compiled
    python benchmarks/python_docs_text.py --out /tmp/python_docs.jsonl
    python benchmarks/generate_speed.py --model /tmp/smol --prompt-file /tmp/python_docs.jsonl --rows smollm2:32768:b1

Rows are ``<model>:<context>:b<batch>`` over ``--contexts`` x ``--batches`` (default 4096, 32768, 131072 x
1, 32); without ``--rows`` every unfinished row of the models at hand runs. Row files
(``--rows-dir``, default ``benchmarks/results/generate_speed_rows``) are written after every variant (and once
before each of its checks, marked ``checks_not_finished`` with the check under way, which the summary gives no ratio;
each variant records the seconds of its phases, ``phase_s``); a rerun runs only the
variants not timed and checked yet (missing, unchecked, or skipped: by the memory guard, out of memory, a failure;
``--variants`` restricts them; ``--redo``: those of ``--variants`` again), and stops starting variants after
``--budget`` seconds. The summary ``$OUT/generate_speed.{json,md}``
(OUT defaults to benchmarks/results) is rebuilt from every row file of the directory, and ``$OUT`` gets a copy
of each row file this run saves (only those: a lent GPU box returns 8 files); ``--summary-only`` rebuilds it from the row files alone (no model, nothing run). It sets the two
baselines side by side at each row's batch: the original as shipped (the faster of original and
original_compiled) and on the same kernels (original_graph), each over the hybrid.
``--smoke``: tiny models on the CPU in float32 (results under /tmp/headscope_generate_speed_smoke).

Helper modules next to this script: ``generate_speed_models`` (the models of a row kind, the prompt file),
``generate_speed_device`` (memory guard, SDPA backends), ``generate_speed_timing`` (the timed calls and rounds),
``generate_speed_report`` (checks) and ``generate_speed_summary`` (the summary tables).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import time
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
TTFT_ROUNDS_MAX_TOKENS = 16384  # batch x context of the rows whose TTFT is measured again in interleaved rounds
if str(HERE) not in sys.path:
    sys.path.append(str(HERE))  # the helper modules next to this script, also when it is loaded by path (the tests)

import torch  # noqa: E402

from generate_speed_device import HEADROOM, fits, free_bytes, sdpa_backends  # noqa: E402
from generate_speed_models import KINDS, ROOT, Bench, read_prompt  # noqa: E402
from generate_speed_report import RANDOM_PROMPT, UNCHECKED, VARIANTS, default_gap_tol, reference_gaps, twin_agreements  # noqa: E402
from generate_speed_summary import row_order, row_settings, summary_lines  # noqa: E402
from generate_speed_timing import graph_check, timed_generate, ttft_rounds  # noqa: E402
from headscope.heads import HeadscopeError  # noqa: E402


def attempt(step):
    """``step()``, or ``{"failed": "..."}`` when it raises: one failing variant or check (a compile, a capture, out
    of memory) must not stop the row, nor lose a timing already made."""
    try:
        return step()
    except torch.OutOfMemoryError as err:
        return {"failed": f"out of memory: {str(err).splitlines()[0]}"}
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        return {"failed": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"}


def run_row(bench: Bench, row: str, record: dict, args, save, deadline: float) -> None:
    _, context, batch = row.split(":")
    context, batch = int(context), int(batch.removeprefix("b"))
    ids = bench.prompt_ids(batch, context)
    variants = record.setdefault("variants", {})
    record["weights_gb"] = bench.weights_bytes() / 1e9  # in every variant's peak, not in its estimate
    record["sdpa_backends"] = sdpa_backends(bench.config, context + args.new_tokens, args.prefill_chunk, bench.device, bench.dtype)
    for variant in args.variants:
        done = variants.get(variant, {})
        if "per_token_ms" in done and UNCHECKED not in done and not args.redo:  # timed and checked; a skipped one runs again
            continue
        if time.perf_counter() > deadline:
            print(f"  {row} {variant}: not started (budget spent); run again", flush=True)
            return
        need = bench.need(variant, batch, context, args.new_tokens, args.prefill_chunk)
        estimate = {f"estimated_{k}_gb": v / 1e9 for k, v in need.items()}
        free = free_bytes(bench.device) if bench.device.type == "cuda" else None  # now: the last variant's caches are gone
        if free is not None and not fits(need["total"], free):
            variants[variant] = {"skipped": f"needs ~{need['total'] / 1e9:.0f} GB + {HEADROOM / 1e9:.0f} GB headroom, "
                                            f"{free / 1e9:.0f} GB free", **estimate}
        else:
            print(f"  {row} {variant} ...", flush=True)
            started = time.perf_counter()
            timed = attempt(lambda: timed_generate(bench, variant, ids, args.new_tokens, args.prefill_chunk, min(args.check_rows, batch)))
            bench.release(compiled=variant == "original_compiled")
            if isinstance(timed, dict):
                variants[variant] = {"skipped": timed["failed"], **estimate}
            else:
                (result, first_scores), n = timed, min(args.check_tokens, args.new_tokens)
                # seconds of each phase (build, compile, warm-up and timed calls in the first), saved as it ends
                result.update(estimate, run=args.run, device=record["device"], phase_s={"timed": round(time.perf_counter() - started, 1)})

                @contextmanager
                def check(phase: str):  # saved before the check (a call killed in it keeps the timing and says where), timed after it
                    variants[variant] = {**result, UNCHECKED: phase}
                    save()
                    since = time.perf_counter()
                    yield
                    result["phase_s"][phase] = round(time.perf_counter() - since, 1)

                if variant.endswith("_graph"):  # the checks run after the timed call's caches are gone
                    with check("graph_check"):
                        result["graph_equals_static_eager"] = attempt(
                            lambda: graph_check(bench, variant, ids, result["new_tokens"], n, args.prefill_chunk))
                        bench.release()
                with check("reference_check"):
                    tokens = torch.tensor([r[:n] for r in result["new_tokens"][: first_scores.shape[0]]])
                    reference_dtype = torch.float32 if args.reference_dtype == "float32" else None
                    result["reference_check"] = attempt(lambda: reference_gaps(bench.reference_of(variant), ids[: len(tokens)], tokens,
                                                                               first_scores, args.gap_tol, reference_dtype))
                variants[variant] = result
        twin_agreements(record)
        result = variants[variant]
        print(f"  {row} {variant}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()
                                                 if k != "new_tokens" and not k.startswith(("vs_", "estimated_"))), flush=True)
        save()
    if batch * context <= TTFT_ROUNDS_MAX_TOKENS:
        outcome = attempt(lambda: ttft_rounds(bench, variants, ids, args, deadline, record["device"]))
        if isinstance(outcome, dict):
            record["ttft_rounds_failed"] = outcome["failed"]
        for key in ("ttft_rounds_ms", "per_token_rounds_ms"):
            print(f"  {row} {key}: " + "; ".join(f"{name} {', '.join(f'{x:.2f}' for x in r[key])}"
                                               for name, r in variants.items() if key in r), flush=True)
        save()


def write_summary(rows_dir: Path, out_dir: Path) -> None:
    """``out_dir``/generate_speed.{json,md} from every row file of ``rows_dir``, whatever a run's rows and prompt;
    the settings are the rows' own (``row_settings``), not this machine's."""
    from headscope.heads import write_json_atomic, write_text_atomic

    rows = {path.stem: json.loads(path.read_text()) for path in rows_dir.glob("*.json")}
    rows = dict(sorted(rows.items(), key=lambda item: row_order(item[1])))
    write_json_atomic(out_dir / "generate_speed.json", {"settings": row_settings(rows), "rows": rows})
    write_text_atomic(out_dir / "generate_speed.md", "\n".join(summary_lines(rows)) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a local HF model directory: the smollm2 rows (e.g. SmolLM2-135M)")
    parser.add_argument("--mask", default=None, help="mask file of --model's hybrid (default: benchmarks/results/smollm2/kv_aware_mask.json)")
    parser.add_argument("--hybrid", default=None, help="a trained hybrid of --model (e.g. `headscope transfer`'s final/): the smollm2 "
                        "rows time it instead of building one from --mask; their row files carry its name")
    parser.add_argument("--rows", default=None, help="comma list of <model>:<context>:b<batch> rows (default: every unfinished row)")
    parser.add_argument("--rows-dir", default=None)
    parser.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 32768, 131072])
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    parser.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--check-tokens", type=int, default=32, help="new tokens the correctness checks look at (the first ones)")
    parser.add_argument("--check-rows", type=int, default=1, help="rows of the teacher-forced reference check (the first ones)")
    parser.add_argument("--gap-tol", type=float, default=None, help="nats: a token is consistent with the reference when its "
                        "logit is at most this far below the reference's best (default 0.1 in bf16, 1e-4 in float32)")
    parser.add_argument("--reference-dtype", choices=("float32", "model"), default="float32",
                        help="weights of the teacher-forced reference forward: float32 copies (the exact model) or the model's own")
    parser.add_argument("--prompt-file", default=None, help="a .txt / .jsonl file: the smollm2 rows' prompts are its text, "
                        "tokenised once and tiled to the context (default: random ids)")
    parser.add_argument("--redo", action="store_true", help="run the --variants of the rows again even where recorded")
    parser.add_argument("--prefill-chunk", type=int, default=None, help="prefill in chunks of this many tokens (all variants; less activation memory)")
    parser.add_argument("--ttft-rounds", type=int, default=5, help="rows of at most %d tokens (batch x context): each variant's "
                        "TTFT again in this many interleaved rounds after the timed calls (0: none)" % TTFT_ROUNDS_MAX_TOKENS)
    parser.add_argument("--budget", type=float, default=480.0, help="seconds: start no variant after this")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU in float32 (the test)")
    parser.add_argument("--summary-only", action="store_true", help="rebuild $OUT/generate_speed.{json,md} from the row files of "
                        "--rows-dir and stop: no model is loaded, nothing runs")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    args.run = datetime.now(timezone.utc).isoformat()  # stamped on each variant timed by this call (``run``)
    from headscope.heads import write_json_atomic

    if args.smoke:
        args.contexts, args.batches, args.new_tokens, args.check_tokens = [16, 40], [1, 3], 6, 4
        args.ttft_rounds = min(args.ttft_rounds, 2)
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        parser.error(f"unknown variants {bad}; variants are {', '.join(VARIANTS)}")
    if args.check_tokens < 1 or args.check_rows < 1:
        parser.error("--check-tokens and --check-rows must be at least 1")
    if args.hybrid and not args.model:
        parser.error("--hybrid needs --model (the model it was trained from: the original variants)")
    if args.hybrid and args.mask:
        parser.error("--hybrid comes with its own mask: give --mask or --hybrid, not both")
    if args.hybrid and not Path(args.hybrid).is_dir():
        parser.error(f"--hybrid {args.hybrid} is not a directory (a saved hybrid: `headscope transfer`'s final/)")
    if args.prompt_file and not args.model:
        parser.error("--prompt-file needs --model (the smollm2 rows' tokenizer)")
    results = Path("/tmp/headscope_generate_speed_smoke") if args.smoke else ROOT / "benchmarks" / "results"
    rows_dir = Path(args.rows_dir or results / "generate_speed_rows")
    out_dir = Path(os.environ.get("OUT", results))
    if args.summary_only:
        if not any(rows_dir.glob("*.json")):
            raise HeadscopeError(f"--summary-only: no row files in {rows_dir}")
        write_summary(rows_dir, out_dir)
        print((out_dir / "generate_speed.md").read_text(), flush=True)
        return 0
    kinds = ["qwen3-1.7b"] + (["smollm2"] if args.model else ["smollm2-shape"])
    order = [f"{k}:{c}:b{b}" for k in kinds for c in args.contexts for b in args.batches]
    wanted = args.rows.split(",") if args.rows else order
    for row in wanted:
        parts = row.split(":")
        if len(parts) != 3 or parts[0] not in KINDS or not parts[1].isdigit() or not parts[2].startswith("b"):
            parser.error(f"row {row!r} is not <{'|'.join(KINDS)}>:<context>:b<batch>")
        if parts[0] == "smollm2" and not args.model:
            parser.error(f"row {row!r} needs --model (the SmolLM2 directory)")
    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    args.gap_tol = default_gap_tol(dtype) if args.gap_tol is None else args.gap_tol
    import transformers

    settings = {"device": torch.cuda.get_device_name() if cuda else "cpu (--smoke)", "dtype": str(dtype).removeprefix("torch."),
                "torch": torch.__version__, "transformers": transformers.__version__, "new_tokens": args.new_tokens}
    text = read_prompt(args.prompt_file, args.model) if args.prompt_file else None
    texts = lambda row: text is not None and row.startswith("smollm2:")  # noqa: E731
    prompt_of = lambda row: text[1] if texts(row) else RANDOM_PROMPT  # noqa: E731
    tag = "_text-" + re.sub(r"[^A-Za-z0-9.-]", "_", Path(args.prompt_file).stem) if text is not None else ""
    if args.hybrid:  # a trained hybrid's rows sit beside the built hybrid's, under its name
        tag += "_hybrid-" + re.sub(r"[^A-Za-z0-9.-]", "_", "-".join(Path(args.hybrid).resolve().parts[-2:]))
    row_path = lambda row: rows_dir / f"{row.replace(':', '_')}{tag if row.startswith('smollm2:') else ''}.json"  # noqa: E731

    recorded = {row: json.loads(row_path(row).read_text()) for row in wanted if row_path(row).is_file()}
    timed = lambda row: {v for v, r in recorded.get(row, {}).get("variants", {}).items()  # noqa: E731
                         if "per_token_ms" in r and UNCHECKED not in r}  # (timed and checked, as run_row skips)
    pending = [row for row in wanted if args.redo or not set(args.variants) <= timed(row)]
    for row in pending:  # one prompt per row file (a text's name is in it): its variants are compared with each other
        if row in recorded and recorded[row].get("prompt", RANDOM_PROMPT) != prompt_of(row):
            raise HeadscopeError(f"{row_path(row)} was made with the prompt '{recorded[row].get('prompt', RANDOM_PROMPT)}', "
                                 f"this run's is '{prompt_of(row)}': use another --rows-dir or remove the file")
    print(f"{len(wanted) - len(pending)} of {len(wanted)} rows done in {rows_dir}; running {pending or 'none'}", flush=True)
    mirror = out_dir / rows_dir.name if out_dir.resolve() != rows_dir.parent.resolve() else None

    def save(row: str, record: dict) -> None:
        """The row file, its copy under $OUT (a run killed by a timeout keeps every row it saved) and the summary."""
        write_json_atomic(row_path(row), record)
        if mirror is not None:
            write_json_atomic(mirror / row_path(row).name, record)
        write_summary(rows_dir, out_dir)

    benches: dict[str, Bench] = {}
    for row in pending:
        kind = row.split(":")[0]
        if kind not in benches:
            benches.clear()
            gc.collect()
            benches[kind] = Bench(kind, args, device, dtype, text if kind == "smollm2" else None)
        bench = benches[kind]
        record = recorded.get(row, {})
        if record.get("hybrid_id", bench.hybrid_id) != bench.hybrid_id:  # one hybrid per row file, as one prompt
            raise HeadscopeError(f"{row_path(row)} holds variants of another hybrid ({record['hybrid_id']}: {record.get('mask')}) than "
                                 f"this run's ({bench.hybrid_id}: {bench.mask_source}): use another --rows-dir or remove the file")
        record.update(row=row, mask=bench.mask_source, n_full_heads=bench.mask.n_full, hybrid_id=bench.hybrid_id, prompt=bench.prompt,
                      **settings)
        run_row(bench, row, record, args, partial(save, row, record), started + args.budget)
    write_summary(rows_dir, out_dir)
    print((out_dir / "generate_speed.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    from headscope.cli import script_main

    script_main(main)
