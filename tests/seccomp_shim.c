/*
 * seccomp_shim.so: an LD_PRELOAD shim for tests/seccomp.rs that makes one
 * of kiln's filtered threads do what a compromised one would: open an
 * AF_INET socket, a call on no thread's list.
 *
 *   SECCOMP_SHIM_AT=vcpu   at the first ioctl(KVM_RUN) (on kiln-vcpu0,
 *                          filtered, before the guest's first instruction)
 *   SECCOMP_SHIM_AT=vmm    at the first epoll_wait (kiln-vmm's event loop,
 *                          filtered: its list allows AF_UNIX sockets only)
 *
 * With the filters on, kiln dies by SIGSYS in that call. When the call
 * returns (filters off or in log mode), the shim writes
 * "seccomp-shim: socket returned N" to stderr and the run goes on.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <linux/kvm.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

static int done;
static int (*real_ioctl)(int, unsigned long, void *);
static int (*real_epoll_wait)(int, struct epoll_event *, int, int);

/* Resolved at load, before any filter: dlsym on a filtered thread could
 * make calls of its own. */
__attribute__((constructor)) static void resolve(void)
{
	real_ioctl = (int (*)(int, unsigned long, void *))dlsym(RTLD_NEXT, "ioctl");
	real_epoll_wait =
		(int (*)(int, struct epoll_event *, int, int))dlsym(RTLD_NEXT, "epoll_wait");
}

static void forbidden_call(const char *at)
{
	const char *want = getenv("SECCOMP_SHIM_AT");
	if (!want || strcmp(want, at) != 0 || __atomic_exchange_n(&done, 1, __ATOMIC_SEQ_CST))
		return;
	/* The type and flags kiln's own (AF_UNIX) sockets have: only the
	 * family is off the VM thread's list. */
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	char line[64];
	int n = snprintf(line, sizeof(line), "seccomp-shim: socket returned %d\n", fd);
	(void)!write(2, line, (size_t)n);
}

int ioctl(int fd, unsigned long request, ...)
{
	va_list ap;
	va_start(ap, request);
	void *arg = va_arg(ap, void *);
	va_end(ap);
	if (request == KVM_RUN)
		forbidden_call("vcpu");
	return real_ioctl(fd, request, arg);
}

int epoll_wait(int epfd, struct epoll_event *events, int maxevents, int timeout)
{
	forbidden_call("vmm");
	return real_epoll_wait(epfd, events, maxevents, timeout);
}
