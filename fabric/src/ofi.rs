//! The safe layer over libfabric, and every libfabric call of the crate.
//!
//! libfabric builds a communication endpoint from a stack of objects, each
//! opened from its parent and closed before it:
//!
//! ```text
//!   fi_getinfo ──▶ fi_info (provider, capabilities, limits)
//!   fabric ──▶ domain ──┬──▶ completion queue (CQ): finished sends, receives, RMA reads
//!                       ├──▶ address vector (AV): peer addresses ──▶ fi_addr_t handles
//!                       ├──▶ memory regions (MR): memory a peer may read by RMA
//!                       └──▶ endpoint (RDM: reliable, unconnected), bound to the CQ and AV
//! ```
//!
//! Each object is an RAII newtype here ([`Fabric`], [`Domain`], [`Cq`], [`Av`],
//! [`Ep`], [`Mr`]) that closes itself on drop, and one [`Endpoint`] owns a
//! whole stack, its fields declared so that children drop before parents. The
//! domain is opened with `FI_THREAD_DOMAIN` (no locking inside the provider),
//! so every object of a domain must be used by one thread at a time: the
//! objects are not `Send` on their own, only the [`Endpoint`] that holds all
//! of them moves between threads, as one piece.
//!
//! Operations that hand memory to the provider (posting a receive, a send, an
//! RMA read, registering memory) are `unsafe fn`s: the memory must stay valid
//! until the operation's completion is read from the CQ or the endpoint is
//! closed. The transport above keeps those buffers next to the operation.

use std::cell::UnsafeCell;
use std::ffi::{CStr, CString, c_void};
use std::os::fd::RawFd;
use std::ptr::{self, NonNull};

use fabric_sys as sys;

use crate::error::FabricError;

/// The libfabric API version this code is written against.
const API_VERSION: u32 = sys::make_version(1, 17);

/// libfabric's text for a (positive or negative) error number.
pub fn strerror(code: i32) -> String {
    // SAFETY: fi_strerror returns a pointer to a static NUL-terminated string for any input.
    let s = unsafe { CStr::from_ptr(sys::fi_strerror(code.abs())) };
    s.to_string_lossy().into_owned()
}

fn ofi_err(call: &'static str, context: impl Into<String>, ret: isize) -> FabricError {
    let code = ret.unsigned_abs().min(i32::MAX as usize) as i32;
    FabricError::Ofi { call, context: context.into(), code, message: strerror(code) }
}

fn check(call: &'static str, context: &str, ret: impl Into<i64>) -> Result<(), FabricError> {
    let ret = ret.into();
    if ret < 0 { Err(ofi_err(call, context, ret as isize)) } else { Ok(()) }
}

/// The version of the libfabric library loaded at run time ("1.17").
pub fn library_version() -> String {
    // SAFETY: fi_version takes no arguments and only returns a number.
    let v = unsafe { sys::fi_version() };
    format!("{}.{}", v >> 16, v & 0xffff)
}

/// What to ask `fi_getinfo` for.
#[derive(Debug, Clone, Default)]
pub struct Query<'a> {
    /// Provider name ("tcp;ofi_rxm", "shm", "verbs;ofi_rxm"); any if `None`.
    pub provider: Option<&'a str>,
    /// Node (host or shm name) to bind to.
    pub node: Option<&'a str>,
    /// Service (port) to bind to.
    pub service: Option<&'a str>,
    /// Require RMA reads of registered memory.
    pub rma: bool,
}

/// Capabilities every endpoint needs: messages. (Each message names its
/// connection in its remote CQ data rather than through `FI_SOURCE`: shm in
/// libfabric 1.17 reports a wrong source for senders not in the AV.)
const BASE_CAPS: u64 = sys::FI_MSG as u64;
/// Capabilities for RMA: reads (how bulk payloads move) and writes.
const RMA_CAPS: u64 = sys::FI_RMA as u64
    | sys::FI_READ as u64
    | sys::FI_REMOTE_READ as u64
    | sys::FI_WRITE as u64
    | sys::FI_REMOTE_WRITE as u64;

/// The list `fi_getinfo` returned, freed on drop.
pub struct InfoList(NonNull<sys::fi_info>);

