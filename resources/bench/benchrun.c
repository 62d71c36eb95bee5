/*
 * benchrun: runs a monitor (kiln, QEMU, kvm-floor) for resources/bench/run.sh
 * and measures it from outside, the same way for every monitor.
 *
 *   benchrun time [options] -- CMD [ARGS...]
 *     Runs CMD once (stdin /dev/null) and prints key=value lines:
 *       wall=S         fork to exit (or to the kill, with -k)
 *       cpu=S          user + system CPU time CMD used (wait4 rusage)
 *       minflt=N       minor page faults of CMD (wait4 rusage)
 *       status=N | signal=N | timeout=1
 *       marker=S       fork to the first stdout line equal to MARKER (-m)
 *       marker_cpu=S, marker_wait=S   at the marker: CPU time the process's
 *                      live threads have run, and the time they spent
 *                      runnable but waiting for a host CPU (run delay), each
 *                      summed from /proc/PID/task/TID/schedstat. On a shared
 *                      host marker - marker_wait is what load did not add.
 *       first_run=S    fork to the monitor's first KVM_RUN (-p SHIM)
 *       cpu_total_ms=, cpu_vcpu_ms=, cpu_kvm_kthread_ms=, cpu_other_ms=   (-i)
 *                      CPU time used in the idle window: whole process, its
 *                      vCPU threads (named kiln-vcpuN or "CPU N/KVM": QEMU
 *                      needs -name debug-threads=on), KVM's kernel threads
 *                      among its tasks (kvm-*), its other threads (each from
 *                      /proc/PID/task/TID/stat, so they need not add up to
 *                      the total exactly: clock-tick rounding)
 *       private_kib=, guest_kib=, overhead_kib=, guest_map_kib=   (-g) from
 *                      /proc/PID/smaps: Private_* summed over all mappings,
 *                      over the guest RAM mapping, and their difference
 *     Options:
 *       -o FILE    copy CMD's stdout here (default: discarded)
 *       -e FILE    CMD's stderr goes here (default: /dev/null)
 *       -m MARKER  watch stdout for a line equal to MARKER (a trailing \r is
 *                  ignored)
 *       -k         kill CMD (SIGKILL) once the marker (and -i/-g work) is done
 *       -T SIG     send signal number SIG once the marker is seen and print
 *                  stop=S, the time from that signal to CMD's exit
 *       -s SECS    after the marker, wait SECS before sampling (default 2)
 *       -i SECS    after the marker, measure CPU time over SECS
 *       -g BYTES   after the marker, read smaps; the guest RAM mapping is the
 *                  one whose size is BYTES (the largest Rss if several),
 *                  else the largest mapping within BYTES + 4 MiB
 *       -p SHIM    LD_PRELOAD SHIM (first-run.so) to time the first KVM_RUN
 *       -t SECS    give up after SECS (kill, timeout=1); default 600
 *
 *   benchrun rate -j JOBS -d SECS [-x STATUS] -- CMD [ARGS...]
 *     JOBS workers each run CMD back to back (output discarded) until SECS
 *     have passed; prints runs=, failed=, secs=, per_sec= (completed runs
 *     with exit status STATUS, default 0, per second of wall time).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
	fprintf(stderr, "benchrun: %s: %s\n", what, strerror(errno));
	exit(2);
}

static void usage(void)
{
	fprintf(stderr, "usage: benchrun time [-o FILE] [-e FILE] [-m MARKER] [-k] [-s SECS] "
			"[-i SECS] [-g BYTES] [-p SHIM] [-t SECS] -- CMD...\n"
			"       benchrun rate -j JOBS -d SECS [-x STATUS] -- CMD...\n");
	exit(2);
}

/* ---- /proc readers ---- */

/* utime + stime (clock ticks) of /proc/.../stat at PATH; comm into COMM. */
static long long stat_ticks(const char *path, char *comm, size_t comm_len)
{
	char buf[1024];
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return -1;
	buf[n] = 0;
	char *open_paren = strchr(buf, '(');
	char *close_paren = strrchr(buf, ')');
	if (!open_paren || !close_paren)
		return -1;
	if (comm) {
		size_t len = close_paren - open_paren - 1;
		if (len >= comm_len)
			len = comm_len - 1;
		memcpy(comm, open_paren + 1, len);
		comm[len] = 0;
	}
	/* Fields after ")": 3 state ... 14 utime 15 stime. */
	char *p = close_paren + 2;
	long long utime = 0, stime = 0;
	for (int field = 3; field <= 15 && p; field++) {
		if (field == 14)
			utime = strtoll(p, NULL, 10);
		if (field == 15)
			stime = strtoll(p, NULL, 10);
		p = strchr(p, ' ');
		if (p)
			p++;
	}
	return utime + stime;
}

