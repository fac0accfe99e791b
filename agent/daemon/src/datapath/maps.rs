//! Typed wrappers over veil's pinned maps, each behind a small trait with an in-memory fake so
//! the reconcile logic that drives them is unit-tested without a kernel.

use std::collections::BTreeMap;

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuHashMap},
    Ebpf,
};
use veil_common::{
    maps::{self as names, DatapathConfig, IfStats, IpInfo, IpKey},
    reason,
};

use super::Error;

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |source| Error::Map { name, source }
}

/// [`names::CONFIG`]: the single datapath config entry.
pub struct ConfigMap<'a>(Array<&'a mut MapData, DatapathConfig>);

impl<'a> ConfigMap<'a> {
    pub fn new(ebpf: &'a mut Ebpf) -> Result<Self, Error> {
        let map = ebpf
            .map_mut(names::CONFIG)
            .ok_or(Error::MissingMap(names::CONFIG))?;
        Ok(Self(Array::try_from(map).map_err(map_err(names::CONFIG))?))
    }

    pub fn get(&self) -> Result<DatapathConfig, Error> {
        self.0.get(&0, 0).map_err(map_err(names::CONFIG))
    }

    pub fn set(&mut self, cfg: DatapathConfig) -> Result<(), Error> {
        self.0.set(0, cfg, 0).map_err(map_err(names::CONFIG))
    }
}

/// Per-interface counters summed over CPUs, by ifindex.
pub fn interface_stats(ebpf: &Ebpf) -> Result<BTreeMap<u32, IfStats>, Error> {
    let map = ebpf
        .map(names::IF_STATS)
        .ok_or(Error::MissingMap(names::IF_STATS))?;
    let map: PerCpuHashMap<_, u32, IfStats> =
        PerCpuHashMap::try_from(map).map_err(map_err(names::IF_STATS))?;
    let mut out = BTreeMap::new();
    for item in map.iter() {
        let (ifindex, per_cpu) = item.map_err(map_err(names::IF_STATS))?;
        let total = per_cpu.iter().fold(IfStats::default(), |acc, s| IfStats {
            packets: acc.packets + s.packets,
            bytes: acc.bytes + s.bytes,
            drops: acc.drops + s.drops,
        });
        out.insert(ifindex, total);
    }
    Ok(out)
}

/// Drop counters summed over CPUs, by reason name (every named reason, zeros included).
pub fn drops(ebpf: &Ebpf) -> Result<BTreeMap<&'static str, u64>, Error> {
    let map = ebpf
        .map(names::DROPS)
        .ok_or(Error::MissingMap(names::DROPS))?;
    let map: PerCpuArray<_, u64> = PerCpuArray::try_from(map).map_err(map_err(names::DROPS))?;
    let mut out = BTreeMap::new();
    for code in reason::ALL {
        if code == reason::NONE {
            continue;
        }
        let per_cpu = map.get(&code, 0).map_err(map_err(names::DROPS))?;
        out.insert(reason::name(code), per_cpu.iter().sum());
    }
    Ok(out)
}

/// Flow events lost to a full ring buffer, summed over CPUs.
pub fn events_lost(ebpf: &Ebpf) -> Result<u64, Error> {
    let map = ebpf
        .map(names::EVENTS_LOST)
        .ok_or(Error::MissingMap(names::EVENTS_LOST))?;
    let map: PerCpuArray<_, u64> =
        PerCpuArray::try_from(map).map_err(map_err(names::EVENTS_LOST))?;
    let per_cpu = map.get(&0, 0).map_err(map_err(names::EVENTS_LOST))?;
    Ok(per_cpu.iter().sum())
}

/// An LPM prefix in the ipcache: address (v4-mapped for IPv4) and prefix length in the mapped
/// space (an IPv4 /24 is 96 + 24).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    pub addr: [u8; 16],
    pub len: u32,
}

/// An address as the maps key it (IPv4 mapped into IPv6).
pub fn ip_key(ip: std::net::IpAddr) -> [u8; 16] {
    match ip {
        std::net::IpAddr::V4(a) => IpKey::from_v4(a.octets()).addr,
        std::net::IpAddr::V6(a) => IpKey::from_v6(a.octets()).addr,
    }
}

impl Prefix {
    pub fn v4(ip: std::net::Ipv4Addr, len: u8) -> Self {
        Self {
            addr: IpKey::from_v4(ip.octets()).addr,
            len: IpKey::V4_PREFIX_OFFSET + u32::from(len),
        }
    }

