"""Host-side helpers of the Triton launchers: launch-grid arithmetic and the GPU's SM count, cheaply.

Why: at batch 1 and a few thousand tokens the hybrid layer's attention core is bound by the host (the H200 run of
``benchmarks/gdn_prefill_speed.py``: 0.57 ms to enqueue against 0.42 ms of GPU work at 4K), so every microsecond
of Python around a launch counts. Since Triton 3.5, ``triton.cdiv`` and ``triton.next_power_of_2`` are
``constexpr_function`` objects: a host call unwraps its arguments through the JIT's machinery and costs ~2 us
(against ~0.1 us for the arithmetic), and a prefill call of the hybrid core made 14 of them. The launchers on
the prefill path use these plain-integer twins instead (same results for positive ints; a test checks them
against Triton's).

``last_dim_contiguous(x)``: ``x`` as it is when its rows are contiguous (strided views pass without a copy).
``sm_count(device)``: the GPU's streaming multiprocessors, read once per device; on the CPU (the Triton
interpreter, where the tests run the kernels) the 132 of an H100/H200, so configs chosen by grid size are the
ones those GPUs get.
``workspace(device, (dtype, numel), ...)``: flat scratch tensors as views into one allocation (each
``torch.empty`` costs ~7 us of host time on the box; the chunk kernels' five scratch tensors were five), every
view starting at a multiple of ``WORKSPACE_ALIGN`` bytes from the allocation's (itself 512-byte aligned on CUDA).
``on_device(x)``: ``torch.cuda.device(x.device)`` only when x's GPU is not the current one (the context manager
costs ~5-10 us a call; the launchers entered it at every launch).

``launch(kernel, grid, *args, **constexprs)``: ``kernel[grid](*args, **constexprs)``, with a fast path on CUDA.
Triton's ``JITFunction.run`` costs ~100 us of host time per launch on the H200 box (triton 3.6, cProfile of the
hybrid core at 4K: the binder's ``native_specialize_impl`` over ~30 arguments, ``compute_cache_key`` with
``str(options)``, ``launch_metadata``, and the launcher calling the empty launch-hook chains). After the first
launch of a specialisation through the JIT (which compiles or finds the kernel and returns the
``CompiledKernel``), ``launch`` keeps that kernel under a key of everything Triton specialises on and later
launches call its launcher directly, ``compiled.run(gx, gy, gz, stream, function, packed_metadata, None, None,
None, *args_in_signature_order)``: the same binary with the same arguments. The key (:func:`_key_parts`): the
current device; ``num_warps``/``num_stages``; the constexpr values; per tensor its dtype and whether its address
is 16-byte aligned; per int whether it is 1, whether it is divisible by 16 (not for ``do_not_specialize``
params) and ``value >> 31`` (finer than its width, i32/i64/u64); per float/bool/None its type; Triton's debug and
instrumentation knobs. A key that is new (a stride becoming divisible by 16, another dtype, a misaligned view)
goes through the JIT again, which compiles or finds that specialisation, and is kept too. ``launch`` takes the
JIT path every time when: the kernel is not a ``JITFunction`` (the interpreter, ``TRITON_INTERPRET=1``, or a
test's stand-in), Triton's version is not one whose launcher convention was read (3.6 to 3.9), a launch hook is
set (``knobs.runtime.launch_enter_hook``/``launch_exit_hook``, e.g. proton), or a stages-inspection hook, the
kernel has pre-run hooks, annotated runtime params or defaults, an argument is of another type (numpy ints...),
or the constexprs passed are not exactly the params after the positional ones; and everywhere under
``HEADSCOPE_FAST_LAUNCH=0`` (read at import), to compare. Triton's check that the globals a
kernel read have not changed since it was compiled is skipped on the fast path (headscope's kernels read no module
globals: their constants come in as constexpr arguments).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

INTERPRETER_SM_COUNT = 132  # H100 SXM / H200


def cdiv(x: int, y: int) -> int:
    """``ceil(x / y)`` for positive ints (``triton.cdiv`` without its host overhead)."""
    return (x + y - 1) // y


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= ``n`` for ``n >= 1`` (``triton.next_power_of_2`` without its host overhead)."""
    return 1 << (n - 1).bit_length()


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its last dimension is contiguous (what the launchers need), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; ``INTERPRETER_SM_COUNT`` for the CPU."""
    if device.type != "cuda":
        return INTERPRETER_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


WORKSPACE_ALIGN = 16  # bytes: Triton specialises pointers on 16-byte alignment (vectorised loads)


def workspace(device: torch.device, *parts: tuple[torch.dtype, int]) -> list[torch.Tensor]:
    """Flat tensors of the given dtypes and sizes, views into one uninitialised byte buffer on ``device``, each
    at a ``WORKSPACE_ALIGN``-byte aligned offset, none overlapping."""
    offsets, end = [], 0
    for dtype, numel in parts:
        offsets.append(end)
        end += -(-numel * dtype.itemsize // WORKSPACE_ALIGN) * WORKSPACE_ALIGN
    buffer = torch.empty(end, dtype=torch.uint8, device=device)
    return [buffer[start : start + numel * dtype.itemsize].view(dtype) for start, (dtype, numel) in zip(offsets, parts)]


_NO_CONTEXT = contextlib.nullcontext()


def on_device(x: torch.Tensor):
    """A context making x's GPU the current device: ``torch.cuda.device`` only when it is not already (a no-op
    context on the CPU and on the current GPU)."""
    if not x.is_cuda or x.get_device() == torch._C._cuda_getDevice():
        return _NO_CONTEXT
    return torch.cuda.device(x.device)


FAST_LAUNCH = os.environ.get("HEADSCOPE_FAST_LAUNCH", "1") != "0"  # 0: every launch through the JIT (to compare)
KNOWN_TRITON = ((3, 6), (3, 9))  # versions whose JITFunction.run / CompiledKernel launcher convention was read


def _key_parts(i: int, arg, specialize: bool) -> list[str] | None:
    """Python expressions for what Triton's binder specialises argument ``a{i}`` of type ``type(arg)`` on (a
    superset), or None when that type has no key. Ints: whether 1 and whether divisible by 16 (specialised params
    only; Triton makes 1 a constant and marks multiples of 16) and ``a >> 31`` (0 or -1 within i32: finer than
    Triton's i32/i64/u64 width); tensors: dtype and 16-byte alignment; floats, bools, None: their type alone."""
    a, kind = f"a{i}", type(arg)
    if kind is int:
        return [f"{a} == 1", f"{a} % 16 == 0", f"{a} >> 31"] if specialize else [f"{a} >> 31"]
    if kind is float or kind is bool or arg is None:
        return []
    if isinstance(arg, torch.Tensor):
        return [f"{a}.dtype", f"{a}.data_ptr() % 16 == 0"]
    return None


def key_function(args: tuple, specialize: tuple[bool, ...]):
    """A function of arguments like ``args`` returning the flat tuple of their ``_key_parts``, or None when their
    types differ from ``args``'s (straight-line code with a type guard: ~1 us for 30 arguments, where calling a
    helper per argument cost ~4); None when a type of ``args`` has no key."""
    parts = [_key_parts(i, arg, flag) for i, (arg, flag) in enumerate(zip(args, specialize))]
    if any(part is None for part in parts):
        return None
    names = ", ".join(f"a{i}" for i in range(len(args)))
    guard = " or ".join(f"type(a{i}) is not t{i}" for i in range(len(args))) or "False"
    values = "".join(f"{expr}, " for part in parts for expr in part)
    source = f"def typed_key({names}):\n    if {guard}:\n        return None\n    return ({values})\n"
    namespace = {f"t{i}": type(arg) for i, arg in enumerate(args)}
    exec(source, namespace)  # noqa: S102 (built above from the params' flags and the arguments' types, never their values)
    return namespace["typed_key"]


class _Plan:
    """A JIT kernel's fast-launch table: which positional params it specialises, the compiled kernels launched so
    far by key, and key functions by argument types (the first launch's types are looked up once)."""

    def __init__(self, kernel, n_args: int) -> None:
        from triton import knobs

        self.knobs = knobs
        self.specialize = tuple(not p.do_not_specialize and not p.do_not_specialize_on_alignment for p in kernel.params[:n_args])
        self.compiled: dict = {}
        self._by_types: dict = {}  # argument types -> (their number, key function or None)
        self._first = None  # the entry of the first launch's types, tried before looking types up

    def args_key(self, args: tuple) -> tuple | None:
        """The arguments' part of the launch key: the number of their types and ``key_function``'s parts (None
        when a type has no key)."""
        first = self._first
        if first is not None:
            parts = first[1](*args)
            if parts is not None:
                return first[0], parts
        types = tuple(map(type, args))
        entry = self._by_types.get(types)
        if entry is None:
            entry = self._by_types[types] = (len(self._by_types), key_function(args, self.specialize))
        if entry[1] is None:
            return None
        if first is None:
            self._first = entry
        return entry[0], entry[1](*args)


_PLANS: dict[tuple, tuple[object, _Plan | None]] = {}  # (id, ...) -> (the kernel, kept alive so its id stays its own; plan)


def _triton_api_ok() -> bool:
    import triton

    version = tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())
    return KNOWN_TRITON[0] <= version <= KNOWN_TRITON[1]


