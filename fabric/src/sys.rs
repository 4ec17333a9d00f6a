//! Every socket system call of the crate (STYLE.md item 3): non-blocking
//! TCP sockets through socket2, vectored writes, and the epoll set a TCP
//! transport polls its sockets through (and a sleeping reactor waits on).
//! libfabric calls are in [`crate::ofi`].

use std::io::{self, IoSlice, Read};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use socket2::{Domain, Protocol, SockAddr, Socket, TcpKeepalive, Type};

/// A non-blocking TCP socket (listening or connected).
#[derive(Debug)]
pub struct TcpSocket(Socket);

/// How a non-blocking connect started.
pub enum Connecting {
    /// Connected at once (loopback often does).
    Done(TcpSocket),
    /// In progress: wait for writability, then [`TcpSocket::take_error`].
    Pending(TcpSocket),
}

fn new_socket(addr: &SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(*addr), Type::STREAM.nonblocking().cloexec(), Some(Protocol::TCP))?;
    Ok(s)
}

impl TcpSocket {
    /// A non-blocking listener on `addr` (port 0: any free port).
    pub fn listen(addr: &SocketAddr) -> io::Result<Self> {
        let s = new_socket(addr)?;
        s.set_reuse_address(true)?;
        s.bind(&SockAddr::from(*addr))?;
        s.listen(1024)?;
        Ok(Self(s))
    }

    /// Starts a non-blocking connect to `addr`.
    pub fn connect(addr: &SocketAddr) -> io::Result<Connecting> {
        let s = new_socket(addr)?;
        match s.connect(&SockAddr::from(*addr)) {
            Ok(()) => Ok(Connecting::Done(Self(s))),
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(Connecting::Pending(Self(s))),
            Err(e) => Err(e),
        }
    }

    /// Accepts one pending connection (non-blocking); `Ok(None)` if none is waiting.
    pub fn accept(&self) -> io::Result<Option<(TcpSocket, SocketAddr)>> {
        match self.0.accept() {
            Ok((s, addr)) => {
                s.set_nonblocking(true)?;
                let addr = addr.as_socket().ok_or_else(|| io::Error::other("accepted a non-IP socket"))?;
                Ok(Some((Self(s), addr)))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sets TCP_NODELAY (frames go out as written) and kernel keepalive
    /// probes after `idle_secs` (a backstop to the RPC layer's own pings).
    pub fn tune(&self, idle_secs: u64) -> io::Result<()> {
        self.0.set_tcp_nodelay(true)?;
        let ka = TcpKeepalive::new().with_time(std::time::Duration::from_secs(idle_secs.max(1)));
        self.0.set_tcp_keepalive(&ka)
    }

    /// The pending error of a socket whose connect finished (`SO_ERROR`).
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        self.0.take_error()
    }

    /// The local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()?.as_socket().ok_or_else(|| io::Error::other("not an IP socket"))
    }

    /// Reads into `buf`: `Ok(Some(0))` at end of stream, `Ok(None)` if nothing is there now.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            match (&self.0).read(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes as much of `bufs` as the socket takes now (0 if it is full).
    pub fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        loop {
            match self.0.send_vectored_with_flags(bufs, libc::MSG_NOSIGNAL) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl AsRawFd for TcpSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// What one descriptor reported.
#[derive(Debug, Clone, Copy)]
pub struct Ready {
    /// The token it was registered with.
    pub token: u64,
    /// Readable, or hung up / in error (a read will tell which).
    pub read: bool,
    /// Writable.
    pub write: bool,
}

/// An epoll set (level-triggered). Its own fd becomes readable when any
/// watched socket is ready, so a reactor can sleep on it.
#[derive(Debug)]
pub struct Poller(OwnedFd);

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

impl Poller {
    /// An empty set.
    pub fn new() -> io::Result<Self> {
        // SAFETY: no pointers; a non-negative return is a new fd we own.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `fd` was just returned by epoll_create1 and is owned by nobody else.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: u64, write: bool) -> io::Result<()> {
        let events = libc::EPOLLIN | libc::EPOLLRDHUP | if write { libc::EPOLLOUT } else { 0 };
        let mut ev = libc::epoll_event { events: events as u32, u64: token };
        // SAFETY: `ev` is a valid epoll_event that the kernel copies.
        cvt(unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut ev) })?;
        Ok(())
    }

    /// Watches `fd` for reading (and writing if `write`).
    pub fn add(&self, fd: RawFd, token: u64, write: bool) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token, write)
    }

    /// Changes whether `fd` is watched for writing.
    pub fn modify(&self, fd: RawFd, token: u64, write: bool) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, token, write)
    }

    /// Stops watching `fd`.
    pub fn remove(&self, fd: RawFd) {
        // SAFETY: EPOLL_CTL_DEL ignores the event pointer (null is allowed since Linux 2.6.9).
        let _ = unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
    }

    /// The ready descriptors, without waiting.
    pub fn ready(&self, out: &mut Vec<Ready>) -> io::Result<()> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        // SAFETY: `events` is writable for the length we pass; timeout 0 never blocks.
        let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(()) } else { Err(e) };
        }
        let hup = (libc::EPOLLHUP | libc::EPOLLERR | libc::EPOLLRDHUP) as u32;
        for ev in &events[..n as usize] {
            let bits = ev.events;
            out.push(Ready {
                token: ev.u64,
                read: bits & (libc::EPOLLIN as u32 | hup) != 0,
                write: bits & (libc::EPOLLOUT as u32 | libc::EPOLLERR as u32) != 0,
            });
        }
        Ok(())
    }
}

impl AsRawFd for Poller {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
