#!/bin/sh
# /init of the benchmark initramfs (resources/bench/run.sh): every monitor
# boots the same vmlinux with this initramfs and the same command line.
# Unknown kernel parameters arrive as environment variables:
#   bench_idle=1        stay idle (sleep) after the marker
#   bench_disk=MIB      time reading and writing MIB MiB of /dev/vda (O_DIRECT)
#   bench_randread=N    then N random 4 KiB O_DIRECT reads of /dev/vda
#   bench_net=ME/PEER   configure eth0 as ME/24 and ping PEER
#   bench_net_count=N   pings to send (default 20)
#   bench_fs=1          mount the virtio-fs share the kiln.share= word names
#                       (kiln's own word, which QEMU's guest gets too), time a
#                       read of its file big and a find + stat over its tree/
#   bench_tick=1        print KILN-BENCH-TICK every 50 ms, from the shell
#                       itself (no fork): the snapshot row's QEMU guest, whose
#                       first line after a restore is the time to resume
# Without any of them, reset at once (reboot=k: through the i8042).
echo KILN-BENCH-INIT
if [ -n "$bench_disk" ]; then
    mount -t devtmpfs dev /dev
    # busybox `time` prints "real 0mS.SSs"; dd's own fork+exec is timed by
    # the count=0 run and subtracted by the harness.
    time dd if=/dev/vda of=/dev/null bs=1M count=0
    time dd if=/dev/vda of=/dev/null bs=1M count="$bench_disk" iflag=direct
    time dd if=/dev/zero of=/dev/vda bs=1M count="$bench_disk" oflag=direct conv=fsync
    [ -n "$bench_randread" ] && /bin/randread /dev/vda "$bench_randread"
    echo KILN-BENCH-DONE
fi
if [ -n "$bench_net" ]; then
    ifconfig eth0 "${bench_net%/*}" netmask 255.255.255.0 up
    ping -c "${bench_net_count:-20}" "${bench_net#*/}"
    echo KILN-BENCH-DONE
fi
if [ -n "$bench_fs" ]; then
    # kiln.share=TAG,MODE,PATH, as kiln's init reads it (the shell's own
    # read: no process of its own). Applets through busybox itself: the
    # initramfs keeps the few links the other rows have.
    mount -t proc proc /proc
    read -r cmdline < /proc/cmdline
    for word in $cmdline; do
        case $word in
            kiln.share=*) share=${word#kiln.share=}; tag=${share%%,*}; path=${share#*,*,} ;;
        esac
    done
    busybox mkdir -p "$path"
    mount -t virtiofs "$tag" "$path"
    # As in the disk row: the harness subtracts dd's fork+exec (count=0).
    time dd if="$path/big" of=/dev/null bs=1M count=0
    time dd if="$path/big" of=/dev/null bs=1M
    time busybox find "$path/tree" -exec busybox stat {} + >/dev/null
    echo KILN-BENCH-DONE
fi
if [ -n "$bench_tick" ]; then
    # The console gives no input: each read waits out its 50 ms timer.
    while :; do
        read -r -t 0.05 _
        echo KILN-BENCH-TICK
    done
fi
if [ -n "$bench_idle" ]; then
    exec sleep 1000000
fi
exec reboot -f
