#!/usr/bin/env bash
# Source this on a lent GPU box (no internet): installs the wheels carried in .whl/ and headscope itself
# into /tmp/site (run scripts by path, not `python -c` from the repo root, whose headscope/ would shadow it), leaving the box's own torch/triton/transformers untouched.
#   . benchmarks/gpu_setup.sh && python benchmarks/scoring_speed.py
# The box has torch, triton, transformers, tokenizers, einops, pandas; fetch the rest here first (git-ignored .whl/):
#   bash benchmarks/gpu_gguf.sh wheels     (or `prepare`: the wheels and the real SmolLM2's GGUF in parts a call can carry)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site . || return 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
(cd /tmp && python3 -c "import torch, headscope.kernels; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())")