static int is_vcpu_thread(const char *comm)
{
	return strncmp(comm, "kiln-vcpu", 9) == 0 || strstr(comm, "/KVM") != NULL;
}

/* KVM's own kernel threads that show up among the process's tasks
 * (kvm-nx-lpage-recovery): kernel work, neither vCPU nor monitor. */
static int is_kvm_kthread(const char *comm)
{
	return strncmp(comm, "kvm-", 4) == 0;
}

/* CPU ticks of the whole process, and of its live threads by kind: vCPU
 * threads, KVM kthreads, the rest. */
static void cpu_sample(pid_t pid, long long *total, long long *vcpu, long long *kthread,
		       long long *other)
{
	char path[64];
	snprintf(path, sizeof(path), "/proc/%d/stat", pid);
	*total = stat_ticks(path, NULL, 0);
	*vcpu = 0;
	*kthread = 0;
	*other = 0;
	snprintf(path, sizeof(path), "/proc/%d/task", pid);
	DIR *dir = opendir(path);
	if (!dir)
		return;
	struct dirent *de;
	while ((de = readdir(dir))) {
		if (de->d_name[0] == '.')
			continue;
		char tpath[320], comm[64];
		snprintf(tpath, sizeof(tpath), "/proc/%d/task/%s/stat", pid, de->d_name);
		long long t = stat_ticks(tpath, comm, sizeof(comm));
		if (t >= 0 && is_vcpu_thread(comm))
			*vcpu += t;
		else if (t >= 0 && is_kvm_kthread(comm))
			*kthread += t;
		else if (t >= 0)
			*other += t;
	}
	closedir(dir);
}

/* Nanoseconds run and waited (runnable, not running) by the live threads
 * of PID (/proc/PID/task/TID/schedstat: run time, run delay, slices);
 * -1 when unreadable. */
static void schedstat_sample(pid_t pid, long long *run_ns, long long *wait_ns)
{
	char path[64];
	*run_ns = -1;
	*wait_ns = -1;
	snprintf(path, sizeof(path), "/proc/%d/task", pid);
	DIR *dir = opendir(path);
	if (!dir)
		return;
	long long run = 0, wait = 0;
	int seen = 0;
	struct dirent *de;
	while ((de = readdir(dir))) {
		if (de->d_name[0] == '.')
			continue;
		char tpath[320];
		snprintf(tpath, sizeof(tpath), "/proc/%d/task/%s/schedstat", pid, de->d_name);
		FILE *f = fopen(tpath, "re");
		if (!f)
			continue;
		long long r, w;
		if (fscanf(f, "%lld %lld", &r, &w) == 2) {
			run += r;
			wait += w;
			seen = 1;
		}
		fclose(f);
	}
	closedir(dir);
	if (seen) {
		*run_ns = run;
		*wait_ns = wait;
	}
}

struct mapping {
	long long size_kib, rss_kib, private_kib;
};

