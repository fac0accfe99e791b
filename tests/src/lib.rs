//! Fixtures for veil's end-to-end suites: a uniquely named lab that is removed on drop (even when
//! the test panics), and helpers to run commands in pods and read agent status.
//!
//! Must not depend on: anything but the built `veil` binary, the lab contract and the JSON types
//! the CLI prints. Tests drive veil the way a user or an outside script does.
//!
//! These tests need root, network namespaces and BPF. Without them they fail; they never skip.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

pub use veil_agent::{
    api::Status,
    lab::{LabView, NodeView, PodView},
};

/// The `veil` binary under test: `$VEIL_BIN`, else `target/release/veil` (scripts/test.sh
/// builds it before the tests run).
pub fn veil_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("VEIL_BIN") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let bin = root.join("target/release/veil");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --release` (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// Fails the test (never skips) when the environment cannot run labs.
pub fn require_lab_environment() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "end-to-end tests need root (netns, cgroups, BPF)"
    );
    assert!(
        Path::new("/var/run/netns").exists()
            || Command::new("ip").args(["netns", "list"]).status().is_ok()
    );
}

/// A unique lab name: `t` + 7 hex digits (lab names are at most 8 characters).
/// A `/proc/<pid>/status` field in kB (`VmRSS`, `VmHWM`, ...); None if the process or the
/// field is gone.
pub fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

pub fn unique_name() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut h: u32 = 0x811c_9dc5;
    for x in [std::process::id(), nanos, N.fetch_add(1, Ordering::Relaxed)] {
        for b in x.to_le_bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    format!("t{:07x}", h & 0x0fff_ffff)
}

/// Runs `veil ARGS`, returning its output.
pub fn veil(args: &[&str]) -> Output {
    Command::new(veil_bin())
        .args(args)
        .output()
        .expect("run veil")
}

/// Runs `veil ARGS` and panics with its output unless it succeeds; returns stdout.
pub fn veil_ok(args: &[&str]) -> String {
    stdout_of_success(format_args!("veil {}", args.join(" ")), veil(args))
}

/// The stdout of a command that must have succeeded; otherwise fails the test naming `what`,
/// with the exit status, stdout and stderr.
pub fn stdout_of_success(what: impl std::fmt::Display, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The identity provider of labs whose test does not choose one: `$VEIL_TEST_IDENTITY`
/// (`dev` or `spire`), else `dev`.
pub fn test_identity() -> String {
    std::env::var("VEIL_TEST_IDENTITY").unwrap_or_else(|_| "dev".into())
}

/// `$VEIL_TEST_BACKEND` (`kernel`, `userspace`, `auto`): the WireGuard backend of the labs
/// whose test does not choose one; unset, `lab up`'s default.
pub fn test_backend() -> Option<String> {
    std::env::var("VEIL_TEST_BACKEND")
        .ok()
        .filter(|b| !b.is_empty())
}

/// A running lab, removed on drop.
pub struct Lab {
    pub name: String,
    pub view: LabView,
    _file: Option<TempFile>,
    /// What this test provokes on purpose and the post-test invariants therefore allow.
    expected: Mutex<Expected>,
    is_down: bool,
}

/// Drop reasons and log lines a test provokes on purpose (see [`Lab::expect_drops`] and
/// [`Lab::expect_log_lines`]).
#[derive(Default)]
struct Expected {
    drops: Vec<String>,
    log_lines: Vec<String>,
}

/// Drop reasons that mean the datapath itself failed: never expected unless a test says so.
const BUG_DROP_REASONS: &[&str] = &["unknown", "datapath-error"];

impl Lab {
    /// `veil lab up --name <unique> EXTRA...`, on veil's dev identity server unless EXTRA sets
    /// `--identity` (`lab up` defaults to real SPIRE; the suites that need the dev server's
    /// forced rotation and instant revocation stay on it explicitly).
    pub fn up(extra: &[&str]) -> Lab {
        Self::up_named(&unique_name(), None, extra, None)
    }

    /// A lab from a lab file (YAML text); on the dev identity server unless the file has an
    /// `identity:` key or EXTRA sets `--identity` (a flag would override the file's key).
    pub fn up_with_file(yaml: &str, extra: &[&str]) -> Lab {
        let name = unique_name();
        let file = TempFile::new(&format!("{name}.yaml"), yaml);
        Self::up_named(&name, Some(file), extra, None)
    }

    /// [`Lab::up_with_file`] with extra environment for one node's agent (`lab up`'s
    /// `VEIL_LAB_AGENT_ENV` hook), for example a [`FakeClock`]'s.
    pub fn up_with_agent_env(
        yaml: &str,
        extra: &[&str],
        node: &str,
        env: &[(&str, String)],
    ) -> Lab {
        let name = unique_name();
        let file = TempFile::new(&format!("{name}.yaml"), yaml);
        let vars: serde_json::Map<String, serde_json::Value> = env
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(v.as_str())))
            .collect();
        let hook = serde_json::json!({ node: vars }).to_string();
        Self::up_named(&name, Some(file), extra, Some(&hook))
    }

    /// `agent_env`: the value of `lab up`'s `VEIL_LAB_AGENT_ENV`, if any.
    fn up_named(
        name: &str,
        file: Option<TempFile>,
        extra: &[&str],
        agent_env: Option<&str>,
    ) -> Lab {
        require_lab_environment();
        let mut args = vec!["lab", "up", "--name", name, "--quiet"];
        let fpath = file.as_ref().map(|f| f.path.display().to_string());
        if let Some(p) = &fpath {
            args.extend(["-f", p.as_str()]);
        }
        args.extend_from_slice(extra);
        // Does the lab file set this top-level key, or EXTRA this flag? Then the test chose.
        let file_text = file
            .as_ref()
            .map(|f| std::fs::read_to_string(&f.path).unwrap_or_default())
            .unwrap_or_default();
        let file_sets = |key: &str| {
            file_text
                .lines()
                .any(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))
        };
        let args_set = |flag: &str| {
            extra
                .iter()
                .any(|a| *a == flag || a.strip_prefix(flag).is_some_and(|r| r.starts_with('=')))
        };
        // VEIL_TEST_IDENTITY=spire runs the suites that do not choose on real SPIRE instead.
        let default_identity = test_identity();
        if !file_sets("identity") && !args_set("--identity") {
            args.extend(["--identity", default_identity.as_str()]);
        }
        // The suites run on the files control plane unless they choose (`lab up` defaults to
        // Kubernetes; tests/tests/kube_lab.rs covers it); VEIL_TEST_CONTROL_PLANE=kubernetes runs
        // the ones that do not choose on the Kubernetes API instead.
        let default_cp =
            std::env::var("VEIL_TEST_CONTROL_PLANE").unwrap_or_else(|_| "files".into());
        if !file_sets("control_plane") && !args_set("--control-plane") {
            args.extend(["--control-plane", default_cp.as_str()]);
        }
        // VEIL_TEST_BACKEND=kernel runs the suites that do not choose on kernel WireGuard
        // (scripts/vm-test.sh, in a VM whose kernel has the module).
        let default_backend = test_backend();
        if let Some(b) = default_backend
            .as_deref()
            .filter(|_| !file_sets("backend") && !args_set("--backend"))
        {
            args.extend(["--backend", b]);
        }
        // VEIL_TEST_IP_FAMILY=ipv4|dual gives the labs whose test does not choose that family;
        // unset, `lab up`'s default (dual where the pod MTU carries IPv6).
        let family = std::env::var("VEIL_TEST_IP_FAMILY")
            .ok()
            .filter(|f| !f.is_empty());
        if let Some(f) = family
            .as_deref()
            .filter(|_| !file_sets("ip_family") && !args_set("--ip-family"))
        {
            args.extend(["--ip-family", f]);
        }
        let mut up = Command::new(veil_bin());
        up.args(&args);
        if let Some(v) = agent_env {
            up.env("VEIL_LAB_AGENT_ENV", v);
        }
        let out = up.output().expect("run veil lab up");
        if !out.status.success() {
            let logs = collect_logs(name);
            let _ = veil(&["lab", "down", "--name", name]);
            panic!(
                "veil {} failed:\n{}\n{}\nlogs:\n{logs}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // A lab that came up but cannot be shown is still taken down.
        let view = match std::panic::catch_unwind(|| Self::show(name)) {
            Ok(v) => v,
            Err(panic) => {
                let _ = veil(&["lab", "down", "--name", name]);
                std::panic::resume_unwind(panic)
            }
        };
        Lab {
            name: name.to_string(),
            view,
            _file: file,
            expected: Mutex::new(Expected::default()),
            is_down: false,
        }
    }

    /// `veil lab up --name NAME EXTRA...` that must be refused: fails the test (after taking
    /// the lab down) if it came up; returns veil's error output.
    pub fn up_refused(name: &str, extra: &[&str]) -> String {
        require_lab_environment();
        let args = [&["lab", "up", "--name", name], extra].concat();
        let out = veil(&args);
        if out.status.success() {
            let _ = veil(&["lab", "down", "--name", name]);
            panic!("veil {} was accepted", args.join(" "));
        }
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn show(name: &str) -> LabView {
        let json = veil_ok(&["lab", "show", "--name", name, "-o", "json"]);
        serde_json::from_str(&json).expect("lab show -o json parses")
    }

    /// Runs a command in a pod (`veil lab exec`).
    pub fn exec(&self, pod: &str, argv: &[&str]) -> Output {
        let mut args = vec!["lab", "exec", "--name", self.name.as_str(), pod, "--"];
        args.extend_from_slice(argv);
        Command::new(veil_bin())
            .args(&args)
            .output()
            .expect("run veil lab exec")
    }

    /// Runs a command in a pod and returns stdout; panics with stderr on failure.
    pub fn exec_ok(&self, pod: &str, argv: &[&str]) -> String {
        stdout_of_success(
            format_args!("`{}` in {pod}", argv.join(" ")),
            self.exec(pod, argv),
        )
    }

    /// HTTP GET from a pod (5 s limit), the body discarded: curl's `-w` output for
    /// `write_out` (e.g. `%{http_code}`); panics when curl fails.
    pub fn curl_write_out(&self, pod: &str, url: &str, write_out: &str) -> String {
        let argv = [
            "curl",
            "-sS",
            "-g",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            write_out,
            url,
        ];
        self.exec_ok(pod, &argv)
    }

    /// A capture of the lab's underlay bridge, where every packet between the nodes passes.
    pub fn capture_underlay(&self) -> Capture {
        Capture::start(&self.view.underlay.netns, &self.view.underlay.bridge)
    }

    /// HTTP GET from a pod (5 s limit) with `marker` in the path after `url` and in an
    /// `X-Marker` header, for a capture to look for; the body (panics on failure). `url` may
    /// name an IPv6 literal in brackets.
    pub fn get_with_marker(&self, pod: &str, url: &str, marker: &str) -> String {
        let header = format!("X-Marker: {marker}");
        let url = format!("{url}{marker}");
        let argv = ["curl", "-sS", "-g", "--max-time", "5", "-H", &header, &url];
        self.exec_ok(pod, &argv)
    }

    /// A command in the pod's netns and cgroup, to spawn (long-running clients).
    pub fn command_in(&self, pod: &str, argv: &[&str]) -> Command {
        let mut c = Command::new(veil_bin());
        c.args(["lab", "exec", "--name", self.name.as_str(), pod, "--"])
            .args(argv);
        c
    }

    /// HTTP GET from a pod with curl; returns the body.
    pub fn http_get(&self, pod: &str, url: &str) -> String {
        self.exec_ok(pod, &["curl", "-sS", "--max-time", "5", url])
    }

    /// The lab's pod `pod` (`name` or `namespace/name`; a test naming a pod the lab does not
    /// have fails).
    pub fn pod(&self, pod: &str) -> &PodView {
        self.view.pod(pod).unwrap_or_else(|| panic!("no pod {pod}"))
    }

    /// The lab's Service `service` as `lab show` gives it (`name` or `namespace/name`; a test
    /// naming a Service the lab does not have fails).
    pub fn service(&self, service: &str) -> &veil_agent::api::ServiceStatus {
        self.view.service(service).unwrap_or_else(|| {
            panic!(
                "no service {service} in lab show: {:#?}",
                self.view.services
            )
        })
    }

    /// Host `host` of node `node_id`'s first pod CIDR, in the lab's first family:
    /// `198.19.<node>.<host>`, or `fd00:198:19:<node>::<host>` (the same digits) IPv6-only.
    pub fn pod_cidr_addr(&self, node_id: u8, host: u16) -> String {
        if self.view.ip_family == "ipv6" {
            format!("fd00:198:19:{node_id}::{host}")
        } else {
            format!("198.19.{node_id}.{host}")
        }
    }

    /// Node `node_id`'s underlay address: `198.18.0.<id>`, or `fd00:198:18::<id>` IPv6-only.
    pub fn node_underlay_addr(&self, node_id: u8) -> String {
        if self.view.ip_family == "ipv6" {
            format!("fd00:198:18::{node_id}")
        } else {
            format!("198.18.0.{node_id}")
        }
    }

    pub fn pod_ip(&self, pod: &str) -> String {
        self.pod(pod).ip.clone()
    }

    /// `http://<pod's first address>:<port>/`, an IPv6 address in brackets.
    pub fn pod_url(&self, pod: &str, port: u16) -> String {
        http_url(&self.pod_ip(pod), port)
    }

    /// A dual-stack pod's IPv6 address (the second of its `ips`).
    pub fn pod_ip6(&self, pod: &str) -> String {
        let p = self.pod(pod);
        p.ips
            .iter()
            .find(|a| a.contains(':'))
            .unwrap_or_else(|| panic!("pod {pod} has no IPv6 address: {:?}", p.ips))
            .clone()
    }

    /// WireGuard's overhead on this lab's underlay (written out here, not taken from veil, so
    /// the MTU tests check veil's arithmetic): 20 IP + 8 UDP + 32 WireGuard data header and tag
    /// over IPv4, 20 more over IPv6.
    pub fn wg_overhead(&self) -> u32 {
        if self.view.nodes[0].underlay_ip.contains(':') {
            80
        } else {
            60
        }
    }

    /// The lab's node `node` (a test naming a node the lab does not have fails).
    pub fn node(&self, node: &str) -> &NodeView {
        self.view
            .node(node)
            .unwrap_or_else(|| panic!("no node {node}"))
    }

    /// `node`'s agent configuration (the lab writes it next to the node's admin socket).
    pub fn agent_config(&self, node: &str) -> veil_agent::config::Config {
        let path = Path::new(&self.node(node).agent_admin).with_file_name("agent.yaml");
        veil_agent::config::Config::load(&path)
            .unwrap_or_else(|e| panic!("{node}'s agent config {}: {e}", path.display()))
    }

    /// The control-plane directory of a files-mode lab (`cluster.json`, `policies.json`).
    pub fn files_control_plane(&self) -> PathBuf {
        match self.agent_config("node-a").source {
            veil_agent::config::SourceConfig::Files { dir } => dir,
            other => panic!(
                "lab {} does not read cluster state from files: {other:?}",
                self.name
            ),
        }
    }

    pub fn node_netns(&self, node: &str) -> String {
        self.node(node).netns.clone()
    }

    /// The pid of the veil-wg serving `node`'s tunnel device, if one runs.
    pub fn wg_pid(&self, node: &str) -> Option<i32> {
        let interface = &self.node(node).wg_interface;
        let out = Command::new("pgrep")
            .args(["-f", &format!("veil-wg.* {interface}$")])
            .output()
            .expect("pgrep");
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }

    /// `veil status --node NODE -o json`.
    pub fn status(&self, node: &str) -> Status {
        let json = veil_ok(&["status", "--name", &self.name, "--node", node, "-o", "json"]);
        serde_json::from_str(&json).expect("status -o json parses")
    }

    /// `veil status` of `node`, or None while its agent does not answer (stopped, restarting).
    pub fn try_status(&self, node: &str) -> Option<Status> {
        let out = veil(&["status", "--name", &self.name, "--node", node, "-o", "json"]);
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Waits until `node` runs an agent other than `old_pid` that reports ready; its status.
    pub fn wait_for_restarted_agent(
        &self,
        what: &str,
        node: &str,
        old_pid: u32,
        timeout: Duration,
    ) -> Status {
        self.wait_for(what, timeout, || {
            self.try_status(node)
                .filter(|st| st.agent.pid != old_pid && st.ready)
        })
    }

    /// Sends `sig` to `node`'s agent, pid `pid` (the lab's supervisor starts another), and
    /// waits up to 30 s until the new one is ready; its status.
    pub fn restart_agent(
        &self,
        what: &str,
        node: &str,
        pid: u32,
        sig: nix::sys::signal::Signal,
    ) -> Status {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)
            .unwrap_or_else(|e| panic!("{sig} to {node}'s agent ({pid}): {e}"));
        self.wait_for_restarted_agent(what, node, pid, Duration::from_secs(30))
    }

    /// `veil policy apply -f <yaml>` on this lab.
    pub fn apply_policy(&self, yaml: &str) -> Output {
        let f = TempFile::new(
            &format!("{}-{}-policy.yaml", self.name, std::process::id()),
            yaml,
        );
        veil(&[
            "policy",
            "apply",
            "--name",
            &self.name,
            "-f",
            &f.path.display().to_string(),
        ])
    }

    /// `apply_policy` that must succeed; returns its stdout (the per-node results).
    pub fn apply_policy_ok(&self, yaml: &str) -> String {
        stdout_of_success("policy apply", self.apply_policy(yaml))
    }

    /// HTTP GET from a pod with a 2 s limit: the body, or curl's error.
    pub fn try_get(&self, pod: &str, url: &str) -> Result<String, String> {
        let out = self.exec(pod, &["curl", "-sS", "--max-time", "2", url]);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Runs the lab's kubectl with its admin kubeconfig (a Kubernetes-mode lab); panics with
    /// the output when it fails.
    pub fn kubectl(&self, args: &[&str], stdin: &str) -> String {
        let k = self
            .view
            .kubernetes
            .as_ref()
            .expect("a kubernetes lab shows its apiserver");
        kubectl(&k.kubectl, &k.kubeconfig, args, stdin)
    }

    /// A Pod on `node` in namespace shop, labelled `app=<name>`, serving HTTP on 8080 (`veil lab
    /// serve`: there is no container runtime), made with kubectl; waits until the lab's kubelet
    /// reports its address and returns it. Its ready file is in the lab's own state directory,
    /// which `lab down` removes.
    pub fn make_web_pod(&self, name: &str, node: &str) -> String {
        self.create_web_pod(name, node, name, None);
        self.wait_for(
            &format!("{name}'s address"),
            Duration::from_secs(30),
            || {
                let ip = self.kube_pod_ip(name);
                (!ip.is_empty()).then_some(ip)
            },
        )
    }

    /// A kubectl-made Pod's `status.podIP` in namespace `shop` (empty until the lab's kubelet
    /// has given it one).
    pub fn kube_pod_ip(&self, name: &str) -> String {
        self.kube_shop_get("pod", name, "{.status.podIP}")
    }

    /// `kubectl get KIND -n shop NAME -o jsonpath=PATH`.
    pub fn kube_shop_get(&self, kind: &str, name: &str, jsonpath: &str) -> String {
        let path = format!("jsonpath={jsonpath}");
        self.kubectl(&["get", kind, "-n", "shop", name, "-o", &path], "")
    }

    /// `make_web_pod` labelled `app=<app>` and, with `ip`, asking the lab's kubelet for that
    /// address (its `veil.dev/lab-ip` annotation); returns once the apiserver has the Pod, not
    /// waiting for the kubelet. `kubectl create` without client-side validation: `apply`'s
    /// schema fetch and merge cost about twice the CPU, which a test making a hundred Pods a
    /// minute on two cores notices.
    pub fn create_web_pod(&self, name: &str, node: &str, app: &str, ip: Option<&str>) {
        let ready = veil_agent::lab::LabPaths::new(&self.name)
            .expect("lab paths")
            .ready_dir()
            .join(format!("web-{name}"));
        // An IPv6 address under the IPv6 key (an IPv6-only lab).
        let annotations = match ip {
            Some(ip) if ip.contains(':') => {
                serde_json::json!({ veil_agent::lab::kube::REQUESTED_IP6: ip })
            }
            Some(ip) => serde_json::json!({ veil_agent::lab::kube::REQUESTED_IP: ip }),
            None => serde_json::json!({}),
        };
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "labels": {"app": app},
                         "annotations": annotations},
            "spec": {"nodeName": node, "containers": [{"name": "web", "image": "ignored",
                "command": [veil_bin(), "lab", "serve", "--kind", "http", "--port", "8080",
                            "--pod", format!("shop/{name}"), "--ready-file", ready]}]}
        });
        self.kubectl(&["create", "--validate=false", "-f", "-"], &pod.to_string());
    }

    /// `veil observe -o json ARGS...`, one JSON value per flow.
    pub fn observe(&self, args: &[&str]) -> Vec<serde_json::Value> {
        let mut a = vec!["observe", "--name", self.name.as_str(), "-o", "json"];
        a.extend_from_slice(args);
        veil_ok(&a)
            .lines()
            .map(|l| serde_json::from_str(l).expect("observe line is JSON"))
            .collect()
    }

    /// The first `veil observe ARGS…` record `matches` accepts, waited for up to 10 s: records
    /// reach `veil observe` through the agents' ring buffers, a moment after the packet.
    pub fn wait_for_flow(
        &self,
        what: &str,
        args: &[&str],
        matches: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        self.wait_for(what, Duration::from_secs(10), || {
            self.observe(args).into_iter().find(&matches)
        })
    }

    /// Prometheus text from a node agent's admin socket.
    pub fn metrics(&self, node: &str) -> String {
        let sock = &self.node(node).agent_admin;
        let out = Command::new("curl")
            .args(["-sS", "--unix-socket", sock, "http://agent/metrics"])
            .output()
            .expect("run curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Polls `f` every 100 ms until it returns Some or the timeout passes.
    pub fn wait_for<T>(&self, what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
        poll_until(what, timeout, Duration::from_millis(100), f)
    }

    /// The value of `series` (a metric's name and labels as the agent exposes them, e.g.
    /// `veil_auth_failures_total{reason="auth-map-full"}`) in a node agent's metrics; None
    /// when the agent does not expose it.
    pub fn metric(&self, node: &str, series: &str) -> Option<f64> {
        self.metrics(node).lines().find_map(|l| {
            let value = l.strip_prefix(series)?.strip_prefix(' ')?;
            Some(value.trim().parse().expect("a metric's value is a number"))
        })
    }

    /// `up_with_file(yaml, extra)` with [`AUTH_POLICY`] applied, and frontend reaching backend
    /// under it (checked once, at once).
    pub fn up_with_auth_policy(yaml: &str, extra: &[&str]) -> Lab {
        let lab = Lab::up_with_file(yaml, extra);
        lab.apply_policy_ok(AUTH_POLICY);
        assert!(lab
            .try_get("frontend", &lab.pod_url("backend", 8080))
            .is_ok());
        lab
    }

    /// `veil lab SUB --name <this lab> ARGS...`, which must succeed; its stdout.
    pub fn lab_ok(&self, sub: &str, args: &[&str]) -> String {
        let mut a = vec!["lab", sub, "--name", self.name.as_str()];
        a.extend_from_slice(args);
        veil_ok(&a)
    }

    /// [`EchoLoad`]: a TCP echo stream and a UDP probe from `pod`, `n` lines one per `gap_ms`.
    pub fn echo_load(&self, pod: &str, n: u32, gap_ms: u32) -> EchoLoad {
        EchoLoad {
            n,
            tcp: self.echo_client(pod, false, n, gap_ms),
            udp: self.echo_client(pod, true, n, gap_ms),
        }
    }

    /// The drops of `reason` that `node` counts.
    pub fn drop_count(&self, node: &str, reason: &str) -> u64 {
        drop_count(&self.status(node), reason)
    }

    /// A TCP echo stream (lines `line-1..=n`) or a sequenced UDP probe (`seq-1..=n`) from
    /// `pod` to backend:9000, which echoes them back; one line every `gap_ms`.
    pub fn echo_client(&self, pod: &str, udp: bool, n: u32, gap_ms: u32) -> Streaming {
        let be = self.pod_ip("backend");
        let (prefix, flags) = if udp {
            ("seq-", "-u -w 3 -i 3")
        } else {
            ("line-", "-w 5 -i 5")
        };
        let script = format!(
            "for i in $(seq 1 {n}); do echo {prefix}$i; sleep 0.{gap_ms:03}; done | ncat {flags} {be} 9000"
        );
        Streaming::spawn(&mut self.command_in(pod, &["sh", "-c", &script]))
    }

    /// Removes the lab now (Drop does it otherwise), after the post-test invariants.
    pub fn down(mut self) {
        let violations = self.invariant_violations();
        self.down_inner();
        self.is_down = true;
        assert_invariants(&self.name, violations);
    }

    /// Drop reasons this test provokes on purpose, allowed by the post-test invariants even
    /// where they would mean a datapath failure (`datapath-error`, `unknown`).
    pub fn expect_drops(&self, reasons: &[&str]) {
        let mut e = self.expected.lock().expect("expected lock");
        e.drops.extend(reasons.iter().map(|r| r.to_string()));
    }

    /// Log lines this test provokes on purpose (a killed SPIRE server makes its agents log
    /// errors): a line of a lab log containing any of `needles` is not a violation.
    pub fn expect_log_lines(&self, needles: &[&str]) {
        let mut e = self.expected.lock().expect("expected lock");
        e.log_lines.extend(needles.iter().map(|r| r.to_string()));
    }

    /// Scenario 39, checked when every lab is taken down: drops only with known reasons (none
    /// meaning a datapath failure unless expected), and no panic or error line in any agent,
    /// veil-wg or SPIRE log of the lab unless expected.
    fn invariant_violations(&self) -> Vec<String> {
        let expected = self.expected.lock().expect("expected lock");
        let mut v = vec![];
        for node in &self.view.nodes {
            // A node whose agent a test stopped has no status: its logs are still checked.
            let Some(st) = self.try_status(&node.name) else {
                continue;
            };
            for (reason, n) in &st.drops {
                if *n > 0
                    && BUG_DROP_REASONS.contains(&reason.as_str())
                    && !expected.drops.contains(reason)
                {
                    v.push(format!("{}: {n} drops with reason {reason}", node.name));
                }
            }
        }
        // `lab up`'s own readiness probes of spire-agent (not veil) may draw `No identity
        // issued`: lines naming one of their pids are the lab tool's, not a violation.
        let probes: Vec<String> = veil_agent::lab::LabPaths::new(&self.name)
            .ok()
            .and_then(|p| {
                std::fs::read_to_string(veil_agent::lab::spire_real::probe_pids_path(&p)).ok()
            })
            .unwrap_or_default()
            .lines()
            .map(|pid| format!(" pid={} ", pid.trim()))
            .collect();
        let dir = veil_agent::lab::run_root().join(&self.name).join("logs");
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = e.path();
            let file = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for line in text.lines() {
                if log_line_is_error(&file, line)
                    && !expected.log_lines.iter().any(|n| line.contains(n.as_str()))
                    && !probes.iter().any(|p| line.contains(p.as_str()))
                {
                    v.push(format!("{file}: {line}"));
                }
            }
        }
        v
    }
    fn down_inner(&mut self) {
        let out = veil(&["lab", "down", "--name", &self.name]);
        if !out.status.success() {
            eprintln!(
                "lab down {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.is_down {
            return;
        }
        if std::thread::panicking() {
            eprintln!(
                "--- logs of lab {} ---\n{}",
                self.name,
                collect_logs(&self.name)
            );
            self.down_inner();
            return;
        }
        let violations = self.invariant_violations();
        self.down_inner();
        assert_invariants(&self.name, violations);
    }
}

/// Fails the test on post-test invariant violations (the lab is already down).
fn assert_invariants(name: &str, violations: Vec<String>) {
    assert!(
        violations.is_empty(),
        "post-test invariants (scenario 39) of lab {name} violated; if the test provokes these \
         on purpose, declare them with Lab::expect_drops / Lab::expect_log_lines:\n{}",
        violations.join("\n")
    );
}

/// An error or panic line of a lab log: a Rust panic anywhere, an ERROR event of an agent,
/// an error of SPIRE (`level=error`), of veil-wg or of veil-proxy.
fn log_line_is_error(file: &str, line: &str) -> bool {
    line.contains("panicked at")
        || (file.starts_with("agent-") && line.contains(" ERROR "))
        || line.contains("level=error")
        || (file.starts_with("wg-") && line.starts_with("veil-wg: error"))
        || (file.starts_with("proxy-")
            && (line.contains(" ERROR ") || line.starts_with("veil-proxy: ")))
}

/// The tail of every log file of a lab, for failure reports.
pub fn collect_logs(name: &str) -> String {
    let dir = veil_agent::lab::run_root().join(name).join("logs");
    let mut out = String::new();
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(30)..];
            out.push_str(&format!(
                "== {} ==\n{}\n",
                e.path().display(),
                tail.join("\n")
            ));
        }
    }
    out
}

