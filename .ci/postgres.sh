#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tuning tests, on 127.0.0.1 only (Debian's postgresql package).
#   bash .ci/postgres.sh start DIR   installs postgresql if missing (root), starts a server whose files live in
#                                    DIR, creates a database and prints its SQLAlchemy URL (psycopg2 driver)
#   bash .ci/postgres.sh stop DIR    stops it (DIR may then be removed)
# PGTEST_PORT picks the port (default 54329).
set -euo pipefail
cmd=${1:?usage: postgres.sh start|stop DIR}
dir=${2:?usage: postgres.sh start|stop DIR}
port=${PGTEST_PORT:-54329}

find_bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
as_pg() {  # the server refuses to run as root: run its tools as the postgres user then
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "$cmd" in
start)
    bindir=$(find_bindir)
    if [ -z "$bindir" ]; then
        if [ "$(id -u)" != 0 ]; then
            echo "postgres.sh: PostgreSQL is not installed and installing it needs root (apt-get install postgresql)" >&2
            exit 1
        fi
        echo "postgres.sh: installing Debian's postgresql package" >&2
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
        bindir=$(find_bindir)
    fi
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$dir"; fi
    password=$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')
    printf '%s\n' "$password" > "$dir/pwfile"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$dir/pwfile"; fi
    as_pg "$bindir/initdb" -D "$dir/data" -U nas_grouping --pwfile="$dir/pwfile" -A scram-sha-256 >"$dir/initdb.log"
    rm -f "$dir/pwfile"
    as_pg "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=50" start >&2
    as_pg env PGPASSWORD="$password" "$bindir/createdb" -h 127.0.0.1 -p "$port" \
        -U nas_grouping nas_grouping_test
    echo "postgresql+psycopg2://nas_grouping:$password@127.0.0.1:$port/nas_grouping_test"
    ;;
stop)
    bindir=$(find_bindir)
    if [ -n "$bindir" ] && [ -f "$dir/data/postmaster.pid" ]; then
        as_pg "$bindir/pg_ctl" -D "$dir/data" -m fast -w stop >&2
    fi
    ;;
*)
    echo "usage: postgres.sh start|stop DIR" >&2
    exit 2
    ;;
esac
