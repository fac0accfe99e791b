//! daemon::keys: this node's static WireGuard key. Loads or creates it and publishes it when the
//! tunnel opens; rotates it every `key_rotation` (with mutual auth: publishes the next key a
//! lead ahead, then puts it on the device and re-runs the node handshakes).

use std::{sync::Arc, time::Duration};

use super::{state::Shared, Error};
use crate::{cluster::ClusterSource, config::Config, tunnel::NodeTunnel};

/// Opens the tunnel with this node's key (created on first start) and publishes its public key.
/// None when encryption is off.
pub(super) fn open_tunnel(
    cfg: &Config,
    source: &dyn ClusterSource,
) -> Result<Option<NodeTunnel>, Error> {
    if !cfg.encryption {
        tracing::warn!(
            "encryption is OFF: pod traffic to other nodes crosses the underlay in clear"
        );
        return Ok(None);
    }
    let key = crate::tunnel::load_or_create_key(&cfg.state_dir)?;
    let t = NodeTunnel::open(cfg, key)?;
    source
        .publish_node_key(&cfg.node, &t.public_key().to_base64(), None)
        .map_err(Error::Publish)?;
    tracing::info!(
        backend = t.backend().as_str(),
        interface = t.interface(),
        public_key = %t.public_key(),
        "tunnel ready"
    );
    Ok(Some(t))
}

/// With mutual auth, a node key is published this long before the node uses it: a peer
/// admits a node handshake only for the key the node published (§9.6a), and cluster state
/// reaches every agent well within it (the lab source polls every 250 ms).
const KEY_PUBLICATION_LEAD: Duration = Duration::from_secs(1);

/// A rotated key waiting for its publication lead: when to put it on the device, and the key.
pub(super) type PendingKey = (tokio::time::Instant, veil_transport::PrivateKey);

/// Starts a static key rotation. With mutual auth: publishes the new public key and returns
/// it for [`commit_node_key`] after [`KEY_PUBLICATION_LEAD`]. Without: rotates at once.
pub(super) fn rotate_node_key(s: &mut Shared) -> Option<PendingKey> {
    if s.key_rotation.is_some() {
        let key = veil_transport::PrivateKey::generate();
        let current = s.tunnel.as_ref()?.public_key().to_base64();
        let next = key.public_key().to_base64();
        if let Err(e) = s
            .source
            .publish_node_key(&s.cfg.node, &current, Some(&next))
        {
            tracing::warn!(error = %e, "cannot publish the next node key; keeping the current key");
            return None;
        }
        tracing::info!(public_key = %key.public_key(), "next node WireGuard key published");
        return Some((tokio::time::Instant::now() + KEY_PUBLICATION_LEAD, key));
    }
    let state_dir = s.cfg.state_dir.clone();
    let t = s.tunnel.as_mut()?;
    let started = std::time::Instant::now();
    let public = match t.rotate_key(&state_dir) {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "node key rotation failed; keeping the current key");
            return None;
        }
    };
    if let Err(e) = s
        .source
        .publish_node_key(&s.cfg.node, &public.to_base64(), None)
    {
        tracing::warn!(error = %e, "cannot publish the rotated node key");
    }
    tracing::info!(public_key = %public, took_us = started.elapsed().as_micros() as u64, "node WireGuard key rotated");
    None
}

/// Puts a published key on the device and re-runs the node handshakes with it.
pub(super) fn commit_node_key(s: &mut Shared, key: veil_transport::PrivateKey) {
    let state_dir = s.cfg.state_dir.clone();
    let Some(t) = s.tunnel.as_mut() else {
        return;
    };
    let started = std::time::Instant::now();
    let public = match t.rotate_key_to(&state_dir, key) {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "node key rotation failed; keeping the current key");
            // Publish the key in use again, so peers keep admitting its handshakes.
            let current = t.public_key();
            let _ = s
                .source
                .publish_node_key(&s.cfg.node, &current.to_base64(), None);
            return;
        }
    };
    // The next key is the current one now (a peer that has not read this yet still admits it
    // as the published next key).
    if let Err(e) = s
        .source
        .publish_node_key(&s.cfg.node, &public.to_base64(), None)
    {
        tracing::warn!(error = %e, "cannot publish the rotated node key");
    }
    if let Some((wg_key, rehandshake)) = &s.key_rotation {
        wg_key.store(Arc::new(public));
        let _ = rehandshake.try_send(());
    }
    tracing::info!(public_key = %public, took_us = started.elapsed().as_micros() as u64, "node WireGuard key rotated");
}
