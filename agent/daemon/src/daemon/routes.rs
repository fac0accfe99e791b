//! daemon::routes: the admin API's routes (`/v1/status`, `/metrics`, `/v1/flows`, `/v1/auth`,
//! `/v1/audit`, `/v1/peers/…`). The HTTP server itself is `crate::admin`; answers come from
//! `status`, `metrics`, the flow store, the mesh and `reconcile`.

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
    mesh::{AuthQuery, AuthQueryRequest},
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
                (Method::GET, "/v1/auth") => {
                    let asked = {
                        let s = shared.lock().expect("agent state lock");
                        auth_query(&req, &s.cluster).and_then(|q| Ok((q, mesh_of(&s)?)))
                    };
                    match asked {
                        Ok((q, mesh)) => ask_mesh(q, &mesh).await,
                        Err(refused) => refused,
                    }
                }
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

/// How long `GET /v1/auth` waits for the mesh loop's answer.
const MESH_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// `GET /v1/auth?pod=NS/NAME|identity=N&peer_node=NODE&state=STATE&limit=N`: the query, its
/// names resolved against this agent's cluster state; or what is wrong with it.
fn auth_query(
    req: &AdminRequest,
    cluster: &crate::cluster::ClusterState,
) -> Result<AuthQuery, AdminResponse> {
    let bad = |m: String| AdminResponse::error(StatusCode::BAD_REQUEST, &m);
    let not_found = |m: String| AdminResponse::error(StatusCode::NOT_FOUND, &m);
    const KEYS: [&str; 5] = ["pod", "identity", "peer_node", "state", "limit"];
    if let Some((k, _)) = req.query.iter().find(|(k, _)| !KEYS.contains(&k.as_str())) {
        return Err(bad(format!(
            "unknown parameter {k:?} (expected {})",
            crate::config::one_of(&KEYS)
        )));
    }
    fn number<T: std::str::FromStr>(req: &AdminRequest, k: &str) -> Result<Option<T>, String> {
        req.query(k)
            .map(|v| v.parse().map_err(|_| format!("{k}: {v:?} is not a number")))
            .transpose()
    }
    let mut q = AuthQuery {
        identity: number(req, "identity").map_err(bad)?,
        limit: number(req, "limit").map_err(bad)?,
        ..AuthQuery::default()
    };
    if let Some(p) = req.query("pod") {
        if q.identity.is_some() {
            return Err(bad("pod and identity: give one of them".into()));
        }
        let pod = find_pod(cluster, p).map_err(|e| match e {
            FindPod::None => not_found(format!("pod: no pod {p:?} in the cluster")),
            FindPod::Several(n) => bad(format!(
                "pod: {n} pods are named {p:?}: give it as namespace/name"
            )),
        })?;
        q.identity = Some(pod.identity);
    }
    if let Some(n) = req.query("peer_node") {
        let node = cluster
            .node(n)
            .ok_or_else(|| not_found(format!("peer_node: no node {n:?} in the cluster")))?;
        q.node = Some(node.id);
    }
    q.state = req
        .query("state")
        .map(|v| v.parse().map_err(|e| bad(format!("state: {e}"))))
        .transpose()?;
    Ok(q)
}

/// Where `GET /v1/auth` is answered: the mesh, which runs only with mutual authentication.
fn mesh_of(s: &Shared) -> Result<tokio::sync::mpsc::Sender<AuthQueryRequest>, AdminResponse> {
    s.mesh_queries.clone().ok_or_else(|| {
        AdminResponse::error(
            StatusCode::CONFLICT,
            "mutual authentication is off on this node: it holds no auth pairs",
        )
    })
}

enum FindPod {
    None,
    Several(usize),
}

/// The pod `namespace/name`, or the one pod called `name` in any namespace.
fn find_pod<'a>(
    cluster: &'a crate::cluster::ClusterState,
    p: &str,
) -> Result<&'a crate::cluster::Pod, FindPod> {
    let (ns, name) = match p.split_once('/') {
        Some((ns, name)) => (Some(ns), name),
        None => (None, p),
    };
    let mut found = cluster
        .pods
        .iter()
        .filter(|pod| pod.name == name && ns.is_none_or(|ns| pod.namespace == ns));
    match (found.next(), found.count()) {
        (None, _) => Err(FindPod::None),
        (Some(pod), 0) => Ok(pod),
        (Some(_), more) => Err(FindPod::Several(more + 1)),
    }
}

