//! UDP socket buffers of another process (a tunnel: veil-wg, boringtun-cli), read and set through
//! `pidfd_getfd(2)`: the duplicated descriptor is the tunnel's own socket, so `setsockopt` on it
//! changes that socket. This is how every contender gets the same socket settings without a
//! change to its code (boringtun-cli has no option for them), and how each run checks that it
//! still has them.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::{bail, Context as _};

/// Receive and send buffer sizes as `SO_RCVBUF` / `SO_SNDBUF` report them (the kernel doubles
/// what is asked, for its bookkeeping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Buffers {
    pub rcvbuf: i32,
    pub sndbuf: i32,
}

impl std::fmt::Display for Buffers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kib = |b: i32| f64::from(b) / 1024.0;
        write!(
            f,
            "rcvbuf {:.0} KiB, sndbuf {:.0} KiB",
            kib(self.rcvbuf),
            kib(self.sndbuf)
        )
    }
}

/// Socket inodes of the UDP sockets in the process's network namespace.
fn udp_inodes(pid: u32) -> anyhow::Result<Vec<u64>> {
    let mut out = vec![];
    for table in ["udp", "udp6"] {
        let path = format!("/proc/{pid}/net/{table}");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
        out.extend(
            text.lines()
                .skip(1)
                .filter_map(|l| l.split_whitespace().nth(9)?.parse::<u64>().ok()),
        );
    }
    Ok(out)
}

/// The process's descriptors that are UDP sockets.
fn udp_fds(pid: u32) -> anyhow::Result<Vec<i32>> {
    let udp = udp_inodes(pid)?;
    let dir = format!("/proc/{pid}/fd");
    let mut fds = vec![];
    for e in std::fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let e = e?;
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        let inode = target
            .strip_prefix("socket:[")
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse::<u64>().ok());
        if let (Some(inode), Some(fd)) =
            (inode, e.file_name().to_str().and_then(|f| f.parse().ok()))
        {
            if udp.contains(&inode) {
                fds.push(fd);
            }
        }
    }
    fds.sort_unstable();
    Ok(fds)
}

fn syscall_fd(r: libc::c_long, what: &str) -> anyhow::Result<OwnedFd> {
    if r < 0 {
        bail!("{what}: {}", io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// Duplicates each UDP socket of `pid` into this process.
fn udp_sockets(pid: u32) -> anyhow::Result<Vec<(i32, OwnedFd)>> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let pidfd = syscall_fd(
        unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) },
        "pidfd_open",
    )?;
    udp_fds(pid)?
        .into_iter()
        .map(|fd| {
            // SAFETY: pidfd_getfd takes a pidfd, a descriptor number in that process and flags,
            // and returns a new descriptor or -1.
            let dup = syscall_fd(
                unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) },
                "pidfd_getfd",
            )?;
            Ok((fd, dup))
        })
        .collect()
}

fn getsockopt_int(fd: &OwnedFd, opt: libc::c_int) -> anyhow::Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket and a c_int-sized output buffer with its length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        bail!("getsockopt: {}", io::Error::last_os_error());
    }
    Ok(v)
}

fn setsockopt_int(fd: &OwnedFd, opt: libc::c_int, v: i32) -> anyhow::Result<()> {
    // SAFETY: a valid socket and a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("setsockopt: {}", io::Error::last_os_error());
    }
    Ok(())
}

/// The buffers of every UDP socket of `pid`, by its descriptor number there.
pub fn udp_buffers(pid: u32) -> anyhow::Result<Vec<(i32, Buffers)>> {
    udp_sockets(pid)?
        .into_iter()
        .map(|(fd, s)| {
            Ok((
                fd,
                Buffers {
                    rcvbuf: getsockopt_int(&s, libc::SO_RCVBUF)?,
                    sndbuf: getsockopt_int(&s, libc::SO_SNDBUF)?,
                },
            ))
        })
        .collect()
}

/// The one buffer setting every UDP socket of `pid` has; an error if they differ or there are
/// none.
pub fn uniform_udp_buffers(pid: u32) -> anyhow::Result<Buffers> {
    let all = udp_buffers(pid)?;
    let Some((_, first)) = all.first() else {
        bail!("pid {pid} has no UDP socket");
    };
    if let Some((fd, b)) = all.iter().find(|(_, b)| b != first) {
        bail!("pid {pid}: UDP sockets differ: fd {fd} has {b}, another {first}");
    }
    Ok(*first)
}

/// Gives every UDP socket of `pid` the buffers `want` (with `SO_RCVBUFFORCE` /
/// `SO_SNDBUFFORCE`, as veil-wg does for itself: root may exceed `net.core.{r,w}mem_max`) and
/// checks they took. Returns what the sockets had before.
pub fn set_udp_buffers(pid: u32, want: Buffers) -> anyhow::Result<Vec<Buffers>> {
    let mut before = vec![];
    for (fd, s) in udp_sockets(pid)? {
        before.push(Buffers {
            rcvbuf: getsockopt_int(&s, libc::SO_RCVBUF)?,
            sndbuf: getsockopt_int(&s, libc::SO_SNDBUF)?,
        });
        // The kernel doubles the value it is given; `want` is what it reports.
        setsockopt_int(&s, libc::SO_RCVBUFFORCE, want.rcvbuf / 2)?;
        setsockopt_int(&s, libc::SO_SNDBUFFORCE, want.sndbuf / 2)?;
        let got = Buffers {
            rcvbuf: getsockopt_int(&s, libc::SO_RCVBUF)?,
            sndbuf: getsockopt_int(&s, libc::SO_SNDBUF)?,
        };
        if got != want {
            bail!("pid {pid} fd {fd}: asked for {want}, the socket has {got}");
        }
    }
    if before.is_empty() {
        bail!("pid {pid} has no UDP socket");
    }
    Ok(before)
}
