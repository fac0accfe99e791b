//! End-to-end on real SPIRE (`identity: spire`): the lab runs spire-server v1.13.3 in its
//! underlay netns and a spire-agent per node (join token, admin socket with the Delegated
//! Identity API); veil's agents get every SVID from their node's spire-agent. Needs the SPIRE
//! binaries from `scripts/setup.sh` (`lab up` fails, naming it, without them).

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use veil_tests::{Lab, Status, Streaming, AUTH_POLICY};

/// frontend and intruder on node-a, backend on node-b (HTTP 8080, echo 9000); frontend2 on
/// node-a has frontend's labels but its own service account, so its own SPIFFE ID and entry.
const SPIRE_LAB: &str = "identity: spire\n\
pods:\n\
- {name: frontend, namespace: shop, node: node-a, labels: {app: frontend}}\n\
- {name: frontend2, namespace: shop, node: node-a, labels: {app: frontend}}\n\
- {name: backend, namespace: shop, node: node-b, labels: {app: backend}, serve: [{port: 8080, kind: http}, {port: 9000, kind: echo}]}\n\
- {name: intruder, namespace: shop, node: node-a, labels: {app: intruder}}\n";

fn url(lab: &Lab) -> String {
    format!("http://{}:8080/", lab.pod_ip("backend"))
}

fn serial_of(st: &Status, suffix: &str) -> Option<String> {
    st.svids
        .iter()
        .find(|v| v.spiffe_id.ends_with(suffix))
        .map(|v| v.serial.clone())
}

