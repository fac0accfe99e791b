//! veil-wg's whole datagram-receive path, from the bytes and metadata `recvmmsg` returns to the
//! TUN write: hostile datagrams (any length, any GRO stride, each message type, flipped bytes of
//! authentic ones) must never panic, never be answered, never reach the TUN device, and never
//! break the established session (see `veil_transport::userspace::fuzzing`).
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use veil_transport::userspace::fuzzing::Harness;

thread_local! {
    // One device and session for the whole run (a handshake per input would cost more than the
    // input): every input must also leave the session working for the next one.
    static HARNESS: RefCell<Harness> = RefCell::new(Harness::new());
}

fuzz_target!(|data: &[u8]| {
    HARNESS.with(|h| h.borrow_mut().run(data));
});
