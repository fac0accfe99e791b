//! config: the node agent's one plain-data configuration, parsed strictly (unknown keys are
//! errors naming the path) and validated in one place.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors in the agent config file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read agent config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("agent config {file}: {path}: {message}")]
    Parse {
        file: PathBuf,
        path: String,
        message: String,
    },
    #[error("agent config: {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

/// Where the agent's cluster state comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// A control plane directory (the lab's): `cluster.json`, `policies.json`, `node-keys/`.
    Files { dir: PathBuf },
    /// The Kubernetes API: Nodes, Pods, CiliumNetworkPolicies and veil's identities.
    Kubernetes {
        /// A kubeconfig file; absent: in-cluster (the DaemonSet's service account).
        #[serde(default)]
        kubeconfig: Option<PathBuf>,
        /// The SPIFFE trust domain of the cluster's workloads.
        trust_domain: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Cluster (lab) name.
    pub cluster: String,
    /// This node's name in the cluster state.
    pub node: String,
    /// Admin API unix socket.
    pub admin_socket: PathBuf,
    /// The health port: `GET /healthz`, `/readyz` and `/metrics` over TCP (kubelet probes,
    /// Prometheus); none when absent. `veil agent --health-addr` sets it too.
    #[serde(default)]
    pub health_addr: Option<std::net::SocketAddr>,
    /// Persistent node state (WireGuard key, flow log).
    pub state_dir: PathBuf,
    /// bpffs mount point; mounted by the agent if absent.
    #[serde(default = "default_bpffs")]
    pub bpffs: PathBuf,
    /// Where this node's maps and links are pinned (under `bpffs`).
    pub pin_dir: PathBuf,
    pub source: SourceConfig,
    /// Steer remote pod traffic through WireGuard. Off exists only for the lab's leak check.
    #[serde(default = "yes")]
    pub encryption: bool,
    /// Drop traffic to pod CIDRs of nodes without a tunnel peer (`no-key`).
    #[serde(default = "yes")]
    pub strict: bool,
    /// Encrypt the nodes' own traffic too (host network, node address to node address), not only
    /// pod traffic; WireGuard's datagrams and the control channel stay outside the tunnel.
    #[serde(default)]
    pub node_encryption: bool,
    #[serde(default)]
    pub backend: BackendChoice,
    /// WireGuard interface name.
    pub interface: String,
    #[serde(default = "default_listen_port")]
    pub listen_port: u16,
    /// MTU of the tunnel device (underlay MTU minus WireGuard overhead).
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// The veil-wg binary (default: next to this binary).
    #[serde(default)]
    pub wg_binary: Option<PathBuf>,
    /// Where veil-wg logs (default: state_dir/veil-wg.log).
    #[serde(default)]
    pub wg_log: Option<PathBuf>,
    /// cgroup veil-wg runs in (default: the agent's).
    #[serde(default)]
    pub wg_cgroup: Option<PathBuf>,
    /// The cgroup (v2) whose sockets get Service load balancing: the one holding the node's
    /// pods (`/sys/fs/cgroup` on a node, where kubepods lives; the node's cgroup in the lab).
    /// None: Services are not balanced on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_cgroup: Option<PathBuf>,
    /// The SPIRE agent socket serving the Workload API (node SVID) and the Delegated Identity
    /// API (SVIDs of this node's pods). None: no identities (mutual auth impossible).
    #[serde(default)]
    pub spire_socket: Option<PathBuf>,
    /// A real spire-agent serves the Delegated Identity API on its admin socket, apart from the
    /// Workload API on `spire_socket`. None: `spire_socket` serves both (veil's dev server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spire_admin_socket: Option<PathBuf>,
    /// Mutual authentication between node agents (needs `spire_socket`): tunnel keys come only
    /// from authenticated node handshakes, auth entries from workload handshakes.
    #[serde(default = "yes")]
    pub mutual_auth: bool,
    /// Port of the agents' mTLS control channel.
    #[serde(default = "default_control_port")]
    pub control_port: u16,
    /// Also offer plain X25519 on the control channel (default: X25519MLKEM768 only).
    #[serde(default)]
    pub allow_classical_kx: bool,
    /// How often each node pair re-runs its node handshake (new PSK).
    #[serde(default = "default_psk_rotation", with = "humantime_serde_secs")]
    pub psk_rotation: std::time::Duration,
    /// How often the node replaces its static WireGuard key (and re-runs its node handshakes
    /// so peers learn the new one).
    #[serde(default = "default_key_rotation", with = "humantime_serde_secs")]
    pub key_rotation: std::time::Duration,
    /// Where userspace WireGuard devices serve UAPI (the path `wg` looks in).
    #[serde(default = "default_uapi_dir")]
    pub uapi_dir: PathBuf,
    /// Port of the node's L7 proxy (`veil-proxy`) on 127.0.0.1. 0: no proxy; connections that
    /// policy sends to it (`rules.http`) are then dropped (`proxy-unavailable`).
    #[serde(default = "default_proxy_port")]
    pub proxy_port: u16,
    /// The veil-proxy binary (default: next to this binary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_binary: Option<PathBuf>,
    /// Where veil-proxy logs (default: state_dir/veil-proxy.log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_log: Option<PathBuf>,
    /// cgroup veil-proxy runs in (default: the agent's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_cgroup: Option<PathBuf>,
    /// Sizes of the maps that grow with the cluster, where the defaults ([`SIZED_MAPS`]) do
    /// not fit: map name → entries. A map an earlier agent pinned with another size is made
    /// anew at start, its entries carried over (`datapath::pins`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub map_max_entries: std::collections::BTreeMap<String, u32>,
}

