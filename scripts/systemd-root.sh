#!/usr/bin/env bash
# Prints the directory of a Debian 13 (trixie) root with systemd 257 in it, for
# `systemd-nspawn -D DIR --volatile=overlay --boot` (scripts/container.sh), building it first
# when it is missing. Needs root.
#
# The root is built once with debootstrap (about a minute and 300 MB) and cached on the machine
# under /var/cache/shellflip/; a later run only prints its path. `--volatile=overlay` never
# changes it. The archive is the one the machine's own apt sources name, read at run time.
#
#   SHELLFLIP_ROOT_CACHE   the cache directory (default /var/cache/shellflip)
#   SHELLFLIP_ROOT_REBUILD=1   throw the cached root away and build it again
set -euo pipefail

cache=${SHELLFLIP_ROOT_CACHE:-/var/cache/shellflip}
suite=trixie
root=$cache/debian13-systemd
# The packages beyond debootstrap's minbase: systemd as process 1, D-Bus for systemctl, pgrep.
include=systemd,systemd-sysv,dbus,procps

say() { echo "systemd-root: $*" >&2; }

if [[ $(id -u) != 0 ]]; then
    say "needs root (debootstrap)"
    exit 1
fi

# The Debian archive the machine's apt already uses: the first URIs: of a deb822 source, or the
# first deb line of a one-line source, that is not the security archive.
archive_address() {
    local file
    for file in /etc/apt/sources.list.d/*.sources; do
        [[ -e $file ]] || continue
        awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) print $i }' "$file"
    done
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -e $file ]] || continue
        awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ ) { print $i; break } }' "$file"
    done
}

mkdir -p "$cache"
# One build at a time on the machine: a second caller waits for the first, then finds the root.
exec {lock}>"$cache/.lock"
flock "$lock"

if [[ ${SHELLFLIP_ROOT_REBUILD:-} == 1 ]]; then
    rm -rf "$root"
fi
if [[ -x $root/usr/lib/systemd/systemd && -e $root/.complete ]]; then
    echo "$root"
    exit 0
fi

archive=$(archive_address | grep -v -- '-security' | grep -E '^https?://' | head -n 1 || true)
if [[ -z $archive ]]; then
    say "no Debian archive found in the machine's apt sources (/etc/apt/sources.list*)"
    exit 1
fi
if ! command -v debootstrap >/dev/null 2>&1; then
    say "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

say "building a Debian 13 root with systemd in $root (once; about a minute)"
building=$cache/.building.$$
rm -rf "$building" "$cache"/.building.*
log=$cache/debootstrap.log
started=$SECONDS
if ! debootstrap --variant=minbase --include="$include" "$suite" "$building" "$archive" >"$log" 2>&1; then
    say "debootstrap failed; the end of its log ($log):"
    tail -n 30 "$log" >&2
    rm -rf "$building"
    exit 1
fi
# No first-boot questions, no machine-id prompt; an empty machine-id is filled at each boot.
: >"$building/etc/machine-id"
touch "$building/.complete"
rm -rf "$root"
mv "$building" "$root"
say "built in $((SECONDS - started)) s: $(du -sh "$root" | cut -f1)"
echo "$root"
