#!/usr/bin/env bash
# The whole test suite: unit tests, proxy tests, and end-to-end tests against
# a real test node (containerd 1.6 and 2.1 and CRI-O 1.36 side by side, runc,
# CNI, CRIU) that this script brings up first and down afterwards. Each
# end-to-end test starts its own podckptd in front of the runtime it is
# about: containerd 2.1 for most, containerd 1.6 where named, CRI-O in
# tests/e2e_crio.rs, and all three for the tests named `..._containerd2`,
# `..._containerd1` and `..._crio` (one body per runtime,
# tests/common/runtime.rs).
#
# As root it runs everything and a missing test bed FAILS (PODCKPT_E2E=1).
# Without root (a newcomer's laptop) it runs the tests that need no test bed;
# the end-to-end tests print why they skip.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

# One cargo profile for everything: the test bed runs the release podckptd,
# and building the tests in release too avoids compiling the crate twice.
profile=(--release)

if [ "$(id -u)" != 0 ]; then
    if [ "${CI:-}" = true ]; then
        echo "scripts/test.sh: CI must run as root (the end-to-end tests need the test bed)" >&2
        exit 1
    fi
    echo "scripts/test.sh: not root: running the tests that need no test bed; end-to-end tests will skip" >&2
    exec cargo test "${profile[@]}" --all-targets
fi

cargo build "${profile[@]}" --bins
if [ "${PODCKPT_TESTBED_KEEP:-}" != 1 ]; then
    trap 'scripts/testbed.sh down || true' EXIT
fi
scripts/testbed.sh up

export PODCKPT_E2E=1
# --no-fail-fast: one failing test binary must not hide the others' results.
cargo test "${profile[@]}" --all-targets --no-fail-fast
