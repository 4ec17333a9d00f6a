#!/usr/bin/python3
"""ClaudeFS mounted against ext4, GlusterFS and MooseFS: one workload set, one run, one disk.

  hack/bench/fs.py [--reps N] [--secs S] [--only claudefs,ext4,gluster,moosefs] [--no-pjdfstest]
  hack/bench/fs.py --report      (tables and plots from the saved results)

Needs root (loop devices, FUSE mounts, network namespaces, drop_caches);
`hack/deps.sh bench` (run first) installs the peers, fio and pjdfstest.
CLAUDEFS_BIN names a claudefs binary to use as is; without it the script runs
`cargo build --release --bin claudefs` and uses
${CARGO_TARGET_DIR:-target}/release/claudefs. A default run (3 reps, 10 s
random-I/O jobs, pjdfstest) takes about 10 minutes on the 2-core VM; each rep
of the four file systems about 3 minutes. No glusterd or MooseFS daemon of
the machine may be running (on a machine with systemd, installing the
packages starts them: stop them first); the script refuses a running glusterd.

File systems, each set up fresh for every rep and torn down after it (also on
an error or Ctrl-C), everything on the root disk under /var/tmp/claudefs-bench;
after each teardown the script syncs and waits until the disk has been idle
for 2 s (deleting an image makes the host discard its blocks):
- claudefs: `claudefs up` on a new 4 GiB image file, which `up` writes in
  full (default options: one reactor on core 0), FUSE-mounted; stopped with
  `claudefs down`, image deleted.
- ext4: the kernel-local reference. mkfs.ext4 (inode tables and journal
  initialised up front, so no lazy-init thread writes during the run) on a
  loop device with direct I/O (`losetup --direct-io=on`) over a 4 GiB file
  written in full first, as ClaudeFS's is (a sparse one makes the host
  allocate under the first writes): reads after a cache drop reach the disk,
  not a second page cache.
- gluster: GlusterFS, one node, one brick (a plain distribute volume with its
  default options), glusterd with a private working directory and bound to
  127.0.0.1, the brick host a name that resolves to 127.0.0.1 only (the
  machine's host name if it does, else a temporary /etc/hosts line), FUSE
  client (`glusterfs`). What glusterd writes outside its working directory
  (/var/lib/glusterd, /var/log/glusterfs, /run/gluster) is listed before it
  starts and whatever is new is removed at the end.
- moosefs: MooseFS 3.0, master and chunkserver each in a network namespace
  made here, joined by a veth pair with private addresses (MooseFS refuses
  127.x); the client (mfsmount) runs in the master's namespace (nsenter
  --net only, so its FUSE mount is seen by everyone). Trash time 0. Daemons
  and client at nice 0 (MooseFS's default is -19, which would favour it).
  Client and chunkserver otherwise at their defaults (the client flushes a
  file's writes to the chunkserver before the last close).
- fuse_floor: not a file system a user would pick but the floor under every
  FUSE one: clients/examples/fuse_floor.rs keeps files in memory and answers
  each request on the fuser thread that read it, mounted with ClaudeFS's
  options (built here with cargo). What it reaches is what the kernel, the
  FUSE device and fuser's threads allow on this host; it runs the metadata
  and small-file workloads only (no fio, no pjdfstest).

Workloads, each in a fresh directory of the mount:
- creates, stats, unlinks of 5,000 empty files in one directory; mkdir and
  rmdir of 2,000 directories; 2,000 small files of 4 KiB written
  (open/write/close) then read back. These loops run in hack/bench/fsops.c
  (built with gcc at the start), which times the loop alone; a C loop adds
  well under a microsecond per operation, so even ext4's figures are the file
  system's. Caches are dropped (sync; echo 3 > drop_caches) before the stats
  and before the reads, so both reach the file system (for FUSE: the daemon).
- fio, on one 512 MiB file: sequential write (1 MiB blocks, psync, buffered,
  end_fsync=1, fsync time included) and, after a cache drop, sequential read:
  MB/s. Then 4 KiB random reads and random writes on the same file (already
  laid out by the write), libaio, direct=1, iodepth 16, --secs seconds each:
  IOPS. A file system refusing O_DIRECT is run with direct=0 instead, and that
  is recorded.
- pjdfstest (crates.io 0.2.2, configs/pjdfstest.toml, as tests/mount.rs runs
  it) in a short path on the mount (Unix socket paths are limited to 108
  bytes): failed/skipped/passed. Once per file system (first rep): counts do
  not need medians. --no-pjdfstest leaves it out.

The file systems run one after the other in a fixed order (claudefs,
claudefs_wb, ext4, gluster, moosefs, fuse_floor), --reps times; each figure is
the median over reps, and each ratio ClaudeFS/peer is the median of the
per-rep ratios, so that a burst of host noise (see docs/PERFORMANCE.md, "How we measure") hits both sides of a
ratio alike. Nothing is pinned: every file system runs daemons of its own and
they, like the kernel's FUSE and block paths, take whichever core is free.
Every raw value is kept in hack/bench/results/fs.json; the plots go to
docs/perf/fs-meta.png and docs/perf/fs-io.png; the Markdown tables, with the
goals and whether each is met, are printed for docs/PERFORMANCE.md.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "hack/bench/results/fs.json")
BASE = "/var/tmp/claudefs-bench"
FILESYSTEMS = ["claudefs", "claudefs_wb", "ext4", "gluster", "moosefs", "fuse_floor"]
NAME = {"claudefs": "ClaudeFS", "claudefs_wb": "ClaudeFS (writeback cache)", "ext4": "ext4 (loop)",
        "gluster": "GlusterFS", "moosefs": "MooseFS", "fuse_floor": "FUSE floor (in memory)"}
OURS = ["claudefs", "claudefs_wb"]
PEERS = ["ext4", "gluster", "moosefs", "fuse_floor"]
# References that run the metadata and small-file workloads only.
META_ONLY = ["fuse_floor"]
FILES, DIRS, SMALL, SMALL_SIZE = 5000, 2000, 2000, 4096
FIO_SIZE = "512m"  # fio's notation: 512 MiB
# Metric key, label, unit.
META = [("create", "creates", "ops/s"), ("stat", "stats", "ops/s"), ("unlink", "unlinks", "ops/s"),
        ("mkdir", "mkdirs", "ops/s"), ("rmdir", "rmdirs", "ops/s"),
        ("small_write", "4 KiB files written", "files/s"), ("small_read", "4 KiB files read", "files/s")]
IO = [("seq_write", "seq. write 1 MiB", "MB/s"), ("seq_read", "seq. read 1 MiB", "MB/s"),
      ("rand_read", "4 KiB random read QD16", "IOPS"), ("rand_write", "4 KiB random write QD16", "IOPS")]
METRICS = META + IO
# (metric, peer, minimum ratio ClaudeFS/peer)
GOALS = [(m, p, r) for m in ["create", "unlink", "small_write"] for p, r in [("moosefs", 3), ("gluster", 10)]] + \
        [("rand_read", p, 3) for p in ["moosefs", "gluster"]] + [("rand_write", p, 2) for p in ["moosefs", "gluster"]] + \
        [("seq_write", "ext4", 0.7), ("seq_read", "ext4", 0.7)]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def run(cmd, timeout=120, **kw):
    """Runs `cmd`; its stdout, or CalledProcessError with stdout and stderr."""
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout, **kw).stdout


def quiet(cmd, timeout=60):
    """Runs a teardown step; failures are only reported."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if r.returncode:
            log(f"    (teardown: {' '.join(cmd)}: exit {r.returncode}: {(r.stderr or r.stdout).strip()[-300:]})")
        return r.returncode == 0
    except Exception as e:  # noqa: BLE001 - teardown goes on whatever happened
        log(f"    (teardown: {' '.join(cmd)}: {e})")
        return False


