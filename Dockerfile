# Multi-stage build: compile in the Rust image, run from a slim Debian with
# only the binary, as an unprivileged user.
FROM rust:1.95-slim-trixie AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
RUN cargo build --release --locked \
 && strip target/release/herald

FROM debian:trixie-slim
RUN useradd --system --uid 10001 --no-create-home herald \
 && mkdir -p /var/lib/herald && chown herald /var/lib/herald
COPY --from=build /src/target/release/herald /usr/local/bin/herald
USER herald
# Holds the default SQLite store and the dev key of a single node.
WORKDIR /var/lib/herald
ENV HERALD__SERVER__BIND=0.0.0.0:8080
EXPOSE 8080
# SIGTERM makes a node close its WebSockets with 1001 and exit.
STOPSIGNAL SIGTERM
ENTRYPOINT ["herald"]
CMD ["serve"]