impl InfoList {
    /// Asks libfabric for reliable-datagram endpoints matching `q`. `Ok(None)`:
    /// nothing matches.
    pub fn get(q: &Query<'_>) -> Result<Option<InfoList>, FabricError> {
        let hints = Hints::new(q)?;
        let node = q.node.map(CString::new).transpose().map_err(|_| bad_string("node", q.node))?;
        let service = q.service.map(CString::new).transpose().map_err(|_| bad_string("service", q.service))?;
        let flags = if q.node.is_some() || q.service.is_some() { sys::FI_SOURCE } else { 0 };
        let mut out: *mut sys::fi_info = ptr::null_mut();
        // SAFETY: node/service are NUL-terminated or null, hints is a valid fi_info, `out` is writable.
        let ret = unsafe {
            sys::fi_getinfo(
                API_VERSION,
                node.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
                service.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
                flags,
                hints.0.as_ptr(),
                &mut out,
            )
        };
        if ret == -(sys::FI_ENODATA as i32) {
            return Ok(None);
        }
        check("fi_getinfo", q.provider.unwrap_or("any provider"), ret)?;
        Ok(NonNull::new(out).map(InfoList))
    }

    /// The entries, in libfabric's order of preference.
    pub fn iter(&self) -> impl Iterator<Item = InfoRef<'_>> {
        let mut cur = self.0.as_ptr();
        std::iter::from_fn(move || {
            // SAFETY: the list is owned by self and stays valid while borrowed; `next` links are valid or null.
            let info = unsafe { cur.as_ref()? };
            cur = info.next;
            Some(InfoRef(info))
        })
    }
}

impl Drop for InfoList {
    fn drop(&mut self) {
        // SAFETY: the list came from fi_getinfo/fi_dupinfo and is freed once.
        unsafe { sys::fi_freeinfo(self.0.as_ptr()) };
    }
}

fn bad_string(what: &'static str, value: Option<&str>) -> FabricError {
    FabricError::BadAddress {
        addr: value.unwrap_or_default().to_string(),
        transport: "libfabric".into(),
        reason: format!("the {what} contains a NUL byte"),
    }
}

/// A hints structure for fi_getinfo, freed on drop.
struct Hints(NonNull<sys::fi_info>);

impl Hints {
    fn new(q: &Query<'_>) -> Result<Self, FabricError> {
        // SAFETY: fi_allocinfo returns a zeroed fi_info with all attribute structs allocated, or null.
        let raw = unsafe { sys::fi_allocinfo() };
        let hints = Hints(NonNull::new(raw).ok_or_else(|| ofi_err("fi_allocinfo", "", -(libc::ENOMEM as isize)))?);
        let prov = q.provider.map(CString::new).transpose().map_err(|_| bad_string("provider", q.provider))?;
        // SAFETY: `raw` and its attribute pointers were allocated by fi_allocinfo and are exclusively ours.
        unsafe {
            let h = &mut *raw;
            h.caps = BASE_CAPS | if q.rma { RMA_CAPS } else { 0 };
            // We always pass an fi_context2 per operation and post a buffer for every
            // message, so these modes cost nothing.
            h.mode = sys::FI_CONTEXT | sys::FI_CONTEXT2 | sys::FI_RX_CQ_DATA;
            (*h.ep_attr).type_ = sys::FI_EP_RDM;
            (*h.tx_attr).msg_order = sys::FI_ORDER_SAS as u64;
            (*h.rx_attr).msg_order = sys::FI_ORDER_SAS as u64;
            let d = &mut *h.domain_attr;
            d.threading = sys::FI_THREAD_DOMAIN;
            d.cq_data_size = 4;
            d.mr_mode = (sys::FI_MR_VIRT_ADDR | sys::FI_MR_ALLOCATED | sys::FI_MR_PROV_KEY) as i32;
            if let Some(p) = prov {
                // fi_freeinfo frees this with free(): it must come from malloc.
                (*h.fabric_attr).prov_name = libc::strdup(p.as_ptr());
            }
        }
        Ok(hints)
    }
}

impl Drop for Hints {
    fn drop(&mut self) {
        // SAFETY: allocated by fi_allocinfo, freed once.
        unsafe { sys::fi_freeinfo(self.0.as_ptr()) };
    }
}

/// One entry of an [`InfoList`].
#[derive(Clone, Copy)]
pub struct InfoRef<'a>(&'a sys::fi_info);

