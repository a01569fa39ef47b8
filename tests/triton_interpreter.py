"""Running the Triton kernels on CPU under ``TRITON_INTERPRET=1``, shared by the kernel tests.

``TRITON_INTERPRET`` must be set before triton is imported, so each kernel has a helper script
(``tests/<kernel>_interpret_check.py``) that its test runs in a subprocess:

* the helper's ``main`` calls :func:`print_report` with a function that runs its cases; it prints one
  JSON line, ``{"status": "ok", "cases": [...], "races": [...]}``, or ``{"status": "interpreter_unusable",
  "reason": ...}`` when even a trivial kernel cannot run under the interpreter here (:func:`interpreter_usable`);
  the cases run inside ``program_races.race_check``, so ``races`` lists every launch in which two programs touch
  the same bytes with one of them writing (a race on the GPU that the interpreter's one-by-one order hides);
* the test calls :func:`interpreted_cases`, which runs the helper and returns its cases, skips the test
  when triton is missing or the interpreter unusable, and fails it when the helper exits non-zero or reports
  a race (a failure of the kernel itself is never caught).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable

import torch


def interpreter_usable() -> str | None:
    """None when a trivial kernel runs under the interpreter, else the reason it cannot."""
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def add_one(x_ptr, n, BLOCK: tl.constexpr):
            offsets = tl.arange(0, BLOCK)
            tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n) + 1.0, mask=offsets < n)

        x = torch.zeros(5)
        add_one[(1,)](x, 5, BLOCK=8)
        if not torch.equal(x, torch.ones(5)):
            return f"a trivial kernel gave {x.tolist()} under TRITON_INTERPRET=1"
        return None
    except Exception:  # noqa: BLE001 - any failure means the interpreter cannot be used here
        return "trivial Triton kernel failed under TRITON_INTERPRET=1: " + traceback.format_exc(limit=3)[-800:]


def loops_over_runtime_bounds() -> str | None:
    """None when the interpreter runs a ``range`` over a bound known only at run time (an int argument, or a
    value loaded from memory: fa_decode's split loop, the chunk scan's chunk count), else why not. Triton 3.6's
    interpreter takes ``int()`` of the bound's 1-element array, which NumPy 2.4 refuses; 3.9's takes its item.
    Compiled kernels are not affected."""
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def count(n_ptr, m, out_ptr):
            total = 0
            for _ in range(0, tl.load(n_ptr), 2):
                total += 1
            for _ in range(m):
                total += 10
            tl.store(out_ptr, total)

        out = torch.zeros(1, dtype=torch.int32)
        count[(1,)](torch.tensor([5], dtype=torch.int32), 2, out)
        return None if out.item() == 23 else f"loops over run-time bounds counted {out.item()} (23 expected)"
    except Exception:  # noqa: BLE001 - any failure means this interpreter cannot run such loops
        return "a loop over run-time bounds failed under TRITON_INTERPRET=1: " + traceback.format_exc().strip().splitlines()[-1]


def print_report(run_cases: Callable[[], list[dict]], needs: Callable[[], str | None] | None = None) -> None:
    """The helper's main: print the JSON line of ``run_cases()`` and the races between programs of one launch
    that they made (``program_races``), or why the interpreter cannot run them (:func:`interpreter_usable`, and
    ``needs()``: a probe of what these kernels need beyond a trivial one)."""
    from program_races import race_check

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1")
    reason = interpreter_usable() or (needs() if needs is not None else None)
    if reason is not None:
        print(json.dumps({"status": "interpreter_unusable", "reason": reason}))
        return
    with race_check() as races:
        cases = run_cases()
    print(json.dumps({"status": "ok", "cases": cases, "races": sorted(set(races))}))


def cases_in_dtypes(cases: list[tuple], run_case: Callable[..., dict]) -> list[dict]:
    """``run_case(*args, dtype, seed)`` for every ``(name, *args)`` of ``cases`` (seed = its index) in float32 and
    bfloat16, each result as ``{name, dtype, **result}``: the ``run_cases`` of a helper."""
    return [
        {"name": name, "dtype": str(dtype).removeprefix("torch."), **run_case(*args, dtype, seed)}
        for seed, (name, *args) in enumerate(cases)
        for dtype in (torch.float32, torch.bfloat16)
    ]


def interpreted_report(helper: Path, timeout: int = 600) -> dict:
    """Run a helper script under ``TRITON_INTERPRET=1`` and return its JSON report (a pytest skip when it
    cannot run: triton missing, or the interpreter unusable here).

    Args:
        helper: the ``*_interpret_check.py`` script.
        timeout: seconds before the subprocess is killed (the interpreter is slow).
    """
    import pytest

    pytest.importorskip("triton", reason="triton not installed: the Triton kernels cannot be exercised on CPU")
    result = subprocess.run(
        [sys.executable, str(helper)], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if report["status"] == "interpreter_unusable":
        pytest.skip(f"Triton interpreter cannot run on this CPU: {report['reason']}")
    assert report["status"] == "ok", report
    return report


def interpreted_cases(helper: Path, timeout: int = 600) -> list[dict]:
    """The ``cases`` of a :func:`print_report` helper's report (:func:`interpreted_report`), after checking that
    none of its launches had two programs racing on the same bytes."""
    report = interpreted_report(helper, timeout)
    assert not report["races"], "programs of one launch race (tests/program_races.py):\n" + "\n".join(report["races"])
    return report["cases"]
