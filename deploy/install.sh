#!/bin/sh
# Installs the aerekos edge-worker on a Raspberry Pi as a systemd service.
# Run it on the Pi, as root, from a copy of the repository's deploy/ directory:
#
#   sudo sh deploy/install.sh --conductor http://conductor:3000 --token TOKEN \
#       [--label site=shop]... ./edge-worker
#
# It installs the binary as /usr/local/lib/aerekos/edge-worker (a directory the
# agent may write: self-update; /usr/local/bin/edge-worker links to it), writes
# the settings to
# /etc/aerekos/edge-worker.env (mode 0600), installs
# /etc/systemd/system/edge-worker.service, then runs
# `systemctl daemon-reload`, `systemctl enable` and `systemctl restart`
# (a first install starts the agent, a rerun restarts it on the new binary).
#
# Reruns keep the settings file: options given replace their variable, the
# rest (and lines added by hand, e.g. AEREKOS_INTERVAL=30s) stay. So an
# upgrade by hand is `sudo sh deploy/install.sh ./edge-worker`; a fleet upgrades
# with `aerekos agent rollout` (README, "Agent self-update").
#
#   --no-start   install and enable nothing with systemctl
#   --root DIR   install under DIR (an image being prepared, a test); no
#                daemon-reload or start, only `systemctl --root=DIR enable`
#                (skipped with --no-start); no root rights needed.
set -eu

prog=install.sh
usage() {
    cat <<'EOF'
usage: install.sh [--conductor URL] [--token TOKEN] [--label K=V]...
                  [--no-start] [--root DIR] BINARY

  BINARY            the edge-worker built for this Pi's target
  --conductor URL   conductor base URL, http://host:3000 (first install)
  --token TOKEN     registration token, aer_... (first install; written
                    as AEREKOS_REGISTRATION_TOKEN)
  --label K=V       label, repeatable; replaces all stored labels
  --no-start        do not run systemctl
  --root DIR        install under DIR instead of /; systemctl only enables
                    (systemctl --root=DIR enable), unless --no-start
EOF
}
die() {
    printf '%s: %s\n' "$prog" "$*" >&2
    exit 1
}
nl='
'
# A value written single-quoted into the settings file (read both by systemd
# and by a shell): no quote, no newline, no other control characters.
check_value() {
    case $2 in
    *"'"* | *"$nl"*) die "$1 must not contain a quote or a newline" ;;
    esac
    if printf '%s' "$2" | LC_ALL=C grep -q '[[:cntrl:]]'; then
        die "$1 must not contain control characters"
    fi
}

conductor=
token=
labels=
root=
start=yes
binary=
while [ $# -gt 0 ]; do
    case $1 in
    --conductor | --token | --label | --root)
        [ $# -ge 2 ] || die "$1 needs a value"
        opt=$1
        val=$2
        shift 2
        ;;
    --conductor=* | --token=* | --label=* | --root=*)
        opt=${1%%=*}
        val=${1#*=}
        shift
        ;;
    --no-start)
        start=no
        shift
        continue
        ;;
    -h | --help)
        usage
        exit 0
        ;;
    -*)
        usage >&2
        die "unknown option $1"
        ;;
    *)
        [ -z "$binary" ] || die "one binary only (got $binary and $1)"
        binary=$1
        shift
        continue
        ;;
    esac
    case $opt in
    --conductor)
        case $val in
        http://?* | https://?*) ;;
        *) die "--conductor expects http://host:port, got '$val'" ;;
        esac
        check_value --conductor "$val"
        conductor=$val
        ;;
    --token)
        [ -n "$val" ] || die "--token is empty"
        check_value --token "$val"
        token=$val
        ;;
    --label)
        case $val in
        =* | *,*) die "--label expects key=value without commas, got '$val'" ;;
        *=*) ;;
        *) die "--label expects key=value, got '$val'" ;;
        esac
        check_value --label "$val"
        labels=${labels:+$labels,}$val
        ;;
    --root)
        [ -n "$val" ] || die "--root is empty"
        root=${val%/}
        [ -d "$root" ] || die "--root $val is not a directory"
        ;;
    esac
done

