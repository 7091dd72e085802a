#!/bin/bash
# Multi-node training with SLURM: one task (process) per GPU, automatic requeue and resume on pre-emption.
#
#   sbatch scripts/slurm.sh configs/ml-1m.yaml                                  # 2 nodes x 8 GPUs, as below
#   sbatch --nodes 4 scripts/slurm.sh configs/ml-1m.yaml --data.batch_size 64   # more args go to `tim4rec-pl fit`
#
# Adapt the #SBATCH lines to your cluster (partition, account, GPUs per node); sbatch options given on the command
# line override them. data.batch_size is per process: the effective batch is batch_size x GPUs per node x nodes
# (docs/cluster.md). The repository, data/ and runs/ must be on a filesystem every node sees.
#SBATCH --job-name=tim4rec              # name shown by squeue
#SBATCH --nodes=2                       # machines; passed on as --trainer.num_nodes
#SBATCH --ntasks-per-node=8             # one task per GPU: must equal the GPUs per node in --gres
#SBATCH --gres=gpu:8                    # GPUs per node
#SBATCH --cpus-per-task=8               # CPU cores per process (for data.num_workers loader processes)
#SBATCH --mem=0                         # all of each node's memory
#SBATCH --time=24:00:00                 # wall-clock limit of one run; a requeued job starts a new one
#SBATCH --signal=SIGUSR1@90             # SIGUSR1 to every task 90 s before the limit (no "B:": the tasks need it)
#SBATCH --requeue                       # allow the job to be requeued (some clusters forbid it by default)
#SBATCH --open-mode=append              # a requeued run appends to the same log instead of truncating it
#SBATCH --output=slurm-%x-%j.out        # log file: job name and id (stays the same across requeues)
# #SBATCH --partition=gpu               # your partition / account / QoS, if the cluster needs them
# #SBATCH --account=my-project

set -euo pipefail

CONFIG=${1:?usage: sbatch scripts/slurm.sh CONFIG.yaml [more tim4rec-pl fit options]}
shift                                    # the remaining arguments are passed on to `tim4rec-pl fit`
GPUS_PER_NODE=${SLURM_NTASKS_PER_NODE%%(*}            # "8", or "8(x2)" on some clusters -> 8

cd "${SLURM_SUBMIT_DIR:-.}"              # the repository (sbatch starts here by default too)
# source .venv/bin/activate              # or: module load ... ; conda activate ...
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}   # no CPU oversubscription by the 8 processes of a node
# W&B: online when the nodes can reach it and a key is configured (wandb login / WANDB_API_KEY), otherwise the
# logger writes offline by itself; upload later with the `wandb sync` command it prints. Set WANDB_MODE to force one.

# One run folder per job: <run_root>/slurm-<job id>/ (run_root from the config, e.g. runs/ml-1m). A new submission
# starts a new run; a requeued job (SLURM_RESTART_COUNT > 0, after pre-emption or the time limit) continues its own
# run, from the newer of two checkpoints: Lightning's hpc_ckpt_N.ckpt (saved on SIGUSR1 by the preset's
# SLURMEnvironment; Lightning resumes from it by itself when no --ckpt_path is given) or checkpoints/last.ckpt
# (saved when the job was stopped by SIGTERM). The W&B run continues too: its id is kept in the run folder.
RUN_NAME=${RUN_NAME:-slurm-${SLURM_JOB_ID}}
RUN_ROOT=${RUN_ROOT:-$(awk '/^run_root:/ {print $2; exit}' "$CONFIG")}
RUN_DIR="$RUN_ROOT/$RUN_NAME"
RESUME=()
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
  HPC=$(ls -t "$RUN_DIR"/hpc_ckpt_*.ckpt 2> /dev/null | head -n 1 || true)
  LAST="$RUN_DIR/checkpoints/last.ckpt"
  if [ -f "$LAST" ] && { [ -z "$HPC" ] || [ "$LAST" -nt "$HPC" ]; }; then
    RESUME=(--ckpt_path last)
    echo "requeued (restart ${SLURM_RESTART_COUNT}): resuming $RUN_DIR from $LAST"
  elif [ -n "$HPC" ]; then
    echo "requeued (restart ${SLURM_RESTART_COUNT}): resuming $RUN_DIR from $HPC"
  else
    echo "requeued (restart ${SLURM_RESTART_COUNT}) before any checkpoint: training $RUN_DIR from the start"
  fi
fi

# srun starts --ntasks-per-node tasks on each node; Lightning reads SLURM_PROCID / SLURM_LOCALID / SLURM_NODELIST
# to know its rank and the address of rank 0. The first process to need the data prepares it (a file lock keeps
# the others waiting). Registry datasets are downloaded on first use: if compute nodes are offline, run
# `tim4rec-pl data prepare --config CONFIG.yaml` on the login node before submitting.
srun tim4rec-pl fit \
  --config "$CONFIG" \
  --config configs/presets/ddp-multinode.yaml \
  --trainer.num_nodes "$SLURM_NNODES" \
  --trainer.devices "$GPUS_PER_NODE" \
  --run "$RUN_NAME" \
  ${RESUME[@]+"${RESUME[@]}"} \
  "$@"

# Training finished (a requeued job never gets here: SLURM stops it after the requeue). Test this run's best
# checkpoint on the same processes; the distributed evaluation scores every user exactly once, so the numbers equal a
# 1-GPU test. The test metrics go to the same W&B run as the training curves.
srun tim4rec-pl test \
  --config "$CONFIG" \
  --config configs/presets/ddp-multinode.yaml \
  --trainer.num_nodes "$SLURM_NNODES" \
  --trainer.devices "$GPUS_PER_NODE" \
  --run "$RUN_NAME" \
  --ckpt_path best \
  "$@"