/* Private_* (kB) of every mapping, and of the guest RAM mapping. */
static int smaps_sample(pid_t pid, long long guest_bytes, long long *private_kib,
			long long *guest_kib, long long *guest_map_kib)
{
	char path[64];
	snprintf(path, sizeof(path), "/proc/%d/smaps", pid);
	FILE *f = fopen(path, "re");
	if (!f)
		return -1;
	long long want_kib = guest_bytes / 1024;
	struct mapping cur = { 0 }, best = { -1, -1, 0 }, near = { -1, -1, 0 };
	int have = 0;
	char line[512];
	*private_kib = 0;
	for (;;) {
		char *ok = fgets(line, sizeof(line), f);
		/* A header line ("start-end perms ...") or EOF closes a mapping. */
		/* Field lines start with "Name:"; header lines with "start-end ". */
		size_t tok = ok ? strcspn(line, " ") : 0;
		int header = ok && tok > 0 && line[tok - 1] != ':';
		if (!ok || header) {
			if (have) {
				*private_kib += cur.private_kib;
				if (cur.size_kib == want_kib && cur.rss_kib > best.rss_kib)
					best = cur;
				else if (cur.size_kib > want_kib && cur.size_kib <= want_kib + 4096 &&
					 cur.size_kib > near.size_kib)
					near = cur;
			}
			if (!ok)
				break;
			memset(&cur, 0, sizeof(cur));
			have = 1;
			continue;
		}
		long long v;
		if (sscanf(line, "Size: %lld kB", &v) == 1)
			cur.size_kib = v;
		else if (sscanf(line, "Rss: %lld kB", &v) == 1)
			cur.rss_kib = v;
		else if (sscanf(line, "Private_Clean: %lld kB", &v) == 1 ||
			 sscanf(line, "Private_Dirty: %lld kB", &v) == 1 ||
			 sscanf(line, "Private_Hugetlb: %lld kB", &v) == 1)
			cur.private_kib += v;
	}
	fclose(f);
	if (best.size_kib < 0)
		best = near;
	if (best.size_kib < 0)
		return -1;
	*guest_kib = best.private_kib;
	*guest_map_kib = best.size_kib;
	return 0;
}

/* ---- time ---- */

struct line_watch {
	const char *marker;
	char buf[4096];
	size_t len;
	int found;
};

/* Feeds stdout bytes; true once a whole line equals the marker. */
static int watch_feed(struct line_watch *w, const char *data, size_t n)
{
	for (size_t i = 0; i < n && !w->found; i++) {
		char c = data[i];
		if (c == '\n') {
			size_t len = w->len;
			if (len > 0 && w->buf[len - 1] == '\r')
				len--;
			if (len == strlen(w->marker) && memcmp(w->buf, w->marker, len) == 0)
				w->found = 1;
			w->len = 0;
		} else if (w->len < sizeof(w->buf)) {
			w->buf[w->len++] = c;
		}
	}
	return w->found;
}

static double read_first_run(const char *path)
{
	FILE *f = fopen(path, "re");
	double t = -1;
	if (f) {
		if (fscanf(f, "%lf", &t) != 1)
			t = -1;
		fclose(f);
	}
	return t;
}

