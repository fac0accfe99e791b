//! The lab playing kubelet and container runtime for one node (`veil lab kubelet`), through the
//! interface a kubelet uses: it watches the Pods bound to its node, and for each one creates the
//! pod's network namespace and cgroup, calls the CNI plugin (`veil-cni`, chained with
//! `host-local` IPAM) in the node's namespace, reports the address in the Pod's status, waits
//! until the node's agent has its programs on the pod's interface (so no packet of the pod ever
//! passes unenforced), then runs each container's `command` + `args` as a process in the pod
//! (images are ignored: there is no container runtime) and restarts it when it exits. A Pod
//! being deleted is stopped, CNI DEL releases its address, its namespace and cgroup go, and the
//! Pod object is removed (grace period 0, as a kubelet finishes a deletion).
//!
//! Everything it creates is recorded in the lab journal first, so `veil lab down` removes it
//! even if this process dies; what it runs is recorded per pod under `kube/kubelet/<node>/`
//! (`veil lab show` lists those pods too).

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Child, Command},
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    api::{DeleteParams, Patch, PatchParams, Preconditions},
    runtime::{reflector, watcher, WatchStreamExt as _},
    Api, Client,
};
use serde::{Deserialize, Serialize};

use super::{
    journal::{Journal, Resource},
    kube::{admin_kubeconfig, dir, REQUESTED_IP, REQUESTED_IP6},
    spec::{LabSpec, NodeSpec},
    Error, LabPaths, Result,
};
use crate::sys;

/// What the kubelet made for one Pod: enough to tear it down after a restart, and what
/// `veil lab show` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub netns: String,
    pub cgroup: PathBuf,
    /// The pod's first address: IPv4, or IPv6 in an IPv6-only lab.
    pub ip: Option<std::net::IpAddr>,
    /// A dual-stack pod's IPv6 address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<std::net::Ipv6Addr>,
    pub host_veth: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
}

pub fn records_dir(paths: &LabPaths, node: &str) -> PathBuf {
    dir(paths).join("kubelet").join(node)
}

/// Every pod the kubelets of a lab run (all nodes).
pub fn records(paths: &LabPaths) -> Vec<PodRecord> {
    let mut out = Vec::new();
    let Ok(nodes) = std::fs::read_dir(dir(paths).join("kubelet")) else {
        return out;
    };
    for n in nodes.flatten() {
        let Ok(files) = std::fs::read_dir(n.path()) else {
            continue;
        };
        for f in files.flatten() {
            if let Some(r) = std::fs::read(f.path())
                .ok()
                .and_then(|b| serde_json::from_slice::<PodRecord>(&b).ok())
            {
                out.push(r);
            }
        }
    }
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

/// One container: its argv and the process running it.
struct Container {
    name: String,
    argv: Vec<String>,
    child: Option<Child>,
    restarts: u32,
    next_start: Instant,
}

/// A pod this kubelet runs.
struct Running {
    record: PodRecord,
    containers: Vec<Container>,
    ready_reported: bool,
    /// Phase Running with the pod's addresses was reported. Once: the watch cache the next
    /// turn reads may not show that patch yet, and reporting it again would put back
    /// `Ready: False` over the containers' `Ready: True` (the pod then never became a Service
    /// backend: 1 lab in about 10 hung so in Kubernetes mode).
    network_reported: bool,
    /// The node's agent has listed programs on the pod's veth once: from then on the
    /// containers may run, and the agent is not asked again.
    attached: bool,
}

struct Kubelet<'a> {
    spec: &'a LabSpec,
    paths: &'a LabPaths,
    node: &'a NodeSpec,
    pods: Api<Pod>,
    journal: Journal,
    running: BTreeMap<String, Running>,
    /// Pods whose setup failed: how often in a row, and not before when to try again.
    failed: BTreeMap<String, (u32, Instant)>,
    cni: PathBuf,
}

