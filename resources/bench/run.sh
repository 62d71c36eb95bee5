#!/usr/bin/env bash
# kiln benchmarks: kiln, QEMU (-M microvm) and a raw KVM floor program side by
# side in one run, with repetitions; writes BENCHMARKS.md and BENCHMARKS.json.
#
# Usage: resources/bench/run.sh [--quick] [--only LIST] [--out DIR]
#
#   --quick      1 repetition, 10 000 exits instead of 100 000, shorter idle
#                and rate windows: a smoke check, not a measurement
#   --only LIST  comma-separated sections (default: all):
#                  exits    exit cost: PIO and MMIO round trip per exit
#                  startup  process start to first KVM_RUN; tiny VM wall time;
#                           VMs created and torn down per second (1 and 2 at once)
#                  boot     boot to init with identical inputs; on the same VMs,
#                           the monitor's private memory and its idle CPU time
#                  bootpath kiln alone: boot to init with one boot-path choice
#                           changed at a time (no PVH, bzImage, gzip or large
#                           initramfs, verbose console)
#                  command  `kiln run ... -- echo hi` vs a conventional QEMU boot
#                  disk     virtio-blk: O_DIRECT dd of 64 MiB, random 4 KiB reads
#                  net      virtio-net (only if `kiln run --help` lists --net)
#   --out DIR    where BENCHMARKS.md/.json go (default: the repository root)
#   --reps N, --reps-boot N   override the repetitions (default 5, and 3 for
#                anything that boots Linux; --quick: 1 and 1)
#   --reps-bootpath N  repetitions of the bootpath section (default: --reps-boot)
#
# Environment: KILN_BIN (a kiln binary to use instead of building
# target/release/kiln), KILN_BENCH_WORK (scratch root, default target/bench).
# Prerequisites are what resources/setup.sh installs (gcc, qemu-system-x86,
# busybox-static, cpio, strace) and the guest kernel it builds.
#
# What each benchmark does, and why, is in resources/bench/README.md.
set -euo pipefail
unset KILN_LOG RUST_LOG

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bench_dir="$root/resources/bench"
prog=run.sh

die() { echo "$prog: error: $*" >&2; exit 1; }
log() { echo "$prog: $*" >&2; }

# ---------------------------------------------------------------- options
quick=0
reps_override=""
reps_boot_override=""
reps_bootpath_override=""
only="exits,startup,boot,bootpath,command,disk,net"
out_dir="$root"
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --only) [ $# -ge 2 ] || die "--only needs a list"; only=$2; shift ;;
        --only=*) only=${1#--only=} ;;
        --out) [ $# -ge 2 ] || die "--out needs a directory"; out_dir=$2; shift ;;
        --out=*) out_dir=${1#--out=} ;;
        --reps) [ $# -ge 2 ] || die "--reps needs a number"; reps_override=$2; shift ;;
        --reps-boot) [ $# -ge 2 ] || die "--reps-boot needs a number"; reps_boot_override=$2; shift ;;
        --reps-bootpath) [ $# -ge 2 ] || die "--reps-bootpath needs a number"; reps_bootpath_override=$2; shift ;;
        -h|--help) sed -n '2,29s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done
declare -A want=()
IFS=',' read -r -a sections <<< "$only"
for s in "${sections[@]}"; do
    case "$s" in
        exits|startup|boot|bootpath|command|disk|net) want[$s]=1 ;;
        memory|idle) want[boot]=1 ;;
        *) die "unknown section '$s' (exits, startup, boot, bootpath, command, disk, net)" ;;
    esac
done
wants() { [ -n "${want[$1]:-}" ]; }

if [ "$quick" = 1 ]; then
    reps_boot=1; reps=1; exit_n=10000; rate_secs=1; idle_secs=3; settle_secs=1
else
    reps_boot=3; reps=5; exit_n=100000; rate_secs=2; idle_secs=10; settle_secs=5
fi
[ -n "$reps_override" ] && reps=$reps_override
[ -n "$reps_boot_override" ] && reps_boot=$reps_boot_override
reps_bootpath=${reps_bootpath_override:-$reps_boot}
[[ "$reps" =~ ^[1-9][0-9]*$ && "$reps_boot" =~ ^[1-9][0-9]*$ && "$reps_bootpath" =~ ^[1-9][0-9]*$ ]] ||
    die "repetitions must be positive numbers"
boot_timeout=900
guest_mem_mib=128

mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)
work_root=${KILN_BENCH_WORK:-$root/target/bench}
mkdir -p "$work_root"
work=$(mktemp -d "$work_root/run.XXXXXX")
ln -sfn "$work" "$work_root/last"
samples="$work/samples.tsv"
notes="$work/notes.txt"
: > "$samples"; : > "$notes"
log "scratch directory $work (logs of every run)"