/// A client process whose stdout lines are collected while it runs, so a test can wait until its
/// stream flows (`line_count`, with `Lab::wait_for`) instead of sleeping. Killed on drop if still
/// running.
pub struct Streaming {
    child: Child,
    out: Arc<Mutex<Stamped>>,
    err: Arc<Mutex<Stamped>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

/// Output lines with the instant each was read (to measure gaps and place lines in a window).
pub type Stamped = Vec<(Instant, String)>;

impl Streaming {
    /// Spawns `cmd` with stdout and stderr piped.
    pub fn spawn(cmd: &mut Command) -> Streaming {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn client");
        let (out, err): (Arc<Mutex<Stamped>>, Arc<Mutex<Stamped>>) = Default::default();
        let readers = [
            (
                Box::new(child.stdout.take().expect("piped")) as Box<dyn std::io::Read + Send>,
                out.clone(),
            ),
            (Box::new(child.stderr.take().expect("piped")), err.clone()),
        ]
        .into_iter()
        .map(|(pipe, sink)| {
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push((Instant::now(), line));
                }
            })
        })
        .collect();
        Streaming {
            child,
            out,
            err,
            readers,
        }
    }

    /// Lines the client has printed so far.
    pub fn line_count(&self) -> usize {
        self.out.lock().unwrap().len()
    }

    /// Waits for the client to exit; returns every stdout line and its stderr.
    pub fn finish(self) -> (Vec<String>, String) {
        let (out, err) = self.finish_stamped();
        let stderr = err.into_iter().map(|(_, l)| l + "\n").collect();
        (out.into_iter().map(|(_, l)| l).collect(), stderr)
    }

    /// Waits for the client to exit; returns its stdout and stderr lines with their arrival.
    pub fn finish_stamped(mut self) -> (Stamped, Stamped) {
        let _ = self.child.wait();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let out = std::mem::take(&mut *self.out.lock().unwrap());
        let err = std::mem::take(&mut *self.err.lock().unwrap());
        (out, err)
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// kubectl's arguments for a merge patch of `kind`/`name`'s status subresource (what a kubelet
/// writes: a Node's addresses and conditions, a Pod's phase and IPs).
pub fn status_patch<'a>(kind: &'a str, name: &'a str, json: &'a str) -> [&'a str; 7] {
    [
        "patch",
        kind,
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        json,
    ]
}

