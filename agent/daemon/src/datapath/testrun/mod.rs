//! testrun: runs veil's TC programs on crafted packets through `BPF_PROG_TEST_RUN`, for the
//! datapath's table tests and the per-packet cost benchmark.
//!
//! A [`TestDatapath`] loads the embedded object into a unique pin directory
//! `/sys/fs/bpf/veil-test-<pid>-<start time>-<n>/` and a private network namespace with one veth
//! per named interface, so `skb->ifindex` can be any of them. It attaches nothing: no TC hook,
//! no link; the kernel sees loaded programs, pinned maps and a namespace only this process
//! holds. Dropping it removes the pins (also when a test panics) and releases the namespace;
//! a process killed before that leaves a pin directory the next [`TestDatapath::new`] sweeps
//! (its pid and start time no longer name a live process). The namespace needs no sweep: it
//! lives only as long as the file descriptor that holds it.
//!
//! What the kernel's test run does and does not do (net/bpf/test_run.c): the frame must be at
//! least 14 bytes (shorter is EINVAL before the program runs); the skb's device is the one
//! whose ifindex the context names, looked up in the caller's network namespace (ENODEV
//! otherwise), which is why runs happen inside the private namespace; `bpf_redirect*` returns
//! `TC_ACT_REDIRECT` without redirecting; `bpf_ktime_*` is the real clock; the program runs
//! with migration disabled, so per-CPU counters land on whichever CPU ran it (read them summed).

pub mod packet;

