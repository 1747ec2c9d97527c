#!/usr/bin/env bash
# The accelerator checks of a device session in one call: the numerics tests first, then the
# timings; each part under its own `timeout`, its log and JSON under $OUT.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh        # on the accelerator machine
#   SMALL=1 bash benchmarks/gpu_check.sh              # smoke-size run (try it on a CPU first)
#   PARTS="memory model" bash benchmarks/gpu_check.sh  # only these parts (a second call)
#
# The golden tests need the crate's trajectories in shared/golden/rlx_optim inside the checkout
# (or RLX_OPTAX_GOLDEN_DIR); they skip, saying so, without them. Copy benchmarks/out/gpu/*.json
# back and fold the figures into benchmarks/RESULTS.md (`python -m benchmarks.run
# --report-only` renders a `model_<backend>` payload as its own subsection).
set -u
OUT=${OUT:-benchmarks/out/gpu}
PY=${PY:-python}
mkdir -p "$OUT"
export RLX_OPTAX_BENCH_OUT="$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
small=${SMALL:+--small}
size=gpu
if [ -n "${SMALL:-}" ]; then size=small; fi

part() {  # part NAME SECONDS COMMAND...: run one part, keep going whatever it returns
  local name=$1 limit=$2
  shift 2
  if [ -n "${PARTS:-}" ] && [[ " $PARTS " != *" $name "* ]]; then return; fi
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "$name rc=$?" | tee -a "$OUT/summary.txt"
  tail -n 5 "$OUT/$name.log"
}

"$PY" -c "import jax; print('backend', jax.default_backend(), jax.devices())" | tee "$OUT/summary.txt"
# numerics: crate parity, the shared kernels, the precision policy, 8- and 4-bit state
part tests 300 "$PY" -m pytest -q -p no:cacheprovider -m "not slow" \
  tests/test_golden.py tests/test_kernels.py tests/test_linalg_eigen.py \
  tests/test_linalg_orth.py tests/test_precision.py tests/test_lowbit.py tests/test_lowbit4.py
# state bytes per parameter and the peak of a donated step, every family and storage (64
# compilations); the step time of low-precision state (AdamW: its four storages and the four
# XLA floors of its 8-bit step); then the model benchmark (every family, accelerator-sized)
part memory 150 "$PY" -m benchmarks.memory --precision $small
part precision_speed 150 "$PY" -m benchmarks.precision_speed --rounds 7 --size "$size" --only adamw
part model 240 "$PY" -m benchmarks.model --rounds 2 $small
ls "$OUT"
