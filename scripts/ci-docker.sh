# Bring up a Docker engine and the CI Python base image. Meant to be *sourced* (by .ci/run or a dev shell):
#
#   source scripts/ci-docker.sh          # exports DOCKER_HOST; an EXIT trap stops dockerd and removes its dir
#
# What it does (see docs/images.md and /work/shared/docs/images.md §1c-§1d for why):
#   1. installs docker.io, debootstrap and docker-registry (for the push test) with apt if they are missing;
#   2. starts dockerd by hand with data-root/exec-root in a temporary dir (no systemd here), waits until it answers;
#   3. builds a bookworm + python3.11 rootfs with debootstrap and `docker import`s it as $SYNTHEHR_CI_BASE_IMAGE
#      (default local/python:3.11-bookworm), the stand-in for python:3.11-slim-bookworm, which cannot be pulled here.
# Knobs: SYNTHEHR_CI_BASE_IMAGE, SYNTHEHR_DOCKER_DIR (reuse a dir instead of mktemp), SYNTHEHR_DOCKER_KEEP=1 (no trap:
# the engine outlives the shell; stop it later with `kill "$(cat "$SYNTHEHR_DOCKER_DIR/pid")"`).
# No CA bundle is copied into the rootfs: image builds are offline (wheelhouse + network_mode=none).

_synthehr_t0=$(date +%s)
_synthehr_log() { echo "ci-docker: $* (+$(( $(date +%s) - _synthehr_t0 )) s)"; }
: "${SYNTHEHR_CI_BASE_IMAGE:=local/python:3.11-bookworm}"

if ! command -v dockerd >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1 \
        || ! command -v docker-registry >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        docker.io debootstrap docker-registry >/dev/null
    _synthehr_log "installed docker.io + debootstrap + docker-registry"
fi

SYNTHEHR_DOCKER_DIR=${SYNTHEHR_DOCKER_DIR:-$(mktemp -d /tmp/synthehr-docker.XXXXXX)}
export SYNTHEHR_DOCKER_DIR
export DOCKER_HOST="unix://$SYNTHEHR_DOCKER_DIR/docker.sock"

synthehr_docker_down() {
    # Stop the dockerd started below (by its PID, never by name) and remove its data-root (several GB).
    local pid
    pid=$(cat "$SYNTHEHR_DOCKER_DIR/pid" 2>/dev/null || true)
    if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then
        for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    fi
    rm -rf "$SYNTHEHR_DOCKER_DIR"
}

if ! docker info >/dev/null 2>&1; then
    mkdir -p "$SYNTHEHR_DOCKER_DIR"
    dockerd --data-root "$SYNTHEHR_DOCKER_DIR/root" --exec-root "$SYNTHEHR_DOCKER_DIR/exec" \
        --pidfile "$SYNTHEHR_DOCKER_DIR/pid" -H "$DOCKER_HOST" >"$SYNTHEHR_DOCKER_DIR/dockerd.log" 2>&1 &
    if [ "${SYNTHEHR_DOCKER_KEEP:-0}" != 1 ]; then
        trap synthehr_docker_down EXIT
    fi
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    if ! docker info >/dev/null 2>&1; then
        echo "ci-docker: dockerd did not answer on $DOCKER_HOST within 30 s; its log:" >&2
        tail -n 30 "$SYNTHEHR_DOCKER_DIR/dockerd.log" >&2
        return 1 2>/dev/null || exit 1
    fi
    _synthehr_log "dockerd up on $DOCKER_HOST"
fi

if ! docker image inspect "$SYNTHEHR_CI_BASE_IMAGE" >/dev/null 2>&1; then
    _synthehr_rootfs="$SYNTHEHR_DOCKER_DIR/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$_synthehr_rootfs" >"$SYNTHEHR_DOCKER_DIR/debootstrap.log" 2>&1 \
        || { tail -n 30 "$SYNTHEHR_DOCKER_DIR/debootstrap.log" >&2; return 1 2>/dev/null || exit 1; }
    rm -rf "$_synthehr_rootfs"/var/cache/apt/archives/*.deb "$_synthehr_rootfs"/var/lib/apt/lists/*
    tar -C "$_synthehr_rootfs" -c . | docker import --change 'CMD ["/usr/bin/python3"]' - "$SYNTHEHR_CI_BASE_IMAGE" >/dev/null
    rm -rf "$_synthehr_rootfs"
    _synthehr_log "imported debootstrap bookworm base as $SYNTHEHR_CI_BASE_IMAGE"
fi
_synthehr_log "ready"
