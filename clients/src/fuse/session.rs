//! A FUSE session: the mount, the INIT handshake, and the two ways
//! requests arrive and replies leave.
//!
//! - **`/dev/fuse`**: threads read requests from the device and write each
//!   reply back to it. Any thread takes any request, so a request and its
//!   caller usually run on different CPUs, and each of the two hand-offs is
//!   a cross-CPU wake-up (10–20 µs on a VM).
//! - **io_uring** (Linux 6.14+, when the `fuse` module's `enable_uring`
//!   parameter is on): the kernel queues each request on the ring of the
//!   CPU its caller runs on, and one thread per CPU, pinned there, serves
//!   that queue. The caller sleeps, the queue's thread runs on the same CPU,
//!   answers and commits the reply with the same system call that fetches
//!   the next request. Forgets and interrupts still arrive on `/dev/fuse`,
//!   whose readers stay.
//!
//! A reply made on another thread (by a reactor, or a task) goes back to
//! the queue's thread, which commits it: one ring has one submitter.

use std::cell::Cell;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use blobfs::fs::Attr;
use crossbeam_queue::SegQueue;
use io_uring::{IoUring, cqueue, opcode, squeue, types};

use super::proto::{self, Header, Malformed, Op, init};
use super::{MAX_WRITE, TTL};

/// A file system served over FUSE.
pub trait Handler: Send + Sync + 'static {
    /// INIT flags wanted beyond the session's own ([`proto::init`]); the
    /// kernel grants those it has.
    fn flags(&self) -> u64;

    /// Serves one request. `reply` answers it, from any thread, at any
    /// time; one dropped unanswered answers EIO. Requests the kernel wants
    /// no answer to ([`Op::unanswered`]) come with a reply that sends
    /// nothing.
    fn dispatch(&self, h: &Header, op: Op<'_>, reply: Reply);
}

/// The switch of the kernel's FUSE io_uring queues.
const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// How a session is mounted.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// The mount's source in the mount table, and its subtype (`fuse.NAME`).
    pub name: String,
    /// Threads reading `/dev/fuse`.
    pub threads: usize,
    /// Serve requests over io_uring where the kernel offers it.
    pub ring: bool,
    /// Ring entries (requests in flight) per CPU.
    pub depth: usize,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions { name: "claudefs".into(), threads: 4, ring: true, depth: 32 }
    }
}

/// A mounted session: its threads serve until the mount goes.
pub struct Session {
    threads: Vec<JoinHandle<()>>,
    ring: bool,
}

impl Session {
    /// Mounts `handler` on `path` (root only: mount(2) directly) and starts
    /// serving it.
    pub fn mount<H: Handler>(path: &Path, handler: Arc<H>, opts: &MountOptions) -> io::Result<Session> {
        let dev = Arc::new(std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse")?);
        mount(path, &opts.name, dev.as_raw_fd())?;
        let ring = match handshake(&dev, handler.flags() | if opts.ring { init::OVER_IO_URING } else { 0 }) {
            Ok(flags) => {
                let ring = flags & init::OVER_IO_URING != 0;
                let off = std::fs::read_to_string(ENABLE_URING).is_ok_and(|v| v.trim() == "N");
                if opts.ring && !ring && off {
                    tracing::info!(
                        "the kernel can serve FUSE over io_uring but {ENABLE_URING} is N: requests go through /dev/fuse (write Y there for per-CPU queues)"
                    );
                }
                ring
            }
            Err(e) => {
                // The mount made above: its path has no NUL.
                if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
                    // SAFETY: a NUL-terminated path; umount2 only reads it.
                    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                }
                return Err(e);
            }
        };
        let mut threads = Vec::new();
        // With the ring, /dev/fuse carries only forgets and interrupts, but
        // everything until the ring is ready, and everything if it never is
        // (a queue whose entries the kernel refused logs why): the readers
        // stay, blocked in read(2) meanwhile.
        for i in 0..opts.threads.max(1) {
            let (dev, handler) = (dev.clone(), handler.clone());
            threads
                .push(std::thread::Builder::new().name(format!("fuse-{i}")).spawn(move || serve_dev(&dev, &*handler))?);
        }
        if ring {
            for qid in 0..possible_cpus() {
                let (dev, handler, depth) = (dev.clone(), handler.clone(), opts.depth);
                let t = std::thread::Builder::new()
                    .name(format!("fuse-q{qid}"))
                    .spawn(move || serve_queue(&dev, qid, depth, &*handler))?;
                threads.push(t);
            }
        }
        tracing::info!(
            ring,
            "FUSE session on {} serves {}",
            path.display(),
            if ring { "one io_uring queue per CPU" } else { "/dev/fuse" }
        );
        Ok(Session { threads, ring })
    }

