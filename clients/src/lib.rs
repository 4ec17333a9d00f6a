//! # clients — the ways into ClaudeFS
//!
//! For now this is the control client behind `claudefs rpc` ([`control`]):
//! it talks JSON-RPC 2.0 to a server's Unix socket, turns `--flag value`
//! arguments into typed parameters using the parameter schemas the server
//! publishes, and prints per-method help. The file-system client API and the
//! FUSE, NFS and SMB gateways join it as the file system is built.

#![deny(missing_docs)]

pub mod control;
