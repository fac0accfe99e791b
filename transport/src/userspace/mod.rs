//! The userspace backend: `veil-wg`, a separate long-lived process that owns the TUN device, the
//! UDP socket and the boringtun state, configured over the WireGuard UAPI on
//! `/var/run/wireguard/<ifname>.sock` — so `wg show` / `wg set` work on it, and an agent restart
//! does not cut traffic (the agent only re-attaches to the socket).

pub mod device;
#[doc(hidden)]
pub mod fuzzing;
pub mod gro;
pub mod io;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    tunnel::{Backend, DeviceState, Error, PeerConfig, Tunnel},
    uapi::{self, PeerChange, SetRequest},
    PrivateKey, PublicKey,
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
            let mut reader = BufReader::new(&stream);
            let mut line = String::new();
            loop {
                line.clear();
                if reader.read_line(&mut line)? == 0 {
                    return Ok(false);
                }
                if line.starts_with("errno=0") {
                    return Ok(true);
                }
            }
        })();
        match (answered, pid) {
            (Ok(true), _) => Liveness::Running,
            (_, Some(pid)) => Liveness::Hung { pid },
            (_, None) => Liveness::Absent,
        }
    }

    fn exchange(&self, request: &str) -> Result<String, Error> {
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
        let mut reader = BufReader::new(&stream);
        let mut out = String::new();
        loop {
            let mut line = String::new();
            let n = reader.read_line(&mut line).map_err(io_err)?;
            if n == 0 || line == "\n" {
                break;
            }
            out.push_str(&line);
        }
        Ok(out)
    }

    fn set(&self, req: &SetRequest) -> Result<(), Error> {
        let answer = self.exchange(&uapi::format_set(req))?;
        match uapi::parse_errno(&answer) {
            Ok(()) => Ok(()),
            Err(uapi::UapiError::Errno(errno)) => Err(Error::Refused { errno }),
            Err(e) => Err(e.into()),
        }
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

impl Tunnel for UserspaceTunnel {
    fn backend(&self) -> Backend {
        Backend::Userspace
    }

    fn interface(&self) -> &str {
        &self.interface
    }

    fn set_private_key(&mut self, key: &PrivateKey) -> Result<(), Error> {
        self.set(&SetRequest {
            private_key: Some(key.clone()),
            ..Default::default()
        })
    }

    fn set_listen_port(&mut self, port: u16) -> Result<(), Error> {
        self.set(&SetRequest {
            listen_port: Some(port),
            ..Default::default()
        })
    }

    fn upsert_peer(&mut self, peer: &PeerConfig) -> Result<(), Error> {
        let mut c = PeerChange::new(peer.public_key);
        // A zero key clears a PSK the peer had.
        c.preshared_key = Some(
            peer.preshared_key
                .clone()
                .unwrap_or_else(|| crate::PresharedKey::from_bytes([0; 32])),
        );
        c.endpoint = peer.endpoint;
        c.persistent_keepalive = Some(peer.persistent_keepalive.unwrap_or(0));
        c.replace_allowed_ips = true;
        c.allowed_ips = peer.allowed_ips.clone();
        self.set(&SetRequest {
            peers: vec![c],
            ..Default::default()
        })
    }

    fn remove_peer(&mut self, key: &PublicKey) -> Result<(), Error> {
        self.set(&SetRequest {
            peers: vec![PeerChange {
                remove: true,
                ..PeerChange::new(*key)
            }],
            ..Default::default()
        })
    }

    fn state(&mut self) -> Result<DeviceState, Error> {
        let answer = self.exchange("get=1\n\n")?;
        Ok(uapi::parse_get(&answer)?)
    }
}
