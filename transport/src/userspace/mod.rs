//! The userspace backend: `veil-wg`, a separate long-lived process that owns the TUN device, the
//! UDP socket and the boringtun state, configured over the WireGuard UAPI on
//! `/var/run/wireguard/<ifname>.sock` — so `wg show` / `wg set` work on it, and an agent restart
//! does not cut traffic (the agent only re-attaches to the socket).

pub mod device;
#[doc(hidden)]
pub mod fuzzing;
pub mod gro;
pub mod initiation;
pub mod io;
pub mod limiter;

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use zeroize::Zeroizing;

use crate::{
    tunnel::{Backend, DeviceState, Error, Tunnel},
    uapi::{self, SecretText, SetRequest},
};

/// What [`UserspaceTunnel::probe`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Running,
    /// Nothing answers the socket: the process exited (or never ran).
    Absent,
    /// The process `pid` holds the socket but did not answer in time.
    Hung {
        pid: i32,
    },
}

/// Where `wg` and `veil-wg` put UAPI sockets.
pub const UAPI_DIR: &str = "/var/run/wireguard";

/// A UAPI client for a userspace WireGuard device (veil-wg, wireguard-go, boringtun-cli).
pub struct UserspaceTunnel {
    interface: String,
    socket: PathBuf,
}

