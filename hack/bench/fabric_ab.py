#!/usr/bin/env python3
"""Paired A/B of claudefs builds: shm 64 B one-way latency.

  hack/bench/fabric_ab.py ROUNDS BUILD_A BUILD_B [BUILD ...]   (SECS=0.4 per run)

Each build gets a `claudefs server` (core 1) with a shm echo listener, as
hack/bench/fabric.py starts them; each round runs `claudefs fabricperf`
(core 0) against every build back to back, in alternating order, so that
all builds of a round see the same placement of the two cores
(hack/bench/placement.c). Prints every round, then the median of each
build's per-round ratio to the first build.
"""
import os
import statistics
import sys

from fabric import Server, fabricperf


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    rounds, builds = int(sys.argv[1]), sys.argv[2:]
    secs = float(os.environ.get("SECS", "0.4"))
    servers = {}
    try:
        for b in builds:
            servers[b] = Server(["shm"], binary=b)
        ratios = {b: [] for b in builds}
        for r in range(rounds):
            order = builds if r % 2 == 0 else builds[::-1]
            one_way = {b: fabricperf("shm", servers[b].addr["shm"], 64, 1, secs, binary=b)["one_way_us"] for b in order}
            for b in builds:
                ratios[b].append(one_way[b] / one_way[builds[0]])
            print("round %d: " % r + "  ".join("%s %.3f us" % (b, one_way[b]) for b in builds), flush=True)
        print("median ratio to %s: " % builds[0] + "  ".join("%s %.3f" % (b, statistics.median(ratios[b])) for b in builds))
    finally:
        for s in servers.values():
            s.stop()


if __name__ == "__main__":
    main()
