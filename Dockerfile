# Images of tgi-npu-backend; docs/deploy.md says how to build and run them.
#
#   docker build -t tgi-npu-backend:0.1.0 .
#       Ascend 910B/A2 (default target `npu`): TGI's stock launcher + v3 router + this shard
#   docker build --target cpu -t tgi-npu-backend:0.1.0-cpu .
#       CPU only: tgi-npu-launcher + this shard
#
# Stage order: cpu | tgi-builder | npu. The CPU target comes first so that a builder which runs
# every stage before its target (the legacy builder) never needs the CANN image or Rust for it.
#
# Build arguments (defaults below):
#   CANN_IMAGE       CANN 9.2.0 for Ascend 910B, Ubuntu 22.04, Python 3.11. CANN 9.2.0 is the
#                    version torch-npu 2.13.0 (TorchNPU 26.2.0) is released against.
#   CPU_BASE_IMAGE   Python 3.11 on Debian bookworm (any Python >= 3.11 base with `venv` works).
#   TORCH_VERSION    must equal the torch pin of the `npu` extra in pyproject.toml.
#   TORCH_INDEX_URL  where torch comes from: PyTorch's CPU wheel index (the default torch wheel
#                    on x86_64 PyPI is the multi-GB CUDA build; torch_npu runs on the CPU build).
#   PIP_NO_INDEX     1 = install only from the wheels in docker/wheels/ (a build without network,
#                    as scripts/container_smoke.sh does); pip reads it from the environment.
#   TGI_VERSION, TGI_COMMIT  the TGI release the two Rust binaries are built from; the commit
#                    is checked so a moved tag fails the build.
ARG CANN_IMAGE=quay.io/ascend/cann:9.2.0-910b-ubuntu22.04-py3.11
ARG CPU_BASE_IMAGE=python:3.11-slim-bookworm

# ============================================================================================
# cpu: the same layout as `npu`, serving with tgi-npu-launcher (Python launcher + v3 router)
# ============================================================================================
FROM ${CPU_BASE_IMAGE} AS cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_NO_INDEX=0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --gid 1000 tgi \
    && useradd --uid 1000 --gid tgi --create-home --shell /bin/bash tgi \
    && install -d -o tgi -g tgi /data \
    && python3 -m venv /opt/venv

# Dependencies first (torch, then pyproject.toml's list): code edits leave these layers cached.
COPY docker/wheels/ /tmp/wheels/
RUN pip install --find-links /tmp/wheels --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}"
COPY pyproject.toml docker/pyproject_deps.py /tmp/deps/
RUN python3 /tmp/deps/pyproject_deps.py /tmp/deps/pyproject.toml > /tmp/deps/requirements.txt \
    && pip install --find-links /tmp/wheels -r /tmp/deps/requirements.txt \
    && rm -rf /tmp/deps

# The package (non-editable; no dependency resolution: they are installed above).
COPY pyproject.toml README.md /opt/tgi-npu-backend/
COPY tgi_npu_backend /opt/tgi-npu-backend/tgi_npu_backend
COPY models /opt/tgi-npu-backend/models
COPY device_kernels /opt/tgi-npu-backend/device_kernels
COPY launcher /opt/tgi-npu-backend/launcher
COPY npu_emulation /opt/tgi-npu-backend/npu_emulation
RUN pip install --find-links /tmp/wheels --no-deps /opt/tgi-npu-backend \
    && rm -rf /opt/tgi-npu-backend/build /tmp/wheels \
    && text-generation-server --help > /dev/null \
    && tgi-npu-launcher --help > /dev/null

COPY docker/entrypoint.sh /usr/local/bin/tgi-npu-entrypoint
COPY docker/healthcheck.py /usr/local/bin/tgi-npu-healthcheck
RUN chmod 0755 /usr/local/bin/tgi-npu-entrypoint /usr/local/bin/tgi-npu-healthcheck

# No CANN here: the entrypoint skips set_env.sh and execs the Python launcher.
ENV TGI_LAUNCHER=tgi-npu-launcher \
    TGI_NPU_DEVICE=cpu \
    ASCEND_TOOLKIT_ENV="" \
    ASCEND_NNAL_ENV="" \
    HF_HOME=/data \
    HOME=/home/tgi \
    PORT=8080
USER 1000:1000
WORKDIR /home/tgi
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["/usr/local/bin/tgi-npu-healthcheck"]
ENTRYPOINT ["/usr/local/bin/tgi-npu-entrypoint"]

