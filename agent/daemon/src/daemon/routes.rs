//! daemon::routes: the admin API's routes (`/v1/status`, `/metrics`, `/v1/flows`, `/v1/audit`,
//! `/v1/peers/…`). The HTTP server itself is `crate::admin`; answers come from `status`,
//! `metrics`, the flow store and `reconcile`.

use std::sync::{Arc, Mutex};

use hyper::{Method, StatusCode};
use veil_common::config_flags;

use super::{
    metrics,
    reconcile::reconcile,
    state::{unix_now, Shared},
    status::status,
};
use crate::{
    admin::{self, AdminRequest, AdminResponse, BoxFuture},
    flows::FlowStore,
};

/// The admin API's routes over the agent's state and flow store.
pub(super) struct Routes {
    shared: Arc<Mutex<Shared>>,
    flows: Arc<Mutex<FlowStore>>,
}

impl Routes {
    pub(super) fn new(shared: Arc<Mutex<Shared>>, flows: Arc<Mutex<FlowStore>>) -> Self {
        Self { shared, flows }
    }
}

impl admin::Handler for Routes {
    fn handle(&self, req: AdminRequest) -> BoxFuture {
        let shared = self.shared.clone();
        let flows = self.flows.clone();
        Box::pin(async move {
            match (req.method.clone(), req.path.as_str()) {
                (Method::GET, "/v1/flows") => match flow_filter(&req) {
                    Ok(f) => AdminResponse::json(&flows.lock().expect("flow store lock").query(&f)),
                    Err(e) => AdminResponse::error(StatusCode::BAD_REQUEST, &e),
                },
                (Method::POST, "/v1/audit") => set_audit(
                    &mut shared.lock().expect("agent state lock"),
                    req.query("on"),
                ),
                (Method::GET, "/v1/status") => {
                    match status(&mut shared.lock().expect("agent state lock")) {
                        Ok(st) => AdminResponse::json(&st),
                        Err(e) => {
                            AdminResponse::error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
                        }
                    }
                }
                // Ready: the agent answers and can read its datapath's state (it only serves once
                // the datapath is attached and the first cluster snapshot is in).
                (Method::GET, "/readyz") => {
                    match status(&mut shared.lock().expect("agent state lock")) {
                        Ok(_) => AdminResponse::text(StatusCode::OK, "ready\n".into()),
                        Err(e) => AdminResponse::error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            &format!("not ready: {e}"),
                        ),
                    }
                }
                (Method::GET, "/metrics") => {
                    let totals = flows.lock().expect("flow store lock").totals().clone();
                    match status(&mut shared.lock().expect("agent state lock")) {
                        Ok(st) => AdminResponse::text(
                            StatusCode::OK,
                            metrics::render(st, &totals, unix_now()),
                        ),
                        Err(e) => {
                            AdminResponse::error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
                        }
                    }
                }
                (Method::POST, path) if path.starts_with("/v1/peers/") => {
                    peer_switch(&mut shared.lock().expect("agent state lock"), path)
                }
                (_, path) => {
                    AdminResponse::error(StatusCode::NOT_FOUND, &format!("no route {path}"))
                }
            }
        })
    }
}

fn flow_filter(req: &AdminRequest) -> Result<crate::flows::Filter, String> {
    let num = |k: &str| -> Result<Option<u64>, String> {
        req.query(k)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| format!("{k}: {v:?} is not a number"))
            })
            .transpose()
    };
    let verdict = req
        .query("verdict")
        .map(|v| v.parse().map_err(|e| format!("verdict: {e}")))
        .transpose()?;
    let kind = req
        .query("type")
        .map(|v| v.parse().map_err(|e| format!("type: {e}")))
        .transpose()?;
    Ok(crate::flows::Filter {
        kind,
        verdict,
        pod: req.query("pod").map(str::to_string),
        namespace: req.query("namespace").map(str::to_string),
        protocol: req.query("protocol").map(str::to_string),
        since_unix_ns: num("since_unix_ns")?,
        after_seq: num("after_seq")?,
        limit: num("limit")?.map(|l| l as usize),
    })
}

/// `POST /v1/audit?on=true|false`: node-wide audit mode.
fn set_audit(s: &mut Shared, on: Option<&str>) -> AdminResponse {
    let on = match on {
        Some("true" | "1" | "on") => true,
        Some("false" | "0" | "off") => false,
        other => {
            return AdminResponse::error(
                StatusCode::BAD_REQUEST,
                &format!("on: expected true or false, got {other:?}"),
            )
        }
    };
    let r = s.datapath.config_map().and_then(|mut cm| {
        let mut c = cm.get()?;
        if on {
            c.flags |= config_flags::AUDIT;
        } else {
            c.flags &= !config_flags::AUDIT;
        }
        cm.set(c)
    });
    match r {
        Ok(()) => {
            s.audit = on;
            tracing::info!(audit = on, "node audit mode changed");
            AdminResponse::json(&serde_json::json!({ "node": s.cfg.node, "audit": on }))
        }
        Err(e) => AdminResponse::error(StatusCode::INTERNAL_SERVER_ERROR, &crate::error_chain(&e)),
    }
}

/// `POST /v1/peers/<node>/disable|enable`: take a peer off the tunnel (and out of HAS_KEY) or put
/// it back. For operators and for the strict-mode test.
fn peer_switch(s: &mut Shared, path: &str) -> AdminResponse {
    let rest = &path["/v1/peers/".len()..];
    let Some((node, action)) = rest.split_once('/') else {
        return AdminResponse::error(
            StatusCode::NOT_FOUND,
            "expected /v1/peers/<node>/disable|enable",
        );
    };
    if s.cluster.node(node).is_none() || node == s.cfg.node {
        return AdminResponse::error(StatusCode::NOT_FOUND, &format!("no peer node {node:?}"));
    }
    let Some(t) = s.tunnel.as_mut() else {
        return AdminResponse::error(
            StatusCode::CONFLICT,
            "encryption is off: there are no tunnel peers",
        );
    };
    match action {
        "disable" => t.disable_peer(node),
        "enable" => t.enable_peer(node),
        other => {
            return AdminResponse::error(
                StatusCode::NOT_FOUND,
                &format!("unknown action {other:?}"),
            )
        }
    }
    match reconcile(s) {
        Ok(()) => {
            AdminResponse::json(&serde_json::json!({ "node": node, "action": action, "ok": true }))
        }
        Err(e) => AdminResponse::error(StatusCode::INTERNAL_SERVER_ERROR, &crate::error_chain(&e)),
    }
}
