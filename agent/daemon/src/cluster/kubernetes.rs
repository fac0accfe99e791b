//! cluster::kubernetes: cluster state from the Kubernetes API.
//!
//! Reflectors (kube-runtime: list, then watch from the last resourceVersion, relist on
//! `410 Gone`, bounded backoff) keep local caches of Nodes, Pods, Namespaces, `CiliumNetworkPolicy`,
//! `CiliumClusterwideNetworkPolicy` and veil's `VeilIdentity` (without their managed fields;
//! Pods only as the endpoints they make, [`PodCache`]; policies only as their parse and this
//! node's verdict, [`PolicyCache`], parsed once per spec generation); every change rebuilds one
//! [`ClusterState`] snapshot from the caches. While
//! the apiserver or etcd is down the caches, and so the snapshot in force, stay as they were:
//! the agent keeps enforcing its last state.
//!
//! - **Nodes**: a Node with an IPv4 `InternalIP` and `spec.podCIDR` is a veil node; its id is
//!   its InternalIP as a number (unique in the cluster, the same on every agent); its WireGuard
//!   keys are the annotations [`WG_KEY_ANNOTATION`] and [`WG_NEXT_KEY_ANNOTATION`], which each
//!   agent writes on its own Node ([`ClusterSource::publish_node_key`]).
//! - **Pods**: a Pod scheduled on a node, with an IPv4 `status.podIP`, not on the host network
//!   and not terminating; its host-side interface is [`host_veth_name`] (what `veil-cni` names
//!   it).
//! - **Namespaces**: their labels are part of the identity of every pod in them, as
//!   `io.cilium.k8s.namespace.labels.<key>` (Cilium's keys, so namespace selectors written for
//!   Cilium work): relabelling a namespace moves its pods to new identities. A pod whose
//!   namespace is not in the cache yet is left out until it is (unknown identity: fail closed).
//! - **Identities**: one cluster-scoped `VeilIdentity` per identity label set, named by the
//!   number. The number is a hash of the labels probed linearly on collision
//!   ([`identity_candidates`]), so agents racing to allocate the same labels try the same name
//!   first and end with one object (create-if-absent: the loser reads the winner's). Each agent
//!   keeps `status.lastSeen` of the identities its own pods carry fresh (rewritten once it is
//!   older than a quarter of [`IDENTITY_GC_AGE`]); an identity no pod in this agent's cache
//!   carries, created and last seen more than [`IDENTITY_GC_AGE`] ago, is deleted (with the uid
//!   as precondition). So an agent whose pod cache lags does not delete an identity another
//!   node still uses; an agent that still needs a deleted one recreates it under the same
//!   number.
//! - **Policies**: each CNP/CCNP is parsed with the same strict parser as `veil policy apply`;
//!   one veil cannot enforce (e.g. an HTTP rule whose path does not compile) is refused and the
//!   previous accepted version of it stays in force. Each agent writes its verdict into the
//!   policy's `status.nodes.<node>` (as Cilium does).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use futures_util::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace as KNamespace, Node as KNode, Pod as KPod, Service as KService},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use kube::{
    api::{
        Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams,
        PostParams, Preconditions,
    },
    runtime::{
        reflector::{self, Store},
        watcher, WatchStreamExt as _,
    },
    Client,
};
use serde_json::json;
use tokio::sync::{mpsc, watch, Notify};

use super::{ClusterSource, ClusterState, Error, Identity, Node, Pod, WatchFuture};
use crate::policy::{IdentityKey, Policy, PolicyName};

/// The Node annotation holding a node's WireGuard public key (base64).
pub const WG_KEY_ANNOTATION: &str = "veil.dev/wg-public-key";
/// The Node annotation holding the key a node will use next, ahead of a static key rotation.
pub const WG_NEXT_KEY_ANNOTATION: &str = "veil.dev/wg-next-public-key";
/// veil's API group and version (the `VeilIdentity` CRD).
pub const API_GROUP: &str = "veil.dev";
pub const API_VERSION: &str = "v1alpha1";
/// How old an unused identity must be before an agent deletes it: longer than a Pod takes to
/// reach every agent's cache after the identity was created for it.
pub const IDENTITY_GC_AGE: Duration = Duration::from_secs(120);
/// Numbers are `FIRST_CLUSTER + hash mod IDENTITY_SPACE`.
const IDENTITY_SPACE: u32 = 1 << 24;
/// At most one rebuild starts per this interval: the first change after a quiet interval is
/// built at once (a pod added waits for no timer), and changes arriving while a rebuild is
/// recent are folded into the next one.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// A rebuild that could not finish (an identity not allocated, a status not written: the API is
/// unreachable) is retried after this long.
const RETRY: Duration = Duration::from_secs(2);
/// How long one pass writes policy verdicts before the builder looks at the caches again: a
/// first apply or a restart has thousands to write (10,000 at one a request), and a policy
/// change must not wait behind them (it did, past two minutes, with a slow apiserver).
const VERDICT_SLICE: Duration = Duration::from_millis(250);

/// What a pass of verdict writes left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdicts {
    Written,
    /// A write failed: tried again after [`RETRY`] or a change.
    Failed,
    /// The slice ended first: the next pass goes on at once (after a rebuild, which decides
    /// again what is still to write).
    More,
}

/// Where the Kubernetes source connects and what it adds to the snapshot.
#[derive(Debug, Clone)]
pub struct KubeConfig {
    /// A kubeconfig file; `None`: in-cluster (service account) or the usual inference.
    pub kubeconfig: Option<PathBuf>,
    /// The cluster name (the agent config's `cluster`).
    pub cluster: String,
    /// The SPIFFE trust domain of the cluster's workloads.
    pub trust_domain: String,
    /// This agent's node: the key it publishes goes on this Node, its policy verdicts under
    /// this name in policy statuses.
    pub node: String,
    /// How old an unused identity must be before it is deleted ([`IDENTITY_GC_AGE`]).
    pub identity_gc_age: Duration,
}

/// The cluster source backed by the Kubernetes API.
pub struct KubeSource {
    cfg: KubeConfig,
    keys_tx: mpsc::UnboundedSender<NodeKeys>,
    keys_rx: Mutex<Option<mpsc::UnboundedReceiver<NodeKeys>>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeKeys {
    node: String,
    current: String,
    next: Option<String>,
}

impl KubeSource {
    pub fn new(cfg: KubeConfig) -> Self {
        let (keys_tx, keys_rx) = mpsc::unbounded_channel();
        Self {
            cfg,
            keys_tx,
            keys_rx: Mutex::new(Some(keys_rx)),
        }
    }

    async fn client(&self) -> Result<Client, Error> {
        let config = match &self.cfg.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| kube_error(format!("kubeconfig {}: {e}", path.display())))?;
                kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .map_err(|e| kube_error(format!("kubeconfig {}: {e}", path.display())))?
            }
            None => kube::Config::infer()
                .await
                .map_err(|e| kube_error(format!("no Kubernetes configuration: {e}")))?,
        };
        super::apiserver::client(config).map_err(|e| kube_error(format!("Kubernetes client: {e}")))
    }

    async fn start(&self) -> Result<watch::Receiver<Arc<ClusterState>>, Error> {
        let client = self.client().await?;
        let changed = Arc::new(Notify::new());
        let caches = Caches::start(&client, &changed, &self.cfg.node);
        caches
            .wait_until_ready()
            .await
            .map_err(|_| kube_error("a Kubernetes watch ended before its first list".into()))?;
        let mut builder = Builder::new(client.clone(), self.cfg.clone(), caches);
        let (first, complete) = builder.build().await;
        let (tx, rx) = watch::channel(first);
        tokio::spawn(builder.run(tx, changed, complete));
        if let Some(keys_rx) = self.keys_rx.lock().expect("keys receiver lock").take() {
            tokio::spawn(publish_keys(Api::all(client), keys_rx));
        }
        Ok(rx)
    }
}

impl ClusterSource for KubeSource {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    fn watch(&self) -> WatchFuture<'_> {
        Box::pin(self.start())
    }

    /// Queues the annotation patch on this node's Node; a background task writes the newest
    /// queued keys, retrying while the apiserver is unreachable.
    fn publish_node_key(&self, node: &str, current: &str, next: Option<&str>) -> Result<(), Error> {
        self.keys_tx
            .send(NodeKeys {
                node: node.to_owned(),
                current: current.to_owned(),
                next: next.map(str::to_owned),
            })
            .map_err(|_| kube_error("the node-key publisher has stopped".into()))
    }
}

fn kube_error(message: String) -> Error {
    Error::Kubernetes(message)
}

/// Writes node keys as Node annotations: the newest queued, retried with backoff until written.
async fn publish_keys(nodes: Api<KNode>, mut rx: mpsc::UnboundedReceiver<NodeKeys>) {
    const BACKOFF: veil_common::backoff::Backoff =
        veil_common::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    while let Some(mut keys) = rx.recv().await {
        for attempt in 0u32.. {
            while let Ok(newer) = rx.try_recv() {
                keys = newer;
            }
            let patch = json!({"metadata": {"annotations": {
                WG_KEY_ANNOTATION: keys.current,
                WG_NEXT_KEY_ANNOTATION: keys.next,
            }}});
            match nodes
                .patch(&keys.node, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    tracing::info!(node = %keys.node, "published the node key on the Node");
                    break;
                }
                Err(e) => {
                    let wait = BACKOFF.jittered(attempt, rand::random());
                    tracing::warn!(node = %keys.node, error = %e, ?wait, "cannot publish the node key; retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// The reflectors' caches.
struct Caches {
    /// Changes of what the snapshot's pod list is made of (Pods, Namespaces' labels,
    /// identities), counted: while the count stands, the builder reuses the last list.
    endpoint_inputs: Changed,
    /// Of those, the changes of what a pod's identity is derived from besides the pod
    /// (Namespaces' labels, identities): while this count stands, a cached pod keeps the
    /// identity the builder gave it, and only new or changed pods are derived again.
    identity_inputs: Changed,
    /// Changes of the policies (specs of CNPs, CCNPs, NetworkPolicies; policies added or
    /// gone): while the count stands, a rebuild does not go through 10,000 policies again.
    policy_inputs: Changed,
    nodes: NodeCache,
    pods: PodCache,
    namespaces: Store<KNamespace>,
    cnps: PolicyCache,
    ccnps: PolicyCache,
    netpols: Store<NetworkPolicy>,
    identities: Store<DynamicObject>,
    services: Store<KService>,
    slices: Store<EndpointSlice>,
    /// The `VeilIdentity` custom resource's API description (the policy caches hold theirs).
    identity_resource: ApiResource,
}

/// A custom resource's API description.
fn custom_resource(group: &str, version: &str, kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind))
}

impl Caches {
    fn start(client: &Client, notify: &Arc<Notify>, node: &str) -> Self {
        let identity_resource = custom_resource(API_GROUP, API_VERSION, "VeilIdentity");
        let cilium = |kind| custom_resource("cilium.io", "v2", kind);
        let endpoint_inputs = Changed::new(notify);
        let identity_inputs = Changed::within(&endpoint_inputs);
        let policy_inputs = Changed::new(notify);
        // The other caches' changes wake the builder without being counted.
        let changed = &Changed::new(notify);
        Self {
            nodes: NodeCache::start(Api::<KNode>::all(client.clone()), changed),
            pods: PodCache::start(Api::<KPod>::all(client.clone()), node, &endpoint_inputs),
            namespaces: reflect(
                Api::<KNamespace>::all(client.clone()),
                (),
                &identity_inputs,
                labels_of_namespace,
                without_managed_fields,
            ),
            // Spec changes only: every node writes its verdict into a policy's status, and
            // each write would otherwise rebuild the snapshot on every node.
            cnps: PolicyCache::start(client, &cilium("CiliumNetworkPolicy"), node, &policy_inputs),
            ccnps: PolicyCache::start(
                client,
                &cilium("CiliumClusterwideNetworkPolicy"),
                node,
                &policy_inputs,
            ),
            netpols: reflect(
                Api::<NetworkPolicy>::all(client.clone()),
                (),
                &policy_inputs,
                generation,
                without_managed_fields,
            ),
            identities: reflect(
                Api::all_with(client.clone(), &identity_resource),
                identity_resource.clone(),
                &identity_inputs,
                generation,
                without_managed_fields,
            ),
            services: reflect(
                Api::<KService>::all(client.clone()),
                (),
                changed,
                resource_version,
                without_managed_fields,
            ),
            slices: reflect(
                Api::<EndpointSlice>::all(client.clone()),
                (),
                changed,
                resource_version,
                without_managed_fields,
            ),
            identity_resource,
            endpoint_inputs,
            identity_inputs,
            policy_inputs,
        }
    }

    /// Until every cache holds its first full list.
    async fn wait_until_ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.nodes.listed.wait().await;
        self.pods.listed.wait().await;
        self.namespaces.wait_until_ready().await?;
        self.cnps.listed.wait().await;
        self.ccnps.listed.wait().await;
        self.netpols.wait_until_ready().await?;
        self.services.wait_until_ready().await?;
        self.slices.wait_until_ready().await?;
        self.identities.wait_until_ready().await
    }
}

/// A cache's change signal: the builder's wake-up (one `Notify` for every cache) and a count of
/// the changes, shared by the caches one part of the snapshot is built from.
#[derive(Clone)]
struct Changed {
    notify: Arc<Notify>,
    count: Arc<AtomicU64>,
    /// The count of a wider set of caches this one's changes are counted in too.
    within: Option<Arc<AtomicU64>>,
}

impl Changed {
    fn new(notify: &Arc<Notify>) -> Self {
        Self {
            notify: notify.clone(),
            count: Arc::default(),
            within: None,
        }
    }

    /// A count of some of `wider`'s caches: its changes count in both.
    fn within(wider: &Changed) -> Self {
        Self {
            within: Some(wider.count.clone()),
            ..Self::new(&wider.notify)
        }
    }

    /// Counts a change, then wakes the builder (which reads the count before the caches: a
    /// change it races with is seen by its next build).
    fn mark(&self) {
        if let Some(wider) = &self.within {
            wider.fetch_add(1, Ordering::Release);
        }
        self.count.fetch_add(1, Ordering::Release);
        self.notify.notify_one();
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }
}

/// Starts one reflector: its cache, kept current by a task that logs (does not end on) watch
/// errors (the watcher retries with bounded backoff) and wakes `changed` when what `relevant`
/// reads of an object changed, or the object went: a rebuild at 100,000 pods is not free, and
/// most watch events are status writes that change nothing veil reads (Nodes' conditions,
/// identities' `lastSeen`, each node's verdict in a policy's status). Objects enter the cache
/// without their managed fields.
fn reflect<K, R>(
    api: Api<K>,
    dyntype: K::DynamicType,
    changed: &Changed,
    relevant: fn(&K) -> R,
    compact: impl FnMut(&mut K) + Send + 'static,
) -> Store<K>
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone + Send + Sync,
    R: PartialEq + Send + 'static,
{
    let writer = reflector::store::Writer::new(dyntype.clone());
    let store = writer.as_reader();
    let kind = K::kind(&dyntype).into_owned();
    let changed = changed.clone();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(compact)
        .reflect(writer);
    tokio::spawn(async move {
        futures_util::pin_mut!(stream);
        let mut seen: HashMap<String, R> = HashMap::new();
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    if on_event(&mut seen, relevant, event) {
                        changed.mark()
                    }
                }
                Err(e) => {
                    tracing::warn!(%kind, error = %e, "Kubernetes watch failed; keeping the last state, retrying")
                }
            }
        }
    });
    store
}

