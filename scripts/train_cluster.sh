#!/usr/bin/env bash
# `make train-cluster`: CLIP training (flows/train.py) on a Ray cluster, logs streamed here.
#
#   make train-cluster CORPUS=s3://bucket/shards OUT=runs/vitb32 \
#        TRAIN_ARGS="--preset ViT-B-32 --workers 8 --gpus-per-worker 1 --batch-size 4096 --samples 400000000 \
#                    --storage-path s3://bucket/ray --precision bf16 --grad-checkpointing"
#
# RAY_ADDRESS set (the dashboard's job address, e.g. http://127.0.0.1:8265 after
# `ray dashboard infra/ray/cluster.yaml`, or the KubeRay head service): the same command runs
# as a Ray Job with this directory as its working directory; `ray job submit` streams the
# logs until the job ends (Ctrl-C detaches; `ray job stop ID` stops it). On a multi-node
# cluster OUT and --storage-path must be shared storage: an s3:// (fsspec) URI, or a folder
# every node mounts (NFS/EFS, a RWX volume) with --shared-storage in TRAIN_ARGS; a local
# folder is refused before any worker starts. Set MLFLOW_TRACKING_URI to a tracking server.
# CORPUS and OUT are made absolute here; paths inside TRAIN_ARGS must be absolute or URIs already.
#
# RAY_ADDRESS unset: the driver starts a local Ray head for the run and stops it at the end
# (workers at 0.5 CPU each, so a laptop's cores do not starve Ray).
set -euo pipefail
cd "$(dirname "$0")/.."

CORPUS="${CORPUS:-runs/demo/shards}"  # default: the demo's corpus (make demo)
OUT="${OUT:-runs/demo/train-cluster}"
[[ "$CORPUS" == *://* || -e "$CORPUS" ]] || { echo "no corpus at $CORPUS: run \`make demo\` first or set CORPUS=..."; exit 2; }
TRAIN_ARGS="${TRAIN_ARGS:-}"
# the job runs in an uploaded copy of this directory: local paths must be absolute
absolute() { if [[ "$1" == *://* ]]; then echo "$1"; else realpath -m "$1"; fi; }
CORPUS="$(absolute "$CORPUS")"
OUT="$(absolute "$OUT")"
PY="${PY:-.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3

if [[ -n "${RAY_ADDRESS:-}" ]]; then
    RAY_CLI="$(dirname "$PY")/ray"
    [[ -x "$RAY_CLI" ]] || RAY_CLI=ray
    echo "submitting to the Ray cluster at $RAY_ADDRESS"
    # the job's driver runs on the head node: --ray-address auto joins the cluster it runs on
    # shellcheck disable=SC2086
    exec "$RAY_CLI" job submit --address "$RAY_ADDRESS" --working-dir . \
        --runtime-env-json '{"excludes": [".venv", ".git", "*.tar", "runs", "out", "data", "mlruns", "*.db"]}' \
        -- python -m flows.commands.train "$CORPUS" "$OUT" --ray-address auto $TRAIN_ARGS
fi

echo "RAY_ADDRESS is unset: training on a local Ray head"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
# shellcheck disable=SC2086
exec "$PY" -m flows.commands.train "$CORPUS" "$OUT" --cpus-per-worker 0.5 $TRAIN_ARGS
