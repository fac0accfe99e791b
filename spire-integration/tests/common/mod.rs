//! What both suites of this crate share: tracing set-up, a running `IdentityClient` and the
//! wait on its published snapshot.

use std::time::Duration;

use tokio::sync::watch;
use veil_identity::{IdentitySnapshot, SvidSource};
use veil_spire::{BackoffConfig, ClientConfig, IdentityClient, IdentityClientHandle};

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Runs the client of `cfg` (as the agent does: `IdentityClient::new`, then `run`) with
/// reconnects backing off from 50 ms to `max_backoff`, until the returned sender sends `true`
/// or is dropped.
pub fn run_client(
    mut cfg: ClientConfig,
    max_backoff: Duration,
) -> (IdentityClientHandle, watch::Sender<bool>) {
    cfg.backoff = BackoffConfig {
        initial: Duration::from_millis(50),
        max: max_backoff,
    };
    let (client, handle) = IdentityClient::new(cfg).unwrap();
    let (stop, mut stopped) = watch::channel(false);
    tokio::spawn(client.run(async move {
        let _ = stopped.wait_for(|v| *v).await;
    }));
    (handle, stop)
}

/// Waits until `pred` holds for the published snapshot; panics with `what` after `limit`.
pub async fn wait_until(
    handle: &IdentityClientHandle,
    limit: Duration,
    what: &str,
    pred: impl Fn(&IdentitySnapshot) -> bool,
) -> IdentitySnapshot {
    let mut rx = handle.subscribe();
    let res = tokio::time::timeout(limit, async {
        loop {
            {
                let s = rx.borrow_and_update();
                if pred(&s) {
                    return s.clone();
                }
            }
            rx.changed().await.expect("client alive");
        }
    })
    .await;
    res.unwrap_or_else(|_| panic!("timed out after {limit:?} waiting for: {what}"))
}