/// Runs `kubectl --kubeconfig KUBECONFIG ARGS` with `stdin`; panics with its output when it
/// fails; returns stdout.
pub fn kubectl(kubectl: &Path, kubeconfig: &Path, args: &[&str], stdin: &str) -> String {
    let mut child = Command::new(kubectl)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kubectl");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(stdin.as_bytes())
        .expect("write kubectl's stdin");
    let out = child.wait_with_output().expect("wait for kubectl");
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A wall clock of its own for the processes started with [`FakeClock::env`]: libfaketime
/// (Debian package `faketime`, installed by `scripts/setup.sh`) preloaded, their
/// `CLOCK_REALTIME` offset by what [`FakeClock::set`] last wrote (read at every call), their
/// monotonic clocks true, as when a host's clock is stepped by hand or by NTP.
pub struct FakeClock {
    file: TempFile,
}

impl FakeClock {
    /// A clock that starts right (offset `+0`).
    pub fn new(name: &str) -> FakeClock {
        FakeClock {
            file: TempFile::new(&format!("{name}.clock"), "+0\n"),
        }
    }

    /// Steps the clock to `offset` from the true time: libfaketime's relative format, such as
    /// `-5m`, `+2h` or `+0`.
    pub fn set(&self, offset: &str) {
        std::fs::write(&self.file.path, format!("{offset}\n")).expect("write the fake clock");
    }

    /// The environment that puts a process on this clock.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("LD_PRELOAD", libfaketime().display().to_string()),
            (
                "FAKETIME_TIMESTAMP_FILE",
                self.file.path.display().to_string(),
            ),
            ("FAKETIME_NO_CACHE", "1".into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
        ]
    }
}