fn cstr(p: *const std::os::raw::c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: libfabric's attribute strings are NUL-terminated and live as long as the info.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

impl InfoRef<'_> {
    /// The provider ("tcp;ofi_rxm").
    pub fn provider(&self) -> String {
        // SAFETY: fabric_attr is always allocated in an fi_info returned by fi_getinfo.
        cstr(unsafe { (*self.0.fabric_attr).prov_name })
    }
    /// The fabric name (for tcp: the subnet).
    pub fn fabric(&self) -> String {
        // SAFETY: as in `provider`.
        cstr(unsafe { (*self.0.fabric_attr).name })
    }
    /// The domain name (for tcp: the interface).
    pub fn domain(&self) -> String {
        // SAFETY: domain_attr is always allocated in a returned fi_info.
        cstr(unsafe { (*self.0.domain_attr).name })
    }
    /// Whether RMA reads are offered.
    pub fn rma(&self) -> bool {
        self.0.caps & RMA_CAPS == RMA_CAPS
    }
    /// The largest message the provider moves.
    pub fn max_msg_size(&self) -> u64 {
        // SAFETY: ep_attr is always allocated in a returned fi_info.
        unsafe { (*self.0.ep_attr).max_msg_size as u64 }
    }
    /// The largest send that completes at once (`fi_inject`).
    pub fn inject_size(&self) -> usize {
        // SAFETY: tx_attr is always allocated in a returned fi_info.
        unsafe { (*self.0.tx_attr).inject_size }
    }
    /// Memory-registration mode bits.
    fn mr_mode(&self) -> u32 {
        // SAFETY: domain_attr is always allocated in a returned fi_info.
        unsafe { (*self.0.domain_attr).mr_mode as u32 }
    }
    /// The address format (`FI_SOCKADDR_IN`, `FI_ADDR_STR`, ...).
    pub fn addr_format(&self) -> u32 {
        self.0.addr_format
    }
    /// Names of the capability bits set.
    pub fn caps(&self) -> Vec<&'static str> {
        const NAMES: [(u64, &str); 11] = [
            (sys::FI_MSG as u64, "msg"),
            (sys::FI_TAGGED as u64, "tagged"),
            (sys::FI_RMA as u64, "rma"),
            (sys::FI_READ as u64, "read"),
            (sys::FI_REMOTE_READ as u64, "remote_read"),
            (sys::FI_WRITE as u64, "write"),
            (sys::FI_REMOTE_WRITE as u64, "remote_write"),
            (sys::FI_SOURCE, "source"),
            (sys::FI_MULTI_RECV as u64, "multi_recv"),
            (sys::FI_LOCAL_COMM, "local_comm"),
            (sys::FI_REMOTE_COMM, "remote_comm"),
        ];
        NAMES.iter().filter(|(bit, _)| self.0.caps & bit != 0).map(|(_, n)| *n).collect()
    }
}