# ------------------------------------------------------------ prerequisites
[ -r /dev/kvm ] && [ -w /dev/kvm ] || die "no read/write access to /dev/kvm"
command -v gcc >/dev/null || die "gcc missing (resources/setup.sh installs build-essential)"
qemu=$(command -v qemu-system-x86_64 || true)
[ -n "$qemu" ] || log "qemu-system-x86_64 missing: QEMU columns stay empty (resources/setup.sh installs qemu-system-x86)"
have_strace=0
command -v strace >/dev/null && have_strace=1

bin="$work/bin"
mkdir -p "$bin"
gcc -O2 -Wall -o "$bin/benchrun" "$bench_dir/benchrun.c" -lpthread
gcc -O2 -Wall -shared -fPIC -o "$bin/first-run.so" "$bench_dir/first-run.c" -ldl
gcc -O2 -Wall -o "$bin/kvm-floor" "$bench_dir/kvm-floor.c"
gcc -O2 -Wall -static -o "$bin/randread" "$bench_dir/guest/randread.c"
gcc -nostdlib -static -no-pie -Wl,-Ttext=0x200000 -Wl,--build-id=none -Wa,--noexecstack \
    -o "$bin/bench_exit.elf" "$bench_dir/guest/bench_exit.S"
benchrun="$bin/benchrun"
floor="$bin/kvm-floor"
tiny="$bin/bench_exit.elf"
shim="$bin/first-run.so"

if [ -n "${KILN_BIN:-}" ]; then
    kiln=$KILN_BIN
    kiln_build="given (KILN_BIN)"
else
    log "building kiln (cargo build --release)"
    (cd "$root" && cargo build --release --quiet --bin kiln) || die "cargo build failed"
    kiln="$root/target/release/kiln"
    kiln_build="release"
fi
[ -x "$kiln" ] || die "kiln binary $kiln not found"
kiln_help=$("$kiln" run --help 2>&1 || true)

need_kernel=0
for s in boot command disk net; do wants $s && need_kernel=1; done
vmlinux=""; bzimage=""
if [ "$need_kernel" = 1 ]; then
    if [ -f "$root/target/guest/vmlinux" ]; then
        vmlinux=$(readlink -f "$root/target/guest/vmlinux")
        bzimage=$(readlink -f "$root/target/guest/bzImage")
    else
        kout=$("$root/resources/guest/build-kernel.sh" --cached-only 2>/dev/null) ||
            die "no guest kernel: run resources/setup.sh first"
        vmlinux=$(printf '%s\n' "$kout" | sed -n 's/^vmlinux=//p')
        bzimage=$(printf '%s\n' "$kout" | sed -n 's/^bzimage=//p')
    fi
    [ -f "$vmlinux" ] && [ -f "$bzimage" ] || die "guest kernel files missing ($vmlinux, $bzimage)"
    command -v cpio >/dev/null || die "cpio missing (resources/setup.sh installs it)"
    busybox=$(command -v busybox || true)
    # ldd fails on a static executable.
    if [ -z "$busybox" ] || ldd "$busybox" >/dev/null 2>&1; then
        die "a static busybox is needed (resources/setup.sh installs busybox-static)"
    fi
fi

# ------------------------------------------------------------------ host info
if [ -d /sys/module/kvm_pvm ]; then
    kvm_flavour="PVM"
    kvm_detail="PVM (kvm_pvm: guest kernel-mode code is emulated)"
    host_cmdline="noxsave clearcpuid=smap,popcnt nofsgsbase rcupdate.rcu_cpu_stall_suppress=1 GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX_Fast_Unaligned_Load"
elif [ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ]; then
    kvm_flavour="hardware"
    kvm_detail="hardware ($(basename "$(ls -d /sys/module/kvm_intel /sys/module/kvm_amd 2>/dev/null | head -1)"))"
    host_cmdline=""
else
    kvm_flavour="unknown"; kvm_detail="unknown"; host_cmdline=""
fi
cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
cpu_count=$(nproc)
run_date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
kiln_rev=$(git -C "$root" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$root" status --porcelain -- src devices resources/init Cargo.toml Cargo.lock build.rs 2>/dev/null)" ]; then
    kiln_rev="$kiln_rev+uncommitted"
fi
qemu_version=$([ -n "$qemu" ] && "$qemu" --version | head -1 || echo "not installed")
load_start=$(cut -d' ' -f1-3 /proc/loadavg)

# ------------------------------------------------------------------- helpers
# record METRIC MONITOR VALUE: one sample.
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$samples"; }
note() { printf '%s\n' "$*" >> "$notes"; }

# brun ARGS...: benchrun time; its key=value output lands in the array R.
declare -A R
brun() {
    local output k v
    R=()
    output=$("$benchrun" time "$@") || return 1
    while IFS='=' read -r k v; do R[$k]=$v; done <<< "$output"
}
# ok STATUS: the last brun ended with exit status STATUS (or was killed after its marker).
ok() { [ "${R[status]:-}" = "$1" ]; }
fail_note() { log "FAILED: $*"; note "FAILED: $*"; }

ms() { awk -v s="$1" 'BEGIN { printf "%.3f", s * 1000 }'; }

