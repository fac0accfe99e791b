//! The lab's SPIRE stand-in: one process running the dev server (`veil_spire::DevServer`) with a
//! Workload + Delegated Identity API socket per node, every lab pod registered with the k8s
//! selectors a SPIRE agent would attest, and a control socket for `veil lab rotate` / `revoke`
//! and CA rotation.

use std::{path::PathBuf, sync::Arc, time::UNIX_EPOCH};

use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use veil_identity::TrustDomain;
use veil_spire::{DevNodeConfig, DevServer, DevServerConfig, PodRegistration, RotateTarget};

use super::{spec::LabSpec, LabPaths};
use crate::admin::{self, AdminRequest, AdminResponse, BoxFuture};

/// Errors starting the dev server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("trust domain {0:?}")]
    TrustDomain(String),
    #[error(transparent)]
    Spire(#[from] veil_spire::Error),
    #[error(transparent)]
    Admin(#[from] admin::Error),
}

/// `GET /v1/status` of the dev server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevStatus {
    pub trust_domain: String,
    pub ca_phase: String,
    pub svids: Vec<DevSvid>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevSvid {
    pub node: String,
    pub pod: Option<String>,
    pub spiffe_id: String,
    pub serial: String,
    pub not_after_unix: u64,
    pub rotate_at_unix: u64,
}

pub fn node_socket(paths: &LabPaths, node: &str) -> PathBuf {
    paths.root.join("spire").join(format!("{node}.sock"))
}

pub fn control_socket(paths: &LabPaths) -> PathBuf {
    paths.root.join("spire").join("control.sock")
}

/// Runs the dev server until killed: one CA per trust domain in the lab — the lab's, plus any
/// a node's `trust_domain` names (that node and its pods get SVIDs and a bundle from it only,
/// like a node attested by another SPIRE server).
pub async fn run(spec: &LabSpec, paths: &LabPaths) -> Result<(), Error> {
    let mut by_td: Vec<(String, Vec<&str>)> = vec![(spec.trust_domain.clone(), Vec::new())];
    for n in &spec.nodes {
        let td = n.trust_domain.as_deref().unwrap_or(&spec.trust_domain);
        match by_td.iter_mut().find(|(t, _)| t == td) {
            Some((_, nodes)) => nodes.push(&n.name),
            None => by_td.push((td.to_string(), vec![&n.name])),
        }
    }
    let _ = std::fs::create_dir_all(paths.root.join("spire"));
    let mut servers = Vec::new();
    for (td_name, nodes) in &by_td {
        let td = TrustDomain::new(td_name).map_err(|_| Error::TrustDomain(td_name.clone()))?;
        let mut cfg = DevServerConfig::new(td);
        cfg.svid_ttl = spec.svid_ttl;
        cfg.nodes = nodes
            .iter()
            .map(|n| DevNodeConfig {
                name: n.to_string(),
                socket: node_socket(paths, n),
            })
            .collect();
        let server = DevServer::start(cfg).await?;
        for p in spec
            .pods
            .iter()
            .filter(|p| nodes.contains(&p.node.as_str()))
        {
            let id = server.register_pod(PodRegistration {
                node: p.node.clone(),
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                service_account: p.service_account.clone(),
            })?;
            eprintln!("registered {} on {} as {id}", p.qualified_name(), p.node);
        }
        eprintln!(
            "dev SPIRE server up: trust domain {td_name} for {}, svid ttl {:?}",
            nodes.join(", "),
            spec.svid_ttl
        );
        servers.push(server);
    }
    if spec.federation {
        // Roots as they are at start: a CA rotation of one trust domain is not carried to the
        // others (the lab's federation has no bundle endpoint to poll).
        for s in &servers {
            for other in servers.iter().filter(|o| !std::ptr::eq(*o, s)) {
                s.federate_with(other.trust_domain(), other.bundle())?;
            }
            eprintln!("dev SPIRE server {}: federated", s.trust_domain());
        }
    }
    let handler: Arc<dyn admin::Handler> = Arc::new(Control {
        servers: Arc::new(servers),
    });
    admin::serve(&control_socket(paths), handler, std::future::pending()).await?;
    Ok(())
}

/// The control socket over every trust domain's server; the lab's own comes first (CA rotation
/// applies to it).
struct Control {
    servers: Arc<Vec<DevServer>>,
}

impl admin::Handler for Control {
    fn handle(&self, req: AdminRequest) -> BoxFuture {
        let servers = self.servers.clone();
        Box::pin(async move { control(&servers, &req) })
    }
}

/// The first server that accepts `op` (the lab's first), or the lab server's error.
fn on_owner<T>(
    lab: &DevServer,
    others: &[DevServer],
    op: impl Fn(&DevServer) -> Result<T, veil_spire::Error>,
) -> Result<T, veil_spire::Error> {
    op(lab).or_else(|e| others.iter().find_map(|s| op(s).ok()).ok_or(e))
}

fn unix(t: std::time::SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn control(servers: &[DevServer], req: &AdminRequest) -> AdminResponse {
    let Some((server, others)) = servers.split_first() else {
        return AdminResponse::error(StatusCode::SERVICE_UNAVAILABLE, "no dev server running");
    };
    let pod = req
        .query("pod")
        .and_then(|p| p.split_once('/'))
        .map(|(ns, n)| (ns.to_string(), n.to_string()));
    let result = match (&req.method, req.path.as_str()) {
        (&Method::GET, "/v1/status") => {
            let st = DevStatus {
                trust_domain: server.trust_domain().to_string(),
                ca_phase: format!("{:?}", server.ca_phase()),
                svids: servers
                    .iter()
                    .flat_map(|s| s.status())
                    .map(|s| DevSvid {
                        node: s.node,
                        pod: s.pod,
                        spiffe_id: s.spiffe_id.to_string(),
                        serial: s.serial,
                        not_after_unix: unix(s.not_after),
                        rotate_at_unix: unix(s.rotate_at),
                    })
                    .collect(),
            };
            return AdminResponse::json(&st);
        }
        (&Method::POST, "/v1/rotate") => {
            let target = match (pod, req.query("node"), req.query("all")) {
                (Some((namespace, name)), _, _) => RotateTarget::Pod { namespace, name },
                (None, Some(node), _) => RotateTarget::Node(node.to_string()),
                (None, None, Some(_)) => RotateTarget::All,
                _ => {
                    return AdminResponse::error(
                        StatusCode::BAD_REQUEST,
                        "say pod=ns/name, node=NAME or all=1",
                    )
                }
            };
            match target {
                RotateTarget::All => servers
                    .iter()
                    .try_fold(0, |n, s| s.rotate(RotateTarget::All).map(|m| n + m)),
                t => on_owner(server, others, |s| s.rotate(t.clone())),
            }
            .map(|n| serde_json::json!({ "rotated": n }))
        }
        // The lab's kubelet registers a Pod made with kubectl, with the selectors a SPIRE agent
        // would attest from its Pod object (namespace, service account, name).
        (&Method::POST, "/v1/register") => match (pod, req.query("node"), req.query("sa")) {
            (Some((namespace, name)), Some(node), Some(sa)) => on_owner(server, others, |s| {
                s.register_pod(PodRegistration {
                    node: node.to_string(),
                    namespace: namespace.clone(),
                    name: name.clone(),
                    service_account: sa.to_string(),
                })
            })
            .map(|id| serde_json::json!({ "registered": id.to_string() })),
            _ => {
                return AdminResponse::error(
                    StatusCode::BAD_REQUEST,
                    "say pod=ns/name, node=NAME and sa=NAME",
                )
            }
        },
        (&Method::POST, "/v1/revoke") => match pod {
            Some((ns, name)) => on_owner(server, others, |s| s.revoke_pod(&ns, &name))
                .map(|id| serde_json::json!({ "revoked": id.to_string() })),
            None => return AdminResponse::error(StatusCode::BAD_REQUEST, "say pod=ns/name"),
        },
        (&Method::POST, "/v1/ca/prepare") => server
            .ca_prepare()
            .map(|()| serde_json::json!({ "ca": "prepared" })),
        (&Method::POST, "/v1/ca/activate") => server
            .ca_activate()
            .map(|()| serde_json::json!({ "ca": "activated" })),
        (&Method::POST, "/v1/ca/revoke") => server
            .ca_revoke()
            .map(|()| serde_json::json!({ "ca": "old root revoked" })),
        (_, path) => {
            return AdminResponse::error(StatusCode::NOT_FOUND, &format!("no route {path}"))
        }
    };
    match result {
        Ok(v) => AdminResponse::json(&v),
        Err(e) => AdminResponse::error(StatusCode::BAD_REQUEST, &crate::error_chain(&e)),
    }
}
