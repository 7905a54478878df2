#!/bin/sh
# podckpt's node installer: the main process of the DaemonSet's pod (image
# built by scripts/build_podckpt_image.sh). podckptd must be a host service,
# not a container of this pod: the kubelet reaches its runtime through
# podckptd's socket, and a pod that held that socket could not be restarted
# or upgraded without taking the kubelet's runtime away. So this pod only
# installs, configures, upgrades and watches the host service.
#
#   install.sh            do $PODCKPT_INSTALL_MODE (install|uninstall), then
#                         stay, re-checking every $PODCKPT_WATCH_INTERVAL s
#   install.sh install    install once and exit (idempotent)
#   install.sh uninstall  undo everything install did and exit
#   install.sh ready      the readiness probe: exit 0 when the mode's goal
#                         holds (installed and healthy, or all removed)
#
# Environment (the DaemonSet sets it, from the podckpt-installer ConfigMap):
#   PODCKPT_HOST_ROOT      where the host's / is mounted in this container (/host)
#   PODCKPT_HOST_DIR       the host path that mount shows (/; a test dir in tests)
#   PODCKPT_RUNTIME        auto|containerd|crio (auto: the one whose config exists)
#   PODCKPT_CONTAINERD_CONFIG  containerd's main config (/etc/containerd/config.toml)
#   PODCKPT_CONTAINERD_BIN     containerd on the host's PATH, for `config dump` (containerd)
#   PODCKPT_CONTAINERD_HANDLER the CRI runtime handler to wrap (runc)
#   PODCKPT_CONTAINERD_UNIT    its systemd unit (containerd.service)
#   PODCKPT_CRIO_CONFIG        CRI-O's main config (/etc/crio/crio.conf)
#   PODCKPT_CRIO_CONFIG_DIR    CRI-O's drop-in dir (/etc/crio/crio.conf.d)
#   PODCKPT_CRIO_BIN           crio on the host's PATH (crio)
#   PODCKPT_CRIO_UNIT          its systemd unit (crio.service)
#   PODCKPT_SYSTEMCTL      the host command used as systemctl (systemctl). On a
#                          host without systemd as PID 1, a command that takes
#                          the same verbs (daemon-reload, enable --now, restart,
#                          try-restart, is-active, disable --now) for
#                          podckptd.socket, podckptd.service and the runtime's unit.
#   PODCKPT_KUBELET_FILES  host files that name the kubelet's runtime endpoint;
#                          uninstall refuses while one of them names podckptd
#   PODCKPT_WATCH_INTERVAL seconds between checks while staying (30)
#   PODCKPT_HOST_PID       the host process whose namespaces host commands run
#                          in (1; the pod has hostPID and is privileged)
#   PODCKPT_SETTINGS_FILE  podckptd's configuration file from the ConfigMap
#                          podckptd, installed as /etc/podckpt/podckptd.toml
#   PODCKPT_RUNC, PODCKPT_RUNC_LOG  podckpt-runc's settings (the runc it
#                          runs, its log), passed to it through the runtime
set -eu

SRC=${PODCKPT_IMAGE_DIR:-/opt/podckpt}
H=${PODCKPT_HOST_ROOT:-/host}
H=${H%/}
HP=${PODCKPT_HOST_DIR:-/}
HP=${HP%/}
RUNTIME=${PODCKPT_RUNTIME:-auto}
CTD_CONFIG=${PODCKPT_CONTAINERD_CONFIG:-/etc/containerd/config.toml}
CTD_BIN=${PODCKPT_CONTAINERD_BIN:-containerd}
CTD_HANDLER=${PODCKPT_CONTAINERD_HANDLER:-runc}
CTD_UNIT=${PODCKPT_CONTAINERD_UNIT:-containerd.service}
CRIO_CONFIG=${PODCKPT_CRIO_CONFIG:-/etc/crio/crio.conf}
CRIO_CONFIG_DIR=${PODCKPT_CRIO_CONFIG_DIR:-/etc/crio/crio.conf.d}
CRIO_BIN=${PODCKPT_CRIO_BIN:-crio}
CRIO_UNIT=${PODCKPT_CRIO_UNIT:-crio.service}
SYSTEMCTL=${PODCKPT_SYSTEMCTL:-systemctl}
KUBELET_FILES=${PODCKPT_KUBELET_FILES:-/var/lib/kubelet/config.yaml /etc/default/kubelet /var/lib/kubelet/kubeadm-flags.env /etc/sysconfig/kubelet}
INTERVAL=${PODCKPT_WATCH_INTERVAL:-30}
HOST_PID=${PODCKPT_HOST_PID:-1}
# podckptd's configuration file from the ConfigMap (TOML, keys: the long
# flag names of `podckptd --help`).
SETTINGS=${PODCKPT_SETTINGS_FILE:-/etc/podckpt-config/podckptd.toml}