/// One watch event against what was last seen of each object (by uid); whether the snapshot
/// must be rebuilt. A relist starts afresh and rebuilds at its end.
fn on_event<K: kube::Resource, R: PartialEq>(
    seen: &mut HashMap<String, R>,
    relevant: fn(&K) -> R,
    event: watcher::Event<K>,
) -> bool {
    let uid = |o: &K| o.meta().uid.clone().unwrap_or_default();
    match event {
        watcher::Event::Init => {
            seen.clear();
            false
        }
        watcher::Event::InitApply(o) => {
            seen.insert(uid(&o), relevant(&o));
            false
        }
        watcher::Event::InitDone => true,
        watcher::Event::Apply(o) => {
            let now = relevant(&o);
            match seen.get_mut(&uid(&o)) {
                Some(before) if *before == now => false,
                Some(before) => {
                    *before = now;
                    true
                }
                None => {
                    seen.insert(uid(&o), now);
                    true
                }
            }
        }
        watcher::Event::Delete(o) => {
            seen.remove(&uid(&o));
            true
        }
    }
}

/// Relevant: the object's spec (`metadata.generation` counts its changes).
fn generation<K: kube::Resource>(o: &K) -> i64 {
    o.meta().generation.unwrap_or_default()
}

/// Relevant: everything (each write changes `metadata.resourceVersion`).
fn resource_version<K: kube::Resource>(o: &K) -> Option<String> {
    o.meta().resource_version.clone()
}

/// Relevant: the namespace's labels (its pods' identities carry them).
fn labels_of_namespace(n: &KNamespace) -> Option<BTreeMap<String, String>> {
    n.metadata.labels.clone()
}

/// Caches the object without its managed fields (the field managers' record of who set what:
/// nothing veil reads, and often the largest part of a small object).
fn without_managed_fields<K: kube::Resource>(o: &mut K) {
    o.meta_mut().managed_fields = None;
}

/// Whether a cache kept by [`watch_into`] holds its first full list.
#[derive(Clone)]
struct Listed(watch::Receiver<bool>);

impl Listed {
    /// Until the first full list is in.
    async fn wait(&self) {
        let mut listed = self.0.clone();
        // The sender lives as long as the watch task; it only ends with the runtime.
        let _ = listed.wait_for(|l| *l).await;
    }
}

/// Lists and watches `api` into `cache` through `on_event` (which answers whether the snapshot
/// must be rebuilt, and whether a full list has just completed), relisting on `410 Gone` with
/// bounded backoff; wakes `changed`; logs (does not end on) watch errors. For the caches that
/// keep what veil makes of an object rather than the object (a kube-runtime store keeps the
/// object, its metadata struct and a key naming its resource).
fn watch_into<K, S>(
    api: Api<K>,
    kind: &str,
    cache: &Arc<Mutex<S>>,
    changed: &Changed,
    mut on_event: impl FnMut(&mut S, watcher::Event<K>) -> (bool, bool) + Send + 'static,
) -> Listed
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    S: Send + 'static,
{
    let (listed_tx, listed) = watch::channel(false);
    let (cache, changed, kind) = (cache.clone(), changed.clone(), kind.to_string());
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    tokio::spawn(async move {
        futures_util::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    let (rebuild, done) = on_event(&mut cache.lock().expect("cache lock"), event);
                    if done {
                        listed_tx.send_replace(true);
                    }
                    if rebuild {
                        changed.mark();
                    }
                }
                Err(e) => {
                    tracing::warn!(%kind, error = %e, "Kubernetes watch failed; keeping the last state, retrying")
                }
            }
        }
    });
    Listed(listed)
}

/// A CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy as the agent keeps it: parsed as it
/// arrives (once per spec generation: every node's verdict written into a policy's status is a
/// watch event that keeps the parse), with this node's verdict as its status records it. Not
/// the object: a small CNP held as a kube-runtime cache entry (its metadata, its spec as JSON,
/// its key with the resource's five names) was 1.5 KB, 15 MB at 10,000 rules (heaptrack).
#[derive(Debug, PartialEq)]
struct CachedPolicy {
    namespace: Option<String>,
    name: String,
    uid: String,
    /// `metadata.generation` the parse is of.
    generation: i64,
    /// What [`policy_from`] made of it: the policy, or why veil refuses it.
    parsed: Result<Arc<Policy>, String>,
    /// This node's verdict in `status.nodes` (as [`recorded_verdict`] reads it).
    recorded: Option<Verdict>,
}

impl CachedPolicy {
    /// `o` as cached on `node`: `before` (what the cache held under its name) again if
    /// nothing veil reads of it changed, else with `before`'s parse if its spec did not.
    fn new(kind: &str, o: &DynamicObject, node: &str, before: Option<&Arc<Self>>) -> Arc<Self> {
        let m = &o.metadata;
        let (uid, generation) = (m.uid.clone().unwrap_or_default(), m.generation.unwrap_or(0));
        let recorded = recorded_verdict(o, node);
        let same_spec =
            before.filter(|b| b.uid == uid && b.generation == generation && !uid.is_empty());
        if let Some(b) = same_spec.filter(|b| b.recorded == recorded) {
            return b.clone();
        }
        Arc::new(Self {
            namespace: m.namespace.clone(),
            name: m.name.clone().unwrap_or_default(),
            parsed: match same_spec {
                Some(b) => b.parsed.clone(),
                None => policy_from(kind, o).map(Arc::new),
            },
            uid,
            generation,
            recorded,
        })
    }

    fn key(&self) -> PolicyName {
        PolicyName::new(self.namespace.as_deref().unwrap_or_default(), &self.name)
    }

    /// What this node decides about it now.
    fn verdict(&self) -> Verdict {
        Verdict {
            generation: self.generation,
            error: self.parsed.as_ref().err().cloned(),
        }
    }
}

/// One kind of policy object (CNP or CCNP) as [`CachedPolicy`]s by name: listed and watched
/// (relisting on `410 Gone`, bounded backoff), waking `changed` when a spec changes or a policy
/// comes or goes.
#[derive(Clone)]
struct PolicyCache {
    resource: ApiResource,
    policies: Arc<Mutex<BTreeMap<PolicyName, Arc<CachedPolicy>>>>,
    listed: Listed,
}

impl PolicyCache {
    fn start(client: &Client, resource: &ApiResource, node: &str, changed: &Changed) -> Self {
        let policies = Arc::default();
        let (kind, node) = (resource.kind.clone(), node.to_string());
        let mut relist = None;
        let listed = watch_into(
            Api::all_with(client.clone(), resource),
            &resource.kind,
            &policies,
            changed,
            move |cache, event| on_policy_event(cache, &mut relist, &kind, &node, event),
        );
        PolicyCache {
            resource: resource.clone(),
            policies,
            listed,
        }
    }

    /// Every cached policy, in name order (shared, not copied).
    fn policies(&self) -> Vec<Arc<CachedPolicy>> {
        let cache = self.policies.lock().expect("policy cache lock");
        cache.values().cloned().collect()
    }
}

/// One watch event into a policy cache (a relist is gathered in `relist` and replaces the cache
/// at its end, keeping the parses of what it lists unchanged). Whether the snapshot must be
/// rebuilt (not for a status write), and whether a full list has just completed.
fn on_policy_event(
    cache: &mut BTreeMap<PolicyName, Arc<CachedPolicy>>,
    relist: &mut Option<BTreeMap<PolicyName, Arc<CachedPolicy>>>,
    kind: &str,
    node: &str,
    event: watcher::Event<DynamicObject>,
) -> (bool, bool) {
    let key = |o: &DynamicObject| {
        PolicyName::new(
            o.metadata.namespace.as_deref().unwrap_or_default(),
            o.metadata.name.as_deref().unwrap_or_default(),
        )
    };
    match event {
        watcher::Event::Init => {
            *relist = Some(BTreeMap::new());
            (false, false)
        }
        watcher::Event::InitApply(o) => {
            if let Some(r) = relist.as_mut() {
                let c = CachedPolicy::new(kind, &o, node, cache.get(&key(&o)));
                r.insert(c.key(), c);
            }
            (false, false)
        }
        watcher::Event::InitDone => {
            if let Some(r) = relist.take() {
                *cache = r;
            }
            (true, true)
        }
        watcher::Event::Apply(o) => {
            let before = cache.get(&key(&o)).cloned();
            let c = CachedPolicy::new(kind, &o, node, before.as_ref());
            let rebuild = before.is_none_or(|b| b.uid != c.uid || b.generation != c.generation);
            cache.insert(c.key(), c);
            (rebuild, false)
        }
        watcher::Event::Delete(o) => (cache.remove(&key(&o)).is_some(), false),
    }
}

/// The cluster's Pods as endpoints: what [`pod_from`] makes of each one (identity not yet
/// assigned), by namespace and name, and nothing else. A Pod object is kilobytes even with its
/// containers left out (its spec and status structs are mostly empty fields), and the cache
/// holds every Pod of the cluster (100,000 in the scale benchmark). A Pod that is no endpoint
/// now (no address yet, host network, ended, terminating) is not held.
#[derive(Clone)]
struct PodCache {
    pods: Arc<Mutex<PodMap>>,
    listed: Listed,
}

impl PodCache {
    /// Lists and watches Pods, waking `changed` on every change; `node` is this node.
    fn start(api: Api<KPod>, node: &str, changed: &Changed) -> Self {
        let pods = Arc::default();
        // A relist's objects, swapped in whole at its end.
        let mut relist = None;
        let node = node.to_string();
        let listed = watch_into(api, "Pod", &pods, changed, move |cache, event| {
            on_pod_event(cache, &mut relist, &node, event)
        });
        PodCache { pods, listed }
    }

    /// Every cached endpoint (shared, not copied).
    fn endpoints(&self) -> Vec<Arc<Pod>> {
        self.pods.lock().expect("pod cache lock").pods.clone()
    }