    pub fn v6(ip: std::net::Ipv6Addr, len: u8) -> Self {
        Self {
            addr: IpKey::from_v6(ip.octets()).addr,
            len: u32::from(len),
        }
    }

    /// A single address (/32 for IPv4, /128 for IPv6).
    pub fn host(ip: std::net::IpAddr) -> Self {
        match ip {
            std::net::IpAddr::V4(v4) => Self::v4(v4, 32),
            std::net::IpAddr::V6(v6) => Self::v6(v6, 128),
        }
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ip = std::net::Ipv6Addr::from(self.addr);
        match ip.to_ipv4_mapped() {
            Some(v4) if self.len >= IpKey::V4_PREFIX_OFFSET => {
                write!(f, "{v4}/{}", self.len - IpKey::V4_PREFIX_OFFSET)
            }
            _ => write!(f, "{ip}/{}", self.len),
        }
    }
}

/// A keyed map as the reconcile logic sees it: the kernel map or an in-memory fake.
pub trait MapOps<K, V> {
    fn upsert(&mut self, key: K, value: V) -> Result<(), Error>;
    fn remove(&mut self, key: &K) -> Result<(), Error>;
    fn entries(&self) -> Result<BTreeMap<K, V>, Error>;
}

/// What a map holds or should hold: entries sorted by key, each key once. A third of a
/// `BTreeMap`'s memory for the ipcache of a 100,000-endpoint cluster (36 bytes an entry,
/// against ~60 in a tree's half-full nodes), and the agent keeps one for as long as it runs
/// ([`Shadowed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entries<K, V>(Vec<(K, V)>);

impl<K: Ord, V> Entries<K, V> {
    pub fn get(&self, key: &K) -> Option<&V> {
        self.0
            .binary_search_by(|(k, _)| k.cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }

    pub fn contains_key(&self, key: &K) -> bool {
        self.get(key).is_some()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    /// What turns `self` into `desired`: the entries to write (keys new or with another value)
    /// and the keys to remove, each in key order. One merge of the two sorted lists, not a
    /// search per key (100,000 ipcache entries on every pod event).
    pub fn changes_to(&self, desired: &Self) -> (Vec<(K, V)>, Vec<K>)
    where
        K: Copy,
        V: Copy + PartialEq,
    {
        use std::cmp::Ordering;
        let (mut write, mut remove) = (Vec::new(), Vec::new());
        let (mut cur, mut want) = (self.0.iter().peekable(), desired.0.iter().peekable());
        loop {
            match (cur.peek(), want.peek()) {
                (Some((kc, vc)), Some((kw, vw))) => match kc.cmp(kw) {
                    Ordering::Less => {
                        remove.push(*kc);
                        cur.next();
                    }
                    Ordering::Greater => {
                        write.push((*kw, *vw));
                        want.next();
                    }
                    Ordering::Equal => {
                        if vc != vw {
                            write.push((*kw, *vw));
                        }
                        cur.next();
                        want.next();
                    }
                },
                (Some((kc, _)), None) => {
                    remove.push(*kc);
                    cur.next();
                }
                (None, Some((kw, vw))) => {
                    write.push((*kw, *vw));
                    want.next();
                }
                (None, None) => return (write, remove),
            }
        }
    }
}

/// From entries in any order; of a key given twice, the later value stays (as a map's
/// `insert` would leave it).
impl<K: Ord, V> FromIterator<(K, V)> for Entries<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut v: Vec<(K, V)> = iter.into_iter().collect();
        // Stable: entries of one key keep their order, and the swap keeps the last one's value.
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                std::mem::swap(later, kept);
            }
            same
        });
        v.shrink_to_fit();
        Self(v)
    }
}

impl<K: Ord, V> From<BTreeMap<K, V>> for Entries<K, V> {
    fn from(map: BTreeMap<K, V>) -> Self {
        Self(map.into_iter().collect())
    }
}

/// For tests' lookups; the agent reads with [`Entries::get`] (a missing key panics here).
#[cfg(test)]
impl<K: Ord, V> std::ops::Index<&K> for Entries<K, V> {
    type Output = V;

    fn index(&self, key: &K) -> &V {
        self.get(key).expect("no entry for the key")
    }
}

/// Brings a map to exactly `desired`: writes what differs, then removes what is extra. Writing
/// before removing means a lookup never misses an entry that stays. Returns the change count.
pub fn sync<K: Ord + Copy, V: PartialEq + Copy>(
    map: &mut impl MapOps<K, V>,
    desired: &BTreeMap<K, V>,
) -> Result<usize, Error> {
    let current = Entries::from(map.entries()?);
    let desired = desired.iter().map(|(k, v)| (*k, *v)).collect();
    sync_from(map, &current, &desired)
}

