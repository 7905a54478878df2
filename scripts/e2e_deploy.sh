#!/usr/bin/env bash
# The DaemonSet's pod run on the test node as the kubelet would run it
# (tests/e2e_deploy.rs runs this): the image built by
# scripts/build_podckpt_image.sh imported into a containerd 2.1 with
# `ctr images import`; the pod spec of the rendered deploy/ translated to
# CRI calls (scripts/daemonset_to_cri.py) and made with crictl through that
# containerd's CRI: RunPodSandbox with hostPID, hostNetwork and privileged,
# CreateContainer with the same mounts, environment and privileges. Then:
#   - it installs onto the host: binaries, CRIU, units, the runtime's real
#     drop-in; containerd is restarted with it and the installer's own
#     container keeps running across that restart;
#   - podckptd serves in front of containerd (crictl version through its
#     socket), a container made through it runs on podckpt-runc, and the
#     readiness probe passes;
#   - a second install changes nothing and restarts nothing;
#   - podckptd outlives the installer's pod;
#   - the uninstall mode's pod removes everything: the host dir's files are
#     those from before, containerd's config is byte for byte the original,
#     podckptd is gone, containerd was restarted without the wrapper.
#
# The host root is a test directory ($W/host), so that the test node's own
# / is not changed; the runtime (a containerd 2.1 of this test, whose main
# config lives in that directory) and podckptd are real. The test node has
# no systemd: the installer's PODCKPT_SYSTEMCTL is a hook that hands each
# request to this script's supervisor loop, which plays systemd's part
# (it runs outside the pod's cgroup, as systemd's services do).
#
# Environment: the test bed's (testbed.env) CRICTL, CTR2, CONTAINERD2_BIN,
# KUBECTL, VALIDATE_PYTHON, IMAGES_DIR; PODCKPT_BIN_DIR; PODCKPT_IMAGE (the
# archive; built if missing or stale).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
: "${CRICTL:?}" "${CTR2:?}" "${CONTAINERD2_BIN:?}" "${KUBECTL:?}" "${VALIDATE_PYTHON:?}" "${IMAGES_DIR:?}"
IMAGE_TAR=${PODCKPT_IMAGE:-$repo/target/podckpt-image.tar}