def mounted(path):
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == path for line in f)


def wait_for(what, cond, secs, proc=None, logfile=None):
    deadline = time.time() + secs
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}{tail(logfile)}")
        if time.time() > deadline:
            raise RuntimeError(f"{what}: not ready after {secs} s{tail(logfile)}")
        time.sleep(0.05)


def tail(path, n=15):
    if not path or not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        return "\n  " + "\n  ".join(f.read().splitlines()[-n:])


def stop(proc, secs=30):
    """SIGTERM, then SIGKILL after `secs`; reaps the process."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=secs)
    except subprocess.TimeoutExpired:
        log(f"    (pid {proc.pid} ignored SIGTERM for {secs} s: SIGKILL)")
        proc.kill()
        proc.wait(timeout=30)


def unmount(path):
    if not mounted(path):
        return
    for _ in range(20):
        if quiet(["umount", path]) or not mounted(path):
            return
        time.sleep(0.5)
    quiet(["umount", "-l", path])


def daemon(cmd, logfile, netns=None):
    """A background process in a session of its own (a Ctrl-C on the terminal
    reaches this script only, which then tears down in order)."""
    if netns:
        cmd = ["nsenter", f"--net=/run/netns/{netns}"] + cmd
    with open(logfile, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def disk_of(path):
    """The block device (as /proc/diskstats names it) holding `path`."""
    dev = os.stat(path).st_dev
    name = os.path.basename(os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"))
    parent = os.path.realpath(f"/sys/class/block/{name}/..")
    return os.path.basename(parent) if os.path.exists(os.path.join(parent, "queue")) else name


def settle(path, quiet_secs=2, limit=120):
    """Syncs, then waits (at most `limit` s) until the disk under `path` has
    done no I/O for `quiet_secs`: deleting a file system's image makes the
    host discard its blocks (the root is mounted with `discard` here), and
    that traffic must not land on the next file system's measurements.
    Returns the seconds waited."""
    run(["sync"], timeout=300)
    disk, t0 = disk_of(path), time.time()

    def counters():
        with open("/proc/diskstats") as f:
            for line in f:
                p = line.split()
                if p[2] == disk:
                    return p[3:]
        return None
    last, quiet_since = counters(), time.time()
    while time.time() - t0 < limit and time.time() - quiet_since < quiet_secs:
        time.sleep(0.25)
        now = counters()
        if now != last:
            last, quiet_since = now, time.time()
    return round(time.time() - t0, 1)


def drop_caches():
    run(["sync"], timeout=300)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


# ---------------------------------------------------------------- file systems

class ClaudeFS:
    def __init__(self, binary, writeback_cache=False):
        self.bin = binary
        self.extra = ["--writeback-cache"] if writeback_cache else []
        self.mnt = os.path.join(BASE, "claudefs_wb" if writeback_cache else "claudefs")
        self.image = os.path.join(BASE, "disk.img")
        self.sock = os.path.join(BASE, "claudefs.sock")
        self.log = os.path.join(BASE, "claudefs.log")
        self.proc = None
        self.warnings = []

    def version(self):
        return run([self.bin, "--version"]).strip()

    def up(self):
        os.makedirs(self.mnt, exist_ok=True)
        for p in (self.image, self.sock, self.log):
            if os.path.exists(p):
                os.unlink(p)
        self.proc = daemon([self.bin, "up", "--image", self.image, "--size", "4g", "--mount", self.mnt, "-r", self.sock,
                            *self.extra], self.log)

        def ready():
            if not os.path.exists(self.sock):
                return False
            r = subprocess.run([self.bin, "rpc", "-s", self.sock, "fs_get_mounts"], capture_output=True, text=True,
                               timeout=30)
            return r.returncode == 0 and f'"{self.mnt}"' in r.stdout
        wait_for("claudefs up", ready, 60, self.proc, self.log)
        return self.mnt

    def down(self):
        if self.proc is not None and self.proc.poll() is None:
            quiet([self.bin, "down", "-s", self.sock], timeout=120)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                log("    (claudefs up still running 120 s after `claudefs down`: SIGKILL)")
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.returncode:
            log(f"    (claudefs up exited with {self.proc.returncode}{tail(self.log)})")
            self.warnings.append(f"claudefs up exited with {self.proc.returncode}")
        self.proc = None
        unmount(self.mnt)
        # The server's warnings and errors go to the results; the log goes.
        if os.path.exists(self.log):
            with open(self.log, errors="replace") as f:
                for line in f:
                    if (" WARN " in line or " ERROR " in line) and len(self.warnings) < 50:
                        self.warnings.append(line.strip()[:500])
            if self.warnings:
                log("    claudefs said:\n      " + "\n      ".join(self.warnings[:10]))
        for p in (self.image, self.sock, self.log):
            if os.path.exists(p):
                os.unlink(p)
        if os.path.isdir(self.mnt) and not mounted(self.mnt):
            os.rmdir(self.mnt)


class Ext4:
    def __init__(self):
        self.mnt = os.path.join(BASE, "ext4")
        self.image = os.path.join(BASE, "ext4.img")
        self.dev = None

    def version(self):
        return "kernel " + os.uname().release

    def up(self):
        os.makedirs(self.mnt, exist_ok=True)
        # Written in full, as `claudefs up` writes its image: neither pays for
        # the host allocating blocks under it.
        run(["dd", "if=/dev/zero", f"of={self.image}", "bs=8M", "count=512", "oflag=direct", "status=none"],
            timeout=600)
        self.dev = run(["losetup", "--direct-io=on", "-f", "--show", self.image]).strip()
        run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", self.dev], timeout=300)
        run(["mount", self.dev, self.mnt])
        return self.mnt

    def down(self):
        unmount(self.mnt)
        if self.dev:
            quiet(["losetup", "-d", self.dev])
            self.dev = None
        if os.path.exists(self.image):
            os.unlink(self.image)
        if os.path.isdir(self.mnt) and not mounted(self.mnt):
            os.rmdir(self.mnt)


class Gluster:
    VOLUME = "claudefs-bench"
    HOSTS_NAME = "claudefs-bench-gluster"
    # Where glusterd writes whatever its working directory says.
    STATE_DIRS = ["/var/lib/glusterd", "/var/log/glusterfs", "/run/gluster", "/run/glusterd.socket"]

    def __init__(self):
        self.dir = os.path.join(BASE, "gluster")
        self.mnt = os.path.join(BASE, "gluster-mnt")
        self.glusterd = self.client = None
        self.before = None
        self.hosts_added = False
        self.created = False

    def version(self):
        return run(["glusterfs", "--version"]).splitlines()[0]

    @staticmethod
    def snapshot():
        seen = set()
        for top in Gluster.STATE_DIRS:
            if os.path.lexists(top):
                seen.add(top)
            for d, subdirs, files in os.walk(top):
                seen.update(os.path.join(d, x) for x in subdirs + files)
        return seen

    def host(self):
        """A name resolving to 127.0.0.1 only (the CLI refuses 127.0.0.1 and localhost as a brick host)."""
        def only_loopback(name):
            try:
                return {a[4][0] for a in socket.getaddrinfo(name, None)} == {"127.0.0.1"}
            except socket.gaierror:
                return False
        name = socket.gethostname()
        if name != "localhost" and only_loopback(name):
            return name
        with open("/etc/hosts", "a") as f:
            f.write(f"127.0.0.1 {self.HOSTS_NAME}  # hack/bench/fs.py, removed when it ends\n")
        self.hosts_added = True
        if not only_loopback(self.HOSTS_NAME):
            raise RuntimeError(f"{self.HOSTS_NAME} added to /etc/hosts does not resolve to 127.0.0.1 only")
        return self.HOSTS_NAME

    def cli(self, *args, timeout=120):
        return run(["gluster", "--mode=script", *args], timeout=timeout)

    def up(self):
        with socket.socket() as s:
            busy = s.connect_ex(("127.0.0.1", 24007)) == 0
        if busy or os.path.exists("/run/glusterd.socket"):
            raise RuntimeError("a glusterd is already running (port 24007, /run/glusterd.socket): stop it first")
        self.before = self.snapshot()
        os.makedirs(os.path.join(self.dir, "lib"), exist_ok=True)
        os.makedirs(self.mnt, exist_ok=True)
        host = self.host()
        vol = os.path.join(self.dir, "glusterd.vol")
        with open(vol, "w") as f:
            f.write(f"""volume management
    type mgmt/glusterd
    option working-directory {self.dir}/lib
    option transport-type socket
    option transport.socket.bind-address 127.0.0.1
    option transport.socket.listen-port 24007
    option transport.socket.keepalive-time 10
    option transport.socket.keepalive-interval 2
    option transport.socket.read-fail-log off
    option ping-timeout 0
    option event-threads 1
    option max-port 60999
