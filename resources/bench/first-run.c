/*
 * first-run.so: an LD_PRELOAD shim for resources/bench/benchrun. On the
 * first ioctl(KVM_RUN) of the process it writes CLOCK_MONOTONIC (seconds) to
 * the file named by BENCH_FIRST_RUN_FILE, so benchrun can time "process start
 * to first KVM_RUN" the same way for kiln, QEMU and kvm-floor. Every call is
 * then passed to libc's ioctl unchanged.
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

int ioctl(int fd, unsigned long request, ...)
{
	va_list ap;
	va_start(ap, request);
	void *arg = va_arg(ap, void *);
	va_end(ap);
	if (request == KVM_RUN && !__atomic_exchange_n(&seen, 1, __ATOMIC_SEQ_CST)) {
		struct timespec ts;
		clock_gettime(CLOCK_MONOTONIC, &ts);
		const char *path = getenv("BENCH_FIRST_RUN_FILE");
		if (path) {
			char buf[64];
			int n = snprintf(buf, sizeof(buf), "%lld.%09ld\n", (long long)ts.tv_sec, ts.tv_nsec);
			int out = open(path, O_WRONLY | O_TRUNC | O_CLOEXEC);
			if (out >= 0) {
				if (write(out, buf, n) != n) {
					/* Nothing to do: benchrun reports first_run=none. */
				}
				close(out);
			}
		}
	}
	if (!real_ioctl)
		real_ioctl = (int (*)(int, unsigned long, void *))dlsym(RTLD_NEXT, "ioctl");
	return real_ioctl(fd, request, arg);
}
