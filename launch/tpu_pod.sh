#!/usr/bin/env bash
# Runs the same install and train commands on every host of a Cloud TPU VM pod slice, after
# compiling the training step for the slice's topology on host 0 (`python -m mmjax.compile`):
# a step that does not fit the chips' HBM stops here, with what to change, before any host trains.
# JAX finds the other hosts from the TPU metadata (MMJAX_DISTRIBUTED=1 asks for that).
#
#   TPU_NAME=my-v5e-64 ZONE=us-west4-a REPO_URL=https://github.com/you/mmjax \
#     launch/tpu_pod.sh --config configs/siglip_b16.py --workdir /mnt/shared/runs/b16
#
# Variables: TPU_NAME, ZONE (required); PROJECT (default: gcloud's); REPO_URL (required)
# and REF (default main): the code each host checks out into ~/mmjax; TOPOLOGY (default: read
# from the TPU's accelerator config, e.g. v5e:8x8); SKIP_COMPILE_CHECK=1 skips the check. The
# workdir must be a path every host can write and read back (a Filestore/NFS mount or a gcsfuse
# bucket): checkpoints are written by all hosts, metrics by host 0.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${REPO_URL:?set REPO_URL}"
REF=${REF:-main}
TPU=(--zone "$ZONE" ${PROJECT:+--project "$PROJECT"})
ARGS=$(printf ' %q' "$@")

# The compile check takes the recipe flags: the training run's own flags are dropped.
COMPILE_ARGS=()
while (($#)); do
  case "$1" in
    --workdir|--coordinator_address|--num_processes|--process_id) shift 2 ;;
    --workdir=*|--coordinator_address=*|--num_processes=*|--process_id=*) shift ;;
    *) COMPILE_ARGS+=("$1"); shift ;;
  esac
done

if [ -z "${TOPOLOGY:-}" ]; then
  DESC=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${TPU[@]}" \
    --format='value(acceleratorConfig.type,acceleratorConfig.topology)') \
    || { echo "gcloud could not describe TPU $TPU_NAME: set TOPOLOGY (e.g. v5e:8x8)" >&2; exit 2; }
  read -r TYPE SHAPE <<< "$DESC"
  case "$TYPE" in
    V4) GEN=v4 ;; V5LITE_POD) GEN=v5e ;; V5P) GEN=v5p ;; V6E) GEN=v6e ;;
    *) echo "TPU $TPU_NAME reports type '$TYPE' (topology '$SHAPE'), which the compile check does not" \
         "know: set TOPOLOGY (e.g. v5e:8x8) or SKIP_COMPILE_CHECK=1" >&2; exit 2 ;;
  esac
  TOPOLOGY="$GEN:$SHAPE"
fi

ssh_tpu() {  # ssh_tpu WORKER COMMAND
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${TPU[@]}" --worker="$1" --command "$2"
}

ssh_tpu all "set -e
  [ -d ~/mmjax ] || git clone -q $REPO_URL ~/mmjax
  cd ~/mmjax && git fetch -q origin && git checkout -q $REF
  python3 -m pip install -q -e '.[tpu]'"

if [ "${SKIP_COMPILE_CHECK:-0}" != 1 ]; then
  echo "compiling the step for $TOPOLOGY on host 0 (SKIP_COMPILE_CHECK=1 skips this)"
  ssh_tpu 0 "cd ~/mmjax && JAX_PLATFORMS=cpu python3 -m mmjax.compile --topology $TOPOLOGY \
    --count_flops=false$(printf ' %q' "${COMPILE_ARGS[@]}")"
fi

ssh_tpu all "cd ~/mmjax && MMJAX_DISTRIBUTED=1 python3 -m mmjax.train$ARGS"
