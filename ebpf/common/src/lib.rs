//! Types shared by veil's eBPF programs and userspace.
//!
//! Owns every map key and value, every ring-buffer event, map and program names, pin layout,
//! verdict and drop-reason codes. Everything here is `#[repr(C)]`, `Copy`, fixed width with
//! explicit padding, and free of `bool`, `usize` and enums, so both sides agree byte for byte.
//!
//! Must not depend on: anything but `core` (and `aya`, for `Pod`, behind the `user` feature).
#![no_std]

pub mod maps;
pub mod reason;

/// Program names as they appear in the object file (the function names in `ebpf/src/main.rs`).
pub mod programs {
    /// TC program on the host side of a pod's veth, ingress: packets leaving the pod.
    pub const FROM_POD: &str = "veil_from_pod";
    /// TC program on the tunnel device, ingress: decrypted packets arriving from peers.
    pub const FROM_TUNNEL: &str = "veil_from_tunnel";
}

/// Flags in [`maps::DatapathConfig::flags`].
pub mod config_flags {
    /// Pod traffic to remote pod CIDRs is steered into the tunnel device.
    pub const ENCRYPT: u32 = 1 << 0;
    /// A packet for a cluster pod CIDR whose node has no installed peer is dropped (`no-key`).
    pub const STRICT: u32 = 1 << 1;
    /// Node-wide audit mode: would-be policy drops are reported as AUDIT and passed.
    pub const AUDIT: u32 = 1 << 2;
}

/// Verdict codes carried in flow events.
pub mod verdict {
    pub const FORWARDED: u8 = 1;
    pub const DROPPED: u8 = 2;
    pub const AUDIT: u8 = 3;
}
