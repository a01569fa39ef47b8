"""``headscope.kernels.launch``: the fast launch path's cache logic against a fake JIT kernel (the compiled
launcher itself runs only on a GPU), the one-allocation workspace, and the device context skipped on the
current device.

The fake: a real ``triton.runtime.jit.JITFunction`` (its params, ``do_not_specialize`` and constexprs as Triton
parses them) whose JIT path, ``run``, is replaced by a recorder returning a fake ``CompiledKernel`` whose
launcher records its arguments; torch's CUDA device and stream getters return fixed values.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import headscope.kernels.launch as launch_mod  # noqa: E402
from headscope.kernels.launch import launch, on_device, workspace  # noqa: E402

STREAM = 1234


def _toy(x_ptr, y_ptr, n, stride, scale, flag, BLOCK: tl.constexpr, MODE: tl.constexpr):
    pass


def _constexpr_first(BLOCK: tl.constexpr, x_ptr, n):
    pass


class FakeCompiled:
    function, packed_metadata = "function", "packed_metadata"

    def __init__(self, log: list) -> None:
        self.log = log

    def run(self, *args):
        self.log.append(("fast", args))


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: STREAM, raising=False)


def fake_kernel(fn=_toy, **jit_options):
    """A JITFunction of ``fn`` whose JIT path records its calls; returns (kernel, log)."""
    kernel, log = JITFunction(fn, **jit_options), []

    def run(*args, grid, warmup, **kwargs):
        log.append(("jit", grid, args, kwargs))
        return FakeCompiled(log)

    kernel.run = run  # what ``kernel[grid](...)`` calls
    return kernel, log


def paths(log: list) -> list[str]:
    return [entry[0] for entry in log]


def test_second_launch_of_a_specialisation_goes_straight_to_the_compiled_launcher(fake_cuda):
    kernel, log = fake_kernel(do_not_specialize=["n"])
    x, y = torch.zeros(64), torch.zeros(64, dtype=torch.bfloat16)
    launch(kernel, (3,), x, y, 7, 32, 0.5, True, BLOCK=16, MODE=1, num_warps=4)
    assert log == [("jit", (3,), (x, y, 7, 32, 0.5, True), {"BLOCK": 16, "MODE": 1, "num_warps": 4})]
    x2 = torch.zeros(64)  # another aligned float32 buffer; n is not specialised, so 9 (or 16) keeps the key
    launch(kernel, (5, 2), x2, y, 9, 32, 0.25, True, BLOCK=16, MODE=1, num_warps=4)
    launch(kernel, (5, 2, 4), x2, y, 16, 48, 0.25, True, BLOCK=16, MODE=1, num_warps=4)
    assert paths(log) == ["jit", "fast", "fast"]
    header = (5, 2, 1, STREAM, "function", "packed_metadata", None, None, None)  # no launch metadata, no hooks
    assert log[1][1] == (*header, x2, y, 9, 32, 0.25, True, 16, 1)  # every param, in signature order
    assert log[2][1][:3] == (5, 2, 4) and log[2][1][9:] == (x2, y, 16, 48, 0.25, True, 16, 1)


@pytest.mark.parametrize("change", [
    "stride_not_multiple_of_16", "stride_one", "dtype", "misaligned_pointer", "constexpr", "num_warps",
    "num_stages", "int64_length", "float_for_int", "device", "debug_knob",
])
def test_a_changed_specialisation_misses_the_cache(fake_cuda, monkeypatch, change):
    kernel, log = fake_kernel(do_not_specialize=["n"])
    x, y = torch.zeros(64), torch.zeros(64)
    args, constexprs = [x, y, 7, 32, 0.5, True], {"BLOCK": 16, "MODE": 1, "num_warps": 4}
    launch(kernel, (1,), *args, **constexprs)
    launch(kernel, (1,), *args, **constexprs)
    assert paths(log) == ["jit", "fast"]
    if change == "stride_not_multiple_of_16":
        args[3] = 33
    elif change == "stride_one":  # Triton makes an int equal to 1 a constant
        args[3] = 1
    elif change == "dtype":
        args[0] = torch.zeros(64, dtype=torch.float16)
    elif change == "misaligned_pointer":
        args[0] = x[1:]  # 4 bytes past an aligned address
    elif change == "constexpr":
        constexprs["MODE"] = 2
    elif change == "num_warps":
        constexprs["num_warps"] = 8
    elif change == "num_stages":
        constexprs["num_stages"] = 3
    elif change == "int64_length":  # not specialised on its value, but on its width
        args[2] = 1 << 40
    elif change == "float_for_int":
        args[3] = 32.0
    elif change == "device":
        monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 1, raising=False)
    elif change == "debug_knob":
        monkeypatch.setattr(triton.knobs.runtime, "debug", True)
    launch(kernel, (1,), *args, **constexprs)
    launch(kernel, (1,), *args, **constexprs)  # the new specialisation is kept too
    assert paths(log) == ["jit", "fast", "jit", "fast"]


def test_specialised_ints_key_on_divisibility(fake_cuda):
    kernel, log = fake_kernel()  # n specialised: 16 and 32 share a key, 7 does not
    x = torch.zeros(8)
    for n in (16, 32, 7, 9):
        launch(kernel, (1,), x, x, n, 0, 1.0, False, BLOCK=8, MODE=0)
    assert paths(log) == ["jit", "fast", "jit", "fast"]


def test_hooks_and_unsupported_kernels_take_the_jit_path(fake_cuda, monkeypatch):
    kernel, log = fake_kernel()
    x = torch.zeros(8)
    args = (x, x, 3, 5, 1.0, False)
    launch(kernel, (1,), *args, BLOCK=8, MODE=0)
    hook = lambda metadata: None  # noqa: E731
    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        launch(kernel, (1,), *args, BLOCK=8, MODE=0)
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    launch(kernel, (1,), *args, BLOCK=8, MODE=0)
    assert paths(log) == ["jit", "jit", "fast"]
    monkeypatch.setattr(triton.knobs.runtime, "launch_exit_hook", hook)  # a plain callable, as before HookChain
    launch(kernel, (1,), *args, BLOCK=8, MODE=0)
    assert paths(log)[-1] == "jit"

    unknown, unknown_log = fake_kernel()
    launch(unknown, (1,), x, x, torch.tensor(3).numpy(), 5, 1.0, False, BLOCK=8, MODE=0)  # a numpy int: no key
    launch(unknown, (1,), x, x, torch.tensor(3).numpy(), 5, 1.0, False, BLOCK=8, MODE=0)
    assert paths(unknown_log) == ["jit", "jit"]

    odd, odd_log = fake_kernel(_constexpr_first)  # a constexpr before runtime params: not planned
    for _ in range(2):
        launch(odd, (1,), x, 3, BLOCK=8)
    assert paths(odd_log) == ["jit", "jit"]

    recorded = []

    class StandIn:  # a test's stand-in or the interpreter's InterpretedFunction: not a JITFunction
        def __getitem__(self, grid):
            return lambda *a, **k: recorded.append((grid, a, k))

    launch(StandIn(), (2,), x, 4, num_warps=2, BLOCK=8)
    assert recorded == [((2,), (x, 4), {"BLOCK": 8, "num_warps": 2})]


def test_unknown_triton_versions_take_the_jit_path(fake_cuda, monkeypatch):
    monkeypatch.setattr(triton, "__version__", "3.10.0")
    kernel, log = fake_kernel()
    x = torch.zeros(8)
    for _ in range(2):
        launch(kernel, (1,), x, x, 3, 5, 1.0, False, BLOCK=8, MODE=0)
    assert paths(log) == ["jit", "jit"]


def test_equal_keys_mean_equal_triton_specialisations():
    """The launch key refines Triton's own: arguments with one key get one specialisation from Triton's binder (run
    on the CPU for an sm_90 target), over every combination of the argument kinds below."""
    import itertools

    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = JITFunction(_toy, do_not_specialize=["n"])
    binder = create_function_from_signature(kernel.signature, kernel.params, make_backend(GPUTarget("cuda", 90, 32)))
    plan = launch_mod._Plan(kernel, 6)
    x = torch.zeros(64)
    tensors = [x, x[1:], x[4:], x.to(torch.bfloat16), x.to(torch.bfloat16)[8:]]
    ints = [1, 2, 7, 16, 48, -16, -3, (1 << 31) - 16, 1 << 31, 1 << 40, 1 << 63]
    scalars = [0.5, 1, 16, 3, True, False, None]
    spec_of = {}
    for a, n, stride, scale in itertools.product(tensors, ints, ints, scalars):
        args = (a, x, n, stride, scale, True)
        key = plan.args_key(args)
        _, specialization, _ = binder(*args, BLOCK=16, MODE=1)
        assert key is not None and spec_of.setdefault(key, specialization) == specialization, args
    assert len(spec_of) > 100  # the kinds above do reach many keys
    assert plan.args_key((x, x, torch.tensor(3).numpy(), 5, 1.0, True)) is None  # a type with no key


def test_workspace_views_are_aligned_disjoint_and_typed():
    parts = ((torch.float32, 5), (torch.bfloat16, 3), (torch.float32, 64), (torch.bfloat16, 7), (torch.float16, 1))
    views = workspace(torch.device("cpu"), *parts)
    base = views[0].untyped_storage().data_ptr()
    spans = []
    for view, (dtype, numel) in zip(views, parts):
        assert view.dtype == dtype and view.shape == (numel,) and view.is_contiguous()
        assert (view.data_ptr() - base) % launch_mod.WORKSPACE_ALIGN == 0 and view.untyped_storage().data_ptr() == base
        spans.append((view.data_ptr(), view.data_ptr() + numel * view.element_size()))
    spans.sort()
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # no overlap
    for i, view in enumerate(views):
        view.fill_(i + 1)
    assert all(bool((view == i + 1).all()) for i, view in enumerate(views))  # no write reached another view


def test_no_device_context_on_the_cpu_or_the_current_gpu(monkeypatch):
    assert on_device(torch.zeros(1)) is launch_mod._NO_CONTEXT


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled launcher needs a GPU")
@pytest.mark.parametrize("length", [100, 128, 1])  # a partial chunk; strides divisible by 16; T = 1 (an int 1)
def test_fast_launches_give_the_jits_results_on_cuda(monkeypatch, length):
    import torch.nn.functional as F

    from headscope.kernels.gdn import triton_chunk

    gen = torch.Generator(device="cuda").manual_seed(length)
    q, k = (F.normalize(torch.randn(1, length, 3, 64, device="cuda", generator=gen), dim=-1).bfloat16() for _ in range(2))
    v = torch.randn(1, length, 3, 64, device="cuda", generator=gen).bfloat16()
    a, b = torch.randn(2, 1, length, 3, device="cuda", generator=gen).bfloat16()
    gates = {"A_log": torch.rand(3, device="cuda", generator=gen).log(), "dt_bias": torch.randn(3, device="cuda", generator=gen)}

    def run():
        return triton_chunk.triton_chunk_gated_delta_rule(q, k, v, a, b, scale=0.125, output_final_state=True, **gates)

    monkeypatch.setattr(launch_mod, "_PLANS", {})
    monkeypatch.setattr(launch_mod, "FAST_LAUNCH", False)
    want_o, want_state = run()
    monkeypatch.setattr(launch_mod, "_PLANS", {})
    monkeypatch.setattr(launch_mod, "FAST_LAUNCH", True)
    run()  # through the JIT, kept
    fast = []
    for kernel, plan in launch_mod._PLANS.values():
        if plan is not None:
            compiled = next(iter(plan.compiled.values()))
            real_run = compiled.run
            monkeypatch.setattr(compiled, "_run", lambda *args, real=real_run, name=kernel.fn.__name__: (fast.append(name), real(*args))[1])
    o, state = run()
    assert sorted(fast) == ["_chunk_intra_kernel", "_chunk_scan_kernel"]
    assert torch.equal(o, want_o) and torch.equal(state, want_state)
