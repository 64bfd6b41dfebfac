# Spawner's images, all from one `spawner` binary (docs/images.md):
#
#   target      image                 CMD (deploy/ and the controller pass their own args)
#   spawner     spawner (default)     --help      debian-slim with a shell: every component,
#                                                 `spawner dev`, and the e2e suites' test apps
#   controller  spawner-controller    controller  distroless-like: the binary, its C libraries,
#   api         spawner-api           api         CA certificates and /etc/passwd, nothing else
#   sweeper     spawner-sweeper       sweeper
#   router      spawner-router        router
#   sidecar     spawner-sidecar       sidecar
#
# Users:  docker build -t spawner:dev .                          (compiles in rust:1-bookworm)
#         docker build --target sidecar -t spawner-sidecar:dev .
# CI:     scripts/images.sh builds every target from a binary built on the host
#         (--build-arg SPAWNER_BINARY_FROM=prebuilt, with a build context holding only
#         ./spawner), so no Rust image is pulled.
#
# Needs BuildKit (Docker 23+ by default; DOCKER_BUILDKIT=1 on Docker 20.10). No `# syntax=`
# line on purpose: it would make BuildKit pull a frontend image, and the builtin frontend
# already handles RUN --mount.

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim
# Where the binary comes from: `builder` compiles it, `prebuilt` takes ./spawner from the
# build context.
ARG SPAWNER_BINARY_FROM=builder

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
# The whole workspace: `cargo build -p spawner` needs every member's manifest, and --locked
# needs Cargo.lock. .dockerignore keeps target/ and .git out of the context.
COPY . .
# .git is not in the context: the commit `spawner --version` prints comes from here.
ARG SPAWNER_GIT_COMMIT=unknown
# Cache the registry and the build directory between builds; the binary is copied out of the
# cache mount because the mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    SPAWNER_GIT_COMMIT="${SPAWNER_GIT_COMMIT}" cargo build --release -p spawner --locked \
    && install -D -m 0755 target/release/spawner /out/spawner

FROM scratch AS prebuilt
COPY spawner /out/spawner

FROM ${SPAWNER_BINARY_FROM} AS binary

# The distroless-like root filesystem of the component images: the C libraries the binary
# links (found with ldd, so a new dependency cannot be forgotten), CA certificates for TLS to
# non-cluster endpoints, and a passwd entry for UID 65532.
FROM ${RUNTIME_IMAGE} AS rootfs
RUN if [ ! -s /etc/ssl/certs/ca-certificates.crt ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi
RUN --mount=type=bind,from=binary,source=/out/spawner,target=/spawner \
    set -eu; \
    mkdir -p /rootfs/etc/ssl/certs /rootfs/usr/local/bin; \
    for lib in $(ldd /spawner | grep -o '/[^ ]*'); do cp --parents -L "$lib" /rootfs; done; \
    cp /etc/ssl/certs/ca-certificates.crt /rootfs/etc/ssl/certs/; \
    printf 'root:x:0:0:root:/root:/sbin/nologin\nspawner:x:65532:65532::/nonexistent:/sbin/nologin\n' >/rootfs/etc/passwd; \
    printf 'root:x:0:\nspawner:x:65532:\n' >/rootfs/etc/group; \
    mkdir -m 1777 /rootfs/tmp

FROM scratch AS component
COPY --from=rootfs /rootfs/ /
COPY --from=binary /out/spawner /usr/local/bin/spawner
# Numeric so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/spawner"]
ARG SPAWNER_VERSION=unknown
ARG SPAWNER_GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="spawner" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${SPAWNER_VERSION}" \
      org.opencontainers.image.revision="${SPAWNER_GIT_COMMIT}"

FROM component AS controller
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=2s --start-period=5s \
    CMD ["/usr/local/bin/spawner", "probe", "http://127.0.0.1:8080/healthz"]
CMD ["controller"]

FROM component AS api
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=2s --start-period=5s \
    CMD ["/usr/local/bin/spawner", "probe", "http://127.0.0.1:8080/healthz"]
CMD ["api"]

# /healthz answers on any Host that is not a backend's.
FROM component AS router
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=2s --start-period=5s \
    CMD ["/usr/local/bin/spawner", "probe", "http://127.0.0.1:8080/healthz"]
CMD ["router"]

FROM component AS sweeper
EXPOSE 8081
HEALTHCHECK --interval=10s --timeout=2s --start-period=5s \
    CMD ["/usr/local/bin/spawner", "probe", "http://127.0.0.1:8081/healthz"]
CMD ["sweeper"]

# Healthy once the application behind it accepts connections (/_spawner/health is 503 until
# then), as the pod's readiness probe sees it.
FROM component AS sidecar
EXPOSE 9090
HEALTHCHECK --interval=5s --timeout=2s --start-period=5s \
    CMD ["/usr/local/bin/spawner", "probe", "http://127.0.0.1:9090/_spawner/health"]
CMD ["sidecar"]

# The all-in-one image (the default target): debian-slim rather than distroless because
# backend pods that reuse this image for test apps (the e2e suites' crashing and slow apps)
# need /bin/sh.
FROM ${RUNTIME_IMAGE} AS spawner
RUN if [ ! -s /etc/ssl/certs/ca-certificates.crt ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --gid 65532 spawner \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin spawner
COPY --from=binary /out/spawner /usr/local/bin/spawner
USER 65532:65532
# controller :8080, sweeper :8081, api :8080, sidecar :9090 (each is a separate container).
EXPOSE 8080 8081 9090
ENTRYPOINT ["/usr/local/bin/spawner"]
CMD ["--help"]
ARG SPAWNER_VERSION=unknown
ARG SPAWNER_GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="spawner" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${SPAWNER_VERSION}" \
      org.opencontainers.image.revision="${SPAWNER_GIT_COMMIT}"
