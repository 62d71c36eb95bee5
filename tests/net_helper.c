/* Guest side of tests/net.rs, built with `gcc -static` into the guest root.
 *
 *   net-helper recv HOST PORT       connect, read to EOF in 1 MiB reads
 *   net-helper send HOST PORT SIZE  connect, send SIZE bytes of the test
 *                                   pattern, half-close, wait for EOF
 *
 * Both print `bytes=N` and `sha256=HEX` lines. Large reads and writes keep the number
 * of system calls (each one slow in an emulated guest kernel) small; the
 * SHA-256 runs in user space, which is native speed.
 */
#include <arpa/inet.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define CHUNK (1 << 20)

struct sha256 {
    uint32_t h[8];
    uint64_t len;
    uint8_t buf[64];
    size_t n;
};

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static uint32_t ror(uint32_t x, int r) { return (x >> r) | (x << (32 - r)); }

static void block(struct sha256 *s, const uint8_t *p)
{
    uint32_t w[64], a, b, c, d, e, f, g, h;
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ror(w[i - 15], 7) ^ ror(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ror(w[i - 2], 17) ^ ror(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = s->h[0]; b = s->h[1]; c = s->h[2]; d = s->h[3];
    e = s->h[4]; f = s->h[5]; g = s->h[6]; h = s->h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = h + (ror(e, 6) ^ ror(e, 11) ^ ror(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        uint32_t t2 = (ror(a, 2) ^ ror(a, 13) ^ ror(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    s->h[0] += a; s->h[1] += b; s->h[2] += c; s->h[3] += d;
    s->h[4] += e; s->h[5] += f; s->h[6] += g; s->h[7] += h;
}

static void sha_init(struct sha256 *s)
{
    static const uint32_t init[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                     0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(s->h, init, sizeof(init));
    s->len = 0;
    s->n = 0;
}

static void sha_update(struct sha256 *s, const uint8_t *p, size_t len)
{
    s->len += len;
    while (len > 0) {
        if (s->n == 0 && len >= 64) {
            block(s, p);
            p += 64;
            len -= 64;
            continue;
        }
        size_t take = 64 - s->n < len ? 64 - s->n : len;
        memcpy(s->buf + s->n, p, take);
        s->n += take;
        p += take;
        len -= take;
        if (s->n == 64) {
            block(s, s->buf);
            s->n = 0;
        }
    }
}

static void sha_final(struct sha256 *s, char hex[65])
{
    uint64_t bits = s->len * 8;
    uint8_t pad = 0x80, zero = 0, lenbuf[8];
    sha_update(s, &pad, 1);
    while (s->n != 56)
        sha_update(s, &zero, 1);
    for (int i = 0; i < 8; i++)
        lenbuf[i] = (uint8_t)(bits >> (56 - 8 * i));
    sha_update(s, lenbuf, 8);
    for (int i = 0; i < 8; i++)
        sprintf(hex + 8 * i, "%08x", s->h[i]);
}

/* The same xorshift64* stream as random_bytes() in tests/net.rs. */
static void pattern(uint8_t *out, size_t len, uint64_t *x)
{
    for (size_t i = 0; i < len; i += 8) {
        *x ^= *x >> 12;
        *x ^= *x << 25;
        *x ^= *x >> 27;
        uint64_t v = *x * 0x2545f4914f6cdd1dULL;
        for (int j = 0; j < 8 && i + j < len; j++)
            out[i + j] = (uint8_t)(v >> (8 * j));
    }
}

static int dial(const char *host, const char *port)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(port))};
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
        fprintf(stderr, "net-helper: bad address %s\n", host);
        exit(2);
    }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
        perror("net-helper: connect");
        exit(1);
    }
    return fd;
}

int main(int argc, char **argv)
{
    static uint8_t buf[CHUNK];
    struct sha256 s;
    char hex[65];
    uint64_t total = 0;
    sha_init(&s);
    if (argc == 4 && strcmp(argv[1], "recv") == 0) {
        int fd = dial(argv[2], argv[3]);
        shutdown(fd, SHUT_WR);
        for (;;) {
            ssize_t n = read(fd, buf, sizeof(buf));
            if (n < 0) {
                perror("net-helper: read");
                return 1;
            }
            if (n == 0)
                break;
            sha_update(&s, buf, (size_t)n);
            total += (uint64_t)n;
        }
    } else if (argc == 5 && strcmp(argv[1], "send") == 0) {
        uint64_t size = strtoull(argv[4], NULL, 0), x = 0x0123456789abcdefULL;
        int fd = dial(argv[2], argv[3]);
        while (total < size) {
            size_t n = size - total < CHUNK ? (size_t)(size - total) : CHUNK;
            pattern(buf, n, &x);
            sha_update(&s, buf, n);
            for (size_t off = 0; off < n;) {
                ssize_t w = write(fd, buf + off, n - off);
                if (w <= 0) {
                    perror("net-helper: write");
                    return 1;
                }
                off += (size_t)w;
            }
            total += n;
        }
        shutdown(fd, SHUT_WR);
        while (read(fd, buf, sizeof(buf)) > 0)
            ;
    } else {
        fprintf(stderr, "usage: net-helper recv HOST PORT | send HOST PORT SIZE\n");
        return 2;
    }
    sha_final(&s, hex);
    printf("bytes=%llu\nsha256=%s\n", (unsigned long long)total, hex);
    return 0;
}
