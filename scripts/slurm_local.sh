#!/usr/bin/env bash
# Install, start and stop a real single-node Slurm (with slurmdbd + MariaDB
# accounting, so `sacct` works) on this machine.  Needs root; no systemd needed.
#
#   scripts/slurm_local.sh install|start|stop|status|restart
#
# The node advertises CPUs=8 / RealMemory=8000 whatever the hardware is
# (SlurmdParameters=config_overrides), so multi-task jobs and several concurrent
# array tasks fit on a small CI box.  Partition `debug` (default).
#
# Environment overrides (all optional):
#   SLURM_LOCAL_CPUS (8), SLURM_LOCAL_MEM (8000), SLURM_LOCAL_TIMEOUT (60 s per wait),
#   SLURM_LOCAL_DBPASS (database password for the local `slurm` MariaDB user).
set -uo pipefail

PROG=slurm_local
HOST=$(hostname -s)
CPUS=${SLURM_LOCAL_CPUS:-8}
MEM=${SLURM_LOCAL_MEM:-8000}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
DBPASS=${SLURM_LOCAL_DBPASS:-slurm_local_pw}
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

CONF_DIR=/etc/slurm
SLURM_CONF=$CONF_DIR/slurm.conf
DBD_CONF=$CONF_DIR/slurmdbd.conf
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
DBD_PID=/run/slurmdbd.pid
MYSQL_PID=/run/mysqld/mysqld.pid
MYSQL_SOCK=/run/mysqld/mysqld.sock
MUNGE_PID=/run/munge/munged.pid
MARIADB_LOG=$LOG_DIR/mariadb.log
MUNGE_LOG=/var/log/munge/munged.log
LOCK_FILE=/run/slurm_local.start.lock

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH

log() { echo "$PROG: $*"; }

# die MESSAGE [LOGFILE...]: print message and the tail of the given logs, exit 1.
die() {
    local msg=$1; shift
    echo "$PROG: ERROR: $msg" >&2
    local f
    for f in "$@"; do
        if [[ -s $f ]]; then
            echo "$PROG: ---- last lines of $f ----" >&2
            tail -n 30 "$f" >&2
            echo "$PROG: ---- end of $f ----" >&2
        fi
    done
    exit 1
}

need_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (uid is $(id -u))"
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# pid_alive PIDFILE NAME: true iff PIDFILE names a live process whose comm is NAME.
pid_alive() {
    local pidfile=$1 name=$2 pid
    [[ -r $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid ]] || return 1
    proc_running "$pid" || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name"* ]]
}

# proc_running PID: the process exists and is not a zombie (a container's
# PID 1 may never reap the daemons we started).
proc_running() {
    local stat
    kill -0 "$1" 2>/dev/null || return 1
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]]
}

pid_of() { tr -dc '0-9' <"$1" 2>/dev/null; }

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.1 s.
wait_for() {
    local secs=$1 what=$2; shift 2
    local deadline=$(( $(date +%s) + secs ))
    while ! "$@" >/dev/null 2>&1; do
        if (( $(date +%s) >= deadline )); then
            return 1
        fi
        sleep 0.1
    done
    return 0
}

# wait_daemon SECONDS PIDFILE NAME COMMAND...: poll COMMAND until it succeeds;
# fail early (rc 2) if the daemon is gone after a 2 s grace period.
wait_daemon() {
    local secs=$1 pidfile=$2 name=$3; shift 3
    local start now_s
    start=$(date +%s)
    while ! "$@" >/dev/null 2>&1; do
        now_s=$(date +%s)
        if (( now_s - start >= 2 )) && ! pid_alive "$pidfile" "$name"; then
            return 2
        fi
        (( now_s - start >= secs )) && return 1
        sleep 0.1
    done
    return 0
}

# stop_pids SECONDS PIDFILE:NAME...: TERM those processes together, wait for
# all of them to exit, KILL the ones that outlive SECONDS.
stop_pids() {
    local secs=$1; shift
    local item pidfile name pid pids=() names=()
    for item in "$@"; do
        pidfile=${item%%:*}; name=${item#*:}
        if pid_alive "$pidfile" "$name"; then
            pid=$(pid_of "$pidfile")
            log "stopping $name (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid"); names+=("$name")
        fi
        rm -f "$pidfile"
    done
    local deadline=$(( $(date +%s) + secs )) i left
    while :; do
        left=0
        for i in "${!pids[@]}"; do
            proc_running "${pids[$i]}" && left=1
        done
        (( left )) || return 0
        (( $(date +%s) >= deadline )) && break
        sleep 0.1
    done
    for i in "${!pids[@]}"; do
        if proc_running "${pids[$i]}"; then
            log "${names[$i]} (pid ${pids[$i]}) did not exit after ${secs}s; sending KILL"
            kill -KILL "${pids[$i]}" 2>/dev/null || true
        fi
    done
    sleep 0.2
}