def _make_plan(kernel, n_args: int, constexpr_names: tuple[str, ...]) -> _Plan | None:
    """The kernel's plan, or None when it must always take the JIT path (module docstring)."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return None
    if not FAST_LAUNCH or type(kernel) is not JITFunction or not _triton_api_ok():
        return None
    params = kernel.params
    if len(params) != n_args + len(constexpr_names) or kernel.pre_run_hooks:
        return None
    if any(p.is_constexpr or p.annotation or p.has_default for p in params[:n_args]):
        return None
    if tuple(p.name for p in params[n_args:]) != constexpr_names or not all(p.is_constexpr for p in params[n_args:]):
        return None
    return _Plan(kernel, n_args)


def _hooked(hook) -> bool:
    """Whether a Triton launch hook is set: a callable, or a ``HookChain`` (Triton >= 3.5) with calls in it."""
    return hook is not None and bool(getattr(hook, "calls", True))


def launch(kernel, grid: tuple[int, ...], *args, num_warps: int | None = None, num_stages: int | None = None, **constexprs) -> None:
    """``kernel[grid](*args, num_warps=..., num_stages=..., **constexprs)``; on CUDA, after the first launch of a
    specialisation, straight through its compiled launcher (module docstring). ``args``: the runtime params in
    signature order (tensors on the current CUDA device, see :func:`on_device`), ``constexprs``: the rest, by name."""
    plan_key = (id(kernel), len(args), *constexprs)
    entry = _PLANS.get(plan_key)
    if entry is None:
        entry = _PLANS[plan_key] = (kernel, _make_plan(kernel, len(args), tuple(constexprs)))
    plan = entry[1]
    options = {}
    if num_warps is not None:
        options["num_warps"] = num_warps
    if num_stages is not None:
        options["num_stages"] = num_stages
    get_device = getattr(torch._C, "_cuda_getDevice", None)  # None in a CPU-only build of torch
    if plan is None or get_device is None:  # (there triton_compile_check compiles through the JIT)
        kernel[grid](*args, **constexprs, **options)
        return
    runtime, compilation = plan.knobs.runtime, plan.knobs.compilation
    if _hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook) or getattr(runtime, "add_stages_inspection_hook", None) is not None:
        kernel[grid](*args, **constexprs, **options)
        return
    args_part = plan.args_key(args)
    if args_part is None:
        kernel[grid](*args, **constexprs, **options)
        return
    tail = tuple(constexprs.values())  # the plan's constexpr names in the plan's order (the plan key has them)
    device = get_device()
    key = (device, num_warps, num_stages, runtime.debug, compilation.instrumentation_mode,
           getattr(compilation, "fpsan_homomorphic_casts", None), args_part, tail)  # the JIT's knob options (the last: 3.9)
    compiled = plan.compiled.get(key)
    if compiled is None:
        compiled = kernel[grid](*args, **constexprs, **options)
        if all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata")):
            plan.compiled[key] = compiled
        return
    grid_y = grid[1] if len(grid) > 1 else 1
    grid_z = grid[2] if len(grid) > 2 else 1
    stream = torch._C._cuda_getCurrentRawStream(device)
    compiled.run(grid[0], grid_y, grid_z, stream, compiled.function, compiled.packed_metadata, None, None, None, *args, *tail)
