#!/usr/bin/env bash
# The Slurm scripts, run by Slurm: scripts/slurm-train.sbatch and scripts/slurm-ablate.sbatch
# submitted with sbatch to a one-node Slurm cluster this script starts on this machine (Debian's
# slurm-wlm and munge, installed if missing; a controller and a node daemon with four fake GPUs,
# GRES backed by empty files; all state under target/slurm-check). CPUs only: the jobs run with
# DEVICE=cpu and --gpus-per-node=0 / --gpus=0 on sbatch's command line.
#   sudo scripts/check-slurm.sh        # under a minute on 2 cores (once installed); prints PASS last
# Not in CI: it needs root and system packages. What it checks:
#   1. slurm-train.sbatch, one node x 2 tasks: both ranks meet through Slurm's variables
#      (--dist slurm) and train one run, whose losses match a one-process run of the same
#      batch (to the 4 decimals `icefm inspect` prints);
#   2. that job interrupted (scancel --signal=INT, as --signal=INT@300 sends before the time
#      limit): the ranks stop at one step, rank 0 saves, the job ends with exit code 130, and
#      submitted again it resumes the run to its end (exit code 0);
#   3. slurm-ablate.sbatch as a job array of 2 workers on one grid of 4 cells: every cell is
#      trained and scored once, by one worker or the other, and the results table has all 4;
#   4. `icefm ingest --shard slurm` as a job array numbered from 1 (docs/ingest.md): the last
#      shard to finish merges the manifests, and the store equals one process's, byte for byte
#      (but for the shard records).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
W=$ROOT/target/slurm-check
S=$W/slurm
ICEFM=$ROOT/target/release/icefm
HOST=$(hostname)

fail() {
    echo "FAIL: $*" >&2
    exit 1
}
[ "$(id -u)" = 0 ] || fail "run as root: it starts Slurm's daemons"
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
fi
cargo build --release -q -p icefm

# ---- A one-node cluster.
for p in "$S"/slurmd.pid "$S"/slurmctld.pid; do
    [ -f "$p" ] && kill "$(cat "$p")" 2>/dev/null || true
done
rm -rf "$W"
mkdir -p "$S"/state "$S"/spool "$S"/log
touch "$S"/gpu0 "$S"/gpu1 "$S"/gpu2 "$S"/gpu3
cat >"$S"/slurm.conf <<EOF
ClusterName=icefm-check
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
GresTypes=gpu
NodeName=$HOST CPUs=$(nproc) RealMemory=4000 Gres=gpu:4 State=UNKNOWN
PartitionName=check Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
echo "NodeName=$HOST Name=gpu File=$S/gpu[0-3]" >"$S"/gres.conf
export SLURM_CONF=$S/slurm.conf
started_munge=
if ! munge -n >/dev/null 2>&1; then
    started_munge=1
    mkdir -p /run/munge
    chown munge:munge /run/munge 2>/dev/null || true
    [ -f /etc/munge/munge.key ] || mungekey --create 2>/dev/null || create-munge-key -f
    munged --force
    munge -n >/dev/null || fail "munged did not start"
fi
stop_slurm() {
    for p in "$S"/slurmd.pid "$S"/slurmctld.pid; do
        [ -f "$p" ] && kill "$(cat "$p")" 2>/dev/null || true
    done
    [ -z "$started_munge" ] || pkill -x munged || true
}
trap stop_slurm EXIT
slurmctld -c -i
slurmd
for _ in $(seq 30); do
    [ "$(sinfo -h -o %t 2>/dev/null)" = idle ] && break
    sleep 1
done
[ "$(sinfo -h -o %t)" = idle ] || fail "the node is not idle: $(sinfo -h -o '%t %E')"
echo "slurm: one node ($HOST, $(nproc) CPUs, 4 fake GPUs), partition check"