# debug-threads=on names QEMU's vCPU threads "CPU 0/KVM" (the idle CPU split).
qemu_base=(-name kilnbench,debug-threads=on -enable-kvm -cpu host,-arch-capabilities -smp 1
           -nodefaults -no-user-config -display none -monitor none)
# The tiny guest under QEMU: no firmware option ROMs, no RTC, no serial; the
# guest ends QEMU through isa-debug-exit (status 1 = the guest wrote 0).
qemu_tiny=("$qemu" -M microvm,x-option-roms=off,rtc=off,isa-serial=off,auto-kernel-cmdline=off
           "${qemu_base[@]}" -serial none -m 32M
           -device isa-debug-exit,iobase=0xf4,iosize=4 -kernel "$tiny")
kiln_tiny=("$kiln" run --kernel "$tiny" --mem 32M)

# ------------------------------------------------------------------ 1. exits
run_exits() {
    log "exit cost: $exit_n exits per run, $reps repetitions"
    local rep mon kind args t0 t
    for rep in $(seq "$reps"); do
        for mon in floor floor_irqchip kiln qemu; do
            [ "$mon" = qemu ] && [ -z "$qemu" ] && continue
            declare -A T=() C=()
            for kind in zero pio mmio; do
                case $kind in
                    zero) args="exit_loop.pio=0 exit_loop.mmio=0" ;;
                    pio) args="exit_loop.pio=$exit_n exit_loop.mmio=0" ;;
                    mmio) args="exit_loop.pio=0 exit_loop.mmio=$exit_n" ;;
                esac
                local expect=0 cmd=()
                case $mon in
                    floor) cmd=("$floor" "$tiny" "$args") ;;
                    floor_irqchip) cmd=("$floor" -i "$tiny" "$args") ;;
                    kiln) cmd=("${kiln_tiny[@]}" --cmdline "$args") ;;
                    qemu) cmd=("${qemu_tiny[@]}" -append "$args"); expect=1 ;;
                esac
                brun -t 300 -e "$work/exits-$mon-$kind-$rep.err" -- "${cmd[@]}" ||
                    { fail_note "exits: $mon $kind: benchrun failed"; continue 2; }
                ok $expect || { fail_note "exits: $mon $kind run $rep: status ${R[status]:-?} signal ${R[signal]:-} (see $work/exits-$mon-$kind-$rep.err)"; continue 2; }
                T[$kind]=${R[wall]}
                C[$kind]=${R[cpu]}
            done
            t0=${T[zero]}
            for kind in pio mmio; do
                t=$(awk -v a="${T[$kind]}" -v b="$t0" -v n="$exit_n" 'BEGIN { printf "%.3f", (a - b) / n * 1e6 }')
                record "exit_${kind}_us" "$mon" "$t"
                t=$(awk -v a="${C[$kind]}" -v b="${C[zero]}" -v n="$exit_n" 'BEGIN { printf "%.3f", (a - b) / n * 1e6 }')
                record "exit_${kind}_cpu_us" "$mon" "$t"
            done
        done
    done
    [ "$have_strace" = 1 ] && exit_syscalls
    return 0
}

# Syscalls per exit, counted with strace -c -f over N PIO exits minus the
# same for 0 exits: what each monitor does for one exit besides KVM_RUN.
exit_syscalls() {
    local n=$((exit_n / 10)) mon cmd0 cmdn
    for mon in floor kiln qemu; do
        [ "$mon" = qemu ] && [ -z "$qemu" ] && continue
        case $mon in
            floor) cmd0=("$floor" "$tiny" "exit_loop.pio=0"); cmdn=("$floor" "$tiny" "exit_loop.pio=$n") ;;
            kiln) cmd0=("${kiln_tiny[@]}" --cmdline "exit_loop.pio=0"); cmdn=("${kiln_tiny[@]}" --cmdline "exit_loop.pio=$n") ;;
            qemu) cmd0=("${qemu_tiny[@]}" -append "exit_loop.pio=0"); cmdn=("${qemu_tiny[@]}" -append "exit_loop.pio=$n") ;;
        esac
        strace -f -c -o "$work/strace-$mon-0.txt" "${cmd0[@]}" </dev/null >/dev/null 2>&1 || true
        strace -f -c -o "$work/strace-$mon-n.txt" "${cmdn[@]}" </dev/null >/dev/null 2>&1 || true
        local per
        per=$(awk -v n="$n" '
            function load(file, arr,   line, f) {
                while ((getline line < file) > 0) {
                    split(line, f, " ")
                    if (line ~ /^ *[0-9.]+ +[0-9.]+ +[0-9]+ +[0-9]+/) {
                        name = f[length(f)]; arr[name] = f[4]
                    }
                }
            }
            BEGIN {
                load(ARGV[1], a); load(ARGV[2], b)
                out = ""
                for (s in b) { if (s == "total") continue; d = (b[s] - a[s]) / n; if (d >= 0.05) out = out sprintf("%s%s %.2f", out == "" ? "" : ", ", s, d) }
                print (out == "" ? "none counted" : out)
            }' "$work/strace-$mon-0.txt" "$work/strace-$mon-n.txt")
        note "syscalls per PIO exit ($mon, strace -c -f, $n exits minus 0): $per"
    done
}