# What is installed, as host paths (under $HP). Everything podckpt puts on
# a node is in this list or in the runtime's config edit below.
BIN=/usr/local/bin
PRIV=/opt/podckpt
CRIU_WRAPPER=$PRIV/bin/criu
UNITS=/etc/systemd/system
CONFIG_DIR=/etc/podckpt
CONFIG=$CONFIG_DIR/podckptd.toml
# The environment file earlier versions wrote (its PODCKPT_* variables would
# override the configuration file): removed when it is ours.
DEFAULTS=/etc/default/podckptd
DEFAULTS_MARK="# podckptd's settings, written by podckpt's DaemonSet from its ConfigMap"
CTD_DROPIN=/etc/containerd/podckpt.toml
CTD_UNIT_DROPIN=$UNITS/$CTD_UNIT.d/podckpt.conf
CRIO_DROPIN=$CRIO_CONFIG_DIR/99-podckpt.conf
IMPORT_MARK='# added by podckpt'
# The pod's own note that its install finished (in the container, not on
# the host): the readiness probe is false until then.
DONE=${PODCKPT_DONE_FILE:-/tmp/podckpt-installed}

log() { printf '%s podckpt-installer: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# A host command, in the host's mount, uts, ipc, net and pid namespaces.
host() { nsenter -t "$HOST_PID" -m -u -i -n -p -- "$@"; }
ctl() { host $SYSTEMCTL "$@"; }

# Writes stdin to the host file $1 (a host path) with mode $2 (or the mode
# it has: an admin's config keeps its own) when its content differs: through
# a temporary file (root's, in a root-owned directory) and a rename, so that
# a binary in use is replaced, not overwritten. Returns 0 when it changed
# the file.
put() {
    local dst=$H$1 mode=$2 tmp
    tmp=$dst.podckpt-new
    mkdir -p "$(dirname "$dst")"
    (umask 077 && cat >"$tmp")
    if [ -f "$dst" ] && cmp -s "$tmp" "$dst"; then
        rm -f "$tmp"
        return 1
    fi
    [ -f "$dst" ] && mode=$(stat -c %a "$dst")
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$dst"
    log "wrote $HP$1"
    return 0
}

# Removes host files; returns 0 when one was there.
remove() {
    local r=1 f
    for f in "$@"; do
        if [ -e "$H$f" ] || [ -L "$H$f" ]; then
            rm -rf "$H$f"
            log "removed $HP$f"
            r=0
        fi
    done
    return $r
}

# Removes the host directories if they are empty (deepest first).
prune() { for d in "$@"; do rmdir "$H$d" 2>/dev/null || true; done; }

detect_runtime() {
    case "$RUNTIME" in
        containerd | crio) echo "$RUNTIME" ;;
        auto)
            if [ -f "$H$CTD_CONFIG" ]; then echo containerd
            elif [ -f "$H$CRIO_CONFIG" ] || [ -d "$H$CRIO_CONFIG_DIR" ]; then echo crio
            else die "no runtime config found ($HP$CTD_CONFIG, $HP$CRIO_CONFIG): set PODCKPT_RUNTIME"
            fi ;;
        *) die "PODCKPT_RUNTIME must be auto, containerd or crio, not '$RUNTIME'" ;;
    esac
}

