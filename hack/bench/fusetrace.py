#!/usr/bin/python3
"""Where a FUSE workload's time goes, from the kernel's own FUSE tracepoints.

  hack/bench/fusetrace.py -- COMMAND [ARGS...]
  hack/bench/fusetrace.py --script FILE     (a saved `perf script` of the same events)

Records fuse:fuse_request_send and fuse:fuse_request_end on every CPU while
COMMAND runs (perf, as root), then prints per request type: how many, the
median and mean time from the kernel queueing it to the server's reply, the
median time the client took between the previous reply and sending it (its
own work and its wake-up), and how often the reply came from another CPU than
the one the request was sent from (a wake-up across cores, which costs 20-30
us on a VM). For example, 5,000 creates on a mount:

  hack/bench/fusetrace.py -- /tmp/fsops create /mnt/claudefs/d f 5000

Needs a kernel with the fuse tracepoints (6.16 and later) and perf.
"""

import argparse
import collections
import os
import re
import statistics
import subprocess
import sys
import tempfile

EVENT = re.compile(r"^\s*(.+?)\s+\d+\s+\[(\d+)\]\s+(\d+\.\d+):\s+fuse:fuse_request_(send|end):.*?\breq (\d+)"
                   r"(?:.*?\((\w+)\))?")


def parse(lines):
    """(comm, cpu, time, kind, req, opcode) per event, in order."""
    out = []
    for line in lines:
        m = EVENT.match(line)
        if m:
            out.append((m.group(1), int(m.group(2)), float(m.group(3)), m.group(4), m.group(5), m.group(6)))
    return out


def report(events):
    sent = {}
    lat = collections.defaultdict(list)
    gap = collections.defaultdict(list)
    cross = collections.Counter()
    last_end = None
    for comm, cpu, t, kind, req, op in events:
        if kind == "send":
            sent[req] = (t, op, cpu)
            if last_end is not None:
                gap[op].append(t - last_end)
        elif req in sent:
            t0, op, cpu0 = sent.pop(req)
            lat[op].append(t - t0)
            cross[op] += cpu != cpu0
            last_end = t
    if not lat:
        sys.exit("no FUSE requests were traced (is the command working on a FUSE mount?)")
    total = sum(sum(v) for v in lat.values())
    print(f"{'request':<16} {'count':>7} {'median us':>10} {'mean us':>9} {'share':>6} {'client gap us':>14} "
          f"{'other CPU':>10}")
    for op, v in sorted(lat.items(), key=lambda kv: -sum(kv[1])):
        g = gap.get(op)
        print(f"{op.removeprefix('FUSE_'):<16} {len(v):>7} {statistics.median(v) * 1e6:>10.1f} "
              f"{statistics.mean(v) * 1e6:>9.1f} {sum(v) / total:>6.0%} "
              f"{statistics.median(g) * 1e6 if g else 0:>14.1f} {cross[op] / len(v):>10.0%}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--script", help="parse this saved `perf script` output instead of running a command")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    if a.script:
        with open(a.script) as f:
            return report(parse(f))
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        ap.error("give a command to trace (after --), or --script FILE")
    with tempfile.TemporaryDirectory() as d:
        data = os.path.join(d, "perf.data")
        rec = ["perf", "record", "-q", "-a", "-o", data, "-e", "fuse:fuse_request_send", "-e",
               "fuse:fuse_request_end", "--"] + cmd
        r = subprocess.run(rec)
        if r.returncode:
            sys.exit(f"fusetrace: `{' '.join(cmd)}` (under perf record) exited with {r.returncode}")
        text = subprocess.run(["perf", "script", "-i", data], capture_output=True, text=True, check=True).stdout
    report(parse(text.splitlines()))


if __name__ == "__main__":
    main()
