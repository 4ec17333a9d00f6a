#!/usr/bin/python3
"""Benchmarks of the bdev layer against fio, measured in the same run.

  hack/bench/bdev.py [--reps N] [--secs S] [--only null|loop|disk]
  hack/bench/bdev.py --report      (table and plot from the saved results)

- null: `claudefs bdevperf` on a null bdev (4 KiB random reads, depth 128, one
  core) against fio's null engine (fio's own per-I/O cost) with the same
  parameters, plus the instructions per I/O of the reactor's work, counted by
  callgrind (perf has no hardware counters on this machine).
- loop: the uring bdev against `fio --ioengine=io_uring` on a loop device over
  a tmpfs file (`losetup --direct-io=on`): software-bound.
- disk: the same on a 2 GiB file on the root file system: device-bound.

fio and bdevperf run alternately, each pinned to core 0, several times; the
figure reported for each configuration is the median of the per-pair ratios,
so that noise from the host (this machine loses CPU time to its neighbours in
bursts) hits both sides of a ratio alike. Results go to
hack/bench/results/bdev.json and docs/perf/bdev.png; the Markdown table is
printed for docs/PERFORMANCE.md.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "target/release/claudefs")
DEPTHS = [1, 8, 32, 128]


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def fio(target, depth, secs, engine="io_uring", extra=()):
    out = run(["fio", "--name=ref", f"--filename={target}", f"--ioengine={engine}", "--direct=1", "--rw=randread",
               "--bs=4k", f"--iodepth={depth}", "--numjobs=1", "--cpus_allowed=0", "--time_based",
               f"--runtime={secs}", "--output-format=json", *extra])
    return json.loads(out)["jobs"][0]["read"]["iops"]


def bdevperf(config, depth, secs):
    out = run([BIN, "bdevperf", "-c", config, "-q", str(depth), "-o", "4k", "-w", "randread", "-t", str(secs),
               "-m", "0x1", "--json"])
    return json.loads(out)["jobs"][-1]


def write_config(calls):
    f = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump(calls, f)
    f.close()
    return f.name


def pairs(reference, ours, reps):
    """Alternates reference and ours; returns medians and the median ratio."""
    refs, mine, ratios, lat = [], [], [], []
    for _ in range(reps):
        r = reference()
        m = ours()
        refs.append(r)
        mine.append(m["iops"])
        lat.append(m["p99_us"])
        ratios.append(m["iops"] / r)
    return {
        "reference_iops": statistics.median(refs),
        "claudefs_iops": statistics.median(mine),
        "ratio": statistics.median(ratios),
        "ratios": [round(x, 3) for x in ratios],
        "claudefs_p99_us": statistics.median(lat),
    }


def bench_null(reps, secs):
    config = write_config([{"method": "bdev_null_create", "params": {"name": "Null0", "num_blocks": 1 << 20}}])
    res = pairs(lambda: fio("/dev/null", 128, secs, engine="null", extra=["--size=4g"]),
                lambda: bdevperf(config, 128, secs), reps)
    res["ns_per_io"] = 1e9 / res["claudefs_iops"]
    # Instructions inside the bdevperf job's poller (bdev channel poll, completion
    # handling, resubmission: all per-I/O work) divided by the I/Os completed,
    # under callgrind. The reactor loop around it (amortised over 128 I/Os per
    # round) and idle rounds before and after the job are left out.
    with tempfile.TemporaryDirectory() as d:
        out_file = os.path.join(d, "cg.out")
        report = run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}",
                      "--toggle-collect=*bdevperf*Job*poll*", BIN, "bdevperf", "-c", config, "-q", "128", "-o", "4k",
                      "-w", "randread", "-t", "3", "-m", "0x1", "--json"])
        job = json.loads(report)["jobs"][-1]
        ios = job["ios"]
        summary = run(["callgrind_annotate", out_file])
        m = re.search(r"([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS", summary) or re.search(r"^([\d,]+)\s+.*PROGRAM TOTALS", summary, re.M)
        instructions = int(m.group(1).replace(",", ""))
        res["instructions_per_io"] = instructions / ios
        res["callgrind_ios"] = ios
    os.unlink(config)
    return res


def bench_target(target, reps, secs):
    config = write_config([{"method": "bdev_uring_create", "params": {"name": "U0", "filename": target}}])
    out = {d: pairs(lambda: fio(target, d, secs), lambda: bdevperf(config, d, secs), reps) for d in DEPTHS}
    os.unlink(config)
    return out


def loop_target():
    img = "/dev/shm/claudefs-bench.img"
    run(["fallocate", "-l", "1G", img])
    dev = run(["losetup", "--direct-io=on", "-f", "--show", img]).strip()
    run(["dd", "if=/dev/urandom", f"of={dev}", "bs=1M", "count=1024", "oflag=direct", "status=none"])
    return dev, img


def disk_target():
    img = "/var/tmp/claudefs-bench.img"
    if not os.path.exists(img) or os.path.getsize(img) != 2 << 30:
        # Real data, not holes: O_DIRECT reads of holes never reach the disk.
        run(["dd", "if=/dev/urandom", f"of={img}", "bs=1M", "count=2048", "oflag=direct", "status=none"])
    return img


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in zip(axes, ["loop", "disk"], ["loop device over tmpfs (software-bound)", "file on the root disk (device-bound)"]):
        if key not in results:
            ax.set_visible(False)
            continue
        r = results[key]
        ax.plot(DEPTHS, [r[d]["reference_iops"] / 1e3 for d in DEPTHS], "o-", label="fio io_uring")
        ax.plot(DEPTHS, [r[d]["claudefs_iops"] / 1e3 for d in DEPTHS], "s-", label="claudefs uring bdev")
        for d in DEPTHS:
            ax.annotate(f"{r[d]['ratio']:.2f}x", (d, r[d]["claudefs_iops"] / 1e3), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(DEPTHS, [str(d) for d in DEPTHS])
        ax.set_xlabel("queue depth (4 KiB random reads, one core)")
        ax.set_ylabel("kIOPS (median)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--secs", type=int, default=3)
    ap.add_argument("--only", choices=["null", "loop", "disk"])
    ap.add_argument("--report", action="store_true", help="only print and plot the saved results")
    args = ap.parse_args()
    saved = os.path.join(ROOT, "hack/bench/results/bdev.json")
    if args.report:
        with open(saved) as f:
            results = {k: ({int(d): r for d, r in v.items()} if k != "null" else v) for k, v in json.load(f).items()}
        return report(results, args)
    subprocess.run([os.path.join(ROOT, "hack/deps.sh"), "bench"], check=True)
    subprocess.run(["cargo", "build", "--release", "--bin", "claudefs"], check=True, cwd=ROOT)

    results = {}
    if args.only in (None, "null"):
        results["null"] = bench_null(args.reps, args.secs)
    if args.only in (None, "loop"):
        dev, img = loop_target()
        try:
            results["loop"] = bench_target(dev, args.reps, args.secs)
        finally:
            subprocess.run(["losetup", "-d", dev])
            os.unlink(img)
    if args.only in (None, "disk"):
        results["disk"] = bench_target(disk_target(), args.reps, args.secs)

    os.makedirs(os.path.join(ROOT, "hack/bench/results"), exist_ok=True)
    with open(saved, "w") as f:
        json.dump(results, f, indent=2)
    return report(results, args)


def report(results, args):
    os.makedirs(os.path.join(ROOT, "docs/perf"), exist_ok=True)
    if "loop" in results or "disk" in results:
        plot(results, os.path.join(ROOT, "docs/perf/bdev.png"))

    if "null" in results:
        n = results["null"]
        print("| null bdev, 4 KiB randread, QD128, 1 core | claudefs | fio null engine | ratio |")
        print("|---|---|---|---|")
        print(f"| IOPS (median of {len(n['ratios'])}) | {n['claudefs_iops']/1e6:.2f} M | {n['reference_iops']/1e6:.2f} M | {n['ratio']:.2f} |")
        print(f"| ns per I/O | {n['ns_per_io']:.0f} | {1e9/n['reference_iops']:.0f} | |")
        print(f"| instructions per I/O (callgrind) | {n['instructions_per_io']:.0f} | | |")
        print()
    for key, name in [("loop", "loop device over tmpfs"), ("disk", "file on the root disk")]:
        if key not in results:
            continue
        print(f"| {name}: 4 KiB randread, 1 core | fio io_uring IOPS | claudefs IOPS | ratio (median of pairs) | claudefs p99 |")
        print("|---|---|---|---|---|")
        for d in DEPTHS:
            r = results[key][d]
            print(f"| QD {d} | {r['reference_iops']/1e3:.1f} k | {r['claudefs_iops']/1e3:.1f} k | {r['ratio']:.2f} | {r['claudefs_p99_us']:.0f} us |")
        print()


if __name__ == "__main__":
    sys.exit(main())
