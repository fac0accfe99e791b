//! Configuration files for real SPIRE, as veil runs it beside itself (the lab's `identity:
//! spire`, and `tests/real_spire.rs`): spire-server with an SQLite datastore and join-token node
//! attestation; spire-agents with unix workload attestation that let veil's agent use the
//! Delegated Identity API (`authorized_delegates`). One writer of the HCL, so the lab and the
//! test cannot drift apart.

use std::{fmt::Write as _, path::Path, time::Duration};

/// Where spire-server keeps its CA keys.
#[derive(Debug, Clone, Copy)]
pub enum ServerKeys<'a> {
    /// In memory: a restarted server has a new CA.
    Memory,
    /// In this JSON file: a restarted server keeps its CA.
    Disk(&'a Path),
}

/// `spire-server run -config <file>`'s file.
#[derive(Debug, Clone)]
pub struct ServerConf<'a> {
    pub bind_address: &'a str,
    pub bind_port: u16,
    pub socket_path: &'a Path,
    pub trust_domain: &'a str,
    /// The datastore (`datastore.sqlite3`) lives here too.
    pub data_dir: &'a Path,
    pub log_level: &'a str,
    pub ca_ttl: Duration,
    pub x509_svid_ttl: Duration,
    pub jwt_svid_ttl: Duration,
    pub agent_ttl: Duration,
    /// How soon a new or changed registration entry reaches the agents.
    pub cache_reload_interval: Duration,
    pub keys: ServerKeys<'a>,
}

/// `spire-agent run -config <file>`'s file.
#[derive(Debug, Clone)]
pub struct AgentConf<'a> {
    /// Its key (KeyManager "disk") and its own SVID are kept here.
    pub data_dir: &'a Path,
    pub log_level: &'a str,
    pub server_address: &'a str,
    pub server_port: u16,
    /// The Workload API socket.
    pub socket_path: &'a Path,
    /// The admin socket (the Delegated Identity API).
    pub admin_socket_path: &'a Path,
    pub trust_bundle_path: &'a Path,
    pub trust_domain: &'a str,
    /// None: given on the command line (`-joinToken`) instead.
    pub join_token: Option<&'a str>,
    /// The SPIFFE ID allowed to use the Delegated Identity API: veil's agent on this node.
    pub delegate: &'a str,
    pub sync_interval: Duration,
}

/// A Go duration in whole seconds (`20s`), which is what both daemons parse.
fn go_duration(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

impl ServerConf<'_> {
    pub fn render(&self) -> String {
        let d = self.data_dir.display();
        let keys = match self.keys {
            ServerKeys::Memory => r#"    KeyManager "memory" {
        plugin_data {}
    }
"#
            .to_string(),
            ServerKeys::Disk(p) => format!(
                r#"    KeyManager "disk" {{
        plugin_data {{
            keys_path = "{}"
        }}
    }}
"#,
                p.display()
            ),
        };
        format!(
            r#"server {{
    bind_address = "{bind}"
    bind_port = "{port}"
    socket_path = "{socket}"
    trust_domain = "{td}"
    data_dir = "{d}"
    log_level = "{log}"
    ca_ttl = "{ca}"
    default_x509_svid_ttl = "{x509}"
    default_jwt_svid_ttl = "{jwt}"
    agent_ttl = "{agent}"
    experimental {{
        cache_reload_interval = "{reload}"
    }}
}}

plugins {{
    DataStore "sql" {{
        plugin_data {{
            database_type = "sqlite3"
            connection_string = "{d}/datastore.sqlite3"
        }}
    }}
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
{keys}}}
"#,
            bind = self.bind_address,
            port = self.bind_port,
            socket = self.socket_path.display(),
            td = self.trust_domain,
            log = self.log_level,
            ca = go_duration(self.ca_ttl),
            x509 = go_duration(self.x509_svid_ttl),
            jwt = go_duration(self.jwt_svid_ttl),
            agent = go_duration(self.agent_ttl),
            reload = go_duration(self.cache_reload_interval),
        )
    }
}

