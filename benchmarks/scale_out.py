"""Scale-out: scoring and the transfer on 1 GPU against N GPUs of one host (torchrun, NCCL), and a killed rank resumed.

Every run is the real command, on one process (``python -m ...``), then under ``torchrun --standalone
--nproc-per-node N``:

* ``scoring``: ``-m headscope score --method activation`` (bf16 on CUDA) of a random-id probe (``--pairs`` x
  ``--length`` tokens whose corrupt version differs in a block of 16 tokens); the time is the one the
  command prints (recording the clean/corrupt runs, the patched runs, the gather; not the start-up). Reported:
  the times, the speedup, and the largest score difference between N processes and one.
* ``transfer``: ``-m headscope.transfer`` with two stages (align, distill; ``--steps`` each, ``--batch``
  sequences of ``--seq-len`` tokens per step, ``--micro`` per forward) on one process, then on N with
  ``distributed: ddp`` and ``fsdp``. The global batch of a step is the same whatever N (the data is a pure
  function of seed and step), so the loss curves should agree up to reduction order. Reported per stage:
  tokens/s after the first ``--warmup`` steps (the log's cumulative tokens over its wall clock; the
  end-of-stage evaluation and checkpoint come after the last logged step), the speedup over one process
  (goal >= 1.8x on 2 GPUs), the largest train-loss difference from the one-process curve, the held-out losses.
* ``resume``: the N-process ddp run again with a checkpoint every ``--checkpoint-every`` steps, under
  ``torchrun --max-restarts 1 ... --resume``. When the checkpoint of distill step ``--kill-step`` or a later
  one is in place, rank 0 (the process that writes checkpoints) gets SIGKILL; torchrun restarts the ranks,
  which resume. Reported: the newest complete checkpoint at the kill, the one the run resumed from (they must
  be the same: no completed step lost), that every step is logged once, and the differences from the
  uninterrupted N-process run (train losses, final weights).

The model is a random-init Qwen3 of ``--shape`` (default the body of Qwen3-0.6B: 28 layers, 16 query / 8 KV
heads of 128, hidden 1024, MLP 3072, tied 151936-token vocabulary); the data is a ``.bin`` of random token ids.
Each rank holds a whole model (``headscope.patching.sharding``; ddp; fsdp shards it).

Outputs ``--out`` (default ``$OUT`` or benchmarks/results): ``scale_out.json`` (settings, every number, the
loss curves) and ``scale_out.md``, rewritten after each phase; ``--phases`` runs some of them and keeps the
others' results from an earlier run with the same settings.

    . benchmarks/gpu_setup.sh && python benchmarks/scale_out.py --gpus 2    # 2 GPUs (not run yet; 5-8 minutes expected)
    python benchmarks/scale_out.py --smoke           # CPU: tiny model, 2 gloo processes, every phase (tests/test_scale_out.py)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

SHAPES = {
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "tiny": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=24, tie_word_embeddings=False),
}
PHASES = ("scoring", "transfer", "resume")
SETTINGS = ("shape", "gpus", "device", "pairs", "length", "steps", "batch", "micro", "seq_len", "warmup", "strategies")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2, help="N: processes (one GPU each) of the scaled runs")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b")
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of " + ", ".join(PHASES))
    parser.add_argument("--strategies", default="ddp,fsdp", help="transfer strategies run on N processes")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per transfer stage")
    parser.add_argument("--batch", type=int, default=16, help="sequences per optimizer step (all processes together)")
    parser.add_argument("--micro", type=int, default=4, help="sequences per forward on one process")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=3, help="first steps of a stage left out of tokens/s")
    parser.add_argument("--checkpoint-every", type=int, default=5, help="resume phase: steps between checkpoints")
    parser.add_argument("--kill-step", type=int, default=5, help="resume phase: kill once distill's checkpoint of this step is in")
    parser.add_argument("--timeout", type=float, default=540, help="seconds for one torchrun command")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 gloo processes on the CPU, a few steps, ddp only")
    parser.add_argument("--out", type=Path, default=None, help="default $OUT or benchmarks/results; with --smoke WORK/results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/headscope_scale_out"))
    args = parser.parse_args(argv)
    args.device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    args.phases = [p for p in args.phases.split(",") if p]
    args.strategies = [s for s in args.strategies.split(",") if s]
    if args.smoke:
        args.shape, args.gpus, args.pairs, args.length, args.strategies = "tiny", 2, 3, 12, ["ddp"]
        args.steps, args.batch, args.micro, args.seq_len, args.warmup = 8, 4, 1, 24, 1
        args.checkpoint_every, args.kill_step = 1, 2
    args.out = args.out or (args.work / "results" if args.smoke else Path(os.environ.get("OUT", Path(__file__).parent / "results")))
    if not set(args.phases) <= set(PHASES) or not set(args.strategies) <= {"ddp", "fsdp"} or "ddp" not in args.strategies:
        parser.error(f"--phases takes {', '.join(PHASES)}; --strategies takes ddp and fsdp, with ddp (the resume phase's)")
    if args.device == "cuda" and torch.cuda.device_count() < args.gpus:
        parser.error(f"--gpus {args.gpus}, but {torch.cuda.device_count()} GPU(s) are visible")
    return args


# --- inputs ---------------------------------------------------------------------------------------
def build_inputs(args) -> dict[str, Path]:
    """The random-init model (seed 0), the token file and the probe, written afresh under ``args.work/inputs``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from headscope.probes.base import Probe, PromptPair
    from headscope.probes.jsonl import save_probe_jsonl

    root = args.work / "inputs"
    paths = {"model": root / "model", "tokens": root / "tokens.bin", "probe": root / "probe.jsonl"}
    vocab = SHAPES[args.shape]["vocab_size"]
    torch.manual_seed(0)
    config = Qwen3Config(**SHAPES[args.shape], max_position_embeddings=max(4096, 2 * args.seq_len, 2 * args.length))
    Qwen3ForCausalLM(config).save_pretrained(paths["model"])
    rng = np.random.default_rng(0)
    n_tokens = 3 * args.steps * args.batch * args.seq_len  # every step of both stages, plus the held-out share
    rng.integers(2, min(vocab, 1 << 16), n_tokens, dtype=np.uint16).tofile(paths["tokens"])
    pairs = []
    for _ in range(args.pairs):
        clean = rng.integers(2, vocab, args.length)
        corrupt = clean.copy()
        block = slice(args.length // 4, min(args.length // 4 + 16, args.length - 1))
        corrupt[block] = rng.integers(2, vocab, block.stop - block.start)
        answer, wrong = rng.choice(np.arange(2, vocab), 2, replace=False)
        pairs.append(PromptPair(tuple(map(int, clean)), tuple(map(int, corrupt)), int(answer), int(wrong)))
    save_probe_jsonl(Probe("random_block", "retrieval", pairs), paths["probe"])
    return paths


def transfer_config(args, paths: dict[str, Path], **overrides) -> dict:
    block = args.seq_len * 4
    stages = [{"kind": kind, "steps": args.steps, "lr": lr, "batch_size": args.batch, "micro_batch": args.micro,
               "seq_len": args.seq_len, "warmup": 2} for kind, lr in (("align", 1e-3), ("distill", 1e-4))]
    return {"model": str(paths["model"]), "hybrid": {"baseline": "random", "ratio": "3:1" if args.smoke else "7:1"},
            "data": {"paths": [str(paths["tokens"])], "bin_doc_tokens": block, "heldout_method": "fraction",
                     "heldout_fraction": 0.1, "eval_sequences": 2 if args.smoke else 8},
            "stages": stages, "log_every": 1, "eval_every": 0, "checkpoint_every": 0, "keep_checkpoints": 2,
            "device": args.device, "progress": False, **overrides}


# --- launching --------------------------------------------------------------------------------------
def launch(args, nproc: int, command: list[str], restarts: int = 0) -> subprocess.Popen:
    """``torchrun --nproc-per-node nproc python COMMAND``, or ``python COMMAND`` for one process without restarts; from
    the work directory (so that ``-m headscope`` is the installed package), in a session of its own."""
    env = dict(os.environ, OMP_NUM_THREADS="1") if args.device == "cpu" else dict(os.environ)
    runner = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "--max-restarts", str(restarts)]
    return subprocess.Popen([sys.executable, *(runner if nproc > 1 or restarts else []), *command], cwd=args.work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(args, run: subprocess.Popen, what: str) -> str:
    """Wait for a launch; its output. A failure or a timeout raises with the output's tail."""
    try:
        output, _ = run.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        output, _ = run.communicate()
        raise RuntimeError(f"{what}: no end after {args.timeout:.0f} s\n{output[-3000:]}") from None
    if run.returncode != 0:
        raise RuntimeError(f"{what}: exit {run.returncode}\n{output[-3000:]}")
    return output


def fresh(path: Path) -> Path:
    """``path``, with the file or directory an earlier run left there removed."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    return path


def worker_pid(agent: int, rank: int) -> int:
    """The pid of the torchrun worker of ``rank`` started by the agent process ``agent`` (from /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == agent and f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    raise RuntimeError(f"no worker of rank {rank} under torchrun's pid {agent}")


# --- phases -------------------------------------------------------------------------------------------
def scoring(args, paths: dict[str, Path]) -> dict:
    from headscope.heads import HeadScores

    runs = {}
    for nproc in (1, args.gpus):
        out = fresh(args.work / f"scores_{nproc}.json")
        command = ["-m", "headscope", "score", "--model", str(paths["model"]), "--probe", str(paths["probe"]), "--pairs", str(args.pairs),
                   "--method", "activation", "--device", args.device, "--dtype", "float32" if args.smoke else "bfloat16", "--out", str(out)]
        output = finish(args, launch(args, nproc, command), f"scoring on {nproc}")
        seconds = re.search(r"; ([0-9.]+) s( on \d+ processes)? -> ", output)
        runs[nproc] = {"seconds": float(seconds.group(1)), "values": HeadScores.load(out).values}
    one, many = runs[1], runs[args.gpus]
    return {"seconds_1": one["seconds"], f"seconds_{args.gpus}": many["seconds"], "speedup": one["seconds"] / many["seconds"],
            "max_abs_diff": float((many["values"] - one["values"]).abs().max()), "score_abs_max": float(one["values"].abs().max())}


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in open(run_dir / "log.jsonl")]


def stage_numbers(records: list[dict], warmup: int) -> dict[str, dict]:
    """Per stage: tokens/s after ``warmup`` steps, the train-loss curve, the last held-out loss."""
    out = {}
    for stage in dict.fromkeys(r["stage"] for r in records):
        train = [r for r in records if r["stage"] == stage and r["event"] == "train"]
        evals = [r for r in records if r["stage"] == stage and r["event"] == "eval"]
        first, last = train[min(warmup, len(train) - 2)], train[-1]
        out[stage] = {"tokens_per_s": (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"]),
                      "loss": [r["loss"] for r in train], "heldout_loss": evals[-1]["heldout_loss"] if evals else None}
    return out


def transfer(args, paths: dict[str, Path]) -> dict:
    import yaml

    config = args.work / "transfer.yaml"
    runs = {}
    for nproc, strategy in [(1, "ddp")] + [(args.gpus, s) for s in args.strategies]:
        name = f"{nproc}_{strategy}" if nproc > 1 else "1"
        config.write_text(yaml.safe_dump(transfer_config(args, paths, distributed=strategy)))
        run_dir = fresh(args.work / f"transfer_{name}")
        finish(args, launch(args, nproc, ["-m", "headscope.transfer", "--config", str(config), "--out", str(run_dir)]), f"transfer {name}")
        runs[name] = stage_numbers(read_log(run_dir), args.warmup)
        shutil.rmtree(run_dir / "checkpoints")  # a whole model and its optimizer state each; the log and final/ stay
    out = {"runs": runs}
    for name, stages in runs.items():
        if name == "1":
            continue
        for stage, numbers in stages.items():
            base = runs["1"][stage]
            out[f"{name}_{stage}_speedup"] = numbers["tokens_per_s"] / base["tokens_per_s"]
            out[f"{name}_{stage}_max_loss_diff"] = max(abs(a - b) for a, b in zip(numbers["loss"], base["loss"]))
    return out


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for file in sorted((run_dir / "final").glob("*.safetensors")) for k, v in load_file(file).items()}


def resume(args, paths: dict[str, Path]) -> dict:
    """Kill rank 0 once distill's checkpoint of ``--kill-step`` is in; torchrun restarts the ranks with --resume."""
    import yaml

    reference = args.work / f"transfer_{args.gpus}_ddp"
    if not (reference / "result.json").is_file():
        raise RuntimeError("the resume phase compares with the transfer phase's ddp run: run --phases transfer,resume")
    config = args.work / "resume.yaml"
    config.write_text(yaml.safe_dump(transfer_config(args, paths, checkpoint_every=args.checkpoint_every)))
    run_dir = fresh(args.work / "killed")
    run = launch(args, args.gpus, ["-m", "headscope.transfer", "--config", str(config), "--out", str(run_dir), "--resume"], restarts=1)
    pointer, complete_at_kill = run_dir / "checkpoints" / "latest.json", None
    while run.poll() is None and complete_at_kill is None:
        tag = json.loads(pointer.read_text())["tag"] if pointer.is_file() else ""  # s<stage>-<name>-<step>
        if tag and (int(tag[1:3]), int(tag.rsplit("-", 1)[1])) >= (1, args.kill_step):
            os.kill(worker_pid(run.pid, rank=0), signal.SIGKILL)  # only rank 0 writes checkpoints: none completes after this
            complete_at_kill = json.loads(pointer.read_text())["tag"]
        time.sleep(0.005)
    finish(args, run, "killed transfer")
    if complete_at_kill is None:
        raise RuntimeError(f"the run ended before distill's checkpoint of step {args.kill_step}: raise --steps")
    records, uninterrupted = read_log(run_dir), read_log(reference)
    steps = [(r["stage"], r["step"]) for r in records if r["event"] == "train"]
    expected_steps = [(stage, step) for stage in ("align", "distill") for step in range(1, args.steps + 1)]
    expected, final = final_weights(reference), final_weights(run_dir)
    resumed_from = Path(json.loads((run_dir / "result.json").read_text())["resumed_from"]).name
    return {"complete_at_kill": complete_at_kill, "resumed_from": resumed_from,
            "every_step_once": steps == expected_steps,
            "max_loss_diff": max(abs(a["loss"] - b["loss"]) for a, b in zip(
                [r for r in records if r["event"] == "train"], [r for r in uninterrupted if r["event"] == "train"])),
            "weights_identical": all(torch.equal(final[k], v) for k, v in expected.items()),
            "max_weight_rel_diff": max(float((final[k].float() - v.float()).norm() / v.float().norm().clamp_min(1e-12))
                                       for k, v in expected.items()),
            "ok": resumed_from == complete_at_kill and steps == expected_steps}


# --- report ----------------------------------------------------------------------------------------------
def device_name(args) -> str:
    return f"{args.gpus} x {torch.cuda.get_device_name(0)}" if args.device == "cuda" else f"CPU, {args.gpus} gloo processes"


def markdown(results: dict) -> str:
    s, n = results["settings"], results["settings"]["gpus"]
    lines = [f"# Scale-out: 1 against {n} processes ({results['device']}, torch {results['torch']})", "",
             f"Random-init Qwen3 `{s['shape']}`; scoring {s['pairs']} pairs x {s['length']} tokens (activation, every head); "
             f"transfer {s['steps']} steps per stage of {s['batch']} x {s['seq_len']} tokens, {s['micro']} per forward.", ""]
    if "scoring" in results:
        r = results["scoring"]
        lines += ["## Scoring (`torchrun -m headscope score`)", "", "| 1 process s | N processes s | speedup | max abs score diff (max abs score) |",
                  "|---|---|---|---|", f"| {r['seconds_1']:.2f} | {r[f'seconds_{n}']:.2f} | {r['speedup']:.2f}x | "
                  f"{r['max_abs_diff']:.2e} ({r['score_abs_max']:.3f}) |", ""]
    if "transfer" in results:
        runs = results["transfer"]["runs"]
        lines += ["## Transfer (`torchrun -m headscope.transfer`), tokens/s (goal: >= 1.8x on 2 GPUs)", "",
                  "| run | stage | tokens/s | speedup | max train-loss diff from 1 process | held-out loss |", "|---|---|---|---|---|---|"]
        for name, stages in runs.items():
            for stage, numbers in stages.items():
                speedup = results["transfer"].get(f"{name}_{stage}_speedup")
                diff = results["transfer"].get(f"{name}_{stage}_max_loss_diff")
                heldout = numbers["heldout_loss"]
                lines.append(f"| {name} | {stage} | {numbers['tokens_per_s']:.0f} | {f'{speedup:.2f}x' if speedup else '-'} | "
                             f"{f'{diff:.2e}' if diff is not None else '-'} | {f'{heldout:.4f}' if heldout is not None else '-'} |")
        lines.append("")
    if "resume" in results:
        r = results["resume"]
        lines += [f"## Rank 0 killed (SIGKILL) mid-run, torchrun --max-restarts 1 with --resume ({n} processes, ddp)", "",
                  "| newest complete checkpoint at the kill | resumed from | every step logged once | max train-loss diff | "
                  "final weights identical (max rel diff) | no completed step lost |", "|---|---|---|---|---|---|",
                  f"| {r['complete_at_kill']} | {r['resumed_from']} | {r['every_step_once']} | {r['max_loss_diff']:.2e} | "
                  f"{r['weights_identical']} ({r['max_weight_rel_diff']:.1e}) | {r['ok']} |", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from headscope.heads import write_json_atomic, write_text_atomic

    args.work.mkdir(parents=True, exist_ok=True)
    settings = {key: getattr(args, key) for key in SETTINGS}
    path = args.out / "scale_out.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    if results.get("settings") != settings:
        results = {"settings": settings}
    results.update(device=device_name(args), torch=torch.__version__)
    paths = build_inputs(args)
    for phase in (p for p in PHASES if p in args.phases):
        started = time.perf_counter()
        results[phase] = {"scoring": scoring, "transfer": transfer, "resume": resume}[phase](args, paths)
        print(f"{phase}: {time.perf_counter() - started:.0f} s", flush=True)
        write_json_atomic(path, results)
        write_text_atomic(args.out / "scale_out.md", markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
