#!/usr/bin/env bash
# Container entrypoint (both image targets; see docs/deploy.md).
#
# 1. Source CANN's toolkit and NNAL/ATB set_env.sh when they exist (torch_npu needs both on an
#    Ascend host); say so plainly when they do not.
# 2. Keep every variable the container was started with (docker run -e, a Kubernetes env list):
#    the vendor scripts set some variables unconditionally (NNAL sets LCCL_DETERMINISTIC=0, for
#    one); a value they replace is put back. Path lists they only extend keep the extension.
# 3. Default the launcher/torch_npu variables that are still unset.
# 4. exec the launcher with the container's arguments, unchanged.
#
# Knobs (environment):
#   ASCEND_TOOLKIT_ENV  CANN toolkit set_env.sh
#                       (default /usr/local/Ascend/ascend-toolkit/set_env.sh; empty = skip)
#   ASCEND_NNAL_ENV     NNAL/ATB set_env.sh      (default /usr/local/Ascend/nnal/atb/set_env.sh;
#                       empty = skip); sourced with --cxx_abi=${ATB_CXX_ABI:-1}
#   TGI_LAUNCHER        program to exec          (default text-generation-launcher)
set -eo pipefail

log() { printf 'tgi-npu-entrypoint: %s\n' "$*" >&2; }

# --- 1. the environment the container was started with -------------------------------------
declare -A started_with=()
while IFS= read -r -d '' pair; do
    started_with["${pair%%=*}"]="${pair#*=}"
done < <(env -0)

source_vendor_env() {  # LABEL PATH [ARGS...]
    local label=$1 script=$2
    shift 2
    if [[ -z $script ]]; then
        log "$label: skipped (no set_env.sh configured for this image)"
    elif [[ -f $script ]]; then
        set +eu  # vendor scripts are not written for errexit/nounset
        # shellcheck disable=SC1090
        source "$script" "$@"
        set -e
        log "$label: sourced $script"
    else
        log "$label: $script not found; continuing without it." \
            "torch_npu cannot use the NPU without CANN:" \
            "use the CANN base image or mount CANN there."
    fi
}

source_vendor_env "CANN toolkit" "${ASCEND_TOOLKIT_ENV-/usr/local/Ascend/ascend-toolkit/set_env.sh}"
source_vendor_env "NNAL/ATB" "${ASCEND_NNAL_ENV-/usr/local/Ascend/nnal/atb/set_env.sh}" \
    "--cxx_abi=${ATB_CXX_ABI:-1}"

# --- 2. what the container was started with wins ------------------------------------------
for name in "${!started_with[@]}"; do
    [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
    case $name in _ | SHLVL | PWD | OLDPWD) continue ;; esac
    before=${started_with[$name]}
    if [[ ${!name-} == "$before" && -n ${!name+set} ]]; then
        continue
    fi
    if [[ $name == *PATH && -n $before && ${!name-} == *"$before"* ]]; then
        continue  # a path list the vendor script extended: keep the extension
    fi
    export "$name=$before"
    log "kept $name as the container was started with it"
done

# --- 3. defaults for what is still unset ---------------------------------------------------
# ATTENTION is a hint to the shard (it always runs paged attention). TGI's launcher keeps a
# preset ATTENTION and, with `paged`, switches PREFIX_CACHING to 0 unless PREFIX_CACHING is set:
# pass -e PREFIX_CACHING=1 to turn the router's prefix reuse on. PREFIX_CACHING is not set here.
export ATTENTION="${ATTENTION-paged}"
# torch_npu: operator dispatch through the task queue (1 = on).
export TASK_QUEUE_ENABLE="${TASK_QUEUE_ENABLE-1}"
# HCCL: seconds to wait for peers when the tensor-parallel group first connects (ranks load
# their weights at different speeds; HCCL's own default is 120).
export HCCL_CONNECT_TIMEOUT="${HCCL_CONNECT_TIMEOUT-600}"
# torch_npu caching allocator: expandable segments limit fragmentation of the KV pool.
export PYTORCH_NPU_ALLOC_CONF="${PYTORCH_NPU_ALLOC_CONF-expandable_segments:True}"

# --- 4. the launcher -----------------------------------------------------------------------
launcher="${TGI_LAUNCHER:-text-generation-launcher}"
if ! command -v "$launcher" >/dev/null 2>&1; then
    log "$launcher is not on PATH ($PATH)"
    exit 127
fi
log "ATTENTION=$ATTENTION PREFIX_CACHING=${PREFIX_CACHING-<launcher decides>}" \
    "TASK_QUEUE_ENABLE=$TASK_QUEUE_ENABLE HCCL_CONNECT_TIMEOUT=$HCCL_CONNECT_TIMEOUT" \
    "PYTORCH_NPU_ALLOC_CONF=$PYTORCH_NPU_ALLOC_CONF"
log "exec $launcher with $# argument(s)"  # not echoed: they may hold secrets (--api-key)
exec "$launcher" "$@"
