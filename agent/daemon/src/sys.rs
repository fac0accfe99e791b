//! Thin shells over the host: network namespaces, cgroup2, bpffs, `ip`, process spawning.
//!
//! Everything here is a syscall or a command with its error named; the logic that decides what
//! to create lives in `lab` and `agent`.

use std::{
    fs::File,
    io::{self, Write as _},
    os::{
        fd::{AsRawFd as _, RawFd},
        unix::process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Errors from host operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("could not run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no cgroup2 mount found (looked in /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("cgroup {path} still has processes after {waited:?}")]
    CgroupBusy { path: PathBuf, waited: Duration },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Names the file operation that failed: `.map_err(io_err("cannot read", path))`.
pub(crate) fn io_err(
    what: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { what, path, source }
}

/// A removal's result where "already gone" is success.
fn removed(result: io::Result<()>, what: &'static str, path: &Path) -> Result<()> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r.map_err(io_err(what, path)),
    }
}

/// Runs `ip` with the given arguments; returns stdout.
pub fn ip(args: &[&str]) -> Result<String> {
    run("ip", args, None)
}

/// Runs `ip -batch -` (with `-force`, so every line runs and the first error is reported) in the
/// given netns, or in the caller's namespace.
pub fn ip_batch(netns: Option<&str>, lines: &[String]) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut args = vec![];
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend(["-batch", "-"]);
    let script = lines.join("\n") + "\n";
    run("ip", &args, Some(script.as_bytes())).map(drop)
}

/// Runs `cmd` to completion with no input and its output discarded: did it exit 0? For polls,
/// where a command that cannot start yet is only "not yet".
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs a command to completion; a non-zero exit becomes [`Error::Command`] carrying stderr.
pub fn run(program: &str, args: &[&str], stdin: Option<&[u8]>) -> Result<String> {
    let command = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn {
            command: command.clone(),
            source,
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input).map_err(|source| Error::Spawn {
            command: command.clone(),
            source,
        })?;
    }
    let out = child.wait_with_output().map_err(|source| Error::Spawn {
        command: command.clone(),
        source,
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let stderr = if stderr.is_empty() {
            format!("exit status {}", out.status)
        } else {
            stderr
        };
        return Err(Error::Command { command, stderr });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Path of a named network namespace (as `ip netns add` creates it).
pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/var/run/netns").join(name)
}

pub fn netns_exists(name: &str) -> bool {
    netns_path(name).exists()
}

/// Lists named network namespaces.
pub fn netns_list() -> Vec<String> {
    std::fs::read_dir("/var/run/netns")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Deletes a named netns; a missing one is not an error (teardown is idempotent).
pub fn netns_delete(name: &str) -> Result<()> {
    if !netns_exists(name) {
        return Ok(());
    }
    ip(&["netns", "del", name]).map(drop)
}

/// Moves the calling thread into a named network namespace.
pub fn enter_netns(name: &str) -> Result<()> {
    let path = netns_path(name);
    let f = File::open(&path).map_err(io_err("cannot open netns", &path))?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| Error::Io {
        what: "cannot enter netns",
        path,
        source: e.into(),
    })
}

/// Runs `f` on a fresh thread inside the named netns (sockets it opens stay bound to that netns).
pub fn in_netns<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let name = name.to_string();
    std::thread::spawn(move || -> Result<T> {
        enter_netns(&name)?;
        Ok(f())
    })
    .join()
    .unwrap_or_else(|_| {
        Err(Error::Command {
            command: "netns thread".into(),
            stderr: "panicked".into(),
        })
    })
}

/// The cgroup2 mount point: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on
/// hybrid ones like this project's machines.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err("cannot read", "/proc/self/mountinfo"))?;
    mount_point_of_type(&mountinfo, "cgroup2").ok_or(Error::NoCgroup2)
}

/// Finds the first mount point of a filesystem type in mountinfo text.
pub fn mount_point_of_type(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let ty = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (ty == fstype).then(|| PathBuf::from(mount_point))
    })
}

/// True when `path` is itself a mount point of filesystem type `fstype`.
pub fn is_mounted(mountinfo: &str, path: &Path, fstype: &str) -> bool {
    mountinfo.lines().any(|line| {
        let Some((left, right)) = line.split_once(" - ") else {
            return false;
        };
        left.split_whitespace().nth(4).map(Path::new) == Some(path)
            && right.split_whitespace().next() == Some(fstype)
    })
}

/// Mounts bpffs at `/sys/fs/bpf` unless it already is.
pub fn ensure_bpffs(mount_point: &Path) -> Result<bool> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err("cannot read", "/proc/self/mountinfo"))?;
    if is_mounted(&mountinfo, mount_point, "bpf") {
        return Ok(false);
    }
    std::fs::create_dir_all(mount_point).map_err(io_err("cannot create", mount_point))?;
    nix::mount::mount(
        Some("bpf"),
        mount_point,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| Error::Io {
        what: "cannot mount bpffs at",
        path: mount_point.into(),
        source: e.into(),
    })?;
    Ok(true)
}

