//! flows: the flow records behind `veil observe` — verdict events from the datapath's ring
//! buffer, enriched with pod, namespace, identity and node, kept in memory for queries and in a
//! bounded log on disk that survives agent restarts.
//!
//! The datapath already folds repeats of one (identities, port, verdict, reason) tuple into one
//! event per second; the reader drains a bounded batch per wake-up, so a flood of drops costs
//! the agent a bounded amount of work and never starves the rest of it.

use std::{
    collections::{BTreeMap, VecDeque},
    io::{BufRead as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use veil_common::{
    maps::{direction, flow_flags, identity, FlowEvent},
    reason, verdict,
};

use crate::cluster::ClusterState;

/// One endpoint of a flow, as `veil observe -o json` prints it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub pod: Option<String>,
    pub namespace: Option<String>,
    /// Numeric security identity.
    pub identity: u32,
    /// The identity's labels, or the reserved identity's name (`world`, `unknown`, ...).
    pub labels: Vec<String>,
    pub ip: String,
    pub port: u16,
}

/// What happened to a flow's packets.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Verdict {
    Forwarded,
    #[default]
    Dropped,
    /// Would have been dropped; passed because the node is in audit mode.
    Audit,
    /// A verdict code this agent does not know (a newer datapath); never a filter value.
    Unknown,
}

impl Verdict {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Forwarded => "FORWARDED",
            Self::Dropped => "DROPPED",
            Self::Audit => "AUDIT",
            Self::Unknown => "UNKNOWN",
        }
    }

    /// The verdict of a datapath event code ([`veil_common::verdict`]).
    pub const fn from_code(code: u8) -> Self {
        match code {
            verdict::FORWARDED => Self::Forwarded,
            verdict::DROPPED => Self::Dropped,
            verdict::AUDIT => Self::Audit,
            _ => Self::Unknown,
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Verdict {
    type Err = String;

    /// `forwarded`, `dropped` or `audit`, in any case (what `veil observe --verdict` takes).
    fn from_str(s: &str) -> Result<Self, String> {
        [Self::Forwarded, Self::Dropped, Self::Audit]
            .into_iter()
            .find(|v| v.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("{s:?} is not FORWARDED, DROPPED or AUDIT"))
    }
}

/// A flow record (`veil observe -o json`, one per line).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// Per node, increasing; `--follow` resumes after the last one seen.
    pub seq: u64,
    /// RFC 3339 UTC.
    pub time: String,
    pub time_unix_ns: u64,
    pub node: String,
    pub verdict: Verdict,
    /// Stable kebab-case reason for DROPPED (and for AUDIT: what would have dropped it).
    pub drop_reason: Option<String>,
    pub protocol: String,
    /// `egress` (decided at the source pod) or `ingress` (at the destination).
    pub direction: String,
    pub src: Endpoint,
    pub dst: Endpoint,
    /// `authenticated`, `required` (and missing) or `not-required`.
    pub auth: String,
    pub encrypted: bool,
    /// Packets folded into this record by the datapath's per-second throttle.
    pub count: u32,
    /// The Service (`namespace/name`) the source's socket addressed, when a socket program
    /// translated its ClusterIP to the destination pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// For a flow whose first packets were held until its identity pair authenticated: how
    /// long they waited (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_ms: Option<u64>,
    /// For a flow dropped for lack of a key or of authentication: the failure of the handshake
    /// that would have provided it (`wrong-trust-domain`, `expired-svid`, `peer-unreachable`...),
    /// when one is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_error: Option<String>,
    /// For a request the node's L7 proxy decided: what it saw and answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l7: Option<L7Info>,
}

/// The L7 part of a flow record (`veil observe --type l7`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct L7Info {
    /// `http`.
    #[serde(rename = "type")]
    pub kind: String,
    pub method: String,
    pub path: String,
    /// The status the client got (403 from the proxy for a denied request).
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// `veil observe --type`: packet records of the datapath, or request records of the L7 proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowType {
    L3L4,
    L7,
}

impl std::str::FromStr for FlowType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "l7" => Ok(Self::L7),
            "l3l4" | "l4" => Ok(Self::L3L4),
            _ => Err(format!("{s:?} is not l7 or l3l4")),
        }
    }
}

/// Adds what only the agent knows to a record as it is stored (see `Flow::auth_error`).
pub type Annotator = Box<dyn Fn(&mut Flow) + Send>;