/// Declares an RAII newtype over one libfabric object that closes it on drop.
macro_rules! fid_type {
    ($(#[$doc:meta])* $name:ident, $raw:ty) => {
        $(#[$doc])*
        pub struct $name(NonNull<$raw>);
        impl Drop for $name {
            fn drop(&mut self) {
                // SAFETY: the object was opened by libfabric, is closed exactly once here, and its
                // children are closed first (they are dropped before their parents by the owner).
                let ret = unsafe { sys::fi_close(self.fid()) };
                if ret != 0 {
                    tracing::warn!(object = stringify!($name), error = %strerror(ret), "closing a libfabric object failed");
                }
            }
        }
        impl $name {
            fn fid(&self) -> *mut sys::fid {
                // SAFETY: every fid_* struct starts with an embedded `struct fid`.
                unsafe { &raw mut (*self.0.as_ptr()).fid }
            }
        }
    };
}

fid_type!(
    /// A fabric: the provider's top-level object.
    Fabric,
    sys::fid_fabric
);
fid_type!(
    /// A domain: one NIC (or the shm or tcp stack) as seen through a fabric.
    Domain,
    sys::fid_domain
);
fid_type!(
    /// A completion queue.
    Cq,
    sys::fid_cq
);
fid_type!(
    /// An address vector: peer addresses and their `fi_addr_t` handles.
    Av,
    sys::fid_av
);
fid_type!(
    /// A reliable-datagram endpoint.
    Ep,
    sys::fid_ep
);
fid_type!(
    /// A registered memory region.
    Mr,
    sys::fid_mr
);

/// Opens an object through a libfabric "open" call that writes its pointer.
fn open<T>(call: &'static str, context: &str, f: impl FnOnce(*mut *mut T) -> i32) -> Result<NonNull<T>, FabricError> {
    let mut out: *mut T = ptr::null_mut();
    check(call, context, f(&mut out))?;
    NonNull::new(out).ok_or_else(|| ofi_err(call, format!("{context}: returned no object"), -(libc::EIO as isize)))
}

/// Completions read per [`Endpoint::cq_read`] at most.
pub const CQ_BATCH: usize = 64;

/// One finished operation, as read from the CQ.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    /// The operation slot given when it was posted.
    pub slot: usize,
    /// Bytes received (receives only).
    pub len: usize,
    /// The remote CQ data the sender attached (receives only).
    pub data: Option<u64>,
}

/// A failed operation, as read from the CQ's error queue.
#[derive(Debug, Clone)]
pub struct CompletionError {
    /// The operation slot, if the provider named one.
    pub slot: Option<usize>,
    /// The error, ready to show.
    pub error: FabricError,
}

/// Access rights of a memory registration.
#[derive(Debug, Clone, Copy)]
pub enum Access {
    /// A peer reads it by RMA (a bulk payload we expose).
    RemoteRead,
    /// A peer writes into it by RMA.
    RemoteWrite,
    /// We read a peer's memory into it.
    LocalRead,
}

/// Options of [`Endpoint::open`].
#[derive(Debug, Clone, Copy)]
pub struct EndpointOptions {
    /// Completion-queue entries.
    pub cq_size: usize,
    /// Operation slots (posted receives + sends + RMA reads in flight).
    pub slots: usize,
    /// Ask for a wait fd so a sleeping reactor can be woken.
    pub wait_fd: bool,
}

/// A complete endpoint: fabric, domain, CQ, AV, endpoint and the memory
/// regions registered through it, closed in the right order on drop.
pub struct Endpoint {
    // Field order is drop order: children before parents.
    ep: Ep,
    mrs: Vec<Option<Mr>>,
    av: Av,
    cq: Cq,
    domain: Domain,
    fabric: Fabric,
    info: InfoList,
    /// Per-slot context storage handed to the provider (FI_CONTEXT/FI_CONTEXT2).
    contexts: Box<[UnsafeCell<sys::fi_context2>]>,
    free_mrs: Vec<usize>,
    wait_fd: Option<RawFd>,
    name: Vec<u8>,
    virt_addr: bool,
    prov_key: bool,
    next_key: u64,
    cq_buf: Vec<sys::fi_cq_data_entry>,
}

// SAFETY: the endpoint owns every object of its domain (opened FI_THREAD_DOMAIN) and
// nothing of it escapes: moving the whole stack to another thread keeps all calls on
// one thread at a time, which is what FI_THREAD_DOMAIN requires.
unsafe impl Send for Endpoint {}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ofi::Endpoint").field("provider", &self.provider()).finish()
    }
}

impl Endpoint {
    /// Opens the whole stack for the first entry of `info` (which it keeps).
    pub fn open(info: InfoList, opts: EndpointOptions) -> Result<Self, FabricError> {
        let entry = info.0.as_ptr();
        let prov = info.iter().next().map(|i| i.provider()).unwrap_or_default();
        let ctx = prov.as_str();
        // SAFETY: `entry` is a valid fi_info owned by `info`; each object is opened from its
        // valid parent, and the out-pointers are writable.
        let fabric = Fabric(open("fi_fabric", ctx, |out| unsafe {
            sys::fi_fabric((*entry).fabric_attr, out, ptr::null_mut())
        })?);
        // SAFETY: as above.
        let domain = Domain(open("fi_domain", ctx, |out| unsafe {
            sys::fi_domain(fabric.0.as_ptr(), entry, out, ptr::null_mut())
        })?);
        let cq = Self::open_cq(&domain, ctx, opts)?;
        let mut av_attr = sys::fi_av_attr { type_: sys::FI_AV_TABLE, count: 64, ..Default::default() };
        // SAFETY: as above; av_attr lives across the call.
        let av = Av(open("fi_av_open", ctx, |out| unsafe {
            sys::fi_av_open(domain.0.as_ptr(), &mut av_attr, out, ptr::null_mut())
        })?);
        // SAFETY: as above.
        let ep = Ep(open("fi_endpoint", ctx, |out| unsafe {
            sys::fi_endpoint(domain.0.as_ptr(), entry, out, ptr::null_mut())
        })?);
        // SAFETY: binding live objects of the same domain.
        check("fi_ep_bind", "address vector", unsafe { sys::fi_ep_bind(ep.0.as_ptr(), av.fid(), 0) })?;
        let cq_flags = (sys::FI_TRANSMIT | sys::FI_RECV) as u64;
        // SAFETY: as above.
        check("fi_ep_bind", "completion queue", unsafe { sys::fi_ep_bind(ep.0.as_ptr(), cq.0.fid(), cq_flags) })?;
        // SAFETY: the endpoint is bound to its CQ and AV.
        check("fi_enable", ctx, unsafe { sys::fi_enable(ep.0.as_ptr()) })?;
        let mut name = vec![0u8; 1024];
        let mut len = name.len();
        // SAFETY: `name` is writable for `len` bytes; libfabric writes at most that and updates len.
        check("fi_getname", ctx, unsafe { sys::fi_getname(ep.fid(), name.as_mut_ptr().cast(), &mut len) })?;
        name.truncate(len);
        // SAFETY: `entry` is valid (see above).
        let mr_mode = InfoRef(unsafe { &*entry }).mr_mode();
        let contexts = (0..opts.slots).map(|_| UnsafeCell::new(sys::fi_context2::default())).collect();
        Ok(Self {
            ep,
            mrs: Vec::new(),
            av,
            cq: cq.0,
            domain,
            fabric,
            info,
            contexts,
            free_mrs: Vec::new(),
            wait_fd: cq.1,
            name,
            virt_addr: mr_mode & sys::FI_MR_VIRT_ADDR != 0,
            prov_key: mr_mode & sys::FI_MR_PROV_KEY != 0,
            next_key: 1,
            cq_buf: vec![sys::fi_cq_data_entry::default(); CQ_BATCH],
        })
    }

