#!/usr/bin/env bash
# A real test node on a Debian 12 machine, from nothing: containerd 1.6
# (Debian 12), containerd 2.1 (Debian sid) and CRI-O 1.36 (prebuilt, see
# PODCKPT_TESTBED_TOOLS) side by side, runc, CNI bridge networks, CRIU 4.2
# (Debian sid, with its own libc), locally built OCI images, and podckptd in
# front of the runtime picked by PODCKPT_RUNTIME.
#
#   scripts/testbed.sh up       install what is missing and start everything (idempotent)
#   scripts/testbed.sh down     stop everything it started, by pid; remove pods, mounts, netns
#   scripts/testbed.sh status   what runs; exit 1 if something is not up
#
# Environment: PODCKPT_RUNTIME=containerd2|containerd1|crio (default containerd2),
# PODCKPT_TESTBED_TOOLS (default <repo>/../shared/bin: prebuilt crio, conmon,
# pinns, crictl and checkpointctl, checked against its SHA256SUMS and
# installed into the prefix),
# PODCKPT_BIN_DIR (default <repo>/target/release), PODCKPT_TESTBED_RUNC_BINARY
# (default /usr/sbin/runc), PODCKPT_TESTBED_PURGE=1 with down to also remove
# the runtimes' state. Everything it starts is recorded in
# /run/podckpt-testbed/testbed.env, which the tests read.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${PODCKPT_TESTBED_PREFIX:-/opt/podckpt-testbed}
RUN=/run/podckpt-testbed
STATE=/var/lib/podckpt-testbed
LOG=/var/log/podckpt-testbed
RUNTIME=${PODCKPT_RUNTIME:-containerd2}
RUNC=${PODCKPT_TESTBED_RUNC_BINARY:-/usr/sbin/runc}
BIN_DIR=${PODCKPT_BIN_DIR:-$repo/target/release}
PODCKPT_SOCK=/run/podckpt/podckpt.sock
CRIU=/usr/local/sbin/criu
# The CRIU the runtimes' podckpt-runc restores with (its PODCKPT_CRIU): the
# real one, except that a test may put a stand-in for one CRIU command in
# the root-only $RUNC_CRIU_OVERRIDE/<command> (podckpt-runc takes its CRIU
# from the runtime's environment only, never from podckptd).
RUNC_CRIU=$PREFIX/bin/criu-for-runc
RUNC_CRIU_OVERRIDE=$RUN/criu-override
CTR1=/usr/bin/ctr
CTR2=$PREFIX/containerd2/usr/bin/ctr
RUNC_ROOT=/run/containerd/runc/k8s.io
TOOLS=${PODCKPT_TESTBED_TOOLS:-$repo/../shared/bin}
CRIO_BIN=$PREFIX/crio/bin
CRIO_SOCK=$RUN/crio/crio.sock
CRIO_ROOT=$STATE/crio/storage
CRIO_RUNROOT=$RUN/crio/storage
CRIO_RUNC_ROOT=$RUN/crio/runc

