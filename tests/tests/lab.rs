//! End-to-end: the lab and the agent skeleton (foundation issue). Real namespaces, veths,
//! cgroups, eBPF programs in this kernel.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use veil_tests::{leftovers, unique_name, veil, veil_bin, Lab, TempFile};

fn pod_packets(st: &veil_tests::Status, pod: &str) -> u64 {
    st.interfaces
        .iter()
        .filter(|i| i.pod.as_deref() == Some(pod))
        .map(|i| i.packets)
        .sum()
}

#[test]
fn cross_node_http_through_attached_programs() {
    let lab = Lab::up(&[]);
    let before_a = lab.status("node-a");
    let before_b = lab.status("node-b");
    assert!(before_a.ready && before_b.ready);
    let attached: Vec<_> = before_a
        .programs
        .iter()
        .filter_map(|p| p.pod.clone())
        .collect();
    assert!(
        attached.contains(&"shop/frontend".to_string()),
        "{attached:?}"
    );
    assert!(
        attached.contains(&"shop/intruder".to_string()),
        "{attached:?}"
    );
    assert!(before_b
        .programs
        .iter()
        .any(|p| p.pod.as_deref() == Some("shop/backend")));
    assert!(before_a
        .programs
        .iter()
        .all(|p| (p.hook == "tcx-ingress" || p.hook == "tcx-egress")
            && p.program_id > 0
            && p.link_id > 0));
    // Tunnel egress and underlay ingress carry the programs that keep host processes and the
    // underlay from posing as pods.
    for name in ["veil_to_tunnel", "veil_from_underlay", "veil_from_tunnel"] {
        assert!(
            before_a.programs.iter().any(|p| p.name == name),
            "{name} not attached: {:?}",
            before_a.programs
        );
    }

    let url = lab.pod_url("backend", 8080);
    let body = lab.http_get("frontend", &url);
    assert_eq!(body, "hello from shop/backend\n");

    let after_a = lab.status("node-a");
    let after_b = lab.status("node-b");
    let fe = pod_packets(&after_a, "shop/frontend") - pod_packets(&before_a, "shop/frontend");
    let be = pod_packets(&after_b, "shop/backend") - pod_packets(&before_b, "shop/backend");
    // A TCP connection with one request: at least SYN, ACK, request, FIN from each side.
    assert!(fe >= 3, "frontend veth counter moved by {fe}");
    assert!(be >= 3, "backend veth counter moved by {be}");
}

#[test]
fn down_leaves_nothing_behind() {
    let lab = Lab::up(&[]);
    let name = lab.name.clone();
    let view = lab.view.clone();
    assert!(
        !leftovers(&name, Some(&view)).is_empty(),
        "a running lab must be visible to the leak check"
    );
    lab.down();
    let left = leftovers(&name, Some(&view));
    assert!(left.is_empty(), "left behind after down: {left:#?}");
    // Idempotent: a second down succeeds and says there was nothing.
    let out = veil(&["lab", "down", "--name", &name]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to remove"));
}

/// The default topology with backend in another namespace: the same addresses as a default
/// lab, but its server answers `hello from other/backend`.
const OTHER_BACKEND_LAB: &str = "pods:\n\
- {name: frontend, namespace: shop, node: node-a, labels: {app: frontend}}\n\
- {name: backend, namespace: other, node: node-b, labels: {app: backend}, serve: [{port: 8080, kind: http}]}\n\
- {name: intruder, namespace: shop, node: node-a, labels: {app: intruder}}\n";

#[test]
fn two_labs_run_side_by_side() {
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| Lab::up(&[]));
        let b = s.spawn(|| Lab::up_with_file(OTHER_BACKEND_LAB, &[]));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_ne!(a.name, b.name);
    // Same addresses in both labs, different answers: a request that crossed into the other
    // lab would come back with the other lab's body.
    assert_eq!(a.pod_ip("backend"), b.pod_ip("backend"));
    assert_eq!(a.pod_ip("frontend"), b.pod_ip("frontend"));
    let url = a.pod_url("backend", 8080);
    for _ in 0..3 {
        assert_eq!(a.http_get("frontend", &url), "hello from shop/backend\n");
        assert_eq!(b.http_get("frontend", &url), "hello from other/backend\n");
    }
    // Taking one down does not disturb the other.
    let a_view = a.view.clone();
    let a_name = a.name.clone();
    a.down();
    assert!(leftovers(&a_name, Some(&a_view)).is_empty());
    assert_eq!(b.http_get("frontend", &url), "hello from other/backend\n");
    assert!(b.status("node-a").ready);
}

