//! `veil-cni` driven the way a container runtime drives it: run in a "node" network namespace
//! (`ip netns exec`), CNI_* variables and the network configuration on stdin, chained with the
//! real `host-local` IPAM plugin from `/usr/lib/cni` (Debian's containernetworking-plugins,
//! installed by `scripts/setup.sh`). Every namespace and directory is the test's own (`vcni-`
//! + a unique name) and removed on drop; no packet leaves them.
//!
//! Needs root; without it the tests fail, never skip.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use serde_json::{json, Value};
use veil_agent::cluster::kubernetes::host_veth_name;
use veil_tests::{ip_netns, link_mtu, require_lab_environment, run_ok, unique_name, veil_bin};

const HOST_LOCAL_DIR: &str = "/usr/lib/cni";
const GATEWAY: &str = "198.19.200.1";
const GATEWAY6: &str = "fd00:198:19:200::1";
const MTU: u32 = 1400;
/// Two addresses, so that a full range and a released address can both be seen.
const RANGE: [&str; 2] = ["198.19.200.10", "198.19.200.11"];

/// A network namespace removed on drop (also when the test panics).
struct Netns(String);

impl Netns {
    fn new(name: String) -> Netns {
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        Netns(name)
    }

    fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.0)
    }

    /// Interface names in this namespace.
    fn links(&self) -> Vec<String> {
        let out: Value = serde_json::from_str(&ip_netns(&self.0, &["ip", "-j", "link", "show"]))
            .expect("ip -j link show");
        out.as_array()
            .unwrap()
            .iter()
            .map(|l| l["ifname"].as_str().unwrap().to_string())
            .collect()
    }

    fn delete(&self) {
        if self.path().exists() {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.delete();
    }
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One node: its namespace, host-local's state directory, the network configuration.
struct Node {
    netns: Netns,
    data: TempDir,
    unique: String,
    network: String,
    /// Dual stack: a second, IPv6 range and `gateway6`.
    dual: bool,
    /// IPv6 only: an IPv6 range and `gateway6`, no IPv4 range or `gateway`.
    v6_only: bool,
}

/// What one `veil-cni` run printed.
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {:?} (stderr {:?})",
                self.stdout, self.stderr
            )
        })
    }

    fn assert_ok(self, what: &str) -> Run {
        assert!(
            self.ok,
            "{what} failed:\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }

    /// A refused run: non-zero exit and the spec's error JSON with `code`; returns its `msg`.
    fn assert_error(&self, what: &str, code: u64) -> String {
        assert!(!self.ok, "{what} succeeded: {}", self.stdout);
        let j = self.json();
        let mut keys: Vec<&str> = j.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["cniVersion", "code", "details", "msg"],
            "{what}: error JSON {j}"
        );
        assert_eq!(j["code"], code, "{what}: {j}");
        j["msg"].as_str().unwrap().to_string()
    }
}

/// A pod of the test: its namespace, Kubernetes name and container ID.
struct Pod {
    netns: Netns,
    namespace: String,
    name: String,
    container_id: String,
}

impl Pod {
    fn host_veth(&self) -> String {
        host_veth_name(&self.namespace, &self.name)
    }

    fn args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
            self.namespace, self.name, self.container_id
        )
    }
}

impl Node {
    fn new() -> Node {
        require_lab_environment();
        assert!(
            Path::new(HOST_LOCAL_DIR).join("host-local").is_file(),
            "{HOST_LOCAL_DIR}/host-local is missing: run scripts/setup.sh (containernetworking-plugins)"
        );
        assert!(
            cni_bin().is_file(),
            "{} is missing: run `cargo build --release -p veil-agent --bins`",
            cni_bin().display()
        );
        let unique = unique_name();
        let data = TempDir(std::env::temp_dir().join(format!("vcni-{unique}")));
        std::fs::create_dir_all(&data.0).unwrap();
        Node {
            netns: Netns::new(format!("vcni-{unique}-node")),
            data,
            network: format!("vcni-{unique}"),
            unique,
            dual: false,
            v6_only: false,
        }
    }

