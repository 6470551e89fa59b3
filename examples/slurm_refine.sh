#!/bin/bash
# cryocli refine on a Slurm cluster: 2 nodes x 4 GPUs, one rank per GPU (8 ranks), data-parallel.
#
#   sbatch examples/slurm_refine.sh                      # a new run
#   RESUME=--resume sbatch examples/slurm_refine.sh      # continue it from its last checkpoint (any node count)
#
# srun starts one torchrun per node; each torchrun starts 4 ranks and the ranks of both nodes meet through the
# c10d rendezvous on the first node. torchrun sets RANK, WORLD_SIZE and LOCAL_RANK for every rank; cryocli takes
# cuda:LOCAL_RANK and nccl (gloo on CPU-only nodes), reads every WORLD_SIZE-th particle from its RANK on, and
# rank 0 alone writes the run directory and prints. The STAR file, the stacks, the reference and the output folder
# must be on a file system every node sees (rank 0 writes, the others only read).
#
#SBATCH --job-name=cryocli-refine
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=cryocli-refine-%j.log
set -euo pipefail

PARTICLES=${PARTICLES:-Extract/job012/particles.star}
REFERENCE=${REFERENCE:-InitialModel/job015/run_it100_class001.mrc}
OUT=${OUT:-cryocli/refine}  # the same folder for --resume
RESUME=${RESUME:-}
GPUS_PER_NODE=${GPUS_PER_NODE:-4}

# The first node of the allocation hosts the rendezvous.
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RDZV_PORT=${RDZV_PORT:-29500}

# How long a rank waits in a collective for the others before the run fails (seconds; cryocli's default 600).
# A dead node then ends the run with an error instead of leaving the others waiting for the wall-clock limit.
export CRYOCLI_COLLECTIVE_TIMEOUT=${CRYOCLI_COLLECTIVE_TIMEOUT:-900}
# CPU threads per rank (torchrun would set 1).
export OMP_NUM_THREADS=$((SLURM_CPUS_PER_TASK / GPUS_PER_NODE))
# On nodes with several network interfaces, name the one the nodes reach each other by, e.g.:
# export NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0

srun --kill-on-bad-exit=1 torchrun \
    --nnodes="$SLURM_NNODES" --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv-id="$SLURM_JOB_ID" --rdzv-backend=c10d --rdzv-endpoint="$HEAD_NODE:$RDZV_PORT" \
    -m cryocli refine "$PARTICLES" --ref "$REFERENCE" --method relion -o "$OUT" $RESUME