# --------------------------------------------------------------- 3. start-up
run_startup() {
    log "start-up: $reps repetitions; VMs per second over ${rate_secs}s windows"
    local rep mon expect
    # kiln logs "guest user space started ..." (the tiny guest writes the boot
    # timer at once); the other monitors ignore the variable.
    export KILN_LOG=info
    for rep in $(seq "$reps"); do
        for mon in floor_irqchip kiln qemu; do
            [ "$mon" = qemu ] && [ -z "$qemu" ] && continue
            local cmd=()
            expect=0
            case $mon in
                floor_irqchip) cmd=("$floor" -i "$tiny" "") ;;
                kiln) cmd=("${kiln_tiny[@]}") ;;
                qemu) cmd=("${qemu_tiny[@]}" -append ""); expect=1 ;;
            esac
            local err="$work/startup-$mon-$rep.err"
            brun -t 60 -p "$shim" -e "$err" -- "${cmd[@]}" ||
                { fail_note "startup: $mon: benchrun failed"; continue; }
            ok $expect || { fail_note "startup: $mon run $rep: status ${R[status]:-?} (see $err)"; continue; }
            [ "${R[first_run]:-none}" != none ] && record startup_first_run_ms "$mon" "$(ms "${R[first_run]}")"
            record tiny_vm_wall_ms "$mon" "$(ms "${R[wall]}")"
            record tiny_vm_cpu_ms "$mon" "$(ms "${R[cpu]}")"
            record tiny_vm_faults "$mon" "${R[minflt]}"
            if [ "$mon" = kiln ]; then
                # "guest user space started X ms after monitor start (Y ms after
                # first KVM_RUN)": X - Y is main() to the first KVM_RUN.
                local internal
                internal=$(sed -n 's/.*started \([0-9.]*\) ms after monitor start (\([0-9.]*\) ms after first KVM_RUN).*/\1 \2/p' "$err" |
                           awk 'NR == 1 { printf "%.1f", $1 - $2 }')
                [ -n "$internal" ] && record startup_kiln_log_ms kiln "$internal"
            fi
        done
    done
    unset KILN_LOG
    for rep in $(seq "$reps"); do
        for mon in floor_irqchip kiln qemu; do
            [ "$mon" = qemu ] && [ -z "$qemu" ] && continue
            local cmd=() expect=0 jobs
            case $mon in
                floor_irqchip) cmd=("$floor" -i "$tiny" "") ;;
                kiln) cmd=("${kiln_tiny[@]}") ;;
                qemu) cmd=("${qemu_tiny[@]}" -append ""); expect=1 ;;
            esac
            for jobs in 1 2; do
                local outp
                outp=$("$benchrun" rate -j "$jobs" -d "$rate_secs" -x "$expect" -- "${cmd[@]}") ||
                    { fail_note "rate: $mon -j $jobs failed"; continue; }
                local per failed
                per=$(sed -n 's/^per_sec=//p' <<< "$outp")
                failed=$(sed -n 's/^failed=//p' <<< "$outp")
                [ "$failed" = 0 ] || fail_note "rate: $mon -j $jobs: $failed runs had an unexpected status"
                if [ "$jobs" = 1 ]; then record vms_per_sec_seq "$mon" "$per"; else record vms_per_sec_par2 "$mon" "$per"; fi
            done
        done
    done
    [ "$have_strace" = 1 ] && startup_syscalls
    return 0
}