    /// Opens the CQ with a wait fd if asked and offered, else without.
    fn open_cq(domain: &Domain, ctx: &str, opts: EndpointOptions) -> Result<(Cq, Option<RawFd>), FabricError> {
        let mut attr = sys::fi_cq_attr {
            size: opts.cq_size,
            format: sys::FI_CQ_FORMAT_DATA,
            wait_obj: if opts.wait_fd { sys::FI_WAIT_FD } else { sys::FI_WAIT_NONE },
            ..Default::default()
        };
        // SAFETY: attr lives across the call; domain is live.
        let opened = open("fi_cq_open", ctx, |out| unsafe {
            sys::fi_cq_open(domain.0.as_ptr(), &mut attr, out, ptr::null_mut())
        });
        let cq = match opened {
            Ok(cq) => Cq(cq),
            Err(e) if opts.wait_fd => {
                tracing::info!(provider = ctx, "no wait fd on completion queues ({e}); reactors poll this endpoint");
                return Self::open_cq(domain, ctx, EndpointOptions { wait_fd: false, ..opts });
            }
            Err(e) => return Err(e),
        };
        if !opts.wait_fd {
            return Ok((cq, None));
        }
        let mut fd: RawFd = -1;
        // SAFETY: FI_GETWAIT on a CQ opened with FI_WAIT_FD writes an int fd into `fd`.
        let ret = unsafe { sys::fi_control(cq.fid(), sys::FI_GETWAIT as i32, (&raw mut fd).cast()) };
        if ret < 0 || fd < 0 {
            tracing::info!(provider = ctx, error = %strerror(ret), "the completion queue gives no wait fd; reactors poll this endpoint");
            return Ok((cq, None));
        }
        Ok((cq, Some(fd)))
    }

    /// The provider in use.
    pub fn provider(&self) -> String {
        self.info.iter().next().map(|i| i.provider()).unwrap_or_default()
    }

    /// The endpoint's raw address, as peers insert it in their AV.
    pub fn name(&self) -> &[u8] {
        &self.name
    }

    /// Whether RMA reads were granted.
    pub fn rma(&self) -> bool {
        self.info.iter().next().is_some_and(|i| i.rma())
    }

    /// Bytes a send may have and still complete at once through [`Endpoint::inject`].
    pub fn inject_size(&self) -> usize {
        self.info.iter().next().map_or(0, |i| i.inject_size())
    }

    /// Whether addresses are strings (shm) rather than socket addresses.
    pub fn string_addresses(&self) -> bool {
        self.info.iter().next().is_some_and(|i| i.addr_format() == sys::FI_ADDR_STR)
    }

    /// The number of operation slots.
    pub fn slots(&self) -> usize {
        self.contexts.len()
    }

    fn context(&self, slot: usize) -> *mut c_void {
        self.contexts[slot].get().cast()
    }

    fn slot_of(&self, ctx: *mut c_void) -> Option<usize> {
        let base = self.contexts.as_ptr() as usize;
        let size = std::mem::size_of::<UnsafeCell<sys::fi_context2>>();
        let off = (ctx as usize).checked_sub(base)?;
        (off % size == 0 && off / size < self.contexts.len()).then_some(off / size)
    }

