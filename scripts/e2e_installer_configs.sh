#!/usr/bin/env bash
# The installer's runtime drop-ins checked against the runtimes' own view of
# their merged config (tests/e2e_deploy.rs runs this), for the runtimes the
# pod test does not run: containerd 1.6 (config version 2, where an import
# replaces a plugin's whole section) and CRI-O 1.36 (where a drop-in
# replaces a whole runtime handler). deploy/installer/install.sh runs here
# directly on a host directory, with a recording systemctl:
#   - install: the effective config has podckpt-runc and keeps every admin
#     setting; the runtime is restarted once;
#   - install again: nothing restarted;
#   - the admin changes the main config, install: the drop-in follows (it
#     is built from the config without it), restarted;
#   - uninstall: the config is byte for byte the admin's, no file is left,
#     restarted.
# Environment: CRIO_BIN (the test bed's), CONTAINERD1 (default
# /usr/bin/containerd), PODCKPT_IMAGE (the archive; its staged tree
# $PODCKPT_IMAGE.d is the installer's image dir), PODCKPT_BIN_DIR.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
: "${CRIO_BIN:?}"
CONTAINERD1=${CONTAINERD1:-/usr/bin/containerd}
IMAGE_TAR=${PODCKPT_IMAGE:-$repo/target/podckpt-image.tar}
PODCKPT_BIN_DIR=${PODCKPT_BIN_DIR:-$repo/target/release} "$repo/scripts/build_podckpt_image.sh" "$IMAGE_TAR"

W=$(mktemp -d /var/tmp/podckpt-e2e-installer.XXXXXX)
trap 'rm -rf "$W"' EXIT
T=$W/host
log() { printf '[e2e-installer] %s\n' "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }
cat >"$W/systemctl" <<EOF
#!/bin/sh
echo "\$*" >>"$W/systemctl.log"
case "\$1" in is-active) [ -f "$W/active" ] ;; enable) touch "$W/active" ;; disable) rm -f "$W/active" ;; esac
EOF
chmod 755 "$W/systemctl"
printf 'log-format = "json"\nrestore-dir = "%s"\n' "$T/run/podckpt/restore" >"$W/settings.toml"
export PODCKPT_IMAGE_DIR=$IMAGE_TAR.d PODCKPT_HOST_ROOT=$T PODCKPT_HOST_DIR=$T PODCKPT_HOST_PID=$$ \
    PODCKPT_SYSTEMCTL=$W/systemctl PODCKPT_DONE_FILE=$W/done PODCKPT_SETTINGS_FILE=$W/settings.toml
installer() { : >"$W/systemctl.log"; sh "$repo/deploy/installer/install.sh" "$@" 2>>"$W/installer.log" || fail "install.sh $*: $(tail -5 "$W/installer.log")"; }
restarts() { grep -c "^restart $1" "$W/systemctl.log" || true; }
new_host() {
    rm -rf "$T" "$W/active"
    mkdir -p "$T"/{etc/systemd/system,etc/default,usr/local/bin,opt,run}
}
snapshot() { (cd "$T" && find . | sort); }

# ---- containerd 1.6, config version 2 ------------------------------------
new_host
mkdir -p "$T/etc/containerd/conf.d"
cat >"$T/etc/containerd/config.toml" <<EOF
version = 2
imports = ["$T/etc/containerd/conf.d/*.toml"]
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/podckpt/pause:admin"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = true
EOF
# (An admin's import of another plugin; one of the CRI plugin would itself
# replace the main config's CRI section on 1.6.)
cat >"$T/etc/containerd/conf.d/10-admin.toml" <<EOF
version = 2
[plugins."io.containerd.internal.v1.opt"]
  path = "/opt/admin-containerd"
EOF
chmod 600 "$T/etc/containerd/config.toml"
before=$(snapshot)
export PODCKPT_CONTAINERD_BIN=$CONTAINERD1
dump() { "$CONTAINERD1" --config "$T/etc/containerd/config.toml" config dump 2>/dev/null; }
# The environment file an earlier installer wrote: replaced by the
# configuration file (its variables would override it).
printf "# podckptd's settings, written by podckpt's DaemonSet from its ConfigMap\nPODCKPT_LOG_FORMAT=json\n" >"$T/etc/default/podckptd"
installer install
[ -e "$T/etc/default/podckptd" ] && fail "the earlier installer's environment file is still there"
cfg=$T/etc/podckpt/podckptd.toml
grep -qx 'log-format = "json"' "$cfg" && grep -qx "criu = \"$T/opt/podckpt/bin/criu\"" "$cfg" ||
    fail "podckptd's configuration file: $(cat "$cfg")"
grep -qx "ExecStart=$T/usr/local/bin/podckptd --config $cfg" "$T/etc/systemd/system/podckptd.service" ||
    fail "the unit does not name the configuration file: $(grep ExecStart "$T/etc/systemd/system/podckptd.service")"
grep -qF "Environment=\"PODCKPT_RESTORE_DIR=$T/run/podckpt/restore\"" "$T/etc/systemd/system/containerd.service.d/podckpt.conf" ||
    fail "podckpt-runc is not given the file's restore-dir: $(cat "$T/etc/systemd/system/containerd.service.d/podckpt.conf")"
d=$(dump)
for want in "BinaryName = \"$T/usr/local/bin/podckpt-runc\"" 'sandbox_image = "localhost/podckpt/pause:admin"' \
    'SystemdCgroup = true' 'runtime_type = "io.containerd.runc.v2"' 'path = "/opt/admin-containerd"'; do
    grep -qF "$want" <<<"$d" || fail "containerd 1.6: the merged config lacks: $want"
