#!/usr/bin/env python3
"""Paired A/B of claudefs builds: shm 64 B one-way latency.

  hack/bench/fabric_ab.py ROUNDS BUILD_A BUILD_B [BUILD ...]   (SECS=0.4 per run)

Each build gets a `claudefs server` (core 1) with a shm echo listener; each
round runs `claudefs fabricperf` (core 0) against every build back to back,
in alternating order, so that all builds of a round see the same placement
of the two cores (hack/bench/placement.c). Prints every round, then the
median of each build's per-round ratio to the first build.
"""
import json, os, statistics, subprocess, sys, tempfile, time


def run(cmd, timeout=120):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout).stdout


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    rounds, builds = int(sys.argv[1]), sys.argv[2:]
    secs = os.environ.get("SECS", "0.4")
    servers = {}
    try:
        for i, b in enumerate(builds):
            sock = tempfile.mkdtemp() + "/s.sock"
            p = subprocess.Popen(["taskset", "-c", "1", b, "server", "-r", sock, "-m", "0x2", "--hugepages", "never"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            servers[b] = (p, None)
            for _ in range(200):
                if os.path.exists(sock):
                    break
                time.sleep(0.05)
            name = "fabric-ab-%d-%d" % (os.getpid(), i)
            out = run([b, "rpc", "-s", sock, "--raw", "fabric_listen", "--name", "ab", "--transport", "shm", "--address", name])
            servers[b] = (p, json.loads(out)["address"])
        ratios = {b: [] for b in builds}
        for r in range(rounds):
            order = builds if r % 2 == 0 else builds[::-1]
            one_way = {}
            for b in order:
                out = run(["taskset", "-c", "0", b, "fabricperf", "--transport", "shm", "-a", servers[b][1], "-o", "64",
                           "-q", "1", "-t", secs, "--warmup", "0.1", "-m", "0x1", "--json"])
                one_way[b] = json.loads(out)["results"][0]["one_way_us"]
            for b in builds:
                ratios[b].append(one_way[b] / one_way[builds[0]])
            print("round %d: " % r + "  ".join("%s %.3f us" % (b, one_way[b]) for b in builds), flush=True)
        print("median ratio to %s: " % builds[0] + "  ".join("%s %.3f" % (b, statistics.median(ratios[b])) for b in builds))
    finally:
        for p, _ in servers.values():
            p.terminate()
            p.wait(timeout=20)


if __name__ == "__main__":
    main()