    /// `endpoints` (as [`Self::endpoints`] gave them) with the identities `ids` (a pod
    /// without one is left out). A pod whose identity is new gets it in the cache, in place
    /// when nothing else holds it (a snapshot does: then a copy takes its place), so the
    /// cache and the snapshot share every pod; one the cache has moved on from meanwhile is
    /// copied for this snapshot alone.
    fn identify(&self, endpoints: Vec<Arc<Pod>>, ids: Vec<Option<u32>>) -> Vec<Arc<Pod>> {
        let mut cache = self.pods.lock().expect("pod cache lock");
        let mut out = Vec::with_capacity(endpoints.len());
        for (pod, id) in endpoints.into_iter().zip(ids) {
            let Some(id) = id else { continue };
            if pod.identity == id {
                out.push(pod);
                continue;
            }
            match cache.find(&pod.namespace, &pod.name) {
                Ok(i) if Arc::ptr_eq(&cache.pods[i], &pod) => {
                    drop(pod);
                    let cached = &mut cache.pods[i];
                    Arc::make_mut(cached).identity = id;
                    out.push(cached.clone());
                }
                _ => out.push(Arc::new(Pod {
                    identity: id,
                    ..(*pod).clone()
                })),
            }
        }
        out
    }
}

/// The pod cache's contents: endpoints, each shared with the snapshots that list it, their
/// label sets shared between them.
#[derive(Default)]
struct PodMap {
    /// By namespace and name (the snapshot's order), looked up by binary search: a pointer per
    /// pod (keyed maps held each pod's namespace and name again, 12 MB at 100,000 pods).
    pods: Vec<Arc<Pod>>,
    /// One copy of each label set, shared by the pods that carry it (a Deployment's 100 pods
    /// carry one set; as a map per pod, labels were most of the cache).
    labels: std::collections::HashSet<Arc<BTreeMap<String, String>>>,
    /// Size of `labels` after its last pruning.
    labels_pruned_at: usize,
}

impl PodMap {
    /// Where the pod `namespace`/`name` is, or would go.
    fn find(&self, namespace: &str, name: &str) -> Result<usize, usize> {
        self.pods
            .binary_search_by(|p| (p.namespace.as_str(), p.name.as_str()).cmp(&(namespace, name)))
    }

    fn get(&self, namespace: &str, name: &str) -> Option<&Arc<Pod>> {
        self.find(namespace, name).ok().map(|i| &self.pods[i])
    }

    /// `pod` as this map holds it: `before` (what a cache held for it) if that is the same
    /// endpoint (the identity the builder gave it included, and shared with the snapshots),
    /// else `pod` with its labels shared.
    fn endpoint(&mut self, mut pod: Pod, before: Option<&Arc<Pod>>) -> Arc<Pod> {
        if let Some(before) = before {
            // Compared with the identity aside: a pod from the API has none yet.
            pod.identity = before.identity;
            let same = **before == pod;
            pod.identity = 0;
            if same && Arc::ptr_eq(&self.shared_labels(&before.labels), &before.labels) {
                return before.clone();
            }
        }
        pod.labels = self.shared_labels(&pod.labels);
        Arc::new(pod)
    }

    /// Caches `pod`; whether that changed the cache (a status update that leaves the endpoint
    /// as it was does not, and rebuilds nothing).
    fn insert(&mut self, pod: Pod) -> bool {
        let at = self.find(&pod.namespace, &pod.name);
        let before = at.ok().map(|i| self.pods[i].clone());
        let pod = self.endpoint(pod, before.as_ref());
        match at {
            Ok(i) if Arc::ptr_eq(&self.pods[i], &pod) => return false,
            Ok(i) => self.pods[i] = pod,
            Err(i) => self.pods.insert(i, pod),
        }
        true
    }

    /// The label set equal to `labels` that the cache's pods share.
    fn shared_labels(
        &mut self,
        labels: &Arc<BTreeMap<String, String>>,
    ) -> Arc<BTreeMap<String, String>> {
        if let Some(shared) = self.labels.get(labels) {
            return Arc::clone(shared);
        }
        self.labels.insert(Arc::clone(labels));
        // Label sets no pod carries any more go, once the set has doubled.
        if self.labels.len() >= 2 * self.labels_pruned_at.max(512) {
            self.labels.retain(|l| Arc::strong_count(l) > 1);
            self.labels_pruned_at = self.labels.len();
        }
        Arc::clone(labels)
    }

    /// Whether `namespace`/`name` was cached.
    fn remove(&mut self, (namespace, name): (&str, &str)) -> bool {
        match self.find(namespace, name) {
            Ok(i) => {
                self.pods.remove(i);
                true
            }
            Err(_) => false,
        }
    }
}

/// One watch event into the pod cache (a relist is gathered in `relist` and replaces the cache
/// at its end: a Pod it no longer lists is gone; one it lists as it was keeps its cached
/// endpoint). Whether the snapshot must be rebuilt (not for an update that leaves the endpoint
/// as it was: pods' status changes are most of a cluster's watch events), and whether a full
/// list has just completed.
fn on_pod_event(
    cache: &mut PodMap,
    relist: &mut Option<PodMap>,
    node: &str,
    event: watcher::Event<KPod>,
) -> (bool, bool) {
    match event {
        watcher::Event::Init => {
            // Knowing the cache's label sets, the relist's pods share them as the cache's do.
            *relist = Some(PodMap {
                labels: cache.labels.clone(),
                ..PodMap::default()
            });
            (false, false)
        }
        watcher::Event::InitApply(p) => {
            if let (Some(r), Some(pod)) = (relist.as_mut(), pod_from(&p, node)) {
                let before = cache.get(&pod.namespace, &pod.name);
                let pod = r.endpoint(pod, before);
                // Sorted at the end (a list comes in key order: then that is a linear check).
                r.pods.push(pod);
            }
            (false, false)
        }
        watcher::Event::InitDone => {
            if let Some(mut r) = relist.take() {
                r.pods
                    .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
                r.pods
                    .dedup_by(|a, b| a.namespace == b.namespace && a.name == b.name);
                r.pods.shrink_to_fit();
                *cache = r;
            }
            (true, true)
        }
        watcher::Event::Apply(p) => {
            let changed = match pod_from(&p, node) {
                Some(pod) => cache.insert(pod),
                None => cache.remove(pod_key(&p)),
            };
            (changed, false)
        }
        watcher::Event::Delete(p) => (cache.remove(pod_key(&p)), false),
    }
}

fn pod_key(p: &KPod) -> (&str, &str) {
    (
        p.metadata.namespace.as_deref().unwrap_or_default(),
        p.metadata.name.as_deref().unwrap_or_default(),
    )
}

/// The cluster's Nodes as veil nodes (what [`node_from`] makes of each), by name, and nothing
/// else: a Node object carries its conditions, capacity, images and kubelet details, none of
/// which veil reads, and the builder parsed every one of them again on each rebuild. A Node
/// that is no veil node now (no IPv4 InternalIP or pod CIDR) is not held.
#[derive(Clone)]
struct NodeCache {
    nodes: Arc<Mutex<BTreeMap<String, CachedNode>>>,
    listed: Listed,
}

/// A veil node as the cache holds it, with when its Node object was created: of two nodes
/// whose names hash to the same id, the older keeps it ([`with_ids`]).
#[derive(Clone, Debug, PartialEq)]
struct CachedNode {
    created: Option<k8s_openapi::jiff::Timestamp>,
    node: Node,
}

impl NodeCache {
    /// Lists and watches Nodes, waking `changed` when a veil node changes.
    fn start(api: Api<KNode>, changed: &Changed) -> Self {
        let nodes = Arc::default();
        // A relist's nodes, swapped in whole at its end.
        let mut relist = None;
        let listed = watch_into(api, "Node", &nodes, changed, move |cache, event| {
            on_node_event(cache, &mut relist, event)
        });
        NodeCache { nodes, listed }
    }

    /// The nodes, by name, each with its id.
    fn nodes(&self) -> Vec<Node> {
        with_ids(self.nodes.lock().expect("node cache lock").values())
    }
}

/// The nodes, by name, each with its id: the hash of its name ([`node_id_hash`]), or the next
/// free number when an older node (by creation, then name) already has it. An id does not
/// follow the node's address, so a renumbered node keeps its auth entries, tunnel peer and
/// control channel; every agent reading the same Nodes gives the same ids; and a node that
/// joins never takes the id of one already there.
fn with_ids<'a>(cached: impl Iterator<Item = &'a CachedNode>) -> Vec<Node> {
    let mut by_age: Vec<&CachedNode> = cached.collect();
    by_age.sort_by(|a, b| (a.created, &a.node.name).cmp(&(b.created, &b.node.name)));
    let mut taken = std::collections::HashSet::with_capacity(by_age.len());
    let mut nodes: Vec<Node> = by_age
        .into_iter()
        .map(|c| {
            let mut id = node_id_hash(&c.node.name);
            // 0 is "no node" in the datapath.
            while id == 0 || !taken.insert(id) {
                id = id.wrapping_add(1);
            }
            Node {
                id,
                ..c.node.clone()
            }
        })
        .collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    nodes
}

/// A node's id before collisions: 32 bits of the FNV-1a hash of its name.
fn node_id_hash(name: &str) -> u32 {
    let h = fnv1a(format!("node/{name}").as_bytes());
    (h ^ (h >> 32)) as u32
}

/// One Node watch event into the cache; whether a veil node changed (a kubelet heartbeat
/// changes nothing veil reads), and whether a full list has just completed.
fn on_node_event(
    cache: &mut BTreeMap<String, CachedNode>,
    relist: &mut Option<BTreeMap<String, CachedNode>>,
    event: watcher::Event<KNode>,
) -> (bool, bool) {
    let name = |n: &KNode| n.metadata.name.clone().unwrap_or_default();
    let cached = |n: &KNode| {
        node_from(n).map(|node| CachedNode {
            created: n.metadata.creation_timestamp.as_ref().map(|t| t.0),
            node,
        })
    };
    match event {
        watcher::Event::Init => {
            *relist = Some(BTreeMap::new());
            (false, false)
        }
        watcher::Event::InitApply(n) => {
            if let (Some(r), Some(c)) = (relist.as_mut(), cached(&n)) {
                r.insert(c.node.name.clone(), c);
            }
            (false, false)
        }
        watcher::Event::InitDone => {
            if let Some(r) = relist.take() {
                *cache = r;
            }
            (true, true)
        }
        watcher::Event::Apply(n) => match cached(&n) {
            Some(c) if cache.get(&c.node.name) == Some(&c) => (false, false),
            Some(c) => {
                cache.insert(c.node.name.clone(), c);
                (true, false)
            }
            None => (cache.remove(&name(&n)).is_some(), false),
        },
        watcher::Event::Delete(n) => (cache.remove(&name(&n)).is_some(), false),
    }
}

/// What the last build decided about one policy, to write into its status once.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Verdict {
    /// `metadata.generation` the verdict is about.
    generation: i64,
    error: Option<String>,
}

/// Turns the caches into snapshots; allocates identities, collects unused ones, writes policy
/// verdicts.
struct Builder {
    client: Client,
    cfg: KubeConfig,
    caches: Caches,
    generation: u64,
    policy_generation: u64,
    /// The last accepted version of each policy (kept when a newer version is refused),
    /// shared with the policy caches' parses.
    accepted: BTreeMap<PolicyName, Arc<Policy>>,
    /// `accepted` as the snapshot's list, made once per change of it (a pod added shares it).
    policy_list: Arc<Vec<Arc<Policy>>>,
    /// Verdicts written into policy statuses (by uid).
    reported: HashMap<String, Verdict>,
    /// NetworkPolicies (uid, generation) whose refusal was logged (they have no status).
    netpol_refusals: std::collections::HashSet<(String, i64)>,
    /// The snapshot last published (shared with the receivers, not copied).
    last: Option<Arc<ClusterState>>,
    /// Verdicts the last build decided and has not written into their policies' status yet:
    /// written once its snapshot is out, so a policy change reaches the datapath without
    /// waiting for the apiserver's answer to a status write.
    unwritten: Vec<(ApiResource, Arc<CachedPolicy>, Verdict)>,
    /// The count of endpoint-input changes the last snapshot's pod list was built at, when
    /// that build allocated every identity it needed: while the count stands, the next
    /// snapshot shares the list (a policy or Node change does not redo 100,000 pods).
    endpoints_at: Option<u64>,
    /// The identities the last pod list's pods carry, and those this node's pods carry.
    used: BTreeSet<u32>,
    local: BTreeSet<u32>,
    /// The count of policy-input changes `update_policies` last ran at, while every verdict
    /// it decided was written since: while the count stands, it would decide the same.
    policies_at: Option<u64>,
    /// What identities are derived with, as the identity caches held it at `identities.at`.
    identities: IdentityInputs,
}

/// The identities known (by number and by key) and the Namespaces' labels, read from the
/// caches once per change of them, not on every rebuild; `at` is the count of identity-input
/// changes they were read at, set once a build derived every pod's identity with them.
#[derive(Default)]
struct IdentityInputs {
    at: Option<u64>,
    known: BTreeMap<String, IdentityKey>,
    by_key: BTreeMap<IdentityKey, u32>,
    namespace_labels: HashMap<String, BTreeMap<String, String>>,
}

