"""The results of ``benchmarks/hybrid_quality.py`` (a helper module of that script, not a script).

``Results`` holds the one JSON document of a run (schema ``headscope.hybrid_quality/1``): ``settings``
(everything that changes the numbers; ``settings_of``), ``budget`` (the training steps every hybrid arm
gets, fixed once), ``fused_mask``, ``arms`` (one record per arm in run order: ``pending``, ``done``,
``failed`` with the error and traceback, or ``skipped_out_of_time``), ``notes`` and ``summary``
(``headscope.seeds``: per arm family the mean +- sd over mask seeds and the transfer-seed sd, and the
goal checks). ``Results.write`` rewrites, atomically, after every arm:

* ``hybrid_quality.json`` in ``--out`` and a copy in ``--work`` (a rerun resumes from the ``--out`` file,
  else from the copy, so an empty ``--out`` such as the device tool's ``$OUT`` still resumes);
* ``hybrid_quality.md``: ``headscope.quality.results_markdown`` (arm x metric tables) and
  ``headscope.seeds.seeds_markdown`` (seed summary, goals);
* ``hybrid_quality.html``: ``headscope.quality.family_figure``, ``headscope.seeds.overlap_figure`` (when there is a
  fused mask) then ``accuracy_figure`` (plotly from its CDN), and
  ``hybrid_quality.png`` when kaleido is installed and can render.

An arm record built with ``--arm-option`` switches holds them as ``hybrid_options`` (the run's
``--hybrid-option`` ones are in ``settings``); records without the key were built with none.

A results file made with other settings is never overwritten: resuming from it is an error that names
the settings that changed (``--fresh`` or another ``--out``); so is planning an arm whose family has a done run
with other ``--arm-option`` switches, or planning ``<arm>_t<k>`` beside a done ``<arm>`` run with transfer seed ``k``
(``check_resumed_arms``). ``merge_results`` combines the files of ``--shard`` runs (and refuses an arm
done with different switches in two of them, or one family's runs done with different switches).
"""

from __future__ import annotations

import hashlib
import sys
import traceback
from pathlib import Path
from typing import Mapping

from headscope.heads import HeadscopeError, read_json, write_json_atomic, write_text_atomic
from headscope.quality import accuracy_figure, family_figure, format_switches, results_markdown
from headscope.seeds import arm_family, family_stats, goal_checks, mask_name, overlap_figure, seeds_markdown, transfer_seed

SCHEMA = "headscope.hybrid_quality/1"


