#!/usr/bin/env bash
# SLURM batch driver for a resumable distckpt job: one torchrun per node, preemption-aware.
#
#   CKPT=/shared/ckpt scripts/slurm/run.sh [torchrun target...]
#   e.g. run.sh -m distckpt.session.preempt scripts/ensemble.py --checkpoint "$CKPT" --output out
#
# Meant to be exec'd by the batch script (scripts/slurm/job.sbatch), so that it IS the batch
# shell: with `#SBATCH --signal=B:USR1@T` SLURM signals only that process, T seconds before
# the time limit. Steps, in order:
#   1. `distckpt latest "$CKPT" --json`: 0 -> resume (the workers elect the row themselves),
#      3 -> fresh start, anything else -> fail loudly without starting (a fresh start would
#      overwrite a store that could not be read). A CKPT that does not exist is a fresh start.
#   2. `srun` one task per node running `torchrun` (c10d rendezvous on the first node of the
#      allocation, id = the job id) in the background, and `wait` for it: a shell runs its
#      traps only between commands, and `wait` is interruptible where a foreground srun isn't.
#   3. On $PREEMPT_SIGNAL (USR1): forward it to srun, which forwards it to every task of the
#      step; torchrun (told to handle it with --signals-to-handle) passes it to its workers,
#      whose distckpt.session.preempt handler commits at the next boundary and exits with 85.
#   4. The step ended: status 0 -> exit 0. Status 85, or the requeue record that rank 0 wrote
#      ($DISTCKPT_REQUEUE_FILE: torchrun reports 1 whatever its workers returned), or a
#      forwarded preemption signal -> `scontrol requeue $SLURM_JOB_ID` and exit 85; the job
#      comes back with SLURM_RESTART_COUNT+1 and resumes. Anything else -> exit with the
#      step's status.
#
# Exit status: 0 done; 85 requeued; 2 usage or environment error; 1 requeue refused or failed;
# otherwise the failing command's status (distckpt latest's, e.g. 4, or the step's).
#
# Settings (environment): CKPT (required), GPUS_PER_NODE (default SLURM_GPUS_ON_NODE or 1),
# RDZV_PORT (29500), PREEMPT_SIGNAL (USR1; must match --signal and the workers' handler),
# SHUTDOWN_TIMEOUT (240 s: how long torchrun lets its workers reach a boundary and commit
# after the signal; keep it below the T of --signal=B:USR1@T), MAX_RESTARTS (torchrun's
# --max-restarts, 0; above 0 also sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1),
# MAX_REQUEUES (100; compared with SLURM_RESTART_COUNT), REQUEUE_EXIT_CODE (85),
# DISTCKPT_REQUEUE_FILE (default "$CKPT.requeue"; on a filesystem every node sees, like the
# store).
set -euo pipefail

log() {
    printf '%s run.sh[job %s]: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${SLURM_JOB_ID:-?}" "$*" >&2
}
die() {
    local status=$1
    shift
    log "ERROR: $*"
    exit "$status"
}

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
[[ -n ${CKPT:-} ]] || die 2 "CKPT is not set: the checkpoint store the job resumes from"
for var in SLURM_JOB_ID SLURM_NNODES SLURM_JOB_NODELIST; do
    [[ -n ${!var:-} ]] ||
        die 2 "$var is not set: run this in a SLURM allocation (sbatch scripts/slurm/job.sbatch)"
