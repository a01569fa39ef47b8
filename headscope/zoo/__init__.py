"""The bundled demo model: corpus generator, tokenizer and training recipe.

``DEMO_MODEL_DIR`` is where the repository keeps the trained demo model (``data/models/headscope-demo``,
a small Qwen3 trained by ``python -m headscope.zoo.train_demo``); ``demo_model_path()`` returns it and
says how to train it when it is missing.
"""

from __future__ import annotations

from pathlib import Path

from headscope.heads import HeadscopeError
from headscope.resources import data_dir

DEMO_MODEL_DIR = data_dir() / "models" / "headscope-demo"
TRAIN_COMMAND = "python -m headscope.zoo.train_demo --out data/models/headscope-demo --minutes 6.5 --seed 0 --compile"


def demo_model_path() -> Path:
    """The demo model's directory.

    Returns:
        ``DEMO_MODEL_DIR`` (it holds ``config.json``, ``model.safetensors`` and the tokenizer).
    Raises:
        HeadscopeError: if the directory has no trained model, naming the command that trains one.
    """
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (DEMO_MODEL_DIR / name).is_file():
            raise HeadscopeError(
                f"the demo model is missing ({DEMO_MODEL_DIR / name} not found); train it on a GPU with "
                f"`{TRAIN_COMMAND}` (about 8 minutes on one H100)"
            )
    return DEMO_MODEL_DIR


__all__ = ["DEMO_MODEL_DIR", "TRAIN_COMMAND", "demo_model_path"]
