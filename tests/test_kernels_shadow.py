"""The repository's ``kernels/`` (``headscope.kernels``) must not shadow an installed top-level ``kernels``
package (Hugging Face's, which transformers >= 5.25 imports) when Python starts in the repository root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}  # after the root: `python -c` puts the working directory first
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_top_level_kernels_from_the_checkout_is_the_installed_package(tmp_path):
    package = tmp_path / "site" / "kernels"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("MARK = 'installed'\n")
    (package / "sub" / "__init__.py").write_text("SUB = 1\n")
    code = ("import sys, kernels, kernels.sub, headscope.kernels, headscope.kernels.gdn.naive as naive\n"
            "print(kernels.MARK, kernels.sub.SUB, sys.modules['kernels'] is kernels, headscope.kernels.__name__, naive.__name__)")
    done = _run(code, tmp_path / "site")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["installed", "1", "True", "headscope.kernels", "headscope.kernels.gdn.naive"]


def test_transformers_models_import_from_the_checkout(tmp_path):
    (tmp_path / "empty").mkdir()
    done = _run("from transformers import GPT2LMHeadModel, LlamaForCausalLM; print('ok')", tmp_path / "empty")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