log() { printf '[testbed] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
sock() { echo "$RUN/$1/containerd.sock"; }

[ "$(id -u)" = 0 ] || die "run as root"

# The Debian mirror this machine's own apt sources use (deb822 .sources or
# one-line .list), for the main archive, not the security one.
debian_mirror() {
    local uri
    uri=$(awk '
        /^[[:space:]]*$/ { if (u != "" && s ~ /(^| )(bookworm|trixie|sid|stable)( |$)/) { print u; exit } u = ""; s = ""; next }
        /^URIs:/ { u = $2 }
        /^Suites:/ { $1 = ""; s = $0 }
        END { if (u != "" && s ~ /(^| )(bookworm|trixie|sid|stable)( |$)/) print u }
    ' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)
    if [ -z "$uri" ]; then
        uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
            awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { if ($(i + 1) !~ /-security/) { print $i; exit } } }' | head -n1)
    fi
    [ -n "$uri" ] || die "no Debian mirror found in the machine's apt sources"
    echo "$uri"
}

# apt on a private list: sid and trixie packages are downloaded and
# unpacked into $PREFIX, never installed over the system's.
apt_private() {
    local suite=$1; shift
    mkdir -p "$PREFIX/apt/$suite/lists/partial" "$PREFIX/apt/$suite/cache/archives/partial"
    printf 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s %s main\n' "$(debian_mirror)" "$suite" \
        >"$PREFIX/apt/$suite.list"
    apt-get -q -oDir::Etc::SourceList="$PREFIX/apt/$suite.list" -oDir::Etc::SourceParts=/dev/null \
        -oDir::State::Lists="$PREFIX/apt/$suite/lists" -oDir::Cache="$PREFIX/apt/$suite/cache" \
        -oAPT::Sandbox::User=root "$@"
}

install_packages() {
    local need=()
    for p in containerd runc containernetworking-plugins iproute2 iptables busybox-static gcc libc6-dev python3 python3-venv util-linux procps \
        skopeo libseccomp2 libsqlite3-0 libglib2.0-0 libsystemd0; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
    done
    if [ ${#need[@]} -gt 0 ]; then
        log "installing ${need[*]}"
        # No systemd here: keep package scripts from starting services.
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >"$LOG/apt.log" 2>&1 ||
            { tail -20 "$LOG/apt.log" >&2; die "apt-get install failed"; }
        rm -f /usr/sbin/policy-rc.d
    fi
}

install_containerd2() {
    [ -x "$PREFIX/containerd2/usr/bin/containerd" ] && return
    log "fetching containerd 2.1 from Debian sid"
    mkdir -p "$PREFIX/dl" "$PREFIX/containerd2"
    apt_private sid update >/dev/null
    (cd "$PREFIX/dl" && apt_private sid download containerd >/dev/null 2>&1)
    dpkg -x "$(ls "$PREFIX"/dl/containerd_2.*.deb | tail -1)" "$PREFIX/containerd2"
}

# A Python gRPC client (grpcio, gRPC C-core) for the tests that check
# podckptd with clients other than Go's and Rust's: in a venv of its own,
# from PyPI through the machine's pip configuration.
install_grpc_clients() {
    [ -x "$PREFIX/grpc-venv/bin/python" ] && "$PREFIX/grpc-venv/bin/python" -c 'import grpc, grpc_tools' 2>/dev/null && return
    log "installing grpcio and grpcio-tools into $PREFIX/grpc-venv"
    python3 -m venv "$PREFIX/grpc-venv"
    "$PREFIX/grpc-venv/bin/pip" install -q grpcio grpcio-tools >"$LOG/pip.log" 2>&1 ||
        { tail -20 "$LOG/pip.log" >&2; die "pip install grpcio grpcio-tools failed"; }
}

# The tools that check deploy/ offline: kubectl from Debian 12's
# kubernetes-client (1.20, for `kubectl kustomize`), unpacked into the prefix
# so that no kubectl already on the machine is replaced, and the
# kubernetes-validate validator (it bundles the Kubernetes API's schemas)
# in a venv of its own, from PyPI through the machine's pip configuration.
install_manifest_tools() {
    if [ ! -x "$PREFIX/kubectl/usr/bin/kubectl" ]; then
        log "fetching kubectl (kubernetes-client) from Debian 12"
        mkdir -p "$PREFIX/dl" "$PREFIX/kubectl"
        apt_private bookworm update >/dev/null
        (cd "$PREFIX/dl" && apt_private bookworm download kubernetes-client >/dev/null 2>&1)
        dpkg -x "$(ls "$PREFIX"/dl/kubernetes-client_*.deb | sort -V | tail -1)" "$PREFIX/kubectl"
    fi
    [ -x "$PREFIX/validate-venv/bin/kubernetes-validate" ] && return
    log "installing kubernetes-validate into $PREFIX/validate-venv"
    python3 -m venv "$PREFIX/validate-venv"
    "$PREFIX/validate-venv/bin/pip" install -q kubernetes-validate >"$LOG/pip-validate.log" 2>&1 ||
        { tail -20 "$LOG/pip-validate.log" >&2; die "pip install kubernetes-validate failed"; }
}

# CRI-O and its helpers are not packaged for Debian 12: the prebuilt ones
# (see that directory's README), checked against their checksums.
install_crio() {
    local t
    if [ -x "$CRIO_BIN/crio" ] && (cd "$CRIO_BIN" && sha256sum --quiet -c SHA256SUMS 2>/dev/null); then
        return
    fi
    [ -f "$TOOLS/SHA256SUMS" ] || die "no prebuilt CRI-O tools in $TOOLS (set PODCKPT_TESTBED_TOOLS)"
    log "installing CRI-O, conmon, pinns, crictl, checkpointctl from $TOOLS"
    mkdir -p "$CRIO_BIN"
    for t in crio conmon pinns crictl checkpointctl; do
        install -m 755 "$TOOLS/$t" "$CRIO_BIN/$t"
    done
    cp "$TOOLS/SHA256SUMS" "$CRIO_BIN/SHA256SUMS"
    (cd "$CRIO_BIN" && sha256sum --quiet -c SHA256SUMS) || die "checksums of $TOOLS do not match"
}

# CRIU 4.2 and the libraries it needs (sid's libc among them) unpacked into
# $PREFIX/criu, once. The test node runs it from there; the DaemonSet's
# image (scripts/build_podckpt_image.sh) carries the same prefix.
fetch_criu() {
    [ -x "$PREFIX/criu/usr/sbin/criu" ] && [ -e "$PREFIX/criu/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" ] && return
    log "fetching CRIU 4.2 from Debian sid"
    rm -rf "$PREFIX/criu"
    mkdir -p "$PREFIX/dl" "$PREFIX/criu"
    apt_private sid update >/dev/null
    (cd "$PREFIX/dl" && apt_private sid download criu libcompel1 libnet9 libnl-3-200 libnl-route-3-200 libc6 >/dev/null 2>&1)
    for d in criu_4 libcompel1_4 libnet9_ libnl-3-200_ libnl-route-3-200_ libc6_2; do
        dpkg -x "$(ls "$PREFIX"/dl/${d}*.deb | sort -V | tail -1)" "$PREFIX/criu"
    done
}

install_criu() {
    if [ -x "$CRIU" ] && "$CRIU" --version 2>/dev/null | grep -q 'Version: 4\.[2-9]'; then
        return
    fi
    # Debian 12's CRIU 3.17 fails on this kernel (vDSO bounds). trixie's 4.1
    # runs but cannot dump any TCP/UDP socket on kernels >= 6.16, which
    # refuse SO_PASSSEC/SO_PASSCRED on inet sockets (criu#2705, fixed in
    # 4.2). sid's 4.2.1 needs glibc 2.38, libnet9 and a newer libnl: run it
    # with sid's loader and libraries from a private prefix, the system's
    # libc untouched.
    rm -rf "$PREFIX/criu"
    fetch_criu
    local l=$PREFIX/criu
    cat >"$CRIU" <<EOF
#!/bin/sh
# CRIU 4.2 from Debian sid with its own libc, installed by podckpt's scripts/testbed.sh
exec $l/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path $l/usr/lib/x86_64-linux-gnu:$l/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu $l/usr/sbin/criu "\$@"
EOF
    chmod 755 "$CRIU"
    "$CRIU" --version | grep -q 'Version: 4\.[2-9]' || die "CRIU wrapper does not run"
}

write_configs() {
    # The runtimes run containers through podckpt-runc, which restores the
    # containers podckptd registered and hands everything else to runc.
    OCI_RUNTIME=$RUNC
    if [ -x "$BIN_DIR/podckpt-runc" ]; then
        OCI_RUNTIME=$BIN_DIR/podckpt-runc
    else
        log "note: $BIN_DIR/podckpt-runc is not built; containers run on plain runc (no restore)"
    fi
    mkdir -p "$PREFIX/etc/cni1" "$PREFIX/etc/cni2" "$PREFIX/etc/cni3"
    local n
    for n in 1 2 3; do
        local subnet=10.$((87 + n)).0.0/16
        cat >"$PREFIX/etc/cni$n/10-podckpt.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "podckpt$n",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "podckpt$n",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {"type": "host-local", "ranges": [[{"subnet": "$subnet"}]], "dataDir": "$STATE/cni$n"}
    },
    {"type": "loopback"}
  ]
}
EOF
    done
    cat >"$PREFIX/etc/containerd1.toml" <<EOF
version = 2
root = "$STATE/containerd1"
state = "$RUN/containerd1/state"
[grpc]
  address = "$(sock containerd1)"
[ttrpc]
  address = "$(sock containerd1).ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/podckpt/pause:test"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$PREFIX/etc/cni1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$OCI_RUNTIME"
        SystemdCgroup = false
EOF
    cat >"$PREFIX/etc/containerd2.toml" <<EOF
version = 3
root = "$STATE/containerd2"
state = "$RUN/containerd2/state"
[grpc]
  address = "$(sock containerd2)"
[ttrpc]
  address = "$(sock containerd2).ttrpc"
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
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "$PREFIX/etc/cni2"
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "$OCI_RUNTIME"
        SystemdCgroup = false
EOF
    cat >"$PREFIX/etc/crio-policy.json" <<EOF
{"default":[{"type":"insecureAcceptAnything"}]}
EOF
    # CRI-O runs the OCI runtime through conmon: podckpt-runc gets its
    # settings through monitor_env.
    cat >"$PREFIX/etc/crio.conf" <<EOF
[crio]
root = "$CRIO_ROOT"
runroot = "$CRIO_RUNROOT"
storage_driver = "overlay"
log_dir = "$STATE/crio/logs"
version_file = "$RUN/crio/version"
version_file_persist = "$STATE/crio/version"
clean_shutdown_file = "$STATE/crio/clean.shutdown"
[crio.api]
listen = "$CRIO_SOCK"
[crio.runtime]
default_runtime = "runc"
cgroup_manager = "cgroupfs"
pinns_path = "$CRIO_BIN/pinns"
enable_criu_support = true
drop_infra_ctr = true
container_exits_dir = "$RUN/crio/exits"
container_attach_socket_dir = "$RUN/crio/attach"
namespaces_dir = "$RUN/crio/ns"
[crio.runtime.runtimes.runc]
runtime_path = "$OCI_RUNTIME"
runtime_type = "oci"
runtime_root = "$CRIO_RUNC_ROOT"
monitor_path = "$CRIO_BIN/conmon"
monitor_cgroup = "pod"
monitor_env = [
  "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
  "PODCKPT_RUNC=$RUNC",
  "PODCKPT_RUNC_LOG=$LOG/podckpt-runc.log",
  "PODCKPT_CRIU=$RUNC_CRIU",
]
[crio.image]
signature_policy = "$PREFIX/etc/crio-policy.json"
pause_image = "localhost/podckpt/pause:test"
[crio.network]
network_dir = "$PREFIX/etc/cni3"
plugin_dirs = ["/usr/lib/cni"]
[crio.metrics]
enable_metrics = false
EOF
}

running() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

wait_for_socket() {
    local path=$1 what=$2
    for _ in $(seq 1 300); do
        [ -S "$path" ] && return 0
        sleep 0.1
    done
    tail -20 "$LOG/$what.log" >&2 || true
    die "$what did not create $path"
}

start_containerd() {
    local name=$1 bin path
    running "$name" && return
    mkdir -p "$RUN/$name" "$STATE/$name"
    if [ "$name" = containerd1 ]; then
        bin=/usr/bin/containerd
        path=/usr/local/sbin:/usr/bin:/usr/sbin:/bin:/sbin
    else
        bin=$PREFIX/containerd2/usr/bin/containerd
        # Its own shim first on PATH: containerd finds the shim by name.
        path=$PREFIX/containerd2/usr/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/bin:/sbin
    fi
    log "starting $name ($("$bin" --version | awk '{print $3}'))"
    rm -f "$(sock "$name")"
    write_runc_criu
    PATH=$path PODCKPT_RUNC=$RUNC PODCKPT_RUNC_LOG=$LOG/podckpt-runc.log PODCKPT_CRIU=$RUNC_CRIU \
        setsid "$bin" --config "$PREFIX/etc/$name.toml" >>"$LOG/$name.log" 2>&1 </dev/null &
    echo $! >"$RUN/$name.pid"
    wait_for_socket "$(sock "$name")" "$name"
}

