#!/usr/bin/python3
"""Blobstore benchmarks, each against a reference measured in the same run.

  hack/bench/blobstore.py [--reps N] [--only io|md|load] [--report]

- io: 4 KiB random writes and reads at depth 32 on a blob of a malloc bdev
  (`claudefs bdevperf --blobstore 1m`) against the raw malloc bdev
  (`claudefs bdevperf`), run alternately; the median of per-pair ratios.
- md: metadata operations per second (create, resize+sync, snapshot, clone)
  at depth 1 and 32, on a malloc bdev (software-bound) and on a file on the
  root disk (device-bound), against raw 4 KiB FUA writes per second at
  depth 1 on the same bdev, measured by the same process just before.
- load: clean load and dirty recovery of stores of 100,000 blobs on sparse
  files of 64 GiB to 4 TiB (the journal filled to just under its checkpoint
  threshold before the crash); plot in docs/perf/blobstore-load.png.

Results: hack/bench/results/blobstore.json; tables printed for docs/PERFORMANCE.md.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "target/release/claudefs")
SAVED = os.path.join(ROOT, "hack/bench/results/blobstore.json")
SIZES = [("64 GiB", 64 << 30), ("256 GiB", 256 << 30), ("1 TiB", 1 << 40), ("4 TiB", 4 << 40)]


def run_json(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def config(calls):
    f = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump(calls, f)
    f.close()
    return f.name


def bench_io(reps):
    cfg = config([{"method": "bdev_malloc_create", "params": {"name": "Malloc0", "num_blocks": 262144, "block_size": 4096}}])
    out = {}
    for w in ["randwrite", "randread"]:
        base = [BIN, "bdevperf", "-c", cfg, "-q", "32", "-o", "4k", "-w", w, "-t", "3", "--json"]
        raw, blob, ratios = [], [], []
        for _ in range(reps):
            r = run_json(base)["jobs"][-1]["iops"]
            b = run_json(base + ["--blobstore", "1m"])["jobs"][-1]["iops"]
            raw.append(r)
            blob.append(b)
            ratios.append(b / r)
        out[w] = {"raw_iops": statistics.median(raw), "blob_iops": statistics.median(blob),
                  "ratio": statistics.median(ratios), "ratios": [round(x, 3) for x in ratios]}
    os.unlink(cfg)
    return out


def bench_md(reps):
    targets = {
        "malloc": [{"method": "bdev_malloc_create", "params": {"name": "B0", "num_blocks": 262144, "block_size": 4096}}],
        "disk file": [{"method": "bdev_uring_create", "params": {"name": "B0", "filename": "/var/tmp/claudefs-md.img", "size": 4 << 30}}],
    }
    out = {}
    for name, calls in targets.items():
        cfg = config(calls)
        for depth in [1, 32]:
            runs = []
            for _ in range(reps):
                if os.path.exists("/var/tmp/claudefs-md.img"):
                    os.unlink("/var/tmp/claudefs-md.img")
                runs.append(run_json([BIN, "blobperf", "-c", cfg, "-b", "B0", "--json", "md", "--ops", "1000", "--depth", str(depth)]))
            row = {"raw_fua_4k_writes_per_s": statistics.median(r["raw_fua_4k_writes_per_s"] for r in runs)}
            for op in ["create", "resize_sync", "snapshot", "clone"]:
                row[op] = statistics.median(r[op]["ops_per_s"] for r in runs)
                row[op + "_ratio"] = statistics.median(r[op]["ratio_to_raw_fua_writes"] for r in runs)
            row["journal_writes_per_op"] = statistics.median(r["journal_writes"] / (4 * 1000 + depth + 1) for r in runs)
            out[f"{name}, depth {depth}"] = row
        os.unlink(cfg)
    if os.path.exists("/var/tmp/claudefs-md.img"):
        os.unlink("/var/tmp/claudefs-md.img")
    return out


def bench_load(blobs):
    out = {}
    for label, size in SIZES:
        img = f"/var/tmp/claudefs-load-{size >> 30}g.img"
        if os.path.exists(img):
            os.unlink(img)
        cfg = config([{"method": "bdev_uring_create", "params": {"name": "U0", "filename": img, "size": size}}])
        r = run_json([BIN, "blobperf", "-c", cfg, "-b", "U0", "--json", "load", "--blobs", str(blobs)])
        out[label] = {"bytes": size, "clean_load_s": r["clean_load_s"], "dirty_load_s": r["dirty_load_s"],
                      "replayed_records": r["dirty"]["replayed_records"], "dirty_journal_pages": r["dirty_journal_pages"],
                      "fill_s": r["fill_s"]}
        os.unlink(cfg)
        os.unlink(img)
    return out


def plot(load, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [l for l, _ in SIZES if l in load]
    x = [load[l]["bytes"] / (1 << 30) for l in labels]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(x, [load[l]["clean_load_s"] for l in labels], "o-", label="clean load")
    ax.plot(x, [load[l]["dirty_load_s"] for l in labels], "s-", label="dirty recovery (journal 40% full)")
    ax.axhline(1.0, color="tab:blue", ls=":", lw=1, label="goal, clean: 1 s")
    ax.axhline(5.0, color="tab:orange", ls=":", lw=1, label="goal, dirty: 5 s")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 5.5)
    ax.set_xlabel("device size (sparse file), 100,000 blobs")
    ax.set_ylabel("seconds")
    ax.set_title("blobstore load time against device size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(r):
    if "io" in r:
        print("| 4 KiB random, depth 32, malloc bdev | raw bdev IOPS | blob IOPS | ratio (median of pairs) |")
        print("|---|---|---|---|")
        for w, v in r["io"].items():
            print(f"| {w} | {v['raw_iops']/1e3:.0f} k | {v['blob_iops']/1e3:.0f} k | {v['ratio']:.2f} |")
        print()
    if "md" in r:
        print("| bdev, depth | raw FUA 4K writes/s | create | resize+sync | snapshot | clone | journal writes per op |")
        print("|---|---|---|---|---|---|---|")
        for k, v in r["md"].items():
            cells = " | ".join(f"{v[op]:,.0f}/s ({v[op + '_ratio']:.1f}x)" for op in ["create", "resize_sync", "snapshot", "clone"])
            print(f"| {k} | {v['raw_fua_4k_writes_per_s']:,.0f} | {cells} | {v['journal_writes_per_op']:.2f} |")
        print()
    if "load" in r:
        print("| device (sparse file), 100,000 blobs | clean load | dirty recovery | records replayed |")
        print("|---|---|---|---|")
        for k, v in r["load"].items():
            print(f"| {k} | {v['clean_load_s']:.2f} s | {v['dirty_load_s']:.2f} s | {v['replayed_records']} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--blobs", type=int, default=100_000)
    ap.add_argument("--only", choices=["io", "md", "load"])
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    if args.report:
        with open(SAVED) as f:
            report(json.load(f))
        return
    subprocess.run([os.path.join(ROOT, "hack/deps.sh"), "bench"], check=True)
    subprocess.run(["cargo", "build", "--release", "--bin", "claudefs"], check=True, cwd=ROOT)
    results = {}
    if os.path.exists(SAVED):
        with open(SAVED) as f:
            results = json.load(f)
    if args.only in (None, "io"):
        results["io"] = bench_io(args.reps)
    if args.only in (None, "md"):
        results["md"] = bench_md(max(1, args.reps // 2))
    if args.only in (None, "load"):
        results["load"] = bench_load(args.blobs)
        os.makedirs(os.path.join(ROOT, "docs/perf"), exist_ok=True)
        plot(results["load"], os.path.join(ROOT, "docs/perf/blobstore-load.png"))
    os.makedirs(os.path.dirname(SAVED), exist_ok=True)
    with open(SAVED, "w") as f:
        json.dump(results, f, indent=2)
    report(results)


if __name__ == "__main__":
    sys.exit(main())
