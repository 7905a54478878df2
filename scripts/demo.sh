#!/usr/bin/env bash
# The main job on a local test node: builds podckpt, brings the test node up
# (containerd + runc + CNI + CRIU, podckptd in front), and runs a pod through
# podckptd, checkpointing and restoring it (examples/demo.rs).
# The node stays up afterwards; `sudo scripts/testbed.sh down` stops it.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
[ "$(id -u)" = 0 ] || { echo "scripts/demo.sh: run as root (it starts containerd and CRIU)" >&2; exit 1; }
cargo build --release --bins --example demo
scripts/testbed.sh up
target/release/examples/demo