# ============================================================================================
# tgi-builder: TGI's text-generation-launcher and v3 router, stock, from a pinned release
# ============================================================================================
# Built on the CANN image itself: both binaries embed Python through pyo3 and link the image's
# libpython, and they must match the runtime's glibc.
FROM ${CANN_IMAGE} AS tgi-builder
ARG TGI_VERSION=v3.3.7
ARG TGI_COMMIT=dfb3fbe78e0d1d69251bd33065591c61bafdfaa8
# TGI's rust-toolchain.toml at that tag.
ARG RUST_VERSION=1.85.1
# TGI's release-opt profile: fat LTO, one codegen unit (slow to build, what TGI ships).
ARG CARGO_PROFILE=release-opt
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# protoc: Ubuntu 22.04's 3.12 accepts the --experimental_allow_proto3_optional flag that
# backends/v3/build.rs passes. libssl-dev + pkg-config: openssl-sys (reqwest, hf-hub).
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates curl git pkg-config libssl-dev protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/opt/rustup \
    CARGO_HOME=/opt/cargo \
    PATH=/opt/cargo/bin:${PATH}
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --no-modify-path --profile minimal --default-toolchain "${RUST_VERSION}"
WORKDIR /usr/src/tgi
RUN git clone --depth 1 --branch "${TGI_VERSION}" \
        https://github.com/huggingface/text-generation-inference.git . \
    && actual="$(git rev-parse HEAD)" \
    && if [ "${actual}" != "${TGI_COMMIT}" ]; then \
        echo "TGI ${TGI_VERSION} is at ${actual}, expected ${TGI_COMMIT}" >&2; exit 1; fi
# Package text-generation-router-v3 builds the binary `text-generation-router`, which is the
# program text-generation-launcher starts.
RUN cargo build --locked --profile "${CARGO_PROFILE}" \
        --package text-generation-launcher --package text-generation-router-v3 \
    && install -D -m 0755 -t /out \
        "target/${CARGO_PROFILE}/text-generation-launcher" \
        "target/${CARGO_PROFILE}/text-generation-router"

# ============================================================================================
# npu (default): CANN + torch + torch-npu + this shard + TGI's launcher and router
# ============================================================================================
FROM ${CANN_IMAGE} AS npu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_NO_INDEX=0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The venv sees the CANN image's Python packages (the toolkit's operator compiler needs them).
# The Rust binaries load libpython: its directory goes into the loader's search path.
RUN groupadd --gid 1000 tgi \
    && useradd --uid 1000 --gid tgi --create-home --shell /bin/bash tgi \
    && install -d -o tgi -g tgi /data \
    && python3 -m venv --system-site-packages /opt/venv \
    && python3 -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))' \
        > /etc/ld.so.conf.d/tgi-npu-python.conf \
    && ldconfig

COPY docker/wheels/ /tmp/wheels/
RUN pip install --find-links /tmp/wheels --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}"
# pyproject.toml's dependencies and the `npu` extra (torch-npu, pinned to the torch above).
COPY pyproject.toml docker/pyproject_deps.py /tmp/deps/
RUN python3 /tmp/deps/pyproject_deps.py /tmp/deps/pyproject.toml --extra npu \
        > /tmp/deps/requirements.txt \
    && pip install --find-links /tmp/wheels -r /tmp/deps/requirements.txt \
    && rm -rf /tmp/deps

COPY --from=tgi-builder /out/text-generation-launcher /out/text-generation-router /usr/local/bin/
RUN text-generation-launcher --help > /dev/null && text-generation-router --help > /dev/null

COPY pyproject.toml README.md /opt/tgi-npu-backend/
COPY tgi_npu_backend /opt/tgi-npu-backend/tgi_npu_backend
COPY models /opt/tgi-npu-backend/models
COPY device_kernels /opt/tgi-npu-backend/device_kernels
COPY launcher /opt/tgi-npu-backend/launcher
COPY npu_emulation /opt/tgi-npu-backend/npu_emulation
# TORCH_DEVICE_BACKEND_AUTOLOAD=0: no NPU driver at build time, so torch_npu must not load here.
RUN pip install --find-links /tmp/wheels --no-deps /opt/tgi-npu-backend \
    && rm -rf /opt/tgi-npu-backend/build /tmp/wheels \
    && TORCH_DEVICE_BACKEND_AUTOLOAD=0 text-generation-server --help > /dev/null

COPY docker/entrypoint.sh /usr/local/bin/tgi-npu-entrypoint
COPY docker/healthcheck.py /usr/local/bin/tgi-npu-healthcheck
RUN chmod 0755 /usr/local/bin/tgi-npu-entrypoint /usr/local/bin/tgi-npu-healthcheck

ENV HF_HOME=/data \
    HOME=/home/tgi \
    PORT=8080
# Non-root: the Ascend device nodes belong to the host's HwHiAiUser group; add its gid with
# `docker run --group-add` (docs/deploy.md), or run with --user root where that is not enough.
USER 1000:1000
WORKDIR /home/tgi
# 8080: TGI's HTTP API (PORT); 9000: the router's Prometheus endpoint.
EXPOSE 8080 9000
HEALTHCHECK --interval=30s --timeout=10s --start-period=900s --retries=3 \
    CMD ["/usr/local/bin/tgi-npu-healthcheck"]
ENTRYPOINT ["/usr/local/bin/tgi-npu-entrypoint"]