start_crio() {
    running crio && return
    mkdir -p "$RUN/crio" "$STATE/crio/logs" "$CRIO_ROOT" "$CRIO_RUNROOT" "$PREFIX/etc/crio.conf.d"
    log "starting crio ($("$CRIO_BIN/crio" --version | awk '/^crio version/ {print $3}'))"
    rm -f "$CRIO_SOCK"
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        setsid "$CRIO_BIN/crio" --config "$PREFIX/etc/crio.conf" --config-dir "$PREFIX/etc/crio.conf.d" \
        >>"$LOG/crio.log" 2>&1 </dev/null &
    echo $! >"$RUN/crio.pid"
    wait_for_socket "$CRIO_SOCK" crio
}

# CRI-O's image store is containers-storage: skopeo copies the OCI archives in.
import_images_crio() {
    local img stamp
    mkdir -p "$CRIO_ROOT" "$CRIO_RUNROOT"
    for img in pause app memhog; do
        stamp=$STATE/crio-$img.imported
        if [ ! "$stamp" -nt "$PREFIX/images/$img.tar" ]; then
            skopeo copy -q "oci-archive:$PREFIX/images/$img.tar" \
                "containers-storage:[overlay@$CRIO_ROOT+$CRIO_RUNROOT]localhost/podckpt/$img:test" >>"$LOG/skopeo.log" 2>&1 ||
                { tail -5 "$LOG/skopeo.log" >&2; die "skopeo could not copy $img into CRI-O's store"; }
            touch "$stamp"
        fi
    done
}