/// Asks the mesh loop, which holds the whole auth table.
async fn ask_mesh(
    q: AuthQuery,
    mesh: &tokio::sync::mpsc::Sender<AuthQueryRequest>,
) -> AdminResponse {
    let unavailable = |m: &str| AdminResponse::error(StatusCode::SERVICE_UNAVAILABLE, m);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let asked = async {
        mesh.send((q, tx)).await.ok()?;
        rx.await.ok()
    };
    match tokio::time::timeout(MESH_ANSWER_TIMEOUT, asked).await {
        Ok(Some(list)) => AdminResponse::json(&list),
        Ok(None) => unavailable("the mesh is not running"),
        Err(_) => unavailable(&format!(
            "the mesh did not answer within {} s",
            MESH_ANSWER_TIMEOUT.as_secs()
        )),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cluster::{ClusterState, Node, Pod},
        mesh::PairState,
    };

    /// `GET /v1/auth?QUERY`, its values already decoded.
    fn get(query: &str) -> AdminRequest {
        AdminRequest {
            method: Method::GET,
            path: "/v1/auth".into(),
            query: query
                .split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (k.to_string(), v.to_string())
                })
                .collect(),
            body: Default::default(),
        }
    }

    /// The refusal's status and message.
    fn refused(r: Result<AuthQuery, AdminResponse>) -> (StatusCode, String) {
        match r {
            Ok(q) => panic!("accepted: {q:?}"),
            Err(e) => (e.status, String::from_utf8_lossy(&e.body).into_owned()),
        }
    }

    #[test]
    fn an_auth_query_resolves_its_names_and_refuses_what_it_cannot_read() {
        let other_frontend = Pod {
            namespace: "web".into(),
            ..Pod::for_test("frontend", "b", [198, 19, 2, 11], 259)
        };
        let cluster = ClusterState {
            nodes: vec![Node::for_test("a", 1), Node::for_test("b", 2)],
            pods: crate::cluster::pod_list([
                Pod::for_test("frontend", "a", [198, 19, 1, 10], 256),
                Pod::for_test("backend", "b", [198, 19, 2, 10], 257),
                other_frontend,
            ]),
            ..ClusterState::default()
        };
        let q = |query: &str| auth_query(&get(query), &cluster);
        assert_eq!(q("").ok(), Some(AuthQuery::default()));
        assert_eq!(
            q("pod=shop/frontend&peer_node=b&state=failing&limit=5").ok(),
            Some(AuthQuery {
                identity: Some(256),
                node: Some(2),
                state: Some(PairState::Failing),
                limit: Some(5),
            })
        );
        let identity = |query| q(query).ok().and_then(|q| q.identity);
        assert_eq!(identity("pod=backend"), Some(257));
        assert_eq!(identity("identity=300"), Some(300));
        const BAD: StatusCode = StatusCode::BAD_REQUEST;
        const MISSING: StatusCode = StatusCode::NOT_FOUND;
        for (query, status, says) in [
            ("pod=frontend", BAD, "2 pods are named"),
            ("pod=shop/nosuch", MISSING, "no pod"),
            ("peer_node=c", MISSING, "no node"),
            ("state=done", BAD, "authenticated, failing or pending"),
            ("limit=-1", BAD, "limit: \\\"-1\\\" is not a number"),
            ("identity=x", BAD, "identity: \\\"x\\\" is not"),
            ("pod=backend&identity=1", BAD, "give one of them"),
            ("pdo=backend", BAD, "unknown parameter \\\"pdo\\\""),
        ] {
            let (got, message) = refused(q(query));
            assert_eq!(got, status, "{query:?}: {message}");
            assert!(message.contains(says), "{query:?}: {message}");
        }
    }
}
