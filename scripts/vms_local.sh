#!/usr/bin/env bash
# Install, start and stop a real OpenSSH server on loopback that stands in for a group of VMs (the
# `backend: vms` tests and cluster_configs/local_vms.yaml).  Every 127.0.0.0/8 address is local on
# Linux, so the "hosts" 127.0.0.2-127.0.0.5 need no setup; one sshd listens on all of them.
#
#   scripts/vms_local.sh install|start|stop|status|restart
#
# State folder (keys, sshd_config, pid file, log): $VMS_LOCAL_DIR (default /tmp/launcher-vms)
#   host_key          the server's key (one for every address: the tests ignore host keys)
#   client_key(.pub)  the key the launcher logs in with (ed25519, no passphrase, mode 0600)
#   authorized_keys   client_key.pub
#   hosts/<address>/  each host's own remote_dir (see cluster_configs/local_vms.yaml)
#
# Environment overrides (all optional):
#   VMS_LOCAL_DIR (/tmp/launcher-vms), VMS_LOCAL_PORT (2222), VMS_LOCAL_TIMEOUT (30 s per wait).
set -uo pipefail

PROG=vms_local
DIR=${VMS_LOCAL_DIR:-/tmp/launcher-vms}
PORT=${VMS_LOCAL_PORT:-2222}
TIMEOUT=${VMS_LOCAL_TIMEOUT:-30}
ADDRESSES=(127.0.0.2 127.0.0.3 127.0.0.4 127.0.0.5)
SSHD=/usr/sbin/sshd
CONFIG=$DIR/sshd_config
PIDFILE=$DIR/sshd.pid
LOG=$DIR/sshd.log
LOCK_FILE=$DIR.lock  # beside the folder: `stop` may run before the folder exists

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH

log() { echo "$PROG: $*"; }

# die MESSAGE [LOGFILE]: print the message and the tail of the log, exit 1.
die() {
    echo "$PROG: ERROR: $1" >&2
    if [[ -n ${2:-} && -s $2 ]]; then
        echo "$PROG: ---- last lines of $2 ----" >&2
        tail -n 20 "$2" >&2
    fi
    exit 1
}

is_root() { [[ $(id -u) -eq 0 ]]; }

# proc_running PID: the process exists and is not a zombie (a container's PID 1 may never reap it).
proc_running() {
    local stat
    kill -0 "$1" 2>/dev/null || return 1
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]]
}

pid_of() { tr -dc '0-9' 2>/dev/null <"$PIDFILE"; }

# sshd_alive: the pid in our PidFile is a live sshd (a reused pid of another program does not count).
sshd_alive() {
    local pid
    pid=$(pid_of)
    [[ -n $pid ]] && proc_running "$pid" && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == sshd* ]]
}

port_open() { (exec 3<>"/dev/tcp/$1/$PORT") 2>/dev/null; }

all_ports_open() {
    local a
    for a in "${ADDRESSES[@]}"; do
        port_open "$a" || return 1
    done
}

# ---------------------------------------------------------------- install
do_install() {
    if [[ -x $SSHD ]]; then
        log "openssh-server already installed"
        return 0
    fi
    is_root || die "$SSHD is missing and installing openssh-server needs root (uid is $(id -u))"
    command -v apt-get >/dev/null || die "$SSHD is missing and apt-get is not found: install openssh-server"
    log "installing openssh-server"
    local added_policy=0 rc=0 aptlog t0=$SECONDS
    # Keep the package's scripts from starting the system sshd on port 22: we run our own.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        added_policy=1
    fi
    aptlog=$(mktemp)
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -q &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openssh-server
    } >"$aptlog" 2>&1 || rc=$?
    (( added_policy )) && rm -f /usr/sbin/policy-rc.d
    if (( rc != 0 )); then
        tail -n 20 "$aptlog" >&2
        rm -f "$aptlog"
        die "apt-get install openssh-server failed (rc=$rc)"
    fi
    rm -f "$aptlog"
    [[ -x $SSHD ]] || die "$SSHD still missing after installing openssh-server"
    log "openssh-server installed in $(( SECONDS - t0 )) s"
}

