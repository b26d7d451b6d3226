#!/usr/bin/env bash
# Container smoke test: build the Dockerfile's CPU target on this machine and get an answer from
# /generate inside the running container. No registry is needed and nothing reaches the network
# from inside: the Debian base image is made with debootstrap + `docker import`, the Python
# wheels are downloaded on the host into docker/wheels/, and both the build (PIP_NO_INDEX=1,
# --network none) and the container (--network none) run offline.
#
# Not part of the test suite: it needs root, a few GB of disk and several minutes.
#   scripts/container_smoke.sh      # output also goes to $SMOKE_LOG (/tmp/container_smoke.log)
#
# Environment:
#   SMOKE_LOG        log file (default /tmp/container_smoke.log)
#   SMOKE_WORKDIR    scratch space for the root filesystem (default /tmp/tgi-npu-smoke)
#   SMOKE_KEEP=1     keep the images, the volume and the wheels afterwards
#   DEBIAN_MIRROR    for debootstrap (default http://deb.debian.org/debian)
#   SMOKE_PIP_TORCH_ARGS  extra `pip download` arguments for torch, e.g.
#                    "--index-url https://download.pytorch.org/whl/cpu" where the host's pip does
#                    not already provide the CPU build of torch (this script refuses CUDA wheels)
set -euo pipefail
cd "$(dirname "$0")/.."

LOG=${SMOKE_LOG:-/tmp/container_smoke.log}
WORK=${SMOKE_WORKDIR:-/tmp/tgi-npu-smoke}
KEEP=${SMOKE_KEEP:-0}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_IMAGE=tgi-npu-smoke/debian-python:bookworm
IMAGE=tgi-npu-smoke/cpu:smoke
CONTAINER=tgi-npu-smoke
VOLUME=tgi-npu-smoke-data
WHEELS=docker/wheels
STARTED_DOCKERD=""

exec > >(tee "$LOG") 2>&1
step() { printf '\n==== %s [%s]\n' "$*" "$(date -u +%H:%M:%S)"; }
fail() { printf 'SMOKE FAILED: %s\n' "$*"; exit 1; }

cleanup() {
    local rc=$?
    step "cleanup (exit status $rc)"
    if [[ $rc -ne 0 ]] && docker inspect "$CONTAINER" >/dev/null 2>&1; then
        echo "--- container log (last 60 lines)"
        docker logs --tail 60 "$CONTAINER" 2>&1 || true
    fi
    docker rm -f "$CONTAINER" >/dev/null 2>&1 || true
    if [[ $KEEP != 1 ]]; then
        docker volume rm -f "$VOLUME" >/dev/null 2>&1 || true
        # Removing the tagged images also removes the legacy builder's untagged parent layers.
        docker rmi -f "$IMAGE" "$BASE_IMAGE" >/dev/null 2>&1 || true
        find "$WHEELS" -mindepth 1 ! -name .gitignore -delete 2>/dev/null || true
        rm -rf "$WORK"
        echo "removed the images, the volume, the wheels and $WORK"
    fi
    if [[ -n $STARTED_DOCKERD ]]; then
        kill "$STARTED_DOCKERD" 2>/dev/null || true
        echo "stopped the dockerd this script started (pid $STARTED_DOCKERD)"
    fi
    df -h / | tail -1
    exit "$rc"
}
trap cleanup EXIT

step "disk"
df -h / /tmp | sed 1d

step "tools: docker, debootstrap"
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap
fi
if ! docker info >/dev/null 2>&1; then
    mkdir -p "$WORK"
    dockerd > "$WORK/dockerd.log" 2>&1 &
    STARTED_DOCKERD=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || fail "dockerd did not start (log: $WORK/dockerd.log)"
fi
docker version --format 'docker client {{.Client.Version}}, daemon {{.Server.Version}}'
docker info --format 'storage driver {{.Driver}}'

step "base image $BASE_IMAGE (debootstrap bookworm + docker import)"
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    rm -rf "$WORK/rootfs"
    mkdir -p "$WORK"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$WORK/rootfs" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap"; }
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
    # An imported image has no environment: give it the PATH the Dockerfile extends.
    tar -C "$WORK/rootfs" -c . | docker import \
        -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'ENV LANG=C.UTF-8' - "$BASE_IMAGE"
    rm -rf "$WORK/rootfs"
fi
container_py=$(docker run --rm --network none "$BASE_IMAGE" python3 -c \
    'import sys; print("%d.%d" % sys.version_info[:2])')
host_py=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
echo "Python in the base image: $container_py; on the host: $host_py"
[[ $container_py == "$host_py" ]] \
    || fail "the host's Python downloads the wheels: run this with a Python $container_py"

