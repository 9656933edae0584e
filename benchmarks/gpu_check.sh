#!/usr/bin/env bash
# The GPU check in two parts, each one device call (a lease is 15 minutes in all, the
# machine's start included, so the parts' time limits add up to about 13):
#     bash benchmarks/gpu_check.sh correctness   # the whole suite, every CLI command (<= ~5.5 min)
#     bash benchmarks/gpu_check.sh speed         # bench_train, bench_command, bench_host (<= ~8 min;
#                                                # what matters most runs first)
# (no argument: both). Needs the project installed (README, with its dev extra). For a machine
# with Python and torch but no package index, run `python benchmarks/gpu_wheels.py` where pip
# reaches one and carry the .whl/ it fills: finding it, this script installs those wheels
# (pip --target /tmp/site, on PYTHONPATH) and pyro_vae (without build isolation: offline, pip
# cannot fetch setuptools into one) before it starts. Writes its logs under
# ${OUT:-gpu-check}/ and prints a summary. Correctness comes first: timings taken beside the
# suite would be worthless, and the suite is what resolves the CUDA issue.
set -u
OUT=${OUT:-gpu-check}; mkdir -p "$OUT"; R=${RUNS:-/tmp/gpu-check-runs}; mkdir -p "$R"
export PYTHONUNBUFFERED=1
PART=${1:-all}
case $PART in correctness|speed|all) ;;
  *) echo "gpu_check.sh: part '$PART' is not one of: correctness, speed, all" >&2; exit 2 ;; esac
if compgen -G ".whl/*.whl" > /dev/null; then  # gpu_wheels.py's kit, carried to this machine
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "gpu_check.sh: the kit in .whl/ did not install" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || { echo "gpu_check.sh: pyro_vae did not install (pip install -e .)" >&2; exit 1; }
fi
command -v pyro-vae > /dev/null || { echo "gpu_check.sh: no pyro-vae command on PATH: install the project (README); on a machine without a package index, run python benchmarks/gpu_wheels.py where pip reaches one and carry the .whl/ it fills (device tool: carry [\".whl\"])" >&2; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.log"
python3 -c "import torch, pyro, arviz, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'pyro', pyro.__version__, 'arviz', arviz.__version__)" | tee -a "$OUT/env.log"
python3 -m pip check >> "$OUT/env.log" 2>&1 || echo "gpu_check.sh: pip check found conflicts (env.log)"

correctness() {  # the suite (12 workers, stopped at SUITE_S seconds) with every CLI command beside it
  timeout -s INT -k 20 "${SUITE_S:-300}" python3 -m pytest -p no:cacheprovider -p no:benchmark -n 12 \
    --dist loadfile -rfEs --durations=15 > "$OUT/suite.log" 2>&1 &
  local suite=$!
  local C="--points 2 --chains 2 --warmup 100 --draws 100 --iw-k 500 --ais-steps 50 --ais-chains 4 --fit-steps 300 --quiet"
  local end=$((SECONDS + ${SUITE_S:-300} + 30))  # the CLI commands end by then too (rc 124 if cut)
  cap() { local left=$((end - SECONDS)); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
  ( set -x
    timeout "$(cap 120)" pyro-vae train --name cli --runs-dir "$R" --quiet --set train.epochs=5; echo "rc $? (train)"
    timeout "$(cap 120)" pyro-vae evaluate "$R/cli" --k 100 --n 200 --device cuda; echo "rc $? (evaluate)"
    timeout "$(cap 120)" pyro-vae inspect "$R/cli"; echo "rc $? (inspect)"
    timeout "$(cap 120)" pyro-vae train --config mnist_conditional --set train.epochs=3 --name cond --runs-dir "$R" --quiet
    echo "rc $? (train conditional)"
    timeout "$(cap 60)" pyro-vae sample "$R/cond" --label 3 --n 16; echo "rc $? (sample --label)"
    for s in linear-gaussian ring; do  # side by side: each compare is mostly NUTS on one core
      (timeout "$(cap 300)" pyro-vae compare --setting $s $C --out "$R/cmp-$s"; echo "rc $? (compare $s)") &
    done
    timeout "$(cap 300)" pyro-vae compare --setting run --run "$R/cli" $C; echo "rc $? (compare run)"; wait
  ) > "$OUT/cli.log" 2>&1
  wait "$suite"; local rc=$?  # 124: stopped at SUITE_S, so not every test ran
  echo "suite rc $rc$([ $rc = 124 ] && echo ": stopped at SUITE_S=${SUITE_S:-300} s, NOT a full run")"
  tail -1 "$OUT/suite.log"; grep -E "^(FAILED|ERROR)|KeyboardInterrupt|Interrupted" "$OUT/suite.log" | head -30
  grep -a "^rc " "$OUT/cli.log"
}

speed() {  # bench_train's table and curve (the owed GPU rows) first, then the default command
  timeout 170 python3 benchmarks/bench_train.py --device cuda --epochs 3 --rounds 1 --phases eager \
    --networks "784-400-50 softplus" --batch-sizes 256 1024 4096 --skip jit --verbose \
    --png "$OUT/throughput.png" --peak-tflops 67 > "$OUT/bench.log" 2>&1
  echo "bench eager: rc $?" >> "$OUT/bench.log"
  grep -E "^\| [0-9]|^batch|rc " "$OUT/bench.log" | cut -c1-260
  timeout 170 python3 benchmarks/bench_command.py > "$OUT/command.log" 2>&1
  echo "bench_command: rc $?" >> "$OUT/command.log"
  grep -E "^(\||round|variant|bench_command)" "$OUT/command.log" | cut -c1-300
  timeout 100 python3 benchmarks/bench_train.py --device cuda --epochs 3 --rounds 1 --phases compiled \
    --networks "784-400-50 softplus" --batch-sizes 256 --skip meanfield+compile --verbose \
    > "$OUT/bench-compiled.log" 2>&1
  echo "bench compiled: rc $?" >> "$OUT/bench-compiled.log"
  grep -E "^\| [0-9]|^batch|rc " "$OUT/bench-compiled.log" | cut -c1-260
  timeout 45 python3 benchmarks/bench_host.py --rounds 3 > "$OUT/host.log" 2>&1  # this host's
  echo "bench_host: rc $?" >> "$OUT/host.log"; cat "$OUT/host.log"  # share of the eager rows above
}

case $PART in
  correctness) correctness ;;
  speed) speed ;;
  all) correctness; speed ;;
esac
