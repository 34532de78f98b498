#!/usr/bin/env bash
# nxd-lora training on Trainium: torchrun with one process per NeuronCore, on 1..N nodes.
#
#   launch/run_trn1.sh [options] --config RECIPE [section.key=value ...]
#
# Options:
#   --config FILE          the recipe (configs/*.yaml); overrides follow as section.key=value
#   --nodes N              nodes in the job (default: Slurm's node count, else $NNODES, else 1)
#   --cores-per-node N     ranks per node (default: $NEURON_RT_NUM_CORES, else neuron-ls, else 32)
#   --target trn1|trn2     compiler target, plan device and the NxD checkpoint layout the job needs
#                          (default: trn2 when neuron-ls reports a logical NeuronCore config, else trn1);
#                          a checkpoint or recipe (model.kv_layout) for the other layout is refused
#   --backend neuron|torchneuron
#                          the stack to train with (default: neuron on trn1; on trn2 the one installed, as
#                          `nxd-lora doctor` recommends: torchneuron with TorchNeuron's torch-neuronx 2.13/2.14,
#                          neuron with SDK 2.28's); passed as train.backend (an override of yours wins)
#   --cache DIR|s3://URL   Neuron compile cache (default: $NEURON_COMPILE_CACHE_URL, else
#                          ~/.cache/neuron-compile-cache); an s3:// cache is shared by every node and job
#   --precompile           first run the identical command under neuron_parallel_compile, which
#                          compiles every graph in parallel (the trainer runs a few steps and saves nothing)
#   --precompile-only      only that
#   --master-port P        rendezvous port on the first node (default 44000)
#   --dry-run              print the environment and commands instead of running them
#
# Multi-node: under Slurm (one task per node: srun launch/run_trn1.sh ...) the node count, this
# node's rank and the first node's address come from Slurm; elsewhere set NNODES, NODE_RANK and
# MASTER_ADDR on every node. Before anything starts, `nxd-lora plan` checks that train.tp x
# train.dp equals nodes x cores, that the recipe fits a NeuronCore's memory, and that the
# checkpoint's KV layout is the target's (trn1 and trn2 place replicated KV heads differently).
# Every Neuron variable set here keeps a value you exported before.
set -euo pipefail

die() { echo "run_trn1.sh: error: $*" >&2; exit 2; }

PYTHON=${PYTHON:-python3}
CONFIG="" NODES="" CORES="" TARGET="" BACKEND="" CACHE="" PRECOMPILE=0 TRAIN=1 PORT=44000 DRY=0
OVERRIDES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) CONFIG=${2:?--config needs a file}; shift 2 ;;
    --nodes) NODES=${2:?--nodes needs a number}; shift 2 ;;
    --cores-per-node) CORES=${2:?--cores-per-node needs a number}; shift 2 ;;
    --target) TARGET=${2:?--target needs trn1 or trn2}; shift 2 ;;
    --backend) BACKEND=${2:?--backend needs neuron or torchneuron}; shift 2 ;;
    --cache) CACHE=${2:?--cache needs a directory or s3:// URL}; shift 2 ;;
    --precompile) PRECOMPILE=1; shift ;;
    --precompile-only) PRECOMPILE=1; TRAIN=0; shift ;;
    --master-port) PORT=${2:?--master-port needs a port}; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --*) die "unknown option $1 (see --help)" ;;
    *=*) OVERRIDES+=("$1"); shift ;;
    *) die "unexpected argument '$1': recipe overrides look like section.key=value" ;;
  esac
done
[ -n "$CONFIG" ] || die "--config RECIPE is required"
[ -f "$CONFIG" ] || die "$CONFIG: no such recipe file"
is_count() { case "$1" in ''|*[!0-9]*|0) return 1 ;; esac; }

# --- topology ------------------------------------------------------------------------------
NEURON_LS_JSON=""
if command -v neuron-ls >/dev/null 2>&1; then NEURON_LS_JSON=$(neuron-ls -j 2>/dev/null || true); fi
neuron_ls_field() {  # sum of a numeric field over neuron-ls -j devices, or "" when unknown
  [ -n "$NEURON_LS_JSON" ] || return 0
  printf '%s' "$NEURON_LS_JSON" | "$PYTHON" -c "import json,sys
d=json.load(sys.stdin); v=[x['$1'] for x in d if '$1' in x]; print(sum(v) if v else '')" 2>/dev/null || true
}
if [ -z "$CORES" ]; then
  CORES=${NEURON_RT_NUM_CORES:-$(neuron_ls_field nc_count)}
  CORES=${CORES:-32}