/// Filters of `veil observe`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub verdict: Option<Verdict>,
    pub pod: Option<String>,
    pub namespace: Option<String>,
    pub protocol: Option<String>,
    pub since_unix_ns: Option<u64>,
    pub after_seq: Option<u64>,
    pub limit: Option<usize>,
    pub kind: Option<FlowType>,
}

impl Filter {
    pub fn matches(&self, f: &Flow) -> bool {
        let endpoint_is = |e: &Endpoint, q: &str| match q.split_once('/') {
            Some((ns, name)) => {
                e.namespace.as_deref() == Some(ns) && e.pod.as_deref() == Some(name)
            }
            None => e.pod.as_deref() == Some(q),
        };
        self.verdict.is_none_or(|v| v == f.verdict)
            && self
                .pod
                .as_ref()
                .is_none_or(|p| endpoint_is(&f.src, p) || endpoint_is(&f.dst, p))
            && self.namespace.as_ref().is_none_or(|n| {
                f.src.namespace.as_ref() == Some(n) || f.dst.namespace.as_ref() == Some(n)
            })
            && self
                .protocol
                .as_ref()
                .is_none_or(|p| p.eq_ignore_ascii_case(&f.protocol))
            && self.since_unix_ns.is_none_or(|t| f.time_unix_ns >= t)
            && self.after_seq.is_none_or(|s| f.seq > s)
            && self
                .kind
                .is_none_or(|k| (k == FlowType::L7) == f.l7.is_some())
    }
}

pub fn protocol_name(p: u8) -> String {
    use veil_common::ipproto;
    match p {
        ipproto::ICMP => "ICMP".into(),
        ipproto::TCP => "TCP".into(),
        ipproto::UDP => "UDP".into(),
        ipproto::ICMPV6 => "ICMPv6".into(),
        ipproto::SCTP => "SCTP".into(),
        n => format!("IP-{n}"),
    }
}

fn addr(raw: [u8; 16], v6: bool) -> IpAddr {
    let v6addr = Ipv6Addr::from(raw);
    match (v6, v6addr.to_ipv4_mapped()) {
        (false, Some(v4)) => IpAddr::V4(v4),
        _ => IpAddr::V6(v6addr),
    }
}

fn reserved_name(id: u32) -> Option<&'static str> {
    match id {
        identity::HOST => Some("reserved:host"),
        identity::WORLD => Some("reserved:world"),
        identity::UNKNOWN => Some("reserved:unknown"),
        identity::REMOTE_NODE => Some("reserved:remote-node"),
        _ => None,
    }
}

fn endpoint(state: &ClusterState, ip: IpAddr, port: u16, id: u32) -> Endpoint {
    let pod = state.pod_by_ip(ip);
    let labels = match reserved_name(id) {
        Some(r) => vec![r.to_string()],
        None => state
            .identities
            .iter()
            .find(|i| i.id == id)
            .map(|i| i.labels.iter().map(|(k, v)| format!("{k}={v}")).collect())
            .unwrap_or_default(),
    };
    Endpoint {
        pod: pod.map(|p| p.name.clone()),
        namespace: pod.map(|p| p.namespace.clone()),
        identity: id,
        labels,
        ip: ip.to_string(),
        port,
    }
}

/// Wall-clock ns of a CLOCK_BOOTTIME timestamp, given the offset between the clocks.
pub fn boot_to_unix_ns(boot_ns: u64, offset_ns: i128) -> u64 {
    (i128::from(boot_ns) + offset_ns).max(0) as u64
}

/// `unix_now - boottime_now`, in ns.
pub fn boot_offset_ns() -> i128 {
    let boot = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec()))
        .unwrap_or(0);
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    unix - boot
}