# The value of a top-level string key of the configuration file (`key =
# "value"` on one line, before any [table]), or nothing.
setting() {
    [ -f "$SETTINGS" ] || return 0
    awk -v k="$1" '
        /^[[:space:]]*\[/ { exit }
        {
            line = $0; sub(/^[[:space:]]+/, "", line)
            if (index(line, k) != 1) next
            rest = substr(line, length(k) + 1); sub(/^[[:space:]]*/, "", rest)
            if (substr(rest, 1, 1) != "=") next
            rest = substr(rest, 2); sub(/^[[:space:]]*/, "", rest)
            q = substr(rest, 1, 1)
            if (q != "\"" && q != "\047") next
            rest = substr(rest, 2)
            print substr(rest, 1, index(rest, q) - 1)
            exit
        }' "$SETTINGS"
}

# The environment podckpt-runc needs from the runtime: the CRIU it restores
# with, the restore dir it shares with podckptd (the file's `restore-dir`),
# and its own settings, PODCKPT_RUNC and PODCKPT_RUNC_LOG, when set in the
# installer's environment (ConfigMap podckpt-installer).
runtime_env() {
    echo "PODCKPT_CRIU=$HP$CRIU_WRAPPER"
    rd=$(setting restore-dir)
    [ -n "$rd" ] && echo "PODCKPT_RESTORE_DIR=$rd"
    [ -n "${PODCKPT_RUNC:-}" ] && echo "PODCKPT_RUNC=$PODCKPT_RUNC"
    [ -n "${PODCKPT_RUNC_LOG:-}" ] && echo "PODCKPT_RUNC_LOG=$PODCKPT_RUNC_LOG"
    return 0
}

# ---- files ---------------------------------------------------------------

install_files() {
    changed_daemon=1
    for b in podckptd podckpt podckpt-runc; do
        if put "$BIN/$b" 755 <"$SRC/bin/$b" && [ "$b" = podckptd ]; then changed_daemon=0; fi
    done
    # CRIU with its own libc in a private prefix (as the test node runs it):
    # copied whole when the image's differs (its stamp is the image's
    # checksum list of the prefix).
    if ! cmp -s "$SRC/criu.sha256" "$H$PRIV/criu.sha256" 2>/dev/null; then
        rm -rf "$H$PRIV/criu.podckpt-new"
        mkdir -p "$H$PRIV"
        cp -a "$SRC/criu" "$H$PRIV/criu.podckpt-new"
        rm -rf "$H$PRIV/criu"
        mv "$H$PRIV/criu.podckpt-new" "$H$PRIV/criu"
        cp "$SRC/criu.sha256" "$H$PRIV/criu.sha256"
        log "installed CRIU into $HP$PRIV/criu"
    fi
    l=$HP$PRIV/criu
    put "$CRIU_WRAPPER" 755 <<EOF || true
#!/bin/sh
# CRIU with its own libc, installed by podckpt's DaemonSet (deploy/)
exec $l/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path $l/usr/lib/x86_64-linux-gnu:$l/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu $l/usr/sbin/criu "\$@"
EOF
    host "$HP$CRIU_WRAPPER" --version >/dev/null || die "the installed CRIU does not run on this host"

    changed_units=1
    # The units name /usr/local/bin/podckptd and /run/podckpt: under a host
    # dir other than / (tests) they are rewritten to it. podckptd is given
    # the configuration file by name, so that it is the one read there too.
    for u in podckptd.socket podckptd.service; do
        sed -e "s#/usr/local/bin/#$HP/usr/local/bin/#g" -e "s#/etc/default/podckptd#$HP$DEFAULTS#g" \
            -e "s#^\(ExecStart=.*/podckptd\)\$#\1 --config $HP$CONFIG#" \
            "$SRC/systemd/$u" | put "$UNITS/$u" 644 && changed_units=0
    done
    # podckptd's configuration file: the ConfigMap's, with the CRIU
    # installed here unless it names one. The `criu` line goes first: a
    # top-level key after a [table] would belong to the table.
    {
        echo "# podckptd's settings, written by podckpt's DaemonSet from its ConfigMap (podckptd --help)"
        grep -Eq '^[[:space:]]*criu[[:space:]]*=' "$SETTINGS" 2>/dev/null || echo "criu = \"$HP$CRIU_WRAPPER\""
        [ -f "$SETTINGS" ] && cat "$SETTINGS" || true
    } | put "$CONFIG" 644 && changed_daemon=0
    # The environment file of earlier versions: its variables would
    # override the file above.
    if [ -f "$H$DEFAULTS" ] && [ "$(head -n 1 "$H$DEFAULTS")" = "$DEFAULTS_MARK" ]; then
        remove "$DEFAULTS" && changed_daemon=0
    fi
    [ $changed_units = 0 ] && ctl daemon-reload
    return 0
}

# ---- containerd ----------------------------------------------------------

ctd_version() {
    v=$(awk -F= '/^[[:space:]]*version[[:space:]]*=/ { gsub(/[[:space:]"]/, "", $2); print $2; exit }' "$H$CTD_CONFIG")
    case "$v" in
        2 | 3) echo "$v" ;;
        *) die "$HP$CTD_CONFIG: config version '$v' is not supported (containerd 1.6/1.7 use version = 2, 2.x version = 3)" ;;
    esac
}

