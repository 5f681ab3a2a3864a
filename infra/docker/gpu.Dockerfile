# syntax=docker/dockerfile:1.7
# The GPU worker: `ember serve` with CUDA, for the ECS service in infra/ember.yaml.
# Build from the repository root:
#   docker build -f infra/docker/gpu.Dockerfile --build-arg CUDA_COMPUTE_CAP=86 -t ember-gpu .
# CUDA_COMPUTE_CAP is the GPU's compute capability without the dot: 86 for g5 (A10G), 89 for
# g6 (L4), 90 for p5 (H100). The runtime image's CUDA must not be newer than the host driver
# (the ECS GPU AMI's driver supports CUDA 12.x).

ARG CUDA_VERSION=12.6.3
ARG UBUNTU=ubuntu24.04

FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS builder
ARG RUST_VERSION=1.95.0
ARG CUDA_COMPUTE_CAP=86
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl ca-certificates build-essential pkg-config cmake \
 && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain ${RUST_VERSION}
ENV PATH=/root/.cargo/bin:$PATH \
    CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
WORKDIR /src
COPY . .
# The cargo registry and target directories are cache mounts: rebuilds after a code change
# reuse the compiled dependencies (candle's CUDA kernels take most of a cold build).
RUN --mount=type=cache,target=/root/.cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --features cuda -p ember-worker \
 && cp target/release/ember /usr/local/bin/ember

FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU}
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --create-home ember
COPY --from=builder /usr/local/bin/ember /usr/local/bin/ember
USER ember
ENV EMBER_DEVICE=cuda \
    EMBER_CACHE_DIR=/tmp/ember-cache \
    EMBER_NO_PROGRESS=true
# `docker stop` / ECS scale-in send SIGTERM: running jobs get --grace-seconds, the rest go
# back to the queue.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/ember"]
CMD ["serve"]