static int cmd_time(int argc, char **argv)
{
	const char *out_path = NULL, *err_path = "/dev/null", *marker = NULL, *shim = NULL;
	double settle = 2, idle = -1, timeout = 600;
	long long guest_bytes = -1;
	int kill_after = 0, stop_sig = 0, opt;
	while ((opt = getopt(argc, argv, "+o:e:m:kT:s:i:g:p:t:")) != -1) {
		switch (opt) {
		case 'o': out_path = optarg; break;
		case 'e': err_path = optarg; break;
		case 'm': marker = optarg; break;
		case 'k': kill_after = 1; break;
		case 'T': stop_sig = atoi(optarg); break;
		case 's': settle = atof(optarg); break;
		case 'i': idle = atof(optarg); break;
		case 'g': guest_bytes = atoll(optarg); break;
		case 'p': shim = optarg; break;
		case 't': timeout = atof(optarg); break;
		default: usage();
		}
	}
	if (optind >= argc)
		usage();
	char **cmd = argv + optind;

	char first_run_file[] = "/tmp/benchrun-first-run.XXXXXX";
	if (shim) {
		int fd = mkstemp(first_run_file);
		if (fd < 0)
			die("mkstemp");
		close(fd);
		setenv("LD_PRELOAD", shim, 1);
		setenv("BENCH_FIRST_RUN_FILE", first_run_file, 1);
	}

	FILE *out = NULL;
	if (out_path && !(out = fopen(out_path, "we")))
		die(out_path);
	int pipefd[2];
	if (pipe2(pipefd, O_CLOEXEC) < 0)
		die("pipe");
	int err_fd = open(err_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (err_fd < 0)
		die(err_path);

	posix_spawn_file_actions_t fa;
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
	posix_spawn_file_actions_adddup2(&fa, pipefd[1], 1);
	posix_spawn_file_actions_adddup2(&fa, err_fd, 2);
	pid_t pid;
	double t0 = now();
	int rc = posix_spawnp(&pid, cmd[0], &fa, NULL, cmd, environ);
	if (rc != 0) {
		errno = rc;
		die(cmd[0]);
	}
	close(pipefd[1]);
	close(err_fd);
	if (shim) {
		unsetenv("LD_PRELOAD");
		unsetenv("BENCH_FIRST_RUN_FILE");
	}

	struct line_watch watch = { .marker = marker };
	double t_marker = -1, deadline = t0 + timeout;
	long long marker_run_ns = -1, marker_wait_ns = -1;
	int eof = 0, timed_out = 0, status = 0;
	/* Phase 1: until the marker (or EOF without a marker). */
	while (!eof && !(marker && watch.found)) {
		double left = deadline - now();
		if (left <= 0) {
			timed_out = 1;
			break;
		}
		struct pollfd pfd = { .fd = pipefd[0], .events = POLLIN };
		int r = poll(&pfd, 1, left * 1000 + 1);
		if (r < 0 && errno != EINTR)
			die("poll");
		if (r <= 0)
			continue;
		char buf[4096];
		ssize_t n = read(pipefd[0], buf, sizeof(buf));
		if (n <= 0) {
			eof = 1;
			break;
		}
		if (out)
			fwrite(buf, 1, n, out);
		if (marker && watch_feed(&watch, buf, n)) {
			t_marker = now();
			schedstat_sample(pid, &marker_run_ns, &marker_wait_ns);
		}
	}

	long long cpu0_total = 0, cpu0_vcpu = 0, cpu0_kthread = 0, cpu0_other = 0;
	long long cpu1_total = 0, cpu1_vcpu = 0, cpu1_kthread = 0, cpu1_other = 0;
	long long priv = -1, guest = -1, guest_map = -1;
	int idle_ok = 0;
	if (t_marker >= 0 && (idle >= 0 || guest_bytes >= 0)) {
		/* Keep draining stdout while waiting, so the guest never blocks. */
		double phases[2] = { settle, idle > 0 ? idle : 0 };
		for (int ph = 0; ph < 2; ph++) {
			if (ph == 1 && idle >= 0) {
				cpu_sample(pid, &cpu0_total, &cpu0_vcpu, &cpu0_kthread, &cpu0_other);
			}
			double end = now() + phases[ph];
			while (now() < end) {
				struct pollfd pfd = { .fd = pipefd[0], .events = eof ? 0 : POLLIN };
				int r = poll(&pfd, 1, (end - now()) * 1000 + 1);
				if (r > 0 && !eof) {
					char buf[4096];
					ssize_t n = read(pipefd[0], buf, sizeof(buf));
					if (n <= 0)
						eof = 1;
					else if (out)
						fwrite(buf, 1, n, out);
				}
			}
		}
		if (idle >= 0) {
			cpu_sample(pid, &cpu1_total, &cpu1_vcpu, &cpu1_kthread, &cpu1_other);
			idle_ok = cpu0_total >= 0 && cpu1_total >= 0;
		}
		if (guest_bytes >= 0 && smaps_sample(pid, guest_bytes, &priv, &guest, &guest_map) < 0)
			priv = -1;
	}

	double t_end = 0, t_signal = -1;
	if (stop_sig > 0 && t_marker >= 0 && !timed_out) {
		t_signal = now();
		kill(pid, stop_sig);
	}
	if (timed_out || (kill_after && t_marker >= 0)) {
		t_end = now();
		kill(pid, SIGKILL);
	}
	/* Drain the rest of the output, then reap. */
	while (!eof) {
		double left = deadline - now();
		if (left <= 0 && !timed_out) {
			timed_out = 1;
			kill(pid, SIGKILL);
			left = 5;
		}
		struct pollfd pfd = { .fd = pipefd[0], .events = POLLIN };
		int r = poll(&pfd, 1, left * 1000 + 1);
		if (r <= 0)
			continue;
		char buf[4096];
		ssize_t n = read(pipefd[0], buf, sizeof(buf));
		if (n <= 0)
			break;
		if (out)
			fwrite(buf, 1, n, out);
	}
	struct rusage ru;
	while (wait4(pid, &status, 0, &ru) < 0) {
		if (errno != EINTR)
			die("wait4");
	}
	if (!(timed_out || (kill_after && t_marker >= 0)))
		t_end = now();
	if (out)
		fclose(out);

	printf("wall=%.6f\n", t_end - t0);
	if (t_signal >= 0)
		printf("stop=%.6f\n", t_end - t_signal);
	printf("cpu=%.6f\n", ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
				      ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6);
	printf("minflt=%ld\n", ru.ru_minflt);
	if (timed_out)
		printf("timeout=1\n");
	else if (WIFEXITED(status))
		printf("status=%d\n", WEXITSTATUS(status));
	else if (WIFSIGNALED(status))
		printf("signal=%d\n", WTERMSIG(status));
	if (marker) {
		if (t_marker >= 0) {
			printf("marker=%.6f\n", t_marker - t0);
			if (marker_run_ns >= 0)
				printf("marker_cpu=%.6f\nmarker_wait=%.6f\n", marker_run_ns / 1e9,
				       marker_wait_ns / 1e9);
		} else
			printf("marker=none\n");
	}
	if (shim) {
		double fr = read_first_run(first_run_file);
		if (fr > 0)
			printf("first_run=%.6f\n", fr - t0);
		else
			printf("first_run=none\n");
		unlink(first_run_file);
	}
	if (idle >= 0) {
		if (idle_ok) {
			double ms_per_tick = 1000.0 / sysconf(_SC_CLK_TCK);
			long long total = cpu1_total - cpu0_total, vcpu = cpu1_vcpu - cpu0_vcpu;
			long long kthread = cpu1_kthread - cpu0_kthread;
			long long other = cpu1_other - cpu0_other;
			printf("cpu_total_ms=%.0f\ncpu_vcpu_ms=%.0f\ncpu_kvm_kthread_ms=%.0f\n"
			       "cpu_other_ms=%.0f\n",
			       total * ms_per_tick, vcpu * ms_per_tick, kthread * ms_per_tick,
			       other * ms_per_tick);
		} else {
			printf("cpu_total_ms=none\n");
		}
	}
	if (guest_bytes >= 0) {
		if (priv >= 0)
			printf("private_kib=%lld\nguest_kib=%lld\noverhead_kib=%lld\nguest_map_kib=%lld\n",
			       priv, guest, priv - guest, guest_map);
		else
			printf("private_kib=none\n");
	}
	return 0;
}

/* ---- rate ---- */

struct worker {
	char **cmd;
	double deadline;
	int expect;
	long runs, failed;
};

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	posix_spawn_file_actions_t fa;
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
	posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
	posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
	while (now() < w->deadline) {
		pid_t pid;
		int status;
		if (posix_spawnp(&pid, w->cmd[0], &fa, NULL, w->cmd, environ) != 0) {
			w->failed++;
			break;
		}
		while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
			;
		if (WIFEXITED(status) && WEXITSTATUS(status) == w->expect)
			w->runs++;
		else
			w->failed++;
	}
	return NULL;
}

