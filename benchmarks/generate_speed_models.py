"""The models of ``benchmarks/generate_speed.py`` (a helper module of that script, not a script): the Qwen3-1.7B
shape as a config (random weights, no download), ``Bench`` (one model kind on the device: the original, its 7:1
hybrid and the original's all-FA twin on the hybrid's code path, with their masks, prompts and memory estimates)
``trained_hybrid`` (a saved hybrid of ``--model`` for ``--hybrid``) and ``read_prompt`` (a text file's token ids
for ``--prompt-file``).
"""

from __future__ import annotations

import gc
import hashlib
from pathlib import Path

import torch

from generate_speed_device import memory_need
from generate_speed_report import RANDOM_PROMPT

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("qwen3-1.7b", "smollm2", "smollm2-shape")  # row kinds: a random Qwen3-1.7B, --model (SmolLM2), a random SmolLM2-135M
SMOL_MASK = ROOT / "benchmarks" / "results" / "smollm2" / "kv_aware_mask.json"


def qwen3_config(smoke: bool):
    """Qwen3-1.7B's shape (28 layers, 16 query and 8 KV heads of 128, tied embeddings), or a tiny Qwen3 with ``smoke``."""
    from transformers import Qwen3Config

    if smoke:
        return Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=8,
                           num_key_value_heads=4, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=True)
    return Qwen3Config(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, max_position_embeddings=262144, rope_theta=1e6, tie_word_embeddings=True)


def smollm2_config(smoke: bool):
    """SmolLM2-135M's shape (30 layers, 9 query and 3 KV heads of 64, tied embeddings; its own 8K positions raised
    to 128K so the long rows run), or a tiny Llama with ``smoke``: the ``smollm2-shape`` rows, random weights."""
    from transformers import LlamaConfig

    if smoke:
        return LlamaConfig(vocab_size=256, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
                           num_key_value_heads=2, head_dim=8, max_position_embeddings=4096, tie_word_embeddings=True)
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, head_dim=64, max_position_embeddings=131072 + 1024, rope_theta=1e5,
                       rms_norm_eps=1e-5, tie_word_embeddings=True)


SHAPE_KEYS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "intermediate_size", "vocab_size")


def trained_hybrid(path: str, original, fingerprint, device: torch.device, dtype: torch.dtype):
    """A hybrid trained from ``original`` (``headscope transfer``'s ``final/``, or any saved ``HybridForCausalLM``)
    on ``device``: ``(model, its HeadMask, the row's mask source)``; a ``HeadscopeError`` when ``path`` holds no
    loadable hybrid or one of another model's shape (``SHAPE_KEYS`` of its base config against ``original``'s)."""
    from transformers import AutoModelForCausalLM

    from headscope.heads import HeadMask, HeadscopeError
    from headscope.hybrid import HybridForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as err:
        raise HeadscopeError(f"--hybrid {path}: no loadable model there ({str(err).splitlines()[0]})") from err
    if not isinstance(model, HybridForCausalLM):
        raise HeadscopeError(f"--hybrid {path}: a {type(model).__name__}, not a headscope hybrid")
    base, want = model.config.base, original.config
    differ = [key for key in SHAPE_KEYS if getattr(base, key, None) != getattr(want, key, None)]
    if differ:
        raise HeadscopeError(f"--hybrid {path} was built from a model of another shape than --model ({', '.join(differ)} differ)")
    mask = HeadMask(model.config.full_mask(), fingerprint, {"source": f"trained hybrid {path}"})
    return model.to(device).eval(), mask, f"trained hybrid {path} ({mask.n_full} FA heads)"


def weights_digest(directory: str) -> str:
    """sha256 (12 hex digits) of a saved model's weight files (``*.safetensors``, else ``*.bin``), in name order."""
    files = sorted(Path(directory).glob("*.safetensors")) or sorted(Path(directory).glob("*.bin"))
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 23), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


