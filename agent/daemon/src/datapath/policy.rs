//! Installing compiled policy into the datapath without a packet ever seeing half of it, and
//! applying a policy change to connections already established.
//!
//! Two policy maps (slots A and B): the agent brings the idle slot to exactly the new entries,
//! then flips `DatapathConfig::policy_slot` (one 4-byte array write). A packet reads the slot
//! once, so it sees the old set or the new one, never a mix. The old slot is rewritten only at
//! the next change.
//!
//! Established connections: after the flip, every conntrack entry is re-evaluated against the
//! new policy; entries the new policy denies (or that now need an auth entry they were not
//! admitted with) are deleted, so the connection's next packet is evaluated afresh — and
//! dropped. Connections the new policy still allows are untouched (no packet lost).

use std::collections::BTreeMap;

use aya::{
    maps::{HashMap, MapData},
    Ebpf,
};
use veil_common::maps::{self as names, ct_flags, CtEntry, CtKey, PolicyEntry, PolicyKey};

use super::{
    maps::{sync, ConfigMap, KernelHash},
    Error,
};
use crate::policy::{datapath_lookup, Direction, Probe, Verdict};

/// Writes `entries` into the idle slot and makes it live. Returns the number of changes.
pub fn install(
    ebpf: &mut Ebpf,
    entries: &BTreeMap<PolicyKey, PolicyEntry>,
) -> Result<usize, Error> {
    let live = ConfigMap::new(ebpf)?.get()?.policy_slot;
    let idle = if live == 0 { 1 } else { 0 };
    let name = if idle == 0 {
        names::POLICY_A
    } else {
        names::POLICY_B
    };
    let changes = sync(
        &mut KernelHash::<PolicyKey, PolicyEntry>::new(ebpf, name)?,
        entries,
    )?;
    let mut cm = ConfigMap::new(ebpf)?;
    let mut cfg = cm.get()?;
    cfg.policy_slot = idle;
    cm.set(cfg)?;
    Ok(changes)
}

/// The entries of the live slot.
pub fn live_entries(ebpf: &mut Ebpf) -> Result<BTreeMap<PolicyKey, PolicyEntry>, Error> {
    let live = ConfigMap::new(ebpf)?.get()?.policy_slot;
    let name = if live == 0 {
        names::POLICY_A
    } else {
        names::POLICY_B
    };
    let map = ebpf.map(name).ok_or(Error::MissingMap(name))?;
    let map: HashMap<&MapData, PolicyKey, PolicyEntry> =
        HashMap::try_from(map).map_err(|source| Error::Map { name, source })?;
    map.iter()
        .map(|r| r.map_err(|source| Error::Map { name, source }))
        .collect()
}

/// Whether the policy in `entries` still admits a tracked connection as it was admitted.
pub fn still_admitted(
    entries: &BTreeMap<PolicyKey, PolicyEntry>,
    key: &CtKey,
    e: &CtEntry,
) -> bool {
    let check = |local: u32, remote: u32, dir: Direction| {
        let probe = Probe {
            local,
            remote,
            port: key.dport,
            proto: key.protocol,
            direction: dir,
        };
        match datapath_lookup(entries, probe) {
            Verdict::Denied => false,
            // Admitted without auth but now requires it: re-evaluate (the auth check decides).
            Verdict::Allowed {
                is_auth_required: true,
            } => e.flags & ct_flags::AUTH != 0 || e.remote_node == 0,
            Verdict::Allowed { .. } | Verdict::Audit => true,
        }
    };
    let egress = e.flags & ct_flags::EGRESS_OK != 0;
    let ingress = e.flags & ct_flags::INGRESS_OK != 0;
    match (egress, ingress) {
        // Local pod to local pod: both ends' policy.
        (true, true) => {
            check(e.src_identity, e.dst_identity, Direction::Egress)
                && check(e.dst_identity, e.src_identity, Direction::Ingress)
        }
        (true, false) => check(e.src_identity, e.dst_identity, Direction::Egress),
        // Entries made at the tunnel store the local destination as `src_identity`.
        (false, true) => check(e.src_identity, e.dst_identity, Direction::Ingress),
        (false, false) => false,
    }
}

