#!/usr/bin/env bash
# Makes PostgreSQL (127.0.0.1:5432, trust auth, role `postgres` may create databases) and Redis
# (127.0.0.1:6379) reachable for the test suite and the benchmarks.
#
# Idempotent: a service that already answers is left running (at most pg_hba.conf gets its trust
# lines and a reload); a stopped one is started; a missing one is installed from the Debian
# packages. No systemd needed. Prints one line per service saying what it did.
set -euo pipefail

PG_HOST=127.0.0.1
PG_PORT=5432
REDIS_HOST=127.0.0.1
REDIS_PORT=6379
WAIT_SECONDS=30
HBA_MARK="# trust for local test connections (scripts/ensure-services.sh)"

die() {
  printf 'services: error: %s\n' "$*" >&2
  exit 1
}

# Run as root: directly when we are root, through passwordless sudo otherwise.
as_root() {
  if [ "$(id -u)" = 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo -n "$@"
  else
    die "need root (or passwordless sudo) for: $*"
  fi
}

apt_updated=0
apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "$* not installed and apt-get is not available; install it by hand"
  if [ "$apt_updated" = 0 ]; then
    as_root apt-get update -qq || die "apt-get update failed"
    apt_updated=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null \
    || die "apt-get install $* failed"
}

# Polls `check` until it succeeds; gives up after WAIT_SECONDS with a clear error.
wait_for() {
  local name=$1 check=$2 hint=${3:-} deadline=$((SECONDS + WAIT_SECONDS))
  until $check; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      die "$name did not become ready within ${WAIT_SECONDS} s${hint:+ ($hint)}"
    fi
    sleep 0.5
  done
}

