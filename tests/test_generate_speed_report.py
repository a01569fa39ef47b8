"""benchmarks/generate_speed_report.py: the teacher-forced reference check passes a correct fast path and
fails a broken one (GDN states lost in the static cache; the original's all-FA twin writing its decode keys
one slot early, checked against the original itself), leaves banned tokens out, and runs the float32
reference on copies of the weights that leave the model's own tensors untouched."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import OFF_BY_ONE, load_benchmark, plant_off_by_one, save_model, tiny_qwen3
from headscope.hybrid.static_cache import HybridStaticCache
from headscope.kernels.switch import triton_off

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def benchmark():
    return load_benchmark("generate_speed")


@pytest.fixture(scope="module")
def bench(benchmark):
    return benchmark.Bench("qwen3-1.7b", SimpleNamespace(smoke=True, model=None, mask=None), torch.device("cpu"), torch.float32)


def check(benchmark, bench, variant: str, ids: torch.Tensor, n: int = 5) -> dict:
    result, first = benchmark.timed_generate(bench, variant, ids, n, keep_rows=2)
    bench.release()
    tokens = torch.tensor(result["new_tokens"])[:2]
    return benchmark.reference_gaps(bench.reference_of(variant), ids[:2], tokens, first, gap_tol=1e-4)


def test_a_correct_static_path_is_consistent_and_a_broken_one_is_not(benchmark, bench, monkeypatch):
    ids = bench.prompt_ids(3, 24)
    good = check(benchmark, bench, "hybrid_graph", ids)
    assert good["consistent"] == 2 * 5 and good["max_gap"] < 1e-4 and good["first_step_max_abs_diff"] < 1e-4
    assert good["reference_dtype"] == "float32" and good["first_inconsistent"] is None
    decode = HybridStaticCache.decode

    def forgetful(self, model, input_ids, attention_mask, position_ids):  # the GDN states lost before every step
        for state in self.recurrent_states:
            if state is not None:
                state.zero_()
        return decode(self, model, input_ids, attention_mask, position_ids)

    monkeypatch.setattr(HybridStaticCache, "decode", forgetful)
    bad = check(benchmark, bench, "hybrid_graph", ids)
    assert bad["consistent"] < 2 * 5 and bad["first_inconsistent"] >= 1 and bad["max_gap"] > 1e-2
    assert bad["first_step_max_abs_diff"] < 1e-4  # the prefill is still right


@pytest.mark.parametrize("bug", OFF_BY_ONE)
def test_the_original_on_the_hybrid_path_is_checked_against_the_original(benchmark, tmp_path, monkeypatch, bug):
    """original_graph's tokens go through the original's own float32 forward: consistent as built, inconsistent once
    its static decode writes each key one slot early (the last prompt token's key lost) or runs one position ahead.
    (An untied model: the smoke Qwen3's tied embeddings make a random model repeat its last token whatever the positions.)"""
    directory = save_model(tiny_qwen3(seed=2), tmp_path / "qwen3")
    bench = benchmark.Bench("smollm2", SimpleNamespace(smoke=True, model=directory, mask=None), torch.device("cpu"), torch.float32)
    assert bench.reference_of("original_graph") is bench.original and bench.model_of("original_graph") is bench.same_kernels
    ids = bench.prompt_ids(3, 24)
    good = check(benchmark, bench, "original_graph", ids, n=6)
    assert good["consistent"] == 2 * 6 and good["max_gap"] < 1e-4 and good["first_step_max_abs_diff"] < 1e-4
    plant_off_by_one(monkeypatch, bug)
    bad = check(benchmark, bench, "original_graph", ids, n=6)
    assert bad["consistent"] < 2 * 6 and bad["first_inconsistent"] >= 1 and bad["first_step_max_abs_diff"] < 1e-4


def plant_faulty_qk_norm(monkeypatch) -> None:
    """The one-launch q/k norm path taken as on CUDA, with a planted bug: queries 4x too sharp."""
    pytest.importorskip("triton")
    import headscope.kernels.qk_norm.ops as qk_ops
    import headscope.kernels.qk_norm.triton_qk_norm as triton_qk_norm
    from headscope.kernels.qk_norm.naive import head_rms_norm_reference

    def faulty(q, k, q_weight, k_weight, eps):
        return 4 * head_rms_norm_reference(q, q_weight, eps), head_rms_norm_reference(k, k_weight, eps)

    monkeypatch.setattr(qk_ops, "use_triton", lambda *tensors: qk_ops.FUSED and not triton_off())
    monkeypatch.setattr(triton_qk_norm, "triton_qk_rms_norm", faulty)


def plant_faulty_gdn_prefill(monkeypatch) -> None:
    """The fused GDN prefill path taken as on CUDA, with a planted bug: the query scale 4x too large."""
    import headscope.kernels.gdn.ops as gdn_ops

    def faulty(q, k, v, a, b, *, scale, A_log, dt_bias, input_mask, initial_state, output_final_state, final_state):
        g, beta = gdn_ops.gdn_gates(a, b, A_log, dt_bias, input_mask)
        o, state = gdn_ops._unfused(q, k, v, g, beta, 4 * scale, initial_state, output_final_state, False)
        return o, (final_state.copy_(state) if final_state is not None and state is not None else state)

    monkeypatch.setattr(gdn_ops, "use_fused", lambda q, v, needs_grad: q.shape[1] > 1 and not triton_off())
    monkeypatch.setattr(gdn_ops, "_fused", faulty)


@pytest.mark.parametrize("plant", [plant_faulty_qk_norm, plant_faulty_gdn_prefill], ids=["qk_norm", "gdn_prefill"])
def test_the_reference_shares_no_faulty_kernel(benchmark, bench, monkeypatch, plant):
    """On CUDA the hybrid's ops run Triton and fla kernels, several of them also in float32: the reference takes
    every op's torch path (``torch_paths``), so a kernel's fault shows in the first step's logits."""
    clean = check(benchmark, bench, "hybrid_eager", bench.prompt_ids(2, 24))
    plant(monkeypatch)
    got = check(benchmark, bench, "hybrid_eager", bench.prompt_ids(2, 24))
    assert clean["first_step_max_abs_diff"] < 1e-4 and got["first_step_max_abs_diff"] > 1e-3
    assert got["reference_kernels"] == "torch" and not triton_off()


def test_tokens_a_processor_banned_are_left_out():
    model = tiny_qwen3(seed=1).float()
    from_benchmark = load_benchmark("generate_speed_report")
    prompt = torch.randint(2, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(prompt).logits[:, -1].float()  # (1, V)
    best, second = logits[0].topk(2).indices.tolist()
    scores = logits.clone()
    scores[0, best] = float("-inf")  # as min_new_tokens bans eos: the candidate had to take the second best
    got = from_benchmark.reference_gaps(model, prompt, torch.tensor([[second]]), scores, gap_tol=1e-4)
    assert got["max_gap"] < 1e-4 and got["consistent"] == 1 and got["first_step_max_abs_diff"] < 1e-4
    worst = int(logits[0].argmin())
    got = from_benchmark.reference_gaps(model, prompt, torch.tensor([[worst]]), logits, gap_tol=1e-4)
    assert got["consistent"] == 0 and got["max_gap"] == pytest.approx(float(logits[0].max() - logits[0, worst]), rel=1e-4)


def test_the_float32_reference_leaves_the_models_tensors_as_they_were():
    report = load_benchmark("generate_speed_report")
    model = tiny_qwen3(seed=2).to(torch.bfloat16)
    before = {name: (t.data_ptr(), t.dtype, t.clone()) for name, t in model.state_dict(keep_vars=True).items()}
    prompt = torch.randint(2, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    with report.weights_in(model, torch.float32):
        assert all(p.dtype == torch.float32 for p in model.parameters())
        with torch.no_grad():
            exact = model(prompt).logits[:, -1].float()
    with torch.no_grad():
        rounded = model(prompt).logits[:, -1].float()
    assert not torch.equal(exact, rounded)  # float32 math, not bf16
    for name, t in model.state_dict(keep_vars=True).items():
        ptr, dtype, value = before[name]
        assert t.data_ptr() == ptr and t.dtype == dtype and torch.equal(t, value)


@pytest.mark.parametrize("variant", ["original", "hybrid_eager"])
def test_a_long_prompt_is_referenced_through_a_cache_in_chunks_as_in_one_pass(benchmark, bench, variant):
    from_benchmark = load_benchmark("generate_speed_report")
    ids = bench.prompt_ids(2, 40)
    model = bench.model_of(variant)
    with torch.inference_mode():
        whole = from_benchmark.teacher_forced_logits(model, ids, 5, chunk=64)  # one call
        chunked = from_benchmark.teacher_forced_logits(model, ids, 5, chunk=16)  # 35 tokens in 16 + 16 + 3, then 5
    assert whole.shape == chunked.shape == (2, 5, whole.shape[-1])
    torch.testing.assert_close(chunked, whole, atol=2e-5, rtol=1e-5)
