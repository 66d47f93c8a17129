#!/usr/bin/env bash
# The CLI path on the run of benchmarks/ann_smollm2.py: `influscope index` (finds the index the
# benchmark built and reuses it) → `influscope ann` (faiss-ivf, nlist ≈ 4√N) → `influscope query`
# exhaustive and `--ann faiss-ivf --nprobe <nlist>` (every list scanned): same top-10 expected.
#   benchmarks/ann_smollm2_cli.sh RUN [N_QUERIES=20]
set -euo pipefail
RUN=$1; NQ=${2:-20}
PY=${PY:-.venv/bin/python}
GGUF=${GGUF:-${INFLUSCOPE_ASSETS:-.cache/assets}/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
CLI="$PY -m influscope"
export INFLUSCOPE_PROGRESS=0 OMP_NUM_THREADS=1
head -n "$NQ" "$RUN/queries.jsonl" > "$RUN/queries-cli.jsonl"
common=(--model "$GGUF" --train "$RUN/train.jsonl" --run "$RUN")
t0=$(date +%s)
$CLI index "${common[@]}" --k-in 8 --k-out 8 --curvature identity --shard-size 256
t1=$(date +%s)
$CLI ann --run "$RUN" --backend faiss-ivf
NLIST=$($PY -c "import faiss,sys; print(faiss.read_index(sys.argv[1]).nlist)" "$RUN/index/index/ann/faiss-ivf.faiss")
t2=$(date +%s)
$CLI query "${common[@]}" --queries "$RUN/queries-cli.jsonl" --top-k 10 --out "$RUN/cli-exact.json" > /dev/null
t3=$(date +%s)
$CLI query "${common[@]}" --queries "$RUN/queries-cli.jsonl" --top-k 10 --ann faiss-ivf \
    --nprobe "$NLIST" --ann-k 100 --out "$RUN/cli-ann.json" > /dev/null
t4=$(date +%s)
$PY - "$RUN" "$NLIST" <<'PY'
import json, sys
run, nlist = sys.argv[1], sys.argv[2]
a = json.load(open(f"{run}/cli-exact.json"))["queries"]
b = json.load(open(f"{run}/cli-ann.json"))
same = sum([h["index"] for h in x["top"]] == [h["index"] for h in y["top"]] for x, y in zip(a, b["queries"]))
print(f"CLI: {same}/{len(a)} queries with the same top-10 (in order) from `query --ann faiss-ivf "
      f"--nprobe {nlist}` (nlist {nlist}) as from the exhaustive `query`; stage {b['stage']}, "
      f"candidates {b['candidates']}")
PY
echo "seconds: index (reuse) $((t1-t0)), ann $((t2-t1)), query exhaustive $((t3-t2)), query --ann $((t4-t3))"