# ---------------------------------------------------------------- keys and config
make_keys() {
    mkdir -p "$DIR/hosts"
    chmod 700 "$DIR"
    if [[ ! -s $DIR/host_key ]]; then
        rm -f "$DIR/host_key" "$DIR/host_key.pub"
        ssh-keygen -q -t ed25519 -N '' -C launcher-vms-host -f "$DIR/host_key" || die "ssh-keygen (host key) failed"
    fi
    if [[ ! -s $DIR/client_key || ! -s $DIR/client_key.pub ]]; then
        rm -f "$DIR/client_key" "$DIR/client_key.pub"
        ssh-keygen -q -t ed25519 -N '' -C launcher-vms-client -f "$DIR/client_key" || die "ssh-keygen (client key) failed"
        log "generated $DIR/client_key"
    fi
    # OpenSSH and the launcher refuse a private key that others can read
    chmod 600 "$DIR/host_key" "$DIR/client_key"
    cp "$DIR/client_key.pub" "$DIR/authorized_keys"
    chmod 600 "$DIR/authorized_keys"
}

config_text() {
    local a
    echo "# Written by scripts/vms_local.sh: loopback \"VMs\" for the vms backend's tests."
    echo "Port $PORT"
    for a in "${ADDRESSES[@]}"; do
        echo "ListenAddress $a"
    done
    cat <<EOF
HostKey $DIR/host_key
AuthorizedKeysFile $DIR/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
PidFile $PIDFILE
# the key files live in a temporary folder that StrictModes would reject
StrictModes no
UsePAM no
UseDNS no
PrintMotd no
PrintLastLog no
# the launcher opens a session per host and per command at once: do not drop concurrent logins
MaxStartups 200
MaxSessions 100
Subsystem sftp internal-sftp
EOF
}

# write_config: sets CONFIG_CHANGED=1 when the file was (re)written.
write_config() {
    local text tmp
    text=$(config_text)
    CONFIG_CHANGED=0
    if [[ -f $CONFIG ]] && [[ "$(cat "$CONFIG")" == "$text" ]]; then
        return 0
    fi
    tmp=$(mktemp "$CONFIG.XXXXXX")
    printf '%s\n' "$text" >"$tmp"
    mv -f "$tmp" "$CONFIG"
    CONFIG_CHANGED=1
    log "wrote $CONFIG"
}

# ---------------------------------------------------------------- commands
stop_sshd() {
    local pid deadline
    if ! sshd_alive; then
        rm -f "$PIDFILE"
        return 0
    fi
    pid=$(pid_of)
    log "stopping sshd (pid $pid)"
    # only the listener in our PidFile: sessions it forked end with their clients
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$(( SECONDS + 10 ))
    while proc_running "$pid"; do
        if (( SECONDS >= deadline )); then
            log "sshd (pid $pid) did not exit after 10 s; sending KILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
    done
    rm -f "$PIDFILE"
}

do_start() {
    do_install
    make_keys
    write_config
    if sshd_alive; then
        if (( CONFIG_CHANGED == 0 )) && all_ports_open; then
            log "up: sshd (pid $(pid_of)) on ${ADDRESSES[*]} port $PORT"
            return 0
        fi
        log "configuration changed or a port is not answering; restarting sshd"
        stop_sshd
    fi
    mkdir -p /run/sshd 2>/dev/null || true  # sshd's privilege separation folder (root only)
    "$SSHD" -t -f "$CONFIG" 2>"$DIR/sshd_check.log" || die "sshd refuses $CONFIG" "$DIR/sshd_check.log"
    # fd 9 (the lock) closed: the daemon must not hold it
    "$SSHD" -f "$CONFIG" -E "$LOG" 9>&- || die "sshd failed to start" "$LOG"
    local deadline=$(( SECONDS + TIMEOUT ))
    until all_ports_open; do
        # sshd writes its PidFile once it listens: no live pid after a moment means it died
        (( SECONDS >= deadline )) && die "sshd not answering on port $PORT after ${TIMEOUT} s" "$LOG"
        sleep 0.1
    done
    log "up: sshd (pid $(pid_of)) on ${ADDRESSES[*]} port $PORT; key $DIR/client_key"
}

do_status() {
    if sshd_alive && all_ports_open; then
        log "up: sshd (pid $(pid_of)) on ${ADDRESSES[*]} port $PORT"
        return 0
    fi
    log "down"
    return 1
}

# Serialise concurrent start/stop calls (test sessions started side by side).
take_lock() {
    exec 9>"$LOCK_FILE"
    if command -v flock >/dev/null && ! flock -w 600 9; then
        die "could not take $LOCK_FILE within 600 s"
    fi
}

case ${1:-} in
    install) take_lock; do_install ;;
    start) take_lock; do_start ;;
    stop) take_lock; stop_sshd ;;
    status) do_status ;;
    restart) take_lock; stop_sshd; do_start ;;
    *)
        echo "usage: $0 install|start|stop|status|restart" >&2
        exit 2
        ;;
esac
exit $?