done

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
RDZV_PORT=${RDZV_PORT:-29500}
PREEMPT_SIGNAL=${PREEMPT_SIGNAL:-USR1}
PREEMPT_SIGNAL=${PREEMPT_SIGNAL#SIG}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-240}
MAX_RESTARTS=${MAX_RESTARTS:-0}
MAX_REQUEUES=${MAX_REQUEUES:-100}
REQUEUE_EXIT_CODE=${REQUEUE_EXIT_CODE:-85}
restart_count=${SLURM_RESTART_COUNT:-0}
export DISTCKPT_REQUEUE_EXIT_CODE=$REQUEUE_EXIT_CODE
if ((MAX_RESTARTS > 0)); then
    # Restarted workers must not reuse the agent's rendezvous TCPStore: stale keys of the
    # previous attempt make init_process_group fail or hang (pytorch/pytorch#135712).
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
fi
export DISTCKPT_REQUEUE_FILE=${DISTCKPT_REQUEUE_FILE:-${CKPT%/}.requeue}

preempted=""
step_pid=""
# shellcheck disable=SC2329  # invoked by the trap
on_preempt() {
    preempted=$PREEMPT_SIGNAL
    if [[ -n $step_pid ]]; then
        log "received SIG$PREEMPT_SIGNAL: forwarding it to the job step (srun pid $step_pid)"
        kill -s "$PREEMPT_SIGNAL" "$step_pid" 2>/dev/null || log "the job step has already ended"
    else
        log "received SIG$PREEMPT_SIGNAL before the job step started"
    fi
}
trap on_preempt "$PREEMPT_SIGNAL"

requeue() {
    local why="$*"
    if ((restart_count >= MAX_REQUEUES)); then
        die 1 "not requeueing: the job was already requeued $restart_count times" \
            "(MAX_REQUEUES=$MAX_REQUEUES) ($why)"
    fi
    log "requeueing job $SLURM_JOB_ID: $why"
    scontrol requeue "$SLURM_JOB_ID" ||
        die 1 "scontrol requeue $SLURM_JOB_ID failed; resubmit to resume from $CKPT"
    exit "$REQUEUE_EXIT_CODE"
}

# 1. fresh start or resume?
if [[ ! -e $CKPT ]]; then
    log "fresh start: $CKPT does not exist (restart $restart_count)"
else
    latest_status=0
    latest=$(distckpt latest "$CKPT" --json) || latest_status=$?
    latest=$(printf '%s' "$latest" | tr -s ' \n' ' ') # one log line
    case $latest_status in
    0) log "resuming from $CKPT: $latest (restart $restart_count)" ;;
    3)
        if ((restart_count > 0)); then
            log "WARNING: restart $restart_count but $CKPT has no committed row: starting afresh"
        else
            log "fresh start: $CKPT has no committed row"
        fi
        ;;
    *)
        die "$latest_status" "distckpt latest $CKPT failed with status $latest_status;" \
            "not starting (a fresh start could overwrite the store): ${latest:-no output}"
        ;;
    esac
fi
if [[ -n $preempted ]]; then
    requeue "preempted (SIG$preempted) before the job step started"
fi

mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
((${#nodes[@]} > 0)) || die 2 "scontrol show hostnames $SLURM_JOB_NODELIST gave no host"
head_node=${nodes[0]}

# 2. the job step
rm -f -- "$DISTCKPT_REQUEUE_FILE"
log "starting ${SLURM_NNODES} node(s) x $GPUS_PER_NODE rank(s), rendezvous $head_node:$RDZV_PORT"
srun --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 --mpi=none \
    --kill-on-bad-exit=1 \
    torchrun \
    --nnodes="$SLURM_NNODES" \
    --nproc-per-node="$GPUS_PER_NODE" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$head_node:$RDZV_PORT" \
    --rdzv-id="$SLURM_JOB_ID" \
    --max-restarts="$MAX_RESTARTS" \
    --signals-to-handle="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIG$PREEMPT_SIGNAL" \
    --shutdown-timeout="$SHUTDOWN_TIMEOUT" \
    "$@" &
step_pid=$!
if [[ -n $preempted ]]; then # the signal came while the step was being started
    log "forwarding SIG$preempted to the job step (srun pid $step_pid)"
    kill -s "$preempted" "$step_pid" 2>/dev/null || true
fi

# 3. wait; a trapped signal interrupts `wait`, so wait again until srun is really gone
while kill -0 "$step_pid" 2>/dev/null; do
    wait "$step_pid" || true
done
step_status=0
wait "$step_pid" || step_status=$?

# 4. what now?
record=""
if [[ -f $DISTCKPT_REQUEUE_FILE ]]; then
    record=$(<"$DISTCKPT_REQUEUE_FILE")
    rm -f -- "$DISTCKPT_REQUEUE_FILE"
fi
if ((step_status == 0)); then
    log "job step finished"
    exit 0
fi
if ((step_status == REQUEUE_EXIT_CODE)) || [[ -n $record ]]; then
    requeue "the workers committed a row and asked to be requeued" \
        "(status $step_status${record:+, record $record})"
fi
if [[ -n $preempted ]]; then
    requeue "preempted (SIG$preempted) but no worker confirmed a checkpoint" \
        "(status $step_status): resuming from the last committed row"
fi
die "$step_status" "job step failed with status $step_status"