impl Drop for FakeClock {
    /// Also removes the shared memory libfaketime leaves behind a process that was killed
    /// (`/dev/shm/faketime_shm_<pid>`, `sem.faketime_sem_<pid>`): those of processes no longer
    /// running (gone, or a zombie not yet reaped), whoever started them.
    fn drop(&mut self) {
        let Ok(dir) = std::fs::read_dir("/dev/shm") else {
            return;
        };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix("faketime_shm_")
                .or_else(|| name.strip_prefix("sem.faketime_sem_"))
                .and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| !running(p)) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Whether process `pid` exists and has not exited (a zombie has).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // `pid (comm) state ...`; comm may hold spaces and parentheses.
            let (_, rest) = stat.rsplit_once(')')?;
            rest.split_whitespace().next().map(|state| state != "Z")
        })
        .unwrap_or(false)
}

/// libfaketime's preloadable library; a missing one fails the test.
fn libfaketime() -> PathBuf {
    std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "libfaketimeMT.so.1 not found under /usr/lib/*/faketime: scripts/setup.sh \
                 installs the Debian package faketime"
            )
        })
}

/// A file removed on drop.
pub struct TempFile {
    pub path: PathBuf,
}

impl TempFile {
    pub fn new(name: &str, contents: impl AsRef<[u8]>) -> Self {
        let dir = std::env::temp_dir().join("veil-tests");
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(name);
        std::fs::write(&path, contents).expect("write temp file");
        Self { path }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Polls `f` every `every` until it returns Some; fails the test once `timeout` has passed.
pub fn poll_until<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    f: impl FnMut() -> Option<T>,
) -> T {
    poll_for(timeout, every, f)
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// Polls `f` every `every` until it returns Some, for `timeout` at most; None if it never did
/// (for a caller whose own assertion then says what is missing).
pub fn poll_for<T>(
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        // The poll interval of this wait, not a wait of its own.
        std::thread::sleep(every);
    }
}

/// After an agent restart: every program link was adopted but the hold device's (the hold
/// device is the agent's own TUN, recreated with it, and its link with it).
pub fn assert_links_adopted(st: &Status) {
    assert!(
        st.programs
            .iter()
            .all(|p| p.adopted || p.interface == "veil-hold"),
        "{:?}",
        st.programs
    );
}

/// Appends `value` to `seen` when it is there and differs from the last value seen (serials,
/// epochs, keys as they change over an observation).
pub fn push_changed<T: PartialEq>(seen: &mut Vec<T>, value: Option<T>) {
    if let Some(v) = value {
        if seen.last() != Some(&v) {
            seen.push(v);
        }
    }
}

/// Sequence numbers 1..=n missing from the echoed lines `<prefix><i>`.
pub fn missing(lines: &[String], prefix: &str, n: u32) -> Vec<u32> {
    (1..=n)
        .filter(|i| !lines.iter().any(|l| *l == format!("{prefix}{i}")))
        .collect()
}

/// Every line of a TCP echo stream and every UDP probe of [`Lab::echo_client`] (`n` each) came
/// back.
pub fn assert_all_echoed(tcp_lines: &[String], udp_lines: &[String], n: u32) {
    assert_eq!(
        missing(tcp_lines, "line-", n),
        Vec::<u32>::new(),
        "TCP stream lost lines"
    );
    assert_eq!(
        missing(udp_lines, "seq-", n),
        Vec::<u32>::new(),
        "UDP probes lost"
    );
}

/// A TCP echo stream and a sequenced UDP probe from one pod ([`Lab::echo_client`], `n` lines
/// each): the load under which the rotation and revocation tests change something.
pub struct EchoLoad {
    pub n: u32,
    tcp: Streaming,
    udp: Streaming,
}

impl EchoLoad {
    /// Waits (10 s at most) until both streams flow: more than 10 lines echoed each.
    pub fn wait_flowing(&self, lab: &Lab) {
        lab.wait_for("the streams to start", Duration::from_secs(10), || {
            (self.tcp.line_count() > 10 && self.udp.line_count() > 10).then_some(())
        });
    }