end-volume
""")
        glog = os.path.join(self.dir, "glusterd.log")
        self.glusterd = daemon(["glusterd", "-N", "-f", vol, "-p", os.path.join(self.dir, "glusterd.pid"), "-l", glog],
                               os.path.join(self.dir, "glusterd.out"))

        def ready():
            return subprocess.run(["gluster", "--mode=script", "volume", "list"], capture_output=True,
                                  timeout=30).returncode == 0
        wait_for("glusterd", ready, 60, self.glusterd, glog)
        brick = os.path.join(self.dir, "brick")
        self.cli("volume", "create", self.VOLUME, f"{host}:{brick}", "force")
        self.created = True
        self.cli("volume", "start", self.VOLUME)
        clog = os.path.join(self.dir, "client.log")
        self.client = daemon(["glusterfs", "-N", f"--volfile-server={host}", f"--volfile-id={self.VOLUME}",
                              "-l", clog, self.mnt], os.path.join(self.dir, "client.out"))
        wait_for("glusterfs mount", lambda: mounted(self.mnt), 60, self.client, clog)
        # The mount shows before the client has connected to the brick.
        wait_for("glusterfs mount answering", lambda: os.path.isdir(os.path.join(self.mnt, ".")) and
                 subprocess.run(["stat", "-f", self.mnt], capture_output=True, timeout=30).returncode == 0, 60)
        return self.mnt

    def brick_pids(self):
        pids = []
        piddir = f"/run/gluster/vols/{self.VOLUME}"
        if os.path.isdir(piddir):
            for name in os.listdir(piddir):
                try:
                    with open(os.path.join(piddir, name)) as f:
                        pids.append(int(f.read().strip()))
                except (OSError, ValueError):
                    pass
        return pids

    def down(self):
        unmount(self.mnt)
        if self.client is not None:
            stop(self.client)
            self.client = None
        bricks = self.brick_pids()
        if self.created and self.glusterd is not None and self.glusterd.poll() is None:
            quiet(["gluster", "--mode=script", "volume", "stop", self.VOLUME, "force"], timeout=120)
            quiet(["gluster", "--mode=script", "volume", "delete", self.VOLUME], timeout=120)
        self.created = False
        stop(self.glusterd)
        self.glusterd = None
        for pid in bricks:  # left running if the volume could not be stopped
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"glusterfsd" in f.read():
                        os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if self.before is not None:
            for p in sorted(self.snapshot() - self.before, key=len, reverse=True):
                try:
                    if os.path.isdir(p) and not os.path.islink(p):
                        shutil.rmtree(p)
                    else:
                        os.unlink(p)
                except FileNotFoundError:
                    pass
            self.before = None
        if self.hosts_added:
            with open("/etc/hosts") as f:
                lines = f.readlines()
            with open("/etc/hosts", "w") as f:
                f.writelines(x for x in lines if not x.startswith(f"127.0.0.1 {self.HOSTS_NAME} "))
            self.hosts_added = False
        shutil.rmtree(self.dir, ignore_errors=True)
        if os.path.isdir(self.mnt) and not mounted(self.mnt):
            os.rmdir(self.mnt)


class MooseFS:
    NS_MASTER, NS_CS = "cfsbench-mfsmaster", "cfsbench-mfscs"
    VETH_MASTER, VETH_CS = "cfsb-mfsm", "cfsb-mfsc"
    # A private /30 that exists only on the veth pair made here, inside our namespaces.
    IP_MASTER, IP_CS = "10.213.77.1", "10.213.77.2"

    def __init__(self):
        self.dir = os.path.join(BASE, "moosefs")
        self.mnt = os.path.join(BASE, "moosefs-mnt")
        self.master = self.cs = self.client = None

    def version(self):
        r = subprocess.run(["mfsmaster", "-v"], capture_output=True, text=True)
        return (r.stdout + r.stderr).strip().splitlines()[0]

    def netns_exec(self, ns, *cmd, timeout=60):
        return run(["nsenter", f"--net=/run/netns/{ns}", *cmd], timeout=timeout)

    def cleanup_netns(self):
        for ns in (self.NS_MASTER, self.NS_CS):
            if os.path.exists(f"/run/netns/{ns}"):
                quiet(["ip", "netns", "del", ns])  # takes the veth end inside with it

    def up(self):
        self.cleanup_netns()
        d = self.dir
        for sub in ("master", "cs", "hdd"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        os.makedirs(self.mnt, exist_ok=True)
        run(["ip", "netns", "add", self.NS_MASTER])
        run(["ip", "netns", "add", self.NS_CS])
        # The pair is made inside the master's namespace and one end moved: no
        # interface of ours ever exists in the root namespace.
        run(["ip", "-n", self.NS_MASTER, "link", "add", self.VETH_MASTER, "type", "veth", "peer", "name", self.VETH_CS,
             "netns", self.NS_CS])
        for ns, dev, ip in [(self.NS_MASTER, self.VETH_MASTER, self.IP_MASTER), (self.NS_CS, self.VETH_CS, self.IP_CS)]:
            run(["ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev])
            run(["ip", "-n", ns, "link", "set", dev, "up"])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
        with open(f"{d}/master/mfsmaster.cfg", "w") as f:
            f.write(f"""WORKING_USER = mfs