impl Builder {
    fn new(client: Client, cfg: KubeConfig, caches: Caches) -> Self {
        Self {
            client,
            cfg,
            caches,
            generation: 0,
            policy_generation: 0,
            accepted: BTreeMap::new(),
            policy_list: Arc::default(),
            reported: HashMap::new(),
            netpol_refusals: Default::default(),
            last: None,
            unwritten: Vec::new(),
            endpoints_at: None,
            used: BTreeSet::new(),
            local: BTreeSet::new(),
            policies_at: None,
            identities: IdentityInputs::default(),
        }
    }

    /// Rebuilds on every change after the first snapshot (already in `tx`; `complete` is its
    /// build's).
    async fn run(
        mut self,
        tx: watch::Sender<Arc<ClusterState>>,
        changed: Arc<Notify>,
        complete: bool,
    ) {
        // The first snapshot was built just now (by `start`).
        let mut last_build = tokio::time::Instant::now();
        let mut verdicts = self.write_verdicts().await;
        let mut retry = !complete || verdicts == Verdicts::Failed;
        loop {
            if verdicts == Verdicts::More {
                // Straight on: the rebuild takes whatever changed meanwhile first.
            } else if retry {
                tokio::select! {
                    _ = changed.notified() => {}
                    _ = tokio::time::sleep(RETRY) => {}
                }
            } else {
                // Also now and then without a change: lastSeen refreshes and collection are
                // due with time.
                tokio::select! {
                    _ = changed.notified() => {}
                    _ = tokio::time::sleep(self.cfg.identity_gc_age / 4) => {}
                }
            }
            tokio::time::sleep_until(last_build + DEBOUNCE).await;
            if tx.is_closed() {
                return;
            }
            last_build = tokio::time::Instant::now();
            let started = std::time::Instant::now();
            let (state, complete) = self.build().await;
            let build_ms = started.elapsed().as_millis() as u64;
            // build() hands back the same snapshot, generation included, when nothing changed.
            if tx.borrow().generation != state.generation {
                tracing::info!(
                    generation = state.generation,
                    pods = state.pods.len(),
                    build_ms,
                    "cluster state changed"
                );
                let _ = tx.send(state);
            } else {
                tracing::debug!(build_ms, "cluster state unchanged");
            }
            verdicts = self.write_verdicts().await;
            retry = !complete || verdicts == Verdicts::Failed;
        }
    }

    /// One snapshot from the caches, and whether everything it needed from the API was done
    /// (identities allocated, statuses written); if not, the caller builds again soon.
    async fn build(&mut self) -> (Arc<ClusterState>, bool) {
        let mut complete = true;
        let nodes = self.caches.nodes.nodes();
        // Read before the caches: a change racing with this build is seen by the next.
        let inputs = self.caches.endpoint_inputs.count();
        let reuse = self
            .last
            .as_ref()
            .filter(|_| self.endpoints_at == Some(inputs))
            .map(|last| (last.pods.clone(), last.identities.clone()));
        let fresh = reuse.is_none();
        let (pods, identities) = match reuse {
            Some(shared) => shared,
            None => {
                let (pods, identities, done) = self.endpoints().await;
                complete &= done;
                self.endpoints_at = done.then_some(inputs);
                (Arc::new(pods), identities)
            }
        };
        self.tend_identities(&self.used, &self.local).await;
        let policy_inputs = self.caches.policy_inputs.count();
        if self.policies_at != Some(policy_inputs) {
            self.update_policies();
            self.policies_at = Some(policy_inputs);
        }
        let mut state = ClusterState {
            generation: self.generation,
            cluster: self.cfg.cluster.clone(),
            trust_domain: self.cfg.trust_domain.clone(),
            nodes,
            pods,
            identities,
            policies: self.policy_list.clone(),
            policy_generation: self.policy_generation,
            services: services_from(&self.caches.services.state(), &self.caches.slices.state()),
            index: Default::default(),
        };
        if fresh {
            state.compact();
        }
        // Compared with the generation set aside (a snapshot is 100,000 pods at scale: no copy).
        if let Some(last) = self.last.as_ref() {
            state.generation = last.generation;
            if **last == state {
                return (last.clone(), complete);
            }
        }
        self.generation += 1;
        state.generation = self.generation;
        if let Some(last) = self.last.as_ref() {
            state.share_index(last);
        }
        let state = Arc::new(state);
        self.last = Some(state.clone());
        (state, complete)
    }

    /// The pod list from the caches, each pod with its identity (allocated now if no agent did
    /// yet), the identities they carry, and whether every identity could be allocated (a pod
    /// without one is left out: unknown identity, fail closed). Sets `used` and `local`.
    async fn endpoints(&mut self) -> (Vec<Arc<Pod>>, Vec<Identity>, bool) {
        let mut complete = true;
        // Read before the caches, as the endpoint count in `build`.
        let identity_inputs = self.caches.identity_inputs.count();
        // While the identity inputs stand, a pod the cache holds with an identity (given by
        // an earlier build, and kept by the cache while the pod is the same endpoint) keeps
        // it: a pod event at 100,000 pods derives one identity, not 100,000.
        let keep_identities = self.identities.at == Some(identity_inputs);
        if !keep_identities {
            self.identities = self.read_identity_inputs();
        }
        let endpoints = self.caches.pods.endpoints();
        // Each pod's identity, derived once per namespace, service account and label set (the
        // cache shares one label set between the pods that carry it): validating and comparing
        // 100,000 pods' label maps was most of a rebuild. Outcomes are kept for the pods after
        // the first, a failure included (each is logged once per build).
        let mut outcomes: HashMap<(&str, &str, usize), Option<u32>> = HashMap::new();
        let mut ids: Vec<Option<u32>> = Vec::with_capacity(endpoints.len());
        for pod in &endpoints {
            if keep_identities && pod.identity != 0 {
                ids.push(Some(pod.identity));
                continue;
            }
            let memo = (
                pod.namespace.as_str(),
                pod.service_account.as_str(),
                Arc::as_ptr(&pod.labels) as usize,
            );
            if let Some(id) = outcomes.get(&memo) {
                ids.push(*id);
                continue;
            }
            let Some(ns_labels) = self.identities.namespace_labels.get(&pod.namespace) else {
                tracing::debug!(pod = %pod.name, namespace = %pod.namespace, "namespace not seen yet; pod left out until it is");
                ids.push(None);
                continue;
            };
            let key = IdentityKey::new(&pod.namespace, &pod.service_account, &pod.labels)
                .and_then(|k| k.with_namespace_labels(ns_labels));
            let id = match key {
                Err(_) => {
                    tracing::warn!(pod = %pod.name, namespace = %pod.namespace, "pod or namespace labels make no identity; left out, and the pods that share them (unknown identity: fail closed)");
                    None
                }
                Ok(key) => match self.identities.by_key.get(&key) {
                    Some(id) => Some(*id),
                    None => match self.allocate(&key, &self.identities.known).await {
                        Ok(id) => {
                            self.identities.by_key.insert(key, id);
                            Some(id)
                        }
                        Err(e) => {
                            tracing::warn!(pod = %pod.name, namespace = %pod.namespace, error = %e, "cannot allocate an identity yet; retrying");
                            complete = false;
                            None
                        }
                    },
                },
            };
            outcomes.insert(memo, id);
            ids.push(id);
        }
        drop(outcomes);
        let mut pods = self.caches.pods.identify(endpoints, ids);
        // Already in this order from the cache (a linear check).
        pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        self.used = pods.iter().map(|p| p.identity).collect();
        self.local = pods
            .iter()
            .filter(|p| p.node == self.cfg.node)
            .map(|p| p.identity)
            .collect();
        let identities: Vec<Identity> = self
            .identities
            .by_key
            .iter()
            .filter(|(_, id)| self.used.contains(id))
            .map(|(k, id)| Identity::new(*id, k))
            .collect();
        // Every pod's identity derived with these inputs: the next build may keep them.
        self.identities.at = complete.then_some(identity_inputs);
        (pods, identities, complete)
    }

    /// The identities the caches hold (by number and by key) and the Namespaces' labels.
    fn read_identity_inputs(&self) -> IdentityInputs {
        let known: BTreeMap<String, IdentityKey> = self
            .caches
            .identities
            .state()
            .iter()
            .filter_map(|o| identity_from(o))
            .map(|(id, key)| (id.to_string(), key))
            .collect();
        let mut by_key: BTreeMap<IdentityKey, u32> = known
            .iter()
            .filter_map(|(id, key)| Some((key.clone(), id.parse().ok()?)))
            .collect();
        // An identity the last snapshot used stays usable while the cache lacks it: created
        // by this builder just now, its watch event may not have arrived (and, with the
        // apiserver gone, cannot be allocated again): dropping its pods would lose what is
        // applied.
        for i in self.last.iter().flat_map(|s| &s.identities) {
            if let (false, Ok(key)) = (known.contains_key(&i.id.to_string()), i.key()) {
                by_key.entry(key).or_insert(i.id);
            }
        }
        let namespace_labels = self
            .caches
            .namespaces
            .state()
            .iter()
            .filter_map(|n| {
                Some((
                    n.metadata.name.clone()?,
                    n.metadata.labels.clone().unwrap_or_default(),
                ))
            })
            .collect();
        IdentityInputs {
            at: None,
            known,
            by_key,
            namespace_labels,
        }
    }

