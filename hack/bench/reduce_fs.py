#!/usr/bin/python3
"""Data reduction through the FUSE mount: 10 copies of one random file.

  hack/bench/reduce_fs.py [--reps N] [--size-mib M] [--copies C]
  hack/bench/reduce_fs.py --report      (table from the saved results)
  hack/bench/reduce_fs.py --gc          (foreground writes during garbage collection)

For each rep, twice on a fresh image (the order alternates between reps):
`claudefs up` with a master key, a directory with reduction off (no policy)
or with the policy `cdc:16k:64k:256k,lz4,enc` (dedupe, LZ4, encryption),
then C copies (default 10) of an M MiB (default 100) random file from
/dev/shm written into it with `dd bs=1M conv=fsync` one after the other.
Reported per variant: MB/s over all copies (wall time, fsync included) and,
from `fs_get_reduce_stats`, the logical and stored bytes; the goal ratios
(issue 5): reduction about C:1 and throughput with reduction at least 60% of
the same workload without it, as the median of the per-rep ratios. Every
copy is read back and compared with the source after the timing.

With --gc: one reduced file system; 64 files of 8 MiB written, then in each
three of every four 256 KiB ranges overwritten, which leaves segments about
a quarter live (garbage collection copies those below half). Right after, a
512 MiB file is written with `dd bs=1M conv=fsync` while the collector works;
once it has nothing left to do, another. Reported: both MB/s, their ratio,
and what the collector moved during the first (its limit: 64 MiB/s).
Results: hack/bench/results/reduce_gc.json.

CLAUDEFS_BIN names a claudefs binary to use as is; without it the script
runs `cargo build --release --bin claudefs`. Needs root and /dev/fuse.
Results: hack/bench/results/reduce_fs.json.
"""

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fs import settle as fs_settle  # noqa: E402
from reduce import binary, log  # noqa: E402

SAVED = os.path.join(ROOT, "hack/bench/results/reduce_fs.json")
POLICY = "cdc:16k:64k:256k,lz4,enc"
GOAL_SPEED = 0.60


def settle():
    """Syncs and waits until the disk has been idle for 2 s (fs.py's)."""
    return fs_settle("/var/tmp")


class Up:
    def __init__(self, bin_, work, size_gib):
        self.bin, self.work = bin_, work
        self.image = os.path.join(work, "img")
        self.mnt = os.path.join(work, "mnt")
        self.sock = os.path.join(work, "sock")
        self.key = os.path.join(work, "key")
        os.makedirs(self.mnt, exist_ok=True)
        with open(self.key, "wb") as f:
            f.write(os.urandom(32))
        self.log = open(os.path.join(work, "up.log"), "w")
        self.proc = subprocess.Popen(
            [bin_, "up", "--image", self.image, "--size", f"{size_gib}g", "--mount", self.mnt,
             "--key-file", self.key, "-r", self.sock, "-m", "0x1"],
            stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"claudefs up exited: {open(self.log.name).read()}")
            if "file system mounted on" in open(self.log.name).read():
                return
            time.sleep(0.1)
        raise SystemExit("claudefs up did not mount in 300 s")

    def rpc(self, method, params=None):
        cmd = [self.bin, "rpc", "-s", self.sock, method] + ([json.dumps(params)] if params is not None else [])
        return json.loads(subprocess.run(cmd, check=True, capture_output=True).stdout)

    def down(self):
        subprocess.run([self.bin, "down", "-s", self.sock], check=True, capture_output=True)
        self.proc.wait(timeout=120)
        os.unlink(self.image)