    /// Whether requests come over io_uring.
    pub fn ring(&self) -> bool {
        self.ring
    }

    /// Waits until the mount is gone and every request read is answered.
    pub fn join(self) -> io::Result<()> {
        for t in self.threads {
            t.join().map_err(|_| io::Error::other("a FUSE thread panicked"))?;
        }
        Ok(())
    }
}

fn mount(path: &Path, name: &str, fd: RawFd) -> io::Result<()> {
    let c = |s: &[u8]| {
        std::ffi::CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a mount argument"))
    };
    let (target, source, fstype) =
        (c(path.as_os_str().as_encoded_bytes())?, c(name.as_bytes())?, c(format!("fuse.{name}").as_bytes())?);
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let data =
        c(format!("fd={fd},rootmode=40000,user_id={uid},group_id={gid},default_permissions,allow_other").as_bytes())?;
    // SAFETY: NUL-terminated strings that mount(2) only reads.
    let r = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, data.as_ptr().cast()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads the kernel's INIT and answers it, asking for `want` and the
/// session's own flags: the flags granted.
fn handshake(dev: &File, want: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; 8192];
    let n = loop {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::read(dev.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    };
    let bad = |m: Malformed| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let h = Header::parse(&buf[..n]).map_err(bad)?;
    let body = &buf[proto::IN_HEADER..n];
    let Op::Init { major, minor, max_readahead, flags } = Op::decode(h.opcode, body, &[]).map_err(bad)? else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the kernel's first request was opcode {}, not INIT", h.opcode),
        ));
    };
    if major != proto::MAJOR || minor < 31 {
        write_reply(dev, h.unique, -libc::EPROTO, &[])?;
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("the kernel speaks FUSE {major}.{minor}; 7.31 or later is needed"),
        ));
    }
    let granted = (want | init::ASYNC_READ | init::BIG_WRITES | init::MAX_PAGES | init::INIT_EXT) & flags;
    let mut body = Vec::new();
    proto::put_init(
        &mut body,
        &proto::InitOut {
            max_readahead: max_readahead.min(MAX_WRITE),
            flags: granted,
            max_background: 16,
            congestion_threshold: 12,
            max_write: MAX_WRITE,
            max_pages: (MAX_WRITE / 4096) as u16,
        },
    );
    write_reply(dev, h.unique, 0, &[&body])?;
    if want & init::WRITEBACK_CACHE != 0 && granted & init::WRITEBACK_CACHE == 0 {
        tracing::warn!("the kernel offers no writeback cache: writes go through");
    }
    Ok(granted)
}

/// Writes a reply to `/dev/fuse`.
fn write_reply(dev: &File, unique: u64, error: i32, body: &[&[u8]]) -> io::Result<()> {
    let len = proto::OUT_HEADER + body.iter().map(|b| b.len()).sum::<usize>();
    let header = proto::out_header(len, error, unique);
    let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; 4];
    iov[0] = libc::iovec { iov_base: header.as_ptr() as *mut _, iov_len: header.len() };
    for (i, b) in body.iter().enumerate() {
        iov[i + 1] = libc::iovec { iov_base: b.as_ptr() as *mut _, iov_len: b.len() };
    }
    // SAFETY: the iovecs point at live buffers of their lengths.
    let n = unsafe { libc::writev(dev.as_raw_fd(), iov.as_ptr(), body.len() as i32 + 1) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How many queues the kernel keeps: one per possible CPU.
fn possible_cpus() -> usize {
    let list = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    let last = list.trim().rsplit([',', '-']).next().and_then(|n| n.parse::<usize>().ok());
    last.map_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()), |n| n + 1)
}

