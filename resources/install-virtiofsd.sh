#!/usr/bin/env bash
# Install (or find in the cache) virtiofsd, the virtio-fs vhost-user daemon
# that `kiln run --share` starts. Debian 12 does not package it; crates.io
# has it. The version is pinned here; the build is cached under
# ${KILN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}/virtiofsd-<version>/
# and the cache's `virtiofsd` link names the binary kiln uses (kiln looks there
# after --virtiofsd and $KILN_VIRTIOFSD, before PATH).
#
# Usage: install-virtiofsd.sh    (prints virtiofsd=/abs/path on stdout)
# A virtiofsd already on PATH is used as it is (nothing is built).
set -euo pipefail

prog=install-virtiofsd.sh
version=1.14.0
die() { echo "$prog: error: $*" >&2; exit 1; }

if found=$(command -v virtiofsd 2>/dev/null); then
    echo "virtiofsd=$found"
    exit 0
fi

cache_root=${KILN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}
mkdir -p "$cache_root" || die "cannot create cache dir $cache_root"
cache_root=$(cd "$cache_root" && pwd -P)
entry="$cache_root/virtiofsd-$version"

if [ ! -x "$entry/bin/virtiofsd" ]; then
    command -v cargo >/dev/null || die "cargo not found (install Rust, or put a virtiofsd on PATH)"
    exec {lock_fd}>"$entry.lock"
    flock "$lock_fd"
    if [ ! -x "$entry/bin/virtiofsd" ]; then
        tmp=$(mktemp -d "$cache_root/.tmp-virtiofsd-$version.XXXXXX")
        trap 'rm -rf "$tmp"' EXIT
        echo "$prog: building virtiofsd $version with cargo install (a few minutes)" >&2
        cargo install --locked --quiet --version "$version" --root "$tmp/entry" \
            ${KILN_VIRTIOFSD_JOBS:+-j "$KILN_VIRTIOFSD_JOBS"} virtiofsd >&2 ||
            die "cargo install virtiofsd $version failed (needs libseccomp-dev and libcap-ng-dev)"
        rm -f "$tmp/entry/.crates.toml" "$tmp/entry/.crates2.json"
        mv -T "$tmp/entry" "$entry"   # atomic: same filesystem
    fi
fi
ln -sfn "virtiofsd-$version/bin/virtiofsd" "$cache_root/virtiofsd"
echo "virtiofsd=$entry/bin/virtiofsd"
