#!/bin/bash
# All experts resident: llama.cpp's default flags against fate-run, alternating, one line per run.
# usage: examples/allresident_vs_llama.sh LLAMA_BIN_DIR GGUF ARTIFACT [ARTIFACT ...]   (ROUNDS=3 by default)
set -euo pipefail
bin=$1 gguf=$2; shift 2
prompt="The history of the world is long and full of things that people remember and things they forget; tell me about it"
here=$(cd "$(dirname "$0")/.." && pwd)
fate_run=${FATE_RUN:-$here/.venv/bin/fate-run}
for round in $(seq "${ROUNDS:-3}"); do
  echo "round $round"
  "$bin/llama-bench" -m "$gguf" -p 0 -n 64 -t 2 -r 1 -o csv 2>/dev/null | tail -1 \
    | awk -F, '{gsub(/"/, "", $(NF-1)); print "llama.cpp", $(NF-1)}'
  for art in "$@"; do
    "$fate_run" "$art" --precision int4 --prompt "$prompt" -n 64 --greedy --ignore-eos --threads 2 --json 2>/dev/null \
      | python3 -c "import json, sys; print('$art', round(json.load(sys.stdin)['stats']['decode_tokens_per_s'], 1))"
  done
done