/// Decodes a request and hands it to `handler`; a malformed one is logged
/// and answered EIO.
fn serve<H: Handler + ?Sized>(handler: &H, h: &Header, head: &[u8], tail: &[u8], reply: Reply) {
    match Op::decode(h.opcode, head, tail) {
        // Forgets and interrupts come over /dev/fuse only.
        Ok(op) if op.unanswered() => handler.dispatch(h, op, reply.disarmed()),
        Ok(op) => handler.dispatch(h, op, reply),
        Err(e) => {
            tracing::error!("{e}");
            reply.error(libc::EIO)
        }
    }
}

/// Serves requests read from `/dev/fuse` until the mount is gone.
fn serve_dev<H: Handler + ?Sized>(dev: &Arc<File>, handler: &H) {
    let mut buf = vec![0u8; MAX_WRITE as usize + 8192];
    loop {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::read(dev.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            match io::Error::last_os_error().raw_os_error() {
                // Interrupted, or a request the kernel took back.
                Some(libc::EINTR | libc::EAGAIN | libc::ENOENT) => continue,
                // Unmounted.
                Some(libc::ENODEV) => return,
                _ => {
                    tracing::error!("reading /dev/fuse: {}", io::Error::last_os_error());
                    return;
                }
            }
        }
        let b = &buf[..n as usize];
        let h = match Header::parse(b) {
            Ok(h) if h.len as usize == b.len() => h,
            Ok(h) => {
                tracing::error!("FUSE request of {} bytes says it has {}", b.len(), h.len);
                continue;
            }
            Err(e) => {
                tracing::error!("{e}");
                continue;
            }
        };
        let body = &b[proto::IN_HEADER..];
        let (head, tail) = body.split_at(proto::op_header_len(h.opcode).min(body.len()));
        serve(handler, &h, head, tail, Reply { unique: h.unique, route: Route::Dev(dev.clone()) });
    }
}

/// The header of a ring entry (`fuse_uring_req_header`): the request's or
/// reply's header, the op header, and the entry's own fields.
const RING_HEADER: usize = 288;
const IN_OUT: usize = 0;
const OP_IN: usize = 128;
const COMMIT_ID: usize = 256 + 8;
const PAYLOAD_SZ: usize = 256 + 16;
/// Ring commands (`fuse_uring_cmd`).
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// The user data of the queue's wake-up read.
const WAKE: u64 = u64::MAX;

thread_local! {
    /// The queue this thread serves, plus one (0: none).
    static QUEUE: Cell<usize> = const { Cell::new(0) };
}

/// A ring entry's buffers. The kernel writes a request into them when the
/// entry's command completes, and reads the reply when it is committed; in
/// between they are the request's, and only the queue's thread touches
/// them but for a data reply's payload ([`Reply::data`]).
struct Entry {
    header: *mut u8,
    payload: *mut u8,
    iov: [libc::iovec; 2],
}

/// What a reply leaves for its queue's thread to commit.
struct Done {
    ent: usize,
    commit_id: u64,
    error: i32,
    /// The body, or None when it is already in the entry's payload (of
    /// `payload` bytes).
    body: Option<Vec<u8>>,
    payload: usize,
}

/// One CPU's queue: its entries, and replies waiting to be committed.
struct Queue {
    qid: usize,
    ents: Vec<Entry>,
    done: SegQueue<Done>,
    /// Written to wake the queue's thread for replies made elsewhere.
    wake: File,
    /// Where the ring reads `wake` into: the queue's, so that it outlives
    /// the ring.
    wake_buf: std::cell::UnsafeCell<u64>,
}

// SAFETY: an entry's buffers are used by one thread at a time, as `Entry`
// says; the pointers are to allocations the queue owns.
unsafe impl Send for Queue {}
// SAFETY: as for Send; the rest is a lock-free queue and a file.
unsafe impl Sync for Queue {}

