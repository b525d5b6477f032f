#!/usr/bin/env bash
# Makes PostgreSQL (127.0.0.1:5432, trust auth) and Redis (127.0.0.1:6379) reachable for the
# test suite: starts them when stopped, installs the Debian packages when missing.
set -euo pipefail

PG_HOST=127.0.0.1
PG_PORT=5432
REDIS_PORT=6379

log() { printf 'services: %s\n' "$*"; }

apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then
    apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

pg_ready() {
  if command -v pg_isready >/dev/null 2>&1; then
    pg_isready -q -h "$PG_HOST" -p "$PG_PORT"
  else
    (exec 3<>"/dev/tcp/$PG_HOST/$PG_PORT") 2>/dev/null
  fi
}

redis_ready() {
  if command -v redis-cli >/dev/null 2>&1; then
    [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = "PONG" ]
  else
    exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT" 2>/dev/null || return 1
    printf 'PING\r\n' >&3
    read -r -t 2 reply <&3 || return 1
    exec 3>&-
    [[ "$reply" == +PONG* ]]
  fi
}

wait_for() {
  local name=$1 check=$2
  for _ in $(seq 1 60); do
    if $check; then return 0; fi
    sleep 0.5
  done
  log "$name did not become ready within 30 s" >&2
  exit 1
}

ensure_postgres() {
  if pg_ready; then
    log "postgresql already reachable on $PG_HOST:$PG_PORT"
    return
  fi
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    log "installing postgresql"
    apt_install postgresql
  fi
  local version conf_dir
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  conf_dir=/etc/postgresql/$version/main
  # Tests connect as postgres over TCP without a password.
  sed -i -E 's/^(local|host)(\s+\S+\s+\S+.*\s)(peer|md5|scram-sha-256)\s*$/\1\2trust/' "$conf_dir/pg_hba.conf"
  grep -q "^listen_addresses" "$conf_dir/postgresql.conf" \
    || echo "listen_addresses = '127.0.0.1'" >> "$conf_dir/postgresql.conf"
  log "starting postgresql $version"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || pg_ctlcluster "$version" main start
  wait_for postgresql pg_ready
  log "postgresql ready"
}

ensure_redis() {
  if redis_ready; then
    log "redis already reachable on 127.0.0.1:$REDIS_PORT"
    return
  fi
  if ! command -v redis-server >/dev/null 2>&1; then
    log "installing redis-server"
    apt_install redis-server
  fi
  mkdir -p /var/lib/redis /var/log/redis
  log "starting redis"
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for redis redis_ready
  log "redis ready"
}

ensure_postgres
ensure_redis
