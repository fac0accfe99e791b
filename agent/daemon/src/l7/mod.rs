//! l7: the node-local L7 HTTP policy proxy (`veil-proxy`) and what the agent and the proxy
//! say to each other.
//!
//! The datapath sends a TCP connection to the proxy when the policy rule admitting it carries
//! `rules.http` (conntrack remembers it: `ct_flags::PROXY`). The SYN is assigned to the proxy's
//! listener on loopback (`bpf_sk_assign` at TC ingress), and every packet of the connection, in
//! both directions, is marked for local delivery, so the proxy's accepted socket keeps the
//! original destination as its local address and the proxy's upstream connection reuses the
//! client's own address and port (`IP_TRANSPARENT`): the backend, the peer node's policy and
//! mutual authentication see the client, never the proxy. See ARCHITECTURE.md §5b.
//!
//! The agent supervises the proxy (a process of its own, like veil-wg: restarted alone, and
//! surviving an agent restart) over a unix socket, one JSON object per line: the agent sends
//! [`ProxyConfig`] snapshots, the proxy answers [`ProxyMessage`]s (hello, request records).

pub mod framing;
pub mod proxy;
pub mod rules;
pub mod supervisor;

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::{flows::Verdict, policy::compile::L7Rule};

/// Everything the proxy decides on: the pods' addresses and identities, and the allow rules of
/// every (local identity, direction) that has HTTP rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyConfig {
    /// The cluster's policy generation it was built from (logs and status only).
    pub generation: u64,
    pub endpoints: Vec<ProxyEndpoint>,
    pub rules: Vec<L7Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyEndpoint {
    pub ip: IpAddr,
    pub identity: u32,
    /// A pod of this node: its egress rules (as a client) and ingress rules (as a server)
    /// apply here.
    pub local: bool,
}

/// What the proxy sends the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ProxyMessage {
    /// First line on every control connection.
    Hello { pid: u32, listen_port: u16 },
    /// One decided request.
    Request(Box<L7Record>),
}

/// One request the proxy decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct L7Record {
    pub time_unix_ns: u64,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub src_identity: u32,
    pub dst_identity: u32,
    /// The direction whose rules decided (`egress` when the client is a pod of this node).
    pub direction: String,
    pub verdict: Verdict,
    /// `policy-denied` (403), `bad-request` (refused before policy), `upstream-unavailable`
    /// (502/503: the backend could not be reached), `proxy-unconfigured` (503).
    pub drop_reason: Option<String>,
    pub method: String,
    pub path: String,
    pub host: Option<String>,
    pub status: u16,
}