#[test]
fn down_cleans_up_after_up_was_killed() {
    veil_tests::require_lab_environment();
    for delay_ms in [40u64, 150] {
        let name = unique_name();
        let mut up = Command::new(veil_bin())
            .args(["lab", "up", "--name", &name, "--quiet"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Time must pass: the kill lands at a point in `up` set by the delay, not by an event.
        std::thread::sleep(Duration::from_millis(delay_ms));
        up.kill().unwrap(); // SIGKILL
        let _ = up.wait();
        // Time must pass: an orphaned, half-started supervisor gets 200 ms to start what it
        // will, so down has to remove that too (there is no event to wait for: it may not exist).
        std::thread::sleep(Duration::from_millis(200));
        let out = veil(&["lab", "down", "--name", &name]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Without `lab show` (it may not have got that far) check by the names the lab uses.
        let left = leftovers(&name, Some(&planned_view(&name)));
        assert!(
            left.is_empty(),
            "after kill -9 at {delay_ms} ms and down: {left:#?}"
        );
    }
}

/// What `veil lab down` would look for, for a lab that may never have got as far as `lab show`.
fn planned_view(name: &str) -> veil_tests::LabView {
    let spec = veil_agent::lab::spec::resolve(
        name,
        veil_agent::lab::spec::LabFile::default(),
        &Default::default(),
    )
    .unwrap();
    let paths = veil_agent::lab::LabPaths::new(name).unwrap();
    veil_agent::lab::view(&spec, &paths)
}

/// Everything of lab `name` still on the host: `leftovers` plus any netns `ip netns list` shows
/// with the lab's prefix (also ones the view would not name).
fn all_leftovers(name: &str) -> Vec<String> {
    let mut left = leftovers(name, Some(&planned_view(name)));
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let prefix = format!("{name}-");
    for line in String::from_utf8_lossy(&list.stdout).lines() {
        let ns = line.split_whitespace().next().unwrap_or("");
        if ns.starts_with(&prefix) && !left.contains(&format!("netns {ns}")) {
            left.push(format!("netns {ns} (ip netns list)"));
        }
    }
    left
}

#[test]
fn refused_kernel_backend_leaves_nothing() {
    veil_tests::require_lab_environment();
    let name = unique_name();
    let started = Instant::now();
    let out = veil(&["lab", "up", "--name", &name, "--backend", "kernel"]);
    let err = String::from_utf8_lossy(&out.stderr);
    // This machine's kernel has no WireGuard (ARCHITECTURE §2): `--backend kernel` is refused.
    assert!(!out.status.success(), "--backend kernel came up: {err}");
    assert!(
        err.contains("--backend kernel: this kernel has no WireGuard")
            && err.contains("use --backend userspace or auto"),
        "unclear refusal: {err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let left = all_leftovers(&name);
    let _ = veil(&["lab", "down", "--name", &name]);
    assert!(left.is_empty(), "refused `lab up` left {left:#?}");
}

#[test]
fn failed_up_removes_everything_it_created() {
    veil_tests::require_lab_environment();
    // `lab up` made to fail right after each of its steps (the last one: after every agent and
    // pod server was ready, so processes, pins, UAPI sockets, the hold device all existed).
    let mut failures = vec![];
    for step in veil_agent::lab::UP_STEPS {
        let name = unique_name();
        let out = Command::new(veil_bin())
            .args(["lab", "up", "--name", &name])
            .env("VEIL_LAB_UP_FAIL_AFTER", step)
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        let left = all_leftovers(&name);
        let _ = veil(&["lab", "down", "--name", &name]);
        if out.status.success() {
            failures.push(format!("{step}: lab up succeeded:\n{stdout}"));
            continue;
        }
        if !stderr.contains(&format!("failing on purpose after step {step:?}")) {
            failures.push(format!("{step}: not the injected failure: {stderr}"));
        }
        if step == "ready" {
            for what in ["agent node-a ready", "agent node-b ready", "serving Http"] {
                if !stdout.contains(what) {
                    failures.push(format!("{step}: no {what:?} before the failure:\n{stdout}"));
                }
            }
        }
        if !stdout.contains("removing what it created") {
            failures.push(format!("{step}: no undo reported:\n{stdout}"));
        }
        if !left.is_empty() {
            failures.push(format!("failed after {step}, left {left:#?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn up_never_takes_over_a_namespace_it_did_not_create() {
    veil_tests::require_lab_environment();
    let name = unique_name();
    let theirs = format!("{name}-node-b");
    veil_agent::sys::ip(&["netns", "add", &theirs]).unwrap();
    let out = veil(&["lab", "up", "--name", &name]);
    let still_there = veil_agent::sys::netns_exists(&theirs);
    let mut left = all_leftovers(&name);
    left.retain(|l| !l.contains(&theirs));
    let _ = veil_agent::sys::netns_delete(&theirs);
    let _ = veil(&["lab", "down", "--name", &name]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "lab up came up over {theirs}");
    assert!(
        still_there,
        "lab up removed {theirs}, which it did not create: {err}"
    );
    assert!(left.is_empty(), "{left:#?}");
    assert!(
        err.contains(&format!("network namespace {theirs} already exists")),
        "{err}"
    );
}

#[test]
fn agent_restart_readopts_pinned_maps_and_links() {
    let lab = Lab::up(&[]);
    let url = lab.pod_url("backend", 8080);
    lab.http_get("frontend", &url);
    let before = lab.status("node-a");
    let packets = pod_packets(&before, "shop/frontend");
    assert!(packets > 0);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(before.agent.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The programs stay attached while no agent runs: traffic keeps flowing and being counted.
    lab.http_get("frontend", &url);
    let after = lab.wait_for_restarted_agent(
        "restarted agent",
        "node-a",
        before.agent.pid,
        Duration::from_secs(20),
    );
    assert!(after.agent.restarts >= 1);
    veil_tests::assert_links_adopted(&after);
    let link_ids = |st: &veil_tests::Status| {
        let mut v: Vec<u32> = st
            .programs
            .iter()
            .filter(|p| p.interface != "veil-hold")
            .map(|p| p.link_id)
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        link_ids(&before),
        link_ids(&after),
        "links were replaced instead of adopted"
    );
    // Counters live in pinned maps: they kept counting across the restart.
    assert!(pod_packets(&after, "shop/frontend") > packets);
    lab.http_get("frontend", &url);
}

#[test]
fn bad_lab_file_is_rejected_and_creates_nothing() {
    veil_tests::require_lab_environment();
    let name = unique_name();
    let cases = [
        ("nodes: [{name: node-a, zone: x}]", "nodes[0]"),
        ("pods: [{name: p, node: nowhere}]", "pods[0].node"),
        ("svid_ttl: forever", "svid_ttl"),
    ];
    for (yaml, path) in cases {
        let f = TempFile::new(&format!("{name}-bad.yaml"), yaml);
        let started = Instant::now();
        let err = Lab::up_refused(&name, &["-f", &f.path.display().to_string()]);
        assert!(
            err.contains(path),
            "error for {yaml:?} does not name {path}: {err}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        let left = leftovers(&name, None);
        assert!(left.is_empty(), "{yaml:?} left {left:?}");
        assert!(!veil_agent::sys::netns_list()
            .iter()
            .any(|n| n.starts_with(&format!("{name}-"))));
    }
    assert!(Lab::up_refused("NOT_OK", &[]).contains("--name"));
}

#[test]
fn lab_file_topology_and_exec_by_namespace() {
    let lab = Lab::up_with_file(
        "nodes: [{name: west}, {name: east}]\n\
         pods:\n\
         - {name: client, namespace: app, node: west, labels: {role: client}}\n\
         - {name: echo, namespace: app, node: east, serve: [{port: 9000, kind: echo}]}\n",
        &[],
    );
    assert_eq!(lab.view.nodes.len(), 2);
    // The second node's first pod address, of the lab's first family.
    let first = if lab.view.ip_family == "ipv6" {
        "fd00:198:19:2::10"
    } else {
        "198.19.2.10"
    };
    assert_eq!(lab.pod_ip("app/echo"), first);
    let ip = lab.pod_ip("echo");
    let out = lab.exec_ok(
        "app/client",
        &[
            "sh",
            "-c",
            &format!("echo marker-42 | ncat --send-only -w 2 {ip} 9000 && echo sent"),
        ],
    );
    assert!(out.contains("sent"));
    let echoed = lab.exec_ok(
        "app/client",
        &["sh", "-c", &format!("echo ping-7 | ncat -w 2 {ip} 9000")],
    );
    assert_eq!(echoed.trim(), "ping-7");
    // exec runs in the pod's cgroup too, like a container process.
    let cg = lab.exec_ok("client", &["cat", "/proc/self/cgroup"]);
    assert!(
        cg.contains(&format!("/veil/{}/west/pod-app-client", lab.name)),
        "{cg}"
    );
}

/// Labs under a run directory of one test's own (`VEIL_RUN_DIR`), so that `veil lab list` and
/// `veil lab down --all` see them and not the labs of tests running beside it. Dropped: every
/// lab in it down, the directory removed.
struct OwnRunDir {
    path: std::path::PathBuf,
}

impl OwnRunDir {
    fn new() -> OwnRunDir {
        let path = std::env::temp_dir().join(format!("veil-run-{}", unique_name()));
        std::fs::create_dir_all(&path).expect("create the run directory");
        OwnRunDir { path }
    }

    fn veil(&self, args: &[&str]) -> std::process::Output {
        Command::new(veil_bin())
            .args(args)
            .env("VEIL_RUN_DIR", &self.path)
            .output()
            .expect("run veil")
    }

    fn veil_ok(&self, args: &[&str]) -> String {
        veil_tests::stdout_of_success(
            format_args!(
                "VEIL_RUN_DIR={} veil {}",
                self.path.display(),
                args.join(" ")
            ),
            self.veil(args),
        )
    }

    /// `veil lab list -o json`, by name.
    fn labs(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.veil_ok(&["lab", "list", "-o", "json"]))
            .expect("lab list -o json is one JSON array")
    }
}

impl Drop for OwnRunDir {
    fn drop(&mut self) {
        let _ = self.veil(&["lab", "down", "--all"]);
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The pids in one of a lab's cgroups (`rel` below the lab's own).
fn lab_cgroup_pids(lab: &str, rel: &str) -> Vec<i32> {
    let cg = veil_agent::sys::cgroup2_root()
        .expect("cgroup2")
        .join("veil")
        .join(lab)
        .join(rel)
        .join("cgroup.procs");
    std::fs::read_to_string(&cg)
        .unwrap_or_else(|e| panic!("{}: {e}", cg.display()))
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn signal(pids: &[i32], sig: nix::sys::signal::Signal) {
    assert!(!pids.is_empty(), "no process to send {sig} to");
    for &p in pids {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), sig).expect("send a signal");
    }
}

#[test]
fn lab_list_shows_each_labs_state_and_down_all_removes_every_one() {
    veil_tests::require_lab_environment();
    use nix::sys::signal::Signal;
    let run = OwnRunDir::new();
    assert_eq!(run.veil_ok(&["lab", "list"]).trim(), "no labs on this host");
    let name = unique_name();
    run.veil_ok(&[
        "lab",
        "up",
        "--name",
        &name,
        "--quiet",
        "--identity",
        "dev",
        "--control-plane",
        "files",
    ]);
    let labs = run.labs();
    assert_eq!(labs.len(), 1, "{labs:#?}");
    let l = &labs[0];
    let expected = l["processes"]["expected"]
        .as_u64()
        .expect("expected processes");
    // The dev SPIRE server, two agents, backend's two servers.
    assert_eq!(
        (
            l["name"].as_str(),
            l["state"].as_str(),
            l["control_plane"].as_str(),
            l["identity"].as_str(),
            l["nodes"].as_u64(),
            l["pods"].as_u64(),
            l["processes"]["running"].as_u64(),
            expected
        ),
        (
            Some(name.as_str()),
            Some("running"),
            Some("files"),
            Some("dev"),
            Some(2),
            Some(3),
            Some(5),
            5
        ),
        "{l:#}"
    );
    let table = run.veil_ok(&["lab", "list"]);
    let row: Vec<&str> = table
        .lines()
        .find(|r| r.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no row for {name}:\n{table}"))
        .split_whitespace()
        .collect();
    assert_eq!((row[1], row[7]), ("running", "5/5"), "{table}");

    // An agent gone while its supervisor is held (SIGSTOP): the lab is degraded, and says how.
    let supervisor = lab_cgroup_pids(&name, "supervisor");
    signal(&supervisor, Signal::SIGSTOP);
    signal(&lab_cgroup_pids(&name, "node-a/agent"), Signal::SIGKILL);
    let l = veil_tests::poll_until(
        "the lab listed as degraded",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || run.labs().pop().filter(|l| l["state"] == "degraded"),
    );
    assert_eq!(l["processes"]["running"].as_u64(), Some(4), "{l:#}");
    assert!(
        l["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("1 of 5 processes not running")),
        "{l:#}"
    );
    let table = run.veil_ok(&["lab", "list"]);
    assert!(
        table.contains(&format!("{name}: 1 of 5 processes not running")),
        "{table}"
    );
    // Let go, the supervisor brings the agent back.
    signal(&supervisor, Signal::SIGCONT);
    veil_tests::poll_until(
        "the lab listed as running again",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || run.labs().pop().filter(|l| l["state"] == "running"),
    );
    // Without its supervisor nothing restarts anything: stopped, and the way out is named.
    signal(&supervisor, Signal::SIGKILL);
    let l = veil_tests::poll_until(
        "the lab listed as stopped",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || run.labs().pop().filter(|l| l["state"] == "stopped"),
    );
    assert!(
        l["detail"]
            .as_str()
            .is_some_and(|d| d.contains(&format!("veil lab down --name {name}"))),
        "{l:#}"
    );

    // --all goes with no --name.
    let out = run.veil(&["lab", "down", "--all", "--name", &name]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot be used with"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let view: veil_agent::lab::LabView =
        serde_json::from_str(&run.veil_ok(&["lab", "show", "--name", &name, "-o", "json"]))
            .expect("lab show -o json");
    let out = run.veil_ok(&["lab", "down", "--all"]);
    assert!(out.contains(&format!("lab {name} removed: ")), "{out}");
    assert!(run.labs().is_empty());
    let left = leftovers(&name, Some(&view));
    assert!(left.is_empty(), "left behind after down --all: {left:#?}");
    assert_eq!(
        std::fs::read_dir(&run.path).map(|d| d.count()).ok(),
        Some(0),
        "the run directory keeps something"
    );
}

/// Every file below `dir`, by path relative to it.
fn files_below(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_below(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// `veil sysdump` into `archive`, unpacked below `into`: the stdout, stderr and the dump's root.
fn sysdump(
    lab: &Lab,
    archive: &std::path::Path,
    into: &std::path::Path,
) -> (String, String, std::path::PathBuf) {
    let out = veil(&[
        "sysdump",
        "--name",
        &lab.name,
        "--output",
        &archive.display().to_string(),
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "sysdump failed: {stdout}{stderr}");
    let _ = std::fs::remove_dir_all(into);
    std::fs::create_dir_all(into).expect("create the unpack directory");
    veil_tests::run_ok(
        Command::new("tar")
            .arg("-xzf")
            .arg(archive)
            .arg("-C")
            .arg(into),
    );
    let roots: Vec<_> = std::fs::read_dir(into).unwrap().flatten().collect();
    assert_eq!(roots.len(), 1, "one directory at the archive's top");
    let root = roots[0].path();
    let top = root.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        top.starts_with(&format!("veil-sysdump-{}-", lab.name)),
        "{top}"
    );
    (stdout, stderr, root)
}

#[test]
fn sysdump_collects_every_node_hides_keys_and_names_what_it_could_not_collect() {
    let lab = Lab::up(&[]);
    let url = lab.pod_url("backend", 8080);
    assert_eq!(lab.http_get("frontend", &url), "hello from shop/backend\n");
    let tmp = std::env::temp_dir().join(format!("veil-sysdump-test-{}", lab.name));
    let archive = tmp.with_extension("tar.gz");
    struct Remove(Vec<std::path::PathBuf>);
    impl Drop for Remove {
        fn drop(&mut self) {
            for p in &self.0 {
                let _ = std::fs::remove_dir_all(p);
                let _ = std::fs::remove_file(p);
            }
        }
    }
    let _remove = Remove(vec![tmp.clone(), archive.clone()]);

    let (stdout, stderr, root) = sysdump(&lab, &archive, &tmp);
    assert!(stdout.contains("0 steps not collected"), "{stdout}{stderr}");
    let summary = std::fs::read_to_string(root.join("SUMMARY.txt")).unwrap();
    assert!(summary.contains("not collected (0):"), "{summary}");
    for node in ["node-a", "node-b"] {
        let at = |f: &str| root.join("nodes").join(node).join(f);
        let st: veil_tests::Status =
            serde_json::from_slice(&std::fs::read(at("status.json")).unwrap()).unwrap();
        assert_eq!((st.node.as_str(), st.ready), (node, true));
        let metrics = std::fs::read_to_string(at("metrics.txt")).unwrap();
        assert!(metrics.contains("\nveil_"), "{metrics}");
        let ipcache: serde_json::Value =
            serde_json::from_slice(&std::fs::read(at("maps/VEIL_IPCACHE.json")).unwrap()).unwrap();
        assert!(
            ipcache.as_array().is_some_and(|a| !a.is_empty()),
            "{ipcache}"
        );
        let wg = std::fs::read_to_string(at("wg.txt")).unwrap();
        assert!(wg.contains("private key: (hidden)"), "{wg}");
        assert!(root.join(format!("logs/agent-{node}.log")).is_file());
    }
    // The request above, as node-b admitted it.
    let flows = std::fs::read_to_string(root.join("nodes/node-b/flows.jsonl")).unwrap();
    assert!(
        flows.lines().any(|l| {
            let f: serde_json::Value = serde_json::from_str(l).unwrap();
            f["src"]["pod"] == "frontend"
                && f["dst"]["pod"] == "backend"
                && f["verdict"] == "FORWARDED"
        }),
        "{flows}"
    );
    // No node's WireGuard private key anywhere in the dump.
    for node in ["node-a", "node-b"] {
        let v = lab.node(node);
        let key = Command::new("ip")
            .args([
                "netns",
                "exec",
                &v.netns,
                "wg",
                "show",
                &v.wg_interface,
                "private-key",
            ])
            .output()
            .expect("wg show private-key");
        let key = String::from_utf8_lossy(&key.stdout).trim().to_string();
        assert_eq!(key.len(), 44, "{node}'s private key from wg");
        for f in files_below(&root) {
            let text = String::from_utf8_lossy(&std::fs::read(&f).unwrap()).into_owned();
            assert!(
                !text.contains(&key),
                "{node}'s private key is in {}",
                f.display()
            );
        }
    }

    // node-b's agent gone for good (its supervisor first): the dump is still written, and
    // says what it could not collect of node-b and why.
    use nix::sys::signal::Signal;
    signal(&lab_cgroup_pids(&lab.name, "supervisor"), Signal::SIGKILL);
    signal(&lab_cgroup_pids(&lab.name, "node-b/agent"), Signal::SIGKILL);
    let (stdout, stderr, root) = sysdump(&lab, &archive, &tmp);
    assert!(stdout.contains("3 steps not collected"), "{stdout}{stderr}");
    for f in ["status.json", "metrics.txt", "flows.jsonl"] {
        let what = format!("nodes/node-b/{f}: the agent at ");
        assert!(
            stderr.contains(&format!("not collected: {what}")),
            "{stderr}"
        );
        let summary = std::fs::read_to_string(root.join("SUMMARY.txt")).unwrap();
        assert!(summary.contains(&what), "{summary}");
        assert!(root.join("nodes/node-a").join(f).is_file());
    }
    assert!(root.join("nodes/node-b/ip-route.txt").is_file());
}