runtime_endpoint() {
    case "$1" in
        crio) echo "$CRIO_SOCK" ;;
        *) sock "$1" ;;
    esac
}

write_runc_criu() {
    mkdir -p "$PREFIX/bin" "$RUNC_CRIU_OVERRIDE"
    chmod 700 "$RUNC_CRIU_OVERRIDE"
    cat >"$RUNC_CRIU.tmp" <<EOF
#!/bin/sh
# podckpt-runc's CRIU on the test node (scripts/testbed.sh): the real one,
# or a test's stand-in for one command from a root-only directory.
if [ -n "\$1" ] && [ -x "$RUNC_CRIU_OVERRIDE/\$1" ]; then exec "$RUNC_CRIU_OVERRIDE/\$1" "\$@"; fi
exec $CRIU "\$@"
EOF
    chmod 755 "$RUNC_CRIU.tmp"
    mv "$RUNC_CRIU.tmp" "$RUNC_CRIU"
}

import_images() {
    local name=$1 ctr=$2 img stamp
    for img in pause app memhog; do
        # Imported again when the image was rebuilt (a changed memhog.c):
        # a stamp per runtime and image, newer than the tar once imported.
        stamp=$STATE/$name-$img.imported
        if ! "$ctr" -a "$(sock "$name")" -n k8s.io images ls -q | grep -qx "localhost/podckpt/$img:test" ||
            [ ! "$stamp" -nt "$PREFIX/images/$img.tar" ]; then
            "$ctr" -a "$(sock "$name")" -n k8s.io images import --no-unpack=false "$PREFIX/images/$img.tar" >/dev/null 2>&1 ||
                "$ctr" -a "$(sock "$name")" -n k8s.io images import "$PREFIX/images/$img.tar" >/dev/null
            touch "$stamp"
        fi
    done
}