# The slowest system calls before the first KVM_RUN (strace -T): where
# kiln's start-up goes. The floor program makes the same KVM calls.
startup_syscalls() {
    local mon cmd=()
    for mon in kiln floor_irqchip; do
        case $mon in
            kiln) cmd=("${kiln_tiny[@]}") ;;
            floor_irqchip) cmd=("$floor" -i "$tiny" "") ;;
        esac
        strace -f -T -o "$work/strace-startup-$mon.txt" "${cmd[@]}" </dev/null >/dev/null 2>&1 || true
        local top
        top=$(awk '/KVM_RUN/ { exit }
                   match($0, /<[0-9.]+>$/) { t = substr($0, RSTART + 1, RLENGTH - 2) * 1000
                       call = $2; sub(/\(.*/, "", call)
                       if (call == "ioctl" && match($0, /KVM_[A-Z0-9_]+/)) call = substr($0, RSTART, RLENGTH)
                       sum[call] += t; total += t }
                   match($0, /^[0-9]+ +[a-z_0-9]+\(/) { calls++ }
                   END { n = 0; for (c in sum) if (sum[c] >= 0.3) { printf "%s%s %.1f ms", (n++ ? ", " : ""), c, sum[c] }
                         printf "%s(all %d calls %.1f ms)\n", (n ? "; " : ""), calls, total }' "$work/strace-startup-$mon.txt")
        note "system calls before the first KVM_RUN ($mon, strace -T, one run, >= 0.3 ms): $top"
    done
}

# ------------------------------------------------------------ guest roots
# The initramfs every monitor gets in the "boot" section (and disk/net): a
# static busybox with a few links; /init prints the marker and then idles,
# exercises a disk or the network, or resets, as the command line asks.
# `make_bench_initramfs full` links every busybox applet instead (the
# "bootpath" section's large-initramfs variant).
make_bench_initramfs() {
    local stage="$work/initramfs-bench${1:+-$1}" out="$work/bench-initramfs${1:+-$1}.cpio"
    rm -rf "$stage"; mkdir -p "$stage"/{bin,dev,proc,sys}
    cp "$busybox" "$stage/bin/busybox"
    cp "$bin/randread" "$stage/bin/randread"
    local a
    if [ "${1:-}" = full ]; then
        mkdir -p "$stage"/{sbin,usr/bin,usr/sbin}
        while read -r a; do
            [ -n "$a" ] && [ "$a" != bin/busybox ] && [ ! -e "$stage/$a" ] && ln -s /bin/busybox "$stage/$a"
        done < <("$busybox" --list-full)
    else
        for a in sh sleep reboot mount dd ifconfig ping time; do ln -s busybox "$stage/bin/$a"; done
    fi
    mknod -m 600 "$stage/dev/console" c 5 1
    cp "$bench_dir/guest/init.sh" "$stage/init"
    chmod 755 "$stage/init"
    (cd "$stage" && find . | sort | cpio -o -H newc -R 0:0 --quiet) > "$out"
}

# A conventional initramfs, as a distribution would make it: busybox with its
# full link set, a shell-script /init that mounts /proc, /sys and /dev, gzip.
make_conventional_initramfs() {
    local stage="$work/initramfs-conventional" path
    rm -rf "$stage"; mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys}
    cp "$busybox" "$stage/bin/busybox"
    while read -r path; do
        [ -n "$path" ] && [ "$path" != bin/busybox ] && [ ! -e "$stage/$path" ] &&
            ln -s /bin/busybox "$stage/$path"
    done < <("$busybox" --list-full)
    mknod -m 600 "$stage/dev/console" c 5 1
    cat > "$stage/init" <<'EOF'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
/bin/echo hi
reboot -f
EOF
    chmod 755 "$stage/init"
    (cd "$stage" && find . | sort | cpio -o -H newc -R 0:0 --quiet) | gzip > "$work/conventional-initramfs.cpio.gz"
    note "conventional initramfs: $(find "$stage" -type l | wc -l) busybox links, $(stat -c %s "$work/conventional-initramfs.cpio.gz") bytes gzip"
}

# kiln's own kernel command line (src/boot/cmdline.rs: BASE + QUIET + host
# profile), so QEMU gets exactly the same words in the "boot" section.
kiln_cmdline="console=ttyS0 reboot=k panic=-1 rdinit=/kiln/init tsc=reliable no_timer_check i8042.noaux quiet loglevel=1${host_cmdline:+ $host_cmdline}"

# acpi=off: the recipe kernel has no ACPI, and only without ACPI does
# microvm's firmware write an MP table; without one the guest sees no IO-APIC
# (kiln writes an MP table), and a virtio device's interrupt never arrives.
qemu_boot_machine=(-M microvm,x-option-roms=off,rtc=off,acpi=off,auto-kernel-cmdline=off)
# QEMU with one virtio-mmio device. Without option ROMs, microvm's own
# "auto-kernel-cmdline" does not reach a PVH kernel, so the device is named on
# the command line as kiln does: with ioapic2=off microvm has 8 transports at
# 0xfeb00000 + 0x200 * i on IRQ 5 + i, and the first device takes the last.
qemu_dev_machine=(-M microvm,x-option-roms=off,rtc=off,acpi=off,ioapic2=off,auto-kernel-cmdline=off)
qemu_dev_cmdline="virtio_mmio.device=512@0xfeb00e00:12"

# ---------------------------------------------------- 2a, 4, 6. boot to init
run_boot() {
    make_bench_initramfs
    local mem_bytes=$((guest_mem_mib << 20)) rep mon
    local extra="rdinit=/init bench_idle=1"
    note "boot section command line (kiln and QEMU): $kiln_cmdline $extra"
    log "boot to init, memory, idle CPU: $reps_boot repetitions (each boot takes tens of seconds here)"
    for rep in $(seq "$reps_boot"); do
        for mon in kiln qemu; do
            [ "$mon" = qemu ] && [ -z "$qemu" ] && continue
            local cmd=()
            case $mon in
                kiln) cmd=("$kiln" run --kernel "$vmlinux" --initrd "$work/bench-initramfs.cpio"
                           --mem "${guest_mem_mib}M" --cmdline "$extra") ;;
                qemu) cmd=("$qemu" "${qemu_boot_machine[@]}" "${qemu_base[@]}" -serial stdio
                           -m "${guest_mem_mib}M" -kernel "$vmlinux" -initrd "$work/bench-initramfs.cpio"
                           -append "$kiln_cmdline $extra") ;;
            esac
            local base="$work/boot-$mon-$rep"
            log "  boot $mon $rep/$reps_boot"
            brun -t "$boot_timeout" -o "$base.out" -e "$base.err" -m KILN-BENCH-INIT -k \
                 -s "$settle_secs" -i "$idle_secs" -g "$mem_bytes" -- "${cmd[@]}" ||
                { fail_note "boot: $mon: benchrun failed"; continue; }
            if [ "${R[marker]:-none}" = none ]; then
                fail_note "boot: $mon run $rep: no marker (see $base.out, $base.err)"; continue
            fi
            record boot_init_ms "$mon" "$(ms "${R[marker]}")"
            if [ "${R[overhead_kib]:-none}" != none ]; then
                record mem_overhead_kib "$mon" "${R[overhead_kib]}"
                note "memory ($mon run $rep): private $((R[private_kib])) KiB in all, $((R[guest_kib])) KiB in the guest RAM mapping of $((R[guest_map_kib])) KiB"
            else
                fail_note "memory: $mon run $rep: guest RAM mapping not found in smaps"
            fi
            if [ "${R[cpu_total_ms]:-none}" != none ]; then
                local scale
                scale=$(awk -v s="$idle_secs" 'BEGIN { print 10 / s }')
                record idle_cpu_ms "$mon" "$(awk -v v="${R[cpu_total_ms]}" -v k="$scale" 'BEGIN { printf "%.0f", v * k }')"
                record idle_cpu_other_ms "$mon" "$(awk -v v="${R[cpu_other_ms]}" -v k="$scale" 'BEGIN { printf "%.0f", v * k }')"
                note "idle CPU ($mon run $rep, ${idle_secs} s): total ${R[cpu_total_ms]} ms = vCPU threads ${R[cpu_vcpu_ms]} + KVM kernel threads ${R[cpu_kvm_kthread_ms]} + other threads ${R[cpu_other_ms]}"
            fi
        done
    done
}