WORKING_GROUP = mfs
NICE_LEVEL = 0
DATA_PATH = {d}/master
EXPORTS_FILENAME = {d}/master/mfsexports.cfg
TOPOLOGY_FILENAME = {d}/master/mfstopology.cfg
MATOML_LISTEN_HOST = {self.IP_MASTER}
MATOCS_LISTEN_HOST = {self.IP_MASTER}
MATOCL_LISTEN_HOST = {self.IP_MASTER}
""")
        with open(f"{d}/master/mfsexports.cfg", "w") as f:
            f.write("*  /  rw,alldirs,admin,maproot=0:0\n")
        open(f"{d}/master/mfstopology.cfg", "w").close()
        shutil.copy("/var/lib/mfs/metadata.mfs.empty", f"{d}/master/metadata.mfs")
        with open(f"{d}/cs/mfschunkserver.cfg", "w") as f:
            f.write(f"""WORKING_USER = mfs
WORKING_GROUP = mfs
NICE_LEVEL = 0
DATA_PATH = {d}/cs
HDD_CONF_FILENAME = {d}/cs/mfshdd.cfg
BIND_HOST = {self.IP_CS}
CSSERV_LISTEN_HOST = {self.IP_CS}
MASTER_HOST = {self.IP_MASTER}
""")
        with open(f"{d}/cs/mfshdd.cfg", "w") as f:
            f.write(f"{d}/hdd\n")
        run(["chown", "-R", "mfs:mfs", d])
        mlog, clog = f"{d}/master.log", f"{d}/chunkserver.log"
        self.master = daemon(["mfsmaster", "-c", f"{d}/master/mfsmaster.cfg", "-f", "start"], mlog, self.NS_MASTER)
        wait_for("mfsmaster", lambda: "initialized properly" in tail(mlog, 100), 60, self.master, mlog)
        self.cs = daemon(["mfschunkserver", "-c", f"{d}/cs/mfschunkserver.cfg", "-f", "start"], clog, self.NS_CS)
        wait_for("mfschunkserver", lambda: "scanning folder" in tail(clog, 100) and "connected to Master" in tail(clog, 100),
                 60, self.cs, clog)
        self.client = daemon(["mfsmount", "-f", "-H", self.IP_MASTER, "-o", "mfsnice=0", self.mnt], f"{d}/mfsmount.log",
                             self.NS_MASTER)
        wait_for("mfsmount", lambda: mounted(self.mnt), 60, self.client, f"{d}/mfsmount.log")
        # The tools talk to the master themselves: from its namespace.
        self.netns_exec(self.NS_MASTER, "mfssettrashtime", "-r", "0", self.mnt)

        # The chunkserver must be counted with its space before writes succeed.
        def space():
            r = subprocess.run(["df", "--output=size", self.mnt], capture_output=True, text=True, timeout=30)
            return r.returncode == 0 and int(r.stdout.split()[-1]) > 0
        wait_for("MooseFS space", space, 60)
        return self.mnt

    def down(self):
        unmount(self.mnt)
        stop(self.client)
        stop(self.cs)
        stop(self.master)
        self.client = self.cs = self.master = None
        self.cleanup_netns()
        shutil.rmtree(self.dir, ignore_errors=True)
        if os.path.isdir(self.mnt) and not mounted(self.mnt):
            os.rmdir(self.mnt)


class FuseFloor:
    def __init__(self, binary):
        self.bin = binary
        self.mnt = os.path.join(BASE, "fuse_floor")
        self.log = os.path.join(BASE, "fuse_floor.log")
        self.proc = None

    def version(self):
        return "clients/examples/fuse_floor.rs, fuser 0.18"

    def up(self):
        os.makedirs(self.mnt, exist_ok=True)
        self.proc = daemon([self.bin, self.mnt], self.log)
        wait_for("fuse_floor", lambda: mounted(self.mnt), 30, self.proc, self.log)
        return self.mnt

    def down(self):
        unmount(self.mnt)  # the example exits when its mount goes
        stop(self.proc)
        self.proc = None
        if os.path.exists(self.log):
            os.unlink(self.log)
        if os.path.isdir(self.mnt) and not mounted(self.mnt):
            os.rmdir(self.mnt)


# ---------------------------------------------------------------- workloads

def fsops(binary, op, d, prefix, n, size=None):
    cmd = [binary, op, d, prefix, str(n)] + ([str(size)] if size else [])
    try:
        count, secs = run(cmd, timeout=1800).split()
    except subprocess.CalledProcessError as e:
        raise RuntimeError(e.stderr.strip() or f"exit {e.returncode}")
    return int(count) / float(secs)


def fio(args, timeout):
    """One fio job; its JSON, or RuntimeError with what fio said."""
    cmd = ["fio", "--name=bench", "--output-format=json", "--fallocate=none", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        raise RuntimeError(f"fio exit {r.returncode}: {(r.stderr + r.stdout).strip()[-500:]}")
    return json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]


def workloads(mnt, secs, fsops_bin, rec, io=True):
    """Runs the workload set on `mnt` (without fio unless `io`), filling
    rec["values"]; a failing workload is recorded in rec["errors"] and the next
    one runs."""
    vals, errs = rec["values"], rec["errors"]

    def step(keys, fn):
        t = time.time()
        try:
            out = fn()
            for k, v in zip(keys, out):
                vals[k] = v
        except Exception as e:  # noqa: BLE001 - kept in the results, the run goes on
            msg = f"{type(e).__name__}: {e}"
            for k in keys:
                errs[k] = msg
            log(f"    {'/'.join(keys)} FAILED: {msg}")
        else:
            log(f"    {', '.join(f'{k} {fmt(vals[k])}' for k in keys)}  ({time.time() - t:.0f} s)")

    def fresh(name):
        d = os.path.join(mnt, name)
        os.mkdir(d)
        return d

    def files():
        d = fresh("files")
        c = fsops(fsops_bin, "create", d, "f", FILES)
        drop_caches()
        s = fsops(fsops_bin, "stat", d, "f", FILES)
        u = fsops(fsops_bin, "unlink", d, "f", FILES)
        os.rmdir(d)
        return c, s, u

    def dirs():
        d = fresh("dirs")
        m = fsops(fsops_bin, "mkdir", d, "d", DIRS)
        r = fsops(fsops_bin, "rmdir", d, "d", DIRS)
        os.rmdir(d)
        return m, r

    def small():
        d = fresh("small")
        w = fsops(fsops_bin, "write", d, "s", SMALL, SMALL_SIZE)
        drop_caches()
        r = fsops(fsops_bin, "read", d, "s", SMALL, SMALL_SIZE)
        shutil.rmtree(d)
        return w, r

    step(["create", "stat", "unlink"], files)
    step(["mkdir", "rmdir"], dirs)
    step(["small_write", "small_read"], small)
    if not io:
        return

    fdir = fresh("fio")
    f = os.path.join(fdir, "file")
    common = [f"--filename={f}", f"--size={FIO_SIZE}"]

    def seq():
        w = fio(common + ["--rw=write", "--bs=1M", "--ioengine=psync", "--end_fsync=1"], 900)
        if w["error"]:
            raise RuntimeError(f"fio error {w['error']}")
        drop_caches()
        r = fio(common + ["--rw=read", "--bs=1M", "--ioengine=psync"], 900)
        return w["write"]["bw_bytes"] / 1e6, r["read"]["bw_bytes"] / 1e6

    def rand(rw):
        def go():
            if not os.path.exists(f) or os.path.getsize(f) < 512 << 20:
                fio(common + ["--rw=write", "--bs=1M", "--ioengine=psync", "--end_fsync=1"], 900)  # lay it out
            drop_caches()
            args = common + [f"--rw={rw}", "--bs=4k", "--ioengine=libaio", "--iodepth=16", "--time_based",
                             f"--runtime={secs}"]
            try:
                j = fio(args + ["--direct=1"], secs + 600)
                rec["fio_direct"][rw] = 1
            except RuntimeError as e:
                log(f"    {rw} with O_DIRECT refused ({e}); again with direct=0")
                rec["fio_direct"][rw] = 0
                rec["fio_direct_error"] = str(e)
                j = fio(args + ["--direct=0"], secs + 600)
            side = "read" if rw == "randread" else "write"
            return (j[side]["iops"],)
        return go

    step(["seq_write", "seq_read"], seq)
    step(["rand_read"], rand("randread"))
    step(["rand_write"], rand("randwrite"))
    shutil.rmtree(fdir, ignore_errors=True)


def pjdfstest_bin():
    p = os.path.join(os.path.expanduser("~"), ".cargo/bin/pjdfstest")
    return p if os.path.exists(p) else shutil.which("pjdfstest")


def pjdfstest(mnt):
    d = os.path.join(mnt, "p")  # short: Unix socket paths are limited to 108 bytes
    os.mkdir(d)
    t = time.time()
    try:
        r = subprocess.run([pjdfstest_bin(), "-c", os.path.join(ROOT, "configs/pjdfstest.toml"), "-p", d], cwd=d,
                           capture_output=True, text=True, timeout=1800)
        text = r.stdout + r.stderr
        m = re.search(r"Summary: (\d+) failed, (\d+) skipped, (\d+) passed", text)
        failures = [line.strip() for line in text.splitlines() if line.rstrip().endswith("FAILED")]
        res = {"secs": round(time.time() - t, 1), "exit": r.returncode, "failures": failures}
        if m:
            res.update(failed=int(m.group(1)), skipped=int(m.group(2)), passed=int(m.group(3)),
                       summary=next(x for x in text.splitlines() if x.startswith("Summary:")))
        else:
            res["error"] = "no summary line: " + text.strip()[-500:]
    except subprocess.TimeoutExpired:
        res = {"secs": round(time.time() - t, 1), "error": "timed out after 1800 s"}
    shutil.rmtree(d, ignore_errors=True)
    return res


# ---------------------------------------------------------------- report

def fmt(v):
    if v is None:
        return "–"
    if v >= 1e6:
        return f"{v / 1e6:.2f} M"
    if v >= 1e4:
        return f"{v / 1e3:.0f} k"
    if v >= 1e3:
        return f"{v / 1e3:.1f} k"
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.1f}"


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def medians(fs):
    return {m: median([r["values"].get(m) for r in fs["reps"]]) for m, _, _ in METRICS}


def ratio(results, metric, peer, ours="claudefs"):
    """ClaudeFS/peer: median of the per-rep ratios when both ran in the same run,
    else the ratio of the medians (marked)."""
    a, b = results["fs"].get(ours), results["fs"].get(peer)
    if not a or not b:
        return None, []
    if a["run"] == b["run"]:
        rs = [x["values"][metric] / y["values"][metric] for x, y in zip(a["reps"], b["reps"])
              if x["values"].get(metric) and y["values"].get(metric)]
        return median(rs), rs
    ma, mb = medians(a)[metric], medians(b)[metric]
    return (ma / mb if ma and mb else None), None


def report(results):
    present = [f for f in FILESYSTEMS if f in results["fs"]]
    peers = [p for p in PEERS if p in present and any(o in present for o in OURS)]
    runs = {(results["fs"][f]["run"], len(results["fs"][f]["reps"]), results["fs"][f].get("secs", results["secs"]))
            for f in present}
    if len(runs) == 1:
        run_id, reps, secs = runs.pop()
        print(f"\nRun {run_id}: medians of {reps} rep(s), {secs} s per random-I/O job; one disk (/var/tmp), "
              f"file systems alternated.\n")
    else:
        print("\nFrom different runs (ratios across runs are ratios of medians, marked): " + "; ".join(
            f"{NAME[f]}: run {results['fs'][f]['run']}, {len(results['fs'][f]['reps'])} rep(s), "
            f"{results['fs'][f].get('secs', results['secs'])} s per random-I/O job" for f in present) + ".\n")
    print("| workload | " + " | ".join(NAME[f] for f in present) + " |")
    print("|---" * (len(present) + 1) + "|")
    meds = {f: medians(results["fs"][f]) for f in present}
    for m, label, unit in METRICS:
        cells = []
        for f in present:
            cell = fmt(meds[f][m])
            if m in ("rand_read", "rand_write") and any(r["fio_direct"].get("randread" if m == "rand_read" else "randwrite") == 0
                                                         for r in results["fs"][f]["reps"]):
                cell += " (buffered)"
            if any(m in r["errors"] for r in results["fs"][f]["reps"]):
                cell += " (error)"
            cells.append(cell)
        print(f"| {label} ({unit}) | " + " | ".join(cells) + " |")
    for ours in [o for o in OURS if o in present and peers]:
        print(f"\n| workload: {NAME[ours]} / peer (median of per-rep ratios) | " + " | ".join(NAME[p] for p in peers)
              + " |")
        print("|---" * (len(peers) + 1) + "|")
        for m, label, _ in METRICS:
            cells = []
            for p in peers:
                r, rs = ratio(results, m, p, ours)
                cells.append("–" if r is None else f"{r:.2f}" + ("" if rs is not None else " (other run)"))
            print(f"| {label} | " + " | ".join(cells) + " |")
        # What the FUSE floor reaches against the same peer: a goal above it is
        # out of reach of any FUSE file system on this host.
        floor = "fuse_floor" in present
        print("\n| goal | measured | |" + (" FUSE floor / peer |" if floor else ""))
        print("|---|---|---|" + ("---|" if floor else ""))
        for m, p, want in GOALS:
            if p not in peers:
                continue
            r, _ = ratio(results, m, p, ours)
            label = dict((k, lab) for k, lab, _ in METRICS)[m]
            got = "–" if r is None else f"{r:.2f}x"
            met = "not measured" if r is None else ("met" if r >= want else "not met")
            row = f"| {label}: {NAME[ours]} >= {want}x {NAME[p]} | {got} | {met} |"
            if floor:
                fr, _ = ratio(results, m, p, "fuse_floor")
                row += " – |" if fr is None else f" {fr:.2f}x |"
            print(row)
    pj = {f: results["fs"][f].get("pjdfstest") for f in present if results["fs"][f].get("pjdfstest")}
    if pj:
        print("\n| pjdfstest (configs/pjdfstest.toml) | failed | skipped | passed |")
        print("|---|---|---|---|")
        for f, r in pj.items():
            if "failed" in r:
                print(f"| {NAME[f]} | {r['failed']} | {r['skipped']} | {r['passed']} |")
            else:
                print(f"| {NAME[f]} | {r.get('error', '?')[:80]} | | |")
        for ours in [o for o in OURS if o in pj]:
            c = pj[ours]
            ok = c.get("failed") == 0
            print(f"\nGoal: no pjdfstest failure on {NAME[ours]}: {'met' if ok else 'not met'}"
                  + ("" if ok else f" ({c.get('failed', c.get('error'))}: {', '.join(c.get('failures', [])[:10])})"))
    for f in present:
        for i, r in enumerate(results["fs"][f]["reps"]):
            for k, e in r["errors"].items():
                print(f"\n{NAME[f]}, rep {i + 1}, {k}: {e[:400]}")


def plot(results):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    present = [f for f in FILESYSTEMS if f in results["fs"]]
    colors = {"claudefs": "tab:blue", "claudefs_wb": "tab:cyan", "ext4": "tab:gray", "gluster": "tab:orange", "moosefs": "tab:green",
              "fuse_floor": "tab:purple"}

    def bars(ax, metrics, ylabel, title, log_scale):
        width = 0.8 / len(present)
        for i, f in enumerate(present):
            reps = results["fs"][f]["reps"]
            meds, lo, hi = [], [], []
            for m, _, _ in metrics:
                xs = [r["values"][m] for r in reps if r["values"].get(m)]
                v = median(xs) or 0
                meds.append(v)
                lo.append(v - min(xs) if xs else 0)
                hi.append(max(xs) - v if xs else 0)
            xpos = [j + (i - (len(present) - 1) / 2) * width for j in range(len(metrics))]
            ax.bar(xpos, meds, width, yerr=[lo, hi], capsize=2, label=NAME[f], color=colors[f])
            for x, v, h in zip(xpos, meds, hi):
                if v:  # above the error bar
                    ax.annotate(fmt(v), (x, v + h), textcoords="offset points", xytext=(0, 3), ha="center",
                                va="bottom", fontsize=6, rotation=90)
        ax.set_xticks(range(len(metrics)), [label for _, label, _ in metrics], rotation=20, fontsize=8)
        if log_scale:
            ax.set_yscale("log")
            lo_, hi_ = ax.get_ylim()
            ax.set_ylim(lo_, hi_ * 3)  # room for the labels
        else:
            ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)

    reps = "/".join(sorted({str(len(results["fs"][f]["reps"])) for f in present}))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    bars(ax, META, "operations (files) per second, log scale",
         f"metadata and 4 KiB files: {FILES} files, {DIRS} directories, {SMALL} small files "
         f"(median of {reps}, bars: min-max)", True)
    fig.tight_layout()
    fig.savefig(os.path.join(ROOT, "docs/perf/fs-meta.png"), dpi=110)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    bars(axes[0], IO[:2], "MB/s", f"fio sequential, 1 MiB blocks, {FIO_SIZE[:-1]} MiB file", False)
    secs = sorted({str(results["fs"][f].get("secs", results["secs"])) for f in present})
    bars(axes[1], IO[2:], "IOPS, log scale", f"fio 4 KiB random, libaio QD16 direct, {'/'.join(secs)} s", True)
    fig.tight_layout()
    fig.savefig(os.path.join(ROOT, "docs/perf/fs-io.png"), dpi=110)


# ---------------------------------------------------------------- main

def preflight_cleanup():
    """What a killed earlier run may have left: mounts under BASE, our namespaces."""
    if os.path.isdir(BASE):
        with open("/proc/self/mountinfo") as f:
            left = [line.split(" ")[4] for line in f if line.split(" ")[4].startswith(BASE + "/")]
        for m in sorted(left, key=len, reverse=True):
            log(f"unmounting {m}, left by an earlier run")
            quiet(["umount", "-l", m])
    MooseFS().cleanup_netns()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--secs", type=int, default=10, help="seconds per fio random-I/O job (default 10)")
    ap.add_argument("--only", default="", help="comma-separated subset of " + ",".join(FILESYSTEMS))
    ap.add_argument("--no-pjdfstest", action="store_true", help="leave pjdfstest out (quick runs)")
    ap.add_argument("--report", action="store_true", help="only print and plot the saved results")
    a = ap.parse_args()
    if a.report:
        with open(RESULTS) as f:
            results = json.load(f)
        plot(results)
        report(results)
        return
    chosen = [f for f in FILESYSTEMS if not a.only or f in a.only.split(",")]
    unknown = [x for x in a.only.split(",") if x and x not in FILESYSTEMS]
    if unknown or not chosen:
        ap.error(f"--only takes a comma-separated subset of {','.join(FILESYSTEMS)}")
    if os.geteuid() != 0:
        sys.exit("hack/bench/fs.py: needs root (loop devices, FUSE mounts, network namespaces, drop_caches)")

    # SIGTERM tears down like Ctrl-C.
    def interrupted(*_):
        raise KeyboardInterrupt()
    signal.signal(signal.SIGTERM, interrupted)
    subprocess.run([os.path.join(ROOT, "hack/deps.sh"), "bench"], check=True)
    binary = os.environ.get("CLAUDEFS_BIN")
    if set(OURS) & set(chosen) and not binary:
        subprocess.run(["cargo", "build", "--release", "--bin", "claudefs"], check=True, cwd=ROOT)
        binary = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release/claudefs")
    floor_bin = None
    if "fuse_floor" in chosen:
        subprocess.run(["cargo", "build", "--release", "-p", "claudefs-clients", "--example", "fuse_floor"], check=True,
                       cwd=ROOT)
        floor_bin = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                                 "release/examples/fuse_floor")
    if not a.no_pjdfstest and not pjdfstest_bin():
        sys.exit("hack/bench/fs.py: pjdfstest not found (hack/deps.sh bench installs it), or use --no-pjdfstest")
    fsops_bin = os.path.join(tempfile.gettempdir(), "claudefs-bench-fsops")
    run(["gcc", "-O2", "-Wall", "-o", fsops_bin, os.path.join(ROOT, "hack/bench/fsops.c")])

    preflight_cleanup()
    os.makedirs(BASE, exist_ok=True)
    make = {"claudefs": lambda: ClaudeFS(binary), "claudefs_wb": lambda: ClaudeFS(binary, writeback_cache=True),
            "ext4": Ext4, "gluster": Gluster, "moosefs": MooseFS, "fuse_floor": lambda: FuseFloor(floor_bin)}
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S")
    commit = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip()
    results = {"run": run_id, "secs": a.secs, "reps": a.reps, "commit": commit, "claudefs_bin": binary,
               "params": {"files": FILES, "dirs": DIRS, "small_files": SMALL, "small_size": SMALL_SIZE,
                          "fio_size": FIO_SIZE, "fio_iodepth": 16},
               "fs": {f: {"run": run_id, "secs": a.secs, "version": make[f]().version(), "reps": []} for f in chosen}}
    t_start = time.time()
    for rep in range(a.reps):
        for name in chosen:
            fs = make[name]()
            rec = {"values": {}, "errors": {}, "fio_direct": {}}
            log(f"rep {rep + 1}/{a.reps}: {NAME[name]}")
            t = time.time()
            try:
                mnt = fs.up()
                rec["setup_secs"] = round(time.time() - t, 1)
                workloads(mnt, a.secs, fsops_bin, rec, io=name not in META_ONLY)
                if rep == 0 and not a.no_pjdfstest and name not in META_ONLY:
                    res = pjdfstest(mnt)
                    results["fs"][name]["pjdfstest"] = res
                    log(f"    pjdfstest: {res.get('summary', res.get('error'))}  ({res['secs']:.0f} s)")
            except Exception as e:  # noqa: BLE001 - the other file systems still run
                rec["errors"]["setup"] = f"{type(e).__name__}: {e}"
                log(f"    {NAME[name]} FAILED: {e}")
            finally:
                old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the teardown
                try:
                    fs.down()
                finally:
                    signal.signal(signal.SIGINT, old)
            rec["settle_secs"] = settle(BASE)
            if getattr(fs, "warnings", None):
                rec["server_warnings"] = fs.warnings
            rec["secs"] = round(time.time() - t, 1)
            results["fs"][name]["reps"].append(rec)
    results["total_secs"] = round(time.time() - t_start)
    log(f"all reps: {results['total_secs']} s")

    if a.only and os.path.exists(RESULTS):
        # Keep the saved figures of the file systems not run now; ratios against
        # them are ratios of medians across runs (marked in the tables).
        with open(RESULTS) as f:
            old = json.load(f)
        for k, v in old.get("fs", {}).items():
            v.setdefault("secs", old.get("secs"))
            results["fs"].setdefault(k, v)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(results, f, indent=1)
    os.makedirs(os.path.join(ROOT, "docs/perf"), exist_ok=True)
    plot(results)
    report(results)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        log("hack/bench/fs.py: interrupted; file systems torn down, no results saved")
        sys.exit(130)
    finally:
        if os.path.isdir(BASE) and not os.listdir(BASE):
            os.rmdir(BASE)
