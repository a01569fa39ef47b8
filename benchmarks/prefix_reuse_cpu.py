"""Shared-prefix reuse on the bundled demo model (CPU): exact activation patching with and without it.

For each built-in probe: the shared prefix (first differing position / length, mean and range over
pairs), the CPU time (``time.process_time``, one thread, so other processes on the box do not count)
of ``activation`` scoring with prefix reuse and with it off (every pair sharing nothing: the previous
engine path), their ratio, and the max |difference| of the scores. Wall times are kept in the JSON.

Usage: ``python benchmarks/prefix_reuse_cpu.py [--length 1024 --pairs 4] [--probes ioi,kv_recall]``;
writes ``$OUT/prefix_reuse_cpu.{json,md}`` (OUT defaults to benchmarks/results).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    import headscope.patching.common as common
    from headscope import load_model
    from headscope.heads import write_json_atomic, write_text_atomic
    from headscope.patching import score
    from headscope.patching.prefix import shared_prefix
    from headscope.probes import make_probe
    from headscope.probes.tasks import TASK_NAMES
    from headscope.zoo import demo_model_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--probes", default=",".join(TASK_NAMES))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    lm = load_model(demo_model_path(), dtype=torch.float32)
    score(lm, make_probe(TASK_NAMES[0], lm.tokenizer, length=args.length, n_pairs=2, seed=1), "activation", progress=False)  # warm-up
    nothing_shared = lambda clean, corrupt: torch.zeros(len(clean), dtype=torch.long)  # noqa: E731
    rows = []
    for name in args.probes.split(","):
        probe = make_probe(name, lm.tokenizer, length=args.length, n_pairs=args.pairs, seed=0)
        t = probe.tensors()
        share = shared_prefix(t["clean"], t["corrupt"]).float() / args.length
        row = {"probe": name, "shared_mean": float(share.mean()), "shared_min": float(share.min()), "shared_max": float(share.max())}
        values = {}
        for label, prefix_fn in (("reuse", common.shared_prefix), ("full", nothing_shared)):
            original = common.shared_prefix
            common.shared_prefix = prefix_fn
            try:
                cpu, wall = time.process_time(), time.perf_counter()
                values[label] = score(lm, probe, "activation", progress=False).values
                row[f"{label}_cpu_s"], row[f"{label}_wall_s"] = time.process_time() - cpu, time.perf_counter() - wall
            finally:
                common.shared_prefix = original
        row["speedup"] = row["full_cpu_s"] / row["reuse_cpu_s"]
        row["max_abs_diff"] = float((values["reuse"] - values["full"]).abs().max())
        rows.append(row)
        print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    full, reuse = sum(r["full_cpu_s"] for r in rows), sum(r["reuse_cpu_s"] for r in rows)
    out = Path(os.environ.get("OUT", Path(__file__).parent / "results"))
    meta = {"model": "bundled demo model", "fingerprint": str(lm.fingerprint), "length": args.length, "pairs": args.pairs,
            "dtype": "float32", "threads": 1, "torch": torch.__version__, "total_full_cpu_s": full, "total_reuse_cpu_s": reuse}
    write_json_atomic(out / "prefix_reuse_cpu.json", {"meta": meta, "probes": rows})
    lines = [f"# Shared-prefix reuse, demo model, {args.pairs} pairs x {args.length} tokens, float32, CPU (1 thread, CPU time)", "",
             "| probe | shared prefix mean (min-max) | without reuse s | with reuse s | speed-up | max abs diff |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['probe']} | {r['shared_mean']:.2f} ({r['shared_min']:.2f}-{r['shared_max']:.2f}) | {r['full_cpu_s']:.1f} | "
              f"{r['reuse_cpu_s']:.1f} | **{r['speedup']:.2f}x** | {r['max_abs_diff']:.1e} |" for r in rows]
    lines.append(f"| all | | {full:.1f} | {reuse:.1f} | **{full / reuse:.2f}x** | |")
    write_text_atomic(out / "prefix_reuse_cpu.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
