# syntax=docker/dockerfile:1
# One image for every Spawner component. Its entrypoint is the `spawner` binary:
#   spawner controller | spawner sweeper | spawner api      (deploy/ passes the subcommand as args)
#   spawner sidecar                                          (injected into every backend pod by
#                                                             the controller: args ["sidecar"])
#   spawner demo-backend                                     (the demo application, for e2e tests)
#
# Build: docker build -t spawner:dev .
# Needs BuildKit (the default builder of Docker 23+) for the cache mounts.

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
# The whole workspace: `cargo build -p spawner` needs every member's manifest, and --locked
# needs Cargo.lock. .dockerignore keeps target/ and .git out of the context.
COPY . .
# Cache the registry and the build directory between builds; the binary is copied out of the
# cache mount because the mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release -p spawner --locked \
    && install -D -m 0755 target/release/spawner /out/spawner

FROM ${RUNTIME_IMAGE}
# debian-slim rather than distroless: backend pods that reuse this image for test apps (the
# e2e suites' crashing and slow apps) need /bin/sh. ca-certificates for TLS to non-cluster
# endpoints; the in-cluster API server's CA comes from the service account.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 65532 spawner \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin spawner
COPY --from=builder /out/spawner /usr/local/bin/spawner
# Numeric so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 65532:65532
# controller :8080, sweeper :8081, api :8080, sidecar :9090 (each is a separate container).
EXPOSE 8080 8081 9090
ENTRYPOINT ["/usr/local/bin/spawner"]
CMD ["--help"]
