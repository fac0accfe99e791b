//! daemon::mutual_auth: the mesh (node and workload handshakes over mTLS control channels, the
//! auth map's writer) and the hold device where flows missing auth wait. Built only with a
//! tunnel, identities and `mutual_auth`; otherwise tunnel keys come from cluster state.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use tokio::sync::{mpsc, watch};
use veil_spire::IdentityClientHandle;

use super::Error;
use crate::{
    auth::AuthTriple,
    cluster::{ClusterState, Node},
    config::Config,
    datapath::{self, Datapath},
    mesh::{Mesh, MeshConfig, MeshStatus, PeerKeys},
    tunnel::NodeTunnel,
};

/// The hold device's name inside the node's network namespace.
pub const HOLD_DEVICE: &str = "veil-hold";

/// The hold device and the mesh handles its loop needs.
pub(super) type HoldParts = (
    tun_rs::SyncDevice,
    mpsc::Sender<AuthTriple>,
    watch::Receiver<BTreeSet<AuthTriple>>,
);

/// The mesh and what the rest of the agent keeps of it.
pub(super) struct MutualAuth {
    pub(super) mesh: Mesh,
    /// Peer keys from authenticated node handshakes, for the tunnel.
    pub(super) keys: watch::Receiver<BTreeMap<String, PeerKeys>>,
    pub(super) status: Arc<Mutex<MeshStatus>>,
    /// `veil auth list`'s queries, answered by the mesh loop from its whole table.
    pub(super) queries: mpsc::Sender<crate::mesh::AuthQueryRequest>,
    /// None if the device could not be made: a flow missing auth is then dropped.
    pub(super) hold: Option<HoldParts>,
    /// Where node handshakes read the node's public key, and how to make them re-run (static
    /// key rotation).
    pub(super) key_rotation: (
        Arc<arc_swap::ArcSwap<veil_transport::PublicKey>>,
        mpsc::Sender<()>,
    ),
}

impl MutualAuth {
    /// The mesh for node `me`, taking the auth map from `datapath`; None unless there is a
    /// tunnel, identities and `mutual_auth` is on.
    pub(super) fn new(
        cfg: &Config,
        datapath: &mut Datapath,
        cluster: &ClusterState,
        me: &Node,
        tunnel: Option<&NodeTunnel>,
        identities: Option<&IdentityClientHandle>,
    ) -> Result<Option<Self>, Error> {
        let t = match (tunnel, identities) {
            (Some(t), Some(_)) if cfg.mutual_auth => t,
            _ => {
                if cfg.mutual_auth && cfg.encryption {
                    tracing::warn!("mutual auth needs identities (spire_socket): tunnel keys come from cluster state");
                }
                return Ok(None);
            }
        };
        let auth_map = datapath::auth_map::AuthMap::take(datapath)?;
        let td = veil_identity::TrustDomain::new(&cluster.trust_domain)
            .map_err(|_| Error::TrustDomain(cluster.trust_domain.clone()))?;
        let mcfg = MeshConfig {
            node: cfg.node.clone(),
            node_id: me.id,
            trust_domain: td,
            underlay_ip: me.underlay_ip,
            port: cfg.control_port,
            allow_classical: cfg.allow_classical_kx,
            rekey_interval: cfg.psk_rotation,
        };
        let (mesh, handles) = Mesh::new(mcfg, auth_map, t.public_key());
        tracing::info!(
            port = cfg.control_port,
            "mutual auth on: tunnel keys come only from authenticated node handshakes"
        );
        // The hold device: flows missing auth wait here instead of being dropped.
        let hold = match tun_rs::DeviceBuilder::new()
            .name(HOLD_DEVICE)
            .mtu(cfg.mtu)
            .enable(false)
            .build_sync()
            .and_then(|dev| {
                veil_transport::enable_without_link_local(&dev, HOLD_DEVICE)?;
                Ok(dev)
            }) {
            Ok(dev) => {
                let ifindex = nix::net::if_::if_nametoindex(HOLD_DEVICE).unwrap_or(0);
                let mut cm = datapath.config_map()?;
                let mut c = cm.get()?;
                c.hold_ifindex = ifindex;
                cm.set(c)?;
                Some((dev, handles.requests.clone(), handles.authenticated.clone()))
            }
            Err(e) => {
                tracing::warn!(error = %e, "no hold device: a flow missing auth is dropped until its pair authenticates");
                None
            }
        };
        Ok(Some(Self {
            mesh,
            keys: handles.keys,
            status: handles.status,
            queries: handles.queries,
            hold,
            key_rotation: (handles.wg_key, handles.rehandshake),
        }))
    }
}
