#!/usr/bin/env bash
# GRPO training under torchrun, one node or several. Run it once on every node.
#
# Usage:  examples/torchrun/train_grpo.sh [key=value ...]      (extra arguments are config overrides)
#
# Environment (defaults in brackets):
#   NNODES [1]            number of nodes
#   NODE_RANK [0]         this node's rank (with c10d rendezvous the agents agree on ranks anyway)
#   NPROC_PER_NODE        processes per node [the number of GPUs (CUDA_VISIBLE_DEVICES, else
#                         nvidia-smi); 2 on a CPU-only machine]
#   MASTER_ADDR [localhost], MASTER_PORT [29500]   the rendezvous endpoint: the first node's address
#   RDZV_ID [megavrl]     rendezvous id, the same on every node of one job and unique per job
#   CONFIG [examples/configs/tiny_cpu_tvg.yaml of this checkout: GRPO from the SFT model of
#                         `make demo` (runs/demo/sft/hf), output in runs/tiny_cpu_tvg]
#   TORCHRUN [torchrun]   the launcher to run
#   DRY_RUN [0]           1: only print the command
#
# Two nodes of 8 GPUs, by hand:
#   node 0:  NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 CONFIG=my.yaml examples/torchrun/train_grpo.sh
#   node 1:  NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 CONFIG=my.yaml examples/torchrun/train_grpo.sh
# On Slurm, examples/slurm/train_grpo.sbatch runs this script on every node.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

gpu_count() {
  # CUDA_VISIBLE_DEVICES, when set, names the GPUs this process may use ("" = none); otherwise
  # nvidia-smi -L prints one line per GPU, and no nvidia-smi (or no driver) means no GPU.
  local n ids
  if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
    IFS=, read -ra ids <<< "$CUDA_VISIBLE_DEVICES"
    echo "${#ids[@]}"
    return
  fi
  n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  echo "${n:-0}"
}

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(gpu_count)
  if [[ "$NPROC_PER_NODE" -eq 0 ]]; then
    NPROC_PER_NODE=2  # CPU mode: two gloo processes (enough for tp=2 or pp=2 on the tiny model)
  fi
fi
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}
CONFIG=${CONFIG:-$repo/examples/configs/tiny_cpu_tvg.yaml}
TORCHRUN=${TORCHRUN:-torchrun}

cmd=(
  "$TORCHRUN"
  --nnodes "$NNODES"
  --node-rank "$NODE_RANK"
  --nproc-per-node "$NPROC_PER_NODE"
  --rdzv-backend c10d
  --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"
  --rdzv-id "${RDZV_ID:-megavrl}"
  -m megavrl.cli train --config "$CONFIG" "$@"
)

# The command, quoted where needed so that it can be pasted back into a shell.
printf '+'; printf ' %q' "${cmd[@]}"; printf '\n'
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  exit 0
fi
# Stopping: SIGTERM/SIGINT/SIGHUP/SIGUSR1 to this script (Slurm's signal to the task, scancel,
# Ctrl-C) is handed to torchrun, which forwards it to the workers; they finish or abandon the step,
# save a checkpoint within trainer.preemption_grace_s and exit. TORCH_ELASTIC_SHUTDOWN_TIMEOUT
# (default: the same 120 s) bounds how long torchrun waits for them before SIGKILL.
# Exit status: torchrun's, except 75 when the run was interrupted after a complete checkpoint
# (rank 0 writes run_status.json to $MEGAVRL_STATUS_FILE): resubmit or requeue to resume.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}
export MEGAVRL_STATUS_FILE=${MEGAVRL_STATUS_FILE:-$(mktemp -t megavrl-status.XXXXXX)}
: > "$MEGAVRL_STATUS_FILE"
# shellcheck disable=SC2329  # invoked by the traps below
forward() {
  # torchrun handles TERM, INT and HUP (and forwards them to its workers); USR1 goes as TERM.
  local sig=$1
  [[ "$sig" == USR1 ]] && sig=TERM
  kill -s "$sig" "$torchrun_pid" 2>/dev/null || true
}
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward HUP' HUP
trap 'forward USR1' USR1
"${cmd[@]}" &
torchrun_pid=$!
# `wait` returns early when a trapped signal arrives: keep waiting until torchrun has exited.
while :; do
  if wait "$torchrun_pid"; then status=0; else status=$?; fi
  kill -0 "$torchrun_pid" 2>/dev/null || break
done
if grep -q '"status": "interrupted"' "$MEGAVRL_STATUS_FILE" 2>/dev/null; then
  echo "megavrl: interrupted after a complete checkpoint ($(cat "$MEGAVRL_STATUS_FILE")); exit 75"
  exit 75
fi
exit "$status"
