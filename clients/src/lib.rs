//! # clients — the ways into ClaudeFS
//!
//! For now this is the control client behind `claudefs rpc` ([`control`]):
//! it talks JSON-RPC 2.0 to a server's Unix socket, turns `--flag value`
//! arguments into typed parameters using the parameter schemas the server
//! publishes, and prints per-method help. [`fuse`] serves a file system
//! through the kernel's FUSE; the NFS and SMB gateways join them later.

#![deny(missing_docs)]

pub mod control;
pub mod fuse;