impl Queue {
    fn new(qid: usize, depth: usize) -> io::Result<Queue> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is ours alone.
        let wake = unsafe { File::from_raw_fd(fd) };
        let ents = (0..depth)
            .map(|_| {
                let header = Box::into_raw(vec![0u8; RING_HEADER].into_boxed_slice()).cast::<u8>();
                // Zeroed pages come lazily: an entry costs what it carries.
                let payload = Box::into_raw(vec![0u8; MAX_WRITE as usize].into_boxed_slice()).cast::<u8>();
                let iov = [
                    libc::iovec { iov_base: header.cast(), iov_len: RING_HEADER },
                    libc::iovec { iov_base: payload.cast(), iov_len: MAX_WRITE as usize },
                ];
                Entry { header, payload, iov }
            })
            .collect();
        Ok(Queue { qid, ents, done: SegQueue::new(), wake, wake_buf: 0.into() })
    }

    fn push(&self, d: Done) {
        self.done.push(d);
        if QUEUE.get() != self.qid + 1 {
            // SAFETY: an 8-byte write from a live u64.
            unsafe { libc::write(self.wake.as_raw_fd(), (&1u64 as *const u64).cast(), 8) };
        }
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        for e in &self.ents {
            // SAFETY: made by `Box::into_raw` of slices of these lengths.
            unsafe {
                drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(e.header, RING_HEADER)));
                drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(e.payload, MAX_WRITE as usize)));
            }
        }
    }
}

