#!/usr/bin/env bash
# One trainer process per node over all its GPUs; srun starts them and JAX reads the SLURM
# variables to join them. SIGTERM two minutes before the time limit makes every process
# save a checkpoint and exit with 143; this script then requeues the job (`scontrol
# requeue`, which --requeue allows), and the requeued job resumes from that checkpoint.
#
#   sbatch --nodes=4 launch/slurm.sh --config configs/siglip_b16.py --workdir /shared/runs/b16
#
# Edit the #SBATCH lines (or override them on the sbatch command line) for your cluster.
# The workdir must be on a filesystem all nodes share. PYTHON defaults to python3 of the
# environment sbatch was called from (which must have `pip install -e .` and jax[cuda12]).
#SBATCH --job-name=mmjax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail
rc=0
srun --kill-on-bad-exit=1 "${PYTHON:-python3}" -m mmjax.train "$@" || rc=$?
# The batch script runs once per job start, on the first node, so the job is requeued once.
if [[ $rc -eq 143 ]]; then
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