/// Builds the record for a datapath event.
pub fn from_event(ev: &FlowEvent, node: &str, state: &ClusterState, offset_ns: i128) -> Flow {
    let v6 = ev.flags & flow_flags::IPV6 != 0;
    let t = boot_to_unix_ns(ev.time_boot_ns, offset_ns);
    let auth = if ev.flags & flow_flags::AUTHENTICATED != 0 {
        "authenticated"
    } else if ev.flags & flow_flags::AUTH_REQUIRED != 0 {
        "required"
    } else {
        "not-required"
    };
    Flow {
        seq: 0,
        time: rfc3339(t),
        time_unix_ns: t,
        node: node.to_string(),
        verdict: Verdict::from_code(ev.verdict),
        drop_reason: (ev.reason != reason::NONE).then(|| reason::name(ev.reason).to_string()),
        protocol: protocol_name(ev.protocol),
        direction: if ev.direction == direction::INGRESS {
            "ingress"
        } else {
            "egress"
        }
        .to_string(),
        src: endpoint(state, addr(ev.saddr, v6), ev.sport, ev.src_identity),
        dst: endpoint(state, addr(ev.daddr, v6), ev.dport, ev.dst_identity),
        auth: auth.to_string(),
        encrypted: ev.flags & flow_flags::ENCRYPTED != 0,
        count: ev.count.max(1),
        service: (ev.service != [0; 16]).then(|| {
            let ip = addr(ev.service, v6);
            state
                .service_by_ip(ip)
                .map(|svc| svc.qualified_name())
                .unwrap_or_else(|| ip.to_string())
        }),
        held_ms: None,
        auth_error: None,
        l7: None,
    }
}

/// Builds the record for a request the L7 proxy decided.
pub fn from_l7(r: &crate::l7::L7Record, node: &str, state: &ClusterState) -> Flow {
    Flow {
        seq: 0,
        time: rfc3339(r.time_unix_ns),
        time_unix_ns: r.time_unix_ns,
        node: node.to_string(),
        verdict: r.verdict,
        drop_reason: r.drop_reason.clone(),
        protocol: "TCP".into(),
        direction: r.direction.clone(),
        src: endpoint(state, r.src.ip(), r.src.port(), r.src_identity),
        dst: endpoint(state, r.dst.ip(), r.dst.port(), r.dst_identity),
        auth: "not-required".into(),
        encrypted: false,
        count: 1,
        service: None,
        held_ms: None,
        auth_error: None,
        l7: Some(L7Info {
            kind: "http".into(),
            method: r.method.clone(),
            path: r.path.clone(),
            status: r.status,
            host: r.host.clone(),
        }),
    }
}

/// UTC RFC 3339 with milliseconds, without a date library.
pub fn rfc3339(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let ms = (unix_ns / 1_000_000) % 1000;
    let days = (secs / 86_400) as i64;
    let sod = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    )
}

/// In-memory ring of recent flows plus a bounded on-disk log (two files, rotated).
///
/// The ring holds records as their JSON lines in one buffer allocated and written in full when
/// the store opens, so the agent's memory does not grow as flows arrive: a one-hour soak at a
/// flow a second grew a `VecDeque<Flow>` ring by 2 MB (each record's own strings, and the
/// deque doubling). Queries parse the records they read (`veil observe` is rare; a full ring
/// parses in milliseconds).
pub struct FlowStore {
    ring: RecordRing,
    log: Option<PathBuf>,
    log_max_bytes: u64,
    /// The log, kept open between records (the L7 proxy records every request), with its
    /// length; reopened after a rotation or a failed write.
    log_file: Option<(std::fs::File, u64)>,
    next_seq: u64,
    /// Totals by (verdict, reason) for metrics.
    totals: BTreeMap<(Verdict, String), u64>,
    annotate: Option<Annotator>,
}

impl FlowStore {
    /// Records kept in memory (Hubble keeps 4,095 by default).
    pub const DEFAULT_CAPACITY: usize = 4_096;
    pub const DEFAULT_LOG_BYTES: u64 = 8 << 20;
    /// Ring bytes per record of capacity: a record is 350–600 bytes of JSON; longer ones (many
    /// labels) evict more of the oldest.
    const RECORD_BUDGET: usize = 512;

    /// Opens the store, reloading the newest records from the log left by an earlier agent.
    pub fn open(log: Option<PathBuf>, capacity: usize, log_max_bytes: u64) -> Self {
        let mut s = Self {
            ring: RecordRing::new(capacity, capacity.saturating_mul(Self::RECORD_BUDGET)),
            log,
            log_max_bytes,
            log_file: None,
            next_seq: 1,
            totals: BTreeMap::new(),
            annotate: None,
        };
        if let Some(path) = s.log.clone() {
            for file in [rotated(&path), path] {
                if let Ok(f) = std::fs::File::open(&file) {
                    for line in std::io::BufReader::new(f).lines().map_while(Result::ok) {
                        if let Ok(flow) = serde_json::from_str::<Flow>(&line) {
                            s.next_seq = s.next_seq.max(flow.seq + 1);
                            s.ring.push(&flow, line.as_bytes());
                        }
                    }
                }
            }
        }
        s
    }