/// The maps `map_max_entries` may size: every address the node knows (pods, pod CIDRs,
/// nodes), the nodes, the tracked connections (defaults: `veil_common::maps::*_MAX`).
pub const SIZED_MAPS: [&str; 3] = [
    veil_common::maps::IPCACHE,
    veil_common::maps::NODES,
    veil_common::maps::CT,
];

/// `map_max_entries` names only [`SIZED_MAPS`], each with 1..=[`MAP_MAX_ENTRIES_LIMIT`]
/// entries (the lab checks its files' with this too).
pub fn check_map_max_entries(
    sizes: &std::collections::BTreeMap<String, u32>,
) -> Result<(), String> {
    for (name, n) in sizes {
        if !SIZED_MAPS.contains(&name.as_str()) {
            return Err(format!(
                "{name:?} is not a map that can be sized (one of {})",
                SIZED_MAPS.join(", ")
            ));
        }
        if !(1..=MAP_MAX_ENTRIES_LIMIT).contains(n) {
            return Err(format!(
                "{name}: {n} entries, must be within 1..={MAP_MAX_ENTRIES_LIMIT}"
            ));
        }
    }
    Ok(())
}

/// The largest size `map_max_entries` takes (2^24: a 16-million-entry map; the kernel refuses
/// far larger ones for lack of memory anyway).
pub const MAP_MAX_ENTRIES_LIMIT: u32 = 1 << 24;

/// The L7 proxy's default port (Envoy's and ztunnel's outbound capture port).
pub const DEFAULT_PROXY_PORT: u16 = 15001;

fn default_proxy_port() -> u16 {
    DEFAULT_PROXY_PORT
}

fn default_control_port() -> u16 {
    crate::auth::DEFAULT_PORT
}

/// Shortest PSK and static key rotation periods.
pub const MIN_ROTATION: std::time::Duration = std::time::Duration::from_secs(5);

fn default_key_rotation() -> std::time::Duration {
    std::time::Duration::from_secs(24 * 3600)
}

fn default_psk_rotation() -> std::time::Duration {
    std::time::Duration::from_secs(600)
}

