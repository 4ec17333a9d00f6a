/*
 * Where the host has put two of this VM's CPUs, measured from inside
 * (hack/bench/fabric.py runs it around every measurement pair).
 *
 *   placement CPU_A CPU_B
 *       prints "<throughput slowdown> <cache-line round trip ns>".
 *
 * - Throughput slowdown: an ALU-bound loop on CPU_A, timed alone and then
 *   while CPU_B runs the same loop. About 1 when the two are separate
 *   physical cores; about 2 when they are the two hardware threads of one
 *   core (each gets half of its execution units).
 * - Cache-line round trip: two threads, one per CPU, hand a counter back
 *   and forth through one cache line. About 80-200 ns between hardware
 *   threads of one core or cores sharing an L3 (on the Zen 5 host this was
 *   written on), 400-500 ns between cores on different dies.
 *
 * On a VM the guest's topology says nothing about this (every vCPU looks
 * like a core of its own), and the host moves vCPUs between physical
 * cores as it likes, so shared-memory ping-pong times change with it.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define LOOP_ITERS 10000000L
#define ROUND_TRIPS 100000L

static int cpu_a, cpu_b;
static atomic_int started, stop;
static _Alignas(64) atomic_long ball;
static volatile uint64_t sink;

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (pthread_setaffinity_np(pthread_self(), sizeof set, &set) != 0) {
        fprintf(stderr, "placement: cannot pin to CPU %d\n", cpu);
        exit(1);
    }
}

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

/* Six independent chains: bound by the core's ALU throughput, not latency. */
static uint64_t alu(long n) {
    uint64_t a = 1, b = 2, c = 3, d = 4, e = 5, f = 6;
    for (long i = 0; i < n; i++) {
        a += i; b ^= i; c += a; d ^= b; e += c; f ^= d;
        __asm__ volatile("" : "+r"(a), "+r"(b), "+r"(c), "+r"(d), "+r"(e), "+r"(f));
    }
    return a + b + c + d + e + f;
}

static void *contender(void *arg) {
    (void)arg;
    pin(cpu_b);
    atomic_store(&started, 1);
    while (!atomic_load_explicit(&stop, memory_order_relaxed))
        sink = alu(10000);
    return NULL;
}

static void *responder(void *arg) {
    (void)arg;
    pin(cpu_b);
    for (long i = 1; i < 2 * ROUND_TRIPS; i += 2) {
        while (atomic_load_explicit(&ball, memory_order_acquire) != i)
            ;
        atomic_store_explicit(&ball, i + 1, memory_order_release);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: placement CPU_A CPU_B\n");
        return 2;
    }
    cpu_a = atoi(argv[1]);
    cpu_b = atoi(argv[2]);
    pin(cpu_a);
    sink = alu(LOOP_ITERS / 10); /* warm up the clock */

    double t = now_ns();
    sink = alu(LOOP_ITERS);
    double alone = now_ns() - t;

    pthread_t th;
    pthread_create(&th, NULL, contender, NULL);
    while (!atomic_load(&started))
        ;
    t = now_ns();
    sink = alu(LOOP_ITERS);
    double shared = now_ns() - t;
    atomic_store(&stop, 1);
    pthread_join(th, NULL);

    pthread_create(&th, NULL, responder, NULL);
    t = now_ns();
    for (long i = 0; i < 2 * ROUND_TRIPS; i += 2) {
        atomic_store_explicit(&ball, i + 1, memory_order_release);
        while (atomic_load_explicit(&ball, memory_order_acquire) != i + 2)
            ;
    }
    double rtt = (now_ns() - t) / ROUND_TRIPS;
    pthread_join(th, NULL);

    printf("%.2f %.0f\n", shared / alone, rtt);
    return 0;
}
