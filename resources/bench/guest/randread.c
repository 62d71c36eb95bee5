/* Random 4 KiB reads with O_DIRECT, run inside the benchmark guest
 * (resources/bench/run.sh, disk section): busybox has no fio, and a dd per
 * read would time the guest's (emulated, slow) fork+exec, not the disk.
 *
 *   randread DEVICE COUNT    prints "KILN-RANDREAD reads=N secs=S"
 *
 * Offsets come from a fixed-seed generator, so every monitor gets the same
 * sequence of reads. Built static by run.sh (gcc -static). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: randread DEVICE COUNT\n");
        return 2;
    }
    long count = atol(argv[2]);
    int fd = open(argv[1], O_RDONLY | O_DIRECT);
    if (fd < 0 || count <= 0) {
        perror(argv[1]);
        return 1;
    }
    off_t size = lseek(fd, 0, SEEK_END);
    uint64_t blocks = size / 4096;
    void *buf;
    if (blocks == 0 || posix_memalign(&buf, 4096, 4096) != 0) {
        fprintf(stderr, "randread: %s too small or no memory\n", argv[1]);
        return 1;
    }
    uint64_t x = 0x9e3779b97f4a7c15ull;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < count; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17; /* xorshift64 */
        if (pread(fd, buf, 4096, (off_t)(x % blocks) * 4096) != 4096) {
            perror("randread: pread");
            return 1;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("KILN-RANDREAD reads=%ld secs=%.6f\n", count,
           (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9);
    return 0;
}
