#!/usr/bin/env bash
# The GPU check, in one run (about 9 minutes: one 10-minute device call): the whole suite on
# the GPU, every CLI command, and the GPU speed table with its batch-size curve. Needs the project installed
# (README) and pytest-xdist; writes everything under ${OUT:-gpu-check}/.
#     bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-gpu-check}; mkdir -p "$OUT"; R=$(mktemp -d); export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.log"
python3 -c "import torch, pyro, arviz, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'pyro', pyro.__version__, 'arviz', arviz.__version__)" | tee -a "$OUT/env.log"
# the default command three ways (train.compile alone was timed on 2026-11-30: 43 s)
for mode in "compile=false" "cuda_graph=true" "cuda_graph=true compile=true"; do
  start=$SECONDS; name=$(echo $mode | tr ' =' '_-'); sets=()
  for m in $mode; do sets+=(--set "train.$m"); done
  timeout 120 pyro-vae train --name "$name" --runs-dir "$R" --quiet "${sets[@]}" \
    >> "$OUT/train.log" 2>&1
  echo "train $mode: rc $?, wall $((SECONDS - start)) s" >> "$OUT/train.log"
  tail -1 "$R/$name/metrics.jsonl" >> "$OUT/train.log"
done
timeout 150 python3 benchmarks/bench_train.py --device cuda --epochs 3 --rounds 1 --phases eager \
  --networks "784-400-50 softplus" --batch-sizes 256 1024 4096 --png "$OUT/throughput.png" \
  --peak-tflops 67 > "$OUT/bench.log" 2>&1
timeout 90 python3 benchmarks/bench_train.py --device cuda --epochs 3 --rounds 1 --phases compiled \
  --networks "784-400-50 softplus" --batch-sizes 256 --skip meanfield+compile \
  >> "$OUT/bench.log" 2>&1
# what is left of the 9 minutes goes to the suite, with the CLI commands beside it
timeout -s INT $((SECONDS < 480 ? 540 - SECONDS : 60)) python3 -m pytest -p no:cacheprovider -p no:benchmark -n 8 --dist loadfile -rfEs --durations=15 \
  > "$OUT/suite.log" 2>&1 &
C="--points 2 --chains 2 --warmup 100 --draws 100 --iw-k 500 --ais-steps 50 --ais-chains 4 --quiet"
( set -x
  timeout 120 pyro-vae evaluate "$R/compile-false" --k 100 --n 200 --device cuda; echo "rc $?"
  timeout 120 pyro-vae inspect "$R/compile-false"; echo "rc $?"
  timeout 120 pyro-vae train --config mnist_conditional --set train.epochs=3 --name cond --runs-dir "$R" --quiet
  timeout 60 pyro-vae sample "$R/cond" --label 3 --n 16; echo "rc $?"
  for s in linear-gaussian ring; do  # side by side: each compare is mostly NUTS on one core
    (timeout 240 pyro-vae compare --setting $s $C --out "$R/cmp-$s"; echo "rc $? ($s)") &
  done
  timeout 240 pyro-vae compare --setting run --run "$R/compile-false" $C; echo "rc $? (run)"; wait
) > "$OUT/cli.log" 2>&1
wait
tail -1 "$OUT/suite.log"; grep -c "^rc 0" "$OUT/cli.log"; grep "^| 256 |" "$OUT/bench.log"
