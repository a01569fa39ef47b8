"""The run configuration of ``headscope transfer``: one YAML (or TOML) file, validated into dataclasses.

A run config names the teacher (``model``), how the hybrid's head mask is chosen (``hybrid``), the text
to train on (``data``), run-wide settings (seed, checkpoint/log/eval cadence, device, precision,
distributed strategy) and a list of ``stages``. Each stage has a ``kind``:

* ``align``: stage 1, layer-wise hidden-state alignment of the attention modules (backbone frozen);
* ``distill``: stage 2, KL to the teacher's logits plus cross-entropy, whole model trainable;
* ``long_context``: stage 3, next-token prediction at a longer sequence length.

Validation is strict: an unknown key, a missing required field or a value of the wrong type raises a
``HeadscopeError`` naming the key by its path (``stages[1].temperature``), with a suggestion for
misspelt keys. Relative paths are resolved against the directory of the config file. The documented
schema with every default is ``headscope/transfer/example.yaml``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from headscope.heads import HeadscopeError, read_text

STAGE_KINDS = ("align", "distill", "long_context")
# Top-level keys a resumed run may change (they do not decide the trained weights).
RESUMABLE_CHANGES = ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "progress", "device", "distributed")
_REQUIRED = object()


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _check_type(key: str, value: Any, kind: str) -> Any:
    """Check ``value`` against a schema type name and return it normalised.

    Types: ``int``, ``float`` (ints accepted), ``bool``, ``str``, ``int?``/``str?`` (None allowed),
    ``list[int]``, ``list[str]`` (a single string is accepted as a one-element list), ``dict``.
    """
    if kind.endswith("?"):
        if value is None:
            return None
        kind = kind[:-1]
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "dict": isinstance(value, dict),
        "list": isinstance(value, list),
        "list[int]": isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
        "list[str]": isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
        "list[float]": isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value),
    }[kind]
    if not ok:
        hint = ""
        if kind == "float" and isinstance(value, str):
            try:
                hint = f" (YAML reads {value} as a string: write it with a decimal point, {float(value):.1e})"
            except ValueError:
                pass
        raise HeadscopeError(f"config key '{key}': expected {kind}, got {_describe(value)}{hint}")
    if kind == "float":
        return float(value)
    if kind == "list[str]" and isinstance(value, str):
        return [value]
    if kind == "list[float]":
        return [float(v) for v in value]
    return value


def _read_section(where: str, raw: Any, schema: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    """Validate one mapping against ``schema`` = {key: (type, default or _REQUIRED)}."""
    if not isinstance(raw, dict):
        raise HeadscopeError(f"config key '{where or 'top level'}': expected a mapping, got {_describe(raw)}")
    prefix = f"{where}." if where else ""
    for key in raw:
        if key not in schema:
            close = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(schema)}"
            raise HeadscopeError(f"unknown config key '{prefix}{key}'{hint}")
    out = {}
    for key, (kind, default) in schema.items():
        if key not in raw:
            if default is _REQUIRED:
                raise HeadscopeError(f"config is missing the required key '{prefix}{key}'")
            out[key] = default() if callable(default) else default
        else:
            out[key] = _check_type(prefix + key, raw[key], kind)
    return out


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise HeadscopeError(f"config key '{key}': {message}")


@dataclass(frozen=True)
class StageConfig:
    """One training stage. Loss options only apply to their kind (see the module docstring)."""

    name: str
    kind: str
    steps: int
    lr: float
    batch_size: int  # sequences per optimizer step, summed over all processes
    seq_len: int
    micro_batch: int | None = None  # sequences per forward on one process (gradient accumulation)
    warmup: int = 0
    min_lr_ratio: float = 0.1  # cosine decay from lr to lr * min_lr_ratio after warmup
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # 0 disables clipping
    trainable: str = "attention"  # "attention" (attention modules only) or "all"
    align_inputs: str = "teacher"  # align: "teacher" (teacher-forced, layer-local) or "student" (end-to-end)
    align_normalize: bool = False  # align: divide each layer's MSE by the teacher's mean square
    temperature: float = 1.0  # distill
    kl_weight: float = 1.0  # distill
    ce_weight: float = 0.0  # distill


_STAGE_COMMON = {
    "name": ("str?", None),
    "kind": ("str", _REQUIRED),
    "steps": ("int", _REQUIRED),
    "lr": ("float", _REQUIRED),
    "batch_size": ("int", _REQUIRED),
    "seq_len": ("int", _REQUIRED),
    "micro_batch": ("int?", None),
    "warmup": ("int", 0),
    "min_lr_ratio": ("float", 0.1),
    "weight_decay": ("float", 0.0),
    "betas": ("list[float]", lambda: [0.9, 0.95]),
    "grad_clip": ("float", 1.0),
    "trainable": ("str?", None),
}
_STAGE_EXTRA = {
    "align": {"align_inputs": ("str", "teacher"), "align_normalize": ("bool", False)},
    "distill": {"temperature": ("float", 1.0), "kl_weight": ("float", 1.0), "ce_weight": ("float", 0.0)},
    "long_context": {},
}


def _read_stage(index: int, raw: Any) -> StageConfig:
    where = f"stages[{index}]"
    kind = raw.get("kind") if isinstance(raw, dict) else None
    if kind is not None and kind not in STAGE_KINDS:
        raise HeadscopeError(f"config key '{where}.kind': must be one of {', '.join(STAGE_KINDS)}, got {kind!r}")
    schema = dict(_STAGE_COMMON, **_STAGE_EXTRA.get(kind, {}))
    for key in raw if isinstance(raw, dict) else ():
        owners = [k for k, extra in _STAGE_EXTRA.items() if key in extra]
        if key not in schema and owners and kind is not None:
            raise HeadscopeError(f"config key '{where}.{key}' only applies to {'/'.join(owners)} stages, not {kind}")
    values = _read_section(where, raw, schema)
    values["name"] = values["name"] or values["kind"]
    values["trainable"] = values["trainable"] or ("attention" if values["kind"] == "align" else "all")
    for key in ("steps", "batch_size", "seq_len"):
        _require(values[key] >= 1, f"{where}.{key}", f"must be at least 1, got {values[key]}")
    _require(values["seq_len"] >= 2, f"{where}.seq_len", "must be at least 2 (next-token targets)")
    _require(values["lr"] > 0, f"{where}.lr", f"must be positive, got {values['lr']}")
    _require(0 <= values["warmup"] <= values["steps"], f"{where}.warmup", f"must be in [0, steps], got {values['warmup']}")
    _require(0 <= values["min_lr_ratio"] <= 1, f"{where}.min_lr_ratio", "must be in [0, 1]")
    _require(values["grad_clip"] >= 0, f"{where}.grad_clip", "must be >= 0 (0 disables clipping)")
    _require(len(values["betas"]) == 2, f"{where}.betas", "must be a list of two numbers")
    _require(all(0 <= b < 1 for b in values["betas"]), f"{where}.betas", f"must be two numbers in [0, 1), got {values['betas']}")
    _require(values["weight_decay"] >= 0, f"{where}.weight_decay", f"must be >= 0, got {values['weight_decay']}")
    values["betas"] = tuple(values["betas"])
    _require(values["trainable"] in ("attention", "all"), f"{where}.trainable", "must be 'attention' or 'all'")
    if values["micro_batch"] is not None:
        _require(values["micro_batch"] >= 1, f"{where}.micro_batch", "must be at least 1")
        _require(values["batch_size"] % values["micro_batch"] == 0 or values["micro_batch"] >= values["batch_size"],
                 f"{where}.micro_batch", f"must divide batch_size {values['batch_size']}, got {values['micro_batch']}")
    if kind == "align":
        _require(values["align_inputs"] in ("teacher", "student"), f"{where}.align_inputs", "must be 'teacher' or 'student'")
    if kind == "distill":
        _require(values["temperature"] > 0, f"{where}.temperature", "must be positive")
        _require(values["kl_weight"] >= 0 and values["ce_weight"] >= 0, f"{where}.kl_weight", "loss weights must be >= 0")
        _require(values["kl_weight"] + values["ce_weight"] > 0, f"{where}.kl_weight", "kl_weight and ce_weight are both 0")
    return StageConfig(**values)


@dataclass(frozen=True)
class HybridSpec:
    """Which heads keep full attention: a mask file (``headscope.mask``), or a baseline mask.

    ``layerwise``: whole layers, ``ratio`` linear:full layers (default "3:1", the Qwen3-Next layout);
    ``random``: a seeded uniform draw of ``ratio`` (default "7:1") or exactly ``n_full`` heads, whole
    KV groups with ``kv_aware``. ``options`` go to ``build_hybrid``; ``calibrate_gamma``: on a fresh run,
    each head's fusion scale starts at its pretrained head's output RMS over that many training sequences
    of the first stage (``headscope.hybrid.calibrate_gamma``; 0 keeps the scales at 1).
    """

    mask: str | None = None
    baseline: str | None = None
    ratio: str | None = None
    n_full: int | None = None
    seed: int = 0
    kv_aware: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # passed to build_hybrid(config=...)
    calibrate_gamma: int = 8  # first-stage training sequences that set each head's fusion scale (0: keep 1)


_HYBRID_SCHEMA = {
    "mask": ("str?", None),
    "baseline": ("str?", None),
    "ratio": ("str?", None),
    "n_full": ("int?", None),
    "seed": ("int", 0),
    "kv_aware": ("bool", False),
    "options": ("dict", dict),
    "calibrate_gamma": ("int", 8),
}


@dataclass(frozen=True)
class DataConfig:
    """Where the training text comes from and how it is split (see ``headscope.transfer.data``)."""

    source: str = "files"  # "files" or "demo_corpus"
    paths: list[str] = field(default_factory=list)  # files or directories (*.txt, *.jsonl, *.bin)
    bin_dtype: str = "uint16"
    bin_doc_tokens: int = 2048  # .bin streams are cut into pseudo-documents of this size for the split
    eos_id: int | None = None  # document separator; default: the tokenizer's eos id
    heldout_method: str = "hash"  # "hash" (per-document hash) or "fraction" (last documents)
    heldout_fraction: float = 0.01
    eval_sequences: int = 16  # held-out sequences per evaluation (0 disables evaluation)


_DATA_SCHEMA = {
    "source": ("str", "files"),
    "paths": ("list[str]", list),
    "bin_dtype": ("str", "uint16"),
    "bin_doc_tokens": ("int", 2048),
    "eos_id": ("int?", None),
    "heldout_method": ("str", "hash"),
    "heldout_fraction": ("float", 0.01),
    "eval_sequences": ("int", 16),
}


@dataclass(frozen=True)
class TransferConfig:
    """A whole run. ``model`` is the teacher directory; the student is built from it."""

    model: str
    hybrid: HybridSpec
    data: DataConfig
    stages: tuple[StageConfig, ...]
    seed: int = 0
    tokenizer: str | None = None  # default: the model directory
    checkpoint_every: int = 0  # steps between checkpoints inside a stage (0: only at stage ends)
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 0  # steps between held-out evaluations (0: only at stage ends)
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda"
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16", "fp32"
    distributed: str = "ddp"  # under torchrun: "ddp" or "fsdp"
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["stages"] = [dict(s, betas=list(s["betas"])) for s in out["stages"]]
        return out

    def digest(self) -> str:
        """A short hash of the settings that decide the trained weights: not the cadence of logs, evaluations
        and checkpoints, the display, the device or the distributed strategy (checkpoints hold full state,
        so a run may resume on another number of processes, strategy or device)."""
        decisive = {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_CHANGES}
        return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:16]


_TOP_SCHEMA = {
    "model": ("str", _REQUIRED),
    "hybrid": ("dict", _REQUIRED),
    "data": ("dict", _REQUIRED),
    "stages": ("list", _REQUIRED),
    "seed": ("int", 0),
    "tokenizer": ("str?", None),
    "checkpoint_every": ("int", 0),
    "keep_checkpoints": ("int", 2),
    "log_every": ("int", 10),
    "eval_every": ("int", 0),
    "device": ("str", "auto"),
    "precision": ("str", "auto"),
    "distributed": ("str", "ddp"),
    "progress": ("bool", True),
}


def _resolve(path: str, base: Path | None) -> str:
    expanded = Path(os.path.expanduser(path))
    return str(expanded if expanded.is_absolute() or base is None else (base / expanded).resolve())


def config_from_dict(raw: Any, base_dir: str | os.PathLike | None = None) -> TransferConfig:
    """Validate a parsed config mapping.

    Args:
        raw: the mapping (from YAML/TOML or built in code).
        base_dir: directory that relative paths are resolved against (None: leave them as given).
    Returns:
        A ``TransferConfig``.
    Raises:
        HeadscopeError: unknown key, missing key, wrong type or value, naming the key.
    """
    base = Path(base_dir) if base_dir is not None else None
    top = _read_section("", raw, _TOP_SCHEMA)
    _require(len(top["stages"]) > 0, "stages", "must be a non-empty list of stages")
    stages = tuple(_read_stage(i, stage) for i, stage in enumerate(top["stages"]))
    names = [s.name for s in stages]
    for i, name in enumerate(names):
        _require(names.index(name) == i, f"stages[{i}].name", f"stage name {name!r} is used twice")

    hybrid = _read_section("hybrid", top["hybrid"], _HYBRID_SCHEMA)
    _require((hybrid["mask"] is None) != (hybrid["baseline"] is None), "hybrid", "give exactly one of 'mask' (a mask file) or 'baseline'")
    if hybrid["baseline"] is not None:
        _require(hybrid["baseline"] in ("layerwise", "random"), "hybrid.baseline", f"must be 'layerwise' or 'random', got {hybrid['baseline']!r}")
    if hybrid["mask"] is not None:
        extra = [k for k in ("ratio", "n_full", "kv_aware") if hybrid[k] not in (None, False)]
        _require(not extra, f"hybrid.{extra[0] if extra else ''}", "only applies to a baseline, not to a mask file")
        hybrid["mask"] = _resolve(hybrid["mask"], base)
    _require(hybrid["calibrate_gamma"] >= 0, "hybrid.calibrate_gamma", "must be >= 0 (0 keeps every fusion scale at 1)")
    if hybrid["baseline"] == "layerwise":
        _require(hybrid["n_full"] is None and not hybrid["kv_aware"], "hybrid.n_full", "a layerwise baseline takes only 'ratio'")
    _require(hybrid["ratio"] is None or hybrid["n_full"] is None, "hybrid.n_full", "give either 'ratio' or 'n_full', not both")

    data = _read_section("data", top["data"], _DATA_SCHEMA)
    _require(data["source"] in ("files", "demo_corpus"), "data.source", f"must be 'files' or 'demo_corpus', got {data['source']!r}")
    if data["source"] == "files":
        _require(len(data["paths"]) > 0, "data.paths", "give at least one file or directory of .txt/.jsonl/.bin")
    data["paths"] = [_resolve(p, base) for p in data["paths"]]
    _require(data["bin_dtype"] in ("uint16", "uint32"), "data.bin_dtype", f"must be 'uint16' or 'uint32', got {data['bin_dtype']!r}")
    _require(data["bin_doc_tokens"] >= 1, "data.bin_doc_tokens", "must be at least 1")
    _require(data["heldout_method"] in ("hash", "fraction"), "data.heldout_method", "must be 'hash' or 'fraction'")
    _require(0 <= data["heldout_fraction"] < 1, "data.heldout_fraction", "must be in [0, 1)")
    _require(data["eval_sequences"] >= 0, "data.eval_sequences", "must be >= 0")

    for key in ("checkpoint_every", "log_every", "eval_every"):
        _require(top[key] >= 0, key, f"must be >= 0, got {top[key]}")
    _require(top["keep_checkpoints"] >= 1, "keep_checkpoints", "must be at least 1")
    _require(top["device"] in ("auto", "cpu", "cuda"), "device", f"must be auto, cpu or cuda, got {top['device']!r}")
    _require(top["precision"] in ("auto", "bf16", "fp32"), "precision", f"must be auto, bf16 or fp32, got {top['precision']!r}")
    _require(top["distributed"] in ("ddp", "fsdp"), "distributed", f"must be ddp or fsdp, got {top['distributed']!r}")
    return TransferConfig(
        model=_resolve(top["model"], base),
        hybrid=HybridSpec(**hybrid),
        data=DataConfig(**data),
        stages=stages,
        seed=top["seed"],
        tokenizer=_resolve(top["tokenizer"], base) if top["tokenizer"] else None,
        **{k: top[k] for k in ("checkpoint_every", "keep_checkpoints", "log_every", "eval_every", "device", "precision", "distributed", "progress")},
    )


def load_config(path: str | os.PathLike) -> TransferConfig:
    """Read and validate a ``.yaml``/``.yml`` or ``.toml`` run config."""
    path = Path(path)
    if not path.is_file():
        raise HeadscopeError(f"config file not found: {path}")
    text = read_text(path, "config")
    if path.suffix == ".toml":
        import tomllib

        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise HeadscopeError(f"config {path} is not valid TOML: {err}") from None
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise HeadscopeError(f"config {path} is not valid YAML: {err}") from None
    else:
        raise HeadscopeError(f"config {path}: expected a .yaml, .yml or .toml file")
    if not isinstance(raw, dict):
        raise HeadscopeError(f"config {path}: expected a mapping at the top level")
    return config_from_dict(raw, base_dir=path.parent.resolve())
