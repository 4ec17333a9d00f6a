/* Metadata and small-file loops for hack/bench/fs.py, timed without the
 * interpreter around them.
 *
 *   fsops OP DIR PREFIX N [SIZE]
 *
 * OP is one of create, stat, unlink, mkdir, rmdir, write, read. It works on
 * the names DIR/PREFIX000000 .. DIR/PREFIX(N-1), one system call sequence per
 * name:
 *   create  open(O_CREAT|O_EXCL|O_WRONLY) + close   (empty files)
 *   stat    stat
 *   unlink  unlink
 *   mkdir   mkdir
 *   rmdir   rmdir
 *   write   open(O_CREAT|O_TRUNC|O_WRONLY) + write(SIZE bytes) + close
 *   read    open(O_RDONLY) + read(SIZE bytes, checked) + close
 * and prints "N SECONDS" (the loop alone, CLOCK_MONOTONIC). The first error
 * stops it: the failing call, name and errno go to stderr, exit status 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void fail(const char *call, const char *path) {
    fprintf(stderr, "fsops: %s %s: %s\n", call, path, strerror(errno));
    exit(1);
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: fsops create|stat|unlink|mkdir|rmdir|write|read DIR PREFIX N [SIZE]\n");
        return 2;
    }
    const char *op = argv[1], *dir = argv[2], *prefix = argv[3];
    long n = atol(argv[4]);
    size_t size = argc > 5 ? (size_t)atol(argv[5]) : 4096;
    char *buf = malloc(size + 1);
    if (!buf) return 2;
    memset(buf, 0x5a, size);
    /* Names are built before the clock starts. */
    char **names = malloc(n * sizeof(char *));
    for (long i = 0; i < n; i++) {
        if (asprintf(&names[i], "%s/%s%06ld", dir, prefix, i) < 0) return 2;
    }
    struct stat st;
    double t0 = now();
    for (long i = 0; i < n; i++) {
        const char *p = names[i];
        int fd;
        if (!strcmp(op, "create")) {
            if ((fd = open(p, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0644)) < 0) fail("open(O_CREAT)", p);
            if (close(fd)) fail("close", p);
        } else if (!strcmp(op, "stat")) {
            if (stat(p, &st)) fail("stat", p);
        } else if (!strcmp(op, "unlink")) {
            if (unlink(p)) fail("unlink", p);
        } else if (!strcmp(op, "mkdir")) {
            if (mkdir(p, 0755)) fail("mkdir", p);
        } else if (!strcmp(op, "rmdir")) {
            if (rmdir(p)) fail("rmdir", p);
        } else if (!strcmp(op, "write")) {
            if ((fd = open(p, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644)) < 0) fail("open(O_CREAT)", p);
            ssize_t w = write(fd, buf, size);
            if (w != (ssize_t)size) {
                if (w >= 0) errno = EIO;
                fail("write", p);
            }
            if (close(fd)) fail("close", p);
        } else if (!strcmp(op, "read")) {
            if ((fd = open(p, O_RDONLY | O_CLOEXEC)) < 0) fail("open", p);
            size_t got = 0;
            for (;;) {
                ssize_t r = read(fd, buf + got, size + 1 - got);
                if (r < 0) fail("read", p);
                if (r == 0) break;
                got += r;
                if (got > size) break;
            }
            if (got != size) {
                fprintf(stderr, "fsops: read %s: %zu bytes, expected %zu\n", p, got, size);
                exit(1);
            }
            if (close(fd)) fail("close", p);
        } else {
            fprintf(stderr, "fsops: unknown op %s\n", op);
            return 2;
        }
    }
    double t1 = now();
    printf("%ld %.6f\n", n, t1 - t0);
    return 0;
}
