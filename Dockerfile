# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, ship the stripped binary alone on distroless
# (glibc, CA certificates, user nonroot = 65532, no shell, no package manager).
# Build: docker build -t <registry>/podlease:0.1.0 .
# Nothing in the image is written at run time: it runs with readOnlyRootFilesystem.
# tests/image.rs builds exactly what this file COPYs; scripts/image.sh makes the same final
# stage from a local release binary when no base image can be pulled.

FROM rust:1.95-bookworm AS build
# etcd-client's build generates its gRPC code with protoc.
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, so source edits do not rebuild them. The manifest declares the
# [[bench]] targets, whose files must exist for Cargo to read it (they are not built).
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked --bin podlease && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin podlease \
    && strip target/release/podlease

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/podlease /usr/local/bin/podlease
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/podlease"]
CMD ["run"]