[ -n "$binary" ] || {
    usage >&2
    die "which edge-worker binary? (e.g. ./edge-worker)"
}
[ -f "$binary" ] || die "$binary: no such file"
case $binary in
*/*) ;;
*) binary=./$binary ;; # run the file given, not one found on PATH
esac
unit_src=$(dirname -- "$0")/systemd/edge-worker.service
[ -f "$unit_src" ] || die "$unit_src not found: run install.sh from a copy of the whole deploy/ directory"

bin_dir=$root/usr/local/lib/aerekos
bin_dst=$bin_dir/edge-worker
bin_link=$root/usr/local/bin/edge-worker
env_dir=$root/etc/aerekos
env_dst=$env_dir/edge-worker.env
unit_dst=$root/etc/systemd/system/edge-worker.service

if [ -z "$root" ]; then
    [ "$(id -u)" -eq 0 ] || die "run as root (sudo sh $0 ...), or use --root DIR"
    # Catch a binary for another target (a 64-bit agent on a 32-bit OS...).
    "$binary" --version >/dev/null 2>&1 ||
        die "$binary does not run on this machine: build it for this Pi's target (see README, \"Running on a Pi\")"
fi
if [ ! -f "$env_dst" ] && { [ -z "$conductor" ] || [ -z "$token" ]; }; then
    die "a first install needs --conductor URL and --token TOKEN"
fi

umask 022
mkdir -p "$bin_dir" "$root/usr/local/bin" "$env_dir" "$root/etc/systemd/system"

# Copy next to the destination, then rename: replaces a running binary
# (copying over it fails with "text file busy") and never leaves half a file.
cp -- "$binary" "$bin_dst.new"
chmod 0755 "$bin_dst.new"
mv -f -- "$bin_dst.new" "$bin_dst"
# On PATH for people; the unit runs the real path (its directory is the one
# the agent may write to update itself). Replaces an older install's file.
ln -sfn /usr/local/lib/aerekos/edge-worker "$bin_link.new"
mv -f -- "$bin_link.new" "$bin_link"

# The settings file holds the registration token: created 0600 from the start.
# An older install wrote it as AEREKOS_TOKEN (the aerekos CLI's API token
# variable): a rerun renames that line to AEREKOS_REGISTRATION_TOKEN.
has_new_token=false
if [ -f "$env_dst" ] && grep -q '^AEREKOS_REGISTRATION_TOKEN=' "$env_dst"; then
    has_new_token=true
fi
(
    umask 077
    {
        if [ -f "$env_dst" ]; then
            while IFS= read -r line || [ -n "$line" ]; do
                case $line in
                AEREKOS_CONDUCTOR=*) [ -z "$conductor" ] || continue ;;
                AEREKOS_REGISTRATION_TOKEN=*) [ -z "$token" ] || continue ;;
                AEREKOS_TOKEN=*)
                    [ -z "$token" ] || continue
                    $has_new_token && continue
                    line="AEREKOS_REGISTRATION_TOKEN=${line#AEREKOS_TOKEN=}"
                    ;;
                AEREKOS_LABELS=*) [ -z "$labels" ] || continue ;;
                esac
                printf '%s\n' "$line"
            done <"$env_dst"
        else
            printf '%s\n' \
                "# aerekos edge-worker settings, read by edge-worker.service." \
                "# Any AEREKOS_* variable from \`edge-worker --help\` may be added;" \
                "# install.sh reruns keep what they are not told to change."
        fi
        [ -z "$conductor" ] || printf "AEREKOS_CONDUCTOR='%s'\n" "$conductor"
        [ -z "$token" ] || printf "AEREKOS_REGISTRATION_TOKEN='%s'\n" "$token"
        [ -z "$labels" ] || printf "AEREKOS_LABELS='%s'\n" "$labels"
    } >"$env_dst.new"
)
chmod 0600 "$env_dst.new"
mv -f -- "$env_dst.new" "$env_dst"

cp -- "$unit_src" "$unit_dst.new"
chmod 0644 "$unit_dst.new"
mv -f -- "$unit_dst.new" "$unit_dst"

echo "installed $bin_dst, $env_dst, $unit_dst"
[ "$start" = yes ] || exit 0
command -v systemctl >/dev/null 2>&1 || die "systemctl not found (use --no-start)"
if [ -n "$root" ]; then
    systemctl --root="$root" enable edge-worker.service
    exit 0
fi
systemctl daemon-reload
systemctl enable edge-worker.service
systemctl restart edge-worker.service
echo "edge-worker is running: systemctl status edge-worker; journalctl -u edge-worker -f"
