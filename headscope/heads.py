"""The shared vocabulary of headscope: heads, per-head scores and full-attention head masks.

Every stage speaks in these three types:

* ``Head(layer, head)`` names one *query* head. With grouped-query attention several query heads
  share one key/value group; ``ModelFingerprint.kv_group(head)`` says which.
* ``HeadScores`` is a ``[n_layers, n_heads]`` float tensor of scores (one per query head) together
  with where it came from: the probe, the scoring method and the fingerprint of the model.
* ``HeadMask`` is a ``[n_layers, n_heads]`` bool tensor: True where a head keeps full attention.

Both scores and masks serialise to JSON that other tools can read: the matrix lives under a plain
list-of-lists key (``values`` for scores, ``full_attention_heads`` as ``[layer, head]`` pairs for masks).
Writes are atomic (temporary file, then rename) so an interrupted run never leaves half a file.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

SCORES_SCHEMA_VERSION = 1


class HeadscopeError(ValueError):
    """A user-facing error: bad input, wrong shapes, a file that does not match its model.

    The CLI prints these as one line and exits with code 2; everything else is a bug.
    """


@dataclass(frozen=True, order=True)
class Head:
    """One query head: ``layer`` and ``head`` are 0-based indices."""

    layer: int
    head: int

    def __str__(self) -> str:
        return f"L{self.layer}H{self.head}"

    @classmethod
    def parse(cls, text: str) -> "Head":
        """Parse ``"L3H5"`` (how headscope prints heads), ``"3.5"`` or ``"3-5"`` into ``Head(3, 5)``."""
        cleaned = text.strip().upper().replace("L", "").replace("H", ".").replace("-", ".")
        parts = [p for p in cleaned.split(".") if p != ""]
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise HeadscopeError(f"cannot parse head {text!r}: expected LxHy or LAYER.HEAD, e.g. L3H5 or 3.5")
        return cls(int(parts[0]), int(parts[1]))


@dataclass(frozen=True)
class ModelFingerprint:
    """What a score file or mask must match: architecture and attention geometry."""

    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    name: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_layers, self.n_heads)

    @property
    def group_size(self) -> int:
        """Query heads per key/value group."""
        return self.n_heads // self.n_kv_heads

    def has_head(self, head: "Head") -> bool:
        """Whether ``head`` is one of this model's query heads."""
        return 0 <= head.layer < self.n_layers and 0 <= head.head < self.n_heads

    def kv_group(self, head: int) -> int:
        """The key/value group of query head ``head`` (contiguous grouping, as in HF GQA)."""
        return head // self.group_size

    def to_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "name": self.name,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelFingerprint":
        try:
            return cls(
                architecture=str(data["architecture"]),
                n_layers=int(data["n_layers"]),
                n_heads=int(data["n_heads"]),
                n_kv_heads=int(data["n_kv_heads"]),
                head_dim=int(data["head_dim"]),
                name=str(data.get("name", "")),
            )
        except KeyError as missing:
            raise HeadscopeError(f"model fingerprint lacks the field {missing}") from None
        except (TypeError, ValueError, AttributeError) as err:
            raise HeadscopeError(f"model fingerprint is malformed ({err}): expected an object of integer sizes") from None

    def mismatch(self, other: "ModelFingerprint") -> str | None:
        """Name the first geometry field that differs from ``other`` (the name is not compared)."""
        for key in ("architecture", "n_layers", "n_heads", "n_kv_heads", "head_dim"):
            mine, theirs = getattr(self, key), getattr(other, key)
            if mine != theirs:
                return f"{key} is {theirs} in the file but {mine} in the model"
        return None


def write_json_atomic(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as JSON to ``path`` through a temporary file and an atomic rename."""
    return write_text_atomic(path, json.dumps(payload, indent=1))


def file_mode() -> int:
    """The mode ``open()`` would give a new file: 0o666 less the process umask (0o644 under umask 022)."""
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return 0o666 & ~mask


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename.

    The file gets the permissions a plain ``open()`` would give it (the umask is respected). A directory
    that cannot be created or written is a ``HeadscopeError`` naming the path; the target is untouched.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as err:
        raise HeadscopeError(f"cannot write {target}: {err.strerror or err}") from None
    try:
        os.fchmod(handle, file_mode())  # mkstemp makes the file owner-only
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(tmp_name, target)
    except BaseException as err:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        if isinstance(err, OSError):
            raise HeadscopeError(f"cannot write {target}: {err.strerror or err}") from None
        raise
    return target


def read_text(path: str | os.PathLike, what: str) -> str:
    """Read a UTF-8 text file; a missing, unreadable or non-UTF-8 file is a ``HeadscopeError`` naming ``what``
    (and, for a bad byte, its line)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise HeadscopeError(f"{what} file not found: {path}") from None
    except OSError as err:
        raise HeadscopeError(f"cannot read {what} file {path}: {err.strerror or err}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise HeadscopeError(f"{what} file {path}, line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); "
                             "save the file as UTF-8") from None


