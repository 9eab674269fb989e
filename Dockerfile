# syntax=docker/dockerfile:1
#
# pgrelay container image.
#
#   docker build -t pgrelay .
#   docker run --rm -p 127.0.0.1:8080:8080 \
#       -e DATABASE_URL=postgresql://USER:PASS@HOST:5432/DB \
#       -e PGRELAY_JWT_SECRET=change-me-to-a-long-secret pgrelay   # >= 16 bytes
#
# Or use docker-compose.yml, which also runs Postgres: docker compose up --build
#
# The image has no Postgres server binaries, so DATABASE_URL must be set:
# `pgrelay serve` applies the (compiled-in) migrations to that database and
# uses it. `pgrelay migrate` applies the migrations and exits.

# ---- build -------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /build

# Everything `cargo build --bin pgrelay` reads: the manifest and lock file,
# the sources, migrations/ (embedded at compile time by refinery's
# embed_migrations! and include_str!), crates/ (the workspace's other
# members, which the manifest names), and the JavaScript SDK's sources,
# which the relay embeds and serves at /client.js.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
COPY crates ./crates
COPY clients/js/src ./clients/js/src

# BuildKit cache mounts keep the crate registry and compiled dependencies
# between builds. target/ is a cache mount, so the binary is copied out of it
# in the same step.
RUN --mount=type=cache,id=pgrelay-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=pgrelay-target,target=/build/target \
    cargo build --release --locked --bin pgrelay \
    && install -D -m 0755 target/release/pgrelay /out/pgrelay

# ---- runtime -----------------------------------------------------------
FROM debian:bookworm-slim AS runtime

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 pgrelay \
    && useradd --system --uid 10001 --gid pgrelay \
        --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin pgrelay

COPY --from=builder /out/pgrelay /usr/local/bin/pgrelay

# Numeric so that runtimes checking "run as non-root" can verify it.
USER 10001:10001

# Inside a container the relay must listen on all interfaces.
ENV PGRELAY_LISTEN=0.0.0.0:8080
EXPOSE 8080

# No HEALTHCHECK: the image has no HTTP client (curl/wget) to probe with.
ENTRYPOINT ["pgrelay"]
CMD ["serve"]
