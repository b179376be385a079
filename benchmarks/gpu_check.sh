#!/usr/bin/env bash
# Issue 12's GPU check ("Fast"), one command for a GPU machine (the device tool): the gpu profile of
# `make bench`, then a short ViT-S/16 and ResNet50 training run at 224 px on GPU-resident data, then, when time
# is left, torch.compile of ViT-B/16. Results go under $OUT (the device tool's output folder; here, without it,
# benchmarks/results/gpu-check). The whole script stops itself within 470 s.
#
#   before (on this machine, once): mkdir -p .bench-data && cp /usr/share/datasets/fashion-mnist/*.gz .bench-data/
#                                   && echo /.bench-data/ >> .git/info/exclude
#   run:    device run, command "bash benchmarks/gpu_check.sh", carry [".bench-data"], timeout_s 540
#   after:  copy $OUT/*.csv to benchmarks/results/ and commit them with the numbers in benchmarks/RESULTS.md
#   dry run of the script's logic on a CPU (measures nothing):
#           ALLOW_CPU=1 TRAIN_STEPS=20 BENCH_ARGS="--quick --models vit_tiny_p4 --img-size 28 --in-chans 1" \
#           OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh
#
# Budget (seconds of wall time; each part is killed at its limit and the next still runs; the bench writes its
# CSV after every comparison, so a part cut short keeps what it measured):
#   environment    60   GPU, versions, the suite imports (the script stops here if it does not)
#   bench         280   python -m experiments.bench --profile gpu (what `make bench PROFILE=gpu` runs; make's
#                       install step needs the network, which that machine lacks)
#   train runs    100   --train-run 300: vit_s16 and resnet50, 300 steps of 256 each, resident data, test accuracy
#   compile      <=90   --only compile --models vit_b16, only when at least 60 s of the 470 are left
# Files under $OUT (at most 8): env.txt, bench.log, <device>.csv, train-run.log, <device>-train-run.csv,
# compile.log, compile/<device>.csv.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-check}
PY=${PY:-python3}
LIMIT=470
TRAIN_STEPS=${TRAIN_STEPS:-300}
read -r -a EXTRA <<< "${BENCH_ARGS:-}"  # appended to every bench command (the dry run above)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled

left() { echo $((LIMIT - SECONDS)); }
part() {  # part NAME SECONDS LOG COMMAND...: run COMMAND under a time limit, its output to LOG and stdout
  local name=$1 limit=$2 log=$3; shift 3
  local start=$SECONDS
  echo "=== $name (limit ${limit} s, $(left) s left)"
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$log"
  local code=${PIPESTATUS[0]}
  echo "=== $name: exit $code after $((SECONDS - start)) s$([ "$code" = 124 ] && echo ' (time limit)')"
  return "$code"
}

if compgen -G ".whl/*.whl" >/dev/null; then  # packages the machine lacks, carried as wheels (device README)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

part environment 60 "$OUT/env.txt" bash -c "
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY - <<'EOF'
import importlib, torch
for name in ('torch', 'torchvision', 'lightning', 'timm', 'torchmetrics', 'numpy'):
    print(name, importlib.import_module(name).__version__)
import os, sys
if torch.cuda.is_available():
    print('cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())
elif os.environ.get('ALLOW_CPU') != '1':
    sys.exit('no CUDA device')
import experiments.bench, experiments.train  # the suite imports (no wandb, no submitit needed)
EOF" || { echo "environment check failed: see $OUT/env.txt"; exit 1; }

if compgen -G ".bench-data/train-images-idx3-ubyte*" >/dev/null; then
  DATA=(--dataset fashion_mnist --data-dir .bench-data)
elif [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  DATA=(--dataset fashion_mnist)
else
  DATA=(--dataset synthetic)
  echo "no Fashion-MNIST (.bench-data not carried): the data comparison and training runs use 'synthetic'"
fi

part bench 280 "$OUT/bench.log" "$PY" -m experiments.bench --profile gpu --gpu-resident "${DATA[@]}" \
  --out-dir "$OUT" "${EXTRA[@]}"
part "train runs" 100 "$OUT/train-run.log" "$PY" -m experiments.bench --profile gpu --train-run "$TRAIN_STEPS" \
  --models vit_s16 resnet50 "${DATA[@]}" --out-dir "$OUT" "${EXTRA[@]}"
if [ "$(left)" -ge 60 ]; then
  budget=$(( $(left) - 10 < 90 ? $(left) - 10 : 90 ))
  part compile "$budget" "$OUT/compile.log" "$PY" -m experiments.bench --profile gpu --only compile \
    --models vit_b16 --out-dir "$OUT/compile" "${EXTRA[@]}"
else
  echo "=== compile: skipped, $(left) s left"
fi

echo "=== done in $SECONDS s; rows with a goal:"
grep -h -e ',yes,' -e ',no,' "$OUT"/*.csv | cut -d, -f7-10,20,25-28 || true  # comparison..mode, img/s, mfu..goal
