#!/usr/bin/env bash
# Kills a run with SIGKILL after its step-80 checkpoint, resumes it, and
# compares it with an uninterrupted run of the same config.
# Usage: bash experiments/kill_resume.sh   (from the repository root)
set -u
F="--config=configs/default.py --config.mode=train --config.num_train_steps=160 --config.checkpoint_every_steps=40 --config.log_every_steps=20"
rm -rf /tmp/k_a /tmp/k_b
python -m dha_jax.main $F --workdir=/tmp/k_a > /tmp/k_a.log 2>&1
python -m dha_jax.main $F --workdir=/tmp/k_b > /tmp/k_b1.log 2>&1 &
PID=$!
while [ ! -d /tmp/k_b/checkpoints/80 ]; do sleep 0.5; done
kill -9 $PID; wait $PID 2>/dev/null
echo "killed after checkpoints: $(ls /tmp/k_b/checkpoints)"
python -m dha_jax.main $F --workdir=/tmp/k_b > /tmp/k_b2.log 2>&1
grep "Resumed" /tmp/k_b2.log | cut -c1-200
python3 -c "
import json
a=json.load(open('/tmp/k_a/summary.json')); b=json.load(open('/tmp/k_b/summary.json'))
print('uninterrupted', a['test_accuracy'], a['test_loss']); print('killed+resumed', b['test_accuracy'], b['test_loss'])
print('steps', [json.loads(l)['step'] for l in open('/tmp/k_b/metrics.jsonl')])"
