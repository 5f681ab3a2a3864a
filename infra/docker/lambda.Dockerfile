# syntax=docker/dockerfile:1.7
# The Lambda worker (CPU): `ember lambda` as the image's entry point, speaking the Lambda
# Runtime API (PackageType Image in infra/ember.yaml). Build from the repository root:
#   docker build -f infra/docker/lambda.Dockerfile -t ember-lambda .

FROM rust:1.95.0-bookworm AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p ember-worker \
 && cp target/release/ember /usr/local/bin/ember

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /usr/local/bin/ember /usr/local/bin/ember
# Lambda runs the image as an unprivileged user with a read-only file system except /tmp:
# the model cache lives there (EphemeralStorage 10 GB in the template).
ENV EMBER_CACHE_DIR=/tmp/ember-cache \
    EMBER_NO_PROGRESS=true \
    EMBER_LOG_FORMAT=json
ENTRYPOINT ["/usr/local/bin/ember", "lambda"]