step "wheels for an offline build ($WHEELS)"
find "$WHEELS" -mindepth 1 ! -name .gitignore -delete
mkdir -p "$WORK"
python3 docker/pyproject_deps.py > "$WORK/requirements.txt"
torch_version=$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile | head -1)
# One resolution for everything, with torch pinned as the image pins it (else `torch>=2.1` from
# pyproject.toml would fetch the newest torch). pip's notes about unused local indexes are dropped.
# shellcheck disable=SC2086
python3 -m pip download -q -d "$WHEELS" "torch==$torch_version" -r "$WORK/requirements.txt" \
    "setuptools>=68" wheel ${SMOKE_PIP_TORCH_ARGS:-} 2>&1 \
    | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
if compgen -G "$WHEELS/nvidia_*" >/dev/null; then
    fail "pip fetched CUDA wheels for torch; set SMOKE_PIP_TORCH_ARGS to a CPU wheel source"
fi
echo "$(find "$WHEELS" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1);" \
    "torch: $(basename "$WHEELS"/torch-*.whl)"

step "docker build --target cpu (legacy builder, --network none, PIP_NO_INDEX=1)"
build_start=$(date +%s)
DOCKER_BUILDKIT=0 docker build --network none --target cpu \
    --build-arg "CPU_BASE_IMAGE=$BASE_IMAGE" --build-arg PIP_NO_INDEX=1 \
    -t "$IMAGE" . 2>&1 \
    | grep --line-buffered -v -E '^(Requirement already satisfied|Processing /tmp/wheels)' \
    || fail "docker build"
echo "built in $(($(date +%s) - build_start)) s"
docker image inspect "$IMAGE" --format \
    'entrypoint={{json .Config.Entrypoint}} user={{.Config.User}} ports={{json .Config.ExposedPorts}}
healthcheck={{json .Config.Healthcheck.Test}} size={{.Size}}'

step "demo checkpoint into volume $VOLUME (tgi-npu-demo-checkpoint, inside the image)"
docker volume create "$VOLUME" >/dev/null
docker run --rm --network none -v "$VOLUME:/data" --entrypoint tgi-npu-demo-checkpoint \
    "$IMAGE" /data/demo-bloom

step "docker run (the image's ENTRYPOINT, --network none)"
docker run -d --name "$CONTAINER" --network none -v "$VOLUME:/data" \
    -e TGI_NPU_KV_CACHE_FRACTION=0.02 -e TASK_QUEUE_ENABLE=2 \
    --health-interval 5s --health-start-period 600s \
    "$IMAGE" --model-id /data/demo-bloom >/dev/null
health=starting
for _ in $(seq 120); do
    health=$(docker inspect -f '{{.State.Health.Status}}' "$CONTAINER")
    running=$(docker inspect -f '{{.State.Running}}' "$CONTAINER")
    [[ $running == true ]] || fail "the container exited"
    [[ $health == healthy ]] && break
    sleep 5
done
[[ $health == healthy ]] || fail "not healthy after 600 s (health: $health)"
echo "container health: $health"
echo "--- container log (entrypoint and launcher, first 25 lines)"
docker logs "$CONTAINER" 2>&1 | head -25

step "inside the container"
docker exec "$CONTAINER" id
echo "--- the launcher's environment (pid 1, after the entrypoint's exec)"
docker exec "$CONTAINER" sh -c 'tr "\0" "\n" < /proc/1/environ | sort | grep -E \
    "^(ATTENTION|PREFIX_CACHING|TASK_QUEUE_ENABLE|HCCL_CONNECT_TIMEOUT|PYTORCH_NPU_ALLOC_CONF|TGI_LAUNCHER)="'
docker exec "$CONTAINER" sh -c 'echo "pid 1: $(tr "\0" " " < /proc/1/cmdline)"'

step "POST /generate inside the container"
docker exec -i "$CONTAINER" python3 - <<'EOF'
import json
import urllib.request

opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
body = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 12, "details": True}}
req = urllib.request.Request(
    "http://127.0.0.1:8080/generate",
    data=json.dumps(body).encode(),
    headers={"Content-Type": "application/json"},
)
with opener.open(req, timeout=120) as r:
    answer = json.load(r)
    print("HTTP", r.status)
print(json.dumps(answer, ensure_ascii=False)[:600])
details = answer["details"]
assert details["generated_tokens"] == 12 and details["finish_reason"] == "length", details
with opener.open("http://127.0.0.1:8080/info", timeout=30) as r:
    info = json.load(r)
keys = ("model_id", "max_input_tokens", "max_total_tokens", "router")
print("/info:", {k: info.get(k) for k in keys})
EOF

step "SMOKE PASSED"
