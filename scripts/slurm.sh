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
RUN_DIR=${RUN_DIR:-runs/$(basename "$CONFIG" .yaml)}   # the shipped configs write checkpoints to runs/<name>/
GPUS_PER_NODE=${SLURM_NTASKS_PER_NODE%%(*}            # "8", or "8(x2)" on some clusters -> 8

cd "${SLURM_SUBMIT_DIR:-.}"              # the repository (sbatch starts here by default too)
# source .venv/bin/activate              # or: module load ... ; conda activate ...
export WANDB_MODE=${WANDB_MODE:-offline} # compute nodes are often offline; upload later with `wandb sync`
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}   # no CPU oversubscription by the 8 processes of a node

# Resume from the newest of two checkpoints. After pre-emption or the time limit, Lightning (SLURMEnvironment with
# auto_requeue, in the preset) has saved $RUN_DIR/hpc_ckpt_N.ckpt and requeued this job; run again without
# --ckpt_path, it resumes from the highest hpc_ckpt_N by itself. A job submitted anew (after a crash, or to train
# further) resumes from the config's last.ckpt when that one is newer.
HPC=$(ls -t "$RUN_DIR"/hpc_ckpt_*.ckpt 2> /dev/null | head -n 1 || true)
LAST="$RUN_DIR/checkpoints/last.ckpt"
RESUME=()
if [ -f "$LAST" ] && { [ -z "$HPC" ] || [ "$LAST" -nt "$HPC" ]; }; then
  RESUME=(--ckpt_path last)
  echo "resuming from $LAST"
elif [ -n "$HPC" ]; then
  echo "resuming from $HPC (requeued job)"
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
  --trainer.default_root_dir "$RUN_DIR" \
  ${RESUME[@]+"${RESUME[@]}"} \
  "$@"

# Training finished (a requeued job never gets here: SLURM stops it after the requeue). Test the best checkpoint on
# the same processes; the distributed evaluation scores every user exactly once, so the numbers equal a 1-GPU test.
srun tim4rec-pl test \
  --config "$CONFIG" \
  --config configs/presets/ddp-multinode.yaml \
  --trainer.num_nodes "$SLURM_NNODES" \
  --trainer.devices "$GPUS_PER_NODE" \
  --trainer.default_root_dir "$RUN_DIR" \
  --ckpt_path best \
  "$@"
