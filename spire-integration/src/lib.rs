//! SPIRE integration.
//!
//! Owns: the SPIFFE Workload API client (node SVID, via the `spiffe` crate) and the SPIRE
//! Delegated Identity API client (SVIDs of the pods on this node, by selectors), with
//! reconnect under jittered capped backoff and last-good caching, publishing
//! `veil_identity::IdentitySnapshot`s ([`client`]); a dev server speaking the same gRPC
//! services on one unix socket per node, issuing from the certs-dev CA with TTL, rotation,
//! revocation and CA rotation ([`dev`]); and the protocol definitions both use ([`proto`],
//! generated at build time from this crate's own `.proto` files); and the configuration files
//! of real spire-server and spire-agent as veil runs them ([`conf`]).
//!
//! Must not depend on: the agent or the datapath.
//!
//! How the agent uses it (the lab starts the dev server; against a real spire-agent the client
//! takes its two sockets, `ClientConfig::spire_agent(socket_path, admin_socket_path)`, see
//! `tests/real_spire.rs`):
//!
//! ```no_run
//! # async fn demo() -> Result<(), veil_spire::Error> {
//! use std::time::Duration;
//! use veil_identity::{SelectorSet, SvidSource, TrustDomain};
//! use veil_spire::{
//!     ClientConfig, DevNodeConfig, DevServer, DevServerConfig, IdentityClient,
//!     PodRegistration, RotateTarget,
//! };
//!
//! let mut cfg = DevServerConfig::new(TrustDomain::new("lab.veil").unwrap());
//! cfg.svid_ttl = Duration::from_secs(30);
//! cfg.nodes.push(DevNodeConfig { name: "node-a".into(), socket: "/run/veil/node-a.sock".into() });
//! let dev = DevServer::start(cfg).await?;
//! dev.register_pod(PodRegistration {
//!     node: "node-a".into(),
//!     namespace: "shop".into(),
//!     name: "frontend".into(),
//!     service_account: "frontend".into(),
//! })?;
//!
//! // In the node agent:
//! let (client, identities) = IdentityClient::new(ClientConfig::new("/run/veil/node-a.sock"))?;
//! tokio::spawn(client.run(std::future::pending()));
//! identities.watch_workload(SelectorSet::k8s_pod("shop", "frontend", "frontend").unwrap());
//! let mut rx = identities.subscribe();
//! rx.changed().await.ok();
//! let snapshot = rx.borrow().clone();
//! for (slot, svid) in snapshot.svids() {
//!     println!("{slot:?} {} {} {:?}", svid.spiffe_id(), svid.serial(), svid.not_after());
//! }
//!
//! // `veil lab rotate --pod frontend` / `veil lab revoke --pod frontend`:
//! dev.rotate(RotateTarget::Pod { namespace: "shop".into(), name: "frontend".into() })?;
//! dev.revoke_pod("shop", "frontend")?;
//! dev.shutdown().await;
//! # Ok(()) }
//! ```

mod backoff;
mod cache;
pub mod cli;
pub mod client;
pub mod conf;
pub mod dev;
pub mod proto;
mod uds;

use std::path::PathBuf;

pub use backoff::BackoffConfig;
pub use client::{ClientConfig, IdentityClient, IdentityClientHandle};
pub use dev::{
    CaPhase, DevNodeConfig, DevServer, DevServerConfig, DevSvidStatus, PodRegistration,
    RotateTarget,
};

/// Errors of the SPIRE clients and the dev server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("binding unix socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unknown node {0:?}")]
    UnknownNode(String),
    #[error("unknown pod {0:?}")]
    UnknownPod(String),
    #[error("invalid spiffe id for pod")]
    PodId(#[source] veil_identity::IdError),
    #[error("invalid selectors for pod")]
    PodSelectors(#[source] veil_identity::SelectorError),
    #[error("issuing svid")]
    Issue(#[source] veil_certs_dev::Error),
    #[error("ca rotation step {wanted:?} is not possible in phase {phase:?}")]
    CaRotation {
        phase: CaPhase,
        wanted: &'static str,
    },
    #[error("connecting to {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("workload api call failed")]
    WorkloadApi(#[source] spiffe::WorkloadApiError),
    #[error("grpc call failed")]
    Rpc(#[source] Box<tonic::Status>),
    #[error("stream ended by the server")]
    StreamEnded,
    #[error("received svid is unusable")]
    BadSvid(#[source] veil_identity::SvidError),
    #[error("received trust domain name is invalid")]
    BadTrustDomain(#[source] veil_identity::IdError),
    #[error("received bundle is unusable")]
    BadBundle(#[source] veil_identity::BundleError),
}
