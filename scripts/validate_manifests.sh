#!/usr/bin/env bash
# Renders deploy/ (the install and uninstall kustomizations) and validates
# every object against the Kubernetes API's schema, offline, strictly
# (unknown fields are errors).
#
#   scripts/validate_manifests.sh [DEPLOY_DIR]     (default <repo>/deploy)
#
# Tools (scripts/testbed.sh manifest-tools installs both): KUBECTL (Debian
# 12's kubectl 1.20, for `kubectl kustomize`) and KUBERNETES_VALIDATE (the
# kubernetes-validate validator, which bundles the API's schemas; checked
# against PODCKPT_K8S_VERSION, default its newest).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
deploy=${1:-$repo/deploy}
prefix=${PODCKPT_TESTBED_PREFIX:-/opt/podckpt-testbed}
kubectl=${KUBECTL:-$prefix/kubectl/usr/bin/kubectl}
validate=${KUBERNETES_VALIDATE:-$prefix/validate-venv/bin/kubernetes-validate}
for t in "$kubectl" "$validate"; do
    [ -x "$t" ] || { echo "validate_manifests: $t missing: run sudo scripts/testbed.sh manifest-tools" >&2; exit 2; }
done
version=()
[ -n "${PODCKPT_K8S_VERSION:-}" ] && version=(--kubernetes-version "$PODCKPT_K8S_VERSION")
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for k in "$deploy" "$deploy/uninstall"; do
    name=$(basename "$k")
    "$kubectl" kustomize "$k" >"$out/$name.yaml" || { echo "validate_manifests: kubectl kustomize $k failed" >&2; exit 1; }
    [ -s "$out/$name.yaml" ] || { echo "validate_manifests: $k renders nothing" >&2; exit 1; }
    "$validate" --strict --quiet "${version[@]}" "$out/$name.yaml" >&2 || { echo "validate_manifests: $k does not validate" >&2; exit 1; }
    echo "validate_manifests: $k: $(grep -c '^kind:' "$out/$name.yaml") objects valid" >&2
done