    /// Ends both; the (TCP, UDP) lines echoed back.
    pub fn finish(self) -> (Vec<String>, Vec<String>) {
        (self.tcp.finish().0, self.udp.finish().0)
    }
}

/// Calls `sample` with the time elapsed every `every` until `window` has passed: the sampling
/// loop of an observation (serials, epochs, keys under load), not a wait for an event.
pub fn sample_for(window: Duration, every: Duration, mut sample: impl FnMut(Duration)) {
    let start = Instant::now();
    while start.elapsed() < window {
        sample(start.elapsed());
        std::thread::sleep(every);
    }
}

/// The drops of `reason` that `st` counts (0 when there were none).
pub fn drop_count(st: &Status, reason: &str) -> u64 {
    st.drops.get(reason).copied().unwrap_or(0)
}

/// Fails the test if `st` counted a drop of any of `reasons`.
pub fn assert_no_drops(st: &Status, reasons: &[&str]) {
    for r in reasons {
        assert_eq!(drop_count(st, r), 0, "{}: {r} drops", st.node);
    }
}

/// The serial of the SVID in `st` whose SPIFFE ID ends with `suffix`.
pub fn serial_of(st: &Status, suffix: &str) -> Option<String> {
    st.svids
        .iter()
        .find(|v| v.spiffe_id.ends_with(suffix))
        .map(|v| v.serial.clone())
}

/// Runs `cmd` to completion; panics, naming it and its stderr, unless it succeeds; returns its
/// stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip netns exec NETNS ARGV...`; panics unless it succeeds; returns stdout.
pub fn ip_netns(netns: &str, argv: &[&str]) -> String {
    run_ok(Command::new("ip").args(["netns", "exec", netns]).args(argv))
}

/// The MTU of a device in a network namespace.
pub fn link_mtu(netns: &str, dev: &str) -> u32 {
    let out = ip_netns(netns, &["ip", "-o", "link", "show", "dev", dev]);
    out.split_whitespace()
        .skip_while(|w| *w != "mtu")
        .nth(1)
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no mtu in {out}"))
}

/// `http://<ip>:<port>/`, an IPv6 address in brackets.
pub fn http_url(ip: &str, port: u16) -> String {
    format!("{}/", http_origin(ip, port))
}

/// `http://<ip>:<port>` without a path, an IPv6 address in brackets.
pub fn http_origin(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("http://[{ip}]:{port}")
    } else {
        format!("http://{ip}:{port}")
    }
}

