#!/usr/bin/env bash
# The compose test (`make compose-test`): docker-compose.yml for real, with podman, offline.
#
#   1. builds the image (deploy/images/build.sh: cached base, wheelhouse and layers) and the tiny model;
#   2. brings up head + 2 rollout + 1 teacher + 1 learner + Redis + Prometheus with podman-compose (pinned, in
#      its own virtual environment under the cache), on test ports that leave the defaults to others;
#   3. deploy/compose/check.py: every Ray node joined with its role's resource, a 2-step tiny run submitted
#      through the control API finishes, its Redis record says finished, and every Prometheus target is up;
#   4. tears everything down (containers and volumes), also on failure, printing the services' logs then.
#
# podman without systemd runs no health-check timers and podman-compose does not wait for `service_healthy`:
# the workers wait for the head themselves (cepo-node), and check.py waits for the API and the nodes.
#
# Needs root (podman; its settings in deploy/podman/) and the project's .venv (`make setup`); installs debootstrap, podman and runc
# with apt-get when they are missing. Timings go to stdout ([compose-test mm:ss] lines).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
CACHE=${CEPO_DEPLOY_CACHE:-$HOME/.cache/cepo-deploy}
PODMAN_COMPOSE_VERSION=1.6.0
export CONTAINERS_CONF=${CONTAINERS_CONF:-$REPO/deploy/podman/containers.conf}
export CONTAINERS_STORAGE_CONF=${CONTAINERS_STORAGE_CONF:-$REPO/deploy/podman/storage.conf}
START=$SECONDS
log() { printf '[compose-test %02d:%02d] %s\n' $(((SECONDS - START) / 60)) $(((SECONDS - START) % 60)) "$*"; }

# --- 1. image, podman-compose, model
log "building the image (deploy/images/build.sh)"
build_out=$(mktemp)
bash deploy/images/build.sh | tee "$build_out"
BASE_IMAGE=$(sed -n 's/^BASE_IMAGE=//p' "$build_out")
rm -f "$build_out"
: "${BASE_IMAGE:?build.sh did not name its base image}"
log "image ready"

COMPOSE_VENV=$CACHE/podman-compose-$PODMAN_COMPOSE_VERSION
if [ ! -x "$COMPOSE_VENV/bin/podman-compose" ]; then
  python3 -m venv "$COMPOSE_VENV"
  "$COMPOSE_VENV/bin/pip" install -q "podman-compose==$PODMAN_COMPOSE_VERSION"
fi
.venv/bin/cepo bootstrap >/dev/null # models/tiny-arith (cached)

# --- 2. bring up, on ports of its own
export CEPO_IMAGE=localhost/cepo:cpu REDIS_IMAGE=$BASE_IMAGE PROMETHEUS_IMAGE=$BASE_IMAGE
export CEPO_RAY_PORT=${CEPO_RAY_PORT:-26380} CEPO_API_PORT=${CEPO_API_PORT:-28000}
export CEPO_REDIS_PORT=${CEPO_REDIS_PORT:-26379} CEPO_PROMETHEUS_PORT=${CEPO_PROMETHEUS_PORT:-29090}
export CEPO_DASHBOARD_PORT=${CEPO_DASHBOARD_PORT:-28265} CEPO_RAY_CLIENT_PORT=${CEPO_RAY_CLIENT_PORT:-20001}
export REDIS_PASSWORD=compose-test-$RANDOM$RANDOM
export CEPO_MODELS=$REPO/models
CEPO_RUNS=$(mktemp -d /tmp/cepo-compose-runs.XXXXXX)
export CEPO_RUNS
PROJECT=cepo-compose-test
compose() { "$COMPOSE_VENV/bin/podman-compose" --in-pod false -p "$PROJECT" -f docker-compose.yml "$@"; }

teardown() {
  status=$?
  trap - EXIT INT TERM
  if [ "$status" != 0 ]; then
    log "FAILED (exit $status): the services' logs"
    for c in $(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}'); do
      echo "----- $c"
      podman logs --tail 60 "$c" 2>&1 || true
    done
    find "$CEPO_RUNS" -maxdepth 4 -name '*.log' | while read -r f; do
      echo "----- $f"
      grep -v '^\s' "$f" | tail -40
    done
    # the Ray nodes' own logs (the actors' stderr, where a vLLM engine's real error is) live in each
    # container's /tmp/ray: copied out before the containers go, their error lines printed
    for c in $(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}'); do
      podman cp "$c:/tmp/ray/session_latest/logs" "$CEPO_RUNS/ray-logs-$c" >/dev/null 2>&1 || continue
      echo "----- $c: errors in /tmp/ray/session_latest/logs (copied to $CEPO_RUNS/ray-logs-$c)"
      grep -h -E "Error|error:|Traceback" "$CEPO_RUNS/ray-logs-$c"/worker-*.err 2>/dev/null | sort -u | tail -20 || true
    done
    if [ -n "${CEPO_COMPOSE_KEEP:-}" ]; then
      log "kept $CEPO_RUNS"
      CEPO_RUNS=/nonexistent
    fi
  fi
  log "tearing down"
  # this project's containers, all at once (`podman-compose down` stops them one by one, and podman's
  # --requires links, from depends_on, refuse a partial removal), then its volumes
  for _ in 1 2 3; do # dependents first: a container whose dependents still exist is refused, so go again
    podman ps -aq --filter "label=io.podman.compose.project=$PROJECT" | xargs -r podman rm -f -t 10 >/dev/null 2>&1 || true
  done
  podman volume ls -q --filter "label=io.podman.compose.project=$PROJECT" | xargs -r podman volume rm -f >/dev/null 2>&1 || true
  rm -rf "$CEPO_RUNS"
  log "done (exit $status)"
  exit "$status"
}
trap teardown EXIT INT TERM

log "podman-compose up: head, 2 rollout, 1 teacher, 1 learner, redis, prometheus"
# (podman-compose 1.6 honours only the last --scale given; teacher and learner have one replica by default)
compose up -d --scale rollout=2 >"$CEPO_RUNS/compose-up.log" 2>&1 ||
  { cat "$CEPO_RUNS/compose-up.log"; exit 1; }
podman ps --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}  {{.Status}}'

# --- 3. the checks
log "checking the cluster, a 2-step run, Redis and Prometheus"
.venv/bin/python deploy/compose/check.py \
  --api "http://127.0.0.1:$CEPO_API_PORT" --prometheus "http://127.0.0.1:$CEPO_PROMETHEUS_PORT" \
  --redis "redis://:$REDIS_PASSWORD@127.0.0.1:$CEPO_REDIS_PORT/0" \
  --head "$(podman ps --filter "label=io.podman.compose.project=$PROJECT" \
    --filter "label=io.podman.compose.service=head" --format '{{.Names}}' | head -1)" \
  --nodes rollout=2,teacher=1,learner=1,verifier=1 --steps 2
log "passed"