# ---- A store of 4 scenes with a test regime and a ladder of two fine-tuning regimes.
"$ICEFM" synth --out "$W"/scenes --count 4 --kind rtt --size 256x256 >/dev/null 2>&1
"$ICEFM" ingest "$W"/scenes --store "$W"/store.zarr --levels 80,160 --patch 64 >/dev/null 2>&1
"$ICEFM" regime --store "$W"/store.zarr --name test --percent 25 --seed 7 --role test >/dev/null
"$ICEFM" regime --store "$W"/store.zarr --name ft --ladder 25,50 --exclude test >/dev/null

# A micro MAE: the tiny config with these keys replaced.
micro() {
    awk -v steps="$1" -v every="$2" '
        BEGIN { v["preset"] = "\"micro\""; v["decoder_dim"] = 8; v["decoder_depth"] = 1;
                v["decoder_heads"] = 2; v["levels"] = "\"80,160\""; v["crop"] = 32;
                v["batch_size"] = 4; v["jitter"] = 0; v["steps"] = steps; v["warmup_steps"] = 1;
                v["checkpoint_every"] = every; v["panel_every"] = 0 }
        match($0, /^[a-z_]+ *=/) { k = $1; if (k in v) { print k " = " v[k]; next } }
        { print }' "$ROOT"/configs/mae_vit_tiny.toml
}
micro 12 6 >"$W"/mae_micro.toml
micro 1500 500 >"$W"/mae_long.toml

submit_train() { # OUT CONFIG LOG [sbatch options…]
    local out=$1 config=$2 log=$3
    shift 3
    STORE=$W/store.zarr OUT=$out CONFIG=$config DEVICE=cpu PRECISION=f32 ICEFM=$ICEFM \
        sbatch --parsable --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --gpus-per-node=0 \
        --time=10 --output="$log" "$@" "$ROOT"/scripts/slurm-train.sbatch
}
# The loss line of `icefm inspect RUN`.
losses() { "$ICEFM" inspect "$1" | grep -o 'loss [0-9.]* (median of the last [0-9]*: [0-9.]*)'; }

# ---- 1. Two ranks through Slurm against one process.
submit_train "$W"/run_slurm "$W"/mae_micro.toml "$W"/train.log --wait >/dev/null
grep -q "rank 1 of 2: trained 12 steps (now at 12 of 12)" "$W"/train.log ||
    fail "rank 1 did not train: $(cat "$W"/train.log)"
grep -q "^trained 12 steps (now at 12 of 12)" "$W"/train.log ||
    fail "rank 0 did not train: $(cat "$W"/train.log)"
"$ICEFM" train --store "$W"/store.zarr --config "$W"/mae_micro.toml --out "$W"/run_one \
    --set train.precision=f32 --set data.threads=1 >/dev/null
a=$(losses "$W"/run_slurm)
b=$(losses "$W"/run_one)
[ -n "$a" ] && [ "$a" = "$b" ] || fail "2 ranks under Slurm: '$a'; one process: '$b'"
echo "1. slurm-train.sbatch, 2 tasks: $a, as one process"

# ---- 2. Interrupted, then submitted again.
job=$(submit_train "$W"/run_long "$W"/mae_long.toml "$W"/long-1.log)
for _ in $(seq 120); do
    [ "$(grep -c 'meeting the other ranks' "$W"/long-1.log 2>/dev/null)" = 2 ] && break
    sleep 0.5
done
sleep 3
scancel --signal=INT "$job"
for _ in $(seq 120); do
    squeue -h -j "$job" 2>/dev/null | grep -q . || break
    sleep 0.5
done
stopped=$(grep -o '^stopped after [0-9]* steps (now at [0-9]* of 1500)' "$W"/long-1.log) ||
    fail "the interrupted job did not stop with a checkpoint: $(cat "$W"/long-1.log)"
