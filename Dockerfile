# syntax=docker/dockerfile:1.7
# kosmos-serve images, two targets from one file (BuildKit):
#
#   docker build --target cpu  -t kosmos-serve:0.1.0 .
#   docker build --target cuda -t kosmos-serve:0.1.0-cuda --build-arg CUDA_COMPUTE_CAP=80 .
#
# Each image holds the `kosmos` command (`kosmos gateway|encoder|decoder|serve|ask|…`, the ENTRYPOINT) and the
# per-service binaries kosmos-gateway, kosmos-encoder and kosmos-decoder, plus the repository's tiny demo models in
# /usr/share/kosmos/models/demo (so `docker run … serve --listen 0.0.0.0:50051` answers with no volume) and
# /usr/share/kosmos/models/demo-doc (Kosmos-2.5: `serve --model /usr/share/kosmos/models/demo-doc`). Real
# models are mounted at /models/<name>. Both run as uid/gid 65532 and write nothing outside /tmp, so they work with
# a read-only root filesystem and an emptyDir (or tmpfs) on /tmp. See k8s/README.md.

ARG RUST_VERSION=1.95.0
# CUDA 13.0 Update 2, the release tools/cuda/build.sh builds the kernels with (nvcc 13.0.88).
ARG CUDA_VERSION=13.0.2
ARG CUDA_UBUNTU=ubuntu24.04
# The base images, by tag. They are not pinned by digest here: no digest could be read from the registries on the
# machine this file was last edited on, and a digest copied from elsewhere could not be checked. To build
# reproducibly, resolve each tag once (`docker buildx imagetools inspect IMAGE:TAG`, the `Digest:` line of the index)
# and pass it, e.g. --build-arg CPU_BASE=gcr.io/distroless/cc-debian12:nonroot@sha256:… (k8s/README.md, section 1).
ARG RUST_IMAGE=rust:${RUST_VERSION}-bookworm
ARG CPU_BASE=gcr.io/distroless/cc-debian12:nonroot
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:${CUDA_VERSION}-devel-${CUDA_UBUNTU}
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:${CUDA_VERSION}-runtime-${CUDA_UBUNTU}

# ---------------------------------------------------------------------------------------------------- CPU build
FROM ${RUST_IMAGE} AS build-cpu
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=kosmos-target-cpu \
    cargo build --release --locked -p kosmos -p kosmos-gateway -p kosmos-encoder -p kosmos-decoder \
 && mkdir -p /out \
 && cp target/release/kosmos target/release/kosmos-gateway target/release/kosmos-encoder target/release/kosmos-decoder /out/

# ---------------------------------------------------------------------------------------------------- CPU image
# distroless cc: glibc + libgcc, no shell, user `nonroot` = 65532. The probes are native gRPC and the preStop hook is
# the kubelet's own `sleep`, so nothing needs a shell.
FROM ${CPU_BASE} AS cpu
COPY --from=build-cpu /out/ /usr/local/bin/
COPY models/demo /usr/share/kosmos/models/demo
COPY models/demo-doc /usr/share/kosmos/models/demo-doc
ENV HOME=/tmp RUST_LOG=info
WORKDIR /usr/share/kosmos
USER 65532:65532
EXPOSE 50051 50052 50053 9090
ENTRYPOINT ["/usr/local/bin/kosmos"]
CMD ["--help"]

# --------------------------------------------------------------------------------------------------- CUDA build
# candle's `cuda` feature compiles its kernels with nvcc for one compute capability (bindgen_cuda reads
# CUDA_COMPUTE_CAP; there is no GPU to ask during a build). PTX for 80 also runs on 86/89/90 (A100, A10, L4, L40S,
# H100); use 75 for T4, 90 to tune for H100 only. (CUDA 13 compiles for compute capability 7.5 and newer only.)
FROM ${CUDA_DEVEL_IMAGE} AS build-cuda
ARG RUST_VERSION
ARG CUDA_COMPUTE_CAP=80
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} \
    RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:${PATH}
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl build-essential pkg-config \
 && rm -rf /var/lib/apt/lists/* \
 && curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --profile minimal --default-toolchain "${RUST_VERSION}" --no-modify-path
WORKDIR /src
COPY . .
# `kosmos/cuda` turns on kosmos-encoder/cuda and kosmos-decoder/cuda (-> kosmos-model/cuda -> candle's cuda); the
# per-service binaries share that kosmos-model build. The gateway never links candle.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=kosmos-target-cuda \
    cargo build --release --locked -p kosmos -p kosmos-gateway -p kosmos-encoder -p kosmos-decoder \
      --features kosmos/cuda \
 && mkdir -p /out \
 && cp target/release/kosmos target/release/kosmos-gateway target/release/kosmos-encoder target/release/kosmos-decoder /out/

# --------------------------------------------------------------------------------------------------- CUDA image
# The runtime flavour carries cudart, cuBLAS, cuRAND and NVRTC; the driver comes from the node (NVIDIA container
# toolkit / GPU operator).
FROM ${CUDA_RUNTIME_IMAGE} AS cuda
RUN groupadd --gid 65532 nonroot \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin nonroot
COPY --from=build-cuda /out/ /usr/local/bin/
COPY models/demo /usr/share/kosmos/models/demo
COPY models/demo-doc /usr/share/kosmos/models/demo-doc
# CUDA's JIT cache would go to ~/.nv: keep it on the writable /tmp.
ENV HOME=/tmp CUDA_CACHE_PATH=/tmp/cuda-cache RUST_LOG=info \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /usr/share/kosmos
USER 65532:65532
EXPOSE 50051 50052 50053 9090
ENTRYPOINT ["/usr/local/bin/kosmos"]
CMD ["--help"]