/// A map this process alone writes, with what it last wrote: a sync diffs against that instead
/// of reading every key back from the kernel (one syscall per entry: the ipcache of a
/// 100,000-endpoint cluster every reconcile). The kernel is read again after a failed sync
/// and on the first one (a restarted agent adopts what its pins hold).
pub struct Shadowed<K, V> {
    written: Option<Entries<K, V>>,
}

impl<K, V> Default for Shadowed<K, V> {
    fn default() -> Self {
        Self { written: None }
    }
}

impl<K: Ord + Copy, V: PartialEq + Copy> Shadowed<K, V> {
    /// [`sync`], from what was last written.
    pub fn sync(
        &mut self,
        map: &mut impl MapOps<K, V>,
        desired: Entries<K, V>,
    ) -> Result<usize, Error> {
        let current = match self.written.take() {
            Some(w) => w,
            None => Entries::from(map.entries()?),
        };
        let changes = sync_from(map, &current, &desired)?;
        self.written = Some(desired);
        Ok(changes)
    }
}

/// [`sync`] from a known `current` content. A write that fails (a full map) does not stop the
/// others or the removals; the removals make room, so the failed writes are tried once more
/// after them: what fits is written (a set that fits the map is written whole, even over a
/// full one of other keys), and what still fails is reported together.
///
/// A key whose new value cannot be written never keeps its old one: it is removed and written
/// once more into the room that made. A full LPM trie refuses even an in-place update on
/// kernels before 6.14 (`ENOSPC`; fixed by "bpf: Handle in-place update for full LPM trie
/// correctly"), and in the ipcache an old value left in place is an address reused by another
/// pod keeping the first pod's identity. Without its entry the address falls to its pod CIDR's
/// (unknown identity: refused by policy, fail closed).
fn sync_from<K: Ord + Copy, V: PartialEq + Copy>(
    map: &mut impl MapOps<K, V>,
    current: &Entries<K, V>,
    desired: &Entries<K, V>,
) -> Result<usize, Error> {
    let (writes, removals) = current.changes_to(desired);
    let (mut changes, wanted) = (0, writes.len());
    let mut refused = Vec::new();
    for (k, v) in writes {
        match map.upsert(k, v) {
            Ok(()) => changes += 1,
            Err(e) => refused.push((k, v, e)),
        }
    }
    let mut removed = 0;
    for k in &removals {
        map.remove(k)?;
        removed += 1;
    }
    changes += removed;
    let (mut failed, mut first) = (0, None);
    for (k, v, e) in refused {
        // Without a removal there is no new room: the first answer stands.
        let again = if removed > 0 {
            map.upsert(k, v)
        } else {
            Err(e)
        };
        let again = match again {
            Err(_) if current.contains_key(&k) => {
                map.remove(&k)?;
                map.upsert(k, v)
            }
            again => again,
        };
        match again {
            Ok(()) => changes += 1,
            Err(e) => {
                failed += 1;
                first.get_or_insert(e);
            }
        }
    }
    match first {
        None => Ok(changes),
        Some(first) => Err(Error::SomeWritesFailed {
            failed,
            wanted,
            first: Box::new(first),
        }),
    }
}

fn ignore_missing(name: &'static str, r: Result<(), aya::maps::MapError>) -> Result<(), Error> {
    match r {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(map_err(name)(e)),
    }
}

/// A map's capacity as the kernel holds it.
pub fn capacity(ebpf: &Ebpf, name: &str) -> Option<u32> {
    use aya::maps::Map;
    let data = match ebpf.map(name)? {
        Map::LpmTrie(d) | Map::HashMap(d) | Map::LruHashMap(d) => d,
        _ => return None,
    };
    data.info().ok().map(|i| i.max_entries())
}

/// Entries in the ipcache (walks the keys).
pub fn ipcache_len(ebpf: &Ebpf) -> usize {
    let Some(map) = ebpf.map(names::IPCACHE) else {
        return 0;
    };
    match LpmTrie::<&MapData, IpKey, IpInfo>::try_from(map) {
        Ok(m) => m.keys().filter(Result::is_ok).count(),
        Err(_) => 0,
    }
}

/// [`names::IPCACHE`] in the kernel.
pub struct IpCacheMap<'a>(LpmTrie<&'a mut MapData, IpKey, IpInfo>);