class Bench:
    """The models of one kind on the device, built once per process: the original, its hybrid, and the original's
    all-FA twin on the hybrid's code path (``build_full_attention``: the original's own tensors, nothing copied)."""

    def __init__(self, kind: str, args, device: torch.device, dtype: torch.dtype, text: tuple[torch.Tensor, str] | None = None) -> None:
        from transformers import AutoModelForCausalLM, LlamaForCausalLM, Qwen3ForCausalLM

        from headscope.heads import HeadMask
        from headscope.hybrid import build_full_attention, build_hybrid
        from headscope.models import load_model

        self.kind, self.device, self.dtype = kind, device, dtype
        torch.manual_seed(0)
        if kind == "smollm2":
            original = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
        else:  # built in the dtype as from_pretrained(dtype=...) builds: the rotary inv_freq stays float32 (.to(dtype) rounds it)
            family, config = (LlamaForCausalLM, smollm2_config(args.smoke)) if kind == "smollm2-shape" else (Qwen3ForCausalLM, qwen3_config(args.smoke))
            with torch.device(device):
                original = family._from_config(config, dtype=dtype).eval()
        lm = load_model(original)
        fp = lm.fingerprint
        trained = getattr(args, "hybrid", None) if kind == "smollm2" else None  # a trained hybrid of --model instead of a built one
        if trained:
            self.hybrid, self.mask, self.mask_source = trained_hybrid(trained, original, fp, device, dtype)
        else:
            if kind.startswith("smollm2"):  # the real model's mask fits its random twin too (same shape)
                self.mask, self.mask_source = self._file_mask(args.mask or SMOL_MASK, fp)
            else:
                full = torch.zeros(fp.shape, dtype=torch.bool)
                full[:, : fp.group_size] = True  # KV group 0 of every layer
                self.mask, self.mask_source = HeadMask(full, fp, {"ratio": "7:1"}), "KV group 0 of every layer"
            self.hybrid = build_hybrid(lm, self.mask)
        digest = hashlib.sha256(self.mask.full.numpy().tobytes()).hexdigest()[:12]
        # the mask; a trained model's path and weights (a model retrained into the same directory is another hybrid)
        self.hybrid_id = digest + (f" trained {Path(trained).resolve()} weights {weights_digest(trained)}" if trained else "")
        self.original = original
        self.same_kernels = build_full_attention(lm)  # original_graph: the original's own tensors on the hybrid's decode path
        self.vocab = original.config.vocab_size
        self.config = original.config
        self._static = None  # ((batch, tokens), StaticCache) of original_compiled
        self.text, self.prompt = text if text is not None else (None, RANDOM_PROMPT)  # (n,) token ids of --prompt-file

    def prompt_ids(self, batch: int, context: int) -> torch.Tensor:
        """``(batch, context)`` prompt ids: random (seeded by the row), or the text's tokens tiled (row ``i`` starts
        ``i x context`` tokens into the text repeated end to end)."""
        if self.text is None:
            ids = torch.randint(0, self.vocab, (batch, context), generator=torch.Generator().manual_seed(context + batch))
        else:
            ids = self.text[torch.arange(batch * context) % len(self.text)].view(batch, context)
        return ids.to(self.device)

    def model_of(self, variant: str):
        """The model ``variant`` generates with: the hybrid, the original's all-FA twin (original_graph) or the original."""
        if variant == "original_graph":
            return self.same_kernels
        return self.hybrid if variant.startswith("hybrid") else self.original

    def reference_of(self, variant: str):
        """The model whose plain float32 forward checks ``variant``'s tokens: the hybrid, or the original itself
        (also for original_graph: its twin is checked against the model it stands for, not against itself)."""
        return self.hybrid if variant.startswith("hybrid") else self.original

    @staticmethod
    def _file_mask(path, fp):
        from headscope.heads import HeadscopeError
        from headscope.mask import random_mask
        from headscope.maskfile import load_mask

        try:
            return load_mask(path, expect=fp), str(path)
        except HeadscopeError as err:
            return random_mask(fp, "7:1", seed=0, kv_aware=True), f"random KV-aware 7:1 (seed 0; {Path(path).name}: {err})"

    def need(self, variant: str, batch: int, context: int, new: int, prefill_chunk: int | None) -> dict[str, int]:
        """``memory_need`` of ``variant`` for this model and mask."""
        return memory_need(variant, self.config, self.mask.fingerprint, self.mask, self.hybrid.config.conv_size,
                           torch.finfo(self.dtype).bits // 8, batch, context, new, prefill_chunk)

    def weights_bytes(self) -> int:
        """Bytes of the parameters of every model held (shared tensors once): what a variant's peak adds to ``need``."""
        tensors = {p.data_ptr(): p.numel() * p.element_size() for m in (self.original, self.hybrid, self.same_kernels) for p in m.parameters()}
        return sum(tensors.values())

    def static_cache(self, batch: int, tokens: int):
        """The original's ``StaticCache`` for ``batch`` rows of ``tokens``: kept for the row's calls, made empty."""
        from transformers import StaticCache

        if self._static is None or self._static[0] != (batch, tokens):
            self._static = None  # free the old buffers before allocating the new ones
            cache, c = StaticCache(config=self.config, max_cache_len=tokens), self.config
            # allocated now, as generate() does for chunked prefill: a compiled chunk must not meet an empty cache
            cache.early_initialization(batch_size=batch, num_heads=c.num_key_value_heads, dtype=self.dtype, device=self.device,
                                       head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
            self._static = ((batch, tokens), cache)
        cache = self._static[1]
        with torch.inference_mode():  # its tensors were made under inference mode by the generate() that filled them
            cache.reset()
        return cache

    def release(self, compiled: bool = False) -> None:
        """Drop the static caches of the last variant (the hybrid and the twin keep theirs on the model) and, after
        ``original_compiled`` (``compiled``), torch.compile's graphs: their CUDA-graph memory pool would stay
        reserved and squeeze the next variant."""
        from headscope.hybrid.generation import drop_static_cache

        self._static = None
        for model in (self.hybrid, self.same_kernels):
            drop_static_cache(model)
        if compiled:
            torch._dynamo.reset()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def read_prompt(path: str, model_dir: str) -> tuple[torch.Tensor, str]:
    """A .txt / .jsonl file's token ids ``(n,)`` (``model_dir``'s tokenizer, documents in file order, eos
    between them: ``headscope.transfer.data``'s reader) and the prompt's name for the rows (file name, tokens,
    a hash of the ids). A missing, unreadable or empty file is a ``HeadscopeError``."""
    from transformers import AutoConfig, AutoTokenizer

    from headscope.transfer.config import DataConfig
    from headscope.transfer.data import PackedSequences, read_documents

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    docs = read_documents(DataConfig(source="files", paths=[str(path)]), tokenizer, vocab)
    n = PackedSequences(docs, 1, tokenizer.eos_token_id).n_tokens
    ids = PackedSequences(docs, n, tokenizer.eos_token_id)[0]
    digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:12]
    return ids, f"text {Path(path).name} ({n} tokens, ids sha256 {digest})"
