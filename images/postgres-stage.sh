#!/bin/sh
# Lays out a Docker build context for images/postgres.Dockerfile from this
# host's PostgreSQL (Debian's postgresql-NN): a stand-in for the official
# `postgres` image where no registry can be reached (tests/tests/compose_cluster.rs
# uses it for compose/cluster.yml).
#
#   images/postgres-stage.sh CONTEXT_DIR USER PASSWORD DB [BINDIR]
#
# CONTEXT_DIR/rootfs/   the postgres binary, every shared library `ldd` lists
#                       for it and for its modules, /usr/share/postgresql/NN,
#                       UTC zoneinfo, /etc/passwd with postgres = 999:999,
#                       /usr/local/bin/postgres -> the binary
# CONTEXT_DIR/pgdata/data/  a cluster initialised here (initdb) with superuser USER
#                       (password PASSWORD, scram-sha-256 from any address)
#                       and database DB: what the official image's entrypoint
#                       does at first start from POSTGRES_USER, POSTGRES_PASSWORD
#                       and POSTGRES_DB, done at build time (the image has no shell)
# CONTEXT_DIR/run/      the unix socket directory
#
# BINDIR defaults to the newest /usr/lib/postgresql/*/bin. As root, initdb
# runs as the `postgres` user through setpriv (PostgreSQL refuses root).
# The Dockerfile gives pgdata/ and run/ to uid 999 (the official image's).
set -eu
if [ $# -lt 4 ] || [ $# -gt 5 ]; then
    echo "usage: $0 CONTEXT_DIR USER PASSWORD DB [BINDIR]" >&2
    exit 2
fi
ctx=$1 user=$2 password=$3 db=$4
bindir=${5:-$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)}
if [ -z "$bindir" ] || [ ! -x "$bindir/postgres" ] || [ ! -x "$bindir/initdb" ]; then
    echo "$0: no PostgreSQL server binaries (apt-get install postgresql)" >&2
    exit 1
fi
version=$(basename "$(dirname "$bindir")")
libdir=$(dirname "$bindir")/lib
sharedir=/usr/share/postgresql/$version
root=$ctx/rootfs

mkdir -p "$root$bindir" "$root/usr/share/postgresql" "$root/usr/local/bin" \
    "$root/etc" "$root/usr/share/zoneinfo/Etc" "$ctx/run"
cp "$bindir/postgres" "$root$bindir/"
ln -sf "$bindir/postgres" "$root/usr/local/bin/postgres"
cp -a "$libdir" "$root$(dirname "$bindir")/"
cp -a "$sharedir" "$root/usr/share/postgresql/"
cp /usr/share/zoneinfo/UTC "$root/usr/share/zoneinfo/UTC"
cp /usr/share/zoneinfo/UTC "$root/usr/share/zoneinfo/Etc/UTC"
printf 'root:x:0:0::/:/nonexistent\npostgres:x:999:999::/var/lib/postgresql:/nonexistent\n' >"$root/etc/passwd"
printf 'root:x:0:\npostgres:x:999:\n' >"$root/etc/group"

# The shared libraries of the server and of its loadable modules, and the
# dynamic loader, at the paths the loader looks them up by.
# (Not llvmjit: JIT is off here, and libLLVM alone is over 100 MB.)
rm -f "$root$libdir"/llvmjit*
rm -rf "$root$libdir/bitcode"
for f in "$bindir/postgres" "$root$libdir"/*.so; do
    ldd "$f" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
done | sort -u | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done

# The cluster, as the server's user when we are root.
data=$ctx/pgdata/data
tmp=$(mktemp -d)
as_pg() { "$@"; }
if [ "$(id -u)" = 0 ]; then
    chown postgres: "$tmp"
    as_pg() { setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; }
fi
printf '%s\n' "$password" >"$tmp/pw"
chmod 600 "$tmp/pw"
[ "$(id -u)" = 0 ] && chown postgres: "$tmp/pw"
as_pg "$bindir/initdb" -D "$tmp/data" -U "$user" --pwfile="$tmp/pw" \
    --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C \
    --no-sync --no-instructions >/dev/null
printf 'CREATE DATABASE "%s";\n' "$db" |
    as_pg "$bindir/postgres" --single -D "$tmp/data" -c timezone=UTC postgres >/dev/null
# Reached from other containers: every address, passwords.
cat >>"$tmp/data/postgresql.conf" <<EOF
listen_addresses = '*'
unix_socket_directories = '/var/run/postgresql'
timezone = 'UTC'
log_timezone = 'UTC'
max_connections = 100
EOF
echo 'host all all all scram-sha-256' >>"$tmp/data/pg_hba.conf"
echo "jit = off" >>"$tmp/data/postgresql.conf"
rm -rf "$ctx/pgdata"
mkdir -p "$ctx/pgdata"
cp -a "$tmp/data" "$data"
rm -rf "$tmp"
chmod 700 "$data"
