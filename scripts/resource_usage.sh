#!/usr/bin/env bash
# Reads `cuobjdump --dump-resource-usage FILE` on stdin and prints one sorted line
# per (arch, kernel): arch REG STACK SHARED LOCAL kernel (demangled, parameters
# dropped), so two builds can be compared with diff (scripts/gpu_check.sh, setup.py's
# note on the split into csrc/cuda/inst/).
sed 's/^[[:space:]]*//' |
  awk '/^arch/{a=$3} /^Function/{f=$2; sub(":$","",f)} /^REG/{print a, $1, $2, $3, $4, f}' |
  { command -v c++filt >/dev/null && c++filt || cat; } |
  sed -E 's/cream::cuda:://g; s/cream:://g; s/\((EMParams|ContextParams)[^)]*\)//' | sort -u