done
[ "$(restarts containerd.service)" = 1 ] || fail "containerd 1.6: not restarted once: $(cat "$W/systemctl.log")"
installer install
[ "$(restarts containerd.service)" = 0 ] || fail "containerd 1.6: restarted although nothing changed"
[ "$(restarts podckptd.service)" = 0 ] || fail "podckptd restarted although nothing changed"
# A setting changed: the file follows, keeps the admin's mode, and podckptd
# (only) is restarted.
chmod 600 "$cfg"
printf 'max-parallel-dumps = 2\n' >>"$W/settings.toml"
installer install
grep -qx 'max-parallel-dumps = 2' "$cfg" || fail "the configuration file did not follow the ConfigMap"
[ "$(stat -c %a "$cfg")" = 600 ] || fail "the configuration file's mode was not kept"
[ "$(restarts podckptd.service)" = 1 ] || fail "podckptd not restarted after its settings changed: $(cat "$W/systemctl.log")"
[ "$(restarts containerd.service)" = 0 ] || fail "containerd restarted for a podckptd setting"
sed -i 's/pause:admin/pause:admin2/' "$T/etc/containerd/config.toml"
admin=$(sed 's#^imports = \[\(.*\), "[^"]*podckpt.toml"\]#imports = [\1]#' "$T/etc/containerd/config.toml")
installer install
grep -qF 'sandbox_image = "localhost/podckpt/pause:admin2"' <<<"$(dump)" || fail "containerd 1.6: the drop-in did not follow the admin's change"
[ "$(restarts containerd.service)" = 1 ] || fail "containerd 1.6: not restarted after the admin's change"
installer uninstall
[ "$(restarts containerd.service)" = 1 ] || fail "containerd 1.6: not restarted by the uninstall"
[ "$(cat "$T/etc/containerd/config.toml")" = "$admin" ] || fail "containerd 1.6: the config is not the admin's: $(diff <(echo "$admin") "$T/etc/containerd/config.toml")"
[ "$(snapshot)" = "$before" ] || fail "containerd 1.6: files left: $(diff <(echo "$before") <(snapshot))"
[ "$(stat -c %a "$T/etc/containerd/config.toml")" = 600 ] || fail "containerd 1.6: the config's mode changed"
log "containerd 1.6 (config v2): merged drop-in keeps the admin's settings, follows changes, restarts only on change, uninstalls cleanly"

# ---- CRI-O 1.36 ---------------------------------------------------------
new_host
mkdir -p "$T/etc/crio/crio.conf.d"
cat >"$T/etc/crio/crio.conf" <<EOF
[crio.runtime]
default_runtime = "runc"
[crio.runtime.runtimes.runc]
runtime_path = "/usr/sbin/runc"
runtime_type = "oci"
runtime_root = "/run/runc-admin"
monitor_path = "$CRIO_BIN/conmon"
monitor_cgroup = "pod"
monitor_env = [
  "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
]
EOF
printf '[crio.image]\npause_image = "localhost/admin/pause:1"\n' >"$T/etc/crio/crio.conf.d/10-admin.conf"
before=$(snapshot)
export PODCKPT_CRIO_BIN=$CRIO_BIN/crio
runc_handler() {
    "$CRIO_BIN/crio" --config "$T/etc/crio/crio.conf" --config-dir "$T/etc/crio/crio.conf.d" config 2>/dev/null |
        sed -n '/^\[crio.runtime.runtimes.runc\]/,/^\[/p'
}
installer install
d=$(runc_handler)
for want in "runtime_path = \"$T/usr/local/bin/podckpt-runc\"" 'runtime_root = "/run/runc-admin"' \
    "monitor_path = \"$CRIO_BIN/conmon\"" '"PATH=/usr/local/sbin' "\"PODCKPT_CRIU=$T/opt/podckpt/bin/criu\"" \
    '"PODCKPT_RUNC=/usr/sbin/runc"'; do
    grep -qF "$want" <<<"$d" || fail "CRI-O: the merged runc handler lacks: $want"$'\n'"$d"
done
d=$("$CRIO_BIN/crio" --config "$T/etc/crio/crio.conf" --config-dir "$T/etc/crio/crio.conf.d" config 2>/dev/null)
grep -q '^pause_image = "localhost/admin/pause:1"' <<<"$d" || fail "CRI-O: the admin's drop-in is lost"
[ "$(restarts crio.service)" = 1 ] || fail "CRI-O: not restarted once"
installer install
[ "$(restarts crio.service)" = 0 ] || fail "CRI-O: restarted although nothing changed"
installer uninstall
[ "$(restarts crio.service)" = 1 ] || fail "CRI-O: not restarted by the uninstall"
[ "$(snapshot)" = "$before" ] || fail "CRI-O: files left: $(diff <(echo "$before") <(snapshot))"
grep -qF 'runtime_path = "/usr/sbin/runc"' <<<"$(runc_handler)" || fail "CRI-O: runc is not back"
log "CRI-O 1.36: merged handler keeps the admin's settings, restarts only on change, uninstalls cleanly"

# ---- refusing to uninstall under a kubelet that uses podckptd ------------
new_host
mkdir -p "$T/etc/crio" "$T/var/lib/kubelet"
printf '[crio.runtime]\n' >"$T/etc/crio/crio.conf"
echo 'containerRuntimeEndpoint: unix:///run/podckpt/podckpt.sock' >"$T/var/lib/kubelet/config.yaml"
if sh "$repo/deploy/installer/install.sh" uninstall 2>"$W/refuse.log"; then fail "uninstall went on under a kubelet that uses podckptd"; fi
grep -q 'names podckptd' "$W/refuse.log" || fail "the refusal does not say why: $(cat "$W/refuse.log")"
log "uninstall refused while the kubelet's config names podckptd's socket"
log "PASS"
