//! daemon::identity: the SPIRE client that delivers this node's SVID and its pods' (Workload API
//! and Delegated Identity API), built from `spire_socket` / `spire_admin_socket`.

use veil_spire::{ClientConfig, IdentityClient, IdentityClientHandle};

use super::Error;
use crate::config::Config;

/// The identity client to run and the handle that reads its SVIDs; both None without a SPIRE
/// socket (no identities, so no mutual auth).
pub(super) fn open_client(
    cfg: &Config,
) -> Result<(Option<IdentityClient>, Option<IdentityClientHandle>), Error> {
    let Some(socket) = &cfg.spire_socket else {
        tracing::warn!("no SPIRE socket configured: no identities, mutual auth impossible");
        return Ok((None, None));
    };
    let client_cfg = match &cfg.spire_admin_socket {
        Some(admin) => {
            tracing::info!(workload = %socket.display(), admin = %admin.display(), "identities from a spire-agent (Workload API + Delegated Identity API on its admin socket)");
            ClientConfig::spire_agent(socket, admin)
        }
        None => {
            tracing::info!(socket = %socket.display(), "identities from SPIRE (Workload + Delegated Identity API)");
            ClientConfig::new(socket)
        }
    };
    let (client, handle) = IdentityClient::new(client_cfg).map_err(Error::Spire)?;
    Ok((Some(client), Some(handle)))
}