/// `"<numeric identity> ("`, how auth pairs name frontend's identity.
fn frontend_identity(lab: &Lab) -> String {
    let paths = veil_agent::lab::LabPaths::new(&lab.name).unwrap();
    let text = std::fs::read_to_string(paths.control_plane().join("cluster.json")).unwrap();
    let cs: serde_json::Value = serde_json::from_str(&text).unwrap();
    let id = cs["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "frontend")
        .and_then(|p| p["identity"].as_u64())
        .expect("frontend's identity in cluster.json");
    format!("{id} (")
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `openssl x509 -serial` of a PEM file, lowercase hex without leading zeros (veil's format).
fn pem_serial(pem: &std::path::Path) -> String {
    let out = run_ok(
        Command::new("openssl")
            .args(["x509", "-noout", "-serial", "-in"])
            .arg(pem),
    );
    out.trim()
        .trim_start_matches("serial=")
        .trim_start_matches('0')
        .to_lowercase()
}

/// (a) The lab's SVIDs come from its spire-server: node-a's node SVID, as veil's agent holds
/// it, is the one node-a's spire-agent hands out for `unix:uid:0` and chains to
/// `spire-server bundle show`; every registered SPIFFE ID is held by the right node; traffic is
/// encrypted and the auth policy admits frontend and drops intruder.
/// Seen failing: with `identity: dev` in the lab file, `lab show` says provider dev (and the
/// dev server's serial is not spire-agent's).
#[test]
fn spire_issues_the_labs_svids_and_auth_policy_admits_only_frontend() {
    let t = Instant::now();
    let lab = Lab::up_with_file(SPIRE_LAB, &[]);
    let up = t.elapsed();
    let id = &lab.view.identity;
    assert_eq!(id.provider, "spire", "{id:?}");
    assert!(id.version.starts_with("1.13"), "{id:?}");
    let server_bin = PathBuf::from(id.server_bin.clone().expect("server_bin"));
    let server_socket = id.server_socket.clone().expect("server_socket");

    // The registration entries the lab made, as a script would list them.
    let entries =
        run_ok(Command::new(&server_bin).args(["entry", "show", "-socketPath", &server_socket]));
    for want in [
        "spiffe://lab.veil/veil/node/node-a",
        "spiffe://lab.veil/veil/node/node-b",
        "spiffe://lab.veil/ns/shop/sa/frontend",
        "spiffe://lab.veil/ns/shop/sa/frontend2",
        "spiffe://lab.veil/ns/shop/sa/backend",
        "spiffe://lab.veil/ns/shop/sa/intruder",
    ] {
        assert!(entries.contains(want), "no entry {want}: {entries}");
    }
    let agents =
        run_ok(Command::new(&server_bin).args(["agent", "list", "-socketPath", &server_socket]));
    assert!(
        agents.contains("Found 2 attested agents"),
        "attested agents: {agents}"
    );

    let expect = [
        (
            "node-a",
            vec![
                "spiffe://lab.veil/veil/node/node-a",
                "spiffe://lab.veil/ns/shop/sa/frontend",
                "spiffe://lab.veil/ns/shop/sa/frontend2",
                "spiffe://lab.veil/ns/shop/sa/intruder",
            ],
        ),
        (
            "node-b",
            vec![
                "spiffe://lab.veil/veil/node/node-b",
                "spiffe://lab.veil/ns/shop/sa/backend",
            ],
        ),
    ];
    for (node, ids) in &expect {
        let st = lab.status(node);
        let mut held: Vec<&str> = st.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
        held.sort();
        let mut want = ids.clone();
        want.sort();
        assert_eq!(held, want, "{node}'s SVIDs");
    }

    // The node SVID veil holds is spire-agent's, issued under the spire-server's bundle.
    let dir = std::env::temp_dir().join(format!("{}-fetch", lab.name));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let bundle = dir.join("server-bundle.pem");
    std::fs::write(
        &bundle,
        run_ok(Command::new(&server_bin).args(["bundle", "show", "-socketPath", &server_socket])),
    )
    .unwrap();
    let paths = veil_agent::lab::LabPaths::new(&lab.name).unwrap();
    let ws = veil_agent::lab::spire_real::workload_socket(&paths, "node-a");
    let agent_bin = server_bin.with_file_name("spire-agent");
    // The serial can change between the two reads if SPIRE rotates in between (TTL 1 h here:
    // it does not).
    run_ok(
        Command::new(&agent_bin)
            .args(["api", "fetch", "x509", "-socketPath"])
            .arg(&ws)
            .arg("-write")
            .arg(&dir),
    );
    let spire_serial = pem_serial(&dir.join("svid.0.pem"));
    let veil_serial = serial_of(&lab.status("node-a"), "/veil/node/node-a").expect("node SVID");
    assert_eq!(
        veil_serial.trim_start_matches('0'),
        spire_serial,
        "veil's node SVID is not the one spire-agent issues"
    );
    let verify = run_ok(
        Command::new("openssl")
            .args(["verify", "-partial_chain", "-CAfile"])
            .arg(&bundle)
            .arg(dir.join("svid.0.pem")),
    );
    assert!(verify.contains("OK"), "{verify}");
    let _ = std::fs::remove_dir_all(&dir);

    // Encrypted traffic, then the auth policy.
    assert_eq!(
        lab.try_get("frontend", &url(&lab)).as_deref(),
        Ok("hello from shop/backend\n")
    );
    lab.apply_policy_ok(AUTH_POLICY);
    assert_eq!(
        lab.try_get("frontend", &url(&lab)).as_deref(),
        Ok("hello from shop/backend\n"),
        "frontend under the auth policy"
    );
    assert!(
        lab.try_get("intruder", &url(&lab)).is_err(),
        "intruder reached backend under the auth policy"
    );
    let fwd = lab.observe(&["--node", "node-b", "--pod", "shop/frontend"]);
    assert!(
        fwd.iter()
            .any(|f| f["dst"]["pod"] == "backend" && f["encrypted"] == true),
        "no encrypted frontend -> backend flow on node-b: {fwd:#?}"
    );
    let drops = lab.observe(&["--verdict", "DROPPED", "--pod", "shop/intruder"]);
    assert!(
        drops.iter().any(|f| f["dst"]["pod"] == "backend"),
        "no dropped intruder -> backend flow: {drops:#?}"
    );
    println!(
        "spire lab up in {:.1} s; node SVID serial {veil_serial} from spire-agent",
        up.as_secs_f64()
    );
}

/// A TCP echo stream or a sequenced UDP probe from `pod` to backend:9000, one line every
/// `gap_ms`.
fn echo_client(lab: &Lab, pod: &str, udp: bool, n: u32, gap_ms: u32) -> Streaming {
    let be = lab.pod_ip("backend");
    let (prefix, flags) = if udp {
        ("seq-", "-u -w 3 -i 3")
    } else {
        ("line-", "-w 5 -i 5")
    };
    let script = format!(
        "for i in $(seq 1 {n}); do echo {prefix}$i; sleep 0.{gap_ms:03}; done | ncat {flags} {be} 9000"
    );
    Streaming::spawn(&mut lab.command_in(pod, &["sh", "-c", &script]))
}

fn missing(lines: &[String], prefix: &str, n: u32) -> Vec<u32> {
    (1..=n)
        .filter(|i| !lines.iter().any(|l| *l == format!("{prefix}{i}")))
        .collect()
}

/// (b) With an X.509-SVID TTL of 30 s, SPIRE's agent renews frontend's SVID at half its
/// (backdated) lifetime: at least three distinct serials in 70 s while a TCP stream and a
/// sequenced UDP probe run across nodes under `authentication: required`, nothing lost.
/// Seen failing: with `--svid-ttl 1h` one serial in 70 s ("frontend SVID serials").
#[test]
fn spire_rotates_svids_under_load_and_nothing_is_lost() {
    let lab = Lab::up_with_file(SPIRE_LAB, &["--svid-ttl", "30s"]);
    lab.apply_policy_ok(AUTH_POLICY);
    assert!(lab.try_get("frontend", &url(&lab)).is_ok());
    let (n, gap) = (700, 100);
    let tcp = echo_client(&lab, "frontend", false, n, gap);
    let udp = echo_client(&lab, "frontend", true, n, gap);
    let start = Instant::now();
    let mut serials: Vec<(f64, String)> = vec![];
    let mut node_serials: Vec<String> = vec![];
    while start.elapsed() < Duration::from_secs(72) {
        let st = lab.status("node-a");
        if let Some(s) = serial_of(&st, "/sa/frontend") {
            if serials.last().map(|(_, l)| l) != Some(&s) {
                serials.push((start.elapsed().as_secs_f64(), s));
            }
        }
        if let Some(s) = serial_of(&st, "/veil/node/node-a") {
            if node_serials.last() != Some(&s) {
                node_serials.push(s);
            }
        }
        // Sampling interval of a 70 s observation under load, not a wait for an event.
        std::thread::sleep(Duration::from_millis(500));
    }
    let tcp_lines = tcp.finish().0;
    let udp_lines = udp.finish().0;
    let at: Vec<String> = serials.iter().map(|(t, _)| format!("{t:.1}s")).collect();
    println!(
        "70 s under load on SPIRE (svid ttl 30 s): frontend serials {} (first seen at {}), node SVID serials {}; TCP {}/{n} lines, UDP {}/{n} probes",
        serials.len(),
        at.join(", "),
        node_serials.len(),
        tcp_lines.len(),
        udp_lines.len()
    );
    assert!(serials.len() >= 3, "frontend SVID serials: {serials:?}");
    assert!(
        node_serials.len() >= 3,
        "node SVID serials: {node_serials:?}"
    );
    assert_eq!(
        missing(&tcp_lines, "line-", n),
        Vec::<u32>::new(),
        "TCP stream lost lines"
    );
    assert_eq!(
        missing(&udp_lines, "seq-", n),
        Vec::<u32>::new(),
        "UDP probes lost"
    );
    let st = lab.status("node-a");
    assert_eq!(st.drops.get("auth-required").copied().unwrap_or(0), 0);
    assert_eq!(st.drops.get("no-key").copied().unwrap_or(0), 0);
}

/// (c) `veil lab revoke --pod frontend` deletes frontend's SPIRE entry: its auth entries are
/// gone on both nodes within SPIRE's bound (server cache reload 5 s + agent sync 4 s; asserted
/// < 15 s, measured and printed), new connections are dropped `auth-required`, and frontend2
/// (same labels, another service account) keeps working.
/// Seen failing: revoking intruder instead ("auth entries gone" timed out after 30 s).
#[test]
fn spire_revocation_cuts_frontend_within_the_sync_bound() {
    let lab = Lab::up_with_file(SPIRE_LAB, &[]);
    lab.apply_policy_ok(AUTH_POLICY);
    for pod in ["frontend", "frontend2"] {
        assert_eq!(
            lab.try_get(pod, &url(&lab)).as_deref(),
            Ok("hello from shop/backend\n"),
            "{pod} before revocation"
        );
    }
    let fe_id = frontend_identity(&lab);
    lab.wait_for("frontend's pair on node-b", Duration::from_secs(5), || {
        lab.status("node-b")
            .auth
            .iter()
            .any(|p| p.src_identity.starts_with(&fe_id) || p.dst_identity.starts_with(&fe_id))
            .then_some(())
    });

    let t = Instant::now();
    let out = veil_tests::veil_ok(&[
        "lab",
        "revoke",
        "--name",
        &lab.name,
        "--pod",
        "shop/frontend",
    ]);
    assert!(out.contains("per SPIFFE ID"), "{out}");
    let svid_gone = lab.wait_for(
        "frontend's SVID gone from node-a",
        Duration::from_secs(30),
        || {
            serial_of(&lab.status("node-a"), "/sa/frontend")
                .is_none()
                .then(|| t.elapsed())
        },
    );
    // frontend's own pairs: frontend2 shares its labels but not its numeric identity (the
    // identity key holds the service account), which the pairs name first.
    lab.wait_for(
        "frontend cut and its auth entries gone on both nodes",
        Duration::from_secs(30),
        || {
            let now = veil_agent::cli::unix_now();
            let gone = ["node-a", "node-b"].iter().all(|n| {
                lab.status(n)
                    .auth
                    .iter()
                    .filter(|p| {
                        p.src_identity.starts_with(&fe_id) || p.dst_identity.starts_with(&fe_id)
                    })
                    .all(|p| p.expires_unix <= now)
            });
            (gone && lab.try_get("frontend", &url(&lab)).is_err()).then_some(())
        },
    );
    let cut = t.elapsed();
    println!(
        "SPIRE revocation: frontend's SVID left node-a in {svid_gone:?}, frontend cut in {cut:?}"
    );
    assert!(
        cut < Duration::from_secs(15),
        "revocation took {cut:?} from `veil lab revoke` to frontend cut"
    );
    assert_eq!(
        lab.try_get("frontend2", &url(&lab)).as_deref(),
        Ok("hello from shop/backend\n"),
        "frontend2 (another service account) after frontend's revocation"
    );
    // What the datapath did with frontend's new connections after the cut.
    let drops = lab.observe(&["--verdict", "DROPPED"]);
    let reasons: std::collections::BTreeSet<String> = drops
        .iter()
        .filter(|f| f["src"]["pod"] == "frontend" || f["dst"]["pod"] == "frontend")
        .map(|f| f["drop_reason"].to_string())
        .collect();
    let pairs: Vec<_> = ["node-a", "node-b"]
        .iter()
        .flat_map(|n| lab.status(n).auth)
        .filter(|p| p.src_identity.starts_with(&fe_id) || p.dst_identity.starts_with(&fe_id))
        .map(|p| (p.node, p.expires_unix, p.last_result))
        .collect();
    println!("after the cut: frontend drop reasons {reasons:?}, its auth pairs {pairs:?}");
    assert!(
        pairs
            .iter()
            .all(|(_, exp, _)| *exp <= veil_agent::cli::unix_now()),
        "frontend still authenticated: {pairs:?}"
    );
}