    /// Records a flow: numbered, kept in memory, appended to the log.
    pub fn set_annotator(&mut self, a: Annotator) {
        self.annotate = Some(a);
    }

    pub fn push(&mut self, mut flow: Flow) {
        if let Some(a) = &self.annotate {
            a(&mut flow);
        }
        flow.seq = self.next_seq;
        self.next_seq += 1;
        *self
            .totals
            .entry((flow.verdict, flow.drop_reason.clone().unwrap_or_default()))
            .or_default() += u64::from(flow.count);
        let mut line = serde_json::to_vec(&flow).expect("flow serializes");
        self.ring.push(&flow, &line);
        if let Some(path) = &self.log {
            line.push(b'\n');
            if let Err(e) = append_line(&mut self.log_file, path, &line, self.log_max_bytes) {
                tracing::debug!(error = %e, "flow log write failed");
                self.log_file = None;
            }
        }
    }

    /// Matching flows, oldest first, the newest `limit` of them.
    pub fn query(&self, f: &Filter) -> Vec<Flow> {
        let mut out: Vec<Flow> = self
            .ring
            .records(f.after_seq.unwrap_or(0), f.since_unix_ns.unwrap_or(0))
            .filter_map(|line| serde_json::from_slice::<Flow>(line).ok())
            .filter(|x| f.matches(x))
            .collect();
        if let Some(limit) = f.limit {
            if out.len() > limit {
                out.drain(..out.len() - limit);
            }
        }
        out
    }

    pub fn totals(&self) -> &BTreeMap<(Verdict, String), u64> {
        &self.totals
    }

    pub fn len(&self) -> usize {
        self.ring.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ring.slots.is_empty()
    }
}

/// Where one record's line is in [`RecordRing::buf`], with what queries skip by.
#[derive(Debug, Clone, Copy)]
struct Slot {
    seq: u64,
    time_unix_ns: u64,
    start: usize,
    len: usize,
}

/// A FIFO of byte records in a fixed buffer: at most `slots`' capacity records, each stored
/// whole (never split across the end), the oldest evicted to make room.
struct RecordRing {
    buf: Vec<u8>,
    slots: VecDeque<Slot>,
    max_slots: usize,
    /// Where the next record starts.
    head: usize,
}

impl RecordRing {
    fn new(max_slots: usize, bytes: usize) -> Self {
        // Both are written in full now (a non-zero fill; the index filled and cleared) so that
        // their pages are resident from the start rather than as the ring fills.
        let buf = vec![b'\n'; bytes];
        let mut slots = VecDeque::with_capacity(max_slots);
        slots.extend(std::iter::repeat_n(
            Slot {
                seq: u64::MAX,
                time_unix_ns: 0,
                start: 0,
                len: 0,
            },
            max_slots,
        ));
        slots.clear();
        Self {
            buf,
            slots,
            max_slots,
            head: 0,
        }
    }

    fn push(&mut self, flow: &Flow, line: &[u8]) {
        let len = line.len();
        if len > self.buf.len() || self.max_slots == 0 {
            return;
        }
        if self.head + len > self.buf.len() {
            // Wrap: what lies beyond the head is the oldest of the previous lap.
            while self.slots.front().is_some_and(|s| s.start >= self.head) {
                self.slots.pop_front();
            }
            self.head = 0;
        }
        let end = self.head + len;
        while self.slots.len() == self.max_slots
            || self
                .slots
                .front()
                .is_some_and(|s| s.start < end && self.head < s.start + s.len)
        {
            self.slots.pop_front();
        }
        self.buf[self.head..end].copy_from_slice(line);
        self.slots.push_back(Slot {
            seq: flow.seq,
            time_unix_ns: flow.time_unix_ns,
            start: self.head,
            len,
        });
        self.head = end;
    }

    /// Records numbered after `after_seq` and stamped at or after `since_ns`, oldest first.
    fn records(&self, after_seq: u64, since_ns: u64) -> impl Iterator<Item = &[u8]> {
        self.slots
            .iter()
            .filter(move |s| s.seq > after_seq && s.time_unix_ns >= since_ns)
            .map(|s| &self.buf[s.start..s.start + s.len])
    }
}

