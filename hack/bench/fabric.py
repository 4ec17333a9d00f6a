#!/usr/bin/python3
"""Benchmarks of the fabric's RPC against the transports' own floor, measured in the same run.

  hack/bench/fabric.py [--reps N] [--secs S] [--only 'tcp;ofi_rxm,shm,tcp']
  hack/bench/fabric.py --report      (tables and plots from the saved results)

- libfabric providers (tcp;ofi_rxm, shm; verbs;ofi_rxm where RDMA exists):
  `claudefs fabricperf` echo round trips against a `claudefs server` listener
  on that provider, alternated with `fi_pingpong` (libfabric-bin) on the same
  provider, endpoint type (rdm) and size. Latency is one-way (half a round
  trip; fi_pingpong's usec/xfer), bandwidth counts both directions
  (fi_pingpong's MB/sec). Goals: one-way latency at 64 B at most 1.25x
  fi_pingpong's; bandwidth at 1 MiB at least 0.9x.
- Messages per second with many calls in flight (64 B, depths 16 and 64),
  against fi_pingpong's rate (it has one message in flight: the pipelining
  gain shows in the ratio).
- plain tcp: the same against a minimal busy-polling TCP echo in C
  (hack/bench/tcp_echo.c), at the same sizes and depths.

Every process is pinned: clients to core 0, servers to core 1 (the claudefs
server's reactor polls without pause only while it has work, so it leaves
core 1 to fi_pingpong's server between its own runs). Both sides
busy-poll, so a round trip stalls whenever another process takes either
core for a time slice; on a shared 2-core VM, those stalls (milliseconds,
about every 5 ms under load) decide the means, not the code. So the script
runs in a session of its own whose scheduler autogroup gets a raised
priority (--autogroup-nice, default -10 as root; per-process nice does not
help: the kernel shares the CPU between sessions first), the same for the
reference and for claudefs.

As root, the benchmark also runs in a network namespace of its own (only
its loopback, brought up), with TCP congestion control set to
--tcp-congestion (default cubic, the kernel's default; "host" keeps the
host's). Both matter to the 1 MiB transfers of the TCP transports: a
host's TCP metrics cache hands one connection's losses (its slow-start
threshold) to the next, and BBR (which this host's image sets) sizes its
window from loopback's microsecond round trip, so a 1 MiB transfer (17
segments of 64 KiB with its header) went in one flight or in two by
connection, and runs came out bimodal (docs/PERFORMANCE.md, "Fabric").
The reference and claudefs share the namespace and the algorithm. A
namespace may only choose an algorithm the host allows, so the script adds
it to the host's tcp_allowed_congestion_control if it is missing (the
host's own choice stays as it is).

The host places this VM's vCPUs as it likes and moves them every few
seconds or minutes, and shm's 64 B round trip follows: fastest when cores
0 and 1 are the two hardware threads of one physical core, about 0.25 us
when they are separate cores sharing an L3, over 0.8 us across dies. So
every pair is framed by two probes of the placement (hack/bench/placement.c:
how much a loop on core 1 slows one on core 0, and a cache line's round
trip between them), and the results give the ratios by placement too
("changed" when the two probes of a pair differ). With --placement, each
pair starts only once the probe finds that placement (or after
--placement-wait seconds), so that a goal can be measured in a stated one.

Each figure is the median of the per-pair
ratios over --reps pairs (see docs/PERFORMANCE.md, "How we measure"); the
median round trip of claudefs is recorded too (fi_pingpong reports means).
Results go to hack/bench/results/fabric.json, plots to
docs/perf/fabric-<transport>.png; the Markdown tables are printed for
docs/PERFORMANCE.md.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release/claudefs")
RESULTS = os.path.join(ROOT, "hack/bench/results/fabric.json")
SIZES = [64, 1024, 4096, 16384, 65536, 262144, 1048576]
DEPTHS = [16, 64]
LABEL = {64: "64 B", 1024: "1 KiB", 4096: "4 KiB", 16384: "16 KiB", 65536: "64 KiB", 262144: "256 KiB", 1048576: "1 MiB"}


def pinned(core, cmd):
    """`cmd` pinned to `core`."""
    return ["taskset", "-c", str(core)] + cmd


def isolate(nice, congestion):
    """Re-runs this script in a new session (as root, in a new network
    namespace too), then raises its autogroup's priority and sets the
    namespace's TCP congestion control (see above). Returns what was set."""
    root = os.geteuid() == 0
    if not os.environ.get("FABRIC_BENCH_SESSION"):
        os.environ["FABRIC_BENCH_SESSION"] = "1"
        cmd = ["setsid", "--wait", sys.executable] + sys.argv
        if root:
            if congestion != "host":
                allow_congestion(congestion)
            cmd = ["unshare", "--net"] + cmd
        os.execvp(cmd[0], cmd)
    if nice:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    if not root:
        return {"netns": False, "tcp_congestion": sysctl_cc()}
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    if congestion != "host":
        with open("/proc/sys/net/ipv4/tcp_congestion_control", "w") as f:
            f.write(congestion)
    return {"netns": True, "tcp_congestion": sysctl_cc()}


