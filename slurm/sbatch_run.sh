#!/bin/bash
# Step 5: multinode.py on a Slurm cluster, through torchrun.
#
# One Slurm task per node runs torchrun; torchrun starts one worker per GPU of the node (or
# CPU_PROCS_PER_NODE workers on a node without GPUs) and all agents meet in a c10d rendezvous on
# the job's first node. Submit from the project root with the project's environment active, and
# ask for the GPUs: a job without them on GPU nodes stops with a message (set CPU_PROCS_PER_NODE
# to train on their CPUs on purpose).
#
#   sbatch --gpus-per-node=8 slurm/sbatch_run.sh 50 5 --config configs/inshop_r50.toml
#   sbatch --nodes=4 --gpus-per-node=8 --cpus-per-task=96 slurm/sbatch_run.sh 50 5 --batch_size 64
#   CPU_PROCS_PER_NODE=4 sbatch slurm/sbatch_run.sh 2 1 --config configs/smoke.toml   # CPUs only
#
# Arguments are passed to multinode.py unchanged. Outputs go to runs/slurm-<job id>/ unless
# --out_dir is given; the log is slurm-<job id>.out in the submit directory. Keep both on a disk
# every node sees: a requeued job may run on other nodes and must find its snapshot there.
#
# Preemption and time limits: 120 s before the limit Slurm sends USR1 to this shell only (B:).
# The shell asks the training step to stop (SIGTERM: torchrun forwards it, USR1 would kill
# torchrun), waits while the workers save a snapshot, and requeues the job. The requeued job keeps
# its job id, so it finds runs/slurm-<job id>/snapshot.pt and resumes where it stopped.
#
#SBATCH --job-name=arcface-ddp
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out

set -euo pipefail

# The traps come first: until they are set, USR1's default action would end the job unrequeued.
stop_signal=""
# USR1 (time limit or preemption notice, sent to this shell only): ask the training step to stop.
# scancel without --batch reaches every process of the job's steps (torchrun agents and their
# workers) but not this shell; the workers finish their step, save a snapshot and exit.
request_stop() {
    [[ -n $stop_signal ]] && return
    stop_signal=USR1
    echo "slurm/sbatch_run.sh: got SIGUSR1; asking the training step to save a snapshot and stop"
    scancel --signal=TERM "$SLURM_JOB_ID" || echo "slurm/sbatch_run.sh: scancel failed" >&2
}
# TERM means Slurm is ending the job (scancel, preemption); it signals the steps itself, and
# scancel would only block on a job that "can not be altered now". Stay alive so the step is
# not killed with this shell, and do not requeue: whoever ends the job decides that.
note_termination() {
    stop_signal=TERM
    echo "slurm/sbatch_run.sh: got SIGTERM; the job is ending"
}
trap request_stop USR1
trap note_termination TERM

# Slurm runs a copy of this file from its spool directory: work from where sbatch was called.
cd "${SLURM_SUBMIT_DIR:?submit this script with sbatch}"
if [[ ! -f multinode.py ]]; then
    echo "slurm/sbatch_run.sh: no multinode.py in $PWD; submit from the project root" >&2
    exit 2
fi

# Workers per node on nodes without GPUs (each one is a gloo rank). Setting it also says that a
# CPU run is meant where the nodes have GPUs Slurm did not give this job (see below).
cpu_run_requested=${CPU_PROCS_PER_NODE:+yes}
CPU_PROCS_PER_NODE=${CPU_PROCS_PER_NODE:-2}
# Whole-group restarts torchrun may attempt after a worker fails, before the step fails.
MAX_RESTARTS=${MAX_RESTARTS:-3}

# GPUs this node was given. SLURM_GPUS_ON_NODE exists when GPUs were requested through --gpus*;
# CUDA_VISIBLE_DEVICES covers sites that only set that. Nodes are assumed alike.
gpus_on_node() {
    if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [[ -n ${CUDA_VISIBLE_DEVICES:-} && $CUDA_VISIBLE_DEVICES != NoDevFiles ]]; then
        local ids
        IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
    else
        echo 0
    fi
}

# True when the arguments already choose an output directory.
has_out_dir() {
    local arg
    for arg in "$@"; do
        [[ $arg == --out_dir || $arg == --out_dir=* ]] && return 0
    done
    return 1
}

