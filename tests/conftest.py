"""Shared fixtures: tiny random Hugging Face models saved to local directories (no hub access)."""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, TypeVar

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from headscope.probes.base import Probe, PromptPair

VOCAB = 128
T = TypeVar("T")


def word_tokenizer(vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``w0 .. w{n}`` plus [UNK] and <eos>."""
    vocab = {"[UNK]": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(vocab_size - 2)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>")



@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core box are far faster single-threaded (``usefixtures`` per module)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


OFF_BY_ONE = ("cache slot", "position")


def plant_off_by_one(monkeypatch, bug: str) -> None:
    """Break the static decode path (``HybridStaticCache``) by one: "cache slot" writes each decode step's key and
    value one slot early (over the last prompt token's), "position" runs the decode step one position ahead."""
    from headscope.hybrid.modeling import HybridModel
    from headscope.hybrid.static_cache import HybridStaticCache

    if bug == "cache slot":
        end_prefill = HybridStaticCache.end_prefill
        monkeypatch.setattr(HybridStaticCache, "end_prefill", lambda self, length: end_prefill(self, length - 1))
    else:
        step = HybridModel.decode_step
        monkeypatch.setattr(HybridModel, "decode_step", lambda self, ids, positions, cache: step(self, ids, positions + 1, cache))


def tiny_qwen3(seed: int = 0, n_layers: int = 3) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return Qwen3ForCausalLM(config).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=1)
    return GPT2LMHeadModel(config).eval()


def save_model(model, path) -> str:
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory) -> str:
    return save_model(tiny_qwen3(), tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> str:
    return save_model(tiny_gpt2(), tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> str:
    return save_model(tiny_llama(), tmp_path_factory.mktemp("llama"))


def random_probe(n_pairs: int = 3, length: int = 12, seed: int = 0, n_changed: int = 2) -> Probe:
    """Random clean prompts; corrupt prompts change ``n_changed`` early tokens. Not a real task, but
    a random model's logit difference still depends on those tokens, which is all patching needs."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n_pairs):
        clean = [rng.randrange(2, VOCAB) for _ in range(length)]
        corrupt = list(clean)
        for pos in rng.sample(range(length - 1), n_changed):
            corrupt[pos] = rng.randrange(2, VOCAB)
        answer, wrong = rng.sample(range(2, VOCAB), 2)
        pairs.append(PromptPair(tuple(clean), tuple(corrupt), answer, wrong))
    return Probe("random", "retrieval", pairs)


def tiny_gpt2_sharp(seed: int = 0) -> GPT2LMHeadModel:
    """``tiny_gpt2`` with a 5x larger init: GPT-2's default 0.02 leaves a random model's logit differences
    at ~1e-3, so normalised scores magnify float32 round-off; this one has gaps ~0.1."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=1,
                        initializer_range=0.1)
    return GPT2LMHeadModel(config).eval()


def prefix_probe(length: int = 12, seed: int = 0) -> Probe:
    """Pairs whose first differing position spans the edge cases of shared-prefix reuse: position 0
    (nothing shared), the last token only (everything but the query shared), and two in between."""
    rng = random.Random(seed)
    changes = [(0, length // 2), (length - 1,), (length // 3, length // 3 + 1), (2 * length // 3,)]
    pairs = []
    for positions in changes:
        clean = [rng.randrange(2, VOCAB) for _ in range(length)]
        corrupt = list(clean)
        for pos in positions:
            corrupt[pos] = (clean[pos] + rng.randrange(1, VOCAB - 2) - 2) % (VOCAB - 2) + 2  # another token
        answer, wrong = rng.sample(range(2, VOCAB), 2)
        pairs.append(PromptPair(tuple(clean), tuple(corrupt), answer, wrong))
    return Probe("prefix_edges", "retrieval", pairs)


def beside_torchrun(worker: Path, args: list[str], reference: Callable[[], T], timeout: float = 150) -> tuple[T, str]:
    """Start ``torchrun --nproc-per-node 2 worker args`` on the CPU and run ``reference()`` (single-threaded) while
    its workers start up. Returns ``reference()``'s result and torchrun's output; fails unless both ranks exit 0."""
    launch = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker), *args],
                              env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = reference()
    finally:
        torch.set_num_threads(before)
    try:
        output, _ = launch.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(launch.pid, signal.SIGKILL)  # torchrun and its two workers (their own session, see Popen)
        raise
    assert launch.returncode == 0, output[-3000:]  # torchrun returns 0 only when both ranks exit 0
    return result, output