    fn dual() -> Node {
        Node {
            dual: true,
            ..Node::new()
        }
    }

    fn ipv6_only() -> Node {
        Node {
            v6_only: true,
            ..Node::new()
        }
    }

    fn pod(&self, name: &str) -> Pod {
        Pod {
            netns: Netns::new(format!("vcni-{}-{name}", self.unique)),
            namespace: format!("ns-{}", self.unique),
            name: name.to_string(),
            container_id: format!("{}-{name}-sandbox", self.unique),
        }
    }

    fn config(&self) -> Value {
        let mut c = self.config_v4();
        if self.v6_only {
            c.as_object_mut().unwrap().remove("gateway");
            c["gateway6"] = json!(GATEWAY6);
            c["ipam"]["ranges"] =
                json!([[{"subnet": "fd00:198:19:200::/64", "gateway": GATEWAY6}]]);
        }
        if self.dual {
            c["gateway6"] = json!(GATEWAY6);
            c["ipam"]["ranges"]
                .as_array_mut()
                .unwrap()
                .push(json!([{"subnet": "fd00:198:19:200::/64", "gateway": GATEWAY6}]));
        }
        c
    }

    fn config_v4(&self) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": self.network,
            "type": "veil-cni",
            "mtu": MTU,
            "gateway": GATEWAY,
            "somethingVeilDoesNotKnow": {"ignored": true},
            "ipam": {
                "type": "host-local",
                "ranges": [[{
                    "subnet": "198.19.200.0/24",
                    "rangeStart": RANGE[0],
                    "rangeEnd": RANGE[1],
                    "gateway": GATEWAY,
                }]],
                "dataDir": self.data.0.display().to_string(),
            },
        })
    }

    /// Runs veil-cni in the node's namespace. `env` overrides or (with `None`) unsets variables.
    fn cni(&self, command: &str, pod: &Pod, stdin: &str, env: &[(&str, Option<&str>)]) -> Run {
        let netns = pod.netns.path().display().to_string();
        let args = pod.args();
        let mut vars = vec![
            ("CNI_COMMAND", Some(command)),
            ("CNI_CONTAINERID", Some(pod.container_id.as_str())),
            ("CNI_NETNS", Some(netns.as_str())),
            ("CNI_IFNAME", Some("eth0")),
            ("CNI_ARGS", Some(args.as_str())),
            ("CNI_PATH", Some("/nonexistent:/usr/lib/cni")),
        ];
        for (k, v) in env {
            vars.retain(|(name, _)| name != k);
            vars.push((k, *v));
        }
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns.0]).arg(cni_bin());
        for (k, v) in vars {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run veil-cni");
        {
            use std::io::Write as _;
            let mut pipe = child.stdin.take().unwrap();
            let _ = pipe.write_all(stdin.as_bytes());
        }
        let out = child.wait_with_output().unwrap();
        Run {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn add(&self, pod: &Pod) -> Value {
        let t = Instant::now();
        let result = self
            .cni("ADD", pod, &self.config().to_string(), &[])
            .assert_ok("ADD")
            .json();
        println!("ADD {}: {:?}", pod.name, t.elapsed());
        result
    }

    fn del(&self, pod: &Pod) {
        let t = Instant::now();
        let run = self
            .cni("DEL", pod, &self.config().to_string(), &[])
            .assert_ok("DEL");
        println!("DEL {}: {:?}", pod.name, t.elapsed());
        assert_eq!(run.stdout, "", "DEL prints nothing on success");
    }

    fn check(&self, pod: &Pod, prev: &Value) -> Run {
        let mut config = self.config();
        config["prevResult"] = prev.clone();
        self.cni("CHECK", pod, &config.to_string(), &[])
    }

    /// Addresses host-local holds (one file per address in `dataDir/<network>`).
    fn allocated(&self) -> Vec<IpAddr> {
        let dir = self.data.0.join(&self.network);
        let mut ips: Vec<IpAddr> = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        ips.sort();
        ips
    }

    /// Nothing of any pod is left on the node: only `lo`, and no address held.
    fn assert_empty(&self, after: &str) {
        assert_eq!(self.netns.links(), ["lo"], "links left after {after}");
        assert_eq!(
            self.allocated(),
            Vec::<IpAddr>::new(),
            "addresses left after {after}"
        );
    }
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn cni_bin() -> PathBuf {
    veil_bin().with_file_name("veil-cni")
}

/// The pod address of an ADD result.
fn result_ip(result: &Value) -> Ipv4Addr {
    let address = result["ips"][0]["address"]
        .as_str()
        .expect("ips[0].address");
    address
        .trim_end_matches("/32")
        .parse()
        .expect("an IPv4 /32")
}

#[test]
fn add_check_del_with_host_local() {
    let node = Node::new();
    let a = node.pod("a");
    let b = node.pod("b");
    let c = node.pod("c");

    // ADD: the result names both ends and one address from the range.
    let result = node.add(&a);
    let ip_a = result_ip(&result);
    assert!(RANGE.contains(&ip_a.to_string().as_str()), "{result}");
    assert_eq!(result["cniVersion"], "1.0.0");
    assert_eq!(result["interfaces"][0]["name"], a.host_veth());
    assert_eq!(result["interfaces"][1]["name"], "eth0");
    assert_eq!(
        result["interfaces"][1]["sandbox"],
        a.netns.path().display().to_string()
    );
    assert_eq!(result["ips"][0]["interface"], 1);
    assert_eq!(result["ips"][0]["gateway"], GATEWAY);
    assert_eq!(
        result["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": GATEWAY}])
    );

    // The pod side: eth0 with ip/32, the gateway on link, the default route, the MTU, no IPv6.
    let addr = ip_netns(
        &a.netns.0,
        &["ip", "-4", "-o", "addr", "show", "dev", "eth0"],
    );
    assert!(addr.contains(&format!("inet {ip_a}/32")), "{addr}");
    let routes = ip_netns(&a.netns.0, &["ip", "-4", "route", "show"]);
    assert!(
        routes.contains(&format!("default via {GATEWAY} dev eth0 src {ip_a}")),
        "{routes}"
    );
    assert!(
        routes.contains(&format!("{GATEWAY} dev eth0 scope link")),
        "{routes}"
    );
    assert_eq!(link_mtu(&a.netns.0, "eth0"), MTU);
    let v6 = ip_netns(
        &a.netns.0,
        &["cat", "/proc/sys/net/ipv6/conf/all/disable_ipv6"],
    );
    assert_eq!(v6.trim(), "1");
    let mac = ip_netns(&a.netns.0, &["cat", "/sys/class/net/eth0/address"]);
    assert_eq!(result["interfaces"][1]["mac"], mac.trim());

    // The node side: the host veth the agent looks for, the gateway /32 and the pod's /32 route.
    let hv = a.host_veth();
    assert_eq!(node.netns.links(), ["lo", hv.as_str()]);
    assert_eq!(link_mtu(&node.netns.0, &hv), MTU);
    let addr = ip_netns(
        &node.netns.0,
        &["ip", "-4", "-o", "addr", "show", "dev", &hv],
    );
    assert!(addr.contains(&format!("inet {GATEWAY}/32")), "{addr}");
    let routes = ip_netns(&node.netns.0, &["ip", "-4", "route", "show"]);
    assert!(
        routes.contains(&format!("{ip_a} dev {hv} scope link src {GATEWAY}")),
        "{routes}"
    );

    // Traffic: the pod reaches its gateway (both ends inside the test's namespaces).
    ip_netns(&a.netns.0, &["ping", "-c", "1", "-W", "2", GATEWAY]);

    // CHECK passes with the ADD result, fails with another address.
    node.check(&a, &result).assert_ok("CHECK");
    let mut wrong = result.clone();
    wrong["ips"][0]["address"] = json!("198.19.200.99/32");
    let msg = node
        .check(&a, &wrong)
        .assert_error("CHECK with another address", 101);
    assert!(msg.contains("198.19.200.99/32"), "{msg}");

    // A second pod gets the other address; the range is then full and a third ADD is refused
    // with host-local's own error, leaving nothing.
    let ip_b = result_ip(&node.add(&b));
    assert_ne!(ip_a, ip_b);
    assert_eq!(node.allocated().len(), 2);
    let full = node.cni("ADD", &c, &node.config().to_string(), &[]);
    let msg = full.assert_error(
        "ADD into a full range",
        full.json()["code"].as_u64().unwrap(),
    );
    assert!(msg.contains("host-local"), "{msg}");
    assert_eq!(c.netns.links(), ["lo"]);
    assert!(!node.netns.links().contains(&c.host_veth()));

    // DEL removes both ends and frees the address; twice is fine; CHECK then fails.
    node.del(&a);
    assert!(
        !node.netns.links().contains(&hv),
        "{:?}",
        node.netns.links()
    );
    assert_eq!(a.netns.links(), ["lo"]);
    assert_eq!(node.allocated(), [IpAddr::V4(ip_b)]);
    node.del(&a);
    assert!(!node.check(&a, &result).ok, "CHECK after DEL passed");

    // The freed address is the only one left: the next pod gets it.
    let result_c = node.add(&c);
    assert_eq!(result_ip(&result_c), ip_a);
    node.check(&c, &result_c)
        .assert_ok("CHECK of the reused address");
    ip_netns(&c.netns.0, &["ping", "-c", "1", "-W", "2", GATEWAY]);

    // DEL after the runtime removed the pod's namespace (the veth went with it).
    b.netns.delete();
    node.del(&b);
    node.del(&c);
    node.assert_empty("every DEL");
}

