//! Raw bindings to [libfabric](https://ofiwg.github.io/libfabric/) (>= 1.17).
//!
//! libfabric is the OpenFabrics Interfaces library: one API over RDMA NICs
//! (the `verbs` provider), TCP (`tcp`, and `tcp;ofi_rxm` for reliable
//! datagram endpoints), shared memory between processes (`shm`) and more. The
//! bindings are generated at build time from the installed headers (found by
//! pkg-config) by bindgen, so they always match the library that is linked.
//!
//! Most data-path calls (`fi_send`, `fi_cq_read`, `fi_domain`, ...) are
//! `static inline` functions in the headers that jump through the provider's
//! operation tables. They have no symbol in `libfabric.so`; bindgen's
//! `wrap_static_fns` writes a C file with one exported wrapper per such
//! function (named `<name>__extern`), which the build compiles with `cc`. This
//! crate re-exports them under their C names, so `fi_send` here is the
//! header's `fi_send`.
//!
//! Everything here is `unsafe` and undocumented beyond the libfabric man
//! pages; the safe layer is in the `claudefs-fabric` crate.

#![allow(non_upper_case_globals, non_camel_case_types, non_snake_case, missing_docs, unsafe_op_in_unsafe_fn)]
#![allow(clippy::all, clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));

/// `FI_VERSION(major, minor)` from `fabric.h` (a macro bindgen cannot translate).
pub const fn make_version(major: u32, minor: u32) -> u32 {
    (major << 16) | minor
}

/// `FI_ADDR_UNSPEC` from `fabric.h`: no particular peer.
pub const FI_ADDR_UNSPEC: fi_addr_t = u64::MAX;
/// `FI_ADDR_NOTAVAIL` from `fabric.h`: the source address is not in the address vector.
pub const FI_ADDR_NOTAVAIL: fi_addr_t = u64::MAX;
/// `FI_KEY_NOTAVAIL` from `fabric.h`.
pub const FI_KEY_NOTAVAIL: u64 = u64::MAX;
