/*
 * first-run.so: an LD_PRELOAD shim for resources/bench: it watches a
 * monitor's KVM calls up to its first ioctl(KVM_RUN). Every call is passed to
 * libc's ioctl unchanged, except the first KVM_RUN with BENCH_STOP_AT_FIRST_RUN.
 *
 *   BENCH_FIRST_RUN_FILE=PATH   write CLOCK_MONOTONIC (seconds) at the first
 *                               KVM_RUN (benchrun times "process start to first
 *                               KVM_RUN" the same way for kiln, QEMU, kvm-floor)
 *   BENCH_CPUID_FILE=PATH       write each KVM_SET_CPUID2 table (the last one
 *                               wins), one entry a line: "FUNCTION.INDEX eax=..
 *                               ebx=.. ecx=.. edx=.." in hex
 *   BENCH_STOP_AT_FIRST_RUN=1   end the process (status 0) at the first
 *                               KVM_RUN, before any guest instruction runs:
 *                               the VM is built exactly as for a run, not run
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int (*real_ioctl)(int, unsigned long, void *);
static int seen;
/* BENCH_FIRST_RUN_FILE, opened at load: the first KVM_RUN comes from a
 * vCPU thread whose seccomp filter (kiln's) allows write(2) but not open(2). */
static int first_run_fd = -1;

/* BENCH_CPUID_FILE, opened at load too: kiln builds its VM inside its jail,
 * where the path is not there. */
static int cpuid_fd = -1;

/* Replaces the file's contents with the buffer; errors are silent: benchrun
 * reports first_run=none, run.sh a missing CPUID table. */
static void rewrite(int out, const char *buf, size_t len)
{
	if (out < 0 || ftruncate(out, 0) != 0)
		return;
	off_t at = 0;
	while (len > 0) {
		ssize_t n = pwrite(out, buf, len, at);
		if (n <= 0)
			break;
		buf += n;
		at += n;
		len -= (size_t)n;
	}
}

__attribute__((constructor)) static void open_files(void)
{
	const char *path = getenv("BENCH_FIRST_RUN_FILE");
	if (path)
		first_run_fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	path = getenv("BENCH_CPUID_FILE");
	if (path)
		cpuid_fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
}

static void dump_cpuid(const struct kvm_cpuid2 *cpuid)
{
	if (cpuid_fd < 0 || !cpuid)
		return;
	/* One line is at most 80 bytes; KVM allows 256 entries. */
	static char buf[256 * 96];
	size_t len = 0;
	for (unsigned i = 0; i < cpuid->nent && i < 256; i++) {
		const struct kvm_cpuid_entry2 *e = &cpuid->entries[i];
		len += (size_t)snprintf(buf + len, sizeof(buf) - len,
					"%#x.%u eax=%#x ebx=%#x ecx=%#x edx=%#x\n", e->function, e->index,
					e->eax, e->ebx, e->ecx, e->edx);
	}
	rewrite(cpuid_fd, buf, len);
}

int ioctl(int fd, unsigned long request, ...)
{
	va_list ap;
	va_start(ap, request);
	void *arg = va_arg(ap, void *);
	va_end(ap);
	if (request == KVM_SET_CPUID2)
		dump_cpuid(arg);
	if (request == KVM_RUN && !__atomic_exchange_n(&seen, 1, __ATOMIC_SEQ_CST)) {
		struct timespec ts;
		clock_gettime(CLOCK_MONOTONIC, &ts);
		if (first_run_fd >= 0) {
			char buf[64];
			int n = snprintf(buf, sizeof(buf), "%lld.%09ld\n", (long long)ts.tv_sec, ts.tv_nsec);
			/* One short line to a regular file: written whole or not at all. */
			(void)!write(first_run_fd, buf, (size_t)n);
		}
		const char *stop = getenv("BENCH_STOP_AT_FIRST_RUN");
		if (stop && strcmp(stop, "1") == 0)
			_exit(0);
	}
	if (!real_ioctl)
		real_ioctl = (int (*)(int, unsigned long, void *))dlsym(RTLD_NEXT, "ioctl");
	return real_ioctl(fd, request, arg);
}