start_podckptd() {
    running podckptd && return
    if [ ! -x "$BIN_DIR/podckptd" ]; then
        log "note: $BIN_DIR/podckptd is not built (cargo build --release); podckptd not started"
        return
    fi
    log "starting podckptd in front of $RUNTIME"
    mkdir -p "$RUN/podckptd-state"
    setsid "$BIN_DIR/podckptd" --listen "$PODCKPT_SOCK" --runtime-endpoint "$(runtime_endpoint "$RUNTIME")" \
        --criu "$CRIU" --state-dir "$STATE/podckptd" >>"$LOG/podckptd.log" 2>&1 </dev/null &
    echo $! >"$RUN/podckptd.pid"
    wait_for_socket "$PODCKPT_SOCK" podckptd
}

up() {
    mkdir -p "$PREFIX" "$RUN" "$STATE" "$LOG"
    case "$RUNTIME" in containerd1 | containerd2 | crio) ;; *) die "PODCKPT_RUNTIME must be containerd1, containerd2 or crio" ;; esac
    install_packages
    install_containerd2
    install_crio
    install_criu
    install_grpc_clients
    install_manifest_tools
    if [ ! -f "$PREFIX/images/memhog.tar" ] || [ "$repo/scripts/build_images.py" -nt "$PREFIX/images/memhog.tar" ] ||
        [ "$repo/scripts/images/memhog.c" -nt "$PREFIX/images/memhog.tar" ]; then
        log "building test images"
        python3 "$repo/scripts/build_images.py" "$PREFIX/images"
    fi
    write_configs
    start_containerd containerd1
    start_containerd containerd2
    import_images containerd1 "$CTR1"
    import_images containerd2 "$CTR2"
    # Images first: CRI-O reads its store at start.
    import_images_crio
    start_crio
    start_podckptd
    cat >"$RUN/testbed.env.tmp" <<EOF
PODCKPT_TESTBED=1
PODCKPT_RUNTIME=$RUNTIME
RUNTIME_ENDPOINT=$(runtime_endpoint "$RUNTIME")
CRIO_ENDPOINT=$CRIO_SOCK
CRIO_VERSION=$("$CRIO_BIN/crio" --version | awk '/^crio version/ {print $3}')
CRICTL=$CRIO_BIN/crictl
CHECKPOINTCTL=$CRIO_BIN/checkpointctl
CONTAINERD1_ENDPOINT=$(sock containerd1)
CONTAINERD2_ENDPOINT=$(sock containerd2)
CONTAINERD1_VERSION=$(/usr/bin/containerd --version | awk '{print $3}')
CONTAINERD2_VERSION=$("$PREFIX/containerd2/usr/bin/containerd" --version | awk '{print $3}')
PODCKPT_ENDPOINT=$PODCKPT_SOCK
PAUSE_IMAGE=localhost/podckpt/pause:test
APP_IMAGE=localhost/podckpt/app:test
MEMHOG_IMAGE=localhost/podckpt/memhog:test
CRIU=$CRIU
RUNC_CRIU_OVERRIDE=$RUNC_CRIU_OVERRIDE
CRIU_VERSION=$("$CRIU" --version | awk '/^Version/ {print $2}')
RUNC=$RUNC
RUNC_WRAPPER_LOG=$LOG/podckpt-runc.log
CTR1=$CTR1
CTR2=$CTR2
PYTHON_GRPC=$PREFIX/grpc-venv/bin/python
KUBECTL=$PREFIX/kubectl/usr/bin/kubectl
KUBERNETES_VALIDATE=$PREFIX/validate-venv/bin/kubernetes-validate
VALIDATE_PYTHON=$PREFIX/validate-venv/bin/python
CONTAINERD2_BIN=$PREFIX/containerd2/usr/bin
CRIO_BIN=$CRIO_BIN
IMAGES_DIR=$PREFIX/images
EOF
    mv "$RUN/testbed.env.tmp" "$RUN/testbed.env"
    log "up: logs in $LOG, environment in $RUN/testbed.env"
}

