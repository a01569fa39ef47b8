"""Where headscope's bundled data lives: the haystack text and the demo model.

In a source checkout (``pip install -e .`` or running from the repository) that is the top-level
``data/`` folder beside ``headscope/``; a regular install (``pip install .``) copies the same files into
the package as ``headscope/_data`` (pyproject maps ``headscope._data`` to ``data/``).
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def data_dir() -> Path:
    """The bundled data folder: the checkout's ``data/`` if present, else the installed ``headscope/_data``.

    Returns:
        The folder holding ``haystack/`` and ``models/`` (it may lack either if they were not shipped).
    """
    checkout = _PACKAGE_DIR.parent / "data"
    if (checkout / "haystack").is_dir():
        return checkout
    return _PACKAGE_DIR / "_data"