def read_jsonl(path: str | os.PathLike, what: str) -> Iterator[tuple[int, str, Any]]:
    """``(line number, "PATH, line N", object)`` for every non-blank line of a UTF-8 JSONL file; a line that
    is not JSON is a ``HeadscopeError`` naming it."""
    for number, line in enumerate(read_text(path, what).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            yield number, where, json.loads(line)
        except json.JSONDecodeError as err:
            raise HeadscopeError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Read JSON, turning a missing, unreadable or malformed file into a ``HeadscopeError`` naming ``what``."""
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as err:
        raise HeadscopeError(f"{what} file {path} is not valid JSON: {err}") from None


def clean_corrupt_gap(meta: dict) -> float:
    """A scores file's clean - corrupt logit-difference gap from its ``meta`` (``HeadScores.gap``)."""
    return meta["ld_clean"] - meta["ld_corrupt"]


@dataclass
class HeadScores:
    """Per-head scores of one probe under one method.

    Attributes:
        values: ``(n_layers, n_heads)`` float tensor; larger means the head matters more.
        probe: probe name (e.g. ``"needle_single"``).
        method: scorer name (e.g. ``"activation"``).
        fingerprint: the model the scores belong to.
        capability: ``"retrieval"`` or ``"reasoning"`` (from the probe), used by the fuser.
        meta: free-form provenance (pairs, length, seed, clean/corrupt baselines ...).
    """

    values: torch.Tensor
    probe: str
    method: str
    fingerprint: ModelFingerprint
    capability: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = torch.as_tensor(self.values, dtype=torch.float32).detach().cpu()
        if self.values.shape != self.fingerprint.shape:
            raise HeadscopeError(
                f"scores have shape {tuple(self.values.shape)} but the model has "
                f"{self.fingerprint.n_layers} layers x {self.fingerprint.n_heads} heads"
            )
        if torch.isnan(self.values).any():
            bad = [str(Head(int(l), int(h))) for l, h in torch.isnan(self.values).nonzero().tolist()[:5]]
            raise HeadscopeError(f"scores for {self.probe}/{self.method} contain NaN at {', '.join(bad)}")

    @property
    def gap(self) -> float:
        """The probe's clean - corrupt logit difference over its pairs (``meta``): how well the model solves it, and
        what the scores are fractions of."""
        return clean_corrupt_gap(self.meta)

    @property
    def shape(self) -> tuple[int, int]:
        return self.fingerprint.shape

    def top(self, k: int, by_magnitude: bool = True) -> list[Head]:
        """The ``k`` best heads, best first (by |score| unless ``by_magnitude`` is False)."""
        flat = self.values.abs().flatten() if by_magnitude else self.values.flatten()
        order = torch.argsort(flat, descending=True, stable=True)[:k]
        n_heads = self.fingerprint.n_heads
        return [Head(int(i) // n_heads, int(i) % n_heads) for i in order]

    def __getitem__(self, head: Head) -> float:
        return float(self.values[head.layer, head.head])

    def to_frame(self):
        """One row per head: layer, head, kv_group, score, rank (1 = largest |score|)."""
        import pandas as pd

        n_layers, n_heads = self.shape
        flat = self.values.flatten()
        ranks = torch.empty_like(flat, dtype=torch.long)
        ranks[torch.argsort(flat.abs(), descending=True, stable=True)] = torch.arange(1, flat.numel() + 1)
        return pd.DataFrame(
            {
                "layer": [l for l in range(n_layers) for _ in range(n_heads)],
                "head": [h for _ in range(n_layers) for h in range(n_heads)],
                "kv_group": [self.fingerprint.kv_group(h) for _ in range(n_layers) for h in range(n_heads)],
                "score": flat.tolist(),
                "rank": ranks.tolist(),
                "probe": self.probe,
                "method": self.method,
            }
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCORES_SCHEMA_VERSION,
            "kind": "headscope.scores",
            "probe": self.probe,
            "method": self.method,
            "capability": self.capability,
            "model": self.fingerprint.to_dict(),
            "values": [[float(x) for x in row] for row in self.values.tolist()],
            "meta": self.meta,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the scores as JSON (atomically). The matrix is under ``values``."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "scores") -> "HeadScores":
        if not isinstance(data, dict) or data.get("kind") != "headscope.scores":
            kind = data.get("kind") if isinstance(data, dict) else f"a JSON {type(data).__name__}"
            raise HeadscopeError(f"{source} is not a headscope scores file (kind={kind!r})")
        if data.get("schema_version") != SCORES_SCHEMA_VERSION:
            raise HeadscopeError(
                f"{source} has scores schema version {data.get('schema_version')!r}; "
                f"this headscope reads version {SCORES_SCHEMA_VERSION}"
            )
        values = data.get("values")
        if not isinstance(values, list) or not all(isinstance(row, list) for row in values):
            raise HeadscopeError(f"{source}: 'values' must be a list of n_layers lists of n_heads floats")
        if any(v is None or (isinstance(v, float) and math.isnan(v)) for row in values for v in row):
            raise HeadscopeError(f"{source}: 'values' contains NaN or null")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for row in values for v in row) or len({len(r) for r in values}) > 1:
            raise HeadscopeError(f"{source}: 'values' must be n_layers lists of n_heads numbers each")
        if not isinstance(data.get("model", {}), dict) or not isinstance(data.get("meta", {}), dict):
            raise HeadscopeError(f"{source}: 'model' and 'meta' must be objects")
        fingerprint = ModelFingerprint.from_dict(data.get("model", {}))
        if (len(values), len(values[0]) if values else 0) != fingerprint.shape:
            raise HeadscopeError(f"{source}: 'values' is {len(values)} x {len(values[0]) if values else 0} but its model has "
                                 f"{fingerprint.n_layers} layers x {fingerprint.n_heads} heads")
        return cls(
            values=torch.tensor(values, dtype=torch.float32),
            probe=str(data.get("probe", "")),
            method=str(data.get("method", "")),
            fingerprint=fingerprint,
            capability=str(data.get("capability", "")),
            meta=dict(data.get("meta", {})),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HeadScores":
        """Read scores written by :meth:`save`, validating schema, shape and values."""
        return cls.from_dict(read_json(path, "scores"), source=str(path))


@dataclass
class HeadMask:
    """Which heads keep full attention (True) in a ``(n_layers, n_heads)`` bool tensor.

    Budget selection, the versioned JSON file and peer export formats live in ``headscope.mask``;
    this class only holds the matrix, the model it belongs to and its provenance.
    """

    full: torch.Tensor
    fingerprint: ModelFingerprint
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.full = torch.as_tensor(self.full).to(torch.bool).cpu()
        if self.full.shape != self.fingerprint.shape:
            raise HeadscopeError(
                f"mask has shape {tuple(self.full.shape)} but the model has "
                f"{self.fingerprint.n_layers} layers x {self.fingerprint.n_heads} heads"
            )

    def heads(self) -> list[Head]:
        """Full-attention heads in (layer, head) order."""
        return [Head(int(l), int(h)) for l, h in self.full.nonzero().tolist()]

    def __iter__(self) -> Iterator[Head]:
        return iter(self.heads())

    def __contains__(self, head: Head) -> bool:
        return bool(self.full[head.layer, head.head])

    @property
    def n_full(self) -> int:
        return int(self.full.sum())

    def kv_groups_full(self) -> torch.Tensor:
        """``(n_layers, n_kv_heads)`` bool: groups holding at least one full-attention head.

        A group with any full-attention head must keep its whole KV cache, so this is what the mask
        costs in KV memory.
        """
        fp = self.fingerprint
        return self.full.view(fp.n_layers, fp.n_kv_heads, fp.group_size).any(dim=-1)

    def shared_with(self, other: "HeadMask") -> tuple[int, int]:
        """(full-attention heads, KV groups holding one) that this mask and ``other`` have in common."""
        if other.fingerprint.shape != self.fingerprint.shape or other.fingerprint.n_kv_heads != self.fingerprint.n_kv_heads:
            raise HeadscopeError("masks of different models have no heads in common")
        heads = int((self.full & other.full).sum())
        return heads, int((self.kv_groups_full() & other.kv_groups_full()).sum())

    @property
    def kv_fraction(self) -> float:
        """Fraction of the full model's KV cache this mask keeps."""
        groups = self.kv_groups_full()
        return float(groups.sum()) / groups.numel()

    @property
    def head_fraction(self) -> float:
        """Fraction of query heads at full attention."""
        return self.n_full / self.full.numel()
