"""Atomic, pruned training checkpoints of a transfer run.

Layout under ``RUN_DIR/checkpoints/``: one directory per checkpoint, named
``s{stage_index:02d}-{stage_name}-{step:08d}``, holding ``state.pt`` (see ``CheckpointState``) and
``meta.json``; ``latest.json`` names the newest. A checkpoint is written into a hidden temporary
directory, flushed to disk, and renamed into place; only then does ``latest.json`` (itself replaced
atomically) point at it, and only then are checkpoints beyond the newest ``keep`` deleted. A crash at
any moment leaves ``latest.json`` naming a complete checkpoint; the next write deletes the temporary
directories a crashed one left (each can hold a whole model and its optimizer state).
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from headscope.heads import HeadscopeError, read_json, write_json_atomic

FORMAT_VERSION = 1


@dataclass
class CheckpointState:
    """Everything a resumed run needs to continue exactly.

    Attributes:
        stage_index, stage_name: the stage the checkpoint was taken in.
        step: optimizer steps completed in that stage.
        stage_done: True for the end-of-stage checkpoint (the next stage starts fresh).
        tokens: training tokens seen in the stage (summed over processes).
        model: full student ``state_dict`` (CPU).
        optimizer: optimizer state keyed by parameter name (None when ``stage_done``).
        scheduler: LR scheduler ``state_dict`` (None when ``stage_done``).
        rng: one entry per process (rank order), see :func:`rng_state`.
        config_digest: ``TransferConfig.digest()`` of the run.
    """

    stage_index: int
    stage_name: str
    step: int
    stage_done: bool
    tokens: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    scheduler: dict[str, Any] | None
    rng: list[dict[str, Any]]
    config_digest: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return f"s{self.stage_index:02d}-{self.stage_name}-{self.step:08d}"


def rng_state() -> dict[str, Any]:
    """This process's random states: torch CPU, every CUDA device, Python ``random``."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: str | os.PathLike, state: CheckpointState, keep: int) -> Path:
    """Write ``state`` atomically, point ``latest.json`` at it, delete all but the newest ``keep``.

    Returns:
        The checkpoint directory.
    """
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.iterdir():  # .tmp-<tag>-<pid> / .stale-<tag>-<pid> of a writer killed mid-checkpoint
        if leftover.is_dir() and leftover.name.startswith((".tmp-", ".stale-")):
            shutil.rmtree(leftover)
    final = root / state.tag
    tmp = root / f".tmp-{state.tag}-{os.getpid()}"
    tmp.mkdir()
    payload = {"format": FORMAT_VERSION, **state.__dict__}
    with open(tmp / "state.pt", "wb") as stream:
        torch.save(payload, stream)
        stream.flush()
        os.fsync(stream.fileno())
    write_json_atomic(tmp / "meta.json", {"tag": state.tag, "stage_index": state.stage_index, "stage": state.stage_name,
                                          "step": state.step, "stage_done": state.stage_done, "tokens": state.tokens})
    if final.exists():  # the same step written again (after a resume): swap the old copy out first
        stale = root / f".stale-{state.tag}-{os.getpid()}"
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale)
    else:
        os.replace(tmp, final)
    write_json_atomic(root / "latest.json", {"tag": state.tag})
    _prune(root, keep, protect=state.tag)
    return final


def _order(meta: dict[str, Any]) -> tuple[int, int, bool]:
    return (int(meta["stage_index"]), int(meta["step"]), bool(meta["stage_done"]))


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and not path.name.startswith(".") and (path / "meta.json").is_file() and (path / "state.pt").is_file():
            found.append((_order(read_json(path / "meta.json", "checkpoint meta")), path))
    return [path for _, path in sorted(found)]


def _prune(root: Path, keep: int, protect: str) -> None:
    checkpoints = list_checkpoints(root.parent)
    for path in checkpoints[: max(len(checkpoints) - keep, 0)]:
        if path.name != protect:
            shutil.rmtree(path)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest.json`` names (or the newest complete one if that file is missing)."""
    root = checkpoint_dir(run_dir)
    pointer = root / "latest.json"
    if pointer.is_file():
        path = root / str(read_json(pointer, "checkpoint pointer")["tag"])
        if (path / "state.pt").is_file():
            return path
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def load_checkpoint(path: str | os.PathLike) -> CheckpointState:
    """Read a checkpoint directory written by :func:`save_checkpoint`."""
    file = Path(path) / "state.pt"
    if not file.is_file():
        raise HeadscopeError(f"checkpoint {path} has no state.pt")
    payload = torch.load(file, map_location="cpu", weights_only=True)
    if payload.pop("format", None) != FORMAT_VERSION:
        raise HeadscopeError(f"checkpoint {path} was written by another version of headscope transfer")
    return CheckpointState(**payload)
