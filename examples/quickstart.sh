#!/usr/bin/env bash
# Quick start: start the lab (Docker engine, registry, base images), build hoist, build the
# example image with hoist, load it into Docker and run it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/lab/setup.sh
cargo build --release -p hoist-cli --bin hoist
./target/release/hoist build -t hoist-hello --load examples/hello
/usr/bin/docker run --rm hoist-hello