tcp_open() { # host port
  timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

join() { # joins the arguments with ", "
  local IFS=$'\x1f' s
  s="$*"
  printf '%s' "${s//$'\x1f'/, }"
}

# ---------------------------------------------------------------------------------------------
# PostgreSQL

pg_ready() {
  if command -v pg_isready >/dev/null 2>&1; then
    timeout 5 pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -t 3
  else
    tcp_open "$PG_HOST" "$PG_PORT"
  fi
}

# "version name status" of the local cluster configured for PG_PORT, nothing when there is none.
pg_cluster() {
  command -v pg_lsclusters >/dev/null 2>&1 || return 0
  { pg_lsclusters -h 2>/dev/null || true; } | awk -v port="$PG_PORT" '$3 == port { print $1, $2, $4; exit }'
}

pg_psql() {
  timeout 15 psql -X -q -w -v ON_ERROR_STOP=1 -tA \
    -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres "$@"
}

# Makes pg_hba.conf trust local and host connections: explicit trust lines for 127.0.0.1 and ::1
# first (first match wins), peer/ident/md5/scram/password methods switched to trust.
# Returns 0 when the file changed, 1 when it already was right.
pg_trust_hba() {
  local hba=$1 body add=()
  body=$(sed -E 's/^([[:space:]]*(local|host|hostssl|hostnossl)[[:space:]].*[[:space:]])(peer|ident|md5|scram-sha-256|password)([[:space:]].*)?$/\1trust/' "$hba") \
    || die "cannot read $hba"
  grep -Eq '^[[:space:]]*host[[:space:]]+all[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust' <<<"$body" \
    || add+=("host    all    all    127.0.0.1/32    trust")
  grep -Eq '^[[:space:]]*host[[:space:]]+all[[:space:]]+all[[:space:]]+::1/128[[:space:]]+trust' <<<"$body" \
    || add+=("host    all    all    ::1/128         trust")
  if [ "${#add[@]}" -gt 0 ]; then
    body=$(printf '%s\n' "$HBA_MARK" "${add[@]}" "$body")
  fi
  if [ "$body" = "$(cat "$hba")" ]; then
    return 1
  fi
  as_root cp -p "$hba" "$hba.bak" || die "cannot back up $hba"
  printf '%s\n' "$body" | as_root tee "$hba" >/dev/null || die "cannot write $hba" # keeps owner and mode
  return 0
}

# Makes sure the (stopped or unreachable) cluster listens on 127.0.0.1. Returns 0 when it changed
# the configuration, 1 when it already was right.
pg_listen_localhost() {
  local conf_dir=$1 current files
  files=("$conf_dir/postgresql.conf")
  if [ -d "$conf_dir/conf.d" ] && grep -Eq "^[[:space:]]*include_dir[[:space:]]*=?[[:space:]]*'conf\.d'" "$conf_dir/postgresql.conf"; then
    shopt -s nullglob
    files+=("$conf_dir"/conf.d/*.conf)
    shopt -u nullglob
  fi
  current=$(grep -hE '^[[:space:]]*listen_addresses[[:space:]]*=' "${files[@]}" 2>/dev/null | tail -n 1) || true
  if [ -z "$current" ]; then
    return 1 # PostgreSQL's default is 'localhost'
  fi
  current=$(sed -E "s/^[^=]*=[[:space:]]*'([^']*)'.*/\1/" <<<"$current")
  if [[ ",${current// /}," =~ ,(\*|0\.0\.0\.0|127\.0\.0\.1|localhost), ]]; then
    return 1
  fi
  local value="${current:+$current,}127.0.0.1"
  if [ "${#files[@]}" -gt 1 ]; then
    echo "listen_addresses = '$value'" | as_root tee "$conf_dir/conf.d/99-waymark-listen.conf" >/dev/null \
      || die "cannot write $conf_dir/conf.d/99-waymark-listen.conf"
  else
    echo "listen_addresses = '$value'" | as_root tee -a "$conf_dir/postgresql.conf" >/dev/null \
      || die "cannot write $conf_dir/postgresql.conf"
  fi
  return 0
}

ensure_postgres() {
  local did=() reachable=0 cluster version name status conf_dir log

  pg_ready && reachable=1
  cluster=$(pg_cluster)

  if [ -z "$cluster" ] && [ "$reachable" = 0 ]; then
    if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
      apt_install postgresql
      did+=("installed")
    fi
    cluster=$(pg_cluster)
    if [ -z "$cluster" ]; then
      if command -v pg_lsclusters >/dev/null 2>&1 && [ -n "$(pg_lsclusters -h 2>/dev/null)" ]; then
        die "no PostgreSQL cluster is configured for port $PG_PORT (pg_lsclusters: $(pg_lsclusters -h | tr '\n' ';'))"
      fi
      version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
      as_root pg_createcluster --port "$PG_PORT" "$version" main >/dev/null \
        || die "pg_createcluster $version main failed"
      did+=("created cluster $version/main")
      cluster=$(pg_cluster)
    fi
    [ -n "$cluster" ] || die "no PostgreSQL cluster for port $PG_PORT after installing"
  fi

  if [ -n "$cluster" ]; then
    read -r version name status <<<"$cluster"
    conf_dir=/etc/postgresql/$version/$name
    log=/var/log/postgresql/postgresql-$version-$name.log
    local hba_changed=0 listen_changed=0
    if [ -f "$conf_dir/pg_hba.conf" ] && pg_trust_hba "$conf_dir/pg_hba.conf"; then
      hba_changed=1
    fi
    if [ "$reachable" = 0 ] && pg_listen_localhost "$conf_dir"; then
      listen_changed=1
      did+=("set listen_addresses to include 127.0.0.1")
    fi

    if [ "$hba_changed" = 1 ]; then
      did+=("set pg_hba.conf to trust for local, 127.0.0.1 and ::1 (previous one in pg_hba.conf.bak)")
    fi

    if [ "$status" != online ]; then
      as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$name" start \
        || die "pg_ctlcluster $version $name start failed; see $log"
      did+=("started cluster $version/$name")
    elif [ "$reachable" = 0 ] && [ "$listen_changed" = 1 ]; then
      # Running but not reachable on $PG_HOST, so a restart cannot hurt anybody.
      as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$name" restart \
        || die "pg_ctlcluster $version $name restart failed; see $log"
      did+=("restarted cluster $version/$name")
    elif [ "$hba_changed" = 1 ]; then
      # A reload (SIGHUP) rereads pg_hba.conf without dropping any connection.
      as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$name" reload \
        || die "pg_ctlcluster $version $name reload failed; see $log"
      did+=("reloaded cluster $version/$name")
    fi
  fi

  if [ "$reachable" = 1 ]; then
    did=("already running on $PG_HOST:$PG_PORT" "${did[@]}")
  else
    wait_for "PostgreSQL on $PG_HOST:$PG_PORT" pg_ready "${log:+see $log}"
    did+=("ready on $PG_HOST:$PG_PORT")
  fi

  # The tests connect as postgres without a password and create their own databases.
  if command -v psql >/dev/null 2>&1; then
    local out
    out=$(pg_psql -c "SELECT rolsuper OR rolcreatedb FROM pg_roles WHERE rolname = current_user" 2>&1) \
      || die "cannot connect as postgres@$PG_HOST:$PG_PORT without a password (trust auth): $out"
    if [ "$out" != t ]; then
      out=$(pg_psql -c "ALTER ROLE postgres CREATEDB" 2>&1) \
        || die "role postgres may not create databases and granting CREATEDB failed: $out"
      did+=("granted CREATEDB to role postgres")
    else
      did+=("role postgres can create databases (trust)")
    fi
  else
    did+=("psql not installed, role not checked")
  fi

  printf 'postgresql: %s\n' "$(join "${did[@]}")"
}

# ---------------------------------------------------------------------------------------------
# Redis

redis_ready() {
  local reply
  if command -v redis-cli >/dev/null 2>&1; then
    reply=$(timeout 5 redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null) || return 1
  else
    reply=$(timeout 5 bash -c '
      exec 3<>"/dev/tcp/$1/$2" || exit 1
      printf "PING\r\n" >&3
      IFS= read -r -t 3 line <&3 || exit 1
      printf "%s" "$line"' _ "$REDIS_HOST" "$REDIS_PORT" 2>/dev/null) || return 1
  fi
  [[ "$reply" == PONG* || "$reply" == +PONG* ]]
}

ensure_redis() {
  local did=()
  if redis_ready; then
    printf 'redis: already running on %s:%s (PING answered)\n' "$REDIS_HOST" "$REDIS_PORT"
    # The suite also starts, stops and restarts Redis servers of its own.
    if ! command -v redis-server >/dev/null 2>&1; then
      apt_install redis-server
      printf 'redis: installed redis-server for the suite'"'"'s own servers\n'
    fi
    return
  fi
  if ! command -v redis-server >/dev/null 2>&1; then
    apt_install redis-server
    did+=("installed")
    if redis_ready; then # the package's init script may have started it
      did+=("started by the package, ready on $REDIS_HOST:$REDIS_PORT")
      printf 'redis: %s\n' "$(join "${did[@]}")"
      return
    fi
  fi
  if tcp_open "$REDIS_HOST" "$REDIS_PORT"; then
    die "something listens on $REDIS_HOST:$REDIS_PORT but does not answer PING with PONG (password set? not Redis?)"
  fi
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log >/dev/null \
    || die "redis-server failed to start; see /var/log/redis/ci.log"
  did+=("started redis-server")
  wait_for "Redis on $REDIS_HOST:$REDIS_PORT" redis_ready "see /var/log/redis/ci.log"
  did+=("ready on $REDIS_HOST:$REDIS_PORT")
  printf 'redis: %s\n' "$(join "${did[@]}")"
}

ensure_postgres
ensure_redis