# ------------------------------- boot path choices (issue 2): kiln only
# The same guest (bench initramfs, /init prints the marker and resets) booted
# with one choice changed at a time against kiln's default (PVH vmlinux,
# small uncompressed initramfs, quiet console). Variants are interleaved
# within each repetition so a change in host load hits all of them alike.
run_bootpath() {
    make_bench_initramfs
    make_bench_initramfs full
    gzip -9 -c "$work/bench-initramfs.cpio" > "$work/bench-initramfs.cpio.gz"
    note "bootpath: initramfs small $(stat -c %s "$work/bench-initramfs.cpio") bytes ($(find "$work/initramfs-bench" -type l | wc -l) links), gzip $(stat -c %s "$work/bench-initramfs.cpio.gz") bytes, full $(stat -c %s "$work/bench-initramfs-full.cpio") bytes ($(find "$work/initramfs-bench-full" -type l | wc -l) links); with rdinit=/init kiln adds nothing to them"
    local rep v
    local variants=(default nopvh bzimage gzip full verbose)
    log "boot path choices: ${#variants[@]} variants x $reps_bootpath repetitions"
    for rep in $(seq "$reps_bootpath"); do
        for v in "${variants[@]}"; do
            local kernel=$vmlinux initrd="$work/bench-initramfs.cpio" flags=()
            case $v in
                nopvh) flags=(--no-pvh) ;;
                bzimage) kernel=$bzimage ;;
                gzip) initrd="$work/bench-initramfs.cpio.gz" ;;
                full) initrd="$work/bench-initramfs-full.cpio" ;;
                verbose) flags=(-v) ;;
            esac
            [ -n "$kernel" ] || { fail_note "bootpath: no kernel for $v"; continue; }
            local base="$work/bootpath-$v-$rep"
            log "  bootpath $v $rep/$reps_bootpath"
            # kiln shows the guest console on stdout until its agent would take
            # over, and on stderr with -v: the shell merges the two so the
            # marker is seen either way.
            brun -t "$boot_timeout" -o "$base.out" -e "$base.err" -m KILN-BENCH-INIT -k -- \
                 sh -c 'exec "$@" 2>&1' sh "$kiln" run "${flags[@]}" --kernel "$kernel" \
                 --initrd "$initrd" --mem "${guest_mem_mib}M" --cmdline "rdinit=/init" ||
                { fail_note "bootpath: $v: benchrun failed"; continue; }
            if [ "${R[marker]:-none}" = none ]; then
                fail_note "bootpath: $v run $rep: no marker (see $base.out, $base.err)"; continue
            fi
            record "bootpath_${v}_ms" kiln "$(ms "${R[marker]}")"
        done
    done
}