/// A ring command on `/dev/fuse` for entry `ent` of queue `qid`.
fn ring_cmd(
    dev: RawFd,
    cmd: u32,
    qid: usize,
    ent: usize,
    commit_id: u64,
    iov: Option<&[libc::iovec; 2]>,
) -> squeue::Entry128 {
    // fuse_uring_cmd_req: flags, commit_id, qid.
    let mut req = [0u8; 80];
    req[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    req[16..18].copy_from_slice(&(qid as u16).to_ne_bytes());
    let mut b = opcode::UringCmd80::new(types::Fd(dev), cmd).cmd(req);
    if let Some(iov) = iov {
        b = b.addr(Some(iov.as_ptr() as u64));
    }
    let sqe = b.build().user_data(ent as u64);
    if iov.is_none() {
        return sqe;
    }
    // The iovec count goes in the SQE's `len` (offset 24), which the crate
    // does not set for this opcode.
    // SAFETY: `Entry128` is a repr(C) 128-byte SQE.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    raw[24..28].copy_from_slice(&2u32.to_ne_bytes());
    // SAFETY: as above.
    unsafe { std::mem::transmute(raw) }
}

/// Registers queue `qid`'s entries with the kernel and serves the requests
/// they bring until the mount is gone.
fn serve_queue<H: Handler + ?Sized>(dev: &Arc<File>, qid: usize, depth: usize, handler: &H) {
    if let Err(e) = run_queue(dev, qid, depth, handler) {
        tracing::error!("FUSE io_uring queue {qid}: {e}");
    }
}

fn run_queue<H: Handler + ?Sized>(dev: &Arc<File>, qid: usize, depth: usize, handler: &H) -> io::Result<()> {
    // SAFETY: a CPU set with one CPU, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(qid, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
    QUEUE.set(qid + 1);
    let q = Arc::new(Queue::new(qid, depth)?);
    let mut ring: IoUring<squeue::Entry128, cqueue::Entry> =
        IoUring::builder().build((2 * depth + 2).next_power_of_two() as u32)?;
    let fd = dev.as_raw_fd();
    let arm_wake = |ring: &mut IoUring<squeue::Entry128, cqueue::Entry>| {
        let sqe = opcode::Read::new(types::Fd(q.wake.as_raw_fd()), q.wake_buf.get().cast(), 8).build().user_data(WAKE);
        // SAFETY: the buffer lives as long as `q`, beyond the ring, and
        // only the ring writes it.
        unsafe { ring.submission().push(&sqe.into()) }.map_err(|_| io::Error::other("submission queue full"))
    };
    for (i, e) in q.ents.iter().enumerate() {
        let sqe = ring_cmd(fd, CMD_REGISTER, qid, i, 0, Some(&e.iov));
        // SAFETY: the iovecs and buffers live as long as `q`, beyond the ring.
        unsafe { ring.submission().push(&sqe) }.map_err(|_| io::Error::other("submission queue full"))?;
    }
    arm_wake(&mut ring)?;
    let mut live = depth;
    let mut cqes = Vec::with_capacity(2 * depth);
    while live > 0 {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
        cqes.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        for (ud, res) in cqes.drain(..) {
            if ud == WAKE {
                arm_wake(&mut ring)?;
            } else if res < 0 {
                live -= 1;
                let e = io::Error::from_raw_os_error(-res);
                match -res {
                    libc::ENOTCONN | libc::ENODEV | libc::ECANCELED => {
                        tracing::debug!("FUSE queue {qid} entry {ud}: {e}")
                    }
                    _ => tracing::error!("FUSE queue {qid} entry {ud}: {e}"),
                }
            } else {
                serve_entry(&q, ud as usize, handler);
            }
        }
        while let Some(d) = q.done.pop() {
            let sqe = commit(&q, d, fd);
            // SAFETY: the entry's buffers live as long as `q`.
            while unsafe { ring.submission().push(&sqe) }.is_err() {
                ring.submit()?;
            }
        }
    }
    Ok(())
}

/// The request in entry `ent`: decoded and served.
fn serve_entry<H: Handler + ?Sized>(q: &Arc<Queue>, ent: usize, handler: &H) {
    let e = &q.ents[ent];
    // SAFETY: the kernel has written the entry and left it to us; nothing
    // else touches it until its reply is committed.
    let header = unsafe { std::slice::from_raw_parts(e.header, RING_HEADER) };
    let commit_id = u64::from_ne_bytes(header[COMMIT_ID..COMMIT_ID + 8].try_into().expect("8 bytes"));
    let payload_sz = u32::from_ne_bytes(header[PAYLOAD_SZ..PAYLOAD_SZ + 4].try_into().expect("4 bytes")) as usize;
    // A request without a payload borrows none of it: a data reply may go
    // straight there.
    let free = payload_sz == 0;
    let reply = |unique| Reply { unique, route: Route::Ring { q: q.clone(), ent, commit_id, free } };
    let h = match Header::parse(&header[IN_OUT..OP_IN]) {
        Ok(h) if payload_sz <= MAX_WRITE as usize => h,
        Ok(h) => {
            tracing::error!("FUSE ring request of opcode {} says it has {payload_sz} bytes", h.opcode);
            return reply(h.unique).error(libc::EIO);
        }
        Err(e) => {
            // Without a header the reply has no id: commit an error.
            tracing::error!("{e}");
            return reply(commit_id).error(libc::EIO);
        }
    };
    let head = &header[OP_IN..OP_IN + proto::op_header_len(h.opcode).min(128)];
    // SAFETY: as above; the kernel wrote `payload_sz` bytes.
    let tail = unsafe { std::slice::from_raw_parts(e.payload, payload_sz) };
    serve(handler, &h, head, tail, reply(h.unique));
}

/// Writes `d`'s reply into its entry: the SQE that commits it and fetches
/// the entry's next request.
fn commit(q: &Queue, d: Done, dev: RawFd) -> squeue::Entry128 {
    let e = &q.ents[d.ent];
    let len = match &d.body {
        Some(b) => {
            // SAFETY: the entry is ours until committed (see `Entry`), and
            // no request borrows it now: serving has returned.
            unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), e.payload, b.len()) };
            b.len()
        }
        None => d.payload,
    };
    // SAFETY: as above.
    let header = unsafe { std::slice::from_raw_parts_mut(e.header, RING_HEADER) };
    header[IN_OUT..IN_OUT + proto::OUT_HEADER].copy_from_slice(&proto::out_header(
        proto::OUT_HEADER + len,
        d.error,
        d.commit_id,
    ));
    header[PAYLOAD_SZ..PAYLOAD_SZ + 4].copy_from_slice(&(len as u32).to_ne_bytes());
    ring_cmd(dev, CMD_COMMIT_AND_FETCH, q.qid, d.ent, d.commit_id, None)
}

enum Route {
    /// Nothing to send (forgets, interrupts), or already sent.
    None,
    Dev(Arc<File>),
    /// `free`: the request borrows nothing of the entry's payload.
    Ring {
        q: Arc<Queue>,
        ent: usize,
        commit_id: u64,
        free: bool,
    },
}

