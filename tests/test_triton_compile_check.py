"""benchmarks/triton_compile_check.py on the CPU: a kernel test helper's kernels compile to sm_90 cubins with the
installed Triton (nothing launched), and a kernel Triton cannot compile is reported with its error."""

from __future__ import annotations

import pytest

from conftest import load_benchmark

pytest.importorskip("triton")

FINE_HELPER = '''
import torch
import triton
import triton.language as tl

from triton_interpreter import print_report


@triton.jit
def _fine_kernel(x_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets) + 1.0)
'''  # the start of a helper: imports and a kernel that compiles

BROKEN_HELPER = FINE_HELPER + '''

@triton.jit
def _broken_kernel(x_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.no_such_op(tl.load(x_ptr + offsets)))


def run_cases():
    x = torch.zeros(16)
    _fine_kernel[(1,)](x, BLOCK=16)
    _broken_kernel[(1,)](x, BLOCK=16)
    return []


if __name__ == "__main__":
    print_report(run_cases)
'''

GREEDY_HELPER = '''
import torch
import triton
import triton.language as tl

from triton_interpreter import print_report


@triton.jit
def _greedy_kernel(a_ptr, b_ptr, c_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tile = offs[:, None] * BLOCK + offs[None, :]
    acc = tl.zeros((BLOCK, BLOCK), tl.float32)
    for i in range(n):
        acc += tl.dot(tl.load(a_ptr + i * BLOCK * BLOCK + tile), tl.load(b_ptr + i * BLOCK * BLOCK + tile))
    tl.store(c_ptr + tile, acc)


def run_cases():
    a = torch.zeros(4, 128, 128, dtype=torch.bfloat16)
    _greedy_kernel[(1,)](a, a, torch.zeros(128, 128), 4, BLOCK=128, num_warps=8, num_stages=8)  # 7 stages x 64 KB of tiles
    return []


if __name__ == "__main__":
    print_report(run_cases)
'''


SPILLING_HELPER = FINE_HELPER + '''

@triton.jit
def _spilling_kernel(x_ptr, n, BLOCK: tl.constexpr):  # a 128 x 128 float32 accumulator across a loop: 512 values a thread
    tile = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    acc = tl.zeros((BLOCK, BLOCK), tl.float32)
    for i in range(n):
        acc = acc * 0.5 + tl.load(x_ptr + i * BLOCK * BLOCK + tile)
    tl.store(x_ptr + tile, acc)


def run_cases():
    x = torch.zeros(128 * 128)
    _fine_kernel[(1,)](x, BLOCK=16)
    _spilling_kernel[(1,)](x, 1, BLOCK=128, num_warps=1)
    return []


if __name__ == "__main__":
    print_report(run_cases)
'''


@pytest.fixture(scope="module")
def benchmark():
    return load_benchmark("triton_compile_check")


def test_decode_attention_kernels_compile_for_sm90(benchmark, capsys):
    assert benchmark.main(["--helpers", "fa_decode"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[0]
    assert line.startswith("fa_decode: ok") and "sm_90" in line
    assert "_split_kernel x18" in line and "_combine_kernel x18" in line  # 9 cases x 2 dtypes, each compiled


def test_a_kernel_triton_cannot_compile_is_reported(benchmark, tmp_path):
    helper = tmp_path / "broken_interpret_check.py"
    helper.write_text(BROKEN_HELPER)
    report = benchmark.check(helper, arch=90)
    assert report["compiled"] == {"_fine_kernel": 1} and report["stopped"] is None
    assert list(report["failed"]) == ["_broken_kernel"] and "no_such_op" in report["failed"]["_broken_kernel"]


def test_unknown_helper_is_one_clear_error(benchmark, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--helpers", "fa_decode,nope"])
    assert exit_info.value.code == 2 and "nope" in capsys.readouterr().err


def test_a_kernel_asking_for_more_shared_memory_than_the_sm_has_fails(benchmark, tmp_path):
    """It compiles, but could never launch: software pipelining keeps whole tiles per stage in shared memory."""
    helper = tmp_path / "greedy_interpret_check.py"
    helper.write_text(GREEDY_HELPER)
    report = benchmark.check(helper, arch=90)
    assert report["compiled"] == {} and "shared memory, sm_90 has 232448" in report["failed"]["_greedy_kernel"]


def test_registers_and_spills_are_reported(benchmark, tmp_path, capsys):
    """ptxas's spill slots (in the stack frame) are local memory: reported, not a failure (the kernel runs, slowly)."""
    helper = tmp_path / "spill_interpret_check.py"
    helper.write_text(SPILLING_HELPER)
    report = benchmark.check(helper, arch=90)
    assert not report["failed"] and report["local"]["_fine_kernel"] == 0 and 0 < report["registers"]["_fine_kernel"] < 32
    assert report["registers"]["_spilling_kernel"] == 255 and report["local"]["_spilling_kernel"] > 0