# ------------------------------------------- 2b. first line of a command
run_command() {
    make_conventional_initramfs
    local rootfs="$root/target/guest/rootfs"
    if [ ! -d "$rootfs" ]; then
        # resources/setup.sh links one; without it, a busybox root of the same kind.
        rootfs="$work/rootfs"
        rm -rf "$rootfs"; mkdir -p "$rootfs/bin"
        cp "$busybox" "$rootfs/bin/busybox"
        local a
        for a in sh echo cat ls mkdir mount sleep true false dd; do ln -s busybox "$rootfs/bin/$a"; done
        note "command: target/guest/rootfs missing; kiln used a busybox root with 10 links"
    fi
    log "first line of a command: $reps_boot repetitions"
    local rep mon
    for rep in $(seq "$reps_boot"); do
        for mon in kiln qemu; do
            [ "$mon" = qemu ] && [ -z "$qemu" ] && continue
            local cmd=() kill_flag=() base="$work/command-$mon-$rep"
            case $mon in
                kiln) cmd=("$kiln" run --kernel "$vmlinux" --rootfs "$rootfs" -- echo hi) ;;
                qemu) cmd=("$qemu" -M microvm "${qemu_base[@]}" -serial stdio -m 256M
                           -kernel "$bzimage" -initrd "$work/conventional-initramfs.cpio.gz"
                           -append "console=ttyS0 reboot=k panic=-1${host_cmdline:+ $host_cmdline}")
                      kill_flag=(-k) ;;
            esac
            log "  command $mon $rep/$reps_boot"
            brun -t "$boot_timeout" -o "$base.out" -e "$base.err" -m hi "${kill_flag[@]}" -- "${cmd[@]}" ||
                { fail_note "command: $mon: benchrun failed"; continue; }
            if [ "${R[marker]:-none}" = none ]; then
                fail_note "command: $mon run $rep: no 'hi' line (see $base.out, $base.err)"; continue
            fi
            [ "$mon" = kiln ] && ! ok 0 && fail_note "command: kiln run $rep exited with ${R[status]:-signal ${R[signal]:-?}}"
            record command_first_line_ms "$mon" "$(ms "${R[marker]}")"
        done
    done
}

# ------------------------------------------------------------ 5. devices
# The kiln option syntax assumed here (--disk PATH, --net tap=NAME) is what
# the device branches were heading for when this was written; adjust if the
# options land differently.
run_disk() {
    if ! grep -q -- '--disk' <<< "$kiln_help"; then
        note "disk: not available (kiln run --help lists no --disk)"
        record_na disk_read_mbs; record_na disk_write_mbs
        return 0
    fi
    make_bench_initramfs
    local img="$work/disk.img" mib=64 reads=2000 rep mon
    [ "$quick" = 1 ] && { mib=16; reads=200; }
    # Written once with data, so reads are not of holes; the guest's write
    # pass then overwrites the first MIB MiB.
    dd if=/dev/urandom of="$img" bs=1M count="$((mib + 1))" status=none
    local extra="rdinit=/init bench_disk=$mib bench_randread=$reads"
    note "disk: raw image of $((mib + 1)) MiB on the host file system ($(df -T "$work" | awk 'NR == 2 { print $2 }')); host page cache for both monitors (kiln: buffered file I/O; QEMU: cache=writeback, aio=threads); guest dd with O_DIRECT, 1 MiB blocks; $reads random 4 KiB O_DIRECT reads"
    for rep in $(seq "$reps_boot"); do
        for mon in kiln qemu; do
            [ "$mon" = qemu ] && [ -z "$qemu" ] && continue
            local cmd=() base="$work/disk-$mon-$rep"
            case $mon in
                kiln) cmd=("$kiln" run --kernel "$vmlinux" --initrd "$work/bench-initramfs.cpio"
                           --mem "${guest_mem_mib}M" --disk "$img" --cmdline "$extra") ;;
                qemu) cmd=("$qemu" "${qemu_dev_machine[@]}" "${qemu_base[@]}" -serial stdio
                           -m "${guest_mem_mib}M" -kernel "$vmlinux" -initrd "$work/bench-initramfs.cpio"
                           -drive "file=$img,format=raw,if=none,id=d0,cache=writeback,aio=threads"
                           -device virtio-blk-device,drive=d0 -append "$kiln_cmdline $extra $qemu_dev_cmdline") ;;
            esac
            brun -t "$boot_timeout" -o "$base.out" -e "$base.err" -m KILN-BENCH-DONE -k -- "${cmd[@]}" ||
                { fail_note "disk: $mon: benchrun failed"; continue; }
            [ "${R[marker]:-none}" != none ] || { fail_note "disk: $mon run $rep: no result (see $base.out)"; continue; }
            # busybox time: "real<TAB>0m 1.23s", for dd count=0, the read, the write.
            local secs r w b
            secs=$(tr -d '\r' < "$base.out" | awk '/^real/ { m = $2; sub(/m$/, "", m); s = $3; sub(/s$/, "", s); print m * 60 + s }')
            b=$(sed -n 1p <<< "$secs"); r=$(sed -n 2p <<< "$secs"); w=$(sed -n 3p <<< "$secs")
            [ -n "$r" ] && record disk_read_mbs "$mon" "$(awk -v s="$r" -v b="$b" -v m="$mib" 'BEGIN { d = s - b; if (d <= 0) d = 0.01; printf "%.1f", m * 1.048576 / d }')"
            [ -n "$w" ] && record disk_write_mbs "$mon" "$(awk -v s="$w" -v b="$b" -v m="$mib" 'BEGIN { d = s - b; if (d <= 0) d = 0.01; printf "%.1f", m * 1.048576 / d }')"
            local rr
            rr=$(tr -d '\r' < "$base.out" | sed -n 's/^KILN-RANDREAD reads=\([0-9]*\) secs=\([0-9.]*\).*/\1 \2/p' | head -1)
            [ -n "$rr" ] && record disk_randread_iops "$mon" "$(awk -v r="$rr" 'BEGIN { split(r, a, " "); printf "%.0f", a[1] / a[2] }')"
        done
    done
}