impl<'a> IpCacheMap<'a> {
    pub fn new(ebpf: &'a mut Ebpf) -> Result<Self, Error> {
        let map = ebpf
            .map_mut(names::IPCACHE)
            .ok_or(Error::MissingMap(names::IPCACHE))?;
        Ok(Self(
            LpmTrie::try_from(map).map_err(map_err(names::IPCACHE))?,
        ))
    }
}

impl MapOps<Prefix, IpInfo> for IpCacheMap<'_> {
    fn upsert(&mut self, prefix: Prefix, info: IpInfo) -> Result<(), Error> {
        let key = Key::new(prefix.len, IpKey::from_v6(prefix.addr));
        self.0
            .insert(&key, info, 0)
            .map_err(map_err(names::IPCACHE))
    }

    fn remove(&mut self, prefix: &Prefix) -> Result<(), Error> {
        ignore_missing(
            names::IPCACHE,
            self.0
                .remove(&Key::new(prefix.len, IpKey::from_v6(prefix.addr))),
        )
    }

    fn entries(&self) -> Result<BTreeMap<Prefix, IpInfo>, Error> {
        let mut out = BTreeMap::new();
        for item in self.0.iter() {
            let (k, v) = item.map_err(map_err(names::IPCACHE))?;
            out.insert(
                Prefix {
                    addr: k.data().addr,
                    len: k.prefix_len(),
                },
                v,
            );
        }
        Ok(out)
    }
}

/// A plain kernel hash map with `Pod` key and value ([`names::NODES`] and friends).
pub struct KernelHash<'a, K: aya::Pod, V: aya::Pod> {
    name: &'static str,
    map: HashMap<&'a mut MapData, K, V>,
}

impl<'a, K: aya::Pod, V: aya::Pod> KernelHash<'a, K, V> {
    pub fn new(ebpf: &'a mut Ebpf, name: &'static str) -> Result<Self, Error> {
        let map = ebpf.map_mut(name).ok_or(Error::MissingMap(name))?;
        Ok(Self {
            name,
            map: HashMap::try_from(map).map_err(map_err(name))?,
        })
    }
}

impl<K: aya::Pod + Ord, V: aya::Pod> MapOps<K, V> for KernelHash<'_, K, V> {
    fn upsert(&mut self, key: K, value: V) -> Result<(), Error> {
        self.map.insert(key, value, 0).map_err(map_err(self.name))
    }

    fn remove(&mut self, key: &K) -> Result<(), Error> {
        ignore_missing(self.name, self.map.remove(key))
    }

    fn entries(&self) -> Result<BTreeMap<K, V>, Error> {
        self.map
            .iter()
            .map(|r| r.map_err(map_err(self.name)))
            .collect()
    }
}

/// An in-memory map for unit tests of reconcile logic.
#[cfg(test)]
#[derive(Debug)]
pub struct FakeMap<K, V>(pub BTreeMap<K, V>);

#[cfg(test)]
impl<K, V> Default for FakeMap<K, V> {
    fn default() -> Self {
        Self(BTreeMap::new())
    }
}

