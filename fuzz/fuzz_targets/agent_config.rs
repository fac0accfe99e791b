//! The agent's config file (`veil::config::Config::parse`, YAML). Checked on every input:
//! - bad input is an error, never a panic;
//! - a config that parses is valid (`validate` passes), arms no timer with a zero period, and
//!   what the agent logs as its effective config (`to_yaml`) parses back to the same config.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use veil_agent::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("fuzz.yaml");
    let Ok(cfg) = Config::parse(text, file) else {
        return;
    };
    cfg.validate().expect("a parsed config is valid");
    // The agent arms timers with these (tokio's interval panics on a zero period).
    assert!(!cfg.psk_rotation.is_zero() && !cfg.key_rotation.is_zero());
    let yaml = cfg.to_yaml();
    match Config::parse(&yaml, file) {
        Ok(back) => assert_eq!(
            back, cfg,
            "the effective config does not parse back the same:\n{yaml}"
        ),
        Err(e) => panic!("the effective config does not parse back: {e}\n{yaml}"),
    }
});