run_net() {
    if ! grep -q -- '--net' <<< "$kiln_help"; then
        note "net: not available (kiln run --help lists no --net)"
        record_na net_ping_ms
        return 0
    fi
    command -v ip >/dev/null || { note "net: skipped (ip from iproute2 missing)"; record_na net_ping_ms; return 0; }
    make_bench_initramfs
    # Everything lives in a namespace made here: the TAP, its address, the
    # monitor. The guest pings the TAP's address (answered by the namespace's
    # own stack); nothing leaves the namespace.
    local ns="kilnbench$$" tap=kbtap0 rep mon
    ip netns add "$ns"
    trap 'ip netns del '"$ns"' 2>/dev/null || true' EXIT
    ip -n "$ns" link set lo up
    local extra="rdinit=/init bench_net=10.213.0.2/10.213.0.1"
    local count=20
    [ "$quick" = 1 ] && count=5
    extra="$extra bench_net_count=$count"
    for rep in $(seq "$reps_boot"); do
        for mon in kiln qemu; do
            [ "$mon" = qemu ] && [ -z "$qemu" ] && continue
            ip -n "$ns" tuntap add dev "$tap" mode tap
            ip -n "$ns" addr add 10.213.0.1/24 dev "$tap"
            ip -n "$ns" link set "$tap" up
            local cmd=() base="$work/net-$mon-$rep"
            case $mon in
                kiln) cmd=("$kiln" run --kernel "$vmlinux" --initrd "$work/bench-initramfs.cpio"
                           --mem "${guest_mem_mib}M" --net "tap=$tap" --cmdline "$extra") ;;
                qemu) cmd=("$qemu" "${qemu_dev_machine[@]}" "${qemu_base[@]}" -serial stdio
                           -m "${guest_mem_mib}M" -kernel "$vmlinux" -initrd "$work/bench-initramfs.cpio"
                           -netdev "tap,id=n0,ifname=$tap,script=no,downscript=no,vhost=off"
                           -device virtio-net-device,netdev=n0 -append "$kiln_cmdline $extra $qemu_dev_cmdline") ;;
            esac
            brun -t "$boot_timeout" -o "$base.out" -e "$base.err" -m KILN-BENCH-DONE -k -- \
                 ip netns exec "$ns" "${cmd[@]}" || fail_note "net: $mon: benchrun failed"
            ip -n "$ns" link del "$tap" 2>/dev/null || true
            [ "${R[marker]:-none}" != none ] || { fail_note "net: $mon run $rep: no result (see $base.out)"; continue; }
            # busybox ping: "round-trip min/avg/max = a/b/c ms"
            local avg
            avg=$(sed -n 's|.*round-trip min/avg/max = [0-9.]*/\([0-9.]*\)/.*|\1|p' "$base.out" | head -1)
            [ -n "$avg" ] && record net_ping_ms "$mon" "$avg"
        done
    done
    ip netns del "$ns" 2>/dev/null || true
    trap - EXIT
}

record_na() { printf '%s\tna\t\n' "$1" >> "$samples"; }

# ------------------------------------------------------------------- run all
started=$(date +%s)
wants exits && run_exits
wants startup && run_startup
wants boot && run_boot
wants bootpath && run_bootpath
wants command && run_command
wants disk && run_disk
wants net && run_net
elapsed=$(( $(date +%s) - started ))
load_end=$(cut -d' ' -f1-3 /proc/loadavg)

# ------------------------------------------------------------------- report
export run_date cpu_model cpu_count kvm_flavour kvm_detail kiln_rev kiln_build qemu_version \
       load_start load_end elapsed quick reps reps_boot reps_bootpath exit_n only
awk -f "$bench_dir/report.awk" -v json="$out_dir/BENCHMARKS.json" -v md="$out_dir/BENCHMARKS.md" \
    "$bench_dir/metrics.tsv" "$samples" "$notes"
cat "$bench_dir/notes.md" >> "$out_dir/BENCHMARKS.md"
log "wrote $out_dir/BENCHMARKS.md and $out_dir/BENCHMARKS.json in ${elapsed}s (logs: $work)"
