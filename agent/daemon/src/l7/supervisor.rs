//! l7::supervisor: the agent's side of the proxy. Keeps one `veil-proxy` running (adopting one
//! a previous agent started, so an agent restart does not cut proxied connections), pushes it
//! every new [`ProxyConfig`], and hands its request records to the flow store. The proxy's
//! death closes the control socket: it is restarted at once (counted), and until it listens
//! again the datapath drops new L7-policed connections (`proxy-unavailable`), never passes them.

use std::{
    path::PathBuf,
    process::{Child, Command},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixStream,
    sync::watch,
};

use super::{L7Record, ProxyConfig, ProxyMessage};
use crate::flows::Verdict;

/// How to start the proxy.
#[derive(Debug, Clone)]
pub struct Launch {
    pub binary: PathBuf,
    pub log: PathBuf,
    pub control: PathBuf,
    pub listen_port: u16,
    pub cgroup: Option<PathBuf>,
}

/// The proxy as `veil status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyStatus {
    pub running: bool,
    pub pid: Option<u32>,
    pub listen_port: u16,
    /// Times this agent found it dead and started it again.
    pub restarts: u32,
    /// Policy generation of the configuration last sent.
    pub config_generation: u64,
    /// Requests decided since this agent started, and how many were refused.
    pub requests: u64,
    pub denied: u64,
    /// Why the last start failed, while the proxy does not run (a missing or unrunnable binary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// How long a started proxy has to open its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Between tries to reach or start the proxy.
const RETRY: veil_common::backoff::Backoff =
    veil_common::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

/// A proxy that cannot be started is warned about at its first failure and then at most this
/// often while it keeps failing (every try is a debug line): one WARN every 5 s retry would
/// bury everything else in the log.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Failed starts since the proxy last ran (sans-IO: the caller gives the clock).
#[derive(Debug, Default)]
struct StartFailures {
    attempts: u32,
    last_warned: Option<Instant>,
}

impl StartFailures {
    /// Counts a failed start at `now`; is it to be said at WARN?
    fn failed(&mut self, now: Instant) -> bool {
        self.attempts += 1;
        let due = self
            .last_warned
            .is_none_or(|t| now.saturating_duration_since(t) >= WARN_EVERY);
        if due {
            self.last_warned = Some(now);
        }
        due
    }

    /// The proxy runs: how many starts had failed before (0: none), and the count starts over.
    fn recovered(&mut self) -> u32 {
        std::mem::take(self).attempts
    }
}

/// Runs until `stop` resolves.
pub async fn run(
    launch: Launch,
    mut config_rx: watch::Receiver<Arc<ProxyConfig>>,
    on_record: impl Fn(L7Record) + Send + 'static,
    status: Arc<Mutex<ProxyStatus>>,
    stop: impl std::future::Future<Output = ()> + Send,
) {
    tokio::pin!(stop);
    status.lock().expect("proxy status lock").listen_port = launch.listen_port;
    let mut child: Option<Child> = None;
    let mut seen_running = false;
    let mut retries = 0;
    let mut failures = StartFailures::default();
    loop {
        let stream = match UnixStream::connect(&launch.control).await {
            Ok(s) => Some(s),
            Err(_) => {
                // Reap the one we started, if it is the one that died.
                if let Some(mut c) = child.take() {
                    let _ = c.try_wait();
                }
                if seen_running {
                    status.lock().expect("proxy status lock").restarts += 1;
                    tracing::warn!("veil-proxy is not running; starting it again");
                }
                match start(&launch) {
                    Ok(c) => {
                        child = Some(c);
                        connect_within(&launch.control, START_TIMEOUT).await
                    }
                    Err(e) => {
                        let error = crate::error_chain(&e);
                        if failures.failed(Instant::now()) {
                            tracing::warn!(%error, failed_starts = failures.attempts, "cannot start veil-proxy: L7-policed connections are dropped (proxy-unavailable) until it runs (said at most once a minute)");
                        } else {
                            tracing::debug!(%error, failed_starts = failures.attempts, "cannot start veil-proxy");
                        }
                        status.lock().expect("proxy status lock").last_error = Some(error);
                        None
                    }
                }
            }
        };
        match stream {
            Some(s) => {
                seen_running = true;
                retries = 0;
                let failed = failures.recovered();
                if failed > 0 {
                    tracing::info!(failed_starts = failed, "veil-proxy started after failing");
                }
                status.lock().expect("proxy status lock").last_error = None;
                tokio::select! {
                    _ = &mut stop => return,
                    r = session(s, &mut config_rx, &on_record, &status) => {
                        if let Err(e) = r {
                            tracing::warn!(error = %e, "veil-proxy control connection ended");
                        }
                    }
                }
                let mut st = status.lock().expect("proxy status lock");
                st.running = false;
                st.pid = None;
            }
            None => {
                tokio::select! {
                    _ = &mut stop => return,
                    _ = tokio::time::sleep(RETRY.delay(retries)) => {}
                }
                retries = retries.saturating_add(1);
            }
        }
    }
}

