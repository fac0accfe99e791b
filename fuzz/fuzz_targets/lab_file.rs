//! The lab file (`veil::lab::spec`): parsed, then resolved into a lab as `veil lab up` does.
//! Checked on every input:
//! - bad input is an error, never a panic;
//! - a resolved lab is buildable: every interface name fits IFNAMSIZ, node names, network
//!   namespaces, pod addresses and each node's host veth names are unique, every pod sits on a
//!   node of the lab and inside that node's pod CIDR;
//! - the lab's state file (the spec as JSON, read back by every later `veil lab` command)
//!   reads back as the same spec.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use veil_agent::lab::spec::{bridge_name, parse_lab_file, resolve, LabSpec, Overrides};

const IFNAMSIZ_MAX: usize = 15;

fuzz_target!(|data: &[u8]| {
    let Some((&which, text)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    // The shortest, the default and the longest lab name.
    let name = ["v", "veil", "abcd-fgh"][usize::from(which % 3)];
    let Ok(file) = parse_lab_file(text) else {
        return;
    };
    let Ok(spec) = resolve(name, file, &Overrides::default()) else {
        return;
    };
    check(&spec);
    let json = serde_json::to_vec(&spec).expect("a lab spec serializes");
    let back: LabSpec = serde_json::from_slice(&json).expect("the lab state reads back");
    assert_eq!(back, spec, "the lab state reads back differently");
});

fn check(spec: &LabSpec) {
    let ifname = |n: &str| {
        assert!(
            !n.is_empty() && n.len() <= IFNAMSIZ_MAX,
            "interface name {n:?}"
        )
    };
    ifname(&bridge_name(&spec.name));
    let mut netns = BTreeSet::new();
    let mut names = BTreeSet::new();
    for n in &spec.nodes {
        assert!(names.insert(&n.name), "duplicate node {}", n.name);
        assert!(netns.insert(&n.netns), "duplicate netns {}", n.netns);
        for i in [&n.wg_interface, &n.underlay_if, &n.bridge_port] {
            ifname(i);
        }
    }
    let mut ips = BTreeSet::new();
    let mut veths = BTreeSet::new();
    for p in &spec.pods {
        let node = spec
            .nodes
            .iter()
            .find(|n| n.name == p.node)
            .expect("the pod's node");
        assert!(netns.insert(&p.netns), "duplicate netns {}", p.netns);
        assert!(ips.insert(p.ip), "duplicate pod address {}", p.ip);
        let cidr: veil_transport::IpPrefix = node.pod_cidr.parse().expect("a node's pod CIDR");
        assert!(
            cidr.contains(p.ip),
            "pod {} outside its node's CIDR {}",
            p.ip,
            node.pod_cidr
        );
        ifname(&p.host_veth);
        assert!(
            veths.insert((&p.node, &p.host_veth)),
            "duplicate host veth {}",
            p.host_veth
        );
    }
}
