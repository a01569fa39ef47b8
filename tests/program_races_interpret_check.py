"""Helper run by tests/test_program_races.py in a subprocess with TRITON_INTERPRET=1.

Small kernels with and without planted races between their programs, each launched inside
``program_races.race_check``; prints one JSON line whose cases are ``{name, races}``: the lines the check
reported for that kernel's launch, so the test can say which kinds it found and that it named the argument.
"""

from __future__ import annotations

import json

import torch

from triton_interpreter import interpreter_usable


def run_cases() -> list[dict]:
    import triton
    import triton.language as tl

    from program_races import race_check

    @triton.jit
    def own_slots(a_ptr, b_ptr, BLOCK: tl.constexpr):  # program i: a[i] -> b[i], then reads back its own b[i]
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(b_ptr + i, tl.load(a_ptr + i) * 2.0)
        tl.store(b_ptr + i, tl.load(b_ptr + i) + 1.0)

    @triton.jit
    def neighbour_read(a_ptr, b_ptr, BLOCK: tl.constexpr):  # reads the slot the next program writes
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(b_ptr + i, tl.load(a_ptr + i))
        tl.store(a_ptr + i, tl.load(b_ptr + i + BLOCK, mask=i + BLOCK < 4 * BLOCK, other=0.0))

    @triton.jit
    def same_slot(a_ptr, b_ptr, BLOCK: tl.constexpr):  # every program writes b[0:BLOCK]
        i = tl.arange(0, BLOCK)
        tl.store(b_ptr + i, tl.load(a_ptr + tl.program_id(0) * BLOCK + i))

    @triton.jit
    def masked_overlap(a_ptr, b_ptr, BLOCK: tl.constexpr):  # a masked-off store into the neighbour's slot
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(b_ptr + i, tl.load(a_ptr + i))
        tl.store(b_ptr + i + BLOCK, tl.load(a_ptr + i), mask=i < 0)

    @triton.jit
    def one_byte(a_ptr, b_ptr, BLOCK: tl.constexpr):  # bf16 stores one element into a float32 slot of the next program
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(b_ptr + i, tl.load(a_ptr + i))
        tl.store(b_ptr.to(tl.pointer_type(tl.bfloat16)) + 2 * (tl.program_id(0) + 1) * BLOCK, 1.0, mask=tl.program_id(0) < 3)

    cases = []
    for kernel in (own_slots, neighbour_read, same_slot, masked_overlap, one_byte):
        a, b = torch.arange(32, dtype=torch.float32), torch.zeros(32)
        with race_check() as races:
            kernel[(4,)](a, b, BLOCK=8)
        cases.append({"name": kernel.fn.__name__, "races": races})
    return cases


if __name__ == "__main__":
    reason = interpreter_usable()
    print(json.dumps({"status": "interpreter_unusable", "reason": reason} if reason else {"status": "ok", "cases": run_cases()}))