    /// Inserts a peer's raw address; returns its handle.
    pub fn av_insert(&mut self, addr: &[u8]) -> Result<u64, FabricError> {
        let mut fi_addr: sys::fi_addr_t = sys::FI_ADDR_NOTAVAIL;
        // SAFETY: `addr` is readable for its length (libfabric reads one address of its format);
        // fi_addr is writable.
        let ret =
            unsafe { sys::fi_av_insert(self.av.0.as_ptr(), addr.as_ptr().cast(), 1, &mut fi_addr, 0, ptr::null_mut()) };
        if ret != 1 {
            return Err(ofi_err(
                "fi_av_insert",
                self.addr_string(addr),
                if ret < 0 { ret as isize } else { -(libc::EINVAL as isize) },
            ));
        }
        Ok(fi_addr)
    }

    /// Removes a peer from the address vector.
    pub fn av_remove(&mut self, fi_addr: u64) {
        let mut a = fi_addr;
        // SAFETY: `a` is a readable fi_addr_t.
        let ret = unsafe { sys::fi_av_remove(self.av.0.as_ptr(), &mut a, 1, 0) };
        if ret != 0 {
            tracing::debug!(fi_addr, error = %strerror(ret), "fi_av_remove failed");
        }
    }

    /// A raw address in the provider's text form ("fi_sockaddr_in://127.0.0.1:7000").
    pub fn addr_string(&self, addr: &[u8]) -> String {
        let mut buf = vec![0u8; 256];
        let mut len = buf.len();
        // SAFETY: buf is writable for len bytes; fi_av_straddr NUL-terminates within it.
        let p =
            unsafe { sys::fi_av_straddr(self.av.0.as_ptr(), addr.as_ptr().cast(), buf.as_mut_ptr().cast(), &mut len) };
        if p.is_null() {
            return format!("{addr:02x?}");
        }
        cstr(buf.as_ptr().cast())
    }

    /// Posts a receive into `buf[..len]` for operation `slot`.
    ///
    /// # Safety
    /// `buf` must be valid for writes of `len` bytes until the slot's completion
    /// is read or the endpoint is dropped.
    pub unsafe fn post_recv(&mut self, slot: usize, buf: *mut u8, len: usize) -> Result<(), FabricError> {
        let ctx = self.context(slot);
        // SAFETY: the caller keeps buf valid; ctx points into our context array.
        let ret =
            unsafe { sys::fi_recv(self.ep.0.as_ptr(), buf.cast(), len, ptr::null_mut(), sys::FI_ADDR_UNSPEC, ctx) };
        check("fi_recv", "posting a receive buffer", ret as i64)
    }

    /// Sends `parts` (at most 2) to `dest` as one message with remote CQ data
    /// `data`, for operation `slot`. `Ok(false)`: the send queue is full, try
    /// again after reading completions.
    ///
    /// # Safety
    /// The memory of `parts` must stay valid and unchanged until the slot's
    /// completion is read or the endpoint is dropped.
    pub unsafe fn send(&mut self, slot: usize, parts: &[&[u8]], dest: u64, data: u32) -> Result<bool, FabricError> {
        let iov: [libc::iovec; 2] = std::array::from_fn(|i| {
            let p = parts.get(i).copied().unwrap_or_default();
            libc::iovec { iov_base: p.as_ptr() as *mut c_void, iov_len: p.len() }
        });
        let msg = sys::fi_msg {
            msg_iov: iov.as_ptr().cast(),
            desc: ptr::null_mut(),
            iov_count: parts.len().min(2),
            addr: dest,
            context: self.context(slot),
            data: data.into(),
        };
        let flags = (sys::FI_REMOTE_CQ_DATA | sys::FI_COMPLETION) as u64;
        // SAFETY: iov describes caller-kept memory; fi_sendmsg copies the message and iovec array.
        let ret = unsafe { sys::fi_sendmsg(self.ep.0.as_ptr(), &msg, flags) };
        if ret == -(sys::FI_EAGAIN as isize) {
            return Ok(false);
        }
        check("fi_sendmsg", "sending a frame", ret as i64).map(|()| true)
    }

    /// Sends `msg` (at most [`Endpoint::inject_size`] bytes) to `dest` with
    /// remote CQ data `data`; the buffer is free again on return and no
    /// completion follows. `Ok(false)`: the send queue is full.
    pub fn inject(&mut self, msg: &[u8], dest: u64, data: u32) -> Result<bool, FabricError> {
        // SAFETY: fi_injectdata copies `msg` before returning.
        let ret = unsafe { sys::fi_injectdata(self.ep.0.as_ptr(), msg.as_ptr().cast(), msg.len(), data.into(), dest) };
        if ret == -(sys::FI_EAGAIN as isize) {
            return Ok(false);
        }
        check("fi_injectdata", "sending a frame", ret as i64).map(|()| true)
    }

