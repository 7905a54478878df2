#!/usr/bin/env bash
# Builds the DaemonSet's OCI image (deploy/) as an image-layout tar archive,
# without a registry, the way the test images are built
# (scripts/build_images.py): busybox, podckptd, podckpt, podckpt-runc
# (stripped), CRIU 4.2 with its libraries in a private prefix (the one the
# test node uses: scripts/testbed.sh criu-prefix), the systemd units and the
# installer (deploy/installer/install.sh, the entrypoint).
#
#   scripts/build_podckpt_image.sh [OUT.tar]     (default target/podckpt-image.tar)
#   ctr -n k8s.io images import OUT.tar          on each node, or push it with skopeo
#
# Environment: PODCKPT_BIN_DIR (default: `cargo build --release` then
# target/release), PODCKPT_IMAGE_NAME (default localhost/podckpt/podckpt:<version>,
# the name deploy/daemonset.yaml uses). The archive is rebuilt only when an
# input is newer than it.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$repo/target/podckpt-image.tar}
version=$(awk -F'"' '/^version *=/ { print $2; exit }' "$repo/Cargo.toml")
name=${PODCKPT_IMAGE_NAME:-localhost/podckpt/podckpt:$version}
if [ -z "${PODCKPT_BIN_DIR:-}" ]; then
    (cd "$repo" && cargo build --release --bins)
    bin_dir=$repo/target/release
else
    bin_dir=$PODCKPT_BIN_DIR
fi
criu=$("$repo/scripts/testbed.sh" criu-prefix)

inputs=("$bin_dir/podckptd" "$bin_dir/podckpt" "$bin_dir/podckpt-runc" "$repo/deploy/installer/install.sh"
    "$repo/systemd/podckptd.service" "$repo/systemd/podckptd.socket" "$repo/scripts/build_images.py"
    "$repo/scripts/build_podckpt_image.sh" "$criu")
if [ -f "$out" ] && [ -d "$out.d" ] && [ "$(cat "$out.name" 2>/dev/null)" = "$name" ]; then
    fresh=1
    for f in "${inputs[@]}"; do [ "$f" -nt "$out" ] && fresh=0; done
    if [ $fresh = 1 ]; then
        echo "$out is up to date ($name)" >&2
        exit 0
    fi
fi

# The staged tree is kept beside the archive ($out.d, the image's
# /opt/podckpt), for tests that run the installer without a container.
stage=$out.d
rm -rf "$stage"
mkdir -p "$stage/bin" "$stage/systemd"
for b in podckptd podckpt podckpt-runc; do
    strip -o "$stage/bin/$b" "$bin_dir/$b"
done
cp -a "$criu" "$stage/criu"
# The installer copies the prefix again only when this list changed.
(cd "$stage" && find criu -type f -print0 | sort -z | xargs -0 sha256sum) >"$stage/criu.sha256"
cp "$repo/systemd/podckptd.service" "$repo/systemd/podckptd.socket" "$stage/systemd/"
install -m 755 "$repo/deploy/installer/install.sh" "$stage/install.sh"
mkdir -p "$(dirname "$out")"
python3 "$repo/scripts/build_images.py" --podckpt "$stage" "$name" "$out"
echo "$name" >"$out.name"
echo "built $out ($name, $(du -h "$out" | cut -f1))" >&2
