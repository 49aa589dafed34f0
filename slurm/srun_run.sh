#!/bin/bash
# Step 5 without torchrun: srun starts every training process itself, one task per GPU (or per
# CPU process), and each task reads its rank from Slurm's variables (multinode.py translates
# them with support.slurm_env.torch_env_from_slurm). Nothing restarts a failed worker here; a failure
# ends the step, and resubmitting resumes from the last snapshot.
#
#   sbatch slurm/srun_run.sh 50 5 --config configs/inshop_r50.toml
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 slurm/srun_run.sh 50 5
#
# --ntasks-per-node must equal the GPUs per node on GPU nodes: task LOCAL_RANK uses GPU LOCAL_RANK.
# Outputs go to runs/slurm-<job id>/ unless --out_dir is given; keep them on a disk every node
# sees, since a requeued job may run on other nodes and must find its snapshot there.
#
# Preemption and time limits: 120 s before the limit Slurm sends USR1 straight to every task
# (no B: prefix, no torchrun in between to be killed by it). The tasks save a snapshot and exit
# with 128+10; this shell then requeues the job, which resumes from the snapshot.
#
#SBATCH --job-name=arcface-ddp-srun
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --requeue
#SBATCH --signal=USR1@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out

set -euo pipefail

# Slurm runs a copy of this file from its spool directory: work from where sbatch was called.
cd "${SLURM_SUBMIT_DIR:?submit this script with sbatch}"
if [[ ! -f multinode.py ]]; then
    echo "slurm/srun_run.sh: no multinode.py in $PWD; submit from the project root" >&2
    exit 2
fi

# Exit status of a task that saved its snapshot after SIGUSR1 (128 + signal number 10).
STOPPED_BY_USR1=138

# True when the arguments already choose an output directory.
has_out_dir() {
    local arg
    for arg in "$@"; do
        [[ $arg == --out_dir || $arg == --out_dir=* ]] && return 0
    done
    return 1
}

out_args=()
if ! has_out_dir "$@"; then
    # The job id survives requeues, so a requeued job finds its own snapshot here.
    out_args=(--out_dir "runs/slurm-$SLURM_JOB_ID")
fi

# srun in 22.05 and later no longer inherits --cpus-per-task from the job.
cpu_args=()
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    cpu_args=(--cpus-per-task "$SLURM_CPUS_PER_TASK")
fi

# torchrun would set this; without it every task starts one thread per core of the node.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

echo "slurm/srun_run.sh: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_NTASKS:-?} task(s) on $SLURM_JOB_NUM_NODES node(s)"

# TERM means Slurm is ending the job (scancel, preemption) and signals the tasks itself. Without
# a trap this shell would die at once and the job's end would kill the tasks mid-save.
ending=""
trap 'ending=1; echo "slurm/srun_run.sh: got SIGTERM; the job is ending"' TERM

# In the background, because bash runs a trap only once the foreground command has returned.
# No --kill-on-bad-exit: after a stop signal the first task to exit would get rank 0 killed
# while it is still writing the snapshot.
srun "${cpu_args[@]}" python3 multinode.py "$@" "${out_args[@]}" &
step_pid=$!

status=0
wait "$step_pid" || status=$?
# A trap interrupted `wait`: keep waiting while the tasks save their snapshot.
while kill -0 "$step_pid" 2>/dev/null; do
    status=0
    wait "$step_pid" || status=$?
done

if [[ -z $ending && $status == "$STOPPED_BY_USR1" ]]; then
    # Requeueing ends this run with SIGTERM to this shell; nothing is left to do by then.
    trap - TERM
    echo "slurm/srun_run.sh: tasks stopped on SIGUSR1; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