at=$(echo "$stopped" | sed 's/.*now at \([0-9]*\) of.*/\1/')
[ -d "$W/run_long/checkpoints/step_$(printf %07d "$at")" ] || fail "no checkpoint at step $at"
grep -q "rank 1 of 2: stopped after" "$W"/long-1.log || fail "rank 1 did not stop at a step"
# A stopped run is not a finished one: the job ends with 130 (an `afterok` chain must not go on).
exit_code() { scontrol show job "$1" | grep -o ' ExitCode=[0-9]*:[0-9]*' | head -1 | cut -d= -f2; }
[ "$(exit_code "$job")" = 130:0 ] || fail "the stopped job's exit code: '$(exit_code "$job")', not 130:0"
job2=$(submit_train "$W"/run_long "$W"/mae_long.toml "$W"/long-2.log --wait)
grep -q "now at 1500 of 1500" "$W"/long-2.log || fail "the job again: $(cat "$W"/long-2.log)"
[ "$(exit_code "$job2")" = 0:0 ] || fail "the finished job's exit code: '$(exit_code "$job2")', not 0:0"
"$ICEFM" inspect "$W"/run_long | grep -q "started again 1 time(s)" || fail "not resumed"
echo "2. interrupted at step $at (scancel --signal=INT), checkpoint saved, job exit 130; submitted again: 1500 of 1500, exit 0"

# ---- 3. An ablation grid by a job array of two workers.
mkdir -p "$W"/grid
cp "$ROOT"/tests/ablate/seg_micro.toml "$W"/grid/seg_micro.toml
cat >"$W"/grid/grid.toml <<EOF
version = 1
base = "seg_micro.toml"
mae = "$W/run_slurm"
test_regime = "test"
[grid]
regimes = ["ft_25", "ft_50"]
init = ["scratch", "mae"]
tasks = ["multi"]
levels = ["80"]
EOF
STORE=$W/store.zarr GRID=$W/grid/grid.toml OUT=$W/ablate DEVICE=cpu ICEFM=$ICEFM \
    sbatch --wait --array=0-1 --cpus-per-task=1 --gpus=0 --time=20 \
    --output="$W/ablate-%a.log" "$ROOT"/scripts/slurm-ablate.sbatch >/dev/null
for key in ft_25-scratch-multi-80 ft_25-mae-multi-80 ft_50-scratch-multi-80 ft_50-mae-multi-80; do
    n=$(cat "$W"/ablate-0.log "$W"/ablate-1.log | grep -c "$key: finished" || true)
    [ "$n" = 1 ] || fail "cell $key finished $n times: $(cat "$W"/ablate-*.log)"
done
[ -f "$W"/ablate/ablation.parquet ] || fail "no ablation.parquet"
w0=$(grep -c ": finished" "$W"/ablate-0.log || true)
w1=$(grep -c ": finished" "$W"/ablate-1.log || true)
echo "3. slurm-ablate.sbatch, array of 2: 4 cells, each once ($w0 by worker 0, $w1 by worker 1); ablation.parquet written"

# ---- 4. Sharded ingest by a job array.
"$ICEFM" ingest "$W"/scenes --store "$W"/one.zarr --levels 80,160 --patch 64 >/dev/null 2>&1
sbatch --wait --array=1-2 --cpus-per-task=1 --output="$W/ingest-%a.log" \
    --wrap "$ICEFM ingest $W/scenes --store $W/sharded.zarr --levels 80,160 --patch 64 --shard slurm" \
    >/dev/null
grep -q "the manifests are merged" "$W"/ingest-1.log "$W"/ingest-2.log ||
    fail "no shard merged the manifests: $(cat "$W"/ingest-*.log)"
for k in 0 1; do
    [ -f "$W/sharded.zarr/manifests/shards/$k-of-2.json" ] || fail "no record of shard $k of 2"
done
d=$(diff -rq --exclude=shards "$W"/one.zarr "$W"/sharded.zarr) || fail "the stores differ: $d"
echo "4. ingest --shard slurm, array 1-2: shards 0 and 1 of 2, manifests merged, the store equals one process's"
echo PASS