/// Durations in the config file as `10m`, `30s`.
mod humantime_serde_secs {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

fn default_mtu() -> u16 {
    1440
}

fn default_uapi_dir() -> PathBuf {
    PathBuf::from(veil_transport::userspace::UAPI_DIR)
}

fn default_bpffs() -> PathBuf {
    PathBuf::from("/sys/fs/bpf")
}

fn yes() -> bool {
    true
}

fn default_listen_port() -> u16 {
    veil_transport::DEFAULT_LISTEN_PORT
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, file: &Path) -> Result<Self, Error> {
        Self::parse_with(text, file, &[])
    }

    /// Loads the file with top-level keys set from the command line (`veil agent --node N`):
    /// one file for every node of a DaemonSet, the node's name from its pod.
    pub fn load_with(path: &Path, overrides: &[(&str, String)]) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.into(),
            source,
        })?;
        Self::parse_with(&text, path, overrides)
    }

    fn parse_with(text: &str, file: &Path, overrides: &[(&str, String)]) -> Result<Self, Error> {
        let parse_error = |path: String, message: String| Error::Parse {
            file: file.into(),
            path,
            message,
        };
        let cfg: Config = if overrides.is_empty() {
            // Straight from the text, so errors keep their line and column.
            serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(text))
                .map_err(|e| parse_error(e.path().to_string(), e.into_inner().to_string()))?
        } else {
            let mut doc: serde_yaml::Value =
                serde_yaml::from_str(text).map_err(|e| parse_error(".".into(), e.to_string()))?;
            let map = doc
                .as_mapping_mut()
                .ok_or_else(|| parse_error(".".into(), "expected a mapping".into()))?;
            for (k, v) in overrides {
                map.insert((*k).into(), v.as_str().into());
            }
            serde_path_to_error::deserialize(doc)
                .map_err(|e| parse_error(e.path().to_string(), e.into_inner().to_string()))?
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |field, message: &str| {
            Err(Error::Invalid {
                field,
                message: message.to_string(),
            })
        };
        if self.node.is_empty() {
            return invalid("node", "must not be empty");
        }
        if self.interface.is_empty() || self.interface.len() > 15 || self.interface.contains('/') {
            return invalid("interface", "must be 1-15 characters without '/'");
        }
        if !self.pin_dir.starts_with(&self.bpffs) {
            return invalid("pin_dir", "must be under bpffs");
        }
        if self.spire_admin_socket.is_some() && self.spire_socket.is_none() {
            return invalid(
                "spire_admin_socket",
                "needs spire_socket (the spire-agent's Workload API socket)",
            );
        }
        if self.listen_port == 0 {
            return invalid("listen_port", "must not be 0");
        }
        if self.node_encryption && !self.encryption {
            return invalid(
                "node_encryption",
                "needs encryption: node traffic is encrypted in the same tunnel as pod traffic",
            );
        }
        if !(576..=9000).contains(&self.mtu) {
            return invalid("mtu", "must be within 576..=9000");
        }
        // Both arm timers: tokio's `interval_at` panics on a zero period (the daemon's key
        // rotation timer took `key_rotation: 0s`) and a tiny one re-keys in a loop. Found with
        // the `agent_config` fuzz target; the same floor as the lab's.
        if self.psk_rotation < MIN_ROTATION {
            return invalid("psk_rotation", "must be at least 5s");
        }
        if self.key_rotation < MIN_ROTATION {
            return invalid("key_rotation", "must be at least 5s");
        }
        check_map_max_entries(&self.map_max_entries).map_err(|message| Error::Invalid {
            field: "map_max_entries",
            message,
        })
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("config serializes")
    }
}

/// Which WireGuard backend the agent is asked to use (`auto`: the kernel's where it has
/// WireGuard, else veil-wg). The backend actually running is `veil_transport::Backend`; this is
/// the choice (config, lab file, `--backend`), which `auto` makes a separate type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    #[default]
    Auto,
    Userspace,
    Kernel,
}

