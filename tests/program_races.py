"""Races between the programs of one Triton launch, found under ``TRITON_INTERPRET=1``.

On a GPU the programs of one launch run concurrently and in no set order, so a launch is only correct when
no program writes memory that another program of the same launch reads or writes (atomics aside: none of
headscope's kernels use them). The interpreter runs the programs one after the other, so such a race never
shows in the numbers there: the kernel tests would pass a kernel that fails on the GPU.

:func:`race_check` records, for every launch made inside it, the bytes each program loads and stores
(the interpreter's masked loads and stores: only lanes whose mask is set) and reports, per launch, the bytes
that two programs write (write-write) and the bytes one program writes and another reads (read-write).
A program reading what it wrote itself is not a race at this level (within a program the kernels order
that with ``tl.debug_barrier``, which this check does not see).
The helpers of the kernel tests run their cases inside it (``triton_interpreter.print_report``), so every
interpreted kernel test also fails on a race.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np


class _Launch:
    """The bytes each program of one launch read and wrote."""

    def __init__(self, name: str, buffers: dict[str, tuple[int, int]]) -> None:
        self.name, self.buffers = name, buffers  # buffers: argument name -> (first byte, end byte)
        self.grid, self.program = (1, 1, 1), 0
        self.reads: list[tuple[int, np.ndarray]] = []  # (program, byte addresses)
        self.writes: list[tuple[int, np.ndarray]] = []

    def record(self, into: list, ptrs: np.ndarray, mask: np.ndarray, itemsize: int) -> None:
        starts = ptrs[np.broadcast_to(mask, ptrs.shape)].astype(np.int64).ravel()
        if starts.size:
            into.append((self.program, (starts[:, None] + np.arange(itemsize, dtype=np.int64)).ravel()))

    def _unique_pairs(self, accesses: list) -> tuple[np.ndarray, np.ndarray]:
        """(address, program) pairs without repeats, sorted by address."""
        if not accesses:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        addr = np.concatenate([a for _, a in accesses])
        prog = np.concatenate([np.full(a.size, p, np.int64) for p, a in accesses])
        addresses, slot = np.unique(addr, return_inverse=True)  # 1-D keys (slot, program): faster than unique rows
        n_programs = int(prog.max()) + 1
        keys = np.unique(slot.ravel() * n_programs + prog)
        return addresses[keys // n_programs], keys % n_programs

    def _where(self, address: int) -> str:
        for name, (first, end) in self.buffers.items():
            if first <= address < end:
                return f"{name}[byte {address - first}]"
        return f"address {address:#x}"

    def _program(self, linear: int) -> tuple[int, int, int]:
        _, ny, nz = self.grid
        return (linear // (ny * nz), linear // nz % ny, linear % nz)

    def races(self) -> list[str]:
        """One line per kind of race found in this launch (none: an empty list)."""
        w_addr, w_prog = self._unique_pairs(self.writes)
        r_addr, r_prog = self._unique_pairs(self.reads)
        found = []
        starts = np.flatnonzero(np.r_[True, w_addr[1:] != w_addr[:-1]]) if w_addr.size else np.zeros(0, np.int64)
        writers = np.diff(np.r_[starts, w_addr.size])
        shared = starts[writers > 1]
        if shared.size:
            i = shared[0]
            found.append(f"{self.name}: {shared.size} bytes written by more than one program, first "
                         f"{self._where(int(w_addr[i]))} by programs {self._program(int(w_prog[i]))} and "
                         f"{self._program(int(w_prog[i + 1]))}")
        single = starts[writers == 1]
        if single.size and r_addr.size:
            addr, prog = w_addr[single], w_prog[single]
            at = np.clip(np.searchsorted(addr, r_addr), 0, addr.size - 1)
            clash = np.flatnonzero((addr[at] == r_addr) & (prog[at] != r_prog))
            if clash.size:
                i = clash[0]
                found.append(f"{self.name}: {clash.size} bytes written by one program and read by another, first "
                             f"{self._where(int(r_addr[i]))} written by program {self._program(int(prog[at[i]]))}, "
                             f"read by {self._program(int(r_prog[i]))}")
        return found


@contextmanager
def race_check() -> Iterator[list[str]]:
    """Record every interpreted launch made inside the block; yields the list that collects the races found
    (one line each, naming the kernel, the argument and two programs), filled as each launch ends."""
    from triton.runtime import interpreter

    builder, executor = interpreter.interpreter_builder, interpreter.GridExecutor
    races: list[str] = []
    current: list[_Launch] = []
    run_grid, set_grid_dim, set_grid_idx = executor.__call__, builder.set_grid_dim, builder.set_grid_idx
    load, store = builder.create_masked_load, builder.create_masked_store

    def launch(self, *args, **kwargs):
        names = list(self.arg_names)
        values = dict(zip(names, args)) | kwargs
        buffers = {name: (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
                   for name, t in values.items() if hasattr(t, "data_ptr") and hasattr(t, "numel")}
        current.append(_Launch(getattr(self.fn, "__name__", "kernel"), buffers))
        try:
            return run_grid(self, *args, **kwargs)
        finally:
            races.extend(current.pop().races())

    def on_grid_dim(nx, ny, nz):
        if current:
            current[-1].grid = (nx, ny, nz)
        return set_grid_dim(nx, ny, nz)

    def on_grid_idx(x, y, z):
        if current:
            _, ny, nz = current[-1].grid
            current[-1].program = (x * ny + y) * nz + z
        return set_grid_idx(x, y, z)

    def on_load(ptrs, mask, other, cache_policy, is_volatile):
        if current:
            itemsize = interpreter._get_np_dtype(ptrs.get_element_ty()).itemsize
            current[-1].record(current[-1].reads, ptrs.data, mask.data, itemsize)
        return load(ptrs, mask, other, cache_policy, is_volatile)

    def on_store(ptrs, value, mask, cache_policy):
        if current:
            itemsize = interpreter._get_np_dtype(ptrs.get_element_ty()).itemsize
            current[-1].record(current[-1].writes, ptrs.data, mask.data, itemsize)
        return store(ptrs, value, mask, cache_policy)

    executor.__call__ = launch
    builder.set_grid_dim, builder.set_grid_idx = on_grid_dim, on_grid_idx
    builder.create_masked_load, builder.create_masked_store = on_load, on_store
    try:
        yield races
    finally:
        executor.__call__ = run_grid
        for name in ("set_grid_dim", "set_grid_idx", "create_masked_load", "create_masked_store"):
            delattr(builder, name)  # the instance attributes set above; the class's methods show again