#[cfg(test)]
impl<K: Ord + Clone, V: Clone> MapOps<K, V> for FakeMap<K, V> {
    fn upsert(&mut self, key: K, value: V) -> Result<(), Error> {
        self.0.insert(key, value);
        Ok(())
    }
    fn remove(&mut self, key: &K) -> Result<(), Error> {
        self.0.remove(key);
        Ok(())
    }
    fn entries(&self) -> Result<BTreeMap<K, V>, Error> {
        Ok(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use veil_common::maps::NodeInfo;

    #[test]
    fn prefix_display() {
        assert_eq!(
            Prefix::v4(Ipv4Addr::new(198, 19, 2, 0), 24).to_string(),
            "198.19.2.0/24"
        );
    }

    #[test]
    fn sync_writes_diff_and_removes_extra() {
        let mut m = FakeMap::<Prefix, IpInfo>::default();
        let a = Prefix::v4(Ipv4Addr::new(198, 19, 1, 10), 32);
        let b = Prefix::v4(Ipv4Addr::new(198, 19, 2, 0), 24);
        let stale = Prefix::v4(Ipv4Addr::new(198, 19, 9, 9), 32);
        m.0.insert(stale, IpInfo::default());
        m.0.insert(
            a,
            IpInfo {
                identity: 1,
                ..Default::default()
            },
        );
        let desired = BTreeMap::from([
            (
                a,
                IpInfo {
                    identity: 2,
                    ..Default::default()
                },
            ),
            (
                b,
                IpInfo {
                    node_id: 2,
                    ..Default::default()
                },
            ),
        ]);
        assert_eq!(sync(&mut m, &desired).unwrap(), 3);
        assert_eq!(m.0, desired);
        assert_eq!(sync(&mut m, &desired).unwrap(), 0);
    }

    #[test]
    fn changes_to_is_what_a_search_per_key_finds() {
        // Small key and value ranges, so that keys in both, in one and with equal or other
        // values all come up; a fixed LCG, so a failure repeats.
        let mut seed = 0x5eed_u64;
        let mut next = move |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for _ in 0..500 {
            let mut set = || -> Entries<u32, u32> {
                (0..next(12))
                    .map(|_| (next(16) as u32, next(3) as u32))
                    .collect()
            };
            let (current, desired) = (set(), set());
            let write: Vec<(u32, u32)> = desired
                .iter()
                .filter(|(k, v)| current.get(k) != Some(v))
                .map(|(k, v)| (*k, *v))
                .collect();
            let remove: Vec<u32> = current
                .iter()
                .filter(|(k, _)| !desired.contains_key(k))
                .map(|(k, _)| *k)
                .collect();
            assert_eq!(
                current.changes_to(&desired),
                (write, remove),
                "{current:?} -> {desired:?}"
            );
        }
    }

    /// A fake map whose writes fail while `fail` is set, or once it holds `capacity` entries
    /// (then also over a key it holds when `full_refuses_updates`, as a full LPM trie does
    /// before Linux 6.14).
    struct Flaky {
        map: FakeMap<u32, NodeInfo>,
        fail: bool,
        capacity: usize,
        full_refuses_updates: bool,
    }

    impl Flaky {
        /// An empty map that takes `capacity` entries.
        fn holding(capacity: usize) -> Self {
            Self {
                map: FakeMap::default(),
                fail: false,
                capacity,
                full_refuses_updates: false,
            }
        }
    }

    impl MapOps<u32, NodeInfo> for Flaky {
        fn upsert(&mut self, key: u32, value: NodeInfo) -> Result<(), Error> {
            let full = self.map.0.len() >= self.capacity
                && (self.full_refuses_updates || !self.map.0.contains_key(&key));
            if self.fail || full {
                return Err(Error::MissingMap("flaky"));
            }
            self.map.upsert(key, value)
        }
        fn remove(&mut self, key: &u32) -> Result<(), Error> {
            self.map.remove(key)
        }
        fn entries(&self) -> Result<BTreeMap<u32, NodeInfo>, Error> {
            self.map.entries()
        }
    }

    #[test]
    fn shadowed_sync_reads_the_map_once_and_again_after_a_failure() {
        let mut m = Flaky::holding(usize::MAX);
        m.map.0.insert(9, NodeInfo::default());
        let mut shadow = Shadowed::default();
        let one = BTreeMap::from([(1, NodeInfo { flags: 1, _pad: 0 })]);
        let entries = |m: &BTreeMap<u32, NodeInfo>| Entries::from(m.clone());
        // The first sync reads the map: the stray entry 9 goes.
        assert_eq!(shadow.sync(&mut m, entries(&one)).unwrap(), 2);
        assert_eq!(m.map.0, one);
        // Later syncs diff against what was written, without reading the map.
        m.map.0.insert(7, NodeInfo::default());
        assert_eq!(shadow.sync(&mut m, entries(&one)).unwrap(), 0);
        // A failed sync (its removal of 1 still made) forgets what was written; the next one
        // reads the map again and finds 7: write 2, remove 7.
        let two = BTreeMap::from([(2, NodeInfo { flags: 2, _pad: 0 })]);
        m.fail = true;
        assert!(shadow.sync(&mut m, entries(&two)).is_err());
        m.fail = false;
        assert_eq!(shadow.sync(&mut m, entries(&two)).unwrap(), 2);
        assert_eq!(m.map.0, two);
    }

    #[test]
    fn a_full_map_gets_what_fits_its_stale_entries_removed_and_the_failures_counted() {
        let info = |f| NodeInfo { flags: f, _pad: 0 };
        let mut m = Flaky::holding(3);
        m.map.0.extend([(10, info(0)), (11, info(0))]);
        // Five wanted, two stale: the writes before the removals fit one, the removals make
        // room for two more, the last two fail, counted, and the stale entries still go.
        let desired: BTreeMap<u32, NodeInfo> = (1..=5).map(|k| (k, info(1))).collect();
        match sync(&mut m, &desired) {
            Err(Error::SomeWritesFailed { failed, wanted, .. }) => {
                assert_eq!((failed, wanted), (2, 5))
            }
            other => panic!("expected SomeWritesFailed, got {other:?}"),
        }
        assert!(!m.map.0.contains_key(&10) && !m.map.0.contains_key(&11));
        assert_eq!(m.map.0.len(), 3);
        // Nothing stale left: no room is made, the same two fail again.
        match sync(&mut m, &desired) {
            Err(Error::SomeWritesFailed { failed, wanted, .. }) => {
                assert_eq!((failed, wanted), (2, 2))
            }
            other => panic!("expected SomeWritesFailed, got {other:?}"),
        }
    }

    /// A full map that refuses even in-place updates (an LPM trie before Linux 6.14): a key
    /// whose value changes is never left with its old one. With nothing stale to remove, it is
    /// removed and written again in the room that made; and where that fails too, it is left
    /// out (the ipcache then judges its address by the pod CIDR's entry: unknown identity).
    #[test]
    fn a_value_a_full_map_will_not_update_in_place_is_never_left_stale() {
        let info = |f| NodeInfo { flags: f, _pad: 0 };
        let mut m = Flaky::holding(3);
        m.full_refuses_updates = true;
        m.map.0.extend([(1, info(1)), (2, info(1)), (3, info(1))]);
        let mut desired: BTreeMap<u32, NodeInfo> = m.map.0.clone();
        desired.insert(2, info(2));
        assert_eq!(sync(&mut m, &desired).unwrap(), 1);
        assert_eq!(m.map.0, desired);
        // Key 3 changes and a new key 4 comes, into a full map: 4 cannot fit, and 3 is written
        // only because removing its old value made room; where even that fails, 3 is absent.
        desired.insert(3, info(2));
        desired.insert(4, info(2));
        match sync(&mut m, &desired) {
            Err(Error::SomeWritesFailed { failed, wanted, .. }) => {
                assert_eq!((failed, wanted), (1, 2))
            }
            other => panic!("expected SomeWritesFailed, got {other:?}"),
        }
        assert_eq!(m.map.0.get(&3), Some(&info(2)));
        assert!(!m.map.0.contains_key(&4));
        m.fail = true;
        desired.insert(1, info(3));
        assert!(sync(&mut m, &desired).is_err());
        assert_eq!(m.map.0.get(&1), None, "a stale value stayed");
    }

    /// A full map of other keys takes a whole new set that fits it, in one sync (a policy slot
    /// going from one large policy to another of other keys).
    #[test]
    fn a_set_that_fits_replaces_a_full_map_of_other_keys_in_one_sync() {
        let info = |f| NodeInfo { flags: f, _pad: 0 };
        let mut m = Flaky::holding(4);
        m.map.0.extend((10..14).map(|k| (k, info(0))));
        let desired: BTreeMap<u32, NodeInfo> = (1..=4).map(|k| (k, info(1))).collect();
        assert_eq!(sync(&mut m, &desired).unwrap(), 8);
        assert_eq!(m.map.0, desired);
    }

    #[test]
    fn sync_nodes_converges() {
        let mut m = FakeMap::<u32, NodeInfo>::default();
        m.0.insert(9, NodeInfo::default());
        let desired = BTreeMap::from([(1, NodeInfo { flags: 1, _pad: 0 })]);
        assert_eq!(sync(&mut m, &desired).unwrap(), 2);
        assert_eq!(m.0, desired);
    }

    #[test]
    fn entries_are_sorted_once_per_key_and_the_later_value_stays() {
        let info = |f| NodeInfo { flags: f, _pad: 0 };
        let e: Entries<u32, NodeInfo> = [
            (3, info(1)),
            (1, info(1)),
            (3, info(2)),
            (2, info(1)),
            (3, info(3)),
        ]
        .into_iter()
        .collect();
        let seen: Vec<(u32, u32)> = e.iter().map(|(k, v)| (*k, v.flags)).collect();
        assert_eq!(seen, [(1, 1), (2, 1), (3, 3)]);
        assert_eq!(e.get(&3), Some(&info(3)));
        assert_eq!(e.get(&4), None);
        // The same as a map built by inserting in that order.
        let mut map = BTreeMap::new();
        for (k, f) in [(3, 1), (1, 1), (3, 2), (2, 1), (3, 3)] {
            map.insert(k, info(f));
        }
        assert_eq!(e, Entries::from(map));
    }
}
