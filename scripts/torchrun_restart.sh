#!/usr/bin/env bash
# torchrun restarts: a rank crashes, torchrun (--max-restarts) restarts every worker, and the
# new workers resume from the row every rank committed (scripts/ensemble.py elects it itself).
#
#   scripts/torchrun_restart.sh CKPT OUT [ensemble.py options...]
#
# CRASH_FAULT: a DISTCKPT_FAULT spec (see distckpt/faults.py) applied on the FIRST attempt
#   only; default "after_output@1:7": rank 1 is SIGKILLed after writing the output of the
#   step that row 7 would record, so row 6 is the newest committed row. Set it empty to run
#   without a crash.
# NPROC (2), MAX_RESTARTS (3), PYTHON (the project's .venv python if there is one).
#
# Each worker runs this same script (torchrun --no-python bash THIS --worker ...), which
# looks at TORCHELASTIC_RESTART_COUNT (0 on the first attempt, set by torchrun) and execs
# scripts/ensemble.py. Rank 0 prints one DONE line with a digest of the whole output.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$ROOT/scripts/torchrun_restart.sh"
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi

if [[ ${1:-} == --worker ]]; then
    shift
    attempt=${TORCHELASTIC_RESTART_COUNT:-0}
    if [[ $attempt -eq 0 && -n ${CRASH_FAULT:-} ]]; then
        export DISTCKPT_FAULT=$CRASH_FAULT
    else
        unset DISTCKPT_FAULT
    fi
    fault=${DISTCKPT_FAULT:+ fault=$DISTCKPT_FAULT}
    echo "torchrun_restart.sh: rank ${RANK:-?} attempt $attempt$fault" >&2
    exec "$PYTHON" "$ROOT/scripts/ensemble.py" "$@"
fi

if [[ $# -lt 2 || $1 == -h || $1 == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
ckpt=$1
out=$2
shift 2
export CRASH_FAULT=${CRASH_FAULT-after_output@1:7}
export PYTHON
# The restarted workers must not share the agent's rendezvous TCPStore with the attempt
# before: they would read its stale keys (peer addresses, barrier counts) and fail to
# connect or hang in init_process_group (pytorch/pytorch#135712, still so in torch 2.13).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
exec "$PYTHON" -m torch.distributed.run \
    --standalone \
    --nproc-per-node="${NPROC:-2}" \
    --max-restarts="${MAX_RESTARTS:-3}" \
    --monitor-interval=0.5 \
    --no-python bash "$SELF" --worker --checkpoint "$ckpt" --output "$out" "$@"
