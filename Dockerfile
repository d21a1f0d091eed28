# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, run from a slim Debian with
# only the binary, as an unprivileged user.
#
# The build context is what .dockerignore lets in (scripts/check-deploy.sh
# assembles it the same way and builds it in CI). BuildKit's cache mounts
# keep the registry and compiled dependencies across source edits.
FROM rust:1.95-slim-trixie AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
 && cp target/release/herald /usr/local/bin/herald \
 && strip /usr/local/bin/herald

FROM debian:trixie-slim
RUN useradd --system --uid 10001 --no-create-home herald \
 && mkdir -p /var/lib/herald && chown herald /var/lib/herald
COPY --from=build /usr/local/bin/herald /usr/local/bin/herald
USER 10001
# Holds the default SQLite store and the dev key of a single node.
WORKDIR /var/lib/herald
ENV HERALD__SERVER__BIND=0.0.0.0:8080
EXPOSE 8080
# SIGTERM makes a node close its WebSockets with 1001 and exit.
STOPSIGNAL SIGTERM
ENTRYPOINT ["herald"]
CMD ["serve"]