/// The IPv6 address of an ADD result's `ips[i]` (from node-b's IPv6 range, `gateway6` its
/// gateway).
fn ipv6_of(result: &Value, i: usize) -> String {
    let ip6 = result["ips"][i]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no address {i} in {result}"))
        .trim_end_matches("/128")
        .to_string();
    assert!(ip6.starts_with("fd00:198:19:200::"), "{result}");
    assert_eq!(result["ips"][i]["gateway"], GATEWAY6);
    ip6
}

/// A pod's IPv6 side as ADD made it: its /128 address, its default route through `gateway6`,
/// the node's /128 route to it, `gateway6` answering; CHECK passes, and fails 101 naming
/// `gateway6` once the pod's IPv6 default route is deleted.
fn assert_ipv6_pod(node: &Node, pod: &Pod, ip6: &str, result: &Value) {
    let addr = ip_netns(
        &pod.netns.0,
        &["ip", "-6", "-o", "addr", "show", "dev", "eth0"],
    );
    assert!(addr.contains(&format!("inet6 {ip6}/128")), "{addr}");
    let routes = ip_netns(&pod.netns.0, &["ip", "-6", "route", "show"]);
    assert!(
        routes.contains(&format!("default via {GATEWAY6} dev eth0 src {ip6}")),
        "{routes}"
    );
    let hv = pod.host_veth();
    let node_routes = ip_netns(&node.netns.0, &["ip", "-6", "route", "show"]);
    assert!(
        node_routes.contains(&format!("{ip6} dev {hv}")),
        "{node_routes}"
    );
    ip_netns(
        &pod.netns.0,
        &["ping", "-6", "-c", "1", "-W", "2", GATEWAY6],
    );
    node.check(pod, result)
        .assert_ok("CHECK of a pod with IPv6");
    ip_netns(&pod.netns.0, &["ip", "-6", "route", "del", "default"]);
    let msg = node
        .check(pod, result)
        .assert_error("CHECK without the IPv6 default route", 101);
    assert!(msg.contains(GATEWAY6), "{msg}");
}