fn kerr(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Prerequisite(format!("kubelet: {what}: {e}"))
}

/// Runs the kubelet for `node` until killed.
pub fn run(spec: &LabSpec, paths: &LabPaths, node: &str) -> Result<()> {
    let node = spec.node(node).ok_or_else(|| {
        kerr(
            "node",
            format!("{node:?} is not a node of lab {}", spec.name),
        )
    })?;
    let exe = std::env::current_exe().map_err(|e| kerr("own path", e))?;
    let cni = exe.with_file_name("veil-cni");
    if !cni.exists() {
        return Err(kerr(
            "CNI plugin",
            format!(
                "{} is missing (cargo build --release --bins)",
                cni.display()
            ),
        ));
    }
    std::fs::create_dir_all(records_dir(paths, &node.name)).map_err(|source| Error::Write {
        path: records_dir(paths, &node.name),
        source,
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| kerr("runtime", e))?;
    rt.block_on(async {
        let kc = kube::config::Kubeconfig::read_from(admin_kubeconfig(paths))
            .map_err(|e| kerr("admin kubeconfig", e))?;
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .map_err(|e| kerr("admin kubeconfig", e))?;
        let client = Client::try_from(cfg).map_err(|e| kerr("client", e))?;
        let mut k = Kubelet {
            spec,
            paths,
            node,
            pods: Api::all(client),
            journal: Journal::open_append(&paths.journal())?,
            running: BTreeMap::new(),
            failed: BTreeMap::new(),
            cni,
        };
        k.adopt();
        k.run().await
    })
}

impl Kubelet<'_> {
    /// Pods a previous run of this kubelet set up: kept (their containers restart if gone) or
    /// torn down, once the watch says whether the Pod still exists.
    fn adopt(&mut self) {
        for r in records(self.paths)
            .into_iter()
            .filter(|r| r.node == self.node.name)
        {
            eprintln!("kubelet: adopting {}/{} ({})", r.namespace, r.name, r.uid);
            self.running.insert(
                r.uid.clone(),
                Running {
                    record: r,
                    containers: Vec::new(),
                    ready_reported: false,
                    network_reported: false,
                    attached: false,
                },
            );
        }
    }

    async fn run(&mut self) -> Result<()> {
        let (store, writer) = reflector::store::<Pod>();
        let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", self.node.name));
        let stream = reflector(writer, watcher(self.pods.clone(), cfg)).default_backoff();
        let mut stream = std::pin::pin!(stream);
        // Until the first list is complete an empty store means nothing, not "delete all".
        let mut synced = false;
        // Container exits and agent attachment are noticed on this tick as well as on events.
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                ev = stream.next() => match ev {
                    Some(Ok(watcher::Event::InitDone)) => synced = true,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => eprintln!("kubelet: watch: {e}"),
                    None => return Err(kerr("watch", "ended")),
                },
                _ = tick.tick() => {}
            }
            if !synced {
                continue;
            }
            let pods: Vec<std::sync::Arc<Pod>> = store.state();
            self.reconcile(&pods).await;
        }
    }

    async fn reconcile(&mut self, pods: &[std::sync::Arc<Pod>]) {
        let wanted: BTreeMap<String, &Pod> = pods
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| Some((p.metadata.uid.clone()?, p.as_ref())))
            .collect();
        self.failed.retain(|uid, _| wanted.contains_key(uid));
        // Gone or being deleted: tear down, then finish the deletion.
        let stale: Vec<String> = self
            .running
            .keys()
            .filter(|uid| !wanted.contains_key(*uid))
            .cloned()
            .collect();
        for uid in stale {
            let r = self.running.remove(&uid).expect("listed");
            self.teardown(r).await;
        }
        for p in pods
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_some())
        {
            if let Some(uid) = &p.metadata.uid {
                if !self.running.contains_key(uid) {
                    self.finish_delete(p).await;
                }
            }
        }
        for (uid, pod) in wanted {
            if !self.running.contains_key(&uid) {
                if self
                    .failed
                    .get(&uid)
                    .is_some_and(|(_, at)| Instant::now() < *at)
                {
                    continue;
                }
                match self.setup(pod).await {
                    Ok(r) => {
                        self.failed.remove(&uid);
                        self.running.insert(uid.clone(), r);
                    }
                    Err(e) => {
                        // Retried with the supervisor's backoff (0.5 s doubling to 10 s).
                        let n = self.failed.get(&uid).map_or(0, |(n, _)| *n);
                        let delay = super::supervisor::backoff(n);
                        eprintln!("kubelet: {}: {e}; retrying in {delay:?}", name_of(pod));
                        self.failed
                            .insert(uid.clone(), (n + 1, Instant::now() + delay));
                        continue;
                    }
                }
            }
            let r = self.running.get_mut(&uid).expect("inserted");
            if r.containers.is_empty() {
                r.containers = containers_of(pod);
            }
            if !r.network_reported {
                if let Err(e) = report_network(&self.pods, pod, r, self.node).await {
                    eprintln!("kubelet: {}: status: {e}", name_of(pod));
                    continue;
                }
                r.network_reported = true;
            }
            if !r.attached {
                r.attached = agent_attached(self.paths, &self.node.name, &r.record.host_veth).await;
                if !r.attached {
                    continue;
                }
            }
            let now = Instant::now();
            let mut changed = false;
            for c in &mut r.containers {
                if let Some(child) = &mut c.child {
                    if let Ok(Some(status)) = child.try_wait() {
                        eprintln!(
                            "kubelet: {}/{} container {} exited: {status}",
                            r.record.namespace, r.record.name, c.name
                        );
                        c.child = None;
                        c.restarts += 1;
                        c.next_start =
                            now + super::supervisor::backoff(c.restarts.saturating_sub(1));
                        changed = true;
                    }
                }
                if c.child.is_none() && now >= c.next_start {
                    match start(self.paths, &r.record, c) {
                        Ok(child) => {
                            c.child = Some(child);
                            changed = true;
                        }
                        Err(e) => eprintln!(
                            "kubelet: {}/{} container {}: {e}",
                            r.record.namespace, r.record.name, c.name
                        ),
                    }
                }
            }
            if changed || !r.ready_reported {
                match report_containers(&self.pods, pod, r).await {
                    Ok(()) => r.ready_reported = true,
                    Err(e) => eprintln!("kubelet: {}: status: {e}", name_of(pod)),
                }
            }
        }
    }

    /// Namespace, cgroup and CNI ADD for a new Pod; its record is written once it has an IP.
    async fn setup(&mut self, pod: &Pod) -> Result<Running> {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        // A lab-file pod keeps the names `lab up` reserved for it; any other gets its own.
        let from_file = self
            .spec
            .pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name && p.node == self.node.name);
        let (netns, cgroup) = match from_file {
            Some(p) => (p.netns.clone(), self.paths.pod_cgroup(p)),
            None => {
                let short = &uid[..uid.len().min(8)];
                (
                    format!("{}-k{short}", self.spec.name),
                    self.paths
                        .node_cgroup(&self.node.name)
                        .join(format!("pod-{short}")),
                )
            }
        };
        let host_veth = crate::cluster::kubernetes::host_veth_name(&namespace, &name);
        let mut record = PodRecord {
            uid,
            namespace,
            name,
            node: self.node.name.clone(),
            netns,
            cgroup,
            ip: None,
            ipv6: None,
            host_veth,
            labels: pod
                .metadata
                .labels
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect(),
            service_account: pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
        };
        self.register_identity(&record).await?;
        self.journal.record(&Resource::Netns {
            name: record.netns.clone(),
        })?;
        self.journal.record(&Resource::Cgroup {
            path: record.cgroup.clone(),
        })?;
        if !sys::netns_exists(&record.netns) {
            sys::ip(&["netns", "add", &record.netns])?;
        }
        std::fs::create_dir_all(&record.cgroup).map_err(|source| Error::Write {
            path: record.cgroup.clone(),
            source,
        })?;
        let annotation = |key: &str| pod.metadata.annotations.as_ref()?.get(key).cloned();
        let requested = annotation(REQUESTED_IP);
        let requested6 = annotation(REQUESTED_IP6);
        let result = match self.cni_add(&record, requested.as_deref(), requested6.as_deref()) {
            Ok(r) => r,
            Err(e) => {
                self.release(&record);
                return Err(e);
            }
        };
        // The IPv4 address first, else the IPv6 one; a dual-stack pod's IPv6 one second.
        let v4 = cni_ip::<std::net::Ipv4Addr>(&result);
        let v6 = cni_ip::<std::net::Ipv6Addr>(&result);
        record.ip = v4.map(Into::into).or(v6.map(Into::into));
        record.ipv6 = v4.and(v6);
        if record.ip.is_none() {
            self.release(&record);
            return Err(kerr(
                "CNI ADD",
                format!("no address in its result: {result}"),
            ));
        }
        self.write_record(&record)?;
        eprintln!(
            "kubelet: {}/{} set up: netns {}, {} on {}",
            record.namespace,
            record.name,
            record.netns,
            record.ip.map(|i| i.to_string()).unwrap_or_default(),
            record.host_veth
        );
        Ok(Running {
            record,
            containers: Vec::new(),
            ready_reported: false,
            network_reported: false,
            attached: false,
        })
    }

    /// Registers a Pod that is not in the lab file with the lab's SPIRE (what SPIRE's
    /// controller manager does from Pod objects), so its workload gets an SVID and
    /// `authentication: required` works with it.
    async fn register_identity(&self, r: &PodRecord) -> Result<()> {
        if self.in_lab_file(r) {
            return Ok(()); // registered by `lab up`
        }
        match self.spec.identity {
            super::spec::IdentityProvider::Spire => super::spire_real::register_pod(
                self.spec,
                self.paths,
                &self.node.name,
                &r.namespace,
                &r.service_account,
            ),
            super::spec::IdentityProvider::Dev => {
                let path = format!(
                    "/v1/register?pod={}/{}&node={}&sa={}",
                    r.namespace, r.name, self.node.name, r.service_account
                );
                self.dev_spire(&path, "registering with").await
            }
        }
    }

    /// A pod of the lab file (as opposed to one made with kubectl).
    fn in_lab_file(&self, r: &PodRecord) -> bool {
        self.spec
            .pods
            .iter()
            .any(|p| p.namespace == r.namespace && p.name == r.name)
    }

    /// A POST to the dev SPIRE server's control socket; `what` names it in the error.
    async fn dev_spire(&self, path: &str, what: &str) -> Result<()> {
        crate::admin::call(
            &super::spire::control_socket(self.paths),
            hyper::Method::POST,
            path,
            None,
            Duration::from_secs(10),
        )
        .await
        .map(drop)
        .map_err(|e| kerr(&format!("{what} the dev SPIRE server"), e))
    }

    /// Undoes [`Self::register_identity`] once the Pod is gone: the dev server forgets the pod
    /// (its SVID is no longer issued or renewed); with SPIRE, the node's entry for the pod's
    /// service account is deleted once no other Pod this kubelet runs shares it. Failures are
    /// logged: the Pod is gone either way.
    async fn unregister_identity(&self, r: &PodRecord) {
        if self.in_lab_file(r) {
            return; // registered by `lab up` for the lab's life
        }
        let result = match self.spec.identity {
            super::spec::IdentityProvider::Spire => {
                let shared = self.running.values().any(|o| {
                    o.record.namespace == r.namespace
                        && o.record.service_account == r.service_account
                }) || self.spec.pods.iter().any(|p| {
                    p.node == self.node.name
                        && p.namespace == r.namespace
                        && p.service_account == r.service_account
                });
                if shared {
                    return;
                }
                super::spire_real::unregister_pod(
                    self.spec,
                    self.paths,
                    &self.node.name,
                    &r.namespace,
                    &r.service_account,
                )
                .map(drop)
            }
            super::spec::IdentityProvider::Dev => {
                let path = format!("/v1/revoke?pod={}/{}", r.namespace, r.name);
                self.dev_spire(&path, "unregistering from").await
            }
        };
        if let Err(e) = result {
            eprintln!("kubelet: {}/{}: {e}", r.namespace, r.name);
        }
    }

    fn write_record(&self, r: &PodRecord) -> Result<()> {
        let p = records_dir(self.paths, &self.node.name).join(format!("{}.json", r.uid));
        sys::write_atomic(
            &p,
            &serde_json::to_vec_pretty(r).expect("record serializes"),
        )
        .map_err(Error::from)
    }

    /// Runs the CNI plugin in the node's namespace, as a container runtime does.
    /// CNI ADD, asking host-local for the lab file's addresses: the IPv4 one in `CNI_ARGS`
    /// (`IP=`), the IPv6 one in the configuration's `args.cni.ips` (host-local takes both).
    fn cni_add(&self, r: &PodRecord, ip: Option<&str>, ip6: Option<&str>) -> Result<String> {
        let mut config: serde_json::Value =
            serde_json::from_str(&cni_config(self.spec, self.paths, self.node))
                .expect("cni_config is JSON");
        if let Some(ip6) = ip6 {
            config["args"] = serde_json::json!({"cni": {"ips": [ip6]}});
        }
        self.cni_with("ADD", r, ip, &config.to_string())
    }

    fn cni(&self, command: &str, r: &PodRecord, requested_ip: Option<&str>) -> Result<String> {
        let config = cni_config(self.spec, self.paths, self.node);
        self.cni_with(command, r, requested_ip, &config)
    }

    fn cni_with(
        &self,
        command: &str,
        r: &PodRecord,
        requested_ip: Option<&str>,
        config: &str,
    ) -> Result<String> {
        let mut args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
            r.namespace, r.name, r.uid
        );
        if let Some(ip) = requested_ip {
            args.push_str(&format!(";IP={ip}"));
        }
        let cni_dir = self.cni.parent().expect("a file has a parent");
        let out = Command::new("ip")
            .args(["netns", "exec", &self.node.netns])
            .arg(&self.cni)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &r.uid)
            .env("CNI_NETNS", sys::netns_path(&r.netns))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", args)
            .env(
                "CNI_PATH",
                format!("{}:/usr/lib/cni:/opt/cni/bin", cni_dir.display()),
            )
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write as _;
                c.stdin
                    .take()
                    .expect("piped")
                    .write_all(config.as_bytes())?;
                c.wait_with_output()
            })
            .map_err(|e| kerr("running veil-cni", e))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(kerr(
                &format!("CNI {command} for {}/{}", r.namespace, r.name),
                format!(
                    "{} {}",
                    stdout.trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        Ok(stdout)
    }

    /// Undoes a setup: CNI DEL (releases the address), the namespace, the cgroup.
    fn release(&self, r: &PodRecord) {
        if let Err(e) = self.cni("DEL", r, None) {
            eprintln!("kubelet: {e}");
        }
        if let Err(e) = sys::netns_delete(&r.netns) {
            eprintln!("kubelet: {e}");
        }
        let _ = sys::cgroup_kill(&r.cgroup, Duration::from_secs(5));
        let _ = sys::cgroup_remove_tree(&r.cgroup);
    }

    async fn teardown(&mut self, mut r: Running) {
        eprintln!("kubelet: stopping {}/{}", r.record.namespace, r.record.name);
        for c in &mut r.containers {
            if let Some(mut child) = c.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.release(&r.record);
        self.unregister_identity(&r.record).await;
        let _ = std::fs::remove_file(
            records_dir(self.paths, &self.node.name).join(format!("{}.json", r.record.uid)),
        );
        if let Some(p) = self
            .pods_api(&r.record.namespace)
            .get_opt(&r.record.name)
            .await
            .ok()
            .flatten()
        {
            if p.metadata.uid.as_deref() == Some(r.record.uid.as_str()) {
                self.finish_delete(&p).await;
            }
        }
    }

    fn pods_api(&self, namespace: &str) -> Api<Pod> {
        Api::namespaced(self.pods.clone().into_client(), namespace)
    }

    /// The last step of a deletion: remove the object (grace 0, only this very Pod).
    async fn finish_delete(&self, p: &Pod) {
        let (Some(ns), Some(name)) = (&p.metadata.namespace, &p.metadata.name) else {
            return;
        };
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: p.metadata.uid.clone(),
                resource_version: None,
            }),
            ..Default::default()
        };
        match self.pods_api(ns).delete(name, &dp).await {
            Ok(_) => eprintln!("kubelet: {ns}/{name} deleted"),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => eprintln!("kubelet: deleting {ns}/{name}: {e}"),
        }
    }
}

