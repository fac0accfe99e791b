//! daemon::events: the datapath's flow events into the flow store. Opens the store (reloading
//! the flow log), drains the ring buffer (`datapath::events::EventRing`), and names the failed
//! handshake behind auth drops as records are stored.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::{
    cluster::ClusterState, config::Config, datapath::events::EventRing, flows::FlowStore,
    mesh::MeshStatus,
};

/// The flow store, reloaded from `state_dir/flows.jsonl`.
pub(super) fn open_store(cfg: &Config) -> Arc<Mutex<FlowStore>> {
    Arc::new(Mutex::new(FlowStore::open(
        Some(cfg.state_dir.join("flows.jsonl")),
        FlowStore::DEFAULT_CAPACITY,
        FlowStore::DEFAULT_LOG_BYTES,
    )))
}

/// Names the failed handshake behind `no-key` / `auth-required` drops: the workload handshake
/// of the pair, else the node handshake with the remote node.
pub(super) fn auth_error_annotator(
    mesh: Arc<Mutex<MeshStatus>>,
    cluster_rx: watch::Receiver<Arc<ClusterState>>,
) -> crate::flows::Annotator {
    Box::new(move |f| {
        if !matches!(
            f.drop_reason.as_deref(),
            Some("no-key" | "auth-required" | "peer-unauthenticated")
        ) {
            return;
        }
        let (local, remote) = if f.direction == "egress" {
            (&f.src, &f.dst)
        } else {
            (&f.dst, &f.src)
        };
        let ip = match remote.ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V6(ip)) => match ip.to_ipv4_mapped() {
                Some(ip) => std::net::IpAddr::V4(ip),
                None => std::net::IpAddr::V6(ip),
            },
            Ok(ip) => ip,
            Err(_) => return,
        };
        let cluster = cluster_rx.borrow().clone();
        let Some(node) = cluster.nodes.iter().find(|n| {
            n.pod_cidrs().any(|c| {
                c.parse::<veil_transport::IpPrefix>()
                    .is_ok_and(|p| p.contains(ip))
            })
        }) else {
            return;
        };
        let st = mesh.lock().expect("mesh status lock");
        if let Some(e) = st.failure_for(local.identity, remote.identity, node.id) {
            f.auth_error = Some(e.to_string());
        }
    })
}

/// Drains the datapath's flow events into the flow store.
pub(super) async fn read_events(
    mut events: EventRing,
    node: String,
    flows: Arc<Mutex<FlowStore>>,
    cluster_rx: watch::Receiver<Arc<ClusterState>>,
) -> std::io::Result<()> {
    let offset = crate::flows::boot_offset_ns();
    loop {
        // A bounded batch per wake-up: a flood cannot monopolize the agent.
        let batch = events.next_batch(4096).await?;
        let state = cluster_rx.borrow().clone();
        {
            let mut store = flows.lock().expect("flow store lock");
            for ev in &batch {
                store.push(crate::flows::from_event(ev, &node, &state, offset));
            }
        }
        tokio::task::yield_now().await;
    }
}
