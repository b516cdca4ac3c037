#!/usr/bin/env bash
# nanochat-jax end to end: tokenizer, pretraining (and, as they land, the later stages).
#
#   bash speedrun_jax.sh [--preset cpu] [--run-dir DIR]
#
# Resumable: a rerun skips the stages already finished (markers in <run-dir>/.done) and a stopped
# pretraining run continues from its last checkpoint. Everything is logged to <run-dir>/speedrun.log;
# the script stops at the first failing stage with its message.
set -euo pipefail
cd "$(dirname "$0")"

preset=""
run_dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) preset="$2"; shift 2 ;;
    --run-dir) run_dir="$2"; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "speedrun_jax.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
preset="${preset:-cpu}"
case "$preset" in
  cpu) ;;
  *) echo "speedrun_jax.sh: preset '$preset' is not available yet; presets: cpu" >&2; exit 2 ;;
esac
run_dir="${run_dir:-runs/$preset}"
mkdir -p "$run_dir/.done"
log="$run_dir/speedrun.log"

command -v uv >/dev/null || python3 -m pip install --quiet uv
uv sync --quiet

stage() {  # stage NAME [FLAGS...]: run once; a finished stage is skipped on reruns
  local name="$1"; shift
  if [ -e "$run_dir/.done/$name" ]; then echo "== $name: already done, skipped" | tee -a "$log"; return; fi
  echo "== $name $*" | tee -a "$log"
  if ! uv run python -m launch.stage "$name" --run-dir "$run_dir" "$@" 2>&1 | tee -a "$log"; then
    echo "speedrun_jax.sh: stage '$name' failed; see $log. Rerun to continue from here." >&2
    exit 1
  fi
  touch "$run_dir/.done/$name"
}

# The cpu preset: the built-in Wikipedia corpus, a 3-layer model, a few minutes on a laptop CPU.
stage tok --vocab-size 4096
stage tok_eval
stage base --depth 3 --head-dim 64 --window-pattern L --max-seq-len 256 --device-batch-size 16 \
  --total-batch-size 4096 --num-iterations 150 --warmup-steps 10 --eval-every 50 --eval-tokens 32768 \
  --save-every 50 --resume
echo "== done: $run_dir" | tee -a "$log"
echo "chat with it: uv run python -m launch.stage chat_cli --run-dir $run_dir -i base"
