#!/usr/bin/env bash
# N trainer processes on this machine, joined by jax.distributed on localhost; the CPU
# devices are split evenly among them. Each process reads only its slice of every batch.
#
#   launch/local_multiprocess.sh 2 --config configs/siglip_shapes.py --workdir runs/mp
#
# Variables: DEVICES (default 8) CPU devices in total; PORT (default 12355) the coordinator
# port; PYTHON (default: .venv/bin/python if present, else python3).
set -euo pipefail
N=${1:?usage: $0 N --config configs/<recipe>.py --workdir DIR [--config.key=value ...]}
shift
DEVICES=${DEVICES:-8}
PORT=${PORT:-12355}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if (( DEVICES % N )); then
  echo "DEVICES=$DEVICES is not divisible by N=$N" >&2
  exit 2
fi
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null' INT TERM  # SIGTERM: every process checkpoints and stops.
for (( i = 0; i < N; i++ )); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$(( DEVICES / N ))" \
    "$PYTHON" -m mmjax.train "$@" --coordinator_address="localhost:$PORT" --num_processes="$N" \
    --process_id="$i" &
  pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