fn start(l: &Launch) -> Result<Child, crate::sys::Error> {
    if let Some(c) = &l.cgroup {
        let _ = std::fs::create_dir_all(c);
    }
    let mut cmd = Command::new(&l.binary);
    cmd.arg("--listen-port")
        .arg(l.listen_port.to_string())
        .arg("--control")
        .arg(&l.control);
    crate::sys::spawn_daemon(
        &mut cmd,
        &crate::sys::Placement {
            netns: None,
            cgroup: l.cgroup.as_deref(),
            log: &l.log,
        },
    )
}

/// Connects as soon as the socket accepts, giving up after `limit`.
async fn connect_within(path: &std::path::Path, limit: Duration) -> Option<UnixStream> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Ok(s) = UnixStream::connect(path).await {
            return Some(s);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One control connection: the current configuration now and every change, records back.
async fn session(
    stream: UnixStream,
    config_rx: &mut watch::Receiver<Arc<ProxyConfig>>,
    on_record: &(impl Fn(L7Record) + Send),
    status: &Mutex<ProxyStatus>,
) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd).lines();
    let send = |cfg: Arc<ProxyConfig>| {
        let mut line = serde_json::to_vec(&*cfg).expect("config serializes");
        line.push(b'\n');
        status.lock().expect("proxy status lock").config_generation = cfg.generation;
        line
    };
    {
        // Scoped: the line (megabytes at 100,000 endpoints) is freed once written, not kept
        // for the session's life.
        let line = send(config_rx.borrow_and_update().clone());
        wr.write_all(&line).await?;
    }
    loop {
        tokio::select! {
            r = config_rx.changed() => {
                if r.is_err() {
                    return Ok(());
                }
                let line = send(config_rx.borrow_and_update().clone());
                wr.write_all(&line).await?;
            }
            line = lines.next_line() => {
                let Some(line) = line? else {
                    return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "veil-proxy closed the connection"));
                };
                match serde_json::from_str::<ProxyMessage>(&line) {
                    Ok(ProxyMessage::Hello { pid, .. }) => {
                        let mut st = status.lock().expect("proxy status lock");
                        st.running = true;
                        st.pid = Some(pid);
                        tracing::info!(pid, "veil-proxy connected");
                    }
                    Ok(ProxyMessage::Request(r)) => {
                        {
                            let mut st = status.lock().expect("proxy status lock");
                            st.requests += 1;
                            if r.verdict == Verdict::Dropped {
                                st.denied += 1;
                            }
                        }
                        on_record(*r);
                    }
                    Err(e) => tracing::warn!(error = %e, "unreadable line from veil-proxy"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_that_cannot_start_is_warned_about_once_a_minute_and_counted() {
        let t0 = Instant::now();
        let mut f = StartFailures::default();
        assert!(f.failed(t0), "the first failure is warned about");
        // The 5 s retries of the next minute are not.
        for i in 1..12 {
            assert!(!f.failed(t0 + Duration::from_secs(5 * i)), "retry {i}");
        }
        assert!(f.failed(t0 + WARN_EVERY), "a minute later it is said again");
        assert_eq!(f.attempts, 13);
        assert_eq!(f.recovered(), 13);
        assert_eq!(f.recovered(), 0);
        // A new episode is warned about at once.
        assert!(f.failed(t0 + WARN_EVERY + Duration::from_secs(1)));
    }

    #[test]
    fn retries_back_off_to_five_seconds() {
        let ms: Vec<u128> = (0..8).map(|n| RETRY.delay(n).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }
}