# stop_pid PIDFILE NAME [SECONDS]
stop_pid() { stop_pids "${3:-20}" "$1:$2"; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---------------------------------------------------------------- install
packages_missing() {
    local p missing=()
    for p in "${PACKAGES[@]}"; do
        if [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) != "install ok installed" ]]; then
            missing+=("$p")
        fi
    done
    echo "${missing[*]}"
}

do_install() {
    need_root
    local missing t0 added_policy=0
    missing=$(packages_missing)
    if [[ -z $missing ]]; then
        log "packages already installed"
        return 0
    fi
    command -v apt-get >/dev/null || die "apt-get not found; cannot install: $missing"
    t0=$(now)
    log "installing packages (missing: $missing)"
    # Keep package scripts from starting daemons with their default configs:
    # we start everything ourselves below.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        added_policy=1
    fi
    local rc=0 aptlog
    aptlog=$(mktemp)
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -q &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
    } >"$aptlog" 2>&1 || rc=$?
    (( added_policy )) && rm -f /usr/sbin/policy-rc.d
    if (( rc != 0 )); then
        echo "$PROG: ---- last lines of apt output ----" >&2
        tail -n 30 "$aptlog" >&2
        rm -f "$aptlog"
        die "apt-get failed (rc=$rc)"
    fi
    rm -f "$aptlog"
    missing=$(packages_missing)
    [[ -z $missing ]] || die "packages still missing after install: $missing"
    log "packages installed in $(elapsed "$t0") s"
}

# ---------------------------------------------------------------- config
slurm_conf_text() {
    cat <<EOF
# Written by scripts/slurm_local.sh -- single-node local cluster.
ClusterName=lab
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
MailProg=/bin/true
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
JobRequeue=1
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=5
MinJobAge=300
InactiveLimit=0
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
}

slurmdbd_conf_text() {
    cat <<EOF
# Written by scripts/slurm_local.sh -- single-node local cluster.
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$LOG_DIR/slurmdbd.log
PidFile=$DBD_PID
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DBPASS
StorageLoc=slurm_acct_db
EOF
}

# write_if_changed PATH MODE TEXT: returns 0 if the file changed.
write_if_changed() {
    local path=$1 mode=$2 text=$3
    if [[ -f $path ]] && [[ "$(cat "$path")" == "$text" ]]; then
        chmod "$mode" "$path"
        return 1
    fi
    local tmp
    tmp=$(mktemp "$path.XXXXXX")
    printf '%s\n' "$text" >"$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$path"
    return 0
}

# Writes both config files; sets CONFIG_CHANGED=1 if either changed.
write_configs() {
    mkdir -p "$CONF_DIR"
    CONFIG_CHANGED=0
    if write_if_changed "$SLURM_CONF" 644 "$(slurm_conf_text)"; then
        CONFIG_CHANGED=1; log "wrote $SLURM_CONF"
    fi
    if write_if_changed "$DBD_CONF" 600 "$(slurmdbd_conf_text)"; then
        CONFIG_CHANGED=1; log "wrote $DBD_CONF"
    fi
    chown root:root "$DBD_CONF"
}

make_dirs() {
    mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR" /run/munge /run/mysqld
    chown munge:munge /run/munge
    chmod 755 /run/munge
    chown mysql:mysql /run/mysqld
    mkdir -p /var/log/munge && chown munge:munge /var/log/munge && chmod 700 /var/log/munge
    touch "$MUNGE_LOG"
    chown munge:munge "$MUNGE_LOG"
    touch "$MARIADB_LOG"
    chown mysql:mysql "$MARIADB_LOG"
}

ensure_hostname_resolves() {
    if ! getent hosts "$HOST" >/dev/null 2>&1; then
        log "adding '127.0.0.1 $HOST' to /etc/hosts (hostname did not resolve)"
        echo "127.0.0.1 $HOST" >>/etc/hosts
    fi
}

# ---------------------------------------------------------------- daemons
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_ok; then
        return 0
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then
            mungekey --create --force >/dev/null 2>&1 || true
        fi
        if [[ ! -s /etc/munge/munge.key ]]; then
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        fi
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    log "starting munged"
    pid_alive "$MUNGE_PID" munged && stop_pid "$MUNGE_PID" munged 5
    runuser -u munge -- /usr/sbin/munged --force --log-file="$MUNGE_LOG" --pid-file="$MUNGE_PID" 9>&- \
        || die "munged failed to start" "$MUNGE_LOG"
    wait_for 10 munge munge_ok || die "munge credential check failed" "$MUNGE_LOG"
}

