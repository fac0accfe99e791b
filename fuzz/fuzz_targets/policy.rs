//! Policy YAML (`veil::policy`) through parse and compile, as `veil policy apply` takes it.
//! Checked on every input:
//! - bad input is an error, never a panic; a policy that parses either compiles or is refused
//!   with an error;
//! - a parsed policy survives the agent's persisted policy set (JSON) unchanged;
//! - the compiled map decides every probed flow (each lab identity as the local endpoint; lab,
//!   reserved and unknown remotes; a spread of ports, including one from the input; TCP, UDP,
//!   ICMP, SCTP; both directions) as the naive evaluator reading the policy text does.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use veil_agent::policy::{
    compile, datapath_lookup, evaluate, parse::Direction, parse_yaml, IdentityAllocator,
    IdentityLabels, Policy,
};

/// Reserved identities (host, world, unknown, remote node) and a cluster id no table knows.
const STRANGERS: [u32; 5] = [1, 2, 3, 4, 9999];
const PORTS: [u16; 8] = [0, 1, 53, 80, 443, 8080, 9000, 65535];
const PROTOS: [u8; 4] = [1, 6, 17, 132];

fn lab() -> Vec<(u32, IdentityLabels)> {
    let mut a = IdentityAllocator::new();
    for (ns, app) in [
        ("shop", "frontend"),
        ("shop", "backend"),
        ("shop", "intruder"),
        ("other", "frontend"),
    ] {
        a.allocate(
            ns,
            app,
            &BTreeMap::from([("app".to_owned(), app.to_owned())]),
        )
        .expect("lab identities");
    }
    a.identities()
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policies) = parse_yaml(text) else {
        return;
    };
    for p in &policies {
        let json = serde_json::to_string(p).expect("a policy serializes");
        match Policy::from_json(&json) {
            Ok(back) => assert_eq!(
                &back, p,
                "the persisted policy reads back differently: {json}"
            ),
            Err(e) => panic!("the persisted policy does not read back: {e}: {json}"),
        }
    }
    let ids = lab();
    let locals: Vec<u32> = ids.iter().map(|(id, _)| *id).collect();
    let Ok(compiled) = compile(&policies, &ids, &locals) else {
        return;
    };
    let extra = data.last_chunk::<2>().map_or(0, |b| u16::from_be_bytes(*b));
    let remotes: Vec<u32> = locals.iter().copied().chain(STRANGERS).collect();
    for &l in &locals {
        for &r in &remotes {
            for port in PORTS.into_iter().chain([extra]) {
                for proto in PROTOS {
                    for d in Direction::ALL {
                        let want = evaluate(&policies, &ids, l, r, port, proto, d);
                        let got = datapath_lookup(&compiled.entries, l, r, port, proto, d);
                        assert_eq!(got, want, "{l}->{r} {port}/{proto} {d:?}: map vs reference");
                    }
                }
            }
        }
    }
});