    /// Reads `len` bytes of a peer's registered memory (`addr`, `key`) into
    /// `buf`, for operation `slot`. `Ok(false)`: the queue is full.
    ///
    /// # Safety
    /// `buf` must be valid for writes of `len` bytes until the slot's
    /// completion is read or the endpoint is dropped.
    pub unsafe fn read(
        &mut self,
        slot: usize,
        buf: *mut u8,
        len: usize,
        src: u64,
        addr: u64,
        key: u64,
    ) -> Result<bool, FabricError> {
        let ctx = self.context(slot);
        // SAFETY: the caller keeps buf valid; ctx points into our context array.
        let ret = unsafe { sys::fi_read(self.ep.0.as_ptr(), buf.cast(), len, ptr::null_mut(), src, addr, key, ctx) };
        if ret == -(sys::FI_EAGAIN as isize) {
            return Ok(false);
        }
        check("fi_read", "reading a bulk payload", ret as i64).map(|()| true)
    }

    /// Writes `len` bytes from `buf` into a peer's registered memory (`addr`,
    /// `key`), for operation `slot`; the completion says the bytes are in
    /// place. `Ok(false)`: the queue is full.
    ///
    /// # Safety
    /// `buf` must stay valid and unchanged for `len` bytes until the slot's
    /// completion is read or the endpoint is dropped.
    pub unsafe fn write(
        &mut self,
        slot: usize,
        buf: *const u8,
        len: usize,
        dest: u64,
        addr: u64,
        key: u64,
    ) -> Result<bool, FabricError> {
        let iov = libc::iovec { iov_base: buf as *mut c_void, iov_len: len };
        let rma_iov = sys::fi_rma_iov { addr, len, key };
        let msg = sys::fi_msg_rma {
            msg_iov: (&raw const iov).cast(),
            desc: ptr::null_mut(),
            iov_count: 1,
            addr: dest,
            rma_iov: &rma_iov,
            rma_iov_count: 1,
            context: self.context(slot),
            data: 0,
        };
        // Delivery complete: the completion means the bytes are in the peer's memory,
        // not just out of ours (the default for writes).
        let flags = (sys::FI_DELIVERY_COMPLETE | sys::FI_COMPLETION) as u64;
        // SAFETY: the caller keeps buf valid; fi_writemsg copies the message and its iovecs.
        let ret = unsafe { sys::fi_writemsg(self.ep.0.as_ptr(), &msg, flags) };
        if ret == -(sys::FI_EAGAIN as isize) {
            return Ok(false);
        }
        check("fi_write", "writing into a peer's memory", ret as i64).map(|()| true)
    }

    /// Registers `len` bytes at `buf`; returns the region's id, the address a
    /// peer uses for it, and its key.
    ///
    /// # Safety
    /// The memory must stay valid until [`Endpoint::mr_close`] of the id (or
    /// the endpoint's drop); a peer may read it, or the provider write it, meanwhile.
    pub unsafe fn mr_reg(
        &mut self,
        buf: *const u8,
        len: usize,
        access: Access,
    ) -> Result<(usize, u64, u64), FabricError> {
        let acs = match access {
            Access::RemoteRead => sys::FI_REMOTE_READ,
            Access::RemoteWrite => sys::FI_REMOTE_WRITE,
            Access::LocalRead => sys::FI_READ,
        } as u64;
        let requested_key = self.next_key;
        self.next_key += 1;
        // SAFETY: the caller keeps the memory valid while registered.
        let mr = Mr(open("fi_mr_reg", "registering a bulk buffer", |out| unsafe {
            sys::fi_mr_reg(self.domain.0.as_ptr(), buf.cast(), len, acs, 0, requested_key, 0, out, ptr::null_mut())
        })?);
        // SAFETY: the region is live.
        let key = if self.prov_key { unsafe { sys::fi_mr_key(mr.0.as_ptr()) } } else { requested_key };
        if key == sys::FI_KEY_NOTAVAIL {
            return Err(ofi_err("fi_mr_key", "the provider gave no key", -(libc::EINVAL as isize)));
        }
        let addr = if self.virt_addr { buf as u64 } else { 0 };
        let id = match self.free_mrs.pop() {
            Some(i) => {
                self.mrs[i] = Some(mr);
                i
            }
            None => {
                self.mrs.push(Some(mr));
                self.mrs.len() - 1
            }
        };
        Ok((id, addr, key))
    }

    /// Deregisters a region: peers can no longer read it.
    pub fn mr_close(&mut self, id: usize) {
        if let Some(slot) = self.mrs.get_mut(id)
            && slot.take().is_some()
        {
            self.free_mrs.push(id);
        }
    }