/// The wall clock as time since the Unix epoch (what status timestamps are compared with).
pub fn since_epoch() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
}

/// A number that differs between calls, for names of files and markers.
pub fn rand_suffix() -> u32 {
    since_epoch().subsec_nanos()
}

/// Whether `needle` occurs in `hay` (a marker in a capture, a token in a frame).
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// EtherType of the frame that marks the end of a capture (IEEE 802 local experimental).
pub const END_ETHERTYPE: u16 = 0x88b5;

/// Sends one raw Ethernet frame out of `ifname` in `netns`.
pub fn send_frame(netns: &str, ifname: &str, frame: Vec<u8>) {
    let ifname = std::ffi::CString::new(ifname).unwrap();
    let sent = veil_agent::sys::in_netns(netns, move || -> std::io::Result<()> {
        // SAFETY: plain syscalls on a socket this closure opens and closes; `addr` and `frame`
        // outlive the calls that read them.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = libc::if_nametoindex(ifname.as_ptr()) as i32;
            addr.sll_halen = 6;
            addr.sll_addr[..6].copy_from_slice(&frame[..6]);
            let n = libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            );
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if n < 0 {
                return Err(err);
            }
        }
        Ok(())
    })
    .expect("enter the netns");
    sent.expect("send a raw frame");
}

