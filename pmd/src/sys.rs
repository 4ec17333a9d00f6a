//! Every system call the runtime makes, in one place (STYLE.md item 3).
//!
//! Thread pinning, the reactor's wake-up eventfd and epoll set, and anonymous
//! memory mappings (with or without 2 MiB hugepages) are thin wrappers over
//! libc that return `std::io::Error`; the callers turn those into their own
//! error types with context.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

/// Size of one hugepage as used by the DMA pool (x86_64 default hugepage).
pub const HUGEPAGE_SIZE: usize = 2 << 20;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

/// The CPUs this process may run on (`sched_getaffinity`).
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain old data; all-zero is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size we pass.
    cvt(unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) })?;
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE and `set` is initialised.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Pins the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: see `allowed_cpus`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: callers pass CPUs taken from `allowed_cpus`, which are below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size we pass; 0 means this thread.
    cvt(unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) })?;
    Ok(())
}

/// A non-blocking eventfd used to wake a sleeping reactor.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    /// Creates a non-blocking, close-on-exec eventfd with a zero counter.
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes no pointers; a non-negative return is a new fd we own.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Adds one to the counter, waking any epoll waiter.
    pub fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an fd we own.
        // A full counter (EAGAIN) still leaves the fd readable, so the result can be ignored.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Resets the counter to zero.
    pub fn drain(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64 from an fd we own; EAGAIN means empty.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// An epoll set watching file descriptors for readability.
#[derive(Debug)]
pub struct Epoll(OwnedFd);

impl Epoll {
    /// Creates an empty close-on-exec epoll set.
    pub fn new() -> io::Result<Self> {
        // SAFETY: no pointers; a non-negative return is a new fd we own.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `fd` was just returned by epoll_create1.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Watches `fd` for readability, reporting `token` when it fires.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: token };
        // SAFETY: `ev` is a valid epoll_event; the kernel copies it.
        cvt(unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) })?;
        Ok(())
    }

    /// Stops watching `fd`.
    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        // SAFETY: EPOLL_CTL_DEL ignores the event pointer; null is allowed since Linux 2.6.9.
        cvt(unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) })?;
        Ok(())
    }

    /// Waits until a watched fd is readable or `timeout_ms` passes (-1: forever).
    /// Returns the number of ready descriptors; EINTR counts as zero.
    pub fn wait(&self, timeout_ms: i32) -> io::Result<usize> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 8];
        // SAFETY: `events` is a writable array of the length we pass.
        let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, timeout_ms) };
        if n < 0 {
            let err = io::Error::last_os_error();
            return if err.kind() == io::ErrorKind::Interrupted { Ok(0) } else { Err(err) };
        }
        Ok(n as usize)
    }
}

/// An anonymous private mapping, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    huge: bool,
}