# The main config with our drop-in in its `imports` (added at the end, so
# that it is merged last), or without it ($1 = add|remove), on stdout.
ctd_imports() {
    path=$HP$CTD_DROPIN
    if grep -Eq '^[[:space:]]*imports[[:space:]]*=' "$H$CTD_CONFIG"; then
        awk -v op="$1" -v p="$path" -v mark="$IMPORT_MARK" '
            function strip(line) {
                gsub("\"" p "\"[[:space:]]*,[[:space:]]*", "", line)
                gsub("[[:space:]]*,[[:space:]]*\"" p "\"", "", line)
                gsub("\"" p "\"", "", line)
                return line
            }
            /^[[:space:]]*imports[[:space:]]*=/ {
                if ($0 !~ /\]/) { print "imports spans lines" > "/dev/stderr"; exit 3 }
                line = strip($0)
                if (op == "remove") {
                    if (index(line, mark) && line ~ /\[[[:space:]]*\]/) next
                    print line; next
                }
                if (line ~ /\[[[:space:]]*\]/) sub(/\[[[:space:]]*\]/, "[\"" p "\"]", line)
                else sub(/\][^]]*$/, ", \"" p "\"]", line)
                print line; next
            }
            { print }
        ' "$H$CTD_CONFIG"
    elif [ "$1" = add ]; then
        awk -v p="$path" -v mark="$IMPORT_MARK" '
            /^[[:space:]]*version[[:space:]]*=/ && !done { print; print "imports = [\"" p "\"] " mark; done = 1; next }
            { print }
        ' "$H$CTD_CONFIG"
    else
        cat "$H$CTD_CONFIG"
    fi
}

