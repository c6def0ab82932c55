#!/usr/bin/env bash
# The project's benchmarks on one GPU, each against transformers + PyTorch on the same GPU in the same process.
#
#   bash launch/gpu_bench.sh [OUT_DIR]     # default runs/gpu_bench: one JSON per stage, gpu_bench.log, stages.log
#
# Needs a Python with jax (CUDA), flax, optax, orbax-checkpoint, transformers, torch (CUDA) and numpy/pillow/yaml;
# skyjax is used from this checkout (PYTHONPATH), so nothing is installed. PYTHON picks the interpreter
# (default python3). Each stage is its own process with its own time limit, so one failing stage does not lose the
# others; a first smoke stage (imports, one jitted matmul on the GPU) stops everything at once if the stack is broken.
#
# Stages in the order they run (QUICK=1 makes the generate stages small, to try the script on a CPU):
#   rm_bf16         the reward-model train step at the benchmark config in bfloat16, with the GPU's bf16 matmul peak
#                   measured in the same run (the FLOP fraction)
#   rm_gpu          the reward-model train step, Qwen2-1.5B decoder + Qwen2.5-VL vision tower, bf16, MFU
#   generate_fp32   decode throughput, Qwen2 hidden 512 x 8 layers, batch 8, 128 new tokens, float32 (full precision)
#   generate_bf16   decode throughput as above in bfloat16
#   rm_fp32         the train step in float32 at full precision (+ the fp32 matmul peak); last, because with jax
#                   0.11.2 on an H100 its compile did not end within 170 s
#   rm_fp32_noautotune  (only when named in STAGES) the same with XLA_FLAGS=--xla_gpu_autotune_level=0: if this
#                   one compiles in time and rm_fp32 does not, autotuning the fp32 fusions is what takes the time
# STAGES="rm_fp32 rm_gpu" runs only those (in the order above).
set -u
OUT_DIR=${1:-${OUT:-runs/gpu_bench}}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # PyTorch shares the GPU in the same process
LOG="$OUT_DIR/gpu_bench.log"
: >"$LOG"
say() { echo "[$(date +%T)] $*" | tee -a "$LOG"; }

say "smoke: versions, devices, one jitted matmul"
if ! timeout 120 "$PY" - >>"$LOG" 2>&1 <<'EOF'
import importlib, json
vers = {}
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "transformers", "torch", "numpy", "grain"):
    try:
        vers[name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as e:  # grain is not needed by the benchmarks
        vers[name] = f"missing ({type(e).__name__})"
print(json.dumps(vers))
import jax, jax.numpy as jnp, torch
print("jax devices:", jax.devices(), "backend:", jax.default_backend())
print("torch cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
x = jnp.ones((1024, 1024), jnp.bfloat16)
print("matmul ok:", float(jax.jit(lambda a: a @ a)(x)[0, 0]))
import skyjax.bench, skyjax.train.bench, skyjax.sample.bench, skyjax.sample.decode, skyjax.models.reward  # noqa
print("skyjax imports ok")
EOF
then
  say "smoke FAILED:"; tail -30 "$LOG"; exit 1
fi
tail -6 "$LOG"

STAGES=" ${STAGES:-rm_bf16 rm_gpu generate_fp32 generate_bf16 rm_fp32} "
stage() {  # stage NAME LIMIT_S ARGS...
  local name=$1 limit=$2; shift 2
  [[ "$STAGES" == *" $name "* ]] || return 0
  say "stage $name (limit ${limit}s): ${XLA_FLAGS:+XLA_FLAGS=$XLA_FLAGS }skyjax bench $*"
  local t0=$SECONDS
  local log="$OUT_DIR/stages.log"  # every stage's full output, one after another (few files to copy back)
  echo "===== $name: skyjax bench $*" >>"$log"
  local before; before=$(wc -l <"$log")
  timeout "$limit" "$PY" -m skyjax.cli bench --out "$OUT_DIR/$name.json" "$@" >>"$log" 2>&1
  local rc=$?
  say "stage $name: exit $rc after $((SECONDS - t0))s"
  tail -n +"$((before + 1))" "$log" | grep -v "Writing model shards\|it/s]" | tail -n 15 | tee -a "$LOG"
}

stage rm_bf16 110 --only matmul,rm_train_step matmul.dtype=bfloat16 matmul.n=8192 rm_train_step.dtype=bfloat16
stage rm_gpu 210 --only rm_train_step_gpu
stage generate_fp32 110 --only generate ${QUICK:+--quick}
stage generate_bf16 80 --only generate generate.dtype=bfloat16 ${QUICK:+--quick}
stage rm_fp32 170 --only matmul,rm_train_step matmul.n=8192
XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_autotune_level=0" \
  stage rm_fp32_noautotune 170 --only matmul,rm_train_step matmul.n=8192
say "done"