fn rotated(path: &Path) -> PathBuf {
    path.with_extension("jsonl.1")
}

/// Appends one line (newline included), first rotating the file when it holds half the budget.
/// Appends `line` to the log at `path` through `open` (opened on first use), rotating the log
/// to `rotated(path)` once it holds half of `max`.
fn append_line(
    open: &mut Option<(std::fs::File, u64)>,
    path: &Path,
    line: &[u8],
    max: u64,
) -> std::io::Result<()> {
    if open.as_ref().is_some_and(|(_, len)| *len >= max / 2) {
        *open = None;
        std::fs::rename(path, rotated(path))?;
    }
    if open.is_none() {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let len = f.metadata()?.len();
        if len >= max / 2 {
            drop(f);
            std::fs::rename(path, rotated(path))?;
            return append_line(open, path, line, max);
        }
        *open = Some((f, len));
    }
    let (f, len) = open.as_mut().expect("opened above");
    f.write_all(line)?;
    *len += line.len() as u64;
    Ok(())
}

/// Parses `--since`: a duration back from now (`30s`, `5m`) or an RFC 3339-free unix seconds.
pub fn parse_since(s: &str, now: SystemTime) -> Result<u64, String> {
    if let Ok(d) = humantime::parse_duration(s) {
        let t = now.checked_sub(d).unwrap_or(UNIX_EPOCH);
        return Ok(t
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0));
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs).as_nanos() as u64);
    }
    Err(format!(
        "--since {s:?}: write a duration back from now (30s, 5m, 1h) or unix seconds"
    ))
}

pub fn format_table_header() -> String {
    format!(
        "{:<24} {:<7} {:<9} {:<15} {:<36} {:<36} {:<6} AUTH/ENC",
        "TIME", "NODE", "VERDICT", "REASON", "SOURCE", "DESTINATION", "PROTO"
    )
}

pub fn format_table_row(f: &Flow) -> String {
    let ep = |e: &Endpoint| {
        let who = match (&e.namespace, &e.pod) {
            (Some(ns), Some(p)) => format!("{ns}/{p}"),
            _ => e.labels.first().cloned().unwrap_or_else(|| e.ip.clone()),
        };
        format!("{who}[{}]:{}", e.identity, e.port)
    };
    format!(
        "{:<24} {:<7} {:<9} {:<15} {:<36} {:<36} {:<6} {}/{}{}",
        f.time,
        f.node,
        f.verdict,
        f.drop_reason.as_deref().unwrap_or("-"),
        ep(&f.src),
        ep(&f.dst),
        f.protocol,
        f.auth,
        if f.encrypted { "encrypted" } else { "clear" },
        if f.count > 1 {
            format!(" x{}", f.count)
        } else {
            String::new()
        }
    ) + &f
        .service
        .as_ref()
        .map(|svc| format!(" (via service {svc})"))
        .unwrap_or_default()
        + &f.held_ms
            .map(|ms| format!(" (held {ms} ms for auth)"))
            .unwrap_or_default()
        + &f.auth_error
            .as_ref()
            .map(|e| format!(" (auth: {e})"))
            .unwrap_or_default()
        + &f.l7
            .as_ref()
            .map(|l| {
                format!(
                    " http {} {}{} -> {}",
                    l.method,
                    l.host
                        .as_deref()
                        .map(|h| format!("//{h}"))
                        .unwrap_or_default(),
                    l.path,
                    l.status
                )
            })
            .unwrap_or_default()
}