W=$(mktemp -d /var/tmp/podckpt-e2e-deploy.XXXXXX)
chmod 755 "$W"
T=$W/host
SOCK=$W/containerd.sock
CTL=$W/ctl
PODCKPT_SOCK=$T/run/podckpt/podckpt.sock
log() { printf '[e2e-deploy %s] %s\n' "$(date +%T)" "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }
cri() { "$CRICTL" --timeout 30s -r "unix://$SOCK" "$@"; }

# ---- the host: a directory laid out as a node's / -----------------------
mkdir -p "$T"/{etc/containerd,etc/systemd/system,etc/default,usr/local/bin,opt,run,var/lib,var/log} "$CTL" "$W/containerd"
cat >"$T/etc/containerd/config.toml" <<EOF
# A node's containerd 2.1 config (the test's own instance).
version = 3
root = "$W/containerd/root"
state = "$T/run/containerd"
[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$SOCK.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.nri.v1.nri"]
  disable = true
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "localhost/podckpt/pause:test"
[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        SystemdCgroup = false
EOF
cp "$T/etc/containerd/config.toml" "$W/config.toml.orig"
snapshot() { (cd "$T" && find . -path ./run -prune -o -print | sort); }
snapshot >"$W/before.list"

# ---- systemd's part ------------------------------------------------------
# Environment= lines of the unit's drop-ins, and its EnvironmentFile.
unit_env() {
    local f
    for f in "$T/etc/systemd/system/$1.d"/*.conf; do
        [ -f "$f" ] && sed -n 's/^Environment="\(.*\)"$/\1/p' "$f"
    done
    return 0
}
pid_of() { [ -f "$W/$1.pid" ] && kill -0 "$(cat "$W/$1.pid")" 2>/dev/null && cat "$W/$1.pid"; }
start_containerd() {
    local envs
    mapfile -t envs < <(unit_env containerd.service)
    rm -f "$SOCK"
    env "${envs[@]}" PATH="$CONTAINERD2_BIN:/usr/local/sbin:/usr/sbin:/usr/bin:/bin:/sbin" \
        setsid "$CONTAINERD2_BIN/containerd" --config "$T/etc/containerd/config.toml" >>"$W/containerd.log" 2>&1 </dev/null &
    echo $! >"$W/containerd.pid"
    for _ in $(seq 1 100); do [ -S "$SOCK" ] && return 0; sleep 0.1; done
    tail -20 "$W/containerd.log" >&2
    return 1
}
stop_pid() {
    local pid
    pid=$(pid_of "$1") || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$W/$1.pid"
}
# podckptd.service as systemd would start it: ExecStart= (which names the
# configuration file) with EnvironmentFile= if there is one (without socket
# activation: podckptd binds its socket).
start_podckptd() {
    local unit=$T/etc/systemd/system/podckptd.service exec envfile
    exec=$(sed -n 's/^ExecStart=//p' "$unit")
    envfile=$(sed -n 's/^EnvironmentFile=-\{0,1\}//p' "$unit")
    mkdir -p "$T/run/podckpt" "$T/var/lib/podckpt"
    # shellcheck disable=SC2046
    env $(grep -sv '^#' "$envfile" | grep .) setsid $exec >>"$W/podckptd.log" 2>&1 </dev/null &
    echo $! >"$W/podckptd.pid"
    for _ in $(seq 1 100); do [ -S "$PODCKPT_SOCK" ] && return 0; sleep 0.1; done
    tail -20 "$W/podckptd.log" >&2
    return 1
}
systemctl_do() {
    local verb=$1 u rc=0
    shift
    [ "${1:-}" = --now ] && shift
    echo "$verb $*" >>"$W/systemctl.log"
    case "$verb" in
        daemon-reload) return 0 ;;
        is-active)
            case "$1" in
                containerd.service) pid_of containerd >/dev/null ;;
                podckptd.service | podckptd.socket) pid_of podckptd >/dev/null ;;
                *) return 4 ;;
            esac
            return ;;
    esac
    for u in "$@"; do
        case "$verb:$u" in
            restart:containerd.service) stop_pid containerd; start_containerd || rc=1 ;;
            enable:podckptd.service | start:podckptd.service) pid_of podckptd >/dev/null || start_podckptd || rc=1 ;;
            restart:podckptd.service) stop_pid podckptd; start_podckptd || rc=1 ;;
            disable:podckptd.service | stop:podckptd.service) stop_pid podckptd ;;
            *:podckptd.socket) ;;
            *) echo "unknown: $verb $u" >>"$W/systemctl.log"; rc=1 ;;
        esac
    done
    return $rc
}
supervise() {
    local r
    while [ -d "$CTL" ]; do
        for r in "$CTL"/*.req; do
            [ -f "$r" ] || continue
            if systemctl_do $(cat "$r"); then echo 0 >"$r.tmp"; else echo $? >"$r.tmp"; fi
            mv "$r.tmp" "${r%.req}.done"
            rm -f "$r"
        done
        sleep 0.05
    done
}
# The hook the installer runs on the host as its systemctl.
cat >"$W/systemctl" <<EOF
#!/bin/sh
# Test node's systemctl for podckpt's installer: hands the request to the
# e2e test's supervisor (systemd's stand-in) and waits for its answer.
r=$CTL/\$\$.\$(date +%s%N)
echo "\$*" >"\$r.tmp" && mv "\$r.tmp" "\$r.req"
i=0
while [ ! -f "\$r.done" ]; do i=\$((i + 1)); [ \$i -gt 1200 ] && exit 124; sleep 0.05; done
rc=\$(cat "\$r.done"); rm -f "\$r.done"; exit "\$rc"
EOF
chmod 755 "$W/systemctl"

cleanup() {
    local rc=$?
    set +e
    if [ $rc != 0 ]; then
        log "containerd log tail:"; tail -15 "$W/containerd.log" >&2
        log "podckptd log tail:"; tail -15 "$W/podckptd.log" 2>/dev/null >&2
        log "systemctl requests:"; cat "$W/systemctl.log" >&2 2>/dev/null
        for l in "$W"/pods/*/installer/0.log; do [ -f "$l" ] && { log "installer log $l:"; tail -30 "$l" >&2; }; done
    fi
    if [ -S "$SOCK" ]; then
        for p in $(cri pods -q 2>/dev/null); do cri stopp "$p" >/dev/null 2>&1; cri rmp -f "$p" >/dev/null 2>&1; done
    fi
    stop_pid podckptd
    for pid in $(pgrep -f "containerd-shim-runc-v2 .*-address $SOCK( |$)"); do kill -KILL "$pid" 2>/dev/null; done
    stop_pid containerd
    rmdir "$CTL" 2>/dev/null || rm -rf "$CTL"
    [ -n "${SUP:-}" ] && { kill "$SUP" 2>/dev/null; wait "$SUP" 2>/dev/null; }
    awk '{print $5}' /proc/self/mountinfo | grep -E "^$W(/|$)" | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
    rm -rf "$W"
    exit $rc
}
trap cleanup EXIT
# A node's / is a shared mount (systemd makes it so), which the DaemonSet's
# HostToContainer propagation needs; this machine's is private, so the test
# host dir is made a shared mount of its own.
mount --bind "$T" "$T"
mount --make-rshared "$T"

supervise &
SUP=$!

# ---- the image and the node's containerd --------------------------------
PODCKPT_BIN_DIR=${PODCKPT_BIN_DIR:-$repo/target/release} "$repo/scripts/build_podckpt_image.sh" "$IMAGE_TAR"
IMAGE=$(cat "$IMAGE_TAR.name")
start_containerd || fail "containerd did not start"
for tar in "$IMAGES_DIR/pause.tar" "$IMAGES_DIR/app.tar" "$IMAGE_TAR"; do
    "$CTR2" -a "$SOCK" -n k8s.io images import "$tar" >/dev/null
done
grep -qx "$IMAGE" <<<"$("$CTR2" -a "$SOCK" -n k8s.io images ls -q)" || fail "ctr images import did not give $IMAGE"

# ---- the pod, as the kubelet would run it -------------------------------
cat >"$W/podckptd.toml" <<EOF
# podckptd's settings for this host dir (ConfigMap podckptd)
log-format = "json"
listen = "$PODCKPT_SOCK"
runtime-endpoint = "unix://$SOCK"
state-dir = "$T/var/lib/podckpt"
restore-dir = "$T/run/podckpt/restore"
EOF
run_daemonset() {
    local kdir=$1 out=$2
    "$KUBECTL" kustomize "$kdir" >"$W/$out.yaml" 2>/dev/null
    "$VALIDATE_PYTHON" "$repo/scripts/daemonset_to_cri.py" "$W/$out.yaml" "$W/$out" --work "$W" --host-dir "$T" \
        --env "PODCKPT_HOST_DIR=$T" --env "PODCKPT_SYSTEMCTL=$W/systemctl" --env "PODCKPT_HOST_PID=$$" \
        --env "PODCKPT_CONTAINERD_BIN=$CONTAINERD2_BIN/containerd" --env "PODCKPT_WATCH_INTERVAL=1" \
        --env "PODCKPT_RUNC_LOG=$T/var/log/podckpt/podckpt-runc.log" \
        --configmap-file "podckptd/podckptd.toml=$W/podckptd.toml"
    grep -q "\"$IMAGE\"" "$W/$out/installer.json" || fail "the DaemonSet does not name $IMAGE"
    POD=$(cri runp "$W/$out/pod.json")
    CTR=$(cri create "$POD" "$W/$out/installer.json" "$W/$out/pod.json")
    cri start "$CTR" >/dev/null
}
# The readiness probe, as the kubelet runs it (ExecSync), until it passes.
wait_ready() {
    local probe i state
    probe=$("$VALIDATE_PYTHON" -c 'import json,sys; print(" ".join(json.load(open(sys.argv[1]))["command"]))' "$W/$1/probe.json")
    for i in $(seq 1 120); do
        # shellcheck disable=SC2086
        if cri exec -s --timeout 10 "$CTR" $probe >"$W/probe.out" 2>&1; then
            log "ready after ~$((i / 2)) s"
            return 0
        fi
        # The uninstall restarts the runtime itself: while it is away the
        # state is unknown, not stopped; ask again.
        if state=$(cri inspect -o go-template --template '{{.status.state}}' "$CTR" 2>/dev/null); then
            [ "$state" = CONTAINER_RUNNING ] ||
                fail "the installer's container stopped ($state): $(cri logs "$CTR" 2>&1 | tail -20)"
        fi
        sleep 0.5
    done
    fail "not ready after 60 s: the probe says: $(grep -v 'level=warning' "$W/probe.out")"
}

log "install: running the DaemonSet's pod"
ctd_before=$(pid_of containerd)
run_daemonset "$repo/deploy" install
INSTALL_POD=$POD INSTALL_CTR=$CTR
wait_ready install

for f in usr/local/bin/podckptd usr/local/bin/podckpt usr/local/bin/podckpt-runc opt/podckpt/bin/criu \
    opt/podckpt/criu/usr/sbin/criu etc/systemd/system/podckptd.socket etc/systemd/system/podckptd.service \
    etc/podckpt/podckptd.toml etc/containerd/podckpt.toml etc/systemd/system/containerd.service.d/podckpt.conf; do
    [ -e "$T/$f" ] || fail "not installed: $f"
done
grep -q 'Version: 4' <<<"$("$T/opt/podckpt/bin/criu" --version)" || fail "the installed CRIU does not run"
grep -q "^imports = \[\"$T/etc/containerd/podckpt.toml\"\]" "$T/etc/containerd/config.toml" || fail "containerd's config does not import the drop-in"
grep -q "BinaryName = '$T/usr/local/bin/podckpt-runc'" <<<"$("$CONTAINERD2_BIN/containerd" --config "$T/etc/containerd/config.toml" config dump 2>/dev/null)" || fail "containerd's effective config lacks podckpt-runc"
ctd_after=$(pid_of containerd) || fail "containerd is not running"
[ "$ctd_after" != "$ctd_before" ] || fail "containerd was not restarted after its config changed"
[ "$(cri inspect -o go-template --template '{{.status.state}}' "$INSTALL_CTR")" = CONTAINER_RUNNING ] ||
    fail "the installer's container did not survive containerd's restart"
log "installed; containerd restarted ($ctd_before -> $ctd_after), the installer's container kept running"

# podckptd in front of the runtime.
grep -q 'RuntimeName:  containerd' <<<"$("$CRICTL" -r "unix://$PODCKPT_SOCK" version 2>/dev/null)" || fail "podckptd does not serve containerd"
"$T/usr/local/bin/podckpt" --endpoint "unix://$PODCKPT_SOCK" version >/dev/null || fail "podckpt version through podckptd failed"
# A container made through podckptd runs on podckpt-runc (the drop-in is live).
cat >"$W/app-pod.json" <<EOF
{"metadata": {"name": "deploy-app", "namespace": "default", "uid": "deploy-app-1", "attempt": 0},
 "log_directory": "$W/pods/app", "linux": {"security_context": {"namespace_options": {"network": 2, "pid": 1}}}}
EOF
cat >"$W/app.json" <<EOF
{"metadata": {"name": "app"}, "image": {"image": "localhost/podckpt/app:test"}, "log_path": "app.log",
 "command": ["/bin/sh", "-c", "sleep 600"]}
EOF
mkdir -p "$W/pods/app"
APP_POD=$("$CRICTL" -r "unix://$PODCKPT_SOCK" runp "$W/app-pod.json")
APP=$("$CRICTL" -r "unix://$PODCKPT_SOCK" create "$APP_POD" "$W/app.json" "$W/app-pod.json")
"$CRICTL" -r "unix://$PODCKPT_SOCK" start "$APP" >/dev/null
grep -rqs "podckpt-runc" "$T/run/containerd/io.containerd.runtime.v2.task/k8s.io/$APP/options.json" ||
    fail "the container made through podckptd does not run on podckpt-runc"
log "podckptd serves containerd; a container made through it runs on podckpt-runc"

# Idempotent: a second install changes nothing and restarts nothing.
pd=$(pid_of podckptd)
: >"$W/systemctl.log"
cri exec -s --timeout 60 "$INSTALL_CTR" /opt/podckpt/install.sh install >"$W/second.log" 2>&1 || fail "second install: $(cat "$W/second.log")"
[ "$(pid_of containerd)" = "$ctd_after" ] || fail "the second install restarted containerd"
[ "$(pid_of podckptd)" = "$pd" ] || fail "the second install restarted podckptd"
grep -q 'restart' "$W/systemctl.log" && fail "the second install asked for a restart: $(cat "$W/systemctl.log")"
log "second install: nothing changed, nothing restarted"

# podckptd is a host service: it outlives the installer's pod.
cri stopp "$INSTALL_POD" >/dev/null && cri rmp "$INSTALL_POD" >/dev/null
"$CRICTL" -r "unix://$PODCKPT_SOCK" version >/dev/null || fail "podckptd stopped with the installer's pod"
"$CRICTL" -r "unix://$PODCKPT_SOCK" stopp "$APP_POD" >/dev/null && "$CRICTL" -r "unix://$PODCKPT_SOCK" rmp "$APP_POD" >/dev/null
log "podckptd outlived the installer's pod"

# ---- uninstall mode -------------------------------------------------------
log "uninstall: running the uninstall mode's pod"
run_daemonset "$repo/deploy/uninstall" uninstall
wait_ready uninstall
# This pod was created while podckpt-runc was containerd's runc, and
# containerd's shim keeps calling it for the pod's containers: it stays
# (and nothing else) until they are gone.
snapshot >"$W/after.list"
[ "$(diff "$W/before.list" "$W/after.list" | grep '^[<>]')" = "> ./usr/local/bin/podckpt-runc" ] ||
    fail "after the uninstall: $(diff "$W/before.list" "$W/after.list")"
cri exec -s "$CTR" /opt/podckpt/install.sh ready 2>/dev/null | grep -q "podckpt-runc kept for the containers still running on it: .*$CTR" ||
    fail "the probe does not say why podckpt-runc is kept"
cri stopp "$POD" >/dev/null && cri rmp "$POD" >/dev/null
# The uninstall mode's pod recreated (as after `kubectl rollout restart`
# or a reboot) runs on plain runc, and removes podckpt-runc.
run_daemonset "$repo/deploy/uninstall" uninstall2
for _ in $(seq 1 60); do [ -e "$T/usr/local/bin/podckpt-runc" ] || break; sleep 0.5; done
wait_ready uninstall2
cri stopp "$POD" >/dev/null && cri rmp "$POD" >/dev/null
snapshot >"$W/after.list"
diff "$W/before.list" "$W/after.list" >&2 || fail "the uninstall left files behind (or removed some)"
cmp "$W/config.toml.orig" "$T/etc/containerd/config.toml" || fail "containerd's config is not the original"
[ -z "$(ls -A "$T/run" | grep -v '^containerd$' || true)" ] || fail "left in /run: $(ls -A "$T/run")"
pid_of podckptd >/dev/null && fail "podckptd still runs"
[ "$(pid_of containerd)" != "$ctd_after" ] || fail "containerd was not restarted back"
grep -q podckpt-runc <<<"$("$CONTAINERD2_BIN/containerd" --config "$T/etc/containerd/config.toml" config dump 2>/dev/null)" &&
    fail "containerd's effective config still names podckpt-runc"
cri version >/dev/null || fail "containerd does not answer after the uninstall"
log "PASS: installed, served, uninstalled cleanly"