# The GPUs Slurm manages on a node (its Gres, e.g. gpu:8(S:0-1) or gpu:h100:8), whether or not
# this job was given any; empty when Slurm knows of none.
gpus_configured_on() {
    scontrol show node -o "$1" 2>/dev/null | grep -o 'Gres=[^ ]*gpu[^ ]*' | sed 's/^Gres=//' || true
}

# The rendezvous lives on the first node of the allocation, where this shell runs.
# awk, not head: head would exit early, scontrol would die of SIGPIPE, and pipefail would end the job.
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')

nnodes=$SLURM_JOB_NUM_NODES
nproc=$(gpus_on_node)
if ((nproc == 0)); then
    # A job submitted without --gpus-per-node to a GPU partition gets no GPU; training on two CPU
    # processes instead would look like success and take forever. Stop unless that was asked for.
    node_gpus=$(gpus_configured_on "$head_node")
    if [[ -n $node_gpus && -z $cpu_run_requested ]]; then
        echo "slurm/sbatch_run.sh: job $SLURM_JOB_ID was given no GPUs, but node $head_node has $node_gpus;" \
            "request them (sbatch --gpus-per-node=N slurm/sbatch_run.sh ...), or set CPU_PROCS_PER_NODE to train on CPUs" >&2
        exit 2
    fi
    nproc=$CPU_PROCS_PER_NODE
fi

# The head node's address as the other nodes resolve its name (support/slurm_env.py says why not `hostname
# -i`); getent fails when the name does not resolve, and the name is then used as it is.
head_addresses=$(getent ahostsv4 "$head_node" || true)
head_addr=$(python3 -c 'import support.slurm_env as s, sys; print(s.rendezvous_host(sys.argv[1], sys.argv[2]))' \
    "$head_node" "$head_addresses")
# Same job id, same port on every node and after a requeue; support/slurm_env.py owns the formula.
rdzv_port=${RDZV_PORT:-$(python3 -c 'import support.slurm_env as s, os; print(s.default_master_port(os.environ["SLURM_JOB_ID"]))')}

out_args=()
if ! has_out_dir "$@"; then
    # The job id survives requeues, so a requeued job finds its own snapshot here.
    out_args=(--out_dir "runs/slurm-$SLURM_JOB_ID")
fi

# srun in 22.05 and later no longer inherits --cpus-per-task from the job; without it the torchrun
# step (and every worker it starts) would be confined to one CPU where Slurm binds tasks.
cpu_args=()
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    cpu_args=(--cpus-per-task "$SLURM_CPUS_PER_TASK")
fi

# A fresh TCP store for every restart attempt: with the store shared between attempts, restarted
# gloo workers can read a dead peer's address and fail or hang (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

echo "slurm/sbatch_run.sh: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $nnodes node(s) x $nproc process(es), rendezvous $head_addr:$rdzv_port"

# (A stop requested while the lines above ran skips training and goes straight to the requeue.)
if [[ -z $stop_signal ]]; then
    # In the background, because bash runs a trap only once the foreground command has returned.
    # No --kill-on-bad-exit: after a stop signal the first node to finish would get rank 0 killed
    # while it is still writing the snapshot; torchrun agents notice failed peers themselves.
    srun "${cpu_args[@]}" \
        torchrun \
        --nnodes "$nnodes" \
        --nproc_per_node "$nproc" \
        --rdzv_id "$SLURM_JOB_ID" \
        --rdzv_backend c10d \
        --rdzv_endpoint "$head_addr:$rdzv_port" \
        --max-restarts "$MAX_RESTARTS" \
        multinode.py "$@" "${out_args[@]}" &
    step_pid=$!

    status=0
    wait "$step_pid" || status=$?
    if [[ -z $stop_signal ]]; then
        exit "$status"
    fi
    # A trap interrupted `wait`: keep waiting while the workers save their snapshot.
    while kill -0 "$step_pid" 2>/dev/null; do
        wait "$step_pid" || true
    done
fi

if [[ $stop_signal == TERM ]]; then
    exit 143
fi
# Requeueing ends this run with SIGTERM to this shell; nothing is left to do by then.
trap - TERM
echo "slurm/sbatch_run.sh: training step stopped; requeueing job $SLURM_JOB_ID"
scontrol requeue "$SLURM_JOB_ID"