def allow_congestion(name):
    """A network namespace other than the host's may only choose a TCP
    congestion control the host allows (tcp_allowed_congestion_control):
    adds `name` to that list if it is missing (the host's own choice is
    left alone)."""
    path = "/proc/sys/net/ipv4/tcp_allowed_congestion_control"
    with open(path) as f:
        allowed = f.read().split()
    if name not in allowed:
        with open(path, "w") as f:
            f.write(" ".join(allowed + [name]))
        print(f"fabric.py: added {name} to {path} (was: {' '.join(allowed)})", file=sys.stderr)


def sysctl_cc():
    with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
        return f.read().strip()


def run(cmd, timeout=300):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout).stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A claudefs server (the build `binary`) on core 1 with an echo listener per transport."""

    def __init__(self, transports, binary=BIN):
        self.dir = tempfile.mkdtemp()
        self.sock = os.path.join(self.dir, "s.sock")
        self.proc = subprocess.Popen(pinned(1, [binary, "server", "-r", self.sock, "-m", "0x2", "--idle", "adaptive",
                                      "--hugepages", "never"]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(200):
            if os.path.exists(self.sock):
                break
            time.sleep(0.05)
        self.addr = {}
        for i, t in enumerate(transports):
            # (The socket's directory makes the shm name unique to this server.)
            address = f"bench-echo-{os.path.basename(self.dir)}" if t == "shm" else "127.0.0.1:0"
            out = run([binary, "rpc", "-s", self.sock, "--raw", "fabric_listen", "--name", f"l{i}", "--transport", t,
                       "--address", address])
            self.addr[t] = json.loads(out)["address"]

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=20)


def fabricperf(transport, addr, size, depth, secs, binary=BIN):
    out = run(pinned(0, [binary, "fabricperf", "--transport", transport, "-a", addr, "-o", str(size), "-q", str(depth),
                        "-t", str(secs), "--warmup", "0.3", "-m", "0x1", "--json"]))
    r = json.loads(out)["results"][0]
    return {"one_way_us": r["one_way_us"], "mb_per_s": r["mb_per_s"], "calls_per_s": r["calls_per_s"],
            "rtt_p50_us": r["rtt_p50_us"], "rtt_p99_us": r["rtt_p99_us"]}


# Seconds per one-way transfer seen last time, per (provider, size): sizes fi_pingpong's iteration count.
_pace = {}


def pingpong(provider, size, secs):
    """fi_pingpong on `provider` (rdm, msg): one-way latency (us), MB/s, transfers/s."""
    est = _pace.get((provider, size), 20e-6 + size / 1e9)
    iters = int(min(2_000_000, max(200, secs / (2 * est))))
    port = free_port()
    srv = subprocess.Popen(pinned(1, ["fi_pingpong", "-p", provider, "-e", "rdm", "-I", str(iters), "-S", str(size),
                                      "-B", str(port)]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for attempt in range(50):
            try:
                out = run(pinned(0, ["fi_pingpong", "-p", provider, "-e", "rdm", "-I", str(iters), "-S", str(size), "-P",
                                     str(port), "127.0.0.1"]), timeout=120)
                break
            except subprocess.CalledProcessError:
                time.sleep(0.1)  # the server is not listening yet
        else:
            raise RuntimeError(f"fi_pingpong -p {provider} -S {size} never connected")
    finally:
        srv.wait(timeout=60)
    f = out.strip().splitlines()[-1].split()
    mb, usec = float(f[5]), float(f[6])
    if size > 0 and mb > 0:
        # usec/xfer is printed with two decimals (0.23 at 64 B on shm: +-2%);
        # MB/sec (size bytes per transfer, each way) has the digits.
        usec = size / mb
    _pace[(provider, size)] = usec / 1e6
    return {"one_way_us": usec, "mb_per_s": mb, "calls_per_s": 1e6 / (2 * usec)}


def c_binary(name):
    out = os.path.join(tempfile.gettempdir(), f"claudefs-{name.replace('_', '-')}")
    run(["gcc", "-O2", "-o", out, os.path.join(ROOT, f"hack/bench/{name}.c"), "-lpthread"])
    return out


def placement(binary, want=None, wait=0.0):
    """The placement of cores 0 and 1 (probe_placement); with `want`, probes
    every half second until it is that, for `wait` seconds at most."""
    deadline = time.monotonic() + wait
    while True:
        got = probe_placement(binary)
        if want is None or got == want or time.monotonic() >= deadline:
            return got
        time.sleep(0.5)


def probe_placement(binary):
    """Where the host has put cores 0 and 1 (hack/bench/placement.c): "one core"
    (the two hardware threads of one physical core), "one L3" (separate cores
    sharing a cache) or "across dies"."""
    slowdown, rtt = map(float, run([binary, "0", "1"]).split())
    if slowdown >= 1.5:
        return "one core"
    return "one L3" if rtt < 250 else "across dies"


def tcp_echo(binary, size, depth, secs):
    port = free_port()
    srv = subprocess.Popen(pinned(1, [binary, "server", str(port)]), stdout=subprocess.PIPE, text=True)
    try:
        srv.stdout.readline()
        calls, elapsed = run(pinned(0, [binary, "client", "127.0.0.1", str(port), str(size), str(depth),
                                        str(secs)])).split()
    finally:
        srv.wait(timeout=30)
    rate = int(calls) / float(elapsed)
    return {"one_way_us": depth * 1e6 / rate / 2, "mb_per_s": 2 * size * rate / 1e6, "calls_per_s": rate}


def pairs(reference, ours, reps, keys, where):
    """Alternates reference and ours `reps` times: medians of each side and of
    the per-pair ratios, and the ratios by the host's placement of the two
    cores (`where()`, probed before and after each pair: "changed" if the
    two differ)."""
    refs, mine, places = [], [], []
    for _ in range(reps):
        before = where()
        refs.append(reference())
        mine.append(ours())
        after = where(wait=False)
        places.append(before if before == after else "changed")
    out = {"placements": places}
    for k in keys:
        ratios = [m[k] / r[k] for r, m in zip(refs, mine)]
        by_place = {p: statistics.median(x for x, q in zip(ratios, places) if q == p) for p in set(places)}
        out[k] = {"reference": statistics.median(r[k] for r in refs), "claudefs": statistics.median(m[k] for m in mine),
                  "ratio": statistics.median(ratios), "ratios": [round(x, 3) for x in ratios],
                  "ratio_by_placement": {p: round(x, 3) for p, x in sorted(by_place.items())}}
    for q in ["rtt_p50_us", "rtt_p99_us"]:
        out[f"claudefs_{q}"] = statistics.median(m.get(q, 0) for m in mine)
    return out


def bench(transport, server, reps, secs, echo_bin, placement_bin, want, want_wait):
    addr = server.addr[transport]
    where = lambda wait=True: placement(placement_bin, want if wait else None, want_wait)
    if transport == "tcp":
        ref = lambda size, depth: tcp_echo(echo_bin, size, depth, secs)
    else:
        ref = lambda size, depth: pingpong(transport, size, secs)
    res = {"sizes": {}, "rates": {}}
    for size in SIZES:
        print(f"  {transport} {LABEL[size]}", file=sys.stderr, flush=True)
        res["sizes"][str(size)] = pairs(lambda: ref(size, 1), lambda: fabricperf(transport, addr, size, 1, secs), reps,
                                        ["one_way_us", "mb_per_s"], where)
    for depth in DEPTHS:
        print(f"  {transport} 64 B x{depth} in flight", file=sys.stderr, flush=True)
        res["rates"][str(depth)] = pairs(lambda: ref(64, depth), lambda: fabricperf(transport, addr, 64, depth, secs),
                                         reps, ["calls_per_s"], where)
    return res


def plot(transport, r, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ref = "minimal TCP echo (C)" if transport == "tcp" else f"fi_pingpong -p '{transport}' -e rdm"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, ylabel, title in [(axes[0], "one_way_us", "one-way latency (us, median)", "latency"),
                                   (axes[1], "mb_per_s", "MB/s, both directions (median)", "bandwidth")]:
        ax.plot(SIZES, [r["sizes"][str(s)][key]["reference"] for s in SIZES], "o-", label=ref)
        ax.plot(SIZES, [r["sizes"][str(s)][key]["claudefs"] for s in SIZES], "s-", label="claudefs RPC (fabricperf)")
        for s in SIZES:
            ax.annotate(f"{r['sizes'][str(s)][key]['ratio']:.2f}x", (s, r["sizes"][str(s)][key]["claudefs"]),
                        textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(SIZES, [LABEL[s] for s in SIZES], rotation=30)
        ax.set_xlabel("message size (one call in flight)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{transport}: {title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(results):
    for transport, r in results["transports"].items():
        ref = "TCP echo" if transport == "tcp" else "fi_pingpong"
        print(f"\n#### {transport}\n")
        if "tcp_congestion" in r:
            where = "a network namespace of its own" if r.get("netns") else "the host's network namespace"
            waited = f"; every pair started in the placement \"{r['placement']}\"" if r.get("placement") else ""
            print(f"(in {where}, TCP congestion control {r['tcp_congestion']}{waited})\n")
        print(f"| size | {ref} one-way | claudefs one-way | ratio | {ref} MB/s | claudefs MB/s | ratio "
              "| claudefs RTT p50 | claudefs RTT p99 |")
        print("|---|---|---|---|---|---|---|---|---|")
        for s in SIZES:
            x = r["sizes"][str(s)]
            l, b = x["one_way_us"], x["mb_per_s"]
            print(f"| {LABEL[s]} | {l['reference']:.2f} us | {l['claudefs']:.2f} us | {l['ratio']:.2f} | "
                  f"{b['reference']:.0f} | {b['claudefs']:.0f} | {b['ratio']:.2f} | "
                  f"{x.get('claudefs_rtt_p50_us', 0):.1f} us | {x['claudefs_rtt_p99_us']:.1f} us |")
        print(f"\n| 64 B calls in flight | {ref} msgs/s | claudefs calls/s | ratio |")
        print("|---|---|---|---|")
        for d in DEPTHS:
            x = r["rates"][str(d)]["calls_per_s"]
            depth = d if transport == "tcp" else 1
            print(f"| {d} ({ref}: {depth}) | {x['reference'] / 1e3:.0f} k | {x['claudefs'] / 1e3:.0f} k | {x['ratio']:.2f} |")
        if transport != "tcp":
            lat = r["sizes"]["64"]["one_way_us"]["ratio"]
            bw = r["sizes"]["1048576"]["mb_per_s"]["ratio"]
            print(f"\nGoals: latency at 64 B {lat:.2f}x fi_pingpong (goal <= 1.25: {'met' if lat <= 1.25 else 'NOT met'}); "
                  f"bandwidth at 1 MiB {bw:.2f}x (goal >= 0.9: {'met' if bw >= 0.9 else 'NOT met'}).")
        x = r["sizes"]["64"]
        if "placements" in x:
            by = ", ".join(f"{p}: {v:.2f}x ({x['placements'].count(p)} pairs)"
                           for p, v in x["one_way_us"]["ratio_by_placement"].items())
            print(f"\n64 B latency by the host's placement of the two cores (hack/bench/placement.c): {by}.")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--secs", type=float, default=2.0)
    ap.add_argument("--only", default="")
    ap.add_argument("--autogroup-nice", type=int, default=-10 if os.geteuid() == 0 else 0,
                    help="scheduler priority of the benchmark's session (default: -10 as root, else 0: unchanged)")
    ap.add_argument("--tcp-congestion", default="cubic",
                    help="TCP congestion control in the benchmark's network namespace (as root; default cubic, "
                         "the kernel's default; 'host': the host's)")
    ap.add_argument("--placement", choices=["one core", "one L3", "across dies"],
                    help="start each pair only once cores 0 and 1 are placed so (see above)")
    ap.add_argument("--placement-wait", type=float, default=600,
                    help="seconds to wait for --placement before a pair starts anyway (default 600)")
    ap.add_argument("--report", action="store_true")
    a = ap.parse_args()
    if a.report:
        with open(RESULTS) as f:
            report(json.load(f))
        return
    if not os.environ.get("FABRIC_BENCH_SESSION"):
        # Before isolating: the namespace has no network to install or fetch crates with.
        subprocess.run([os.path.join(ROOT, "hack/deps.sh"), "bench"], check=True)
        subprocess.run(["cargo", "build", "--release", "--bin", "claudefs"], check=True, cwd=ROOT)
    net = isolate(a.autogroup_nice, a.tcp_congestion)
    transports = ["tcp;ofi_rxm", "shm", "tcp"]
    server = Server([])
    try:
        listed = json.loads(run([BIN, "rpc", "-s", server.sock, "--raw", "fabric_get_transports"]))
    finally:
        server.stop()
    if any(t["name"] == "verbs;ofi_rxm" for t in listed["transports"]):
        transports.insert(0, "verbs;ofi_rxm")
    if a.only:
        transports = [t for t in transports if t in a.only.split(",")]
    echo_bin, placement_bin = c_binary("tcp_echo"), c_binary("placement")
    results = {"secs": a.secs, "reps": a.reps, "autogroup_nice": a.autogroup_nice, **net,
               "libfabric": listed["libfabric"], "transports": {}}
    for t in transports:
        # One server per transport: a reactor polling several transports pays
        # for each one's poll in every round.
        server = Server([t])
        try:
            r = bench(t, server, a.reps, a.secs, echo_bin, placement_bin, a.placement, a.placement_wait)
            results["transports"][t] = {**r, **net, "placement": a.placement}
        finally:
            server.stop()
    if os.path.exists(RESULTS) and a.only:
        with open(RESULTS) as f:
            old = json.load(f)
        old["transports"].update(results["transports"])
        results["transports"] = old["transports"]
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(results, f, indent=1)
    for t, r in results["transports"].items():
        plot(t, r, os.path.join(ROOT, "docs/perf", f"fabric-{t.replace(';', '_')}.png"))
    report(results)


if __name__ == "__main__":
    main()