stop_pid() {
    local name=$1 pid
    [ -f "$RUN/$name.pid" ] || return 0
    pid=$(cat "$RUN/$name.pid")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$RUN/$name.pid"
}

down() {
    stop_pid podckptd
    # Containers first (runc state shared by both containerds' shims), then
    # the shims started by our containerds, then the daemons.
    if [ -d "$RUNC_ROOT" ]; then
        for id in $(runc --root "$RUNC_ROOT" list -q 2>/dev/null); do
            runc --root "$RUNC_ROOT" kill -a "$id" KILL 2>/dev/null || true
            runc --root "$RUNC_ROOT" delete -f "$id" 2>/dev/null || true
        done
    fi
    # CRI-O's containers (conmon is their parent), then CRI-O.
    if [ -d "$CRIO_RUNC_ROOT" ]; then
        for id in $(runc --root "$CRIO_RUNC_ROOT" list -q 2>/dev/null); do
            runc --root "$CRIO_RUNC_ROOT" kill -a "$id" KILL 2>/dev/null || true
            runc --root "$CRIO_RUNC_ROOT" delete -f "$id" 2>/dev/null || true
        done
    fi
    stop_pid crio
    for pid in $(pgrep -f "^$CRIO_BIN/conmon " || true); do
        kill -KILL "$pid" 2>/dev/null || true
    done
    local n pid
    for n in containerd1 containerd2; do
        for pid in $(pgrep -f "containerd-shim-runc-v2 .*-address $(sock $n)( |$)" || true); do
            kill -KILL "$pid" 2>/dev/null || true
        done
        stop_pid "$n"
    done
    # Mounts left by sandboxes and snapshots, deepest first.
    awk '{print $5}' /proc/self/mountinfo | grep -E "^($RUN|$STATE|/run/netns|/var/run/netns)/" | sort -r |
        while read -r m; do umount -l "$m" 2>/dev/null || true; done
    for ns in /run/netns/cni-*; do
        [ -e "$ns" ] && { umount -l "$ns" 2>/dev/null || true; rm -f "$ns"; }
    done
    for n in 1 2 3; do
        ip link del "podckpt$n" 2>/dev/null || true
        rm -rf "${STATE:?}/cni$n"
    done
    rm -f "$RUN/testbed.env"
    if [ "${PODCKPT_TESTBED_PURGE:-}" = 1 ]; then
        rm -rf "${STATE:?}" "${RUN:?}"
    fi
    log "down"
}

status() {
    local ok=0 n
    for n in containerd1 containerd2 crio podckptd; do
        if running "$n"; then
            echo "$n: running (pid $(cat "$RUN/$n.pid"))"
        else
            echo "$n: not running"
            ok=1
        fi
    done
    if [ -x "$CRIU" ]; then echo "criu: $("$CRIU" --version | head -1)"; else echo "criu: missing"; ok=1; fi
    [ -f "$RUN/testbed.env" ] && echo "env: $RUN/testbed.env" || ok=1
    return $ok
}

case "${1:-}" in
    up) up ;;
    criu-prefix) mkdir -p "$PREFIX" "$LOG"; fetch_criu; echo "$PREFIX/criu" ;;
    manifest-tools) mkdir -p "$PREFIX" "$LOG"; install_manifest_tools ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status|criu-prefix|manifest-tools" >&2; exit 2 ;;
esac