impl AgentConf<'_> {
    pub fn render(&self) -> String {
        let mut token = String::new();
        if let Some(t) = self.join_token {
            let _ = writeln!(token, "    join_token = \"{t}\"");
        }
        let d = self.data_dir.display();
        format!(
            r#"agent {{
    data_dir = "{d}"
    log_level = "{log}"
    server_address = "{server}"
    server_port = "{port}"
    socket_path = "{socket}"
    admin_socket_path = "{admin}"
    trust_bundle_path = "{bundle}"
    trust_domain = "{td}"
{token}    authorized_delegates = ["{delegate}"]
    experimental {{
        sync_interval = "{sync}"
    }}
}}

plugins {{
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    KeyManager "disk" {{
        plugin_data {{
            directory = "{d}"
        }}
    }}
    WorkloadAttestor "unix" {{
        plugin_data {{}}
    }}
}}
"#,
            log = self.log_level,
            server = self.server_address,
            port = self.server_port,
            socket = self.socket_path.display(),
            admin = self.admin_socket_path.display(),
            bundle = self.trust_bundle_path.display(),
            td = self.trust_domain,
            delegate = self.delegate,
            sync = go_duration(self.sync_interval),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each of `lines` ends a line of `text`.
    fn assert_has_lines(text: &str, lines: &[&str]) {
        for line in lines {
            assert!(
                text.contains(&format!("{line}\n")),
                "{line:?} not in\n{text}"
            );
        }
    }

    #[test]
    fn the_agent_file_carries_its_token_only_when_given_one() {
        let conf = AgentConf {
            data_dir: Path::new("/s/agent/data"),
            log_level: "INFO",
            server_address: "198.18.0.254",
            server_port: 8081,
            socket_path: Path::new("/s/agent/workload/api.sock"),
            admin_socket_path: Path::new("/s/agent/admin/admin.sock"),
            trust_bundle_path: Path::new("/s/bundle.pem"),
            trust_domain: "lab.veil",
            join_token: Some("t0k"),
            delegate: "spiffe://lab.veil/veil/node/node-a",
            sync_interval: Duration::from_secs(1),
        };
        assert_has_lines(
            &conf.render(),
            &[
                "    join_token = \"t0k\"",
                "    server_port = \"8081\"",
                "    authorized_delegates = [\"spiffe://lab.veil/veil/node/node-a\"]",
                "        sync_interval = \"1s\"",
                "            directory = \"/s/agent/data\"",
            ],
        );
        let without = AgentConf {
            join_token: None,
            ..conf
        }
        .render();
        assert!(!without.contains("join_token ="), "{without}");
    }

    #[test]
    fn the_server_file_names_its_key_store_and_durations_in_seconds() {
        let keys = Path::new("/s/server/data/keys.json");
        let conf = ServerConf {
            bind_address: "127.0.0.1",
            bind_port: 40000,
            socket_path: Path::new("/s/server/api.sock"),
            trust_domain: "lab.veil",
            data_dir: Path::new("/s/server/data"),
            log_level: "DEBUG",
            ca_ttl: Duration::from_secs(600),
            x509_svid_ttl: Duration::from_secs(20),
            jwt_svid_ttl: Duration::from_secs(300),
            agent_ttl: Duration::from_secs(3600),
            cache_reload_interval: Duration::from_secs(5),
            keys: ServerKeys::Disk(keys),
        };
        assert_has_lines(
            &conf.render(),
            &[
                "    ca_ttl = \"600s\"",
                "    default_x509_svid_ttl = \"20s\"",
                "            connection_string = \"/s/server/data/datastore.sqlite3\"",
                "    KeyManager \"disk\" {",
                "            keys_path = \"/s/server/data/keys.json\"",
            ],
        );
        let memory = ServerConf {
            keys: ServerKeys::Memory,
            ..conf
        }
        .render();
        assert_has_lines(&memory, &["    KeyManager \"memory\" {"]);
        assert!(!memory.contains("keys_path"), "{memory}");
    }
}
