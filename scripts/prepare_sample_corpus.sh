#!/usr/bin/env bash
# Quick-start corpus that needs no download: this machine's Python standard library
# sources (sorted, tests and site-packages left out, capped at MAX_MB of text), one
# file per document, tokenized with a byte-level BPE trained on them.
#
# Writes OUTPUT_DIR/stdlib.jsonl, OUTPUT_DIR/stdlib_text_document.{bin,idx} and
# OUTPUT_DIR/stdlib_tokenizer.json; does nothing when those exist already.
# Train on it with: --data-path OUTPUT_DIR/stdlib_text_document
#                   --tokenizer-type HuggingFaceTokenizer --tokenizer-model OUTPUT_DIR/stdlib_tokenizer.json
set -euo pipefail

usage="usage: $0 [OUTPUT_DIR (default data)]   env: VOCAB_SIZE (4096) MAX_MB (8) WORKERS (2) PYTHON (python3)"
case "${1:-}" in
    -h|--help) echo "$usage"; exit 0 ;;
    -*) echo "$usage" >&2; exit 2 ;;
esac
[[ $# -le 1 ]] || { echo "$usage" >&2; exit 2; }

out_dir="${1:-data}"
vocab_size="${VOCAB_SIZE:-4096}"
max_mb="${MAX_MB:-8}"
workers="${WORKERS:-2}"
python="${PYTHON:-python3}"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix="$out_dir/stdlib"

if [[ -f "${prefix}_text_document.bin" && -f "${prefix}_text_document.idx" && -f "${prefix}_tokenizer.json" ]]; then
    echo "sample corpus already prepared: ${prefix}_text_document.{bin,idx}, ${prefix}_tokenizer.json"
    exit 0
fi
mkdir -p "$out_dir"

stdlib="$("$python" -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")"
echo "collecting up to ${max_mb} MB of .py files from $stdlib"
"$python" - "$stdlib" "$((max_mb * 1000 * 1000))" "$prefix.jsonl" <<'EOF'
import json, pathlib, sys

stdlib, budget, output = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
files = sorted(p for p in stdlib.rglob("*.py") if not skip & set(p.relative_to(stdlib).parts))
used = count = 0
with open(output, "w", encoding="utf-8") as out:
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        size = len(text.encode("utf-8"))
        if used + size > budget:
            break
        out.write(json.dumps({"text": text}) + "\n")
        used += size
        count += 1
print(f"wrote {count} documents ({used / 1e6:.1f} MB) to {output}")
EOF

"$python" "$repo_root/scripts/preprocess_data.py" \
    --input "$prefix.jsonl" \
    --output-prefix "$prefix" \
    --json-keys text \
    --append-eod \
    --workers "$workers" \
    --log-interval 100 \
    --tokenizer-type HuggingFaceTokenizer \
    --vocab-size "$vocab_size"
