#!/usr/bin/env bash
# Build (or find in the cache) kiln's guest kernel: Linux 6.1, tinyconfig plus
# the fragments in config/ (merged in name order), with the PVM guest patch.
#
# Usage: build-kernel.sh [--cached-only]
#
# Contract: the last two lines of stdout are exactly
#     vmlinux=/abs/path/vmlinux
#     bzimage=/abs/path/bzImage
# Everything else (progress, errors) goes to stderr.
#
#   --cached-only   print the two lines if the cache entry exists; otherwise
#                   exit 3 with a one-line message on stderr, without building.
#
# Environment:
#   KILN_KERNEL_SRC   a Linux source tree to use instead of Debian's
#                     /usr/src/linux-source-6.1.tar.xz (it is copied, never
#                     modified).
#   KILN_CACHE_DIR    cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/kiln);
#                     entries are kernel-<hash>/, <hash> = sha256 over this
#                     script, the fragments, the patch, the source identity and
#                     the compiler version.
#   KILN_KERNEL_VERBOSE=1   stream the kbuild output to stderr (default: it is
#                     written to a log, whose tail is shown on failure).
#   KILN_KERNEL_JOBS  make -j value (default: nproc).
set -euo pipefail

prog=build-kernel.sh
die() { echo "$prog: error: $*" >&2; exit 1; }
log() { echo "$prog: $*" >&2; }

cached_only=0
case "${1:-}" in
    "") ;;
    --cached-only) cached_only=1 ;;
    -h|--help) sed -n '2,25s/^# \{0,1\}//p' "$0" >&2; exit 0 ;;
    *) die "unknown argument '$1' (usage: $prog [--cached-only])" ;;