/// Kills every process in a cgroup subtree (`cgroup.kill`) and waits until it is empty.
pub fn cgroup_kill(path: &Path, wait: Duration) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let kill = path.join("cgroup.kill");
    std::fs::write(&kill, "1").map_err(io_err("cannot write", &kill))?;
    let start = Instant::now();
    while cgroup_has_processes(path) {
        if start.elapsed() > wait {
            return Err(Error::CgroupBusy {
                path: path.into(),
                waited: wait,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// True if any cgroup in the subtree has a process (cgroup.events says `populated 1`).
pub fn cgroup_has_processes(path: &Path) -> bool {
    std::fs::read_to_string(path.join("cgroup.events"))
        .map(|s| s.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

/// Removes a cgroup subtree bottom-up (cgroups are removed with rmdir, never recursively).
pub fn cgroup_remove_tree(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let entries = std::fs::read_dir(path).map_err(io_err("cannot list", path))?;
    for e in entries.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            cgroup_remove_tree(&e.path())?;
        }
    }
    removed(std::fs::remove_dir(path), "cannot remove cgroup", path)
}

/// A binary shipped beside the running one (veil-wg, veil-proxy), else `name` on the PATH.
pub fn sibling_binary(name: &str) -> std::path::PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| name.into())
}

/// Where a spawned daemon runs.
pub struct Placement<'a> {
    pub netns: Option<&'a str>,
    pub cgroup: Option<&'a Path>,
    pub log: &'a Path,
}

/// Spawns a detached daemon (own session) inside a netns and cgroup, output appended to a log.
pub fn spawn_daemon(cmd: &mut Command, at: &Placement<'_>) -> Result<Child> {
    let command = format!("{cmd:?}");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(at.log)
        .map_err(io_err("cannot open log", at.log))?;
    let log2 = log.try_clone().map_err(io_err("cannot open log", at.log))?;
    // Open everything the child needs before fork: between fork and exec only raw syscalls run.
    let netns = at
        .netns
        .map(|n| File::open(netns_path(n)).map_err(io_err("cannot open netns", netns_path(n))))
        .transpose()?;
    let procs = at
        .cgroup
        .map(|c| {
            let p = c.join("cgroup.procs");
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .map_err(io_err("cannot open", p))
        })
        .transpose()?;
    let netns_fd: Option<RawFd> = netns.as_ref().map(|f| f.as_raw_fd());
    let procs_fd: Option<RawFd> = procs.as_ref().map(|f| f.as_raw_fd());
    cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe syscalls
    // (setsid, setns, write) on descriptors opened before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(fd) = procs_fd {
                if libc::write(fd, b"0".as_ptr().cast(), 1) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(fd) = netns_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|source| Error::Spawn { command, source })?;
    drop(netns);
    drop(procs);
    Ok(child)
}

/// Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat), used to tell
/// a recorded process from a later one that reused its pid.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Sends SIGKILL to a process if it is still the one recorded (same start time).
pub fn kill_recorded(pid: u32, start_time: u64) {
    if process_start_time(pid) == Some(start_time) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Removes a directory tree; missing is fine.
pub fn remove_tree(path: &Path) -> Result<()> {
    removed(std::fs::remove_dir_all(path), "cannot remove", path)
}

/// Removes a file; missing is fine.
pub fn remove_file(path: &Path) -> Result<()> {
    removed(std::fs::remove_file(path), "cannot remove", path)
}

/// Writes a file atomically (temp file + rename), so readers never see half of it.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).map_err(io_err("cannot write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("cannot rename into", path))
}

/// Checks the privileges and kernel features the lab needs, naming what is missing.
pub fn check_lab_prerequisites() -> std::result::Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("veil lab needs root (network namespaces, cgroups, BPF)".into());
    }
    if which("ip").is_none() {
        return Err("`ip` (iproute2) is not installed; run scripts/setup.sh".into());
    }
    cgroup2_root().map_err(|e| e.to_string())?;
    Ok(())
}

/// Finds an executable on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

/// Hands the allocator's free memory back to the kernel. The `veil` binary allocates with
/// mimalloc (agent/src/main.rs): `mi_collect` frees its empty pages and segments at once. A new
/// cluster snapshot (tens of megabytes at 100,000 pods) frees the old one; glibc's malloc, used
/// before, kept most of it resident between the pages still in use (scale-bench). In a process
/// allocating with glibc (the daemon's unit tests) it finds nothing of its own to free.
pub fn release_free_memory() {
    // SAFETY: mi_collect only walks and releases mimalloc's own free pages.
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
24 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 24 0:26 / /sys/fs/cgroup rw shared:4 - tmpfs tmpfs rw,mode=755
41 30 0:35 / /sys/fs/cgroup/unified rw,relatime shared:15 - cgroup2 cgroup2 rw
50 24 0:40 / /sys/fs/bpf rw,relatime shared:20 - bpf bpf rw,mode=700
";

    #[test]
    fn finds_cgroup2_mount() {
        assert_eq!(
            mount_point_of_type(MOUNTINFO, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(mount_point_of_type(MOUNTINFO, "nfs"), None);
    }

    #[test]
    fn detects_bpffs_mount() {
        assert!(is_mounted(MOUNTINFO, Path::new("/sys/fs/bpf"), "bpf"));
        assert!(!is_mounted(MOUNTINFO, Path::new("/sys/fs/bpf"), "tmpfs"));
        assert!(!is_mounted(MOUNTINFO, Path::new("/sys/fs"), "bpf"));
    }

    #[test]
    fn start_time_of_self_is_stable() {
        let pid = std::process::id();
        let a = process_start_time(pid).unwrap();
        assert_eq!(process_start_time(pid), Some(a));
        assert_eq!(process_start_time(u32::MAX), None);
    }
}