fi
is_count "$CORES" || die "--cores-per-node must be a positive number (got '$CORES')"
if [ -z "$TARGET" ]; then
  if [ -n "$(neuron_ls_field logical_neuroncore_config)" ]; then TARGET=trn2; else TARGET=trn1; fi
fi
case "$TARGET" in trn1|trn2) ;; *) die "--target must be trn1 or trn2 (got '$TARGET')" ;; esac
if [ -z "$BACKEND" ]; then
  if [ "$TARGET" = trn1 ]; then BACKEND=neuron; else
    BACKEND=$("$PYTHON" -c "from nxd_lora.doctor import default_backend; print(default_backend())" 2>/dev/null || echo neuron)
    case "$BACKEND" in neuron|torchneuron) ;; *) BACKEND=torchneuron ;; esac
  fi
fi
case "$BACKEND" in
  neuron) ;;
  torchneuron)
    [ "$TARGET" = trn2 ] || die "--backend torchneuron runs on trn2/trn3 (TorchNeuron has no trn1 support); trn1 trains with --backend neuron"
    [ "$PRECOMPILE" = 0 ] || die "--precompile is neuron_parallel_compile, XLA's; torchneuron compiles its graphs itself (train.compile=true)" ;;
  *) die "--backend must be neuron or torchneuron (got '$BACKEND')" ;;
esac
OVERRIDES=("train.backend=$BACKEND" "${OVERRIDES[@]}")

if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
  NODES=${NODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}
  NODE_RANK=${SLURM_NODEID:?Slurm job without SLURM_NODEID: launch one task per node with srun}
  MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)}  # sed reads it all: no SIGPIPE under pipefail
else
  NODES=${NODES:-${NNODES:-1}}
  NODE_RANK=${NODE_RANK:-0}
fi
is_count "$NODES" || die "--nodes must be a positive number (got '$NODES')"
if [ "$NODES" -gt 1 ]; then
  [ -n "${MASTER_ADDR:-}" ] || die "$NODES nodes need MASTER_ADDR (the first node's address) and NODE_RANK on every node, or Slurm"
  [ "$NODE_RANK" -lt "$NODES" ] || die "NODE_RANK=$NODE_RANK must be below the node count $NODES"
fi
WORLD=$((NODES * CORES))

# --- check the plan before anything starts ---------------------------------------------------
"$PYTHON" -m nxd_lora.cli plan "$CONFIG" "${OVERRIDES[@]}" --world-size "$WORLD" --device "$TARGET" \
  || die "refused by 'nxd-lora plan' (above): nothing was launched"

# --- Neuron environment -------------------------------------------------------------------------
CACHE=${CACHE:-${NEURON_COMPILE_CACHE_URL:-$HOME/.cache/neuron-compile-cache}}
export NEURON_COMPILE_CACHE_URL=$CACHE
CC_FLAGS="--model-type transformer --retry_failed_compilation"
[ "$TARGET" = trn2 ] && CC_FLAGS="$CC_FLAGS --target=trn2"
export NEURON_CC_FLAGS=${NEURON_CC_FLAGS:-$CC_FLAGS}
export NEURON_FUSE_SOFTMAX=${NEURON_FUSE_SOFTMAX:-1}
export NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS=${NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS:-3}
export NEURON_RT_NUM_CORES=${NEURON_RT_NUM_CORES:-$CORES}
export MALLOC_ARENA_MAX=${MALLOC_ARENA_MAX:-64}   # one arena per thread of 32 processes exhausts host memory
if [ "$NODES" -gt 1 ]; then  # EFA between trn1 nodes
  export FI_PROVIDER=${FI_PROVIDER:-efa}
  export FI_EFA_USE_DEVICE_RDMA=${FI_EFA_USE_DEVICE_RDMA:-1}
  export FI_EFA_FORK_SAFE=${FI_EFA_FORK_SAFE:-1}
fi

LAUNCH=(torchrun --nproc-per-node "$CORES" --nnodes "$NODES")
if [ "$NODES" -gt 1 ]; then
  LAUNCH+=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$PORT")
fi
LAUNCH+=(-m nxd_lora.cli train --config "$CONFIG" "${OVERRIDES[@]}")

run() {
  if [ "$DRY" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
if [ "$DRY" = 1 ]; then
  env | grep -E '^(NEURON_|FI_|MALLOC_ARENA_MAX=)' | sort
fi
echo "run_trn1.sh: $NODES node(s) x $CORES NeuronCores ($TARGET, backend $BACKEND), this node rank ${NODE_RANK}, cache $CACHE" >&2
if [ "$PRECOMPILE" = 1 ]; then
  run neuron_parallel_compile "${LAUNCH[@]}"
fi
if [ "$TRAIN" = 1 ]; then
  run "${LAUNCH[@]}"
fi