def one(bin_, src, copies, reduced, digest):
    work = tempfile.mkdtemp(prefix="cfs-reduce-bench-", dir="/var/tmp")
    size = os.path.getsize(src)
    up = Up(bin_, work, -(-copies * size // (1 << 30)) + 1)
    try:
        d = os.path.join(up.mnt, "d")
        os.mkdir(d)
        if reduced:
            os.setxattr(d, "claudefs.reduce", POLICY.encode())
        start = time.monotonic()
        for i in range(copies):
            subprocess.run(["dd", f"if={src}", f"of={d}/copy{i}", "bs=1M", "iflag=fullblock", "conv=fsync",
                            "status=none"], check=True)
        secs = time.monotonic() - start
        stats = up.rpc("fs_get_reduce_stats")[0]
        fs = up.rpc("fs_get_stats")[0]
        for i in range(copies):
            h = hashlib.sha256()
            with open(f"{d}/copy{i}", "rb") as f:
                while b := f.read(1 << 20):
                    h.update(b)
            if h.hexdigest() != digest:
                raise SystemExit(f"copy{i} reads back different bytes (reduced={reduced})")
        return {
            "reduced": reduced,
            "policy": POLICY if reduced else None,
            "secs": secs,
            "mb_s": copies * size / secs / 1e6,
            "logical_bytes": copies * size,
            # Bytes the store holds for the data: segments when reduced, mapped pages when not.
            "stored_bytes": stats["segment_bytes"] if reduced else fs["data_bytes"],
            "stats": stats,
        }
    finally:
        up.down()
        shutil.rmtree(work, ignore_errors=True)
        settle()


FILES = 64


def gc_interference(bin_):
    work = tempfile.mkdtemp(prefix="cfs-reduce-gc-", dir="/var/tmp")
    up = Up(bin_, work, 3)
    try:
        d = os.path.join(up.mnt, "d")
        os.mkdir(d)
        os.setxattr(d, "claudefs.reduce", POLICY.encode())
        piece = 256 << 10
        for i in range(FILES):
            with open(f"{d}/f{i}", "wb") as f:
                for _ in range(8):
                    f.write(os.urandom(1 << 20))
        # Two sources, so that the second write does not dedupe against the first.
        srcs = {n: f"/dev/shm/claudefs-reduce-gc-{n}" for n in ("during", "idle")}
        for path in srcs.values():
            with open(path, "wb") as f:
                f.write(os.urandom(512 << 20))
        junk = os.urandom(piece)
        for i in range(FILES):
            fd = os.open(f"{d}/f{i}", os.O_WRONLY)
            for k in range((8 << 20) // piece):
                if k % 4 != 0:
                    # Fresh bytes per piece (a repeated piece would dedupe).
                    os.pwrite(fd, junk[:-16] + os.urandom(16), k * piece)
            os.close(fd)

        def write(name):
            src = srcs[name]
            before = up.rpc("fs_get_reduce_stats")[0]
            t = time.monotonic()
            subprocess.run(["dd", f"if={src}", f"of={d}/{name}", "bs=1M", "conv=fsync", "status=none"], check=True)
            secs = time.monotonic() - t
            after = up.rpc("fs_get_reduce_stats")[0]
            return {"mb_s": (512 << 20) / secs / 1e6, "secs": secs,
                    "gc_bytes_moved": after["gc_bytes_moved"] - before["gc_bytes_moved"],
                    "gc_candidates_before": before["gc_candidates"]}
        during = write("during")
        deadline = time.time() + 600
        while up.rpc("fs_get_reduce_stats")[0]["gc_candidates"] > 0 and time.time() < deadline:
            time.sleep(1)
        idle = write("idle")
        for path in srcs.values():
            os.unlink(path)
        stats = up.rpc("fs_get_reduce_stats")[0]
        return {"during_gc": during, "gc_idle": idle, "ratio": during["mb_s"] / idle["mb_s"], "stats": stats}
    finally:
        up.down()
        shutil.rmtree(work, ignore_errors=True)
        settle()


def report(runs):
    by = {False: [r for r in runs if not r["reduced"]], True: [r for r in runs if r["reduced"]]}
    speed = [on["mb_s"] / off["mb_s"] for off, on in zip(by[False], by[True])]
    ratio = [r["logical_bytes"] / r["stored_bytes"] for r in by[True]]
    med = lambda xs: statistics.median(xs) if xs else float("nan")
    print("| variant | write MB/s (median) | logical : stored |")
    print("|---|---|---|")
    print(f"| reduction off | {med([r['mb_s'] for r in by[False]]):.0f} | "
          f"{med([r['logical_bytes'] / r['stored_bytes'] for r in by[False]]):.2f} : 1 |")
    print(f"| `{POLICY}` | {med([r['mb_s'] for r in by[True]]):.0f} | {med(ratio):.2f} : 1 |")
    print()
    s = med(speed)
    print(f"throughput with reduction / without, median of {len(speed)} paired reps: {s:.2f} "
          f"(goal >= {GOAL_SPEED}: {'met' if s >= GOAL_SPEED else 'not met'}); per rep: "
          + ", ".join(f"{x:.2f}" for x in speed))
    print(f"reduction (logical : stored): {med(ratio):.2f} : 1 (goal about {runs[0]['copies']} : 1)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=100)
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--gc", action="store_true")
    a = ap.parse_args()
    if a.gc:
        r = gc_interference(binary())
        r["date"] = time.strftime("%Y-%m-%d %H:%M")
        json.dump(r, open(os.path.join(ROOT, "hack/bench/results/reduce_gc.json"), "w"), indent=1)
        print(f"write during garbage collection: {r['during_gc']['mb_s']:.0f} MB/s "
              f"(collector moved {r['during_gc']['gc_bytes_moved'] / 2**20:.0f} MiB meanwhile, "
              f"{r['during_gc']['gc_candidates_before']} segments waiting at the start); "
              f"collector idle: {r['gc_idle']['mb_s']:.0f} MB/s; ratio {r['ratio']:.2f}")
        return
    if a.report:
        report(json.load(open(SAVED))["runs"])
        return
    bin_ = binary()
    src = "/dev/shm/claudefs-reduce-src"
    with open(src, "wb") as f:
        f.write(os.urandom(a.size_mib << 20))
    digest = hashlib.sha256(open(src, "rb").read()).hexdigest()
    runs = []
    try:
        for rep in range(a.reps):
            for reduced in ([False, True] if rep % 2 == 0 else [True, False]):
                r = one(bin_, src, a.copies, reduced, digest)
                r.update(rep=rep, copies=a.copies, size_mib=a.size_mib)
                log(f"rep {rep} reduced={reduced}: {r['mb_s']:.0f} MB/s, "
                    f"{r['logical_bytes'] / r['stored_bytes']:.2f}:1")
                runs.append(r)
    finally:
        os.unlink(src)
    runs.sort(key=lambda r: (r["reduced"], r["rep"]))
    os.makedirs(os.path.dirname(SAVED), exist_ok=True)
    json.dump({"date": time.strftime("%Y-%m-%d %H:%M"), "runs": runs}, open(SAVED, "w"), indent=1)
    report(runs)


if __name__ == "__main__":
    main()
