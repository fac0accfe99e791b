//! Map names, keys and values.
//!
//! Userspace never spells a map name as a string literal: it uses the constants here, which are
//! the static names in `ebpf/src/main.rs` (the loader pins each map under that name).

/// Datapath configuration, one entry (index 0). Written by the agent before programs attach.
pub const CONFIG: &str = "VEIL_CONFIG";
/// Per-interface packet counters (per CPU), keyed by ifindex.
pub const IF_STATS: &str = "VEIL_IF_STATS";
/// Drop counters (per CPU), indexed by [`crate::reason`] code.
pub const DROPS: &str = "VEIL_DROPS";
/// IP → identity, node and (for local pods) interface; longest-prefix match so node pod CIDRs
/// and single pod addresses live in one trie.
pub const IPCACHE: &str = "VEIL_IPCACHE";
/// Cluster nodes by node id: whether the node has an installed tunnel peer.
pub const NODES: &str = "VEIL_NODES";

/// Maximum sizes, chosen for hundreds of nodes and tens of thousands of endpoints.
pub const IF_STATS_MAX: u32 = 4096;
pub const IPCACHE_MAX: u32 = 65536;
pub const NODES_MAX: u32 = 4096;

/// Flags in [`IpInfo::flags`].
pub mod ip_flags {
    /// A pod on this node; `ifindex` is the host side of its veth.
    pub const LOCAL_POD: u32 = 1 << 0;
    /// A whole node pod CIDR (not a single pod).
    pub const POD_CIDR: u32 = 1 << 1;
    /// A single pod address (local or remote).
    pub const POD: u32 = 1 << 2;
}

/// Flags in [`NodeInfo::flags`].
pub mod node_flags {
    /// The node's WireGuard peer is installed on the tunnel: traffic to it may be steered.
    pub const HAS_KEY: u32 = 1 << 0;
    /// This node itself.
    pub const SELF: u32 = 1 << 1;
}

/// See [`CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    /// [`crate::config_flags`].
    pub flags: u32,
    /// Ifindex of the tunnel device (0 until it exists).
    pub tunnel_ifindex: u32,
    /// This node's id (the same number as in its pod CIDR, 198.19.<id>.0/24 in the lab).
    pub node_id: u32,
    /// Which of the two policy map slots is live (0 or 1).
    pub policy_slot: u32,
}

/// See [`IF_STATS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfStats {
    pub packets: u64,
    pub bytes: u64,
    pub drops: u64,
}

/// Key of [`IPCACHE`]: an IPv6 address, IPv4 mapped as `::ffff:a.b.c.d`, so one trie serves
/// both families. The LPM prefix length precedes it in the map key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpKey {
    pub addr: [u8; 16],
}

impl IpKey {
    /// Prefix length offset of an IPv4 prefix inside the mapped form.
    pub const V4_PREFIX_OFFSET: u32 = 96;

    pub const fn from_v4(octets: [u8; 4]) -> Self {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12] = octets[0];
        addr[13] = octets[1];
        addr[14] = octets[2];
        addr[15] = octets[3];
        Self { addr }
    }

    pub const fn from_v6(addr: [u8; 16]) -> Self {
        Self { addr }
    }
}

/// Value of [`IPCACHE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpInfo {
    /// Numeric security identity (0 for a pod CIDR entry: the pod is not known).
    pub identity: u32,
    /// Node hosting the address.
    pub node_id: u32,
    /// [`ip_flags`].
    pub flags: u32,
    /// Host-side veth ifindex for [`ip_flags::LOCAL_POD`], else 0.
    pub ifindex: u32,
}

/// Value of [`NODES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// [`node_flags`].
    pub flags: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod pod_impls {
    use super::*;
    // SAFETY: every type is #[repr(C)], Copy, made only of integers and integer arrays with
    // explicit padding, so any byte pattern of the right size is a valid value.
    unsafe impl aya::Pod for DatapathConfig {}
    unsafe impl aya::Pod for IfStats {}
    unsafe impl aya::Pod for IpKey {}
    unsafe impl aya::Pod for IpInfo {}
    unsafe impl aya::Pod for NodeInfo {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    fn bytes_of<T: Copy>(v: &T) -> &[u8] {
        // SAFETY: T is a #[repr(C)] plain-integer type without implicit padding (sizes asserted).
        unsafe { core::slice::from_raw_parts(v as *const T as *const u8, size_of::<T>()) }
    }

    fn from_bytes<T: Copy>(b: &[u8]) -> T {
        assert_eq!(b.len(), size_of::<T>());
        // SAFETY: length checked; T accepts any bit pattern.
        unsafe { core::ptr::read_unaligned(b.as_ptr() as *const T) }
    }

    #[test]
    fn sizes_are_fixed() {
        assert_eq!(size_of::<DatapathConfig>(), 16);
        assert_eq!(size_of::<IfStats>(), 24);
        assert_eq!(size_of::<IpKey>(), 16);
        assert_eq!(size_of::<IpInfo>(), 16);
        assert_eq!(size_of::<NodeInfo>(), 8);
    }

    #[test]
    fn byte_round_trips() {
        let c = DatapathConfig {
            flags: 3,
            tunnel_ifindex: 7,
            node_id: 2,
            policy_slot: 1,
        };
        assert_eq!(from_bytes::<DatapathConfig>(bytes_of(&c)), c);
        let s = IfStats {
            packets: 1,
            bytes: 2,
            drops: 3,
        };
        assert_eq!(from_bytes::<IfStats>(bytes_of(&s)), s);
        let k = IpKey::from_v4([198, 19, 1, 10]);
        assert_eq!(&bytes_of(&k)[10..], &[0xff, 0xff, 198, 19, 1, 10]);
        assert_eq!(from_bytes::<IpKey>(bytes_of(&k)), k);
        let i = IpInfo {
            identity: 300,
            node_id: 1,
            flags: ip_flags::POD,
            ifindex: 9,
        };
        assert_eq!(from_bytes::<IpInfo>(bytes_of(&i)), i);
        let n = NodeInfo {
            flags: node_flags::HAS_KEY,
            _pad: 0,
        };
        assert_eq!(from_bytes::<NodeInfo>(bytes_of(&n)), n);
    }
}
