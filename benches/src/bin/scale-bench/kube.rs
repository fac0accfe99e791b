//! The simulated cluster as objects in the lab's real kube-apiserver (`--source kubernetes`):
//! Namespaces, Nodes (InternalIP and podCIDR, their status written as a kubelet would), Pods on
//! the simulated nodes (created, then given their address through the status subresource, as
//! the lab's kubelet does for its own pods; no process runs behind them) and one
//! CiliumNetworkPolicy per rule. The agents see them through their Kubernetes source: list,
//! watch, identities allocated as `VeilIdentity` objects.

use std::{path::Path, time::Instant};

use anyhow::Context as _;
use futures_util::{stream, StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Namespace, Node as KNode, Pod as KPod};
use kube::{
    api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
    Client,
};
use serde_json::{json, Value};
use veil_agent::cluster::{Node, Pod};

/// Requests in flight while populating: enough to keep the apiserver busy on two cores.
const IN_FLIGHT: usize = 32;

pub struct Sim {
    rt: tokio::runtime::Runtime,
    client: Client,
    cnp: ApiResource,
}

fn cnp_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "cilium.io",
        "v2",
        "CiliumNetworkPolicy",
    ))
}

/// What populating took.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Populated {
    pub requests: usize,
    pub seconds: f64,
}

impl Sim {
    /// A client with the lab's admin kubeconfig (through its loopback forwarder).
    pub fn connect(kubeconfig: &Path) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let client = rt.block_on(async {
            let kc = kube::config::Kubeconfig::read_from(kubeconfig)
                .with_context(|| format!("reading {}", kubeconfig.display()))?;
            let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
            anyhow::Ok(Client::try_from(cfg)?)
        })?;
        Ok(Sim {
            rt,
            client,
            cnp: cnp_resource(),
        })
    }

    /// Creates the namespaces, nodes, pods (with their addresses) and policies. Objects are
    /// created from the nodes to the policies, so the agents see pods on known nodes.
    pub fn populate(
        &self,
        namespaces: &[String],
        nodes: &[Node],
        pods: &[std::sync::Arc<Pod>],
        policies: &[Value],
    ) -> anyhow::Result<Populated> {
        let t = Instant::now();
        let mut requests = 0;
        self.rt.block_on(async {
            let ns_api: Api<Namespace> = Api::all(self.client.clone());
            requests += run_all(namespaces.iter(), |ns| {
                let api = ns_api.clone();
                async move {
                    let o = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
                    api.create(&PostParams::default(), &o)
                        .await
                        .with_context(|| format!("namespace {ns}"))?;
                    anyhow::Ok(1)
                }
            })
            .await?;
            let node_api: Api<KNode> = Api::all(self.client.clone());
            requests += run_all(nodes.iter(), |n| {
                let api = node_api.clone();
                async move {
                    let o = serde_json::from_value(json!({
                        "metadata": {"name": n.name},
                        "spec": {"podCIDR": n.pod_cidr, "podCIDRs": [n.pod_cidr]},
                    }))?;
                    api.create(&PostParams::default(), &o)
                        .await
                        .with_context(|| format!("node {}", n.name))?;
                    let status = json!({"status": {
                        "addresses": [{"type": "InternalIP", "address": n.underlay_ip.to_string()},
                                      {"type": "Hostname", "address": n.name}],
                        "conditions": [{"type": "Ready", "status": "True", "reason": "VeilScaleBench",
                                        "message": "simulated: no kubelet"}],
                    }});
                    api.patch_status(&n.name, &PatchParams::default(), &Patch::Merge(status))
                        .await
                        .with_context(|| format!("node {} status", n.name))?;
                    anyhow::Ok(2)
                }
            })
            .await?;
            requests += run_all(pods.iter(), |p| async move {
                self.create_pod(p).await?;
                self.set_pod_ip(p).await?;
                anyhow::Ok(2)
            })
            .await?;
            requests += run_all(policies.iter(), |o| async move {
                self.create_policy(o).await?;
                anyhow::Ok(1)
            })
            .await?;
            anyhow::Ok(())
        })?;
        Ok(Populated {
            requests,
            seconds: t.elapsed().as_secs_f64(),
        })
    }

    fn pods(&self, namespace: &str) -> Api<KPod> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// A Pod on its (simulated) node, with no address yet: not an endpoint.
    async fn create_pod(&self, p: &Pod) -> anyhow::Result<()> {
        let o = serde_json::from_value(json!({
            "metadata": {"name": p.name, "namespace": p.namespace, "labels": p.labels},
            "spec": {"nodeName": p.node, "serviceAccountName": p.service_account,
                     "automountServiceAccountToken": false,
                     "containers": [{"name": "main", "image": "veil.dev/scale-bench/none"}]},
        }))?;
        self.pods(&p.namespace)
            .create(&PostParams::default(), &o)
            .await
            .with_context(|| format!("pod {}/{}", p.namespace, p.name))?;
        Ok(())
    }

    /// The Pod's address in its status, as a kubelet reports it once the sandbox is up: from
    /// here on it is an endpoint.
    async fn set_pod_ip(&self, p: &Pod) -> anyhow::Result<()> {
        let ip = p.ip.to_string();
        let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
        self.pods(&p.namespace)
            .patch_status(&p.name, &PatchParams::default(), &Patch::Merge(status))
            .await
            .with_context(|| format!("pod {}/{} status", p.namespace, p.name))?;
        Ok(())
    }

    async fn create_policy(&self, o: &Value) -> anyhow::Result<()> {
        let obj: DynamicObject = serde_json::from_value(o.clone())?;
        let ns = obj
            .metadata
            .namespace
            .clone()
            .context("policy without namespace")?;
        Api::<DynamicObject>::namespaced_with(self.client.clone(), &ns, &self.cnp)
            .create(&PostParams::default(), &obj)
            .await
            .with_context(|| format!("policy {ns}/{}", obj.metadata.name.unwrap_or_default()))?;
        Ok(())
    }

    /// Replaces a policy's spec (a merge patch replaces its lists whole).
    pub fn replace_policy_spec(&self, o: &Value) -> anyhow::Result<()> {
        let ns = o["metadata"]["namespace"].as_str().context("namespace")?;
        let name = o["metadata"]["name"].as_str().context("name")?;
        self.rt.block_on(
            Api::<DynamicObject>::namespaced_with(self.client.clone(), ns, &self.cnp).patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": o["spec"]})),
            ),
        )?;
        Ok(())
    }

    /// Creates the Pod without an address (not timed: nothing is enforceable yet).
    pub fn add_pod(&self, p: &Pod) -> anyhow::Result<()> {
        self.rt.block_on(self.create_pod(p))
    }

    /// Gives an added Pod its address: the source's event the pod-add latency starts at.
    pub fn publish_pod(&self, p: &Pod) -> anyhow::Result<()> {
        self.rt.block_on(self.set_pod_ip(p))
    }
}

/// Runs `f` over `items`, `IN_FLIGHT` at a time; the sum of what they return (requests made).
async fn run_all<'a, T: 'a, F, Fut>(
    items: impl Iterator<Item = &'a T>,
    f: F,
) -> anyhow::Result<usize>
where
    F: Fn(&'a T) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<usize>>,
{
    stream::iter(items.map(f))
        .buffer_unordered(IN_FLIGHT)
        .try_fold(0, |n, k| async move { Ok(n + k) })
        .await
}