// SAFETY: the mapping is plain memory owned by this value; moving it between threads is fine.
unsafe impl Send for Mapping {}
// SAFETY: `Mapping` hands out only a raw pointer; synchronising access is the owner's job.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes (a multiple of [`HUGEPAGE_SIZE`]) backed by 2 MiB hugepages.
    /// Fails with ENOMEM when not enough hugepages are reserved.
    pub fn hugepages(len: usize) -> io::Result<Self> {
        debug_assert_eq!(len % HUGEPAGE_SIZE, 0);
        let flags =
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_HUGE_2MB | libc::MAP_POPULATE;
        Self::map(len, flags, true)
    }

    /// Maps `len` bytes of ordinary memory, populated up front so that the first
    /// DMA into it does not fault.
    ///
    /// A mapping of whole hugepages starts on a 2 MiB boundary and is advised
    /// `MADV_HUGEPAGE` before it is populated, so that transparent hugepages back
    /// it where the system allows them (`enabled` is `madvise` on most
    /// distributions). Copies between processes (shm's large messages) pin the
    /// pages one by one: a 1 MiB transfer took 69-119 us on 4 KiB pages and
    /// 21-64 us on a hugepage.
    pub fn ordinary(len: usize) -> io::Result<Self> {
        const BASE: libc::c_int = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        if len % HUGEPAGE_SIZE != 0 {
            return Self::map(len, BASE | libc::MAP_POPULATE, false);
        }
        // Over-map by one hugepage, then trim both ends to a 2 MiB-aligned range.
        // Until the trim is done, an error drops `over`, which unmaps all of it.
        let over = Self::map(len + HUGEPAGE_SIZE, BASE, false)?;
        let start = over.ptr.as_ptr() as usize;
        let head = start.next_multiple_of(HUGEPAGE_SIZE) - start;
        let tail = HUGEPAGE_SIZE - head;
        // SAFETY: both ranges lie inside `over`, which nothing else references; the middle
        // `len` bytes stay mapped and pass to the value returned below.
        unsafe {
            if head > 0 {
                cvt(libc::munmap(start as *mut libc::c_void, head))?;
            }
            if tail > 0 {
                cvt(libc::munmap((start + head + len) as *mut libc::c_void, tail))?;
            }
        }
        std::mem::forget(over);
        let ptr = NonNull::new((start + head) as *mut u8).ok_or_else(|| io::Error::other("mmap returned null"))?;
        let mapping = Self { ptr, len, huge: false };
        // SAFETY: the range is the mapping owned by `mapping`. Advice can fail where the kernel
        // has no transparent hugepages (EINVAL); the memory then stays on 4 KiB pages.
        let _ = unsafe { libc::madvise(ptr.as_ptr().cast(), len, libc::MADV_HUGEPAGE) };
        mapping.populate()?;
        Ok(mapping)
    }

    /// Faults every page in for writing, as `MAP_POPULATE` would have at mmap time.
    fn populate(&self) -> io::Result<()> {
        // SAFETY: the range is this mapping. MADV_POPULATE_WRITE (Linux 5.14) only faults pages in.
        if unsafe { libc::madvise(self.ptr.as_ptr().cast(), self.len, libc::MADV_POPULATE_WRITE) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINVAL) {
            return Err(err);
        }
        // Older kernels: touch one byte per 4 KiB page.
        for off in (0..self.len).step_by(4096) {
            // SAFETY: `off` is inside the mapping, which is readable and writable.
            unsafe { self.ptr.as_ptr().add(off).write_volatile(0) };
        }
        Ok(())
    }

    fn map(len: usize, flags: libc::c_int, huge: bool) -> io::Result<Self> {
        // SAFETY: anonymous mapping with no address hint; the kernel picks a fresh range.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { ptr, len, huge })
    }

    /// Start of the mapping (page aligned; 2 MiB aligned for hugepages).
    pub fn as_ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Length in bytes (never zero).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is backed by hugepages.
    pub fn is_huge(&self) -> bool {
        self.huge
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping we created and nobody uses after drop.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Reads the 2 MiB hugepage counters from sysfs: (total, free). Missing files read as zero.
pub fn hugepage_counts() -> (u64, u64) {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/sys/kernel/mm/hugepages/hugepages-2048kB/{name}"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    (read("nr_hugepages"), read("free_hugepages"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `THPeligible` line of the smaps entry that starts at `addr`.
    fn thp_eligible(addr: usize) -> Option<bool> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        // Every entry has a THPeligible line, so the first one after the header is this entry's.
        let line = smaps
            .lines()
            .skip_while(|l| !l.starts_with(&format!("{addr:x}-")))
            .find(|l| l.starts_with("THPeligible:"))?;
        Some(line.split_whitespace().nth(1)? == "1")
    }

    #[test]
    fn ordinary_hugepage_multiples_are_aligned_advised_and_populated() {
        let m = Mapping::ordinary(2 * HUGEPAGE_SIZE).unwrap();
        let addr = m.as_ptr().as_ptr() as usize;
        assert_eq!(addr % HUGEPAGE_SIZE, 0, "a whole-hugepage mapping starts on a 2 MiB boundary");
        assert_eq!(m.len(), 2 * HUGEPAGE_SIZE);
        // SAFETY: the mapping is readable for its length, and only this test uses it.
        let bytes = unsafe { std::slice::from_raw_parts(m.as_ptr().as_ptr(), m.len()) };
        assert!(bytes.iter().all(|&b| b == 0), "populated anonymous memory reads as zeros");
        let enabled = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
        if enabled.contains("[never]") || enabled.is_empty() {
            eprintln!("transparent hugepages are off on this host; eligibility not checked");
            return;
        }
        assert_eq!(
            thp_eligible(addr),
            Some(true),
            "MADV_HUGEPAGE makes the range eligible under THP '{}'",
            enabled.trim()
        );
    }

    #[test]
    fn ordinary_odd_lengths_are_plain_mappings() {
        let m = Mapping::ordinary(12288).unwrap();
        assert_eq!(m.len(), 12288);
        assert_eq!(m.as_ptr().as_ptr() as usize % 4096, 0);
    }
}