mysql_ok() { mariadb-admin --socket="$MYSQL_SOCK" ping >/dev/null 2>&1; }

start_mariadb() {
    if ! mysql_ok; then
        if [[ ! -d /var/lib/mysql/mysql ]]; then
            log "initialising MariaDB data directory"
            mkdir -p /var/lib/mysql
            chown mysql:mysql /var/lib/mysql
            mariadb-install-db --user=mysql --datadir=/var/lib/mysql >>"$MARIADB_LOG" 2>&1 \
                || die "mariadb-install-db failed" "$MARIADB_LOG"
        fi
        pid_alive "$MYSQL_PID" mariadbd && stop_pid "$MYSQL_PID" mariadbd 20
        log "starting mariadbd"
        setsid /usr/sbin/mariadbd --user=mysql --skip-networking \
            --socket="$MYSQL_SOCK" --pid-file="$MYSQL_PID" \
            --log-error="$MARIADB_LOG" </dev/null >>"$MARIADB_LOG" 2>&1 9>&- &
        disown || true
        wait_daemon "$TIMEOUT" "$MYSQL_PID" mariadbd mysql_ok \
            || die "mariadbd not answering ping (exited, or ${TIMEOUT}s timeout)" "$MARIADB_LOG"
    fi
    # Idempotent database / user creation.
    mariadb --socket="$MYSQL_SOCK" -u root >>"$MARIADB_LOG" 2>&1 <<EOF || die "creating the slurm database failed" "$MARIADB_LOG"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
}

start_slurmdbd() {
    if pid_alive "$DBD_PID" slurmdbd && port_open 6819; then
        return 0
    fi
    pid_alive "$DBD_PID" slurmdbd && stop_pid "$DBD_PID" slurmdbd 10
    log "starting slurmdbd"
    /usr/sbin/slurmdbd >>"$LOG_DIR/slurmdbd.log" 2>&1 9>&- || die "slurmdbd failed to start" "$LOG_DIR/slurmdbd.log"
    wait_daemon "$TIMEOUT" "$DBD_PID" slurmdbd port_open 6819 \
        || die "slurmdbd not listening on port 6819 (exited, or ${TIMEOUT}s timeout)" "$LOG_DIR/slurmdbd.log" "$MARIADB_LOG"
}

start_slurmctld() {
    if pid_alive "$CTLD_PID" slurmctld; then
        return 0
    fi
    log "starting slurmctld"
    /usr/sbin/slurmctld >>"$LOG_DIR/slurmctld.log" 2>&1 9>&- || die "slurmctld failed to start" "$LOG_DIR/slurmctld.log"
    wait_daemon "$TIMEOUT" "$CTLD_PID" slurmctld timeout 5 scontrol ping \
        || die "slurmctld not answering 'scontrol ping' (exited, or ${TIMEOUT}s timeout)" "$LOG_DIR/slurmctld.log"
}

start_slurmd() {
    if pid_alive "$SLURMD_PID" slurmd; then
        return 0
    fi
    log "starting slurmd"
    /usr/sbin/slurmd -N "$HOST" >>"$LOG_DIR/slurmd.log" 2>&1 9>&- || die "slurmd failed to start" "$LOG_DIR/slurmd.log"
    wait_for 10 slurmd pid_alive "$SLURMD_PID" slurmd || die "slurmd exited right after start" "$LOG_DIR/slurmd.log"
}

node_state() { sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n1; }

# A state is good if it is idle/mixed/allocated/completing, with no flag such
# as '*' (not responding), '~' (powered down), '#', '!', '%' or '@'.
state_good() {
    [[ $1 =~ ^(idle|mixed|allocated|completing)\+?$ ]]
}

wait_node_idle() {
    local deadline=$(( $(date +%s) + TIMEOUT )) st resumed=0
    while :; do
        st=$(node_state)
        if state_good "$st"; then
            log "node $HOST is $st"
            return 0
        fi
        case $st in
            *drain*|*invalid*|*down*|*fail*)
                if (( resumed < 5 )); then
                    log "node $HOST is '$st'; resuming it"
                    scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
                    resumed=$((resumed + 1))
                fi
                ;;
        esac
        if (( $(date +%s) >= deadline )); then
            local reason
            reason=$(sinfo -h -n "$HOST" -o '%E' 2>/dev/null)
            die "node $HOST not idle after ${TIMEOUT}s (state '${st:-unknown}', reason '${reason}')" \
                "$LOG_DIR/slurmd.log" "$LOG_DIR/slurmctld.log"
        fi
        sleep 0.2
    done
}

