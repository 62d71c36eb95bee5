/* Guest-side helper for tests/vsock.rs (built with gcc -static into the test
 * rootfs; busybox has no vsock tool).
 *
 *   vsock-helper listen PORT       accept one connection on PORT
 *   vsock-helper connect CID PORT  connect to CID:PORT
 *
 * Then it serves commands from the peer, one per line:
 *   PING x         -> "PONG x\n"
 *   RECV n         read n bytes -> "SUM <fnv1a64 hex>\n"
 *   SEND n seed    write n pseudo-random bytes (xorshift64 from seed),
 *                  then "SUM <fnv1a64 hex>\n"
 *   BYE            close and exit 0
 * Exit status 1 on any error (printed to stderr).
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif
/* <linux/vm_sockets.h>: the timeval form (64-bit time_t). */
#define SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD 6

struct sockaddr_vm_compat {
    unsigned short svm_family;
    unsigned short svm_reserved1;
    unsigned int svm_port;
    unsigned int svm_cid;
    unsigned char svm_flags;
    unsigned char svm_zero[3];
};

static int fd = -1;
static unsigned char rbuf[65536];
static size_t rpos, rlen;

static void die(const char *what)
{
    fprintf(stderr, "vsock-helper: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int fill(void)
{
    ssize_t n;
    do {
        n = read(fd, rbuf, sizeof rbuf);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        die("read");
    rpos = 0;
    rlen = (size_t)n;
    return n > 0;
}

static int read_line(char *line, size_t cap)
{
    size_t n = 0;
    for (;;) {
        if (rpos == rlen && !fill())
            return 0;
        char c = (char)rbuf[rpos++];
        if (c == '\n')
            break;
        if (n + 1 < cap)
            line[n++] = c;
    }
    line[n] = 0;
    return 1;
}

static void write_all(const void *p, size_t len)
{
    const unsigned char *b = p;
    while (len) {
        ssize_t n = write(fd, b, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            die("write");
        b += n;
        len -= (size_t)n;
    }
}

static uint64_t fnv(uint64_t h, const unsigned char *p, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

#define FNV_INIT 0xcbf29ce484222325ULL

int main(int argc, char **argv)
{
    struct sockaddr_vm_compat addr;
    memset(&addr, 0, sizeof addr);
    addr.svm_family = AF_VSOCK;
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0)
        die("socket");
    if (argc == 3 && strcmp(argv[1], "listen") == 0) {
        addr.svm_cid = 0xffffffffU; /* VMADDR_CID_ANY */
        addr.svm_port = (unsigned)strtoul(argv[2], NULL, 10);
        if (bind(s, (struct sockaddr *)&addr, sizeof addr) < 0)
            die("bind");
        if (listen(s, 1) < 0)
            die("listen");
        printf("vsock-helper: listening on %u\n", addr.svm_port);
        fflush(stdout);
        fd = accept(s, NULL, NULL);
        if (fd < 0)
            die("accept");
    } else if (argc == 4 && strcmp(argv[1], "connect") == 0) {
        addr.svm_cid = (unsigned)strtoul(argv[2], NULL, 10);
        addr.svm_port = (unsigned)strtoul(argv[3], NULL, 10);
        /* Linux gives up on a connect after 2 s of guest time, which a
         * busy (emulating) host can take to answer: wait up to 2 minutes. */
        struct timeval patience = {.tv_sec = 120};
        if (setsockopt(s, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD, &patience,
                       sizeof patience) < 0)
            die("setsockopt(SO_VM_SOCKETS_CONNECT_TIMEOUT)");
        if (connect(s, (struct sockaddr *)&addr, sizeof addr) < 0)
            die("connect");
        fd = s;
    } else {
        fprintf(stderr, "usage: vsock-helper listen PORT | connect CID PORT\n");
        return 2;
    }

    char line[128];
    static unsigned char buf[65536];
    while (read_line(line, sizeof line)) {
        unsigned long long n, seed;
        char out[64];
        if (strncmp(line, "PING ", 5) == 0) {
            int len = snprintf(out, sizeof out, "PONG %s\n", line + 5);
            write_all(out, (size_t)len);
        } else if (sscanf(line, "RECV %llu", &n) == 1) {
            uint64_t h = FNV_INIT;
            while (n) {
                if (rpos == rlen && !fill()) {
                    errno = EPIPE;
                    die("RECV: early end of stream");
                }
                size_t k = rlen - rpos;
                if (k > n)
                    k = (size_t)n;
                h = fnv(h, rbuf + rpos, k);
                rpos += k;
                n -= k;
            }
            int len = snprintf(out, sizeof out, "SUM %016llx\n", (unsigned long long)h);
            write_all(out, (size_t)len);
        } else if (sscanf(line, "SEND %llu %llu", &n, &seed) == 2) {
            uint64_t h = FNV_INIT, x = seed ? seed : 1;
            while (n) {
                size_t k = n < sizeof buf ? (size_t)n : sizeof buf;
                for (size_t i = 0; i < k; i++) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    buf[i] = (unsigned char)x;
                }
                h = fnv(h, buf, k);
                write_all(buf, k);
                n -= k;
            }
            int len = snprintf(out, sizeof out, "SUM %016llx\n", (unsigned long long)h);
            write_all(out, (size_t)len);
        } else if (strcmp(line, "BYE") == 0) {
            close(fd);
            return 0;
        } else {
            fprintf(stderr, "vsock-helper: bad command '%s'\n", line);
            return 1;
        }
    }
    fprintf(stderr, "vsock-helper: peer closed before BYE\n");
    return 1;
}