/// Dual stack: host-local with an IPv6 range beside the IPv4 one hands the pod one address of
/// each; veil-cni configures both (the pod reaches both gateways), CHECK verifies both and names
/// what differs, DEL frees both.
#[test]
fn dual_stack_add_check_del_with_host_local() {
    let node = Node::dual();
    let a = node.pod("a");
    let result = node.add(&a);
    let ip_a = result_ip(&result);
    assert_eq!(
        result["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": GATEWAY}, {"dst": "::/0", "gw": GATEWAY6}])
    );
    let ip6 = ipv6_of(&result, 1);
    let hv = a.host_veth();
    let dad = ip_netns(
        &node.netns.0,
        &["cat", &format!("/proc/sys/net/ipv6/conf/{hv}/accept_dad")],
    );
    assert_eq!(
        dad.trim(),
        "0",
        "duplicate address detection on the host veth"
    );
    ip_netns(&a.netns.0, &["ping", "-c", "1", "-W", "2", GATEWAY]);
    assert_ipv6_pod(&node, &a, &ip6, &result);

    node.del(&a);
    assert_eq!(a.netns.links(), ["lo"]);
    let held: Vec<String> = std::fs::read_dir(node.data.0.join(&node.network))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str().map(str::to_string))
        .filter(|f| f.parse::<std::net::IpAddr>().is_ok())
        .collect();
    assert!(
        held.is_empty(),
        "addresses left after DEL: {held:?} ({ip_a})"
    );

    // Without `gateway6` an IPv6 address from IPAM is refused (102) and released.
    let b = node.pod("b");
    let mut no_gw6 = node.config();
    no_gw6.as_object_mut().unwrap().remove("gateway6");
    let run = node.cni("ADD", &b, &no_gw6.to_string(), &[]);
    let msg = run.assert_error("ADD of IPv6 without gateway6", 102);
    assert!(
        msg.contains("gateway6") || run.stdout.contains("gateway6"),
        "{}",
        run.stdout
    );
    assert_eq!(b.netns.links(), ["lo"]);
    node.assert_empty("the refused ADD");
}