    /// Finds or creates the `VeilIdentity` for `key`: the first candidate number that is free
    /// (created now) or already holds these labels (created by another agent).
    async fn allocate(
        &self,
        key: &IdentityKey,
        known: &BTreeMap<String, IdentityKey>,
    ) -> Result<u32, kube::Error> {
        let api: Api<DynamicObject> =
            Api::all_with(self.client.clone(), &self.caches.identity_resource);
        let labels = key.identity_labels();
        for id in identity_candidates(&labels.to_string()).take(64) {
            let name = id.to_string();
            match known.get(&name) {
                Some(k) if k == key => return Ok(id),
                Some(_) => continue,
                None => {}
            }
            let mut obj = DynamicObject::new(&name, &self.caches.identity_resource);
            obj.data = json!({"spec": {"labels": labels}});
            match api.create(&PostParams::default(), &obj).await {
                Ok(_) => {
                    tracing::info!(id, labels = %labels, "allocated identity");
                    return Ok(id);
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    // Another agent created it first: ours if its labels are ours.
                    if let Some(o) = api.get_opt(&name).await? {
                        if identity_from(&o).is_some_and(|(_, k)| &k == key) {
                            return Ok(id);
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(kube::Error::Api(Box::new(kube::core::Status::failure(
            "no free identity number among 64 candidates",
            "Conflict",
        ))))
    }

    /// One pass over the cached identities: writes `status.lastSeen` = now on those this node's
    /// pods carry (`local`) once it is missing or older than a quarter of the collection age;
    /// deletes those no pod carries (`used`), once created and last seen longer than
    /// [`IDENTITY_GC_AGE`] ago. Failures wait for the next round.
    async fn tend_identities(
        &self,
        used: &std::collections::BTreeSet<u32>,
        local: &std::collections::BTreeSet<u32>,
    ) {
        let api: Api<DynamicObject> =
            Api::all_with(self.client.clone(), &self.caches.identity_resource);
        let now = k8s_openapi::jiff::Timestamp::now();
        let gc_age = self.cfg.identity_gc_age;
        for o in self.caches.identities.state() {
            let Some(id) = identity_number(&o) else {
                continue;
            };
            let seen = last_seen(&o);
            if local.contains(&id) {
                if seen.is_some_and(|t| age(now, t) < gc_age / 4) {
                    continue;
                }
                let patch = json!({"status": {"lastSeen": now.to_string()}});
                let pp = PatchParams::default();
                if let Err(e) = api
                    .patch_status(&id.to_string(), &pp, &Patch::Merge(&patch))
                    .await
                {
                    tracing::debug!(id, error = %e, "cannot write the identity's lastSeen yet");
                }
                continue;
            }
            let created = o.metadata.creation_timestamp.as_ref().map(|t| t.0);
            let old = [created, seen]
                .into_iter()
                .flatten()
                .max()
                .is_some_and(|t| age(now, t) >= gc_age);
            if used.contains(&id) || !old {
                continue;
            }
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: o.metadata.uid.clone(),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match api.delete(&id.to_string(), &dp).await {
                Ok(_) => tracing::info!(id, "collected unused identity"),
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                Err(e) => tracing::debug!(id, error = %e, "cannot collect identity yet"),
            }
        }
    }

    /// Parses the cached policies: accepted ones replace their previous version, refused ones
    /// keep it. Each verdict not yet in its policy's status waits in `unwritten`.
    fn update_policies(&mut self) {
        self.unwritten.clear();
        let mut next: BTreeMap<PolicyName, Arc<Policy>> = BTreeMap::new();
        let mut verdicts: Vec<(&ApiResource, Arc<CachedPolicy>, Verdict)> = Vec::new();
        for cache in [&self.caches.cnps, &self.caches.ccnps] {
            // Parsed once per spec change (generation), by the cache as it arrived, not on every
            // rebuild: a pod added rebuilds the snapshot, and a cluster may hold 10,000 policies.
            for c in cache.policies() {
                let name = c.key();
                match &c.parsed {
                    Ok(p) => {
                        next.insert(name, p.clone());
                    }
                    Err(_) => {
                        if let Some(prev) = self.accepted.get(&name) {
                            next.insert(name, prev.clone());
                        }
                    }
                }
                let v = c.verdict();
                verdicts.push((&cache.resource, c, v));
            }
        }
        for o in self.caches.netpols.state() {
            let name = PolicyName::new(
                o.metadata.namespace.as_deref().unwrap_or_default(),
                &super::netpol::policy_name(o.metadata.name.as_deref().unwrap_or_default()),
            );
            match super::netpol::policy_from(&o) {
                Ok(p) => {
                    next.insert(name, Arc::new(p));
                }
                Err(e) => {
                    if let Some(prev) = self.accepted.get(&name) {
                        next.insert(name.clone(), prev.clone());
                    }
                    let seen = (
                        o.metadata.uid.clone().unwrap_or_default(),
                        o.metadata.generation.unwrap_or(0),
                    );
                    if self.netpol_refusals.insert(seen) {
                        tracing::warn!(policy = %name, error = %e, "NetworkPolicy refused; its previous version (if any) stays in force");
                    }
                }
            }
        }
        if next != self.accepted {
            self.policy_list = Arc::new(next.values().cloned().collect());
            self.accepted = next;
            self.policy_generation += 1;
        }
        let live: std::collections::HashSet<&str> =
            verdicts.iter().map(|(_, c, _)| c.uid.as_str()).collect();
        self.reported.retain(|uid, _| live.contains(uid.as_str()));
        for (ar, c, v) in verdicts {
            if c.uid.is_empty() || self.reported.get(&c.uid) == Some(&v) {
                continue;
            }
            // Already in the object (written by this node's previous run): a restarted agent
            // does not rewrite every policy's status (10,000 writes before its first snapshot).
            if c.recorded.as_ref() == Some(&v) {
                self.reported.insert(c.uid.clone(), v);
                continue;
            }
            self.unwritten.push((ar.clone(), c, v));
        }
    }

    /// Writes the verdicts `update_policies` left, for at most [`VERDICT_SLICE`]: the rest
    /// waits for the next slice; a write that failed is decided again by the next build.
    async fn write_verdicts(&mut self) -> Verdicts {
        let started = std::time::Instant::now();
        let mut outcome = Verdicts::Written;
        let mut pending = std::mem::take(&mut self.unwritten).into_iter();
        while let Some((ar, c, v)) = pending.next() {
            if started.elapsed() >= VERDICT_SLICE {
                // The rest waits for the next slice: deciding it again would go through
                // every policy (10,000 at scale) on each rebuild while a first apply's
                // verdicts are written.
                self.unwritten = std::iter::once((ar, c, v)).chain(pending).collect();
                outcome = match outcome {
                    Verdicts::Failed => Verdicts::Failed,
                    _ => Verdicts::More,
                };
                break;
            }
            match self.write_status(&ar, &c, &v).await {
                Ok(()) => {
                    self.reported.insert(c.uid.clone(), v);
                }
                Err(e) => {
                    tracing::debug!(policy = %c.key(), error = %e, "cannot write policy status yet");
                    outcome = Verdicts::Failed;
                }
            }
        }
        if outcome == Verdicts::Failed {
            // What failed is decided again by the next build.
            self.policies_at = None;
        }
        outcome
    }

    async fn write_status(
        &self,
        ar: &ApiResource,
        c: &CachedPolicy,
        v: &Verdict,
    ) -> Result<(), kube::Error> {
        let api: Api<DynamicObject> = match &c.namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, ar),
            None => Api::all_with(self.client.clone(), ar),
        };
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let entry = match &v.error {
            None => {
                json!({"ok": true, "enforcing": true, "localPolicyRevision": v.generation, "lastUpdated": now})
            }
            Some(e) => {
                json!({"ok": false, "enforcing": false, "error": e, "localPolicyRevision": v.generation, "lastUpdated": now})
            }
        };
        let patch = json!({"status": {"nodes": {self.cfg.node.clone(): entry}}});
        api.patch_status(&c.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
    }
}

/// The verdict `node` last wrote into a policy's `status.nodes`, if any.
fn recorded_verdict(o: &DynamicObject, node: &str) -> Option<Verdict> {
    let entry = o.data.get("status")?.get("nodes")?.get(node)?;
    Some(Verdict {
        generation: entry.get("localPolicyRevision")?.as_i64()?,
        error: match entry.get("ok")?.as_bool()? {
            true => None,
            false => Some(entry.get("error")?.as_str()?.to_string()),
        },
    })
}

/// The host-side interface name of a pod's veth, as `veil-cni` creates it: `veil` and 11 hex
/// digits of a hash of namespace and name (15 bytes, the kernel's limit).
pub fn host_veth_name(namespace: &str, pod: &str) -> String {
    let h = fnv1a(format!("{namespace}/{pod}").as_bytes());
    format!("veil{:011x}", h & ((1 << 44) - 1))
}

/// The identity numbers to try, in order, for a label set's canonical text: its hash, then the
/// following numbers (wrapping inside the cluster range).
pub fn identity_candidates(labels: &str) -> impl Iterator<Item = u32> {
    let first = (fnv1a(labels.as_bytes()) % u64::from(IDENTITY_SPACE)) as u32;
    (0..IDENTITY_SPACE).map(move |i| nth_candidate(first, i))
}

/// Candidate `i` after the hash's `first` offset, wrapping inside the cluster range.
fn nth_candidate(first: u32, i: u32) -> u32 {
    veil_common::maps::identity::FIRST_CLUSTER + (first + i) % IDENTITY_SPACE
}

/// FNV-1a, 64 bits: stable across builds and platforms (unlike `DefaultHasher`).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A Node as a veil node: needs an IPv4 InternalIP and an IPv4 podCIDR. Its id is the hash
/// of its name; [`with_ids`] settles collisions.
fn node_from(n: &KNode) -> Option<Node> {
    let name = n.metadata.name.clone()?;
    // The first IPv4 InternalIP, else the first IPv6 one (an IPv6-only node); a dual-stack
    // node's first IPv6 one beside its IPv4 one (node traffic encryption covers both).
    let internal: Vec<IpAddr> = n
        .status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    let (ip, ipv6) = first_and_ipv6(internal.iter().copied())?;
    let spec = n.spec.as_ref()?;
    let cidrs: Vec<(&String, IpAddr)> = spec
        .pod_cidrs
        .iter()
        .flatten()
        .chain(spec.pod_cidr.iter())
        .filter_map(|c| super::parse_cidr(c).map(|(a, _)| (c, a)))
        .collect();
    // The IPv4 podCIDR, else the IPv6 one; a dual-stack node's IPv6 one beside its IPv4 one.
    let v4 = cidrs
        .iter()
        .find(|(_, a)| a.is_ipv4())
        .map(|(c, _)| (*c).clone());
    let v6 = cidrs
        .iter()
        .find(|(_, a)| a.is_ipv6())
        .map(|(c, _)| (*c).clone());
    let (cidr, cidr_v6) = match (v4, v6) {
        (Some(v4), v6) => (v4, v6),
        (None, Some(v6)) => (v6, None),
        (None, None) => return None,
    };
    let annotations = n.metadata.annotations.as_ref();
    let key = |k: &str| annotations.and_then(|a| a.get(k)).cloned();
    Some(Node {
        id: node_id_hash(&name),
        name,
        underlay_ip: ip,
        underlay_ipv6: ipv6,
        pod_cidr: cidr,
        pod_cidr_v6: cidr_v6,
        wg_public_key: key(WG_KEY_ANNOTATION),
        wg_next_public_key: key(WG_NEXT_KEY_ANNOTATION),
    })
}

/// The first IPv4 address of `addrs`, else the first IPv6 one: what veil takes as a node's or
/// pod's first address when Kubernetes lists both families.
fn first_v4_else_v6(addrs: impl Iterator<Item = IpAddr> + Clone) -> Option<IpAddr> {
    addrs
        .clone()
        .find(IpAddr::is_ipv4)
        .or_else(|| addrs.into_iter().find(IpAddr::is_ipv6))
}

/// A node's, pod's or Service's addresses as veil keeps them: the first (IPv4, else IPv6) and, when
/// that one is IPv4, the first IPv6 one of a dual-stack object.
fn first_and_ipv6(
    addrs: impl Iterator<Item = IpAddr> + Clone,
) -> Option<(IpAddr, Option<std::net::Ipv6Addr>)> {
    let first = first_v4_else_v6(addrs.clone())?;
    let ipv6 = first
        .is_ipv4()
        .then(|| {
            addrs.into_iter().find_map(|a| match a {
                IpAddr::V6(v6) => Some(v6),
                IpAddr::V4(_) => None,
            })
        })
        .flatten();
    Some((first, ipv6))
}

/// A Pod as a veil endpoint (identity filled in by the caller), if it is one now. Only a pod
/// on `me`, this node, has its host veth named: the agent touches no other pod's interface,
/// and 100,000 names are 1.6 MB.
fn pod_from(p: &KPod, me: &str) -> Option<Pod> {
    if p.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let spec = p.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return None;
    }
    let status = p.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let addrs = || {
        status
            .pod_ips
            .iter()
            .flatten()
            .map(|a| a.ip.as_str())
            .chain(status.pod_ip.as_deref())
    };
    // The IPv4 address first (an IPv6-only pod's IPv6 one), then a dual-stack pod's IPv6 one.
    let (ip, ipv6) = first_and_ipv6(addrs().filter_map(|a| a.parse().ok()))?;
    let name = p.metadata.name.clone()?;
    let namespace = p.metadata.namespace.clone()?;
    let node = spec.node_name.clone()?;
    Some(Pod {
        host_veth: if node == me {
            host_veth_name(&namespace, &name)
        } else {
            String::new()
        },
        name,
        namespace,
        node,
        ip,
        ipv6,
        labels: p.metadata.labels.clone().unwrap_or_default().into(),
        service_account: spec
            .service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
        identity: 0,
    })
}

/// A `VeilIdentity`'s number: its name.
fn identity_number(o: &DynamicObject) -> Option<u32> {
    o.metadata.name.as_deref()?.parse().ok()
}

/// A `VeilIdentity`'s `status.lastSeen`, if it has a readable one.
fn last_seen(o: &DynamicObject) -> Option<k8s_openapi::jiff::Timestamp> {
    o.data
        .get("status")?
        .get("lastSeen")?
        .as_str()?
        .parse()
        .ok()
}

/// How long ago `t` was (zero if in the future: clocks differ between nodes).
fn age(now: k8s_openapi::jiff::Timestamp, t: k8s_openapi::jiff::Timestamp) -> Duration {
    Duration::from_millis(now.duration_since(t).as_millis().max(0) as u64)
}

/// A `VeilIdentity` object's number and key: `spec.labels` are the identity labels, the
/// namespace and service-account labels included.
fn identity_from(o: &DynamicObject) -> Option<(u32, IdentityKey)> {
    let id = identity_number(o)?;
    let labels: BTreeMap<String, String> =
        serde_json::from_value(o.data.get("spec")?.get("labels")?.clone()).ok()?;
    Some((id, IdentityKey::from_identity_labels(&labels).ok()?))
}

/// A CNP/CCNP object as veil's policy model, or why veil refuses it: the API's own metadata
/// (uid, resourceVersion, managedFields...) and status are left out, the rest goes through the
/// parser and the apply-time checks `veil policy apply` uses.
fn policy_from(kind: &str, o: &DynamicObject) -> Result<Policy, String> {
    let m = &o.metadata;
    let mut meta = json!({"name": m.name});
    if let Some(ns) = &m.namespace {
        meta["namespace"] = json!(ns);
    }
    if let Some(l) = m.labels.as_ref().filter(|l| !l.is_empty()) {
        meta["labels"] = json!(l);
    }
    // kubectl's own bookkeeping is not policy.
    let annotations: BTreeMap<&String, &String> = m
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| !k.starts_with("kubectl.kubernetes.io/"))
        .collect();
    if !annotations.is_empty() {
        meta["annotations"] = json!(annotations);
    }
    let mut doc = json!({"apiVersion": "cilium.io/v2", "kind": kind, "metadata": meta});
    for field in ["spec", "specs"] {
        if let Some(v) = o.data.get(field).filter(|v| !v.is_null()) {
            doc[field] = v.clone();
        }
    }
    let p = Policy::from_json(&doc.to_string()).map_err(|e| e.to_string())?;
    p.validate_for_apply().map_err(|e| e.to_string())?;
    Ok(p)
}

/// The Services with a ClusterIP (not headless, not ExternalName), each with the endpoints of
/// its EndpointSlices (label `kubernetes.io/service-name`): IPv4 and IPv6 addresses, ready unless a
/// condition says otherwise (the EndpointSlice API's rule for a missing `ready`), and the
/// target port the slice gives for the Service port's name. A Service port with no slice port
/// yet takes its numeric `targetPort` (or `port`).
pub(crate) fn services_from(
    services: &[Arc<KService>],
    slices: &[Arc<EndpointSlice>],
) -> Vec<super::Service> {
    let mut by_service: HashMap<(String, String), Vec<&EndpointSlice>> = HashMap::new();
    for sl in slices {
        let (Some(ns), Some(name)) = (
            sl.metadata.namespace.clone(),
            sl.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/service-name"))
                .cloned(),
        ) else {
            continue;
        };
        // FQDN slices name no address the sockets could be sent to.
        if sl.address_type != "IPv4" && sl.address_type != "IPv6" {
            continue;
        }
        by_service.entry((ns, name)).or_default().push(sl);
    }
    let mut out: Vec<super::Service> = services
        .iter()
        .filter_map(|ks| {
            let ns = ks.metadata.namespace.clone()?;
            let name = ks.metadata.name.clone()?;
            let spec = ks.spec.as_ref()?;
            if spec.type_.as_deref() == Some("ExternalName") {
                return None;
            }
            // `clusterIPs` lists a dual-stack Service's two families; a headless Service's
            // "None" parses as no address.
            let ips = || {
                spec.cluster_ips
                    .iter()
                    .flatten()
                    .map(String::as_str)
                    .chain(spec.cluster_ip.as_deref())
                    .filter_map(|a| a.parse::<IpAddr>().ok())
            };
            let (cluster_ip, cluster_ipv6) = first_and_ipv6(ips())?;
            let slices = by_service
                .get(&(ns.clone(), name.clone()))
                .map(Vec::as_slice)
                .unwrap_or_default();
            let ports = spec
                .ports
                .iter()
                .flatten()
                .filter_map(|p| {
                    let pname = p.name.clone().unwrap_or_default();
                    let protocol = p.protocol.clone().unwrap_or_else(|| "TCP".into());
                    let from_slice = slices.iter().find_map(|sl| {
                        sl.ports.iter().flatten().find_map(|sp| {
                            (sp.name.clone().unwrap_or_default() == pname
                                && sp.protocol.as_deref().unwrap_or("TCP") == protocol)
                                .then_some(sp.port?)
                        })
                    });
                    let numeric = match &p.target_port {
                        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => {
                            Some(*n)
                        }
                        Some(_) => None,
                        None => Some(p.port),
                    };
                    let target = u16::try_from(from_slice.or(numeric)?).ok()?;
                    Some(super::ServicePort {
                        name: pname,
                        port: u16::try_from(p.port).ok()?,
                        target_port: target,
                        protocol,
                    })
                })
                .collect();
            let affinity_timeout_s =
                (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
                    spec.session_affinity_config
                        .as_ref()
                        .and_then(|c| c.client_ip.as_ref())
                        .and_then(|c| c.timeout_seconds)
                        .and_then(|t| u32::try_from(t).ok())
                        .unwrap_or(10_800)
                });
            let mut backends: Vec<super::ServiceBackend> = slices
                .iter()
                .flat_map(|sl| sl.endpoints.iter())
                .filter_map(|ep| {
                    let ip: IpAddr = ep.addresses.first()?.parse().ok()?;
                    let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                    let pod = ep
                        .target_ref
                        .as_ref()
                        .filter(|r| r.kind.as_deref() == Some("Pod"))
                        .map(|r| {
                            format!(
                                "{}/{}",
                                r.namespace.clone().unwrap_or_else(|| ns.clone()),
                                r.name.clone().unwrap_or_default()
                            )
                        })
                        .unwrap_or_default();
                    Some(super::ServiceBackend { pod, ip, ready })
                })
                .collect();
            backends.sort_by(|a, b| (a.ip, &a.pod).cmp(&(b.ip, &b.pod)));
            backends.dedup_by(|a, b| a.ip == b.ip);
            Some(super::Service {
                namespace: ns,
                name,
                cluster_ip,
                cluster_ipv6,
                ports,
                affinity_timeout_s,
                backends,
            })
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::policy::selector::{NAMESPACE_LABEL, SERVICE_ACCOUNT_LABEL};

    #[test]
    fn services_take_their_slices_endpoints_readiness_and_named_target_ports() {
        let svc: KService = serde_json::from_value(json!({
            "metadata": {"namespace": "shop", "name": "backend"},
            "spec": {"clusterIP": "198.18.16.10", "sessionAffinity": "ClientIP",
                     "ports": [{"name": "http", "port": 80, "targetPort": "web", "protocol": "TCP"},
                               {"name": "metrics", "port": 9090, "targetPort": 9091}]}
        }))
        .unwrap();
        let headless: KService = serde_json::from_value(json!({
            "metadata": {"namespace": "shop", "name": "db"},
            "spec": {"clusterIP": "None", "ports": [{"port": 5432}]}
        }))
        .unwrap();
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"namespace": "shop", "name": "backend-x",
                         "labels": {"kubernetes.io/service-name": "backend"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["198.19.2.10"], "conditions": {"ready": true},
                 "targetRef": {"kind": "Pod", "namespace": "shop", "name": "backend"}},
                {"addresses": ["198.19.1.11"], "conditions": {"ready": false},
                 "targetRef": {"kind": "Pod", "namespace": "shop", "name": "backend-2"}},
                {"addresses": ["198.19.1.12"]}
            ]
        }))
        .unwrap();
        let other: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"namespace": "other", "name": "backend-y",
                         "labels": {"kubernetes.io/service-name": "backend"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["198.19.9.9"]}]
        }))
        .unwrap();
        let out = services_from(
            &[Arc::new(svc), Arc::new(headless)],
            &[Arc::new(slice), Arc::new(other)],
        );
        assert_eq!(out.len(), 1, "the headless Service is not balanced");
        let s = &out[0];
        assert_eq!(s.cluster_ip, Ipv4Addr::new(198, 18, 16, 10));
        assert_eq!(s.affinity_timeout_s, Some(10_800));
        assert_eq!(
            s.ports[0].target_port, 8080,
            "the named port from the slice"
        );
        assert_eq!(s.ports[1].target_port, 9091, "the numeric targetPort");
        let b: Vec<(String, bool)> = s
            .backends
            .iter()
            .map(|b| (b.ip.to_string(), b.ready))
            .collect();
        assert_eq!(
            b,
            [
                ("198.19.1.11".to_string(), false),
                ("198.19.1.12".to_string(), true),
                ("198.19.2.10".to_string(), true)
            ],
            "the other namespace's slice is not this Service's; a missing condition is ready"
        );
        assert_eq!(s.backends[2].pod, "shop/backend");
    }

    #[test]
    fn dual_stack_and_ipv6_only_services_take_both_families_of_slices() {
        let svc = |name: &str, spec: serde_json::Value| -> Arc<KService> {
            Arc::new(
                serde_json::from_value(json!({
                    "metadata": {"namespace": "shop", "name": name}, "spec": spec
                }))
                .unwrap(),
            )
        };
        let slice = |service: &str, family: &str, addrs: &[&str]| -> Arc<EndpointSlice> {
            let endpoints: Vec<serde_json::Value> =
                addrs.iter().map(|a| json!({"addresses": [a]})).collect();
            Arc::new(
                serde_json::from_value(json!({
                    "metadata": {"namespace": "shop", "name": format!("{service}-{family}"),
                                 "labels": {"kubernetes.io/service-name": service}},
                    "addressType": family, "endpoints": endpoints,
                }))
                .unwrap(),
            )
        };
        let out = services_from(
            &[
                // IPv6 listed first, as `ipFamilies: [IPv6, IPv4]` makes it.
                svc(
                    "dual",
                    json!({"clusterIP": "fd00:198:16::a",
                           "clusterIPs": ["fd00:198:16::a", "198.18.16.10"],
                           "ports": [{"port": 80}]}),
                ),
                svc(
                    "six",
                    json!({"clusterIP": "fd00:198:16::b", "clusterIPs": ["fd00:198:16::b"],
                           "ports": [{"port": 80}]}),
                ),
            ],
            &[
                slice("dual", "IPv4", &["198.19.1.10"]),
                slice("dual", "IPv6", &["fd00:198:19:1::a"]),
                slice("dual", "FQDN", &["backend.example"]),
                slice("six", "IPv6", &["fd00:198:19:2::a"]),
            ],
        );
        assert_eq!(out.len(), 2);
        let (dual, six) = (&out[0], &out[1]);
        assert_eq!(dual.cluster_ip, Ipv4Addr::new(198, 18, 16, 10));
        assert_eq!(dual.cluster_ipv6, Some("fd00:198:16::a".parse().unwrap()));
        let ips = |s: &crate::cluster::Service| -> Vec<String> {
            s.backends.iter().map(|b| b.ip.to_string()).collect()
        };
        assert_eq!(ips(dual), ["198.19.1.10", "fd00:198:19:1::a"]);
        assert_eq!(six.cluster_ip.to_string(), "fd00:198:16::b");
        assert_eq!(six.cluster_ipv6, None);
        assert_eq!(ips(six), ["fd00:198:19:2::a"]);
    }

    #[test]
    fn identity_numbers_are_stable_distinct_and_probe_inside_the_range() {
        let a: Vec<u32> = identity_candidates("k8s:app=a").take(3).collect();
        assert_eq!(
            a,
            identity_candidates("k8s:app=a").take(3).collect::<Vec<_>>()
        );
        assert_eq!(a[1], a[0] + 1);
        assert_ne!(a[0], identity_candidates("k8s:app=b").next().unwrap());
        let first = veil_common::maps::identity::FIRST_CLUSTER;
        assert!(identity_candidates("x")
            .take(1000)
            .all(|id| (first..first + IDENTITY_SPACE).contains(&id)));
        // Wrapping: after the last number of the range comes the first.
        assert_eq!(
            nth_candidate(IDENTITY_SPACE - 1, 0),
            first + IDENTITY_SPACE - 1
        );
        assert_eq!(nth_candidate(IDENTITY_SPACE - 1, 1), first);
    }

    #[test]
    fn host_veth_names_fit_the_kernel_and_differ_by_pod() {
        let a = host_veth_name("shop", "frontend");
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("veil"));
        assert_eq!(a, host_veth_name("shop", "frontend"));
        assert_ne!(a, host_veth_name("shop", "backend"));
        assert_ne!(a, host_veth_name("sho", "pfrontend"));
    }

    fn object(v: serde_json::Value) -> DynamicObject {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn only_a_change_the_snapshot_reads_wakes_a_rebuild() {
        let node = |ip: &str, heartbeat: &str| -> KNode {
            serde_json::from_value(json!({
                "metadata": {"name": "node-a", "uid": "u1"},
                "spec": {"podCIDR": "198.19.1.0/24"},
                "status": {"addresses": [{"type": "InternalIP", "address": ip}],
                    "conditions": [{"type": "Ready", "status": "True",
                        "lastHeartbeatTime": heartbeat}]}
            }))
            .unwrap()
        };
        let (mut cache, mut relist) = (BTreeMap::new(), None);
        let mut nodes = |e| on_node_event(&mut cache, &mut relist, e).0;
        assert!(!nodes(watcher::Event::Init));
        let t0 = "2026-12-02T10:00:00Z";
        assert!(!nodes(watcher::Event::InitApply(node("198.18.0.1", t0))));
        assert!(nodes(watcher::Event::InitDone));
        // The kubelet's heartbeat: nothing veil reads.
        let t1 = "2026-12-02T10:05:00Z";
        assert!(!nodes(watcher::Event::Apply(node("198.18.0.1", t1))));
        assert!(nodes(watcher::Event::Apply(node("198.18.0.2", t1))));
        let underlay =
            |c: &BTreeMap<String, CachedNode>| c.get("node-a").map(|c| c.node.underlay_ip);
        assert_eq!(underlay(&cache), Some(Ipv4Addr::new(198, 18, 0, 2).into()));
        // It loses its address: no veil node now, gone from the cache; back, and deleted.
        let mut bare = node("198.18.0.2", t1);
        bare.status = None;
        assert!(on_node_event(&mut cache, &mut relist, watcher::Event::Apply(bare)).0);
        assert_eq!(underlay(&cache), None);
        let mut nodes = |e| on_node_event(&mut cache, &mut relist, e).0;
        assert!(nodes(watcher::Event::Apply(node("198.18.0.2", t1))));
        assert!(nodes(watcher::Event::Delete(node("198.18.0.2", t1))));
        assert!(!nodes(watcher::Event::Delete(node("198.18.0.2", t1))));
        assert!(cache.is_empty());
        // A policy: a status write (another node's verdict) is not a spec change.
        let cnp = |generation: i64, status: serde_json::Value| -> DynamicObject {
            serde_json::from_value(json!({
                "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                "metadata": {"name": "p", "namespace": "shop", "uid": "u2", "generation": generation},
                "spec": {"endpointSelector": {}},
                "status": status
            }))
            .unwrap()
        };
        let mut seen = HashMap::new();
        let mut policies = |e| on_event(&mut seen, generation::<DynamicObject>, e);
        assert!(policies(watcher::Event::Apply(cnp(1, json!({})))));
        assert!(!policies(watcher::Event::Apply(cnp(
            1,
            json!({"nodes": {"node-b": {"ok": true}}})
        ))));
        assert!(policies(watcher::Event::Apply(cnp(2, json!({})))));
    }

    #[test]
    fn nodes_need_an_internal_ip_and_a_pod_cidr_ipv4_first() {
        let n: KNode = serde_json::from_value(json!({
            "metadata": {"name": "node-a", "annotations": {WG_KEY_ANNOTATION: "K1"}},
            "spec": {"podCIDR": "198.19.1.0/24", "podCIDRs": ["fd00::/64", "198.19.1.0/24"]},
            "status": {"addresses": [
                {"type": "Hostname", "address": "node-a"},
                {"type": "InternalIP", "address": "198.18.0.1"}
            ]}
        }))
        .unwrap();
        let node = node_from(&n).unwrap();
        assert_eq!(node.underlay_ip, Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(node.id, node_id_hash("node-a"));
        assert_eq!(node.pod_cidr, "198.19.1.0/24");
        assert_eq!(node.wg_public_key.as_deref(), Some("K1"));
        assert_eq!(node.wg_next_public_key, None);
        assert_eq!(node.pod_cidr_v6.as_deref(), Some("fd00::/64"));
        let mut no_cidr = n.clone();
        no_cidr.spec = None;
        assert!(node_from(&no_cidr).is_none());
        let mut no_ip = n;
        no_ip.status = None;
        assert!(node_from(&no_ip).is_none());
        // An IPv6-only node: its IPv6 InternalIP and podCIDR are its first (and only) ones; a
        // dual-stack node listing IPv6 first still gets IPv4 first.
        let v6: KNode = serde_json::from_value(json!({
            "metadata": {"name": "node-c"},
            "spec": {"podCIDR": "fd00:198:19:3::/64", "podCIDRs": ["fd00:198:19:3::/64"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "fd00:198:18::3"}]}
        }))
        .unwrap();
        let node = node_from(&v6).unwrap();
        assert_eq!(
            node.underlay_ip,
            "fd00:198:18::3".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            (node.pod_cidr.as_str(), node.pod_cidr_v6),
            ("fd00:198:19:3::/64", None)
        );
        let mut both = v6;
        both.status
            .as_mut()
            .unwrap()
            .addresses
            .as_mut()
            .unwrap()
            .push(
                serde_json::from_value(json!({"type": "InternalIP", "address": "198.18.0.3"}))
                    .unwrap(),
            );
        // A dual-stack node listing IPv6 first: IPv4 first, its IPv6 InternalIP kept beside.
        let both = node_from(&both).unwrap();
        assert_eq!(both.underlay_ip, Ipv4Addr::new(198, 18, 0, 3));
        assert_eq!(both.underlay_ipv6, Some("fd00:198:18::3".parse().unwrap()));
        assert_eq!(
            node.underlay_ipv6, None,
            "an IPv6-only node has no second address"
        );
    }

    #[test]
    fn node_ids_stay_when_addresses_change_and_the_older_node_keeps_a_shared_hash() {
        let node = |name: &str, ip: &str, created: &str| -> KNode {
            serde_json::from_value(json!({
                "metadata": {"name": name, "creationTimestamp": created},
                "spec": {"podCIDR": "198.19.1.0/24"},
                "status": {"addresses": [{"type": "InternalIP", "address": ip}]}
            }))
            .unwrap()
        };
        let ids = |cache: &BTreeMap<String, CachedNode>| -> BTreeMap<String, u32> {
            with_ids(cache.values())
                .into_iter()
                .map(|n| (n.name, n.id))
                .collect()
        };
        // Two names of the same hash (found by search).
        let (x, y) = ("worker-18814", "worker-45725");
        let h = node_id_hash(x);
        assert_eq!(h, node_id_hash(y));
        let (t1, t2) = ("2026-12-01T10:00:00Z", "2026-12-01T11:00:00Z");
        let (mut cache, mut relist) = (BTreeMap::new(), None);
        let mut apply = |n| on_node_event(&mut cache, &mut relist, watcher::Event::Apply(n));
        apply(node("node-a", "198.18.0.1", t1));
        apply(node(y, "198.18.0.2", t1));
        apply(node(x, "198.18.0.3", t2));
        let before = ids(&cache);
        // The older keeps the hash, though its name sorts after; the newer takes the next.
        assert_eq!((before[y], before[x]), (h, h.wrapping_add(1)));
        assert_eq!(before["node-a"], node_id_hash("node-a"));
        // A node renumbered keeps its id.
        let mut apply = |n| on_node_event(&mut cache, &mut relist, watcher::Event::Apply(n));
        assert!(apply(node("node-a", "198.18.0.79", t1)).0);
        assert!(apply(node(y, "198.18.0.80", t1)).0);
        assert_eq!(ids(&cache), before);
        // Every agent reads the same: the order events came in does not matter.
        let (mut other, mut relist) = (BTreeMap::new(), None);
        for n in [
            node(x, "198.18.0.3", t2),
            node(y, "198.18.0.2", t1),
            node("node-a", "198.18.0.1", t1),
        ] {
            on_node_event(&mut other, &mut relist, watcher::Event::Apply(n));
        }
        assert_eq!(ids(&other), before);
    }

    #[test]
    fn pods_are_endpoints_once_they_have_an_address_and_until_they_end() {
        let p: KPod = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
            "spec": {"nodeName": "node-b", "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": "198.19.2.7"}
        }))
        .unwrap();
        let pod = pod_from(&p, "node-b").unwrap();
        assert_eq!(pod.ip, Ipv4Addr::new(198, 19, 2, 7));
        assert_eq!(pod.service_account, "default");
        assert_eq!(pod.node, "node-b");
        assert_eq!(pod.host_veth, host_veth_name("shop", "web"));
        // Another node's pod: its interface is not this node's to name.
        let remote = pod_from(&p, "node-a").unwrap();
        assert_eq!(
            (remote.node.as_str(), remote.host_veth.as_str()),
            ("node-b", "")
        );
        let with = |f: &dyn Fn(&mut KPod)| {
            let mut q = p.clone();
            f(&mut q);
            pod_from(&q, "node-b")
        };
        assert!(with(&|q| q.status.as_mut().unwrap().pod_ip = None).is_none());
        // IPv6 only: the IPv6 address is the first, with no second; dual stack listing IPv6
        // first: IPv4 first, IPv6 second.
        let v6 =
            with(&|q| q.status.as_mut().unwrap().pod_ip = Some("fd00:198:19:2::7".into())).unwrap();
        assert_eq!(
            (v6.ip.to_string(), v6.ipv6),
            ("fd00:198:19:2::7".into(), None)
        );
        let dual = with(&|q| {
            q.status.as_mut().unwrap().pod_ips = Some(
                ["fd00:198:19:2::7", "198.19.2.7"]
                    .map(|ip| serde_json::from_value(json!({ "ip": ip })).unwrap())
                    .to_vec(),
            )
        })
        .unwrap();
        assert_eq!(dual.ip, Ipv4Addr::new(198, 19, 2, 7));
        assert_eq!(dual.ipv6, Some("fd00:198:19:2::7".parse().unwrap()));
        assert!(with(&|q| q.status.as_mut().unwrap().phase = Some("Succeeded".into())).is_none());
        assert!(with(&|q| q.spec.as_mut().unwrap().host_network = Some(true)).is_none());
        assert!(with(&|q| q.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH
            )))
        .is_none());
    }

    #[test]
    fn a_verdict_already_in_the_policy_status_is_read_back() {
        let with_status = |status: serde_json::Value| -> DynamicObject {
            serde_json::from_value(json!({
                "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                "metadata": {"name": "p", "namespace": "shop", "generation": 3},
                "spec": {}, "status": status,
            }))
            .unwrap()
        };
        let ok = with_status(json!({"nodes": {"node-a": {"ok": true, "enforcing": true,
            "localPolicyRevision": 3, "lastUpdated": "2026-12-02T00:00:00Z"}}}));
        assert_eq!(
            recorded_verdict(&ok, "node-a"),
            Some(Verdict {
                generation: 3,
                error: None
            })
        );
        // Another node's verdict is not this one's.
        assert_eq!(recorded_verdict(&ok, "node-b"), None);
        let refused = with_status(json!({"nodes": {"node-a": {"ok": false, "enforcing": false,
            "error": "bad port", "localPolicyRevision": 2}}}));
        assert_eq!(
            recorded_verdict(&refused, "node-a"),
            Some(Verdict {
                generation: 2,
                error: Some("bad port".into())
            })
        );
        assert_eq!(recorded_verdict(&with_status(json!({})), "node-a"), None);
    }

    #[test]
    fn the_pod_cache_keeps_endpoints_and_a_relist_replaces_it_whole() {
        let pod = |name: &str, ip: Option<&str>| -> KPod {
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "shop", "labels": {"app": name},
                    "managedFields": [{"manager": "kubectl"}]},
                "spec": {"nodeName": "node-b", "serviceAccountName": "sa",
                    "containers": [{"name": "c", "image": "x"}]},
                "status": {"phase": "Running", "podIP": ip,
                    "podIPs": ip.map(|ip| vec![json!({"ip": ip}), json!({"ip": "fd00:198:19:2::7"})])}
            }))
            .unwrap()
        };
        let (mut cache, mut relist) = (PodMap::default(), None);
        // One event into the cache as node-a's watch sees it: (rebuild, relist done).
        macro_rules! on {
            ($event:expr) => {
                on_pod_event(&mut cache, &mut relist, "node-a", $event)
            };
        }
        assert_eq!(on!(watcher::Event::Init), (false, false));
        assert_eq!(
            on!(watcher::Event::InitApply(pod("web", Some("198.19.2.7")))),
            (false, false)
        );
        assert_eq!(
            on!(watcher::Event::InitApply(pod("new", None))),
            (false, false)
        );
        assert_eq!(on!(watcher::Event::InitDone), (true, true));
        // Held as its endpoint (both addresses), the pod without an address not at all.
        assert_eq!(cache.pods.len(), 1);
        let web = cache.get("shop", "web").unwrap();
        assert_eq!(
            Some(&**web),
            pod_from(&pod("web", Some("198.19.2.7")), "node-a").as_ref()
        );
        assert_eq!(web.service_account, "sa");
        assert!(web.ipv6.is_some());
        // Its address arrives: an endpoint now; it loses it: gone again.
        assert_eq!(
            on!(watcher::Event::Apply(pod("new", Some("198.19.2.8")))),
            (true, false)
        );
        assert_eq!(cache.pods.len(), 2);
        assert_eq!(on!(watcher::Event::Apply(pod("new", None))), (true, false));
        assert!(cache.get("shop", "new").is_none());
        // A relist that no longer lists `web` (deleted while the watch was down) drops it; it
        // lists the others out of order, and each is found.
        on!(watcher::Event::Init);
        for name in ["zeta", "other"] {
            on!(watcher::Event::InitApply(pod(name, Some("198.19.2.9"))));
        }
        assert!(
            cache.get("shop", "web").is_some(),
            "kept until the relist completes"
        );
        on!(watcher::Event::InitDone);
        assert_eq!(
            cache
                .pods
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>(),
            ["other", "zeta"]
        );
        assert!(cache.get("shop", "zeta").is_some());
        assert!(cache.remove(("shop", "zeta")));
        assert_eq!(
            on!(watcher::Event::Delete(pod("other", Some("198.19.2.9")))),
            (true, false)
        );
        assert!(cache.pods.is_empty());
        // Deleting what is not cached changes nothing.
        assert_eq!(
            on!(watcher::Event::Delete(pod("other", Some("198.19.2.9")))),
            (false, false)
        );
    }

    #[test]
    fn a_pod_update_that_leaves_its_endpoint_alone_rebuilds_nothing_and_labels_are_shared() {
        let pod = |name: &str, ip: &str, app: &str| -> KPod {
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "shop", "labels": {"app": app}},
                "spec": {"nodeName": "node-b", "containers": [{"name": "c", "image": "x"}]},
                "status": {"phase": "Running", "podIP": ip}
            }))
            .unwrap()
        };
        let (mut cache, mut relist) = (PodMap::default(), None);
        let apply = |cache: &mut PodMap, relist: &mut Option<PodMap>, p| {
            on_pod_event(cache, relist, "node-a", watcher::Event::Apply(p)).0
        };
        assert!(apply(
            &mut cache,
            &mut relist,
            pod("a", "198.19.2.7", "web")
        ));
        // A status update (readiness, conditions) that leaves the endpoint as it was.
        let mut ready = pod("a", "198.19.2.7", "web");
        ready.status.as_mut().unwrap().conditions = Some(vec![Default::default()]);
        assert!(!apply(&mut cache, &mut relist, ready));
        // A label change is one.
        assert!(apply(
            &mut cache,
            &mut relist,
            pod("a", "198.19.2.7", "api")
        ));
        assert!(apply(
            &mut cache,
            &mut relist,
            pod("b", "198.19.2.8", "api")
        ));
        let (a, b) = (
            cache.get("shop", "a").unwrap(),
            cache.get("shop", "b").unwrap(),
        );
        assert!(Arc::ptr_eq(&a.labels, &b.labels), "one label set for both");
    }

    /// The pod the builder gave an identity stays the cache's, shared with the snapshot,
    /// through the status updates and relists that leave its endpoint as it was.
    #[test]
    fn an_identified_pod_is_shared_in_place_through_status_updates_and_relists() {
        let kpod = |ip: &str, ready: bool| -> KPod {
            let mut p: KPod = serde_json::from_value(json!({
                "metadata": {"name": "a", "namespace": "shop", "labels": {"app": "web"}},
                "spec": {"nodeName": "node-b", "containers": [{"name": "c", "image": "x"}]},
                "status": {"phase": "Running", "podIP": ip}
            }))
            .unwrap();
            if ready {
                p.status.as_mut().unwrap().conditions = Some(vec![Default::default()]);
            }
            p
        };
        let mut relist = None;
        let cache = PodCache {
            pods: Arc::default(),
            listed: Listed(watch::channel(true).1),
        };
        let event = |relist: &mut Option<PodMap>, e| {
            on_pod_event(&mut cache.pods.lock().unwrap(), relist, "node-a", e).0
        };
        let held = || cache.pods.lock().unwrap().get("shop", "a").unwrap().clone();
        assert!(event(
            &mut relist,
            watcher::Event::Apply(kpod("198.19.2.7", false))
        ));
        // The builder gives it its identity: in place, nothing else holding it.
        let at = Arc::as_ptr(&held());
        let listed = cache.endpoints();
        assert_eq!(listed[0].identity, 0);
        let snapshot = cache.identify(listed, vec![Some(300)]);
        assert_eq!((Arc::as_ptr(&snapshot[0]), snapshot[0].identity), (at, 300));
        assert!(Arc::ptr_eq(&held(), &snapshot[0]));
        // A status update changes nothing.
        assert!(!event(
            &mut relist,
            watcher::Event::Apply(kpod("198.19.2.7", true))
        ));
        assert!(Arc::ptr_eq(&held(), &snapshot[0]));
        // Nor does a relist that lists it as it was.
        event(&mut relist, watcher::Event::Init);
        event(
            &mut relist,
            watcher::Event::InitApply(kpod("198.19.2.7", true)),
        );
        event(&mut relist, watcher::Event::InitDone);
        assert!(Arc::ptr_eq(&held(), &snapshot[0]));
        // Another identity while a snapshot holds the pod: the cache takes a copy, the
        // snapshot keeps what it had; a pod without one is left out.
        let next = cache.identify(cache.endpoints(), vec![Some(301)]);
        assert_eq!((held().identity, snapshot[0].identity), (301, 300));
        assert!(Arc::ptr_eq(&held(), &next[0]));
        assert!(cache.identify(cache.endpoints(), vec![None]).is_empty());
        // A new address is a new endpoint, without an identity until the builder's next pass;
        // a pass that started before it gives its snapshot a copy and leaves the cache alone.
        assert!(event(
            &mut relist,
            watcher::Event::Apply(kpod("198.19.2.8", true))
        ));
        let moved = held();
        assert_eq!(
            (moved.identity, moved.ip),
            (0, Ipv4Addr::new(198, 19, 2, 8).into())
        );
        let late = cache.identify(snapshot, vec![Some(302)]);
        assert_eq!(
            (late[0].identity, late[0].ip),
            (302, Ipv4Addr::new(198, 19, 2, 7).into())
        );
        assert!(Arc::ptr_eq(&held(), &moved));
    }

    #[test]
    fn policies_parse_without_the_api_metadata_and_refuse_what_veil_cannot_enforce() {
        let base = json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "p", "namespace": "shop", "uid": "u1", "resourceVersion": "7",
                "generation": 2, "managedFields": [{"manager": "kubectl"}],
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
            "spec": {"endpointSelector": {"matchLabels": {"app": "backend"}},
                "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "frontend"}}]}]},
            "status": {"nodes": {"node-a": {"ok": true}}}
        });
        let p = policy_from("CiliumNetworkPolicy", &object(base.clone())).unwrap();
        assert_eq!(p.name(), PolicyName::new("shop", "p"));
        assert!(p.metadata.annotations.is_empty());
        // HTTP rules are enforced (the L7 proxy); one that cannot compile is refused, named.
        let mut l7 = base;
        l7["spec"]["ingress"][0]["toPorts"] = json!([{"ports": [{"port": "80", "protocol": "TCP"}], "rules": {"http": [{"method": "GET"}]}}]);
        policy_from("CiliumNetworkPolicy", &object(l7.clone())).unwrap();
        l7["spec"]["ingress"][0]["toPorts"][0]["rules"]["http"][0]["path"] = json!("/api/[");
        let e = policy_from("CiliumNetworkPolicy", &object(l7)).unwrap_err();
        assert!(e.contains("rules.http[0].path"), "{e}");
    }

    /// The cache holds a policy as its parse and this node's verdict: the same policy and
    /// verdict as read from the object; a status write keeps the parse (and, if this node's
    /// verdict stays, the entry); a new generation is parsed again.
    #[test]
    fn a_cached_policy_keeps_its_parse_and_this_nodes_verdict() {
        const CNP: &str = "CiliumNetworkPolicy";
        let verdict = |rev: i64| json!({"ok": true, "enforcing": true, "localPolicyRevision": rev});
        let whole = object(json!({
            "apiVersion": "cilium.io/v2", "kind": CNP,
            "metadata": {"name": "p", "namespace": "shop", "uid": "u1", "generation": 3,
                "annotations": {"team": "payments"}},
            "spec": {"endpointSelector": {"matchLabels": {"app": "backend"}},
                "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "frontend"}}],
                    "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}]},
            "status": {"nodes": {"node-a": verdict(3), "node-b": verdict(2)}}
        }));
        let cached = CachedPolicy::new(CNP, &whole, "node-a", None);
        assert_eq!(cached.key(), PolicyName::new("shop", "p"));
        assert_eq!(
            cached.parsed.as_deref().unwrap(),
            &policy_from(CNP, &whole).unwrap()
        );
        let ok = |generation| Verdict {
            generation,
            error: None,
        };
        assert_eq!(cached.recorded, Some(ok(3)));
        assert_eq!(cached.verdict(), ok(3));
        let on_b = CachedPolicy::new(CNP, &whole, "node-b", None);
        assert_eq!(
            on_b.recorded,
            Some(ok(2)),
            "each node reads its own verdict"
        );
        assert_eq!(
            CachedPolicy::new(CNP, &whole, "node-c", None).recorded,
            None
        );
        // Another node's status write: the same entry.
        let mut written = whole.clone();
        written.data["status"]["nodes"]["node-b"] = verdict(3);
        assert!(Arc::ptr_eq(
            &CachedPolicy::new(CNP, &written, "node-a", Some(&cached)),
            &cached
        ));
        // This node's verdict changed (a refusal, with its reason): the parse is kept.
        written.data["status"]["nodes"]["node-a"] =
            json!({"ok": false, "error": "bad port", "localPolicyRevision": 2});
        let refused_here = CachedPolicy::new(CNP, &written, "node-a", Some(&cached));
        assert_eq!(
            refused_here.recorded,
            Some(Verdict {
                generation: 2,
                error: Some("bad port".into())
            })
        );
        assert!(Arc::ptr_eq(
            refused_here.parsed.as_ref().unwrap(),
            cached.parsed.as_ref().unwrap()
        ));
        // A new generation is parsed: a spec the parser refuses stays refused, with its reason.
        let mut bad = whole;
        bad.metadata.generation = Some(4);
        bad.data["spec"]["ingress"][0]["toPorts"][0]["ports"][0]["port"] = json!("http-alt");
        let refused = CachedPolicy::new(CNP, &bad, "node-a", Some(&cached));
        assert_eq!(refused.parsed, Err(policy_from(CNP, &bad).unwrap_err()));
        assert_eq!(refused.verdict().error, refused.parsed.clone().err());
    }

    /// A policy cache rebuilds the snapshot when a spec changes or a policy comes or goes, not
    /// for a status write; a relist replaces it whole and keeps the parses of what it lists.
    #[test]
    fn the_policy_cache_rebuilds_for_specs_not_statuses() {
        let cnp = |name: &str, generation: i64, port: &str| {
            object(json!({
                "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                "metadata": {"name": name, "namespace": "shop", "uid": format!("u-{name}"),
                    "generation": generation},
                "spec": {"endpointSelector": {"matchLabels": {"app": "backend"}},
                    "ingress": [{"toPorts": [{"ports": [{"port": port, "protocol": "TCP"}]}]}]}
            }))
        };
        let (mut cache, mut relist) = (BTreeMap::new(), None);
        let mut status = cnp("a", 1, "80");
        status.data["status"] =
            json!({"nodes": {"node-b": {"ok": true, "localPolicyRevision": 1}}});
        // Each event, and (rebuild, listed) as it must answer.
        for (step, (e, want)) in [
            (watcher::Event::Init, (false, false)),
            (watcher::Event::InitApply(cnp("a", 1, "80")), (false, false)),
            (watcher::Event::InitApply(cnp("b", 1, "81")), (false, false)),
            (watcher::Event::InitDone, (true, true)),
            (watcher::Event::Apply(status), (false, false)),
            (watcher::Event::Apply(cnp("a", 2, "8080")), (true, false)),
            (watcher::Event::Apply(cnp("c", 1, "82")), (true, false)),
            (watcher::Event::Delete(cnp("c", 1, "82")), (true, false)),
            (watcher::Event::Delete(cnp("c", 1, "82")), (false, false)),
        ]
        .into_iter()
        .enumerate()
        {
            let got = on_policy_event(&mut cache, &mut relist, "CiliumNetworkPolicy", "node-a", e);
            assert_eq!(got, want, "event {step}");
        }
        let a = cache.get(&PolicyName::new("shop", "a")).unwrap().clone();
        assert_eq!(a.generation, 2);
        // A relist that no longer lists `b`, and `a` as it was.
        let mut event =
            |e| on_policy_event(&mut cache, &mut relist, "CiliumNetworkPolicy", "node-a", e);
        event(watcher::Event::Init);
        event(watcher::Event::InitApply(cnp("a", 2, "8080")));
        assert_eq!(event(watcher::Event::InitDone), (true, true));
        assert_eq!(
            cache.keys().collect::<Vec<_>>(),
            [&PolicyName::new("shop", "a")]
        );
        assert!(
            Arc::ptr_eq(&cache[&PolicyName::new("shop", "a")], &a),
            "kept, not parsed again"
        );
    }

    #[test]
    fn identities_read_back_from_their_objects() {
        let o = object(json!({
            "apiVersion": "veil.dev/v1alpha1", "kind": "VeilIdentity",
            "metadata": {"name": "70001"},
            "spec": {"labels": {"app": "web", NAMESPACE_LABEL: "shop", SERVICE_ACCOUNT_LABEL: "web",
                "io.cilium.k8s.namespace.labels.team": "a"}}
        }));
        let (id, key) = identity_from(&o).unwrap();
        assert_eq!(id, 70001);
        let expected = IdentityKey::new(
            "shop",
            "web",
            &BTreeMap::from([("app".into(), "web".into())]),
        )
        .and_then(|k| k.with_namespace_labels(&BTreeMap::from([("team".into(), "a".into())])))
        .unwrap();
        assert_eq!(key, expected);
        // What an agent writes is what it reads back.
        let written: BTreeMap<String, String> = expected
            .identity_labels()
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        assert_eq!(
            IdentityKey::from_identity_labels(&written).unwrap(),
            expected
        );
        let mut bad = o.clone();
        bad.metadata.name = Some("web".into());
        assert!(identity_from(&bad).is_none());
        let mut no_namespace = o;
        no_namespace.data["spec"]["labels"] = json!({"app": "web"});
        assert!(identity_from(&no_namespace).is_none());
    }
}
