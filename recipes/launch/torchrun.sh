#!/usr/bin/env bash
# turbo-train under torchrun: one process per GPU, on one machine or several.
#
#   one machine, all its GPUs:
#     recipes/launch/torchrun.sh recipes/wan2.1-1.3b/rcm.yaml --set trainer.strategy=fsdp2
#   two machines x 8 GPUs (run the same line on both; NODE_RANK 0 on the first):
#     NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC=8 recipes/launch/torchrun.sh RECIPE --set trainer.strategy=fsdp2
#
# Environment (all optional):
#   NPROC        processes (= GPUs) per machine; default: the GPUs nvidia-smi lists (1 without a GPU)
#   NNODES       machines; default 1 (then torchrun --standalone picks a free local port)
#   NODE_RANK    this machine's index, 0..NNODES-1 (multi-node only)
#   MASTER_ADDR  host name of machine 0, reachable from all; MASTER_PORT its port (default 29500)
#   RUN_ID       rendezvous id shared by the machines of one run (default: turbo)
#   MAX_RESTARTS torchrun restarts the workers up to this many times after a failure (default 0); with
#                checkpoint.resume: auto each restart continues from last.ckpt
#
# Lightning reads torchrun's environment (TorchElasticEnvironment): trainer.devices and
# trainer.num_nodes are set here to match it. Everything else stays in the recipe; extra arguments go
# to turbo-train (e.g. --set data.batch_size=4, --dry-run).
# Preemption: SIGTERM to torchrun is forwarded to the workers, which finish their step, write
# last.ckpt and exit 143 (torchrun then reports a failure); run the same line again to resume.
set -euo pipefail

RECIPE=${1:?usage: recipes/launch/torchrun.sh RECIPE [turbo-train arguments ...]}
shift
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ "$NPROC" -ge 1 ]] || NPROC=1
fi
NNODES=${NNODES:-1}

if [[ "$NNODES" -eq 1 ]]; then
  RDZV=(--standalone)
else
  : "${NODE_RANK:?set NODE_RANK (0..NNODES-1) for a multi-node run}"
  : "${MASTER_ADDR:?set MASTER_ADDR to the host name of machine 0}"
  RDZV=(--nnodes="$NNODES" --node-rank="$NODE_RANK" --rdzv-backend=c10d
        --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id="${RUN_ID:-turbo}")
fi

exec torchrun "${RDZV[@]}" --nproc-per-node="$NPROC" --max-restarts="${MAX_RESTARTS:-0}" \
  -m turbo_train.cli "$RECIPE" \
  --set trainer.devices="$NPROC" --set trainer.num_nodes="$NNODES" "$@"