# The drop-in. containerd 2.x (config version 3) merges imported tables key
# by key, so it only names the wrapper. containerd 1.6/1.7 (version 2)
# replace a plugin's whole section with an import's, so there the drop-in is
# the CRI plugin's complete effective section (from `containerd config
# dump` of the config without our import), with the wrapper set.
ctd_dropin() {
    ver=$1
    echo "# podckpt: the CRI runtime handler '$CTD_HANDLER' runs containers through podckpt-runc."
    echo "# Written by podckpt's DaemonSet; removed by its uninstall mode."
    if [ "$ver" = 3 ]; then
        cat <<EOF
version = 3
[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.$CTD_HANDLER.options]
  BinaryName = "$HP$BIN/podckpt-runc"
EOF
        return
    fi
    echo "# containerd 1.x replaces a plugin's section with an import's: this is the whole"
    echo "# CRI section as dumped at install time; re-running the installer refreshes it."
    echo "version = 2"
    tmp=$CTD_CONFIG.podckpt-base
    ctd_imports remove >"$H$tmp"
    host "$CTD_BIN" --config "$HP$tmp" config dump >"$H$tmp.dump" 2>"$H$tmp.err" ||
        { rm -f "$H$tmp" "$H$tmp.dump"; cat "$H$tmp.err" >&2; rm -f "$H$tmp.err"; die "containerd config dump failed"; }
    rm -f "$H$tmp" "$H$tmp.err"
    awk -v bin="$HP$BIN/podckpt-runc" -v h="$CTD_HANDLER" '
        /^[[:space:]]*\[/ {
            hdr = $0; sub(/^[[:space:]]+/, "", hdr)
            insec = index(hdr, "[plugins.\"io.containerd.grpc.v1.cri\"") == 1
            inopt = hdr == "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes." h ".options]"
            if (insec) print
            if (inopt) { print "  BinaryName = \"" bin "\""; seen = 1 }
            next
        }
        insec { if (inopt && $1 == "BinaryName") next; print }
        END { if (!seen) exit 3 }
    ' "$H$tmp.dump" || { rm -f "$H$tmp.dump"; die "containerd has no CRI runtime handler '$CTD_HANDLER' (set PODCKPT_CONTAINERD_HANDLER)"; }
    rm -f "$H$tmp.dump"
}

ctd_unit_dropin() {
    echo "# podckpt-runc's settings, written by podckpt's DaemonSet"
    echo "[Service]"
    runtime_env | while IFS= read -r kv; do echo "Environment=\"$kv\""; done
}

configure_containerd() {
    ver=$(ctd_version)
    changed=1
    ctd_unit_dropin | put "$CTD_UNIT_DROPIN" 644 && { changed=0; ctl daemon-reload; }
    ctd_dropin "$ver" | put "$CTD_DROPIN" 644 && changed=0
    ctd_imports add | put "$CTD_CONFIG" 644 && changed=0
    if [ $changed = 0 ]; then
        log "containerd's config changed: restarting $CTD_UNIT (running containers keep running: their shims stay)"
        ctl restart "$CTD_UNIT"
    else
        log "containerd's config unchanged: not restarted"
    fi
}

unconfigure_containerd() {
    changed=1
    if [ -f "$H$CTD_CONFIG" ]; then
        ctd_imports remove | put "$CTD_CONFIG" 644 && changed=0
    fi
    remove "$CTD_DROPIN" && changed=0
    remove "$CTD_UNIT_DROPIN" && { changed=0; prune "$UNITS/$CTD_UNIT.d"; ctl daemon-reload; }
    if [ $changed = 0 ]; then
        log "restarting $CTD_UNIT without podckpt-runc"
        ctl restart "$CTD_UNIT"
    fi
}

# ---- CRI-O ---------------------------------------------------------------

# CRI-O also replaces a whole runtime handler with a drop-in's: the drop-in
# is the effective [crio.runtime.runtimes.runc] (from `crio config` without
# our drop-in) with runtime_path set to podckpt-runc, the previous runtime
# path passed on as PODCKPT_RUNC, and podckpt-runc's settings in monitor_env.
crio_dropin() {
    base=/run/podckpt-installer
    rm -rf "$H$base"
    mkdir -p "$H$base/conf.d"
    for f in "$H$CRIO_CONFIG_DIR"/*; do
        [ -f "$f" ] && [ "$f" != "$H$CRIO_DROPIN" ] && cp "$f" "$H$base/conf.d/"
    done
    cfg=
    [ -f "$H$CRIO_CONFIG" ] && cfg="--config $HP$CRIO_CONFIG"
    # shellcheck disable=SC2086
    host "$CRIO_BIN" $cfg --config-dir "$HP$base/conf.d" config >"$H$base/dump" 2>"$H$base/err" ||
        { cat "$H$base/err" >&2; rm -rf "$H$base"; die "crio config failed"; }
    env_lines=$(runtime_env)
    awk -v bin="$HP$BIN/podckpt-runc" -v envs="$env_lines" '
        function flush_env() {
            n = split(envs, e, "\n")
            for (i = 1; i <= n; i++) if (e[i] != "") print "\t\"" e[i] "\","
            # The runtime the handler ran before is the one podckpt-runc
            # hands on to (unless it was a podckpt-runc already).
            if (orig != "" && orig !~ /podckpt-runc$/) print "\t\"PODCKPT_RUNC=" orig "\","
        }
        /^\[/ { insec = $0 == "[crio.runtime.runtimes.runc]"; if (insec) { print; seen = 1 } ; next }
        !insec || /^[[:space:]]*#/ || /^[[:space:]]*$/ { next }
        /^runtime_path[[:space:]]*=/ { orig = $0; sub(/^[^"]*"/, "", orig); sub(/".*$/, "", orig); print "runtime_path = \"" bin "\""; next }
        /^monitor_env[[:space:]]*=[[:space:]]*\[[[:space:]]*\]/ { print "monitor_env = ["; flush_env(); print "]"; next }
        /^monitor_env[[:space:]]*=/ { inenv = 1; print; next }
        inenv && /^\]/ { flush_env(); inenv = 0; print; next }
        inenv && /PODCKPT_/ { next }
        { print }
        END { if (!seen) exit 3 }
    ' "$H$base/dump" >"$H$base/section" || { rm -rf "$H$base"; die "CRI-O has no runtime handler runc"; }
    echo "# podckpt: CRI-O's runtime handler runc runs containers through podckpt-runc."
    echo "# Written by podckpt's DaemonSet; removed by its uninstall mode. CRI-O replaces a whole"
    echo "# handler with a drop-in's, so this is the handler as configured at install time."
    cat "$H$base/section"
    rm -rf "$H$base"
}

configure_crio() {
    if crio_dropin | put "$CRIO_DROPIN" 644; then
        log "CRI-O's config changed: restarting $CRIO_UNIT (running containers keep running: conmon stays)"
        ctl restart "$CRIO_UNIT"
    else
        log "CRI-O's config unchanged: not restarted"
    fi
}

unconfigure_crio() {
    if remove "$CRIO_DROPIN"; then
        log "restarting $CRIO_UNIT without podckpt-runc"
        ctl restart "$CRIO_UNIT"
    fi
}

# ---- modes ---------------------------------------------------------------

do_install() {
    rt=$(detect_runtime)
    log "installing onto ${HP:-/} (runtime: $rt)"
    changed_daemon=1
    install_files
    # The wrapper is in place before the runtime is pointed at it.
    "configure_$rt"
    if ! ctl is-active podckptd.socket >/dev/null 2>&1 || ! ctl is-active podckptd.service >/dev/null 2>&1; then
        ctl enable --now podckptd.socket podckptd.service
    elif [ "$changed_daemon" = 0 ]; then
        # The socket unit holds the socket: clients wait in its backlog.
        log "podckptd or its settings changed: restarting podckptd.service (the socket stays open)"
        ctl restart podckptd.service
    fi
    log "installed"
}

# True when a kubelet config on the host still names podckptd's socket.
kubelet_uses_podckptd() {
    for f in $KUBELET_FILES; do
        if [ -f "$H$f" ] && grep -q 'podckpt\.sock' "$H$f"; then
            log "$HP$f names podckptd's socket: point the kubelet back at the runtime first (deploy/README.md)"
            return 0
        fi
    done
    return 1
}

# The containers whose runtime still calls podckpt-runc. containerd's runc
# shim keeps the binary it was given at create (its options.json) for the
# container's whole life: to stop, exec into or delete a container created
# while podckpt was installed, podckpt-runc must still be there. (CRI-O
# looks the handler's runtime_path up at each call: none there.)
wrapper_users() {
    [ "$(detect_runtime)" = containerd ] || return 0
    state=$(awk -F'"' '/^[[:space:]]*state[[:space:]]*=/ { print $2; exit }' "$H$CTD_CONFIG")
    state=${state:-/run/containerd}
    case "$state" in
        "$HP"/*) state=$H${state#"$HP"} ;;
        *) [ -z "$HP" ] && state=$H$state || return 0 ;;
    esac
    grep -ls "$HP$BIN/podckpt-runc" "$state"/io.containerd.runtime.v2.task/*/*/options.json 2>/dev/null |
        while IFS= read -r f; do basename "$(dirname "$f")"; done
}

do_uninstall() {
    kubelet_uses_podckptd && return 1
    rt=$(detect_runtime)
    log "uninstalling from ${HP:-/} (runtime: $rt)"
    "unconfigure_$rt"
    if ctl is-active podckptd.service >/dev/null 2>&1 || ctl is-active podckptd.socket >/dev/null 2>&1; then
        ctl disable --now podckptd.socket podckptd.service || true
    fi
    remove "$UNITS/podckptd.socket" "$UNITS/podckptd.service" && ctl daemon-reload
    remove "$BIN/podckptd" "$BIN/podckpt" "$CONFIG" "$PRIV" \
        /run/podckpt /var/lib/podckpt /var/log/podckpt || true
    prune "$CONFIG_DIR"
    if [ -f "$H$DEFAULTS" ] && [ "$(head -n 1 "$H$DEFAULTS")" = "$DEFAULTS_MARK" ]; then
        remove "$DEFAULTS" || true
    fi
    # podckpt-runc goes last, once no container runs on it (with no
    # podckptd left it only hands every call on to runc).
    if [ -e "$H$BIN/podckpt-runc" ]; then
        users=$(wrapper_users | tr '\n' ' ')
        if [ -n "$users" ]; then
            log "podckpt-runc kept: containers created while podckpt was installed still run on it: $users(it is removed once they are gone; see deploy/README.md)"
        else
            remove "$BIN/podckpt-runc"
        fi
    fi
    log "uninstalled"
}

# The readiness probe: podckptd answers, and the runtime behind it too
# (`podckpt health`, which also checks CRIU; builds without it have
# `version` only). It runs the podckpt installed on the host, in the host's
# namespaces: the image has no libc for it, and the host's podckpt is the
# one that matches podckptd.
do_ready() {
    if [ "${PODCKPT_INSTALL_MODE:-install}" = uninstall ]; then
        for f in "$BIN/podckptd" "$PRIV" "$UNITS/podckptd.service" "$CTD_DROPIN" "$CRIO_DROPIN"; do
            [ -e "$H$f" ] && { echo "still installed: $HP$f"; return 1; }
        done
        if [ -e "$H$BIN/podckpt-runc" ]; then
            users=$(wrapper_users | tr '\n' ' ')
            [ -n "$users" ] || { echo "still installed: $HP$BIN/podckpt-runc"; return 1; }
            echo "uninstalled; podckpt-runc kept for the containers still running on it: $users"
        fi
        return 0
    fi
    [ -f "$DONE" ] || { echo "not installed yet"; return 1; }
    cli=$HP$BIN/podckpt
    endpoint=unix://$HP/run/podckpt/podckpt.sock
    if host "$cli" health --help >/dev/null 2>&1; then
        host "$cli" --endpoint "$endpoint" health
    else
        host "$cli" --endpoint "$endpoint" version >/dev/null
    fi
}

stay() {
    trap 'log "stopping (the host service keeps running)"; exit 0' TERM INT
    while :; do
        sleep "$INTERVAL" &
        wait $! || true
        if [ "$RUN_MODE" = install ]; then
            ctl is-active podckptd.service >/dev/null 2>&1 || log "podckptd.service is not active on the host"
        elif ! do_ready >/dev/null 2>&1 || { [ -e "$H$BIN/podckpt-runc" ] && [ -z "$(wrapper_users)" ]; }; then
            do_uninstall || true
        fi
    done
}

RUN_MODE=${1:-${PODCKPT_INSTALL_MODE:-install}}
case "$RUN_MODE" in
    install)
        rm -f "$DONE"
        do_install
        : >"$DONE"
        ;;
    uninstall)
        rm -f "$DONE"
        do_uninstall || { [ $# -eq 0 ] || exit 1; }
        ;;
    ready) do_ready; exit ;;
    *) die "unknown mode '$RUN_MODE' (install, uninstall, ready)" ;;
esac
[ $# -eq 0 ] && stay
exit 0