/// The frames of a pcap file of Ethernet link type (as tcpdump writes them), each cut to its
/// captured length.
pub fn pcap_frames(pcap: &[u8]) -> Vec<&[u8]> {
    assert!(pcap.len() >= 24, "not a pcap file");
    let le = pcap[..4] == [0xd4, 0xc3, 0xb2, 0xa1] || pcap[..4] == [0x4d, 0x3c, 0xb2, 0xa1];
    let u32_at = |b: &[u8]| {
        let a = [b[0], b[1], b[2], b[3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    assert_eq!(u32_at(&pcap[20..24]), 1, "capture is not Ethernet");
    let mut frames = Vec::new();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let caplen = u32_at(&pcap[at + 8..at + 12]) as usize;
        let frame = &pcap[at + 16..(at + 16 + caplen).min(pcap.len())];
        at += 16 + caplen;
        frames.push(frame);
    }
    frames
}

/// The facts of one IPv4 or IPv6 frame of a capture that the MTU and fragmentation checks need.
#[derive(Debug)]
pub struct IpFrame {
    pub src: String,
    pub dst: String,
    /// The IP datagram's length: IPv4's total length, or IPv6's payload length plus its 40-byte
    /// header.
    pub total_len: u32,
    /// IPv4: more-fragments set or a non-zero fragment offset. IPv6: a fragment header.
    pub is_fragment: bool,
    /// UDP ports of whole datagrams and first fragments.
    pub udp_ports: Option<(u16, u16)>,
    /// For a UDP payload made of WireGuard data messages: the length of each message. veil-wg
    /// sends with UDP GSO and the lab's veths and bridge keep the batch whole, so tcpdump on the
    /// bridge sees one "frame" per batch; each message becomes its own datagram of this length
    /// (the last may be shorter) wherever the batch is segmented.
    pub wg_segment: Option<usize>,
    /// The IP and UDP headers' length in front of the UDP payload (28 or 48).
    pub udp_headers: u32,
}

impl IpFrame {
    /// The IP length of the largest datagram this frame stands for on a wire.
    pub fn wire_len(&self) -> u32 {
        match self.wg_segment {
            Some(seg) => self.total_len.min(seg as u32 + self.udp_headers),
            None => self.total_len,
        }
    }

    /// The WireGuard datagrams this frame stands for (a GSO batch counts each message).
    pub fn wg_datagrams(&self) -> usize {
        match self.wg_segment {
            Some(seg) => ((self.total_len - self.udp_headers) as usize).div_ceil(seg),
            None => 1,
        }
    }
}

/// The segment length of a UDP payload that is a batch of WireGuard data messages (type 4, all
/// to one receiver index, equal lengths but the last): the smallest length at whose every
/// multiple such a header starts. A false match needs 8 ciphertext bytes to equal the header.
fn wg_segment(p: &[u8]) -> Option<usize> {
    if p.len() < 32 || p[..4] != [4, 0, 0, 0] {
        return None;
    }
    (32..=p.len()).find(|&seg| {
        (seg..p.len())
            .step_by(seg)
            .all(|at| p[at..].len() >= 32 && p[at..at + 8] == p[..8])
    })
}

/// One IPv4 or IPv6 frame's facts; `None` for anything else. IPv6 extension headers other than
/// a fragment header directly after the fixed header are not walked (veil sends none).
fn ip_frame(frame: &[u8]) -> Option<IpFrame> {
    let be16 = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    let udp = |proto: u8, first: bool, whole: bool, l4: &[u8]| {
        let ports = (proto == 17 && first && l4.len() >= 4).then(|| (be16(l4), be16(&l4[2..])));
        let seg = (proto == 17 && whole && l4.len() >= 8)
            .then(|| wg_segment(&l4[8..]))
            .flatten();
        (ports, seg)
    };
    match frame.get(12..14)? {
        [0x08, 0x00] if frame.len() >= 34 => {
            let ip = &frame[14..];
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let frag = be16(&ip[6..8]);
            let l4 = ip.get(ihl..).unwrap_or_default();
            let (udp_ports, wg_segment) = udp(ip[9], frag & 0x1fff == 0, frag & 0x3fff == 0, l4);
            Some(IpFrame {
                src: std::net::Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]).to_string(),
                dst: std::net::Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]).to_string(),
                total_len: u32::from(be16(&ip[2..4])),
                is_fragment: frag & 0x2000 != 0 || frag & 0x1fff != 0,
                udp_ports,
                wg_segment,
                udp_headers: ihl as u32 + 8,
            })
        }
        [0x86, 0xdd] if frame.len() >= 54 => {
            let ip = &frame[14..];
            let addr = |b: &[u8]| std::net::Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap());
            let is_fragment = ip[6] == 44;
            let l4 = &ip[40..];
            let (udp_ports, wg_segment) = udp(ip[6], true, true, l4);
            Some(IpFrame {
                src: addr(&ip[8..24]).to_string(),
                dst: addr(&ip[24..40]).to_string(),
                total_len: 40 + u32::from(be16(&ip[4..6])),
                is_fragment,
                udp_ports,
                wg_segment,
                udp_headers: 48,
            })
        }
        _ => None,
    }
}

/// The IPv4 and IPv6 frames of a pcap file (Ethernet link type, as tcpdump writes for the
/// bridge).
pub fn ip_frames(pcap: &[u8]) -> Vec<IpFrame> {
    pcap_frames(pcap).into_iter().filter_map(ip_frame).collect()
}

/// A tcpdump writing a pcap of one interface in one netns, independent of `veil check`; stopped
/// (or killed on drop) with its file removed.
pub struct Capture {
    child: Child,
    file: PathBuf,
    netns: String,
    ifname: String,
    /// tcpdump's stderr after "listening on", read to its end (its drop statistics).
    stderr: Option<std::thread::JoinHandle<String>>,
    /// `stop` fails the test if tcpdump lost packets ([`Capture::start_lossless`]).
    is_lossless: bool,
}

impl Capture {
    /// Starts tcpdump on `ifname` in `netns`; returns once it listens.
    pub fn start(netns: &str, ifname: &str) -> Capture {
        Capture::spawn(netns, ifname, false, None)
    }