/// The v4-mapped form of an IPv4 address, as events carry it.
pub fn mapped(ip: Ipv4Addr) -> [u8; 16] {
    ip.to_ipv6_mapped().octets()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Identity, Pod};

    fn state() -> ClusterState {
        let pod = |name: &str, ip: [u8; 4], id: u32| Pod::for_test(name, "node-a", ip, id);
        ClusterState {
            pods: crate::cluster::pod_list([
                pod("intruder", [198, 19, 1, 11], 258),
                pod("backend", [198, 19, 2, 10], 257),
            ]),
            identities: vec![
                Identity {
                    id: 258,
                    namespace: "shop".into(),
                    service_account: "intruder".into(),
                    labels: BTreeMap::from([("app".into(), "intruder".into())]),
                    namespace_labels: BTreeMap::new(),
                },
                Identity {
                    id: 257,
                    namespace: "shop".into(),
                    service_account: "backend".into(),
                    labels: BTreeMap::from([("app".into(), "backend".into())]),
                    namespace_labels: BTreeMap::new(),
                },
            ],
            ..Default::default()
        }
    }

    fn drop_event() -> FlowEvent {
        FlowEvent {
            time_boot_ns: 5_000_000_000,
            saddr: mapped(Ipv4Addr::new(198, 19, 1, 11)),
            daddr: mapped(Ipv4Addr::new(198, 19, 2, 10)),
            sport: 40000,
            dport: 8080,
            src_identity: 258,
            dst_identity: 257,
            protocol: 6,
            verdict: verdict::DROPPED,
            direction: direction::INGRESS,
            reason: reason::POLICY_DENIED,
            flags: flow_flags::ENCRYPTED,
            count: 3,
            ..Default::default()
        }
    }

    #[test]
    fn a_translated_flow_names_its_service() {
        let mut st = state();
        st.services = vec![crate::cluster::Service {
            namespace: "shop".into(),
            name: "backend".into(),
            cluster_ip: Ipv4Addr::new(198, 18, 16, 10).into(),
            cluster_ipv6: Some("fd00:198:16::a".parse().unwrap()),
            ports: vec![],
            affinity_timeout_s: None,
            backends: vec![],
        }];
        let via = |ip: [u8; 4]| FlowEvent {
            service: mapped(Ipv4Addr::from(ip)),
            ..drop_event()
        };
        let f = from_event(&via([198, 18, 16, 10]), "node-a", &st, 0);
        assert_eq!(f.service.as_deref(), Some("shop/backend"));
        assert!(
            format_table_row(&f).ends_with(" (via service shop/backend)"),
            "{}",
            format_table_row(&f)
        );
        // A ClusterIP the state no longer knows is still shown, as its address.
        let f = from_event(&via([198, 18, 16, 99]), "node-a", &st, 0);
        assert_eq!(f.service.as_deref(), Some("198.18.16.99"));
        // An IPv6 connection through the IPv6 ClusterIP.
        let v6 = FlowEvent {
            service: "fd00:198:16::a".parse::<Ipv6Addr>().unwrap().octets(),
            flags: flow_flags::IPV6,
            ..drop_event()
        };
        let f = from_event(&v6, "node-a", &st, 0);
        assert_eq!(f.service.as_deref(), Some("shop/backend"));
        let f = from_event(&drop_event(), "node-a", &st, 0);
        assert_eq!(f.service, None);
        assert!(serde_json::to_value(&f).unwrap().get("service").is_none());
    }

    #[test]
    fn events_become_records_with_names() {
        let f = from_event(&drop_event(), "node-b", &state(), 1_700_000_000_000_000_000);
        assert_eq!(f.verdict, Verdict::Dropped);
        assert_eq!(f.drop_reason.as_deref(), Some("policy-denied"));
        assert_eq!(f.protocol, "TCP");
        assert_eq!(f.direction, "ingress");
        assert_eq!(
            (f.src.pod.as_deref(), f.src.identity, f.src.port),
            (Some("intruder"), 258, 40000)
        );
        assert_eq!(f.src.labels, vec!["app=intruder"]);
        assert_eq!(
            (f.dst.pod.as_deref(), f.dst.ip.as_str()),
            (Some("backend"), "198.19.2.10")
        );
        assert!(f.encrypted);
        assert_eq!(f.auth, "not-required");
        assert_eq!(f.count, 3);
        assert_eq!(f.time, "2023-11-14T22:13:25.000Z");
        let v: serde_json::Value = serde_json::to_value(&f).unwrap();
        for k in [
            "time",
            "node",
            "verdict",
            "drop_reason",
            "protocol",
            "src",
            "dst",
            "auth",
            "encrypted",
        ] {
            assert!(v.get(k).is_some(), "{k}");
        }
        for k in ["pod", "namespace", "identity", "ip", "port"] {
            assert!(v["src"].get(k).is_some(), "src.{k}");
        }
        let world = FlowEvent {
            dst_identity: identity::WORLD,
            daddr: mapped(Ipv4Addr::new(8, 8, 8, 8)),
            ..drop_event()
        };
        assert_eq!(
            from_event(&world, "n", &state(), 0).dst.labels,
            vec!["reserved:world"]
        );
    }

    #[test]
    fn filters() {
        let f = from_event(&drop_event(), "node-b", &state(), 0);
        let yes = |flt: Filter| assert!(flt.matches(&f), "{flt:?}");
        let no = |flt: Filter| assert!(!flt.matches(&f), "{flt:?}");
        yes(Filter::default());
        yes(Filter {
            verdict: Some("dropped".parse().unwrap()),
            ..Default::default()
        });
        no(Filter {
            verdict: Some(Verdict::Forwarded),
            ..Default::default()
        });
        yes(Filter {
            pod: Some("shop/backend".into()),
            ..Default::default()
        });
        yes(Filter {
            pod: Some("intruder".into()),
            ..Default::default()
        });
        no(Filter {
            pod: Some("frontend".into()),
            ..Default::default()
        });
        yes(Filter {
            namespace: Some("shop".into()),
            protocol: Some("tcp".into()),
            ..Default::default()
        });
        no(Filter {
            protocol: Some("UDP".into()),
            ..Default::default()
        });
        no(Filter {
            since_unix_ns: Some(f.time_unix_ns + 1),
            ..Default::default()
        });
    }

    #[test]
    fn store_is_bounded_and_survives_reopen() {
        let dir = std::env::temp_dir().join(format!("veil-flows-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("flows.jsonl");
        let mut s = FlowStore::open(Some(log.clone()), 5, 4096);
        for _ in 0..40 {
            s.push(from_event(&drop_event(), "node-b", &state(), 0));
        }
        assert_eq!(s.len(), 5);
        assert_eq!(s.query(&Filter::default()).last().unwrap().seq, 40);
        assert_eq!(
            s.query(&Filter {
                after_seq: Some(38),
                ..Default::default()
            })
            .len(),
            2
        );
        assert_eq!(
            s.query(&Filter {
                limit: Some(2),
                ..Default::default()
            })
            .len(),
            2
        );
        assert_eq!(
            s.totals()[&(Verdict::Dropped, "policy-denied".to_string())],
            120
        );
        // The log is bounded: two files of at most max/2 each (plus one line).
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        assert!(size(&log) + size(&rotated(&log)) <= 4096 + 1024);
        drop(s);
        let s2 = FlowStore::open(Some(log.clone()), 5, 4096);
        assert_eq!(
            s2.query(&Filter::default()).last().unwrap().seq,
            40,
            "records survive a restart"
        );
        let mut s2 = s2;
        s2.push(from_event(&drop_event(), "node-b", &state(), 0));
        assert_eq!(
            s2.query(&Filter::default()).last().unwrap().seq,
            41,
            "numbering continues"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn record_ring_keeps_the_newest_suffix_within_its_bounds() {
        // Records of varied lengths through a small ring: what it keeps is always the newest
        // records in order, within both bounds, and no less than the buffer minus what a wrap
        // and the record being written can waste.
        let (bytes, max_slots, longest) = (1000, 40, 97);
        let mut ring = RecordRing::new(max_slots, bytes);
        let mut pushed: Vec<Vec<u8>> = Vec::new();
        for i in 0..500u64 {
            let len = 20 + (i * 37 % 78) as usize;
            let line = vec![b'a' + (i % 26) as u8; len];
            let flow = Flow {
                seq: i + 1,
                time_unix_ns: i,
                ..Default::default()
            };
            ring.push(&flow, &line);
            pushed.push(line);
            let kept: Vec<&[u8]> = ring.records(0, 0).collect();
            let suffix = &pushed[pushed.len() - kept.len()..];
            assert!(
                kept.iter().zip(suffix).all(|(a, b)| a == &b.as_slice()),
                "after {} pushes the ring is not the newest records in order",
                i + 1
            );
            let held: usize = kept.iter().map(|r| r.len()).sum();
            assert!(kept.len() <= max_slots && held <= bytes);
            assert!(
                kept.len() == max_slots
                    || held + 2 * longest >= bytes
                    || pushed.len() == kept.len(),
                "after {} pushes only {held} bytes in {} records are kept",
                i + 1,
                kept.len()
            );
        }
        assert_eq!(ring.records(495, 0).count(), 5, "skips by seq");
        assert_eq!(ring.records(0, 498).count(), 2, "skips by time");
    }

    #[test]
    fn since_parsing() {
        let now = UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(parse_since("10s", now).unwrap(), 990_000_000_000);
        assert_eq!(parse_since("500", now).unwrap(), 500_000_000_000);
        assert!(parse_since("yesterday", now).is_err());
    }
}
