//! The control channel's frames (`veil::auth::wire`), as a peer agent's bytes arrive inside TLS:
//! a stream of frames decoded one at a time, and single frame bodies. Checked on every input:
//! - a decoded frame re-encodes to exactly the bytes it came from (the format is canonical, so
//!   no two byte strings mean the same message) and its body decodes alone to the same message;
//! - "need more bytes" only when the header or the body it announces is really incomplete;
//! - a frame never claims more bytes than the input has, or fewer than a header and a kind.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veil_agent::auth::wire::{decode_body, decode_frame, encode, parse_header, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let mut buf = data;
    loop {
        match decode_frame(buf) {
            Ok(Some((msg, used))) => {
                assert!(
                    used >= HEADER_LEN + 2 && used <= buf.len(),
                    "frame used {used} of {}",
                    buf.len()
                );
                assert_eq!(
                    encode(&msg),
                    &buf[..used],
                    "a decoded frame does not re-encode to its bytes"
                );
                assert_eq!(decode_body(&buf[HEADER_LEN..used]), Ok(msg));
                buf = &buf[used..];
            }
            Ok(None) => {
                if let Some(h) = buf.first_chunk::<HEADER_LEN>() {
                    let len = parse_header(*h).expect("a header decode_frame accepted");
                    assert!(
                        buf.len() < HEADER_LEN + len,
                        "more bytes asked for a complete frame"
                    );
                }
                break;
            }
            Err(_) => break,
        }
    }
    if let Ok(msg) = decode_body(data) {
        assert_eq!(
            &encode(&msg)[HEADER_LEN..],
            data,
            "a decoded body does not re-encode to itself"
        );
    }
});