esac
[ $# -le 1 ] || die "too many arguments (usage: $prog [--cached-only])"

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self="$here/$(basename "${BASH_SOURCE[0]}")"
patch_file="$here/patches/pvm-native-guest.patch"
debian_pkg=linux-source-6.1
debian_tar=/usr/src/linux-source-6.1.tar.xz

shopt -s nullglob
fragments=("$here"/config/*.fragment)
shopt -u nullglob
[ ${#fragments[@]} -gt 0 ] || die "no config fragments in $here/config"
[ -f "$patch_file" ] || die "missing $patch_file"

# ---------------------------------------------------------------- source id
if [ -n "${KILN_KERNEL_SRC:-}" ]; then
    if [ ! -f "$KILN_KERNEL_SRC/Makefile" ] || [ ! -d "$KILN_KERNEL_SRC/arch/x86" ]; then
        die "KILN_KERNEL_SRC=$KILN_KERNEL_SRC is not a Linux source tree (no Makefile or arch/x86)"
    fi
    src_dir=$(cd "$KILN_KERNEL_SRC" && pwd -P)
    mk_version=$(awk -F' *= *' '
        $1=="VERSION"{v=$2} $1=="PATCHLEVEL"{p=$2} $1=="SUBLEVEL"{s=$2}
        $1=="EXTRAVERSION"{e=$2} END{print v "." p "." s e}' "$src_dir/Makefile")
    git_desc=none
    if [ -e "$src_dir/.git" ] && command -v git >/dev/null; then
        git_desc=$(git -C "$src_dir" describe --always --tags --dirty 2>/dev/null || echo none)
    fi
    source_id="tree $src_dir makefile-version $mk_version git $git_desc"
else
    pkg_version=$(dpkg-query -W -f='${Version}' "$debian_pkg" 2>/dev/null || true)
    if [ -z "$pkg_version" ] || [ ! -f "$debian_tar" ]; then
        msg="$debian_tar not found: install the Debian package $debian_pkg (apt-get install $debian_pkg) or set KILN_KERNEL_SRC to a Linux source tree"
        if [ $cached_only = 1 ]; then echo "$prog: $msg" >&2; exit 3; fi
        die "$msg"
    fi
    source_id="debian $debian_pkg $pkg_version"
fi
cc_version=$("${CC:-gcc}" --version 2>/dev/null | head -n1 || true)

# ---------------------------------------------------------------- cache key
inputs() {
    echo "script $(sha256sum <"$self" | cut -d' ' -f1)"
    local f
    for f in "${fragments[@]}"; do
        echo "fragment $(basename "$f") $(sha256sum <"$f" | cut -d' ' -f1)"
    done
    echo "patch $(basename "$patch_file") $(sha256sum <"$patch_file" | cut -d' ' -f1)"
    echo "source $source_id"
    echo "cc ${cc_version:-unknown}"
}
manifest=$(inputs)
hash=$(printf '%s\n' "$manifest" | sha256sum | cut -c1-16)

cache_root=${KILN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}
if ! mkdir -p "$cache_root" 2>/dev/null; then
    if [ $cached_only = 1 ]; then echo "$prog: no cached kernel (no cache dir $cache_root)" >&2; exit 3; fi
    die "cannot create cache dir $cache_root"
fi
cache_root=$(cd "$cache_root" && pwd -P)
entry="$cache_root/kernel-$hash"

print_result() {
    echo "vmlinux=$entry/vmlinux"
    echo "bzimage=$entry/bzImage"
}

# An entry only ever appears by an atomic rename of a complete build.
if [ -f "$entry/vmlinux" ] && [ -f "$entry/bzImage" ]; then
    print_result
    exit 0
fi
if [ $cached_only = 1 ]; then
    echo "$prog: no cached kernel at $entry (run $self to build it)" >&2
    exit 3
fi

# ---------------------------------------------------------------- lock
command -v flock >/dev/null || die "flock not found (apt-get install util-linux)"
exec {lock_fd}>"$cache_root/kernel-$hash.lock"
if ! flock -n "$lock_fd"; then
    log "another build of kernel-$hash is running; waiting for it"
    flock "$lock_fd"
fi
if [ -f "$entry/vmlinux" ] && [ -f "$entry/bzImage" ]; then
    log "built by another process meanwhile"
    print_result
    exit 0
fi

for tool in make gcc bc bison flex patch tar xz; do
    command -v "$tool" >/dev/null ||
        die "'$tool' not found (apt-get install build-essential bc bison flex libelf-dev xz-utils patch)"
done

# Builds killed without a chance to clean up leave temp dirs; with the lock
# held, any temp dir for this hash is stale.
rm -rf "$cache_root/.tmp-kernel-$hash".* 2>/dev/null || true
tmp=$(mktemp -d "$cache_root/.tmp-kernel-$hash.XXXXXX")
cleanup() { rm -rf "$tmp"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

src="$tmp/src"
out="$tmp/build"
blog="$tmp/build.log"
mkdir -p "$src" "$out"
start=$(date +%s)

run() { # run a build step; its output goes to the log (or stderr if verbose)
    if [ "${KILN_KERNEL_VERBOSE:-0}" = 1 ]; then
        "$@" >&2
    elif ! "$@" >>"$blog" 2>&1; then
        local failed_log="$cache_root/kernel-$hash.failed.log"
        cp "$blog" "$failed_log" 2>/dev/null || true
        tail -n 40 "$blog" >&2
        die "step failed: $* (full log: $failed_log)"
    fi
}

# Leave out what an x86 build never reads: the other architectures' sources
# and the documentation. Kconfig files stay (crypto/Kconfig sources every
# arch/*/crypto/Kconfig, the top Kconfig sources Documentation/Kconfig): the
# patterns skip only names not starting with K. A quarter fewer files makes
# extracting and deleting the tree much faster on a busy disk.
skip=(--exclude=.git --exclude='Documentation/[!K]*')
for a in alpha arc arm arm64 csky hexagon ia64 loongarch m68k microblaze mips \
         nios2 openrisc parisc powerpc riscv s390 sh sparc um xtensa; do
    skip+=("--exclude=arch/$a/*/[!K]*")
done

log "building kernel-$hash in $tmp"
if [ -n "${KILN_KERNEL_SRC:-}" ]; then
    log "copying source tree $src_dir ($mk_version, git $git_desc)"
    tar -C "$src_dir" "${skip[@]}" -cf - . | tar -C "$src" -xf -
    # an in-tree configured/built tree refuses O= builds; clean our copy only
    if [ -e "$src/.config" ] || [ -e "$src/include/config" ]; then
        run make -C "$src" mrproper
    fi
else
    log "extracting $debian_tar ($debian_pkg $pkg_version)"
    tar -C "$src" --strip-components=1 "${skip[@]}" -xf "$debian_tar"
fi

if patch -d "$src" -p1 --dry-run --forward --batch --silent <"$patch_file" >/dev/null 2>&1; then
    log "applying $(basename "$patch_file")"
    patch -d "$src" -p1 --forward --batch --silent <"$patch_file" >&2
elif patch -d "$src" -p1 --dry-run --reverse --batch --silent <"$patch_file" >/dev/null 2>&1; then
    log "$(basename "$patch_file") is already applied to the source"
else
    die "$(basename "$patch_file") does not apply to this source ($source_id)"
fi

log "configuring: tinyconfig + $(for f in "${fragments[@]}"; do printf '%s ' "$(basename "$f")"; done)"
run make -C "$src" O="$out" tinyconfig
(cd "$src" && run scripts/kconfig/merge_config.sh -m -O "$out" "$out/.config" "${fragments[@]}")
run make -C "$src" O="$out" olddefconfig

# Every value the fragments ask for (last fragment wins) must be in .config.
# Kconfig silently drops options whose dependencies are unmet or which do not
# exist in this kernel version; catch that here instead of at guest boot.
problems=$(awk '
    FNR == 1 { file = FILENAME; sub(".*/", "", file) }
    /^CONFIG_[A-Za-z0-9_]+=/ {
        name = $0; sub("=.*", "", name); val = $0; sub("^[^=]*=", "", val)
        want[name] = val; from[name] = file; next
    }
    /^# CONFIG_[A-Za-z0-9_]+ is not set/ { want[$2] = "n"; from[$2] = file; next }
    END {
        while ((getline line < CONFIG) > 0) {
            if (line ~ /^CONFIG_/) {
                n = line; sub("=.*", "", n); v = line; sub("^[^=]*=", "", v); got[n] = v
            }
        }
        for (n in want) {
            w = want[n]; g = (n in got) ? got[n] : "n"
            if (w == "n" && g != "y" && g != "m") continue
            if (w != "n" && w == g) continue
            gs = (g == "n") ? "not set" : g
            ws = (w == "n") ? "not set" : w
            printf "  %s: requested %s (in %s), but .config has %s\n", n, ws, from[n], gs
        }
    }' CONFIG="$out/.config" "${fragments[@]}" | sort)
if [ -n "$problems" ]; then
    cp "$out/.config" "$cache_root/kernel-$hash.failed.config" 2>/dev/null || true
    echo "$prog: these options from the fragments did not stick after olddefconfig (dependency missing or option unknown in this kernel):" >&2
    echo "$problems" >&2
    die "config check failed (resulting config: $cache_root/kernel-$hash.failed.config)"
fi
log "config check passed: every fragment option is in .config"

# A disabled option whose name this kernel does not know passes the check
# above silently (it is "not set" either way); say so, it may have been renamed.
known=$(grep -rhoE --include='Kconfig*' '^[[:space:]]*(menu)?config[[:space:]]+[A-Za-z0-9_]+' "$src" |
        awk '{print "CONFIG_" $2}' | sort -u)
unknown=$(sed -n 's/^# \(CONFIG_[A-Za-z0-9_]*\) is not set.*/\1/p; s/^\(CONFIG_[A-Za-z0-9_]*\)=.*/\1/p' \
          "${fragments[@]}" | sort -u | comm -23 - <(printf '%s\n' "$known"))
for n in $unknown; do
    log "note: $n (in the fragments) is not a Kconfig symbol in this kernel"
done

jobs=${KILN_KERNEL_JOBS:-$(nproc)}
log "compiling with make -j$jobs (a few minutes; log: $blog)"
run make -C "$src" O="$out" -j"$jobs" vmlinux bzImage

mkdir "$tmp/entry"
cp "$out/vmlinux" "$tmp/entry/vmlinux"
cp "$out/arch/x86/boot/bzImage" "$tmp/entry/bzImage"
cp "$out/.config" "$tmp/entry/config"
cp "$blog" "$tmp/entry/build.log" 2>/dev/null || true
end=$(date +%s)
{
    printf '%s\n' "$manifest"
    echo "kernelrelease $(cat "$out/include/config/kernel.release" 2>/dev/null || echo unknown)"
    echo "build-seconds $((end - start))"
    echo "jobs $jobs"
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$tmp/entry/inputs.txt"

mv -T "$tmp/entry" "$entry"   # atomic: same filesystem
rm -f "$cache_root/kernel-$hash.failed.log" "$cache_root/kernel-$hash.failed.config"
log "built kernel-$hash in $((end - start)) s"
print_result
