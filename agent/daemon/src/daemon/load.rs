//! daemon::load: loads this node's datapath. Mounts bpffs if absent, loads the programs with
//! their maps pinned under `pin_dir` (a restarted agent re-adopts counters, conntrack, policy
//! and auth entries) and writes `VEIL_CONFIG` from the config and the tunnel.

use veil_common::{config_flags, maps::DatapathConfig};

use crate::{
    cluster::Node,
    config::Config,
    datapath::{self, Datapath},
    tunnel::NodeTunnel,
};

/// Opens the datapath for node `me`, steering into `tunnel` when there is one.
pub(super) fn open_datapath(
    cfg: &Config,
    me: &Node,
    tunnel: Option<&NodeTunnel>,
    restarts: u64,
) -> Result<Datapath, datapath::Error> {
    let mut flags = 0;
    if cfg.encryption {
        flags |= config_flags::ENCRYPT;
    }
    if cfg.strict {
        flags |= config_flags::STRICT;
    }
    if cfg.node_encryption {
        flags |= config_flags::NODE_ENCRYPT;
    }
    let tunnel_ifindex = tunnel
        .and_then(|t| nix::net::if_::if_nametoindex(t.interface()).ok())
        .unwrap_or(0);
    let dp_cfg = DatapathConfig {
        flags,
        tunnel_ifindex,
        node_id: me.id,
        policy_slot: 0,
        hold_ifindex: 0,
        proxy_port: u32::from(cfg.proxy_port),
        wg_port: u32::from(cfg.listen_port),
        control_port: u32::from(cfg.control_port),
    };
    let datapath = Datapath::open(&cfg.bpffs, &cfg.pin_dir, dp_cfg, &cfg.map_max_entries)?;
    tracing::info!(
        node = %cfg.node, pin_dir = %cfg.pin_dir.display(), restarts,
        "datapath loaded (maps pinned, {} earlier start(s) re-adopted)", restarts
    );
    Ok(datapath)
}