/// IPv6 only: host-local with only an IPv6 range and `gateway6` without `gateway` give the pod
/// one IPv6 address, its default route through `gateway6`, and no IPv4 at all.
#[test]
fn ipv6_only_add_check_del_with_host_local() {
    let node = Node::ipv6_only();
    let a = node.pod("a");
    let result = node.add(&a);
    assert_eq!(result["ips"].as_array().map(Vec::len), Some(1), "{result}");
    assert_eq!(result["routes"], json!([{"dst": "::/0", "gw": GATEWAY6}]));
    let ip6 = ipv6_of(&result, 0);
    let v4 = ip_netns(
        &a.netns.0,
        &["ip", "-4", "-o", "addr", "show", "dev", "eth0"],
    );
    assert_eq!(v4.trim(), "", "an IPv4 address on an IPv6-only pod");
    assert_ipv6_pod(&node, &a, &ip6, &result);

    node.del(&a);
    assert_eq!(a.netns.links(), ["lo"]);
    node.assert_empty("DEL of the IPv6-only pod");
}

#[test]
fn bad_input_is_refused_with_its_code_and_leaves_nothing() {
    let node = Node::new();
    let pod = node.pod("p");
    let config = node.config();
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut c = config.clone();
        f(&mut c);
        c.to_string()
    };

    let version = node
        .cni("VERSION", &pod, "", &[])
        .assert_ok("VERSION")
        .json();
    assert_eq!(
        version,
        json!({"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0"]})
    );

    type Case<'a> = (
        &'a str,
        &'a str,
        String,
        Vec<(&'a str, Option<&'a str>)>,
        u64,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "STATUS (CNI 1.1)",
            "STATUS",
            config.to_string(),
            vec![],
            4,
            "CNI_COMMAND",
        ),
        (
            "no ipam",
            "ADD",
            edit(&|c| drop(c.as_object_mut().unwrap().remove("ipam"))),
            vec![],
            7,
            "ipam",
        ),
        (
            "unknown ipam type",
            "ADD",
            edit(&|c| c["ipam"]["type"] = json!("no-such-ipam")),
            vec![],
            7,
            "no-such-ipam",
        ),
        (
            "no K8S_POD_NAME",
            "ADD",
            config.to_string(),
            vec![("CNI_ARGS", Some("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop"))],
            4,
            "K8S_POD_NAME",
        ),
        (
            "no CNI_ARGS on CHECK",
            "CHECK",
            edit(&|c| c["prevResult"] = json!({"ips": [{"address": "198.19.200.10/32"}]})),
            vec![("CNI_ARGS", None)],
            4,
            "K8S_POD_NAMESPACE",
        ),
        (
            "no CNI_CONTAINERID",
            "ADD",
            config.to_string(),
            vec![("CNI_CONTAINERID", None)],
            4,
            "CNI_CONTAINERID",
        ),
        (
            "missing netns",
            "ADD",
            config.to_string(),
            vec![("CNI_NETNS", Some("/var/run/netns/vcni-does-not-exist"))],
            4,
            "does not exist",
        ),
        (
            "old version",
            "ADD",
            edit(&|c| c["cniVersion"] = json!("0.3.1")),
            vec![],
            1,
            "0.3.1",
        ),
        (
            "not JSON",
            "ADD",
            "{\"cniVersion\": ".to_string(),
            vec![],
            6,
            "not JSON",
        ),
        (
            "mtu of the wrong type",
            "ADD",
            edit(&|c| c["mtu"] = json!("big")),
            vec![],
            7,
            "mtu",
        ),
        (
            "CHECK without prevResult",
            "CHECK",
            config.to_string(),
            vec![],
            7,
            "prevResult",
        ),
    ];
    for (what, command, stdin, env, code, needle) in &cases {
        let msg = node
            .cni(command, &pod, stdin, env)
            .assert_error(what, *code);
        assert!(
            msg.contains(needle),
            "{what}: {msg:?} does not name {needle:?}"
        );
        node.assert_empty(what);
        assert_eq!(pod.netns.links(), ["lo"], "{what}");
    }

    // A failure after the address was allocated and the veth made (the pod already has a
    // default route, so veil-cni's cannot be added): the address is released and both ends go.
    // (A veth pair inside the pod stands in for another device: this kernel has no dummy.)
    for argv in [
        &[
            "ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1",
        ][..],
        &["ip", "addr", "add", "198.19.250.2/24", "dev", "d0"],
        &["ip", "link", "set", "d0", "up"],
        &["ip", "link", "set", "d1", "up"],
        &["ip", "route", "add", "default", "via", "198.19.250.1"],
    ] {
        ip_netns(&pod.netns.0, argv);
    }
    let run = node.cni("ADD", &pod, &config.to_string(), &[]);
    let msg = run.assert_error("ADD into a pod with a default route", 100);
    assert!(msg.contains("configure the pod's interface"), "{msg}");
    node.assert_empty("a failed ADD");
    assert_eq!(sorted(pod.netns.links()), ["d0", "d1", "lo"]);

    // A failure creating the veth (the pod already has an eth0 that is not veil-cni's): the
    // address is released and the other eth0 left alone.
    ip_netns(&pod.netns.0, &["ip", "link", "del", "d0"]);
    ip_netns(
        &pod.netns.0,
        &[
            "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "d1",
        ],
    );
    let run = node.cni("ADD", &pod, &config.to_string(), &[]);
    let msg = run.assert_error("ADD into a pod that has an eth0", 100);
    assert!(msg.contains("create the veth pair"), "{msg}");
    node.assert_empty("a failed veth creation");
    assert_eq!(sorted(pod.netns.links()), ["d1", "eth0", "lo"]);

    // DEL of a pod never added, with and without its namespace, succeeds.
    ip_netns(&pod.netns.0, &["ip", "link", "del", "eth0"]);
    node.del(&pod);
    node.cni(
        "DEL",
        &pod,
        &config.to_string(),
        &[("CNI_NETNS", None), ("CNI_ARGS", None)],
    )
    .assert_ok("DEL without CNI_NETNS and CNI_ARGS");
    node.assert_empty("DEL of nothing");
}