all_daemons_up() {
    munge_ok && mysql_ok &&
        pid_alive "$DBD_PID" slurmdbd &&
        pid_alive "$CTLD_PID" slurmctld &&
        pid_alive "$SLURMD_PID" slurmd
}

any_slurm_daemon_up() {
    pid_alive "$CTLD_PID" slurmctld || pid_alive "$SLURMD_PID" slurmd || pid_alive "$DBD_PID" slurmdbd
}

healthy() {
    all_daemons_up && state_good "$(node_state)"
}

# ---------------------------------------------------------------- commands
do_start() {
    need_root
    local t0
    t0=$(now)
    do_install
    make_dirs
    ensure_hostname_resolves
    write_configs
    if (( CONFIG_CHANGED )) && any_slurm_daemon_up; then
        log "configuration changed while Slurm was running; restarting it"
        do_stop
        make_dirs
    elif healthy; then
        log "already running; node $HOST is $(node_state)"
        return 0
    fi
    start_munge
    start_mariadb
    start_slurmdbd
    start_slurmctld
    start_slurmd
    wait_node_idle
    log "started in $(elapsed "$t0") s"
}

cancel_all_jobs() {
    pid_alive "$CTLD_PID" slurmctld || return 0
    local ids
    ids=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
    if [[ -n ${ids// /} ]]; then
        log "cancelling jobs: $ids"
        # shellcheck disable=SC2086
        scancel $ids >/dev/null 2>&1 || true
    fi
    local deadline=$(( $(date +%s) + TIMEOUT ))
    while [[ -n $(squeue -h -o %A 2>/dev/null) ]]; do
        if (( $(date +%s) >= deadline )); then
            log "warning: jobs still in squeue after ${TIMEOUT}s: $(squeue -h -o '%A %T' | tr '\n' ';')"
            break
        fi
        ids=$(squeue -h -t PD,R,S,CF,RQ,RF,RH,SE,SI,SO,ST -o %A 2>/dev/null | sort -u | tr '\n' ' ')
        # shellcheck disable=SC2086
        [[ -n ${ids// /} ]] && scancel $ids >/dev/null 2>&1
        sleep 0.3
    done
}

do_stop() {
    need_root
    local t0
    t0=$(now)
    cancel_all_jobs
    if pid_alive "$CTLD_PID" slurmctld || pid_alive "$SLURMD_PID" slurmd; then
        log "scontrol shutdown"
        scontrol shutdown >/dev/null 2>&1 || true
        local deadline=$(( $(date +%s) + 20 ))
        while pid_alive "$CTLD_PID" slurmctld || pid_alive "$SLURMD_PID" slurmd; do
            (( $(date +%s) >= deadline )) && break
            sleep 0.1
        done
    fi
    # Whatever is still up (e.g. slurmd while slurmctld was down): TERM by pid.
    stop_pids 10 "$SLURMD_PID:slurmd" "$CTLD_PID:slurmctld"
    stop_pid "$DBD_PID" slurmdbd 10
    stop_pids 30 "$MYSQL_PID:mariadbd" "$MUNGE_PID:munged"
    log "stopped in $(elapsed "$t0") s"
}

do_status() {
    local st=""
    if all_daemons_up; then
        st=$(node_state)
        if state_good "$st"; then
            log "up; node $HOST is $st"
            return 0
        fi
    elif pid_alive "$CTLD_PID" slurmctld; then
        st=$(node_state)
    fi
    local d
    for d in "munged:$MUNGE_PID" "mariadbd:$MYSQL_PID" "slurmdbd:$DBD_PID" "slurmctld:$CTLD_PID" "slurmd:$SLURMD_PID"; do
        if pid_alive "${d#*:}" "${d%%:*}"; then
            log "  ${d%%:*}: running (pid $(pid_of "${d#*:}"))"
        else
            log "  ${d%%:*}: not running"
        fi
    done
    log "down or unhealthy; node state '${st:-unknown}'"
    return 1
}

# Serialise concurrent install/start/stop calls (e.g. parallel test workers).
take_lock() {
    need_root
    # Daemons are started with fd 9 closed so that they do not hold the lock.
    exec 9>"$LOCK_FILE"
    if command -v flock >/dev/null && ! flock -w 600 9; then
        die "could not take $LOCK_FILE within 600 s"
    fi
}

case ${1:-} in
    install) take_lock; do_install ;;
    start) take_lock; do_start ;;
    stop) take_lock; do_stop ;;
    status) do_status ;;
    restart) take_lock; do_stop && do_start ;;
    *)
        echo "usage: $0 install|start|stop|status|restart" >&2
        exit 2
        ;;
esac
exit $?
