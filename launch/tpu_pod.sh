#!/usr/bin/env bash
# Runs the same install and train commands on every host of a Cloud TPU VM pod slice.
# JAX finds the other hosts from the TPU metadata (MMJAX_DISTRIBUTED=1 asks for that).
#
#   TPU_NAME=my-v5e-64 ZONE=us-west4-a REPO_URL=https://github.com/you/mmjax \
#     launch/tpu_pod.sh --config configs/siglip_b16.py --workdir /mnt/shared/runs/b16
#
# Variables: TPU_NAME, ZONE (required); PROJECT (default: gcloud's); REPO_URL (required)
# and REF (default main): the code each host checks out into ~/mmjax. The workdir must be
# a path every host can write and read back (a Filestore/NFS mount or a gcsfuse bucket):
# checkpoints are written by all hosts, metrics by host 0.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${REPO_URL:?set REPO_URL}"
REF=${REF:-main}
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} --worker=all \
  --command "set -e
    [ -d ~/mmjax ] || git clone -q $REPO_URL ~/mmjax
    cd ~/mmjax && git fetch -q origin && git checkout -q $REF
    python3 -m pip install -q -U 'jax[tpu]' -e .
    MMJAX_DISTRIBUTED=1 python3 -m mmjax.train$ARGS"
