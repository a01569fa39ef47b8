"""Compile headscope's Triton kernels for a GPU (default sm_90, the H200) on a CPU-only machine, launching nothing.

The kernel tests run each kernel under ``TRITON_INTERPRET=1``, which checks what a kernel computes but not
that Triton's compiler accepts it: a construct the installed Triton cannot lower (an op or keyword an older
Triton lacks, a layout ptxas rejects) only shows on the GPU. This script drives each kernel's test helper
(``tests/<kernel>_interpret_check.py``, every case, both dtypes) with the interpreter off and a stand-in
active driver that reports a CUDA target: every ``JITFunction.run`` then compiles its kernel down to a cubin
(Triton's own ptxas) with ``warmup=True``, and nothing runs (the helpers' outputs are garbage and ignored).
Constexprs that only exist for the interpreter (``UPCAST``) take their CUDA value. One line per helper:
the kernels compiled (how many specialisations, the most shared memory one asks for), or the first compile
error of each failing kernel. A specialisation that asks for more shared memory than an SM of the target
has (software pipelining buffers whole tiles per stage) compiles but could never launch: it fails the check.
Each kernel's line also gives the most registers per thread and the most local memory per thread (stack frame +
local arrays) of its specialisations (``cuobjdump --dump-resource-usage`` of the cubin, Triton's bundled copy):
registers bound how many programs share an SM, and local memory there means spilled registers (ptxas puts its
spill slots in the stack frame), a slow kernel seen before any GPU run.

Run it where the GPU's Triton is installed (on a box without internet: in a copy of its venv, or on the
box itself before a benchmark) to learn that the kernels build there before spending GPU time::

    python benchmarks/triton_compile_check.py                  # all helpers, sm_90
    python benchmarks/triton_compile_check.py --helpers fa_decode --arch 100

``fla_dqkwg`` is not driven: fla reads the device name at import, which needs a real GPU. Exit status 1
when a kernel failed to compile or a helper compiled nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELPERS = ("epilogue", "rope_norm", "gdn_prep", "gdn_decode", "fa_decode", "hybrid_decode", "fa_prefill", "gdn_chunk", "qk_norm", "rms_norm", "swiglu")
CPU_ONLY_CONSTEXPRS = {"UPCAST": False}  # interpreter-only switches -> their value on CUDA
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}  # per block, opt-in maximum


def compile_helper(helper: Path, arch: int) -> dict:
    """In this process: run ``helper``'s cases with every kernel launch replaced by a compile for ``arch``.

    Returns ``{"compiled": {kernel: specialisations}, "shared": {kernel: most bytes}, "failed": {kernel: first
    error}, "stopped": error or None}``.
    """
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class CompileOnlyDriver:
        """What ``JITFunction.run`` asks of the active driver before it compiles."""

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_interface(self):
            return torch.cuda

        def is_active(self):
            return True

    driver.set_active(CompileOnlyDriver())
    compiled: dict[str, int] = {}
    shared: dict[str, int] = {}
    registers: dict[str, int] = {}
    local: dict[str, int] = {}
    spills: dict[str, list[str]] = {}
    failed: dict[str, str] = {}
    launch = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kwargs.update({k: v for k, v in CPU_ONLY_CONSTEXPRS.items() if k in kwargs})
        name = self.fn.__name__
        try:
            kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
            kernel = kernel.result() if hasattr(kernel, "result") else kernel
            if "cubin" not in kernel.asm:
                raise RuntimeError(f"no cubin for {kernel.metadata.target}")
            limit = MAX_SHARED_BYTES.get(arch)
            if limit is not None and kernel.metadata.shared > limit:
                raise RuntimeError(f"needs {kernel.metadata.shared} bytes of shared memory, sm_{arch} has {limit} "
                                   f"({specialisation(args, kwargs)})")
            compiled[name] = compiled.get(name, 0) + 1
            shared[name] = max(shared.get(name, 0), kernel.metadata.shared)
            usage = resource_usage(kernel.asm["cubin"])
            registers[name] = max(registers.get(name, 0), usage["REG"])
            local[name] = max(local.get(name, 0), usage["STACK"] + usage["LOCAL"])
            if usage["STACK"] + usage["LOCAL"]:
                spills.setdefault(name, []).append(f"{usage['STACK'] + usage['LOCAL']} B: {specialisation(args, kwargs)}")
        except Exception as err:  # noqa: BLE001 -- recorded: one kernel's failure must not hide the others'
            failed.setdefault(name, f"{type(err).__name__}: {err}"[:2000])

    JITFunction.run = compile_only
    sys.path[:0] = [str(helper.parent), str(ROOT / "tests")]  # the helpers import tests/triton_interpreter.py
    import triton_interpreter

    triton_interpreter.print_report = lambda run_cases, needs=None: run_cases()  # all cases (no interpreter probes: nothing runs), no report of their (garbage) outputs
    stopped = None
    try:
        runpy.run_path(str(helper), run_name="__main__")
    except Exception as err:  # noqa: BLE001 -- e.g. a library that needs a real device at import
        stopped = f"{type(err).__name__}: {str(err)[:300]}"
    return {"triton": triton.__version__, "compiled": compiled, "shared": shared, "registers": registers, "local": local,
            "spills": spills, "failed": failed, "stopped": stopped}


def specialisation(args: tuple, kwargs: dict) -> str:
    """What tells one specialisation of a kernel from another in a report: its constexprs and launch options
    (upper-case keywords, ``num_*``) and the dtypes of its tensor arguments."""
    config = {k: v for k, v in kwargs.items() if k.isupper() or k.startswith("num_")}
    dtypes = sorted({str(a.dtype).removeprefix("torch.") for a in args if hasattr(a, "dtype") and a.dtype.is_floating_point})
    return f"{config}, {'/'.join(dtypes)}"


def resource_usage(cubin: bytes) -> dict[str, int]:
    """``REG`` (registers per thread), ``STACK`` (bytes of stack frame per thread: where ptxas spills), ``LOCAL``
    (local arrays) and ``SHARED`` of the one kernel in ``cubin``, read by Triton's bundled ``cuobjdump``."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", file.name], capture_output=True,
                              text=True, check=True).stdout
    line = next(line for line in text.splitlines() if "REG:" in line)  # the Function line's resources
    return {key: int(value) for key, value in re.findall(r"\b(REG|LOCAL|SHARED|STACK):(\d+)", line)}


