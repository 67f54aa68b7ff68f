#!/usr/bin/env bash
# The GPU checks and benchmarks as one run on a lent GPU machine (bench/README.md, "GPU").
#
# The machine has torch, transformers and pytest but not this project's other needs and
# no package index, and the bundled GGUF is too large to travel. Prepare both here first:
#   bench/gpu_prepare.sh        # wheels into .whl/, the bundled tokenizer into .gpu/tokenizer
# then run this script there with .whl and .gpu carried. Results land in $OUT.
# STAGES picks what runs (default: bench tests steps sampled, in this order; also
# attention, serve and profile); each has its own time limit.
set -u
OUT=${OUT:-/tmp/persona-gpu}
STAGES=${STAGES:-"bench tests steps sampled"}
mkdir -p "$OUT"
# recompiles: torch logs each recompile of the compiled step and why (the 2026-11-26 run's
# batch 8 took 80 s of wall time against 15 s for 32 and 128; a recompile is the suspect).
export PYTHONUNBUFFERED=1 PERSONA_DATA_DIR=/tmp/persona-data TORCH_LOGS=${TORCH_LOGS:-recompiles}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  nproc
  env | grep -E '^(TORCHINDUCTOR|TRITON|CUDA|PYTORCH)_' || true  # the image's own settings
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
bench() {  # $1: output name; the rest: extra options
  local name=$1; shift
  timeout "${BENCH_S:-270}" python3 -m persona bench engine --device cuda --batch 1,8,32,128 --tokens 128 \
    --tokenizer .gpu/tokenizer --json "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
  echo "$name rc=$? after ${SECONDS}s" | tee -a "$OUT/$name.log"
  cat "$OUT/$name.json"
}
for stage in $STAGES; do
  case $stage in
    # The headline numbers first (it also fills torch's compile cache for what follows).
    bench) bench bench_engine ;;
    sampled) BENCH_S=${SAMPLED_S:-150} bench bench_engine_sampled --sample ;;
    # A backlog of mixed-length requests, 128 at a time: continuous batching (rows taking
    # and freeing lanes) vs one batch at a time vs generate() batches.
    serve)
      timeout "${SERVE_S:-240}" python3 -m persona bench serve --device cuda --tokenizer .gpu/tokenizer --json \
        > "$OUT/bench_serve.json" 2> "$OUT/bench_serve.log"
      echo "serve rc=$? after ${SECONDS}s" | tee -a "$OUT/bench_serve.log"
      cat "$OUT/bench_serve.json" ;;
    # The compiled step with its attention as one Triton kernel (`auto` times it against the torch ops for layouts of 16 rows or more).
    attention) BENCH_S=${ATTENTION_S:-200} bench bench_engine_triton_attention --attention triton ;;
    tests)
      timeout "${TESTS_S:-300}" python3 -m pytest -q -p no:cacheprovider --noconftest -c /dev/null --rootdir . \
        tests/test_gpu_decoder.py tests/test_decode_kernels.py > "$OUT/gpu_tests.log" 2>&1
      echo "gpu tests rc=$? after ${SECONDS}s" | tee -a "$OUT/gpu_tests.log" ;;
    # Host-bound or GPU-bound between steps: the engine under torch's profiler.
    profile)
      timeout "${PROFILE_S:-200}" python3 bench/gpu_profile.py --tokenizer .gpu/tokenizer \
        > "$OUT/gpu_profile.json" 2> "$OUT/gpu_profile.log"
      echo "gpu profile rc=$? after ${SECONDS}s" | tee -a "$OUT/gpu_profile.log"
      tail -n 1 "$OUT/gpu_profile.json" ;;
    steps)
      # One JSON line per finished variant (each the report so far), so a cut run keeps them.
      timeout "${STEPS_S:-240}" python3 bench/gpu_steps.py ${STEPS_VARIANTS:+--variants "$STEPS_VARIANTS"} \
        > "$OUT/gpu_steps.json" 2> "$OUT/gpu_steps.log"
      echo "gpu steps rc=$? after ${SECONDS}s" | tee -a "$OUT/gpu_steps.log"
      tail -n 1 "$OUT/gpu_steps.json" ;;
  esac
done