    /// `start` with a larger kernel buffer, for captures that must be complete (a frame tcpdump
    /// did not keep could be the leak): `stop` fails the test if tcpdump lost any.
    pub fn start_lossless(netns: &str, ifname: &str) -> Capture {
        Capture::spawn(netns, ifname, true, None)
    }

    /// [`Capture::start_lossless`] of every frame but WireGuard's (UDP from port 51820 to port
    /// 51820): a capture that stays complete while the tunnel runs at line rate, and still
    /// holds any frame that leaves in clear.
    pub fn start_lossless_but_wireguard(netns: &str, ifname: &str) -> Capture {
        Capture::spawn(
            netns,
            ifname,
            true,
            Some("not (udp src port 51820 and udp dst port 51820)"),
        )
    }

    fn spawn(netns: &str, ifname: &str, is_lossless: bool, filter: Option<&str>) -> Capture {
        let file =
            std::env::temp_dir().join(format!("veil-capture-{netns}-{}.pcap", rand_suffix()));
        let buffer: &[&str] = if is_lossless { &["-B", "131072"] } else { &[] };
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns, "tcpdump", "--immediate-mode", "-U"])
            .args(["-s", "0"])
            .args(buffer)
            .args(["-i", ifname, "-w"])
            .arg(&file)
            .args(filter)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump (scripts/setup.sh installs it)");
        let mut err = child.stderr.take().unwrap();
        let mut seen = String::new();
        let mut buf = [0u8; 256];
        while !seen.contains("listening on") {
            let n = err.read(&mut buf).expect("tcpdump stderr");
            assert!(n > 0, "tcpdump exited: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        let stderr = std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = err.read_to_string(&mut rest);
            rest
        });
        Capture {
            child,
            file,
            netns: netns.to_string(),
            ifname: ifname.to_string(),
            stderr: Some(stderr),
            is_lossless,
        }
    }

    /// Stops the capture; returns the raw pcap bytes.
    pub fn stop(mut self) -> Vec<u8> {
        self.finish();
        std::fs::read(&self.file).expect("pcap file")
    }

    /// Stops the capture; returns (raw pcap bytes, tcpdump's one-line decode of each packet but
    /// the end-of-capture frame).
    pub fn stop_decoded(mut self) -> (Vec<u8>, Vec<String>) {
        self.finish();
        let raw = std::fs::read(&self.file).expect("pcap file");
        let text = Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(&self.file)
            .arg(format!("not ether proto {END_ETHERTYPE:#06x}"))
            .output()
            .expect("tcpdump -r");
        let lines = String::from_utf8_lossy(&text.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        (raw, lines)
    }

    /// Ends tcpdump once everything sent before this call is in the file.
    fn finish(&mut self) {
        // What the test sent has crossed the interface when it stops the capture; what may lag
        // is tcpdump writing it. A frame sent on the interface now is queued to tcpdump behind
        // all of it, so once that frame is in the file, everything before it is too.
        let end = format!("veil-capture-end-{}", rand_suffix());
        let mut frame = vec![0xff; 6];
        frame.extend([0x02, 0, 0, 0, 0, 0x01]);
        frame.extend(END_ETHERTYPE.to_be_bytes());
        frame.extend(end.as_bytes());
        send_frame(&self.netns, &self.ifname, frame);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !contains(
            &std::fs::read(&self.file).unwrap_or_default(),
            end.as_bytes(),
        ) {
            assert!(
                Instant::now() < deadline,
                "tcpdump did not write the end-of-capture frame within 5 s"
            );
            // Poll interval of the wait for the end frame.
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
        let stats = self.stderr.take().unwrap().join().unwrap();
        if self.is_lossless {
            let dropped = stats
                .lines()
                .find_map(|l| l.strip_suffix(" packets dropped by kernel"))
                .and_then(|n| n.trim().parse::<u64>().ok());
            assert_eq!(dropped, Some(0), "tcpdump lost packets: {stats}");
        }
    }
}

/// A test that fails before `stop` must not leave tcpdump running or its pcap behind.
impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.file);
    }
}

/// Everything on the host that still carries a lab's name: netns, cgroup, pins, state, processes.
pub fn leftovers(name: &str, view: Option<&LabView>) -> Vec<String> {
    let mut left = Vec::new();
    let netns: Vec<String> = std::fs::read_dir("/var/run/netns")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    if let Some(v) = view {
        let mine: Vec<&str> = std::iter::once(v.underlay.netns.as_str())
            .chain(v.nodes.iter().map(|n| n.netns.as_str()))
            .chain(v.pods.iter().map(|p| p.netns.as_str()))
            .collect();
        for ns in &netns {
            if mine.contains(&ns.as_str()) {
                left.push(format!("netns {ns}"));
            }
        }
        // Host-side interfaces: nothing of a lab may appear in the host namespace either.
        let links = Command::new("ip")
            .args(["-o", "link", "show"])
            .output()
            .expect("ip link");
        let links = String::from_utf8_lossy(&links.stdout);
        for p in &v.pods {
            if links.contains(&format!(" {}@", p.host_veth))
                || links.contains(&format!(" {}:", p.host_veth))
            {
                left.push(format!("veth {}", p.host_veth));
            }
        }
        for n in &v.nodes {
            if Path::new(&n.cgroup).exists() {
                left.push(format!("cgroup {}", n.cgroup));
            }
            if Path::new(&n.pin_dir).exists() {
                left.push(format!("pins {}", n.pin_dir));
            }
            let sock = Path::new("/var/run/wireguard").join(format!("{}.sock", n.wg_interface));
            if sock.exists() {
                left.push(format!("uapi socket {}", sock.display()));
            }
        }
    }
    let state = veil_agent::lab::run_root().join(name);
    if state.exists() {
        left.push(format!("state {}", state.display()));
    }
    let bpf = Path::new("/sys/fs/bpf/veil").join(name);
    if bpf.exists() {
        left.push(format!("pins {}", bpf.display()));
    }
    if let Ok(root) = veil_agent::sys::cgroup2_root() {
        let cg = root.join("veil").join(name);
        if cg.exists() {
            left.push(format!("cgroup {}", cg.display()));
        }
    }
    let needle = format!("/run/veil/{name}/");
    let needle2 = format!("--name\0{name}\0");
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if (cmdline.contains(&needle) || cmdline.contains(&needle2))
                && pid != std::process::id()
            {
                left.push(format!("process {pid}: {}", cmdline.replace('\0', " ")));
            }
        }
    }
    left
}

/// frontend and intruder on node-a, backend on node-b serving HTTP on 8080 and an echo
/// (TCP and UDP) on 9000; the soak runs on the same lab.
pub const ECHO_LAB: &str = include_str!("../data/echo-lab.yaml");

/// backend admits frontend on 8080/TCP and 9000 (any protocol), mutual auth required: the
/// demo's policy (`examples/policies/`).
pub const AUTH_POLICY: &str = include_str!("../../examples/policies/backend-ingress-auth.yaml");
