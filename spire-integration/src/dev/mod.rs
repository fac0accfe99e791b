//! The dev SPIRE server: the Workload and Delegated Identity APIs on one unix socket per node,
//! issuing from a certs-dev CA with TTL, rotation at half-life ± jitter, forced rotation,
//! revocation and CA rotation. The embedded default of the lab and the tests' double.

mod core;
mod server;

pub use self::core::{
    CaPhase, DevNodeConfig, DevServerConfig, DevSvidStatus, IssuedSvid, PodRegistration,
    RotateTarget, DEFAULT_SVID_TTL, MIN_SVID_TTL,
};
pub use server::DevServer;