    /// Reads up to [`CQ_BATCH`] completions into `out`. An error completion is returned
    /// as `Err` (one per call).
    pub fn cq_read(&mut self, out: &mut Vec<Completion>) -> Result<(), CompletionError> {
        let n = self.cq_buf.len();
        // SAFETY: the buffer has room for `n` entries of the CQ's format (FI_CQ_FORMAT_DATA).
        let ret = unsafe { sys::fi_cq_read(self.cq.0.as_ptr(), self.cq_buf.as_mut_ptr().cast(), n) };
        if ret > 0 {
            for i in 0..ret as usize {
                let e = self.cq_buf[i];
                let Some(slot) = self.slot_of(e.op_context) else {
                    tracing::warn!(flags = e.flags, "completion with an unknown context ignored");
                    continue;
                };
                let data = (e.flags & sys::FI_REMOTE_CQ_DATA as u64 != 0).then_some(e.data);
                out.push(Completion { slot, len: e.len, data });
            }
            return Ok(());
        }
        if ret == -(sys::FI_EAGAIN as isize) || ret == 0 {
            return Ok(());
        }
        if ret != -(sys::FI_EAVAIL as isize) {
            return Err(CompletionError { slot: None, error: ofi_err("fi_cq_read", self.provider(), ret) });
        }
        let mut err = sys::fi_cq_err_entry::default();
        // SAFETY: err is a writable fi_cq_err_entry.
        let ret = unsafe { sys::fi_cq_readerr(self.cq.0.as_ptr(), &mut err, 0) };
        if ret < 0 {
            return Err(CompletionError { slot: None, error: ofi_err("fi_cq_readerr", self.provider(), ret) });
        }
        let mut text = [0u8; 256];
        // SAFETY: err_data comes from this CQ; text is writable for its length.
        let msg = unsafe {
            sys::fi_cq_strerror(self.cq.0.as_ptr(), err.prov_errno, err.err_data, text.as_mut_ptr().cast(), text.len())
        };
        let detail = if msg.is_null() { String::new() } else { cstr(msg) };
        Err(CompletionError {
            slot: self.slot_of(err.op_context),
            error: FabricError::Ofi {
                call: "completion",
                context: detail,
                code: err.err.abs(),
                message: strerror(err.err),
            },
        })
    }

    /// The CQ's wait fd, if it has one.
    pub fn wait_fd(&self) -> Option<RawFd> {
        self.wait_fd
    }

    /// Whether the reactor may sleep on the wait fd now (`fi_trywait`): false
    /// if completions are already pending.
    pub fn trywait(&self) -> bool {
        let mut fids = [self.cq.fid()];
        // SAFETY: fids holds one live CQ fid of this fabric.
        let ret = unsafe { sys::fi_trywait(self.fabric.0.as_ptr(), fids.as_mut_ptr(), 1) };
        ret == 0
    }
}

/// Every reliable-datagram provider libfabric offers here, one entry per
/// provider (the first, preferred, domain of each), with whether it can do RMA.
pub fn providers() -> Result<Vec<(String, InfoSummary)>, FabricError> {
    let mut out: Vec<(String, InfoSummary)> = Vec::new();
    let rma: Vec<String> = match InfoList::get(&Query { rma: true, ..Default::default() })? {
        Some(list) => list.iter().map(|i| i.provider()).collect(),
        None => Vec::new(),
    };
    if let Some(list) = InfoList::get(&Query::default())? {
        for i in list.iter() {
            let name = i.provider();
            if out.iter().any(|(n, _)| *n == name) {
                continue;
            }
            let summary = InfoSummary {
                fabric: i.fabric(),
                domain: i.domain(),
                caps: i.caps(),
                rma: rma.contains(&name),
                max_msg_size: i.max_msg_size(),
                inject_size: i.inject_size(),
                string_addresses: i.addr_format() == sys::FI_ADDR_STR,
            };
            out.push((name, summary));
        }
    }
    Ok(out)
}

/// What [`providers`] says about one provider.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InfoSummary {
    /// Fabric name of its first domain.
    pub fabric: String,
    /// Domain name of its first domain.
    pub domain: String,
    /// Capabilities.
    pub caps: Vec<&'static str>,
    /// RMA reads available (bulk payloads move by RMA).
    pub rma: bool,
    /// Largest message.
    pub max_msg_size: u64,
    /// Largest inject (immediate) send.
    pub inject_size: usize,
    /// Addresses are names (shm) rather than IP:port.
    pub string_addresses: bool,
}