crate::keyword_enum!(
    BackendChoice,
    "backend",
    Userspace = "userspace",
    Kernel = "kernel",
    Auto = "auto"
);

/// `FromStr` and `Display` for an enum of unit variants that users write as keywords (config,
/// lab file, command-line flags), and its list of keywords (`KEYWORDS`). The keywords are listed
/// in the order a wrong one's error names them: `unknown backend "x" (expected userspace, kernel
/// or auto)`.
#[macro_export]
macro_rules! keyword_enum {
    ($ty:ident, $what:literal, $($variant:ident = $word:literal),+ $(,)?) => {
        impl $ty {
            /// Every keyword, in the order errors list them.
            pub const KEYWORDS: &'static [&'static str] = &[$($word),+];
        }

        impl ::std::str::FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($word => Ok(Self::$variant),)+
                    other => Err(format!(
                        "unknown {} {other:?} (expected {})",
                        $what,
                        $crate::config::one_of(Self::KEYWORDS)
                    )),
                }
            }
        }

        impl ::std::fmt::Display for $ty {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(match self {
                    $(Self::$variant => $word,)+
                })
            }
        }
    };
}

/// `a`, `a or b`, `a, b or c`: the choices an error offers.
pub fn one_of(words: &[&str]) -> String {
    match words {
        [] => String::new(),
        [only] => (*only).to_owned(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str =
        "cluster: veil\nnode: node-a\nadmin_socket: /run/a.sock\nstate_dir: /run/s\n\
pin_dir: /sys/fs/bpf/veil/veil/node-a\nsource: {kind: files, dir: /run/cp}\ninterface: veil-wg1\n";

    #[test]
    fn a_keyword_enum_reads_and_writes_its_keywords_and_names_them_when_one_is_wrong() {
        for word in BackendChoice::KEYWORDS {
            assert_eq!(word.parse::<BackendChoice>().unwrap().to_string(), *word);
        }
        assert_eq!("kernel".parse(), Ok(BackendChoice::Kernel));
        assert_eq!(
            "Kernel".parse::<BackendChoice>(),
            Err("unknown backend \"Kernel\" (expected userspace, kernel or auto)".to_owned())
        );
        assert_eq!(one_of(&["a"]), "a");
        assert_eq!(one_of(&["a", "b"]), "a or b");
        assert_eq!(one_of(&[]), "");
    }

    #[test]
    fn parses_with_defaults() {
        let c = Config::parse(GOOD, Path::new("a.yaml")).unwrap();
        assert!(c.encryption && c.strict);
        assert_eq!(c.listen_port, 51820);
        assert_eq!(c.bpffs, PathBuf::from("/sys/fs/bpf"));
        assert_eq!(Config::parse(&c.to_yaml(), Path::new("b")).unwrap(), c);
    }

    #[test]
    fn rejects_unknown_and_bad_fields() {
        let e = Config::parse(&format!("{GOOD}colour: red\n"), Path::new("a.yaml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("colour"), "{e}");
        let e = Config::parse(
            &GOOD.replace("veil-wg1", "much-too-long-interface"),
            Path::new("a"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("interface"));
        let e = Config::parse(
            &GOOD.replace("/sys/fs/bpf/veil", "/tmp/veil"),
            Path::new("a"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("pin_dir"));
        let e = Config::parse(
            &GOOD.replace("{kind: files, dir: /run/cp}", "{kind: k8s}"),
            Path::new("a"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("source"), "{e}");
        let e = Config::parse(
            &format!("{GOOD}encryption: false\nnode_encryption: true\n"),
            Path::new("a"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("node_encryption"), "{e}");
    }

    /// Regression (fuzz target `agent_config`, corpus `agent_config/regression-zero-rotation`):
    /// `key_rotation: 0s` parsed, and the daemon's `interval_at` panics on a zero period.
    #[test]
    fn command_line_keys_fill_in_or_replace_the_files() {
        let dir = std::env::temp_dir().join(format!("veil-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("agent.yaml");
        // The DaemonSet's file names no node; the pod's --node does.
        std::fs::write(&file, GOOD.replace("node: node-a\n", "")).unwrap();
        let e = Config::load(&file).unwrap_err().to_string();
        assert!(e.contains("node"), "{e}");
        let c = Config::load_with(
            &file,
            &[
                ("node", "node-b".into()),
                ("health_addr", "0.0.0.0:9962".into()),
            ],
        )
        .unwrap();
        assert_eq!(c.node, "node-b");
        assert_eq!(c.health_addr, Some("0.0.0.0:9962".parse().unwrap()));
        let e = Config::load_with(&file, &[("health_addr", "nowhere".into())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("health_addr"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_shipped_daemonset_config_parses() {
        // deploy/configmap.yaml (rendered from the Helm chart): its agent.yaml with the node
        // the DaemonSet passes as --node.
        let cm: serde_yaml::Value = serde_yaml::from_str(
            include_str!("../../../deploy/configmap.yaml")
                .split("\n---\n")
                .find(|d| d.contains("kind: ConfigMap"))
                .unwrap(),
        )
        .unwrap();
        let text = cm["data"]["agent.yaml"].as_str().unwrap();
        let dir = std::env::temp_dir().join(format!("veil-config-cm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("agent.yaml");
        std::fs::write(&file, text).unwrap();
        let c = Config::load_with(&file, &[("node", "node-a".into())]);
        std::fs::remove_dir_all(&dir).unwrap();
        let c = c.unwrap();
        assert!(matches!(
            c.source,
            SourceConfig::Kubernetes {
                kubeconfig: None,
                ..
            }
        ));
        assert_eq!(c.node, "node-a");
    }

    #[test]
    fn map_sizes_name_a_sized_map_and_a_size_it_can_take() {
        for (line, needle) in [
            (
                "map_max_entries: {VEIL_AUTH: 10}",
                "\"VEIL_AUTH\" is not a map that can be sized",
            ),
            (
                "map_max_entries: {VEIL_IPCACHE: 0}",
                "VEIL_IPCACHE: 0 entries",
            ),
            (
                "map_max_entries: {VEIL_CT: 16777217}",
                "VEIL_CT: 16777217 entries",
            ),
            (
                "map_max_entries: {VEIL_NODES: -1}",
                "map_max_entries.VEIL_NODES",
            ),
        ] {
            let e = Config::parse(&format!("{GOOD}{line}\n"), Path::new("a"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{line}: {e}");
        }
        let c = Config::parse(
            &format!("{GOOD}map_max_entries: {{VEIL_IPCACHE: 40, VEIL_NODES: 1}}\n"),
            Path::new("a"),
        )
        .unwrap();
        assert_eq!(c.map_max_entries["VEIL_IPCACHE"], 40);
        assert_eq!(Config::parse(&c.to_yaml(), Path::new("b")).unwrap(), c);
    }

    #[test]
    fn rotation_periods_have_a_floor() {
        for (line, field) in [
            ("key_rotation: 0s", "key_rotation"),
            ("psk_rotation: 0s", "psk_rotation"),
            ("psk_rotation: 4s 999ms", "psk_rotation"),
        ] {
            let e = Config::parse(&format!("{GOOD}{line}\n"), Path::new("a"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(field), "{line}: {e}");
        }
        let c = Config::parse(
            &format!("{GOOD}key_rotation: 5s\npsk_rotation: 5s\n"),
            Path::new("a"),
        )
        .unwrap();
        assert_eq!(
            (c.key_rotation, c.psk_rotation),
            (MIN_ROTATION, MIN_ROTATION)
        );
    }
}