/// Deletes conntrack entries the live policy no longer admits. Returns how many.
pub fn prune_conntrack(
    ebpf: &mut Ebpf,
    entries: &BTreeMap<PolicyKey, PolicyEntry>,
) -> Result<usize, Error> {
    let name = names::CT;
    let map = ebpf.map_mut(name).ok_or(Error::MissingMap(name))?;
    // aya opens an LRU hash through the same typed HashMap.
    let mut ct: HashMap<&mut MapData, CtKey, CtEntry> =
        HashMap::try_from(map).map_err(|source| Error::Map { name, source })?;
    let doomed: Vec<CtKey> = ct
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, e)| !still_admitted(entries, k, e))
        .map(|(k, _)| k)
        .collect();
    for k in &doomed {
        let _ = ct.remove(k);
    }
    Ok(doomed.len())
}

/// Entries in the pinned hash map at `pin` (walks the keys; for status and control-bench): for
/// a map another component took out of the loaded object as its only writer (`VEIL_AUTH`).
pub fn count_pinned<K: aya::Pod, V: aya::Pod>(
    pin: &std::path::Path,
) -> Result<usize, aya::maps::MapError> {
    let data = MapData::from_pin(pin)?;
    let m = HashMap::<MapData, K, V>::try_from(aya::maps::Map::HashMap(data))?;
    Ok(m.keys().filter(Result::is_ok).count())
}

/// Entries in a hash map with key type `K` (walks the keys; for status and metrics).
pub fn count<K: aya::Pod, V: aya::Pod>(ebpf: &Ebpf, name: &'static str) -> usize {
    let Some(map) = ebpf.map(name) else { return 0 };
    match HashMap::<&MapData, K, V>::try_from(map) {
        Ok(m) => m.keys().filter(Result::is_ok).count(),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use veil_common::maps::{direction, policy_flags};

    use super::*;

    fn entries(allow_remote: u32) -> BTreeMap<PolicyKey, PolicyEntry> {
        let marker = PolicyKey::marker(300, direction::INGRESS);
        let allow = PolicyKey::new(300, allow_remote, 8080, 6, direction::INGRESS);
        BTreeMap::from([
            (
                marker,
                PolicyEntry {
                    flags: policy_flags::ENFORCED,
                    rule: 0,
                },
            ),
            (
                allow,
                PolicyEntry {
                    flags: policy_flags::ALLOW,
                    rule: 1,
                },
            ),
        ])
    }

    fn ct(src: u32, dst: u32, flags: u32) -> (CtKey, CtEntry) {
        (
            CtKey {
                dport: 8080,
                protocol: 6,
                ..Default::default()
            },
            CtEntry {
                src_identity: src,
                dst_identity: dst,
                flags,
                remote_node: 2,
                last_seen_ns: 0,
            },
        )
    }

    #[test]
    fn established_connections_follow_the_new_policy() {
        // Ingress entry made at the tunnel on the destination node: local 300, remote 256.
        let (k, e) = ct(300, 256, ct_flags::INGRESS_OK);
        assert!(still_admitted(&entries(256), &k, &e));
        assert!(
            !still_admitted(&entries(257), &k, &e),
            "a revoked allowance cuts the connection"
        );
        // Egress from an unselected endpoint: no policy selects 256 in egress.
        let (k, e) = ct(256, 300, ct_flags::EGRESS_OK);
        assert!(still_admitted(&entries(257), &k, &e));
        // Local to local: the destination's ingress policy counts.
        let (k, e) = ct(256, 300, ct_flags::EGRESS_OK | ct_flags::INGRESS_OK);
        assert!(still_admitted(&entries(256), &k, &e));
        assert!(!still_admitted(&entries(257), &k, &e));
    }
}
