//! Policy YAML (`veil::policy`) through parse and compile, as `veil policy apply` takes it.
//! Checked on every input:
//! - bad input is an error, never a panic; a policy that parses either compiles or is refused
//!   with an error;
//! - a parsed policy survives the agent's persisted policy set (JSON) unchanged;
//! - the compiled map decides every probed flow (each lab identity as the local endpoint; lab,
//!   reserved and unknown remotes; a spread of ports, including one from the input; no
//!   protocol, ICMP, TCP, UDP, SCTP and GRE; both directions) as the naive evaluator reading the
//!   policy text does (`veil_agent::policy::reference::disagreements`, which the property tests
//!   use too).
#![no_main]

use libfuzzer_sys::fuzz_target;
use veil_agent::policy::{
    compile, parse_yaml,
    reference::{disagreements, lab_identities},
    Policy,
};

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
    let ids = lab_identities();
    let locals: Vec<u32> = ids.iter().map(|(id, _)| *id).collect();
    let Ok(compiled) = compile(&policies, &ids, &locals) else {
        return;
    };
    // One more port, from the input, beside the probed ones.
    let extra = data.last_chunk::<2>().map_or(0, |b| u16::from_be_bytes(*b));
    let bad = disagreements(&policies, &ids, &locals, &compiled.entries, &[extra]);
    assert!(bad.is_empty(), "map vs reference: {bad:?}");
});