use std::{
    collections::BTreeMap,
    fs::File,
    io,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use aya::{
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{SchedClassifier, TestRun, TestRunAttrs, TestRunOptions},
};
use nix::sched::CloneFlags;
use veil_common::{
    maps::{
        self as names, ip_flags, AuthEntry, AuthKey, CtEntry, CtKey, DatapathConfig, FlowEvent,
        IfStats, IpInfo, NodeInfo, PolicyEntry, PolicyKey,
    },
    reason,
};

use super::{
    maps::{self as typed, IpCacheMap, KernelHash, MapOps, Prefix},
    Datapath,
};

/// TC verdicts as the programs return them.
pub mod tc_act {
    pub const OK: u32 = 0;
    pub const SHOT: u32 = 2;
    /// `bpf_redirect` / `bpf_redirect_neigh` (a test run does not actually redirect).
    pub const REDIRECT: u32 = 7;
}

/// bpffs, where the pin directories live.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Prefix of every pin directory a [`TestDatapath`] creates under [`BPFFS`].
pub const PIN_PREFIX: &str = "veil-test-";
/// Offset of `ifindex` in `struct __sk_buff` (after len, pkt_type, mark, queue_mapping,
/// protocol, vlan_present, vlan_tci, vlan_proto, priority, ingress_ifindex: ten u32s). The
/// context passed in stops right after it; the kernel zero-fills the rest.
const SKB_IFINDEX_OFFSET: usize = 40;
/// Room for the program to grow the packet before the kernel reports ENOSPC.
const DATA_OUT_SLACK: usize = 256;

/// Errors setting up or running a test datapath.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot load the datapath")]
    Datapath(#[source] super::Error),
    #[error("cannot create the test network namespace")]
    Netns(#[source] nix::Error),
    #[error("cannot create the test interfaces")]
    Interfaces(#[source] crate::sys::Error),
    /// A file or directory the test datapath opens or creates (`sys::Error::Io`).
    #[error(transparent)]
    Io(crate::sys::Error),
    #[error("bad test interface name `{0}` (1-15 characters, not starting with `vtpeer`)")]
    BadInterfaceName(String),
    #[error("interface {0} is not in the test network namespace")]
    NoInterface(String),
    #[error("cannot switch network namespace")]
    Setns(#[source] nix::Error),
    #[error("test run of {program} failed")]
    Run {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

impl From<super::Error> for Error {
    fn from(e: super::Error) -> Self {
        Error::Datapath(e)
    }
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |source| Error::Map { name, source }
}

/// What one test run returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunResult {
    /// The program's return value (see [`tc_act`]).
    pub retval: u32,
    /// Time per run as the kernel measured it: total over `repeat` runs divided by `repeat`,
    /// nanosecond resolution (a single run includes the kernel's own timer overhead).
    pub duration: Duration,
    /// The packet after the program ran.
    pub packet: Vec<u8>,
}

/// veil's programs loaded for test runs; see the module docs.
pub struct TestDatapath {
    // Field order is drop order: program and map fds close before the pins go.
    dp: Datapath,
    events: RingBuf<MapData>,
    netns: TestNetns,
    pins: PinDir,
}

impl TestDatapath {
    /// Loads the programs with maps pinned in a fresh pin directory, inside a fresh network
    /// namespace holding one veth per name in `interfaces` (1–15 characters each). The
    /// datapath config starts zeroed; set it with [`TestDatapath::set_config`].
    pub fn new(interfaces: &[&str]) -> Result<Self, Error> {
        sweep_stale_pin_dirs(Path::new(BPFFS));
        let netns = TestNetns::create(interfaces)?;
        let pins = PinDir::create()?;
        let mut dp = Datapath::open(
            Path::new(BPFFS),
            &pins.0,
            DatapathConfig::default(),
            &Default::default(),
        )?;
        let events = dp
            .ebpf_mut()
            .take_map(names::EVENTS)
            .ok_or(Error::Datapath(super::Error::MissingMap(names::EVENTS)))?;
        let events = RingBuf::try_from(events).map_err(map_err(names::EVENTS))?;
        Ok(Self {
            dp,
            events,
            netns,
            pins,
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pins.0
    }

    /// The ifindex of a test interface (the host side of its veth pair).
    pub fn ifindex(&self, interface: &str) -> Result<u32, Error> {
        self.netns
            .ifindexes
            .get(interface)
            .copied()
            .ok_or_else(|| Error::NoInterface(interface.to_string()))
    }

    /// Runs `program` once on `packet` as if it arrived on `ifindex` (0 or 1: loopback).
    pub fn run(
        &self,
        program: &'static str,
        ifindex: u32,
        packet: &[u8],
    ) -> Result<RunResult, Error> {
        self.run_repeat(program, ifindex, packet, 1)
    }

    /// Runs `program` `repeat` times back to back on the same input (the kernel resets the
    /// packet, not the maps, between runs) and reports the mean time per run.
    pub fn run_repeat(
        &self,
        program: &'static str,
        ifindex: u32,
        packet: &[u8],
        repeat: u32,
    ) -> Result<RunResult, Error> {
        let prog: &SchedClassifier = self
            .dp
            .ebpf()
            .program(program)
            .ok_or(Error::Datapath(super::Error::MissingProgram(program)))?
            .try_into()
            .map_err(|source| Error::Run { program, source })?;
        let mut ctx = [0u8; SKB_IFINDEX_OFFSET + 4];
        ctx[SKB_IFINDEX_OFFSET..].copy_from_slice(&ifindex.to_ne_bytes());
        let mut out = vec![0u8; packet.len() + DATA_OUT_SLACK];
        let result = {
            let _inside = self.netns.enter()?;
            prog.test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ctx_out: None,
                repeat: repeat.max(1),
                attrs: TestRunAttrs::new(),
            })
            .map_err(|source| Error::Run { program, source })?
        };
        out.truncate(result.data_size_out as usize);
        Ok(RunResult {
            retval: result.return_value,
            duration: result.duration,
            packet: out,
        })
    }

    pub fn config(&mut self) -> Result<DatapathConfig, Error> {
        Ok(self.dp.config_map()?.get()?)
    }

    pub fn set_config(&mut self, cfg: DatapathConfig) -> Result<(), Error> {
        Ok(self.dp.config_map()?.set(cfg)?)
    }

    pub fn upsert_ip(&mut self, prefix: Prefix, info: IpInfo) -> Result<(), Error> {
        Ok(IpCacheMap::new(self.dp.ebpf_mut())?.upsert(prefix, info)?)
    }

    /// A pod of this node (the config's node id) behind the test interface `interface`.
    pub fn add_local_pod(
        &mut self,
        ip: std::net::IpAddr,
        identity: u32,
        interface: &str,
    ) -> Result<(), Error> {
        let info = IpInfo {
            identity,
            node_id: self.config()?.node_id,
            flags: ip_flags::LOCAL_POD | ip_flags::POD,
            ifindex: self.ifindex(interface)?,
        };
        self.upsert_ip(Prefix::host(ip), info)
    }

    /// A pod on node `node_id`.
    pub fn add_remote_pod(
        &mut self,
        ip: std::net::IpAddr,
        identity: u32,
        node_id: u32,
    ) -> Result<(), Error> {
        let info = IpInfo {
            identity,
            node_id,
            flags: ip_flags::POD,
            ifindex: 0,
        };
        self.upsert_ip(Prefix::host(ip), info)
    }

    /// Node `node_id`'s pod CIDR.
    pub fn add_pod_cidr(&mut self, prefix: Prefix, node_id: u32) -> Result<(), Error> {
        let info = IpInfo {
            identity: 0,
            node_id,
            flags: ip_flags::POD_CIDR,
            ifindex: 0,
        };
        self.upsert_ip(prefix, info)
    }

    pub fn upsert_node(&mut self, node_id: u32, info: NodeInfo) -> Result<(), Error> {
        Ok(
            KernelHash::<u32, NodeInfo>::new(self.dp.ebpf_mut(), names::NODES)?
                .upsert(node_id, info)?,
        )
    }

    fn policy_map_name(slot: u32) -> &'static str {
        if slot == 0 {
            names::POLICY_A
        } else {
            names::POLICY_B
        }
    }

    /// Brings policy slot `slot` (0 = A, 1 = B) to exactly `entries`; returns the change count.
    pub fn set_policy(
        &mut self,
        slot: u32,
        entries: &BTreeMap<PolicyKey, PolicyEntry>,
    ) -> Result<usize, Error> {
        let name = Self::policy_map_name(slot);
        let mut map = KernelHash::<PolicyKey, PolicyEntry>::new(self.dp.ebpf_mut(), name)?;
        Ok(typed::sync(&mut map, entries)?)
    }

    pub fn upsert_policy(
        &mut self,
        slot: u32,
        key: PolicyKey,
        entry: PolicyEntry,
    ) -> Result<(), Error> {
        let name = Self::policy_map_name(slot);
        Ok(
            KernelHash::<PolicyKey, PolicyEntry>::new(self.dp.ebpf_mut(), name)?
                .upsert(key, entry)?,
        )
    }

    pub fn upsert_auth(&mut self, key: AuthKey, entry: AuthEntry) -> Result<(), Error> {
        Ok(
            KernelHash::<AuthKey, AuthEntry>::new(self.dp.ebpf_mut(), names::AUTH)?
                .upsert(key, entry)?,
        )
    }

    pub fn remove_auth(&mut self, key: &AuthKey) -> Result<(), Error> {
        Ok(KernelHash::<AuthKey, AuthEntry>::new(self.dp.ebpf_mut(), names::AUTH)?.remove(key)?)
    }

    /// Every conntrack entry.
    pub fn conntrack(&self) -> Result<Vec<(CtKey, CtEntry)>, Error> {
        let map = self
            .dp
            .ebpf()
            .map(names::CT)
            .ok_or(Error::Datapath(super::Error::MissingMap(names::CT)))?;
        let map: HashMap<_, CtKey, CtEntry> = HashMap::try_from(map).map_err(map_err(names::CT))?;
        map.iter().map(|r| r.map_err(map_err(names::CT))).collect()
    }

    /// Empties the conntrack table.
    pub fn clear_conntrack(&mut self) -> Result<(), Error> {
        let keys: Vec<CtKey> = self.conntrack()?.into_iter().map(|(k, _)| k).collect();
        let mut map = self.conntrack_mut()?;
        for k in keys {
            match map.remove(&k) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(names::CT)(e)),
            }
        }
        Ok(())
    }

    /// Writes one conntrack entry (to age an entry, or to stage a connection).
    pub fn upsert_conntrack(&mut self, key: CtKey, entry: CtEntry) -> Result<(), Error> {
        self.conntrack_mut()?
            .insert(key, entry, 0)
            .map_err(map_err(names::CT))
    }

    /// The conntrack map, writable.
    fn conntrack_mut(&mut self) -> Result<HashMap<&mut aya::maps::MapData, CtKey, CtEntry>, Error> {
        let map = self
            .dp
            .ebpf_mut()
            .map_mut(names::CT)
            .ok_or(Error::Datapath(super::Error::MissingMap(names::CT)))?;
        HashMap::try_from(map).map_err(map_err(names::CT))
    }

    /// Drop counters summed over CPUs, by reason name (zeros included).
    pub fn drops(&self) -> Result<BTreeMap<&'static str, u64>, Error> {
        Ok(typed::drops(self.dp.ebpf())?)
    }

    /// Drop counter of one reason code, summed over CPUs.
    pub fn drop_count(&self, code: u32) -> Result<u64, Error> {
        Ok(self.drops()?.get(reason::name(code)).copied().unwrap_or(0))
    }

    /// Packets per verdict code ([`veil_common::verdict`]), summed over CPUs.
    pub fn verdicts(&self) -> Result<[u64; veil_common::verdict::COUNT as usize], Error> {
        let map = self
            .dp
            .ebpf()
            .map(names::VERDICTS)
            .ok_or(Error::Datapath(super::Error::MissingMap(names::VERDICTS)))?;
        let map: PerCpuArray<_, u64> =
            PerCpuArray::try_from(map).map_err(map_err(names::VERDICTS))?;
        let mut out = [0u64; veil_common::verdict::COUNT as usize];
        for (code, slot) in out.iter_mut().enumerate() {
            *slot = map
                .get(&(code as u32), 0)
                .map_err(map_err(names::VERDICTS))?
                .iter()
                .sum();
        }
        Ok(out)
    }

    /// Per-interface counters by ifindex, summed over CPUs.
    pub fn interface_stats(&self) -> Result<BTreeMap<u32, IfStats>, Error> {
        Ok(typed::interface_stats(self.dp.ebpf())?)
    }

    /// Flow events lost to a full ring buffer, summed over CPUs.
    pub fn events_lost(&self) -> Result<u64, Error> {
        Ok(typed::events_lost(self.dp.ebpf())?)
    }

    /// Flow events emitted since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<FlowEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            if item.len() >= std::mem::size_of::<FlowEvent>() {
                // SAFETY: FlowEvent is #[repr(C)] plain integers (any bit pattern is valid) and
                // the item holds at least size_of::<FlowEvent>() bytes; read_unaligned needs no
                // alignment.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) });
            }
        }
        out
    }

    pub fn datapath(&mut self) -> &mut Datapath {
        &mut self.dp
    }
}

