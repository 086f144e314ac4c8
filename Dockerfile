# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, ship the binary alone on a slim base as a
# non-root user. Build: docker build -t <registry>/podlease:0.1.0 .

FROM rust:1.95-bookworm AS build
# etcd-client's build generates its gRPC code with protoc.
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked --bin podlease && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin podlease \
    && strip target/release/podlease

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 65532 podlease && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin podlease
COPY --from=build /src/target/release/podlease /usr/local/bin/podlease
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/podlease"]
CMD ["run"]