class Results:
    """The results file: settings (checked on resume), budget, fused mask and one record per arm.

    A copy is kept in the work directory too, so a rerun resumes even when ``--out`` starts empty (the
    device tool's ``$OUT``); the file in ``--out`` wins when both exist.
    """

    def __init__(self, out: Path, work: Path, settings: dict, arms: list[tuple[str, str]], fresh: bool,
                 options: Mapping[str, dict] | None = None) -> None:
        """``arms``: (name, kind) of the arms to run; ``options``: per arm, its ``--arm-option`` switches (missing: none)."""
        self.out, self.path, self.copy = out, out / "hybrid_quality.json", work / "hybrid_quality.json"
        source = next((p for p in (self.path, self.copy) if p.is_file()), None) if not fresh else None
        data = read_json(source, "results") if source is not None else None
        options = options or {}
        if data is not None:
            if data.get("settings") != settings:
                changed = sorted(k for k in set(settings) | set(data.get("settings", {})) if settings.get(k) != data["settings"].get(k))
                raise HeadscopeError(f"{source} was made with other settings ({', '.join(changed)}); pass --fresh or another --out")
            check_resumed_arms(source, data["arms"], [name for name, _ in arms], options)
            print(f"resuming from {source}", flush=True)
        self.data = data or {"schema": SCHEMA, "settings": settings, "budget": None, "fused_mask": None, "arms": {}, "notes": []}
        for name, kind in arms:
            switches = options.get(name)
            self.data["arms"].setdefault(name, {"kind": kind, **({"hybrid_options": switches} if switches else {}), "status": "pending"})

    @classmethod
    def of(cls, out: Path, work: Path, data: dict) -> "Results":
        """Results holding ``data`` as they are (no file read, no settings check): for ``merge_results``."""
        results = cls.__new__(cls)
        results.out, results.path, results.copy, results.data = out, out / "hybrid_quality.json", work / "hybrid_quality.json", data
        return results

    @property
    def arms(self) -> dict:
        return self.data["arms"]

    def note(self, text: str) -> None:
        """Print ``text`` and keep it (once) in the results' notes."""
        print(text, flush=True)
        if text not in self.data["notes"]:
            self.data["notes"].append(text)

    def write(self) -> None:
        """JSON (with the seed summary and goal checks), markdown tables and figure (png too when kaleido is
        installed), all atomically."""
        self.out.mkdir(parents=True, exist_ok=True)
        families = family_stats(self.data)
        self.data["summary"] = {"families": families, "goals": goal_checks(self.data, families)}
        write_json_atomic(self.path, self.data)
        write_json_atomic(self.copy, self.data)
        try:
            table = results_markdown(self.data) + "\n" + seeds_markdown(self.data, families, self.data["summary"]["goals"])
            write_text_atomic(self.out / "hybrid_quality.md", table)
            figure = accuracy_figure(self.data)
            overlap = overlap_figure(self.data)
            divs = [family_figure(self.data, families).to_html(full_html=False, include_plotlyjs="cdn")]
            divs += [overlap.to_html(full_html=False, include_plotlyjs=False)] if overlap is not None else []
            divs.append(figure.to_html(full_html=False, include_plotlyjs=False))
            title = f"Hybrid quality — {self.data['settings']['model_name']}"
            body = "\n".join(divs)
            write_text_atomic(self.out / "hybrid_quality.html", f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
                              f'</head><body>\n{body}\n</body></html>\n')
        except Exception as error:  # noqa: BLE001 - the JSON is written; the tables can be rebuilt from it
            print(f"writing the table/figure failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            return
        try:
            import kaleido  # noqa: F401
        except ImportError:
            return
        try:
            figure.write_image(str(self.out / "hybrid_quality.png"), width=figure.layout.width, height=figure.layout.height)
        except Exception as error:  # noqa: BLE001 - kaleido needs a browser; the html has the same figure
            print(f"png not written: {type(error).__name__}: {error}", file=sys.stderr, flush=True)


def check_resumed_arms(source: Path, records: Mapping[str, dict], names: list[str], options: Mapping[str, dict]) -> None:
    """Refuse to resume ``names`` from the ``records`` of ``source`` when a done arm of one of their families was trained
    with other ``--arm-option`` switches than ``options`` gives the family (a record's ``hybrid_options``; also the done
    runs this command does not resume: the seed summary pools a family's runs), or when ``<arm>_t<k>`` would repeat the
    done ``<arm>`` trained with transfer seed ``k``. Raises HeadscopeError."""
    wanted = {arm_family(name): options.get(name, {}) for name in names}
    differ = [f"{name} ({format_switches(record.get('hybrid_options', {})) or 'no options'}; this command: "
              f"{format_switches(wanted[arm_family(name)]) or 'no options'})"
              for name, record in records.items() if record.get("status") == "done" and arm_family(name) in wanted
              and record.get("hybrid_options", {}) != wanted[arm_family(name)]]
    if differ:
        raise HeadscopeError(f"{source} holds runs of these arm families trained with other --arm-option switches: {'; '.join(differ)}; "
                             "give the same options, a new arm name, --fresh or another --out")
    for name in names:
        seed, twin = transfer_seed(name), records.get(mask_name(name), {})
        if seed is not None and name not in records and twin.get("status") == "done" and twin.get("transfer_seed") == seed:
            raise HeadscopeError(f"{source}: {mask_name(name)} is done with transfer seed {seed}, the run {name} would repeat; "
                                 f"leave {name} out (--arms), the record already counts as that seed of the mask")


def merge_results(sources: list[Path], out: Path, work: Path) -> int:
    """Combine the results files of ``--shard`` runs into ``out``; returns how many arms are done.

    Every source must have the settings and budget of the first; an arm takes the record of the first
    source where it is done (else its first record). Raises HeadscopeError on a missing or mismatched file.
    """
    datas = []
    for source in sources:
        path = source / "hybrid_quality.json"
        if not path.is_file():
            raise HeadscopeError(f"--merge: {path} does not exist")
        datas.append((path, read_json(path, "results")))
    first_path, first = datas[0]
    for path, data in datas[1:]:
        if data.get("settings") != first.get("settings"):
            changed = sorted(k for k in set(data["settings"]) | set(first["settings"]) if data["settings"].get(k) != first["settings"].get(k))
            raise HeadscopeError(f"--merge: {path} was made with other settings than {first_path} ({', '.join(changed)})")
        if data.get("budget") != first.get("budget"):
            raise HeadscopeError(f"--merge: {path} has another training budget than {first_path}; shards must share it (--steps)")
    merged = dict(first, arms={}, notes=list(dict.fromkeys(n for _, d in datas for n in d.get("notes", []))))
    # Plan order again: shard I holds hybrid arms I, I+N, ...; so the teacher, then the sources' arms in turn.
    lists = [[name for name, record in d["arms"].items() if record.get("kind") != "teacher"] for _, d in datas]
    order = [name for _, d in datas for name, record in d["arms"].items() if record.get("kind") == "teacher"]
    order += [names[i] for i in range(max(map(len, lists))) for names in lists if i < len(names)]
    for name in dict.fromkeys(order):
        records = [d["arms"][name] for _, d in datas if name in d["arms"]]
        if len({format_switches(r.get("hybrid_options", {})) for r in records if r.get("status") == "done"}) > 1:
            raise HeadscopeError(f"--merge: {name} is done with different --arm-option switches in different sources; rename one arm")
        merged["arms"][name] = next((r for r in records if r.get("status") == "done"), records[0])
    switches: dict[str, set[str]] = {}  # family -> the switches of its done runs: one set, or its seed summary mixes them
    for name, record in merged["arms"].items():
        if record.get("status") == "done" and record.get("kind") != "teacher":
            switches.setdefault(arm_family(name), set()).add(format_switches(record.get("hybrid_options", {})))
    mixed = [f"family {family} ({'; '.join(sorted(s or 'no options' for s in found))})" for family, found in switches.items() if len(found) > 1]
    if mixed:
        raise HeadscopeError(f"--merge: runs of one arm family done with different --arm-option switches: {', '.join(mixed)}; rename one arm")
    merged["fused_mask"] = next((d["fused_mask"] for _, d in datas if d.get("fused_mask")), None)
    merged["merged_from"] = [str(path) for path, _ in datas]
    work.mkdir(parents=True, exist_ok=True)
    Results.of(out, work, merged).write()
    return sum(1 for record in merged["arms"].values() if record.get("status") == "done")


def data_settings(args) -> dict:
    """What the training data is: the demo corpus, or the ``--data`` paths with a digest of their bytes."""
    if not args.data:
        return {"source": "demo_corpus"}
    digest = hashlib.sha256()
    for entry in args.data:
        path = Path(entry)
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                digest.update(file.read_bytes())
    return {"source": "files", "paths": list(args.data), "sha256": digest.hexdigest()[:16], "heldout_fraction": args.heldout_fraction}


def settings_of(args, model_dir: Path, fingerprint, base: int) -> dict:
    """The run's settings: a rerun with other settings does not resume (see ``Results``)."""
    settings = {
        "model": str(model_dir), "model_name": model_dir.name, "fingerprint": fingerprint.to_dict(), "teacher_length": base,
        "lengths": [base * k for k in args.length_multiples], "probes": list(dict.fromkeys(args.retrieval_probes + args.reasoning_probes)),
        "retrieval_probes": args.retrieval_probes, "reasoning_probes": args.reasoning_probes, "data": data_settings(args),
        "pairs": args.pairs, "eval_seed": args.eval_seed, "heldout_rows": args.heldout_rows, "batch": args.batch, "lr": args.lr,
        "seed": args.seed, "smoke": args.smoke, "fixed_steps": args.steps, "mask_file": args.mask, "eval_sequences": args.eval_sequences,
        "fused_recipe": {"length": args.score_length, "pairs": args.score_pairs, "receivers": args.receivers, "ratio": "7:1"},
    }
    if args.hybrid_options:  # absent when unused, so results made before the option existed still resume
        settings["hybrid_options"] = args.hybrid_options
    if args.calibrate_gamma:  # likewise: absent = scales left at 1, the recipe of the results made before it
        settings["calibrate_gamma"] = args.calibrate_gamma
    if args.heldout_kinds:  # likewise: absent = no per-kind held-out CE
        settings["heldout_kinds"] = args.heldout_kinds
    if args.eval_data:  # likewise: absent = no evaluation-only text
        settings["eval_data"] = [{"name": path.stem, "path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16]}
                                 for path in args.eval_data]
    return settings


def failure(error: BaseException) -> dict:
    """The record of a failed arm: status, error and the end of the traceback."""
    return {"status": "failed", "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
