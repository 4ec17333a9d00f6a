/*
 * The minimal TCP echo the plain TCP transport is measured against
 * (hack/bench/fabric.py builds and runs it).
 *
 *   tcp_echo server PORT
 *       accepts one connection and writes back every byte it reads;
 *   tcp_echo client HOST PORT SIZE DEPTH SECS
 *       keeps DEPTH messages of SIZE bytes in flight for SECS seconds and
 *       prints "<round trips> <seconds>".
 *
 * Both sides busy-poll non-blocking sockets with TCP_NODELAY, as ClaudeFS
 * reactors do: no framing, no checksums, no allocation, so the difference
 * is what the RPC layer costs over bare sockets.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) {
    perror(what);
    exit(1);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void tune(int fd) {
    int one = 1;
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0) die("TCP_NODELAY");
    if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0) die("O_NONBLOCK");
}

/* Writes all of buf, spinning while the socket is full. */
static void write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
        if (n < 0) die("send");
        buf += n;
        len -= (size_t)n;
    }
}

static int server(int port) {
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(l, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(l, 1) < 0) die("listen");
    printf("ready\n");
    fflush(stdout);
    int fd = accept(l, NULL, NULL);
    if (fd < 0) die("accept");
    tune(fd);
    static char buf[1 << 20];
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n == 0) return 0;
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
        if (n < 0) die("recv");
        write_all(fd, buf, (size_t)n);
    }
}

static int client(const char *host, int port, size_t size, int depth, double secs) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &a.sin_addr);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
    tune(fd);
    char *msg = calloc(1, size ? size : 1), *buf = malloc(1 << 20);
    for (int i = 0; i < depth; i++) write_all(fd, msg, size);
    long done = 0;
    size_t got = 0;
    double start = now(), end = start + secs;
    for (;;) {
        ssize_t n = recv(fd, buf, 1 << 20, 0);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
        if (n <= 0) die("recv");
        got += (size_t)n;
        while (got >= size && size > 0) {
            got -= size;
            done++;
            if (now() < end) write_all(fd, msg, size);
            else if (--depth == 0) goto out;
        }
    }
out:
    printf("%ld %.6f\n", done, now() - start);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "server")) return server(atoi(argv[2]));
    if (argc == 7 && !strcmp(argv[1], "client"))
        return client(argv[2], atoi(argv[3]), strtoul(argv[4], NULL, 10), atoi(argv[5]), atof(argv[6]));
    fprintf(stderr, "usage: tcp_echo server PORT | tcp_echo client HOST PORT SIZE DEPTH SECS\n");
    return 2;
}
