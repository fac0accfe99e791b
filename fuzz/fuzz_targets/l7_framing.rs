//! veil-proxy's request-framing watch (`veil::l7::framing`) held to hyper itself, on the bytes a
//! client in a pod sends to a port under an HTTP policy. Checked on every input:
//! hyper, configured as veil-proxy runs it, reads the input and then an ambiguous request
//! (`Transfer-Encoding` and `Content-Length`), written at once and in writes of the size the
//! input's first byte chooses (1 to 256 bytes, so hyper's reads are that long; 64 to 16,384 for
//! a stream over 4 KiB): whenever hyper hands that request on as HTTP/1, the scanner has flagged
//! the connection by then (veil-proxy refuses it).
//!
//! A byte 0xFF followed by n stands for n × 64 bytes of `a`, so heads, chunk extensions and
//! trailers near hyper's 16 KiB limits are short inputs.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use veil_agent::l7::framing::requests_hyper_reads;

const PROBE_PATH: &str = "/veil-fuzz-probe";
const PROBE: &[u8] = b"POST /veil-fuzz-probe HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n";

fn expand(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        if data[i] == 0xff {
            let n = data.get(i + 1).copied().unwrap_or(0);
            out.resize(out.len() + usize::from(n) * 64, b'a');
            i += 2;
        } else {
            out.push(data[i]);
            i += 1;
        }
    }
    out
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else {
        return;
    };
    let input = expand(data);
    // Past hyper's 16 KiB buffer and limits nothing more is reached.
    if input.len() > 64 * 1024 {
        return;
    }
    // The probe must be the one request with its path.
    if input
        .windows(PROBE_PATH.len())
        .any(|w| w == PROBE_PATH.as_bytes())
    {
        return;
    }
    let stream = [&input[..], PROBE].concat();

    // hyper's reads as they come (one write) and at most `cut` bytes long; 64 times that for a
    // long stream (hyper parses the whole head again after every read).
    let cut = (usize::from(cut) + 1) * if stream.len() > 4096 { 64 } else { 1 };
    for write in [usize::MAX, cut] {
        for r in runtime().block_on(requests_hyper_reads(&stream, write)) {
            if r.path == PROBE_PATH && r.http1 {
                assert!(
                    r.ambiguous,
                    "hyper handed on the ambiguous request (writes of {write}) and the scanner had not flagged it"
                );
            }
        }
    }
});
