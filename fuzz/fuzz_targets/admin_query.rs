//! The admin API's query parsing (`veil::admin`): what the server does with the query of any
//! request line a local client sends. Checked on every input:
//! - at most `max` pairs come out, and more than `max` non-empty pairs is an error;
//! - decoding never fails and encoding a decoded pair with `percent_encode` decodes back to it;
//! - the pairs, re-encoded and joined, parse back to the same pairs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veil_agent::admin::{parse_query, percent_decode, percent_encode};

fuzz_target!(|data: &[u8]| {
    let Some((&max, q)) = data.split_first() else {
        return;
    };
    let max = usize::from(max % 40);
    let Ok(q) = std::str::from_utf8(q) else {
        return;
    };
    let non_empty = q.split('&').filter(|s| !s.is_empty()).count();
    let pairs = match parse_query(q, max) {
        Ok(p) => p,
        Err(_) => {
            assert!(
                non_empty > max,
                "refused {non_empty} pairs with a limit of {max}"
            );
            return;
        }
    };
    assert_eq!(pairs.len(), non_empty);
    assert!(pairs.len() <= max);
    let mut again = Vec::new();
    for (k, v) in &pairs {
        assert_eq!(&percent_decode(&percent_encode(k)), k);
        assert_eq!(&percent_decode(&percent_encode(v)), v);
        again.push(format!("{}={}", percent_encode(k), percent_encode(v)));
    }
    let again = again.join("&");
    // An empty key and value encode to "=", which is a pair; a query of only "&" has none.
    let back = parse_query(&again, max).expect("re-encoded pairs within the limit");
    assert_eq!(back, pairs, "re-encoded query {again:?} parses differently");
});