/// CLOCK_BOOTTIME now, in ns: the clock of `bpf_ktime_get_boot_ns` and of auth-entry expiry.
pub fn boot_time_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    assert_eq!(rc, 0, "CLOCK_BOOTTIME is always available on Linux");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A network namespace held only by a file descriptor: the kernel frees it (and its veths)
/// when the descriptor closes, whatever way the process ends.
struct TestNetns {
    fd: OwnedFd,
    ifindexes: BTreeMap<String, u32>,
}

/// While alive, the calling thread is in the test namespace; dropping it moves the thread back.
struct InsideNetns {
    home: File,
}

impl Drop for InsideNetns {
    fn drop(&mut self) {
        // A thread left in the private namespace would run later code against the wrong
        // interfaces; there is no sane way on.
        nix::sched::setns(&self.home, CloneFlags::CLONE_NEWNET)
            .expect("cannot return to the original network namespace");
    }
}

const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

impl TestNetns {
    fn create(interfaces: &[&str]) -> Result<Self, Error> {
        let mut names = Vec::new();
        for name in interfaces {
            if name.is_empty()
                || name.len() > 15
                || name.starts_with("vtpeer")
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(Error::BadInterfaceName(name.to_string()));
            }
            names.push(name.to_string());
        }
        // unshare(CLONE_NEWNET) moves only the calling thread, so a short-lived thread does it,
        // creates the veths (`ip` inherits the thread's namespace) and hands back an fd.
        std::thread::spawn(move || -> Result<Self, Error> {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(Error::Netns)?;
            let lines: Vec<String> = names
                .iter()
                .enumerate()
                .map(|(i, n)| format!("link add {n} type veth peer name vtpeer{i}"))
                .collect();
            crate::sys::ip_batch(None, &lines).map_err(Error::Interfaces)?;
            let mut ifindexes = BTreeMap::new();
            for n in &names {
                let idx = nix::net::if_::if_nametoindex(n.as_str())
                    .map_err(|_| Error::NoInterface(n.clone()))?;
                ifindexes.insert(n.clone(), idx);
            }
            let fd = File::open(THREAD_NETNS).map_err(io_err("cannot open", THREAD_NETNS))?;
            Ok(Self {
                fd: fd.into(),
                ifindexes,
            })
        })
        .join()
        .expect("the namespace setup thread does not panic")
    }

    fn enter(&self) -> Result<InsideNetns, Error> {
        let home = File::open(THREAD_NETNS).map_err(io_err("cannot open", THREAD_NETNS))?;
        nix::sched::setns(&self.fd, CloneFlags::CLONE_NEWNET).map_err(Error::Setns)?;
        Ok(InsideNetns { home })
    }
}

fn io_err(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
    let io_err = crate::sys::io_err(what, path);
    move |source| Error::Io(io_err(source))
}

/// A pin directory removed (with everything pinned in it) on drop.
struct PinDir(PathBuf);

impl PinDir {
    fn create() -> Result<Self, Error> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        let start = crate::sys::process_start_time(pid).unwrap_or(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let path = Path::new(BPFFS).join(format!("{PIN_PREFIX}{pid}-{start}-{n}"));
        // A leftover with this very name is ours from an earlier incarnation of this pid.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).map_err(io_err("cannot create", &path))?;
        Ok(Self(path))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes `veil-test-<pid>-<start>-<n>` directories whose process is gone (killed before its
/// drop ran). A live process with that pid and start time keeps its directory.
fn sweep_stale_pin_dirs(bpffs: &Path) {
    let Ok(entries) = std::fs::read_dir(bpffs) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PIN_PREFIX) else {
            continue;
        };
        let mut parts = rest.splitn(3, '-');
        let (Some(pid), Some(start)) = (
            parts.next().and_then(|p| p.parse::<u32>().ok()),
            parts.next().and_then(|s| s.parse::<u64>().ok()),
        ) else {
            continue;
        };
        if crate::sys::process_start_time(pid) != Some(start) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