impl UserspaceTunnel {
    /// A client for the device serving `<dir>/<interface>.sock`.
    pub fn new(interface: &str, dir: &Path) -> Self {
        Self {
            interface: interface.to_string(),
            socket: io::uapi_path(dir, interface),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// True when a device answers on the socket.
    pub fn is_running(&self) -> bool {
        self.exchange("get=1\n\n").is_ok()
    }

    /// The pid of the process serving the socket (SO_PEERCRED), if one listens.
    pub fn server_pid(&self) -> Option<i32> {
        let stream = UnixStream::connect(&self.socket).ok()?;
        nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
            .map(|c| c.pid())
            .ok()
            .filter(|p| *p > 0)
    }

    /// Whether the device is alive: it answers a `get` within `timeout`; or nothing listens
    /// (exited); or a process holds the socket but does not answer (hung: its pid, from
    /// SO_PEERCRED, so the caller can end it).
    pub fn probe(&self, timeout: Duration) -> Liveness {
        let Ok(stream) = UnixStream::connect(&self.socket) else {
            return Liveness::Absent;
        };
        let pid = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
            .map(|c| c.pid())
            .ok()
            .filter(|p| *p > 0);
        let answered = (|| -> std::io::Result<bool> {
            stream.set_read_timeout(Some(timeout))?;
            stream.set_write_timeout(Some(timeout))?;
            (&stream).write_all(b"get=1\n\n")?;
            // The answer carries the private key: read into a zeroizing buffer.
            let answer = read_answer(&stream)?;
            Ok(answer.lines().any(|l| l.starts_with("errno=0")))
        })();
        match (answered, pid) {
            (Ok(true), _) => Liveness::Running,
            (_, Some(pid)) => Liveness::Hung { pid },
            (_, None) => Liveness::Absent,
        }
    }

    /// One request and its answer (up to, not including, the blank line that ends it). Both
    /// may carry keys in hex; the answer comes back zeroizing.
    fn exchange(&self, request: &str) -> Result<Zeroizing<String>, Error> {
        let path = self.socket.display().to_string();
        let stream = UnixStream::connect(&self.socket).map_err(|source| Error::Connect {
            what: "veil-wg uapi",
            path: path.clone(),
            source,
        })?;
        let io_err = |source| Error::Io {
            what: "uapi",
            source,
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(io_err)?;
        (&stream).write_all(request.as_bytes()).map_err(io_err)?;
        read_answer(&stream).map_err(io_err)
    }

    /// Starts `veil-wg --foreground <interface>` detached (own session) unless a device already
    /// answers on the socket; waits until it does. Returns whether it started one.
    pub fn ensure_running(
        &self,
        binary: &Path,
        mtu: u16,
        log: &Path,
        cgroup: Option<&Path>,
    ) -> Result<bool, Error> {
        if self.is_running() {
            return Ok(false);
        }
        let spawn_err = |source| Error::Spawn {
            binary: binary.display().to_string(),
            source,
        };
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(spawn_err)?;
        let logf2 = logf.try_clone().map_err(spawn_err)?;
        let procs = match cgroup {
            Some(c) => {
                std::fs::create_dir_all(c).map_err(spawn_err)?;
                Some(
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(c.join("cgroup.procs"))
                        .map_err(spawn_err)?,
                )
            }
            None => None,
        };
        let procs_fd = procs.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
        let mut cmd = Command::new(binary);
        cmd.args(["--foreground", "--mtu", &mtu.to_string(), &self.interface])
            .stdin(Stdio::null())
            .stdout(logf)
            .stderr(logf2);
        // SAFETY: only async-signal-safe calls between fork and exec, on an fd opened before.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = procs_fd {
                    if libc::write(fd, b"0".as_ptr().cast(), 1) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(spawn_err)?;
        let start = Instant::now();
        while !self.is_running() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Error::NotReady {
                    interface: format!("{} (exited: {status})", self.interface),
                    waited_ms: start.elapsed().as_millis() as u64,
                    log: log.display().to_string(),
                });
            }
            if start.elapsed() > Duration::from_secs(10) {
                return Err(Error::NotReady {
                    interface: self.interface.clone(),
                    waited_ms: 10_000,
                    log: log.display().to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The child is detached (own session); it is not ours to reap or kill.
        std::mem::forget(child);
        Ok(true)
    }
}

/// Reads one UAPI answer: the lines up to, not including, the blank line that ends it (or up to
/// EOF). Read straight into a [`SecretText`], never through a `BufReader` or line `String`s
/// that would leave the key hex of a `get` answer in freed memory.
fn read_answer(stream: &UnixStream) -> std::io::Result<Zeroizing<String>> {
    let mut text = SecretText::with_capacity(4096);
    let mut chunk = Zeroizing::new([0u8; 1024]);
    loop {
        let n = match (&*stream).read(&mut chunk[..]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        // Search from the byte before the new data: the blank line may straddle two reads.
        let from = text.as_bytes().len().saturating_sub(1);
        text.push_bytes(&chunk[..n]);
        let buf = text.as_bytes();
        if buf.first() == Some(&b'\n') {
            text.truncate(0);
            break;
        }
        if let Some(i) = buf[from..].windows(2).position(|w| w == b"\n\n") {
            // Keep the last line's own newline, drop the blank line (and anything after it).
            text.truncate(from + i + 1);
            break;
        }
    }
    text.into_string()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

impl Tunnel for UserspaceTunnel {
    fn backend(&self) -> Backend {
        Backend::Userspace
    }

    fn interface(&self) -> &str {
        &self.interface
    }

    fn apply(&mut self, req: &SetRequest) -> Result<(), Error> {
        let answer = self.exchange(&uapi::format_set(req))?;
        match uapi::parse_errno(&answer) {
            Ok(()) => Ok(()),
            Err(uapi::UapiError::Errno(errno)) => Err(Error::Refused { errno }),
            Err(e) => Err(e.into()),
        }
    }

    fn state(&mut self) -> Result<DeviceState, Error> {
        let answer = self.exchange("get=1\n\n")?;
        Ok(uapi::parse_get(&answer)?)
    }

    fn drops(&mut self) -> Result<BTreeMap<String, u64>, Error> {
        let answer = self.exchange("veil-drops=1\n\n")?;
        Ok(uapi::parse_drops(&answer)?)
    }
}

#[cfg(test)]
mod tests {
    use std::{io::BufRead as _, os::unix::net::UnixListener};

    use super::*;
    use crate::{
        uapi::{freed_memory, DeviceConfig},
        PeerConfig, PeerState, PresharedKey, PrivateKey,
    };

    /// Hex of half of `[0x5a; 32]` and of `[0xc3; 32]`.
    const PRIVATE_HEX: &[u8] = b"5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";
    const PSK_HEX: &[u8] = b"c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3";

    /// A UAPI device that answers every `get` with a private key and 20 peers' preshared keys,
    /// and every `set` with success, delivering the answer in small pieces.
    fn fake_device(name: &str) -> (UserspaceTunnel, PathBuf) {
        let dir = std::env::temp_dir().join(format!("veil-uapi-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let t = UserspaceTunnel::new("wgtest0", &dir);
        let listener = UnixListener::bind(t.socket()).unwrap();
        let mut cfg = DeviceConfig {
            private_key: Some(PrivateKey::from_bytes([0x5a; 32])),
            listen_port: 51820,
            ..Default::default()
        };
        for i in 0..20u8 {
            cfg.peers.push(PeerConfig {
                public_key: PrivateKey::from_bytes([i + 1; 32]).public_key(),
                preshared_key: Some(PresharedKey::from_bytes([0xc3; 32])),
                endpoint: None,
                allowed_ips: vec![format!("198.19.{i}.0/24").parse().unwrap()],
                persistent_keepalive: None,
            });
        }
        let state = DeviceState {
            listen_port: 51820,
            peers: vec![PeerState::default(); cfg.peers.len()],
            ..Default::default()
        };
        let get = uapi::format_get_zeroizing(&cfg, &state);
        let get = get.as_bytes().to_vec();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let mut reader = std::io::BufReader::new(&conn);
                let mut first = String::new();
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\n" {
                    if first.is_empty() {
                        first = line.clone();
                    }
                    line.clear();
                }
                let answer: &[u8] = if first == "get=1\n" {
                    &get
                } else {
                    b"errno=0\n\n"
                };
                for piece in answer.chunks(37) {
                    if (&conn).write_all(piece).is_err() {
                        break;
                    }
                }
            }
        });
        (t, dir)
    }

    #[test]
    fn the_client_leaves_no_key_hex_in_freed_memory() {
        let (mut t, dir) = fake_device("zeroize");
        for marker in [PRIVATE_HEX, PSK_HEX] {
            let leaked = freed_memory::blocks_freed_holding(marker, || {
                let st = t.state().unwrap();
                assert_eq!(st.peers.len(), 20);
                assert!(st.peers.iter().all(|p| p.has_preshared_key));
                assert!(st.public_key.is_some());
                assert_eq!(t.probe(Duration::from_secs(5)), Liveness::Running);
                assert!(t.is_running());
                t.set_private_key(&PrivateKey::from_bytes([0x5a; 32]))
                    .unwrap();
                t.upsert_peer(&PeerConfig {
                    public_key: PrivateKey::from_bytes([1; 32]).public_key(),
                    preshared_key: Some(PresharedKey::from_bytes([0xc3; 32])),
                    endpoint: None,
                    allowed_ips: vec![],
                    persistent_keepalive: None,
                })
                .unwrap();
            });
            assert_eq!(
                leaked,
                0,
                "{}: freed blocks still held key hex",
                std::str::from_utf8(marker).unwrap()
            );
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn an_answer_ends_at_its_blank_line() {
        let (t, dir) = fake_device("answer");
        let answer = t.exchange("set=1\n\n").unwrap();
        assert_eq!(answer.as_str(), "errno=0\n");
        let answer = t.exchange("get=1\n\n").unwrap();
        assert!(
            answer.ends_with("errno=0\n"),
            "{:?}",
            &answer[answer.len() - 20..]
        );
        assert!(!answer.ends_with("\n\n"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