fn name_of(p: &Pod) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or(""),
        p.metadata.name.as_deref().unwrap_or("")
    )
}

/// The network configuration the kubelet hands veil-cni: host-local over the node's pod CIDRs
/// (one range per family, one address of each family per pod), its state under the lab
/// directory, and the node's pod gateway of each family (`gateway`, `gateway6`).
pub fn cni_config(spec: &LabSpec, paths: &LabPaths, node: &NodeSpec) -> String {
    let mut ranges = vec![];
    let mut config = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": format!("veil-{}", node.name),
        "type": "veil-cni",
        "mtu": spec.pod_mtu(),
    });
    let gateways = [
        (
            spec.pod_gateway(node).map(std::net::IpAddr::from),
            "gateway",
        ),
        (
            spec.pod_gateway_v6(node).map(std::net::IpAddr::from),
            "gateway6",
        ),
    ];
    for (gw, key) in gateways {
        let Some(gw) = gw else { continue };
        let Some(cidr) = node
            .pod_cidrs()
            .into_iter()
            .find(|c| c.contains(':') == gw.is_ipv6())
        else {
            continue;
        };
        ranges.push(serde_json::json!([{"subnet": cidr, "gateway": gw.to_string()}]));
        config[key] = serde_json::json!(gw.to_string());
    }
    config["ipam"] = serde_json::json!({
        "type": "host-local",
        "ranges": ranges,
        "dataDir": dir(paths).join("ipam").display().to_string(),
    });
    config.to_string()
}