def check(helper: Path, arch: int, timeout: float = 900) -> dict:
    """``compile_helper`` in a fresh interpreter (it replaces Triton's active driver for the whole process)."""
    done = subprocess.run([sys.executable, __file__, "--one", str(helper), "--arch", str(arch)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"compiled": {}, "shared": {}, "registers": {}, "local": {}, "spills": {}, "failed": {},
                "stopped": f"exit {done.returncode}: {done.stderr[-1500:]}"}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--helpers", type=lambda s: s.split(","), default=list(HELPERS), help=f"comma list of {', '.join(HELPERS)}")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: H100/H200)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: the child process of check()
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(compile_helper(Path(args.one), args.arch)), flush=True)
        return 0
    unknown = [h for h in args.helpers if not (ROOT / "tests" / f"{h}_interpret_check.py").is_file()]
    if unknown:
        parser.error(f"no helper tests/<name>_interpret_check.py for {unknown}")
    bad = 0
    for name in args.helpers:
        report = check(ROOT / "tests" / f"{name}_interpret_check.py", args.arch)
        ok = report["compiled"] and not report["failed"] and not report["stopped"]
        bad += not ok
        kernels = ", ".join(
            f"{k} x{n} ({report['shared'][k] // 1024} KB shared, {report['registers'][k]} registers"
            + (f", {report['local'][k]} B local: SPILLS" if report["local"][k] else "") + ")"
            for k, n in report["compiled"].items()
        ) or "nothing"
        print(f"{name}: {'ok' if ok else 'FAILED'} (triton {report.get('triton', '?')}, sm_{args.arch}): compiled {kernels}", flush=True)
        for kernel, where in report["spills"].items():
            print(f"  {kernel} spills in {len(where)} of {report['compiled'][kernel]} specialisations, e.g. {where[0]}", flush=True)
        for kernel, error in report["failed"].items():
            print(f"  {kernel}: {error}", flush=True)
        if report["stopped"]:
            print(f"  helper stopped: {report['stopped']}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
