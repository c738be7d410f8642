# shellcheck shell=bash
# Shared helpers for scripts/: logging, a cleanup registry run by a trap, free
# loopback ports, the hotbackup agent, bindfs, and throwaway MariaDB servers that
# live in temp directories on their own sockets and ports.
#
# Source it from a script that runs under `set -euo pipefail`, then call
# `hb_traps` once so that everything started here is undone on exit, error or
# signal. Nothing here ever touches the system's MariaDB, /var/lib/mysql, or
# kills a process by name: every process is stopped by the pid we started.

HB_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HB_BIN=${HB_BIN:-$HB_ROOT/target/release/hotbackup}
# Seconds to wait for a server to answer after start (crash recovery included),
# and for it to exit after a shutdown request.
HB_MARIADB_START_TIMEOUT=${HB_MARIADB_START_TIMEOUT:-180}
HB_MARIADB_STOP_TIMEOUT=${HB_MARIADB_STOP_TIMEOUT:-300}
HB_MOUNT_TIMEOUT=${HB_MOUNT_TIMEOUT:-30}

# rustup installs cargo in ~/.cargo/bin, which a non-login shell may lack.
if ! command -v cargo >/dev/null 2>&1 && [[ -x ${HOME:-/root}/.cargo/bin/cargo ]]; then
	PATH=${HOME:-/root}/.cargo/bin:$PATH
fi

# --- logging ---------------------------------------------------------------

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
warn() { log "WARNING: $*"; }
die() {
	log "ERROR: $*"
	exit 1
}
# Prints a section header on stdout.
section() { printf '\n==> %s\n' "$*"; }

# --- cleanup registry --------------------------------------------------------

_HB_CLEANUP=()
declare -gA _HB_AGENT_PID=() _HB_AGENT_LOG=() _HB_FUSE_PID=() _HB_FUSE_LOG=() _HB_MARIADB_PID=()

# cleanup_push CMD [ARGS...]: run CMD ARGS at exit, last pushed first.
cleanup_push() {
	local cmd
	printf -v cmd '%q ' "$@"
	_HB_CLEANUP+=("$cmd")
}

