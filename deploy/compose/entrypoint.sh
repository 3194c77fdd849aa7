#!/usr/bin/env bash
# Entry point of the CEPO image (installed as /usr/local/bin/cepo-node): one Ray node per container.
#
#   cepo-node head           Ray head (GCS, dashboard; offers the `verifier` resource), the scrape-target
#                            publisher (deploy/compose/publish_targets.py) and the control API, `cepo serve`
#   cepo-node worker ROLE    a Ray worker node offering ROLE's custom resource (rollout, teacher, learner,
#                            verifier), so the services of that role are placed on it
#   cepo-node healthcheck    exit 0 when this container's node is up (head: the API answers /healthz)
#   cepo-node COMMAND ...    anything else runs as is (e.g. `cepo-node cepo train --address auto ...`)
#
# Settings (environment; docker-compose.yml and deploy/kuberay/ set them):
#   CEPO_RAY_PORT=6380            the head's GCS port (6379 is left to Redis)
#   CEPO_HEAD_ADDRESS=HOST:PORT   where workers find the head (default 127.0.0.1:$CEPO_RAY_PORT: host network)
#   CEPO_ROLE_SLOTS=1             how many of ROLE's resource a worker offers (replicas / ranks it can host)
#   CEPO_HEAD_RESOURCES='{"verifier": 2}'  the head's custom resources
#   CEPO_NUM_CPUS, CEPO_NUM_GPUS  Ray's --num-cpus / --num-gpus for this node (default: detected)
#   CEPO_OBJECT_STORE_BYTES       Ray's object store size (default 500 MB: many nodes share one host's memory)
#   CEPO_API_HOST=127.0.0.1, CEPO_API_PORT=8000   where `cepo serve` listens; any host but loopback needs
#                                 CEPO_API_TOKEN (clients then send Authorization: Bearer <token>)
#   CEPO_REDIS_URL                the run ledger (redis://:password@host:port/0), passed to `cepo serve --redis`
#   CEPO_DASHBOARD_PORT=8265, CEPO_RAY_CLIENT_PORT=10001, CEPO_TARGETS_DIR=/targets
# Under KubeRay (deploy/kuberay/, annotation ray.io/overwrite-container-cmd) the operator's generated
# `ray start` ($KUBERAY_GEN_RAY_START_CMD, from rayStartParams) replaces ours; the rest is the same.
# Under host networking every port of a scaled worker is chosen free at start (none is fixed), so replicas of
# one service never collide; only the head's ports above are fixed.
set -euo pipefail

RAY_PORT=${CEPO_RAY_PORT:-6380}
HEAD_ADDRESS=${CEPO_HEAD_ADDRESS:-127.0.0.1:$RAY_PORT}
OBJECT_STORE=${CEPO_OBJECT_STORE_BYTES:-500000000}
API_HOST=${CEPO_API_HOST:-127.0.0.1}
API_PORT=${CEPO_API_PORT:-8000}
HEAD_RESOURCES='{"verifier": 2}'
HEAD_RESOURCES=${CEPO_HEAD_RESOURCES:-$HEAD_RESOURCES}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }

node_args() {
  args=(--object-store-memory="$OBJECT_STORE" --disable-usage-stats
        --dashboard-agent-listen-port="$(free_port)" --metrics-export-port="$(free_port)")
  [ -n "${CEPO_NUM_CPUS:-}" ] && args+=(--num-cpus="$CEPO_NUM_CPUS")
  [ -n "${CEPO_NUM_GPUS:-}" ] && args+=(--num-gpus="$CEPO_NUM_GPUS")
  [ -n "${CEPO_NODE_IP:-}" ] && args+=(--node-ip-address="$CEPO_NODE_IP")
  return 0
}

stop() {
  trap - TERM INT
  [ -n "${child:-}" ] && kill -TERM "$child" 2>/dev/null || true
  ray stop --force >/dev/null 2>&1 || true  # only this container's processes: its own PID namespace
  exit 0
}

case "${1:-head}" in
  head)
    if [ -n "${KUBERAY_GEN_RAY_START_CMD:-}" ]; then
      # KubeRay (ray.io/overwrite-container-cmd): its own `ray start` (rayStartParams, with --block) instead
      bash -c "$KUBERAY_GEN_RAY_START_CMD" &
      until ray status >/dev/null 2>&1; do sleep 2; done
    else
      node_args
      ray start --head --port="$RAY_PORT" --resources="$HEAD_RESOURCES" \
        --include-dashboard=true --dashboard-host=0.0.0.0 --dashboard-port="${CEPO_DASHBOARD_PORT:-8265}" \
        --ray-client-server-port="${CEPO_RAY_CLIENT_PORT:-10001}" "${args[@]}"
    fi
    trap stop TERM INT
    python3 /work/deploy/compose/publish_targets.py &
    serve=(cepo serve --host "$API_HOST" --port "$API_PORT" --address auto --root runs)
    [ -n "${CEPO_REDIS_URL:-}" ] && serve+=(--redis "$CEPO_REDIS_URL")
    if cepo serve --help >/dev/null 2>&1; then
      "${serve[@]}" &
    else
      echo "cepo-node: this cepo has no 'serve' command; the head runs Ray only" >&2
      sleep infinity &
    fi
    child=$!
    wait "$child"
    ;;
  worker)
    role=${2:?usage: cepo-node worker ROLE}
    # KubeRay: its `ray start --block` (the role's resource is in the worker group's rayStartParams)
    [ -n "${KUBERAY_GEN_RAY_START_CMD:-}" ] && exec bash -c "$KUBERAY_GEN_RAY_START_CMD"
    node_args
    # the head may still be starting (compose orders containers, podman-compose does not wait for health)
    for _ in $(seq 150); do
      python3 -c 'import socket, sys; h, p = sys.argv[1].rsplit(":", 1); socket.create_connection((h, int(p)), 2)' \
        "$HEAD_ADDRESS" 2>/dev/null && break
      sleep 2
    done
    ray start --address="$HEAD_ADDRESS" --resources="{\"$role\": ${CEPO_ROLE_SLOTS:-1}}" "${args[@]}"
    trap stop TERM INT
    # --block would tie the container to `ray start`'s own process; watch the raylet instead
    while pgrep -x raylet >/dev/null; do sleep 5 & child=$!; wait "$child"; done
    echo "cepo-node: raylet exited" >&2
    exit 1
    ;;
  healthcheck)
    pgrep -x raylet >/dev/null || exit 1
    if pgrep -f "cepo serve" >/dev/null; then
      auth=()
      [ -n "${CEPO_API_TOKEN:-}" ] && auth=(-H "Authorization: Bearer $CEPO_API_TOKEN")
      curl -fsS -o /dev/null "${auth[@]}" "http://127.0.0.1:$API_PORT/healthz"
    fi
    ;;
  *)
    exec "$@"
    ;;
esac
