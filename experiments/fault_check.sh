#!/usr/bin/env bash
# Faults and bad input, end to end from the command line; one line per case,
# "ok" or "FAILED". Tiny digits runs (a few minutes in all on a CPU).
# Usage: bash experiments/fault_check.sh [SCRATCH_DIR]   (from the repo root)
set -u
DIR=${1:-$(mktemp -d)}
mkdir -p "$DIR"
TINY="--config=configs/default.py --config.dataset.image_size=8 \
--config.dataset.max_train_examples=40 --config.dataset.max_test_examples=16 \
--config.dataset.val_ratio=0.25 --config.model.channels=4 \
--config.model.layers=2 --config.batch_size=8 --config.eval_batch_size=16 \
--config.mode=train --config.log_every_steps=2"
FAILED=0
report() {  # report NAME CONDITION-EXIT-STATUS DETAIL
  if [ "$2" -eq 0 ]; then echo "ok      $1: $3"; else echo "FAILED  $1: $3"; FAILED=1; fi
}
summary() { python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print(s['test_accuracy'], s['test_loss'])" "$1"; }

# 1. A rejected command leaves nothing behind; the corrected one then runs.
W=$DIR/rejected
python -m dha_jax.main $TINY --workdir=$W --config.batch_size=0 > $DIR/rejected1.log 2>&1
rc1=$?
python -m dha_jax.main $TINY --workdir=$W --config.num_train_steps=4 > $DIR/rejected2.log 2>&1
rc2=$?
[ $rc1 -ne 0 ] && [ $rc2 -eq 0 ] && ! grep -q Traceback $DIR/rejected1.log
report "rejected config, corrected rerun" $? "exit $rc1 with '$(grep -m1 '^error:' $DIR/rejected1.log | cut -c1-90)', then exit $rc2"

# 2. A NaN is never saved; the message names the step and the checkpoint kept.
W=$DIR/nan
python -m dha_jax.main $TINY --workdir=$W --config.optimizer.learning_rate=1e6 \
  --config.checkpoint_every_steps=2 --config.log_every_steps=8 \
  --config.num_train_steps=10 > $DIR/nan.log 2>&1
rc=$?
python3 - "$W" <<'EOF'
import os, sys, numpy as np, orbax.checkpoint as ocp
root = os.path.join(sys.argv[1], 'checkpoints')
for step in os.listdir(root):
  tree = ocp.StandardCheckpointer().restore(os.path.join(root, step, 'state'))
  import jax
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.inexact)), step
EOF
finite=$?
[ $rc -eq 1 ] && [ $finite -eq 0 ] && ! grep -q Traceback $DIR/nan.log
report "NaN never checkpointed" $? "exit $rc, checkpoints $(ls $W/checkpoints | tr '\n' ' ')all finite; $(grep -m1 '^error:' $DIR/nan.log | cut -c1-110)"

# 3. A damaged newest checkpoint is set aside; an older one resumes the run.
W=$DIR/damaged
python -m dha_jax.main $TINY --workdir=$W --config.num_train_steps=8 \
  --config.checkpoint_every_steps=4 > $DIR/damaged1.log 2>&1
before=$(summary $W/summary.json)
rm $W/summary.json
BIG=$(find $W/checkpoints/8 -type f -printf '%s %p\n' | sort -n | tail -1 | cut -d' ' -f2)
truncate -s 10 "$BIG"
python -m dha_jax.main $TINY --workdir=$W --config.num_train_steps=8 \
  --config.checkpoint_every_steps=4 > $DIR/damaged2.log 2>&1
rc=$?
after=$(summary $W/summary.json)
[ $rc -eq 0 ] && [ -d $W/damaged_checkpoints/8 ] && [ "$before" = "$after" ]
report "damaged newest checkpoint" $? "exit $rc, set aside: $(ls $W/damaged_checkpoints), test acc/loss $before -> $after"

# 4. SIGTERM saves the current step and exits 143; the rerun resumes and
#    ends as the uninterrupted run.
A=$DIR/sigterm_once; B=$DIR/sigterm
STEPS="--config.num_train_steps=3000 --config.checkpoint_every_steps=100000 --config.log_every_steps=50"
python -m dha_jax.main $TINY $STEPS --workdir=$A > $DIR/sigterm_once.log 2>&1
python -m dha_jax.main $TINY $STEPS --workdir=$B > $DIR/sigterm1.log 2>&1 &
PID=$!
while [ ! -s $B/metrics.jsonl ]; do sleep 0.2; done
kill -TERM $PID; wait $PID
rc1=$?
saved=$(ls $B/checkpoints)
python -m dha_jax.main $TINY $STEPS --workdir=$B > $DIR/sigterm2.log 2>&1
rc2=$?
[ $rc1 -eq 143 ] && [ $rc2 -eq 0 ] && [ "$(summary $A/summary.json)" = "$(summary $B/summary.json)" ] && ! grep -q Traceback $DIR/sigterm1.log
report "SIGTERM, then resume" $? "exit $rc1 ($(grep -m1 '^error:' $DIR/sigterm1.log | cut -c8-60)), checkpoint $saved, rerun exit $rc2, test acc/loss $(summary $B/summary.json) vs uninterrupted $(summary $A/summary.json)"

# 5. A misspelt field: one line, exit 2.
python -m dha_jax.main $TINY --workdir=$DIR/typo --config.batchsize=8 > $DIR/typo.log 2>&1
rc=$?
[ $rc -eq 2 ] && [ $(wc -l < $DIR/typo.log) -le 2 ]
report "misspelt field" $? "exit $rc: $(head -1 $DIR/typo.log)"

echo "logs in $DIR"
exit $FAILED