# Runs every registered cleanup step (newest first) once; never fails.
cleanup_run() {
	set +e
	local i
	for ((i = ${#_HB_CLEANUP[@]} - 1; i >= 0; i--)); do
		eval "${_HB_CLEANUP[i]}" || warn "cleanup step failed: ${_HB_CLEANUP[i]}"
	done
	_HB_CLEANUP=()
}

_hb_on_exit() {
	local rc=$?
	trap - EXIT INT TERM HUP
	cleanup_run
	exit "$rc"
}

# Installs the traps: cleanup on any exit; signals turn into exits.
hb_traps() {
	trap _hb_on_exit EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
	trap 'exit 129' HUP
}

# --- small utilities -------------------------------------------------------

need_root() {
	[[ $(id -u) -eq 0 ]] || die "run this as root (mariadbd --user=root, FUSE mounts and drop_caches need it)"
}

# need_cmd CMD...: fail with a hint unless every command exists.
need_cmd() {
	local c
	for c in "$@"; do
		command -v "$c" >/dev/null 2>&1 || die "'$c' not found: run scripts/setup first"
	done
}

# hb_tmpdir VAR PREFIX: makes a temp dir, removed at exit, and stores its path
# in VAR. (Not a command substitution: the cleanup must register in this shell.)
hb_tmpdir() {
	local _d
	_d=$(mktemp -d "${TMPDIR:-/tmp}/$2.XXXXXX")
	cleanup_push _hb_rm_tree "$_d"
	printf -v "$1" '%s' "$_d"
}

# True if some filesystem is mounted at or below DIR.
mounted_below() {
	local dir
	dir=$(realpath -m "$1")
	awk -v d="$dir" '$5 == d || index($5, d "/") == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo
}

_hb_rm_tree() {
	local d=$1
	[[ -e $d ]] || return 0
	if mounted_below "$d"; then
		warn "a filesystem is still mounted below $d; lazily unmounting it"
		awk -v d="$d" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo |
			sort -r | while read -r m; do fusermount3 -u -z "$m" 2>/dev/null || umount -l "$m"; done
	fi
	if mounted_below "$d"; then
		warn "not removing $d: still mounted"
		return 1
	fi
	rm -rf --one-file-system "$d"
}

# free_port: prints a TCP port on 127.0.0.1 that nothing listens on right now.
free_port() {
	python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# wait_pid_exit PID SECONDS: true once PID is gone, false on timeout.
wait_pid_exit() {
	local pid=$1 deadline=$((SECONDS + $2))
	while kill -0 "$pid" 2>/dev/null; do
		((SECONDS < deadline)) || return 1
		sleep 0.2
	done
}

# drop_caches: flush dirty data and drop the page cache, if permitted.
drop_caches() {
	sync
	if ! { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null; then
		warn "cannot drop the page cache here (not permitted); results may be cache-warm"
		return 0
	fi
}

# wait_mounted PID MNT LOG: waits until MNT is a mountpoint; fails if PID exits first.
_hb_wait_mounted() {
	local pid=$1 mnt=$2 logf=$3 deadline=$((SECONDS + HB_MOUNT_TIMEOUT))
	until mountpoint -q "$mnt"; do
		if ! kill -0 "$pid" 2>/dev/null; then
			log "process $pid exited before $mnt was mounted; its log:"
			sed 's/^/    /' "$logf" >&2 || true
			return 1
		fi
		if ((SECONDS >= deadline)); then
			log "$mnt not mounted after ${HB_MOUNT_TIMEOUT}s; log:"
			sed 's/^/    /' "$logf" >&2 || true
			return 1
		fi
		sleep 0.1
	done
}

# --- the hotbackup agent ---------------------------------------------------

# start_agent BACKING MNT [AGENT ARGS...]: starts `hotbackup agent` in the
# background (log: MNT's parent dir, agent-NAME.log), waits until it has mounted,
# and registers its stop. AGENT_PID is set to its pid.
start_agent() {
	local backing mnt logf pid
	backing=$(realpath "$1")
	mnt=$(realpath "$2")
	shift 2
	[[ -x $HB_BIN ]] || die "$HB_BIN not found: build it with 'cargo build --release -p hotbackup'"
	logf=${HB_AGENT_LOG:-$(dirname "$mnt")/agent-$(basename "$mnt").log}
	"$HB_BIN" agent --backing "$backing" --mountpoint "$mnt" "$@" </dev/null >>"$logf" 2>&1 &
	pid=$!
	_HB_AGENT_PID[$mnt]=$pid
	_HB_AGENT_LOG[$mnt]=$logf
	cleanup_push stop_agent "$mnt"
	# shellcheck disable=SC2034 # for the caller
	AGENT_PID=$pid
	if ! _hb_wait_mounted "$pid" "$mnt" "$logf"; then
		stop_agent "$mnt" || true
		die "hotbackup agent did not mount $mnt"
	fi
	log "hotbackup agent (pid $pid) serves $backing at $mnt"
}

# agent_log MNT: prints the log file of the agent serving MNT.
agent_log() { printf '%s\n' "${_HB_AGENT_LOG[$(realpath -m "$1")]:-}"; }

# stop_agent MNT: SIGTERM to the agent's own pid and wait; if it refuses (files
# still open) or hangs, unmount with fusermount3 (lazily as the last resort).
# Returns non-zero unless the agent exited 0 on its own. No-op if not running.
stop_agent() {
	local mnt pid rc=0
	mnt=$(realpath -m "$1")
	pid=${_HB_AGENT_PID[$mnt]:-}
	[[ -n $pid ]] || return 0
	unset "_HB_AGENT_PID[$mnt]"
	if kill -0 "$pid" 2>/dev/null; then
		kill -TERM "$pid" 2>/dev/null || true
		if ! wait_pid_exit "$pid" 20; then
			warn "agent $pid still running 20s after SIGTERM (files open on $mnt?); unmounting"
			tail -n 5 "${_HB_AGENT_LOG[$mnt]}" | sed 's/^/    /' >&2 || true
			fusermount3 -u "$mnt" 2>/dev/null || fusermount3 -u -z "$mnt" 2>/dev/null || true
			if ! wait_pid_exit "$pid" 10; then
				warn "agent $pid did not exit; SIGKILL"
				kill -KILL "$pid" 2>/dev/null || true
			fi
			rc=1
		fi
	fi
	wait "$pid" 2>/dev/null || {
		rc=$?
		warn "agent $pid exited with status $rc"
	}
	if mountpoint -q "$mnt" 2>/dev/null; then
		warn "$mnt still mounted after the agent exited; fusermount3 -u -z"
		fusermount3 -u -z "$mnt" || true
		rc=1
	fi
	return "$rc"
}

# --- bindfs (a C/libfuse passthrough, for comparison) ------------------------

# start_bindfs BACKING MNT [BINDFS ARGS...]: bindfs in the foreground (so we
# keep its pid) in the background; waits until mounted; registers its unmount.
start_bindfs() {
	local backing mnt logf pid
	backing=$(realpath "$1")
	mnt=$(realpath "$2")
	shift 2
	need_cmd bindfs
	logf=$(dirname "$mnt")/bindfs-$(basename "$mnt").log
	bindfs -f "$@" "$backing" "$mnt" </dev/null >>"$logf" 2>&1 &
	pid=$!
	_HB_FUSE_PID[$mnt]=$pid
	_HB_FUSE_LOG[$mnt]=$logf
	cleanup_push stop_bindfs "$mnt"
	_hb_wait_mounted "$pid" "$mnt" "$logf" || {
		stop_bindfs "$mnt" || true
		die "bindfs did not mount $mnt"
	}
	log "bindfs (pid $pid) serves $backing at $mnt"
}

# stop_bindfs MNT: fusermount3 -u, then wait for the daemon's own pid.
stop_bindfs() {
	local mnt pid
	mnt=$(realpath -m "$1")
	pid=${_HB_FUSE_PID[$mnt]:-}
	[[ -n $pid ]] || return 0
	unset "_HB_FUSE_PID[$mnt]"
	if mountpoint -q "$mnt" 2>/dev/null; then
		fusermount3 -u "$mnt" || fusermount3 -u -z "$mnt" || true
	fi
	if ! wait_pid_exit "$pid" 20; then
		warn "bindfs $pid did not exit after unmount; SIGTERM"
		kill -TERM "$pid" 2>/dev/null || true
		wait_pid_exit "$pid" 10 || kill -KILL "$pid" 2>/dev/null || true
	fi
	wait "$pid" 2>/dev/null || true
}

# --- throwaway MariaDB servers -----------------------------------------------

# The client, as root over the server's own socket, without any option files.
# mariadb_cli SOCKET [CLIENT ARGS...]
mariadb_cli() {
	local sock=$1
	shift
	mariadb --no-defaults --user=root --socket="$sock" "$@"
}

# sql SOCKET STATEMENTS: runs statements; prints tab-separated rows, no headers.
sql() { mariadb_cli "$1" --batch --skip-column-names -e "$2"; }

# mariadb_init DATADIR [SERVER OPTS...]: creates the system tables in DATADIR
# (root@localhost without password). Quiet; prints the log on failure.
mariadb_init() {
	local datadir=$1 logf
	shift
	mkdir -p "$datadir"
	logf=$(dirname "$(realpath "$datadir")")/install-db-$(basename "$datadir").log
	if ! mariadb-install-db --no-defaults --datadir="$datadir" --user=root \
		--auth-root-authentication-method=normal --skip-test-db --skip-name-resolve \
		"$@" >"$logf" 2>&1; then
		sed 's/^/    /' "$logf" >&2
		die "mariadb-install-db failed for $datadir"
	fi
}

# File names that belong to the server on SOCKET: its pid file and error log
# sit beside the socket (not in the datadir).
mariadb_pidfile() { printf '%s.pid\n' "${1%.sock}"; }
mariadb_errlog() { printf '%s.err\n' "${1%.sock}"; }

# mariadb_start DATADIR SOCKET PORT [SERVER OPTS...]: starts mariadbd in the
# background as root with only the given options, waits until it answers ping,
# and registers its shutdown. MARIADB_PID is set to its pid.
mariadb_start() {
	local datadir sock=$2 port=$3 pid errlog deadline
	datadir=$(realpath "$1")
	shift 3
	errlog=$(mariadb_errlog "$sock")
	mariadbd --no-defaults --datadir="$datadir" --socket="$sock" --port="$port" \
		--bind-address=127.0.0.1 --pid-file="$(mariadb_pidfile "$sock")" \
		--log-error="$errlog" --user=root "$@" </dev/null >>"${sock%.sock}.out" 2>&1 &
	pid=$!
	_HB_MARIADB_PID[$sock]=$pid
	cleanup_push mariadb_stop "$sock"
	# shellcheck disable=SC2034 # for the caller
	MARIADB_PID=$pid
	deadline=$((SECONDS + HB_MARIADB_START_TIMEOUT))
	until mariadb-admin --no-defaults --user=root --socket="$sock" --connect-timeout=2 ping >/dev/null 2>&1; do
		if ! kill -0 "$pid" 2>/dev/null; then
			unset "_HB_MARIADB_PID[$sock]"
			wait "$pid" 2>/dev/null || true
			log "mariadbd exited during start-up; end of $errlog:"
			tail -n 30 "$errlog" 2>/dev/null | sed 's/^/    /' >&2 || true
			die "mariadbd failed to start on $datadir"
		fi
		if ((SECONDS >= deadline)); then
			log "mariadbd not answering after ${HB_MARIADB_START_TIMEOUT}s; end of $errlog:"
			tail -n 30 "$errlog" 2>/dev/null | sed 's/^/    /' >&2 || true
			die "mariadbd failed to start on $datadir"
		fi
		sleep 0.2
	done
	log "mariadbd (pid $pid) up on $datadir, socket $sock, port $port"
}

# mariadb_stop SOCKET: clean shutdown over the socket, then wait for the pid.
# Escalates to SIGTERM and finally SIGKILL (by our own pid) on timeouts.
# Returns non-zero if the server did not exit cleanly. No-op if not running.
mariadb_stop() {
	local sock=$1 pid rc=0
	pid=${_HB_MARIADB_PID[$sock]:-}
	[[ -n $pid ]] || return 0
	unset "_HB_MARIADB_PID[$sock]"
	if kill -0 "$pid" 2>/dev/null; then
		timeout 60 mariadb-admin --no-defaults --user=root --socket="$sock" shutdown >/dev/null 2>&1 ||
			kill -TERM "$pid" 2>/dev/null || true
		if ! wait_pid_exit "$pid" "$HB_MARIADB_STOP_TIMEOUT"; then
			warn "mariadbd $pid still running ${HB_MARIADB_STOP_TIMEOUT}s after shutdown; SIGTERM"
			kill -TERM "$pid" 2>/dev/null || true
			if ! wait_pid_exit "$pid" 60; then
				warn "mariadbd $pid ignores SIGTERM; SIGKILL"
				kill -KILL "$pid" 2>/dev/null || true
			fi
			rc=1
		fi
	fi
	wait "$pid" 2>/dev/null || {
		rc=$?
		warn "mariadbd $pid exited with status $rc; see $(mariadb_errlog "$sock")"
	}
	return "$rc"
}

# mariadb_kill SOCKET: SIGKILL the server (a crash, for recovery tests).
mariadb_kill() {
	local sock=$1 pid
	pid=${_HB_MARIADB_PID[$sock]:-}
	[[ -n $pid ]] || return 0
	unset "_HB_MARIADB_PID[$sock]"
	kill -KILL "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
}

# mariadb_errors SOCKET: prints the [ERROR] and [Warning] lines of its error log.
mariadb_errors() {
	grep -E '\[(ERROR|Warning)\]' "$(mariadb_errlog "$1")" 2>/dev/null || true
}