/// The answer to one request. Answered from any thread; dropped unanswered,
/// it answers EIO.
pub struct Reply {
    unique: u64,
    route: Route,
}

impl Reply {
    fn disarmed(mut self) -> Reply {
        self.route = Route::None;
        self
    }

    fn send(mut self, error: i32, body: &[&[u8]]) {
        match std::mem::replace(&mut self.route, Route::None) {
            Route::None => {}
            Route::Dev(dev) => {
                if let Err(e) = write_reply(&dev, self.unique, error, body) {
                    // ENOENT: the request was interrupted and is gone.
                    if e.raw_os_error() != Some(libc::ENOENT) {
                        tracing::error!("replying to FUSE request {}: {e}", self.unique);
                    }
                }
            }
            Route::Ring { q, ent, commit_id, .. } => {
                let body = Some(body.concat());
                q.push(Done { ent, commit_id, error, body, payload: 0 });
            }
        }
    }

    /// Answers with an error number.
    pub fn error(self, errno: i32) {
        self.send(-errno, &[])
    }

    /// Answers with success and nothing more.
    pub fn ok(self) {
        self.send(0, &[])
    }

    /// Answers a lookup, or a create of a node.
    pub fn entry(self, a: &Attr) {
        let mut b = Vec::with_capacity(proto::ENTRY_OUT);
        proto::put_entry(&mut b, a, TTL);
        self.send(0, &[&b])
    }

    /// Answers with attributes.
    pub fn attr(self, a: &Attr) {
        let mut b = Vec::with_capacity(104);
        proto::put_attr_out(&mut b, a, TTL);
        self.send(0, &[&b])
    }

    /// Answers an open.
    pub fn opened(self, fh: u64, flags: u32) {
        let mut b = Vec::with_capacity(16);
        proto::put_open(&mut b, fh, flags);
        self.send(0, &[&b])
    }

    /// Answers a create of a file: its entry and its open.
    pub fn created(self, a: &Attr, fh: u64, flags: u32) {
        let mut b = Vec::with_capacity(proto::ENTRY_OUT + 16);
        proto::put_entry(&mut b, a, TTL);
        proto::put_open(&mut b, fh, flags);
        self.send(0, &[&b])
    }

    /// Answers a write.
    pub fn written(self, size: u32) {
        let mut b = Vec::with_capacity(8);
        proto::put_written(&mut b, size);
        self.send(0, &[&b])
    }

    /// Answers with the size an xattr value or list needs.
    pub fn xattr_size(self, size: u32) {
        let mut b = Vec::with_capacity(8);
        proto::put_xattr_size(&mut b, size);
        self.send(0, &[&b])
    }

    /// Answers a statfs.
    pub fn statfs(self, s: &proto::Statfs) {
        let mut b = Vec::with_capacity(80);
        proto::put_statfs(&mut b, s);
        self.send(0, &[&b])
    }

    /// Answers with bytes: a read's data, a link's target, a listing built
    /// with [`proto::put_dirent`], an xattr.
    pub fn data(mut self, d: &[u8]) {
        match std::mem::replace(&mut self.route, Route::None) {
            Route::Ring { q, ent, commit_id, free: true } if d.len() <= MAX_WRITE as usize => {
                // Straight into the entry's payload, which the request (a
                // READ, a READDIR) does not borrow, and nothing else touches
                // until the entry is committed.
                // SAFETY: the payload holds MAX_WRITE bytes.
                unsafe { std::ptr::copy_nonoverlapping(d.as_ptr(), q.ents[ent].payload, d.len()) };
                q.push(Done { ent, commit_id, error: 0, body: None, payload: d.len() });
            }
            route => {
                self.route = route;
                self.send(0, &[d])
            }
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if !matches!(self.route, Route::None) {
            tracing::error!("FUSE request {} was dropped unanswered: EIO", self.unique);
            let r = Reply { unique: self.unique, route: std::mem::replace(&mut self.route, Route::None) };
            r.send(-libc::EIO, &[]);
        }
    }
}
