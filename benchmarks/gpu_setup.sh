#!/usr/bin/env bash
# Source this on a lent GPU box (no internet): installs the wheels carried in .whl/ and headscope itself
# into /tmp/site (run scripts by path, not `python -c` from the repo root, whose headscope/ would shadow it), leaving the box's own torch/triton/transformers untouched.
#   . benchmarks/gpu_setup.sh && python benchmarks/scoring_speed.py
# The box has torch, triton, transformers, tokenizers, einops, pandas; fetch the rest here first (git-ignored .whl/):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     flash-linear-attention==0.6.0 fla-core==0.6.0 plotly==7.1.0 transformer-lens==4.3.0 beartype==0.23.1 \
#     typeguard==4.6.0 fancy-einsum==0.0.3 gguf==0.19.0
# (benchmarks/gpu_gguf.sh prepare does this, and splits the real SmolLM2's GGUF into parts a call can carry)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site . || return 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
(cd /tmp && python3 -c "import torch, headscope.kernels; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())")
