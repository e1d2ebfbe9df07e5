#!/usr/bin/env bash
# The accelerator figures of experiments/RESULTS.md in one script, for a
# session lent a GPU for a few minutes (run it once, from the repository
# root, on the device machine):
#
#   bash experiments/gpu_figures.sh OUT              # the figures
#   SMOKE=1 bash experiments/gpu_figures.sh OUT      # every step, tiny (CPU)
#
# Steps: bench_step with the held-out batch equal to and a quarter of the
# training batch (exact HPO) and with online HPO; bench_nas; bench_augment at
# 32 and 224 px; a DHA run on the CIFAR-10 zip ($DHA_CIFAR10_ZIP, or the
# default of experiments/paths.py) stopped after DHA_SECONDS (SIGTERM: it
# saves and its metrics.jsonl holds the step rate and the loss).
# OUT/<step>.log holds each step's output and OUT/<step>.json its last line
# (the benchmarks' JSON); OUT/status.txt the exit status of every step. A
# step that fails is recorded and the next one still runs.
set -u
OUT=${1:?usage: gpu_figures.sh OUT}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # it stays the same folder after the cd below
: > "$OUT/status.txt"
cd "$(dirname "$0")/.."

if [ "${SMOKE:-0}" = 1 ]; then
  NET=(--channels 4 --layers 2 --batch 8 --size 8 --steps 2)
  QUARTER=2
  AUGMENT=(--batch-size 8 --repeats 1 --sizes 16)
  DHA=(--config.dataset.max_train_examples=64 --config.dataset.image_size=8
       --config.model.channels=4 --config.model.layers=2 --config.batch_size=8
       --config.num_train_steps=4 --config.nas.search_epochs=1
       --config.log_every_steps=2)
  DHA_SECONDS=${DHA_SECONDS:-240}
else
  # The DARTS search network of the paper's CIFAR-10 setting, one device.
  NET=(--channels 16 --layers 8 --batch 64 --size 32 --steps 20)
  QUARTER=16
  AUGMENT=(--batch-size 256 --repeats 10 --sizes 32,224)
  DHA=(--config.dataset.max_train_examples=10000
       --config.dataset.image_size=32 --config.model.channels=16
       --config.model.layers=8 --config.batch_size=64
       --config.num_train_steps=2000 --config.nas.search_epochs=4
       --config.log_every_steps=20)
  DHA_SECONDS=${DHA_SECONDS:-300}
fi

step() {  # step NAME COMMAND...: runs it, records its status and JSON line
  local name=$1
  shift
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name $rc" >> "$OUT/status.txt"
  tail -n 1 "$OUT/$name.log" > "$OUT/$name.json"
  echo "[$(date +%T)] $name: exit $rc"
}

python -c 'import jax; print(jax.devices())' > "$OUT/devices.txt" 2>&1
step bench_step_exact_equal python -m experiments.bench_step "${NET[@]}" \
  --hpo-mode exact --hpo-batch 0
step bench_step_exact_quarter python -m experiments.bench_step "${NET[@]}" \
  --hpo-mode exact --hpo-batch "$QUARTER"
step bench_step_online python -m experiments.bench_step "${NET[@]}" \
  --hpo-mode online
step bench_nas python -m experiments.bench_nas "${NET[@]}"
step bench_augment python -m experiments.bench_augment "${AUGMENT[@]}"

CIFAR=${DHA_CIFAR10_ZIP:-$(python -c 'from experiments import paths; print(paths.CIFAR10_ZIP)')}
if [ -f "$CIFAR" ]; then
  # SIGTERM after DHA_SECONDS: the run saves its step and exits 143.
  step cifar10_dha timeout -s TERM "$DHA_SECONDS" python -m dha_jax.main \
    --config=configs/default.py --workdir="$OUT/cifar10_dha" \
    --config.dataset.source=image_folder --config.dataset.path="$CIFAR" \
    --config.preprocess.flip=True "${DHA[@]}"
else
  echo "cifar10_dha skipped: no CIFAR-10 zip at $CIFAR" | tee -a "$OUT/status.txt"
fi