static int cmd_rate(int argc, char **argv)
{
	int jobs = 1, expect = 0, opt;
	double secs = 3;
	while ((opt = getopt(argc, argv, "+j:d:x:")) != -1) {
		switch (opt) {
		case 'j': jobs = atoi(optarg); break;
		case 'd': secs = atof(optarg); break;
		case 'x': expect = atoi(optarg); break;
		default: usage();
		}
	}
	if (optind >= argc || jobs < 1 || jobs > 64)
		usage();
	struct worker w[64];
	pthread_t th[64];
	double t0 = now();
	for (int i = 0; i < jobs; i++) {
		w[i] = (struct worker){ .cmd = argv + optind, .deadline = t0 + secs, .expect = expect };
		if (pthread_create(&th[i], NULL, worker_main, &w[i]) != 0)
			die("pthread_create");
	}
	long runs = 0, failed = 0;
	for (int i = 0; i < jobs; i++) {
		pthread_join(th[i], NULL);
		runs += w[i].runs;
		failed += w[i].failed;
	}
	double elapsed = now() - t0;
	printf("runs=%ld\nfailed=%ld\nsecs=%.3f\nper_sec=%.2f\n", runs, failed, elapsed,
	       runs / elapsed);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 2)
		usage();
	if (strcmp(argv[1], "time") == 0)
		return cmd_time(argc - 1, argv + 1);
	if (strcmp(argv[1], "rate") == 0)
		return cmd_rate(argc - 1, argv + 1);
	usage();
	return 2;
}
