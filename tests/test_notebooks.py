"""Every notebook under notebooks/ executes top to bottom (so none can rot), cleanly: no error, no warning
in its output (e.g. tqdm's "IProgress not found"), and no scratch folder left in the temporary directory."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ has no .ipynb files"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_STANDIN", "1")  # 05 runs its tiny stand-in even where SmolLM2 is cached (CPU time)
    notebook = nbformat.read(path, as_version=4)
    scratch = tmp_path / "tmp"  # the kernel's TMPDIR: what the notebook leaves in it stays visible here
    scratch.mkdir()
    # The kernel runs this interpreter (ipykernel's built-in spec), inside a scratch working directory.
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path / "cwd")}})
    (tmp_path / "cwd").mkdir()
    client.execute(env={**os.environ, "TMPDIR": str(scratch)})
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out.output_type == "error"]
    warnings = [out.text for out in outputs if out.output_type == "stream" and out.name == "stderr" and "Warning" in out.text]
    assert not warnings, warnings
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("headscope-")], "the notebook left its scratch folder"
    assert not list((tmp_path / "cwd").iterdir()), "the notebook wrote into its working directory"
