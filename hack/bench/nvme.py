#!/usr/bin/python3
"""CPU cost of the NVMe driver per 4 KiB read (submission plus completion),
without the device's cost, counted by callgrind.

  hack/bench/nvme.py [--ios N] [--reps R]
  hack/bench/nvme.py --report      (the table from the saved results)

`nvme/examples/nvme_cost.rs` drives N reads at queue depth 32 through an I/O
queue pair on the test twin's emulated controller, which runs only between
the driver's calls; callgrind counts the instructions inside the driver's
entry points (one never-inlined wrapper each around IoQpair::submit_raw,
::poll and ::completions) with --toggle-collect. The reference, in the same run, is the same loop through
a bdev channel on a null bdev (the bdev layer's own cost per I/O: the floor
any backend adds to). Instruction counts do not depend on the host's noise;
the runs are repeated anyway and the median taken. Results go to
hack/bench/results/nvme.json; the Markdown table is printed for
docs/PERFORMANCE.md.
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
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BIN = os.path.join(TARGET, "release/examples/nvme_cost")
RESULTS = os.path.join(ROOT, "hack/bench/results/nvme.json")
GOAL = 1000

TOGGLES = {
    "driver": ["nvme_cost::measured_submit", "nvme_cost::measured_poll", "nvme_cost::measured_completions"],
    "null": ["nvme_cost::measured_null_submit", "nvme_cost::measured_null_poll"],
}


def instructions(mode, ios):
    """Instructions inside the toggled functions, per I/O."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "cg.out")
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--collect-atstart=no"]
        cmd += [f"--toggle-collect={t}" for t in TOGGLES[mode]]
        subprocess.run(cmd + [BIN, mode, str(ios)], check=True, capture_output=True)
        text = open(out).read()
        total = int(re.search(r"^summary:\s+(\d+)", text, re.M).group(1))
    return total / ios


def report(r):
    print("| 4 KiB read, QD 32, instructions per I/O (callgrind) | driver (submission + completion) | null bdev path (reference) | ratio |")
    print("|---|---|---|---|")
    print(f"| median of {len(r['driver'])} runs of {r['ios']} I/Os | {r['driver_median']:.0f} | {r['null_median']:.0f} | "
          f"{r['ratio']:.2f} |")
    met = "met" if r["driver_median"] <= GOAL else "NOT met"
    print(f"\nGoal: at most {GOAL} instructions per I/O: **{met}**.")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ios", type=int, default=200_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--report", action="store_true")
    a = ap.parse_args()
    if a.report:
        report(json.load(open(RESULTS)))
        return
    subprocess.run([os.path.join(ROOT, "hack/deps.sh"), "bench"], check=True)
    subprocess.run(["cargo", "build", "--release", "-p", "claudefs-nvme", "--example", "nvme_cost"], check=True, cwd=ROOT)
    driver, null = [], []
    for _ in range(a.reps):
        null.append(instructions("null", a.ios))
        driver.append(instructions("driver", a.ios))
        print(f"driver {driver[-1]:.1f}, null bdev {null[-1]:.1f} instructions per I/O", file=sys.stderr)
    r = {
        "ios": a.ios,
        "driver": driver,
        "null": null,
        "driver_median": statistics.median(driver),
        "null_median": statistics.median(null),
        "ratio": statistics.median(d / n for d, n in zip(driver, null)),
    }
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    json.dump(r, open(RESULTS, "w"), indent=1)
    report(r)


if __name__ == "__main__":
    main()