/// The first address of a family in a CNI result.
fn cni_ip<A: std::str::FromStr>(result: &str) -> Option<A> {
    let v: serde_json::Value = serde_json::from_str(result).ok()?;
    v["ips"]
        .as_array()?
        .iter()
        .find_map(|i| i["address"].as_str()?.split('/').next()?.parse::<A>().ok())
}

fn containers_of(p: &Pod) -> Vec<Container> {
    p.spec
        .as_ref()
        .map(|s| {
            s.containers
                .iter()
                .map(|c| Container {
                    name: c.name.clone(),
                    argv: c
                        .command
                        .iter()
                        .flatten()
                        .chain(c.args.iter().flatten())
                        .cloned()
                        .collect(),
                    child: None,
                    restarts: 0,
                    next_start: Instant::now(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Starts a container's process in the pod's namespace and cgroup.
fn start(paths: &LabPaths, r: &PodRecord, c: &Container) -> Result<Child> {
    let Some((prog, args)) = c.argv.split_first() else {
        return Err(kerr(
            "container",
            format!("{} has no command (images are not run here)", c.name),
        ));
    };
    let mut cmd = Command::new(prog);
    cmd.args(args);
    let child = sys::spawn_daemon(
        &mut cmd,
        &sys::Placement {
            netns: Some(&r.netns),
            cgroup: Some(&r.cgroup),
            log: &paths.log(&format!("pod-{}-{}-{}", r.namespace, r.name, c.name)),
        },
    )?;
    eprintln!(
        "kubelet: {}/{} container {} started (pid {})",
        r.namespace,
        r.name,
        c.name,
        child.id()
    );
    Ok(child)
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Phase Running with the pod's address (not Ready yet): what the agents learn the pod from.
async fn report_network(
    api: &Api<Pod>,
    pod: &Pod,
    r: &Running,
    node: &NodeSpec,
) -> std::result::Result<(), kube::Error> {
    let status = pod.status.as_ref();
    let ip = r.record.ip.map(|i| i.to_string());
    let ips: Vec<serde_json::Value> = r
        .record
        .ip
        .map(|i| i.to_string())
        .into_iter()
        .chain(r.record.ipv6.map(|i| i.to_string()))
        .map(|ip| serde_json::json!({"ip": ip}))
        .collect();
    let reported = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|l| l.len())
        .unwrap_or(0);
    if status.and_then(|s| s.pod_ip.clone()) == ip
        && reported == ips.len()
        && status.and_then(|s| s.phase.as_deref()) == Some("Running")
    {
        return Ok(());
    }
    let patch = serde_json::json!({"status": {
        "phase": "Running",
        "podIP": ip, "podIPs": ips,
        "hostIP": node.underlay_ip.to_string(),
        "hostIPs": node.underlay_ips().iter().map(|ip| serde_json::json!({"ip": ip.to_string()})).collect::<Vec<_>>(),
        "startTime": now(),
        "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": "False"},
            {"type": "Ready", "status": "False", "reason": "WaitingForVeil",
             "message": "the node's agent has not attached to the pod's interface yet"},
        ],
    }});
    merge_status(api, pod, &patch).await
}

/// Ready when every container runs.
async fn report_containers(
    api: &Api<Pod>,
    pod: &Pod,
    r: &Running,
) -> std::result::Result<(), kube::Error> {
    let ready = r.containers.iter().all(|c| c.child.is_some());
    let t = now();
    let statuses: Vec<serde_json::Value> = r
        .containers
        .iter()
        .map(|c| {
            let state = if c.child.is_some() {
                serde_json::json!({"running": {"startedAt": t}})
            } else {
                serde_json::json!({"waiting": {"reason": "CrashLoopBackOff"}})
            };
            serde_json::json!({"name": c.name, "ready": c.child.is_some(), "started": c.child.is_some(),
                               "restartCount": c.restarts, "image": "veil.dev/lab/none", "imageID": "",
                               "state": state})
        })
        .collect();
    let cond = if ready { "True" } else { "False" };
    let patch = serde_json::json!({"status": {
        "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": cond},
            {"type": "Ready", "status": cond},
        ],
        "containerStatuses": statuses,
    }});
    merge_status(api, pod, &patch).await
}

/// A merge patch of the Pod's status subresource.
async fn merge_status(
    api: &Api<Pod>,
    pod: &Pod,
    patch: &serde_json::Value,
) -> std::result::Result<(), kube::Error> {
    Api::<Pod>::namespaced(
        api.clone().into_client(),
        pod.metadata.namespace.as_deref().unwrap_or("default"),
    )
    .patch_status(
        pod.metadata.name.as_deref().unwrap_or_default(),
        &PatchParams::default(),
        &Patch::Merge(patch),
    )
    .await
    .map(drop)
}

/// Has the node's agent its programs on this interface? (Its status lists its attachments.)
async fn agent_attached(paths: &LabPaths, node: &str, host_veth: &str) -> bool {
    crate::admin::get_json::<crate::api::Status>(&paths.admin_socket(node), "/v1/status")
        .await
        .is_ok_and(|st| st.programs.iter().any(|p| p.interface == host_veth))
}
