"""One markdown table from the ``headscope ablate --out`` files of a folder: does each selection beat chance?

    python benchmarks/ablation_table.py benchmarks/results/smollm2/ablation_baselines [--out summary.md]

Each ``headscope ablate`` run mean-ablates one selection (the top k heads of a scores file, or a mask's
full-attention heads) and ``--random`` random head sets of the same size, drawn by ``--baseline``. Its summary
holds, per k, the selected set's one-sided empirical p-value on the probe's logit difference,
``(1 + random sets at or below it) / (n + 1)``: how often chance does at least as much damage. This script puts
every such row of the folder into one table, sorted by selection, baseline, probe and k, and says how many rows
reach p <= 0.05, with the Bonferroni threshold over the rows of each (selection, baseline) family: the probes
of one family share their random sets (same seed and selection), so their p-values are not independent, and
no family-wise combination other than Bonferroni's (valid under any dependence) is claimed.

The table goes to ``FOLDER/summary.md`` unless ``--out`` names another file; an existing file is replaced only
when it is this script's own table (its first line), never another file. Bad input: one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from headscope.ablation import selection_label
from headscope.heads import write_text_atomic

TITLE = "# Mean ablation: selected heads against random head sets"
ALPHA = 0.05


class TableError(Exception):
    pass


def load_runs(folder: Path) -> list[dict]:
    """Every ``headscope.ablation`` JSON of the folder (other JSON files are skipped), sorted by file name."""
    runs = []
    for path in sorted(folder.glob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise TableError(f"{path}: not readable JSON ({err})") from None
        if isinstance(payload, dict) and payload.get("kind") == "headscope.ablation":
            payload["file"] = path.name
            runs.append(payload)
    if not runs:
        raise TableError(f"{folder}: no `headscope ablate --out` files (kind headscope.ablation) in it")
    return runs


def check_one_version(runs: list[dict]) -> None:
    """Refuse a folder whose runs used two different files of one name (a mask or scores file rewritten between
    runs): their rows would sit in one family as if they tested one selection. Only runs that record the file's
    sha256 (``selected_from``) are compared: a file from before it was kept cannot be told apart from a newer one."""
    seen: dict[str, tuple[str, str]] = {}
    for run in runs:
        origin = run.get("selected_from") or {}
        if "sha256" not in origin:
            continue
        name, digest = origin["file"], origin["sha256"]
        first = seen.setdefault(name, (digest, run["file"]))
        if first[0] != digest:
            raise TableError(f"{first[1]} and {run['file']} used two different files named {name} (sha256 {first[0]} and "
                             f"{digest}); keep the runs of one version in a folder")


def table_rows(runs: list[dict]) -> list[dict]:
    check_one_version(runs)
    rows = []
    for run in runs:
        for entry in run["summary"]:
            rows.append({"selection": selection_label(run), "baseline": run.get("baseline", "uniform"), "probe": run["probe"],
                         "length": run["length"], "pairs": run["n_pairs"], "file": run["file"], **entry})
    return sorted(rows, key=lambda r: (r["selection"], r["baseline"], r["probe"], r["k"]))


def _sd(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _resampled(p: list[float] | None) -> str:
    return "-" if p is None else f"{p[1]:.3f} ({p[0]:.3f}-{p[2]:.3f})"


def markdown(rows: list[dict]) -> str:
    families: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        families[(row["selection"], row["baseline"])].append(row)
    lines = [TITLE, "",
             "Logit difference (answer - wrong) and argmax accuracy on fresh pairs; `p`: the selected set's one-sided "
             "empirical p-value against the random sets, (1 + sets at or below) / (n + 1); `shared`: heads a random "
             "set shares with the selection, on average; `p over resampled pairs`: the same p's median (5th-95th "
             "percentile) over bootstrap resamples of the evaluation pairs, how much it rests on the prompts drawn ('-': a "
             "file from before the pairs were kept). Made by `benchmarks/ablation_table.py` from the "
             "`headscope ablate --out` files beside it.", "",
             "| selection | baseline | probe | tokens x pairs | k | unablated | selected ablated | random ablated (mean +- sd) | n | shared | p | p over resampled pairs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['selection']} | {row['baseline']} | {row['probe']} | {row['length']} x {row['pairs']} | {row['k']} | "
            f"{row['base_argmax']:.2f} / {row['base_logit_diff']:+.2f} | "
            f"{row['selected_argmax']:.2f} / {row['selected_logit_diff']:+.2f} | "
            f"{row['random_argmax_mean']:.2f} +- {_sd(row['random_argmax_sd'])} / "
            f"{row['random_logit_diff_mean']:+.2f} +- {_sd(row['random_logit_diff_sd'])} | "
            f"{row['n_random']} | {row['random_overlap_mean']:.1f} | {row['p_logit_diff']:.3f} | {_resampled(row.get('p_resampled'))} |")
    lines += ["", "## Per family (one selection, one baseline, its probes and k)", ""]
    for (selection, baseline), members in families.items():
        threshold = ALPHA / len(members)
        passed = sum(r["p_logit_diff"] <= ALPHA for r in members)
        family_wise = sum(r["p_logit_diff"] <= threshold for r in members)
        smallest = min(1 / (r["n_random"] + 1) for r in members)
        note = "" if smallest <= threshold else f" (no row can reach it: the smallest possible p is {smallest:.3f})"
        lines.append(f"- {selection}, {baseline}: {passed} of {len(members)} rows at p <= {ALPHA}; "
                     f"{family_wise} at the Bonferroni threshold {threshold:.4f}{note}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default FOLDER/summary.md)")
    args = parser.parse_args(argv)
    out = args.out or args.folder / "summary.md"
    try:
        if not args.folder.is_dir():
            raise TableError(f"{args.folder}: not a folder")
        if out.exists() and (not out.is_file() or out.read_text().split("\n", 1)[0] != TITLE):
            raise TableError(f"{out}: exists and is not a table of this script; refusing to replace it")
        text = markdown(table_rows(load_runs(args.folder)))
    except TableError as err:
        print(f"ablation_table: {err}", file=sys.stderr)
        return 2
    write_text_atomic(out, text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
