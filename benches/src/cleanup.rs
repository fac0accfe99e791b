//! Everything a run creates is registered here and removed on every exit path: normal end,
//! error (the guard's `Drop`), and SIGINT/SIGTERM (a signal thread runs the same cleanup).
//! Processes are recorded in a pid file too, so a run killed with SIGKILL is cleaned up by the
//! next one.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::Mutex,
};

use anyhow::Context as _;

/// Where the harness keeps its pid file.
pub const STATE_DIR: &str = "/run/veil-bench";

enum Item {
    Lab { veil: PathBuf, name: String },
    Process { pid: u32, comm: String },
    File(PathBuf),
    Netns(String),
}

static ITEMS: Mutex<Vec<Item>> = Mutex::new(Vec::new());

fn pid_file() -> PathBuf {
    Path::new(STATE_DIR).join("pids")
}

fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

fn write_pid_file(items: &[Item]) {
    let text: String = items
        .iter()
        .filter_map(|i| match i {
            Item::Process { pid, comm } => Some(format!("{pid} {comm}\n")),
            _ => None,
        })
        .collect();
    let _ = std::fs::create_dir_all(STATE_DIR);
    let _ = std::fs::write(pid_file(), text);
}

/// Kills processes a previous run recorded and did not clean up (same pid and comm only).
pub fn reap_stale() {
    let Ok(text) = std::fs::read_to_string(pid_file()) else {
        return;
    };
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(pid), Some(name)) = (it.next().and_then(|p| p.parse::<u32>().ok()), it.next())
        else {
            continue;
        };
        if comm(pid).as_deref() == Some(name) {
            kill(pid);
        }
    }
    let _ = std::fs::remove_file(pid_file());
}

fn kill(pid: u32) {
    // SAFETY: kill(2) on a pid this harness started (checked by comm for stale ones).
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

pub fn register_lab(veil: &Path, name: &str) {
    ITEMS.lock().expect("cleanup lock").push(Item::Lab {
        veil: veil.to_path_buf(),
        name: name.to_string(),
    });
}

pub fn register_netns(name: &str) {
    ITEMS
        .lock()
        .expect("cleanup lock")
        .push(Item::Netns(name.to_string()));
}

pub fn register_file(path: &Path) {
    ITEMS
        .lock()
        .expect("cleanup lock")
        .push(Item::File(path.to_path_buf()));
}

/// Spawns a child with the default signal mask (the harness blocks SIGINT/SIGTERM for its
/// signal thread, and a mask is inherited across exec) and registers it for cleanup.
pub fn spawn(cmd: &mut Command) -> anyhow::Result<Child> {
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let pid = child.id();
    // Give exec a moment so comm is the program's, not ours.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut items = ITEMS.lock().expect("cleanup lock");
    items.push(Item::Process {
        pid,
        comm: comm(pid).unwrap_or_default(),
    });
    write_pid_file(&items);
    Ok(child)
}

/// Kills and reaps one registered child now.
pub fn stop(mut child: Child) {
    let pid = child.id();
    let _ = child.kill();
    let _ = child.wait();
    let mut items = ITEMS.lock().expect("cleanup lock");
    items.retain(|i| !matches!(i, Item::Process { pid: p, .. } if *p == pid));
    write_pid_file(&items);
}

/// Removes everything registered, newest first. Idempotent.
pub fn run_all() {
    let items: Vec<Item> = std::mem::take(&mut *ITEMS.lock().expect("cleanup lock"));
    for item in items.into_iter().rev() {
        match item {
            Item::Process { pid, comm: c } => {
                if comm(pid).as_deref() == Some(c.as_str()) {
                    kill(pid);
                }
            }
            Item::Lab { veil, name } => {
                eprintln!("cleanup: veil lab down --name {name}");
                let _ = Command::new(&veil)
                    .args(["lab", "down", "--name", &name])
                    .stdout(std::process::Stdio::null())
                    .status();
            }
            Item::File(p) => {
                let _ = std::fs::remove_file(p);
            }
            Item::Netns(n) => {
                let _ = Command::new("ip")
                    .args(["netns", "del", &n])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
    }
    let _ = std::fs::remove_file(pid_file());
}

/// Runs [`run_all`] when dropped.
pub struct Guard;

impl Drop for Guard {
    fn drop(&mut self) {
        run_all();
    }
}

/// What a benchmark does first: refuses to run without root (its labs need network
/// namespaces, cgroups and BPF), removes what a killed earlier run left, and cleans up on
/// SIGINT/SIGTERM and when the returned guard drops.
pub fn start_as_root() -> anyhow::Result<Guard> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("run as root: the labs need network namespaces, cgroups and BPF");
    }
    reap_stale();
    Ok(install_signal_cleanup())
}

/// Blocks SIGINT/SIGTERM in this (main) thread and every thread spawned after, and starts a
/// thread that cleans up and exits when one arrives. Call before spawning anything.
pub fn install_signal_cleanup() -> Guard {
    // SAFETY: plain sigset manipulation and sigprocmask/sigwait on this process.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        std::thread::spawn(move || {
            let mut sig = 0;
            libc::sigwait(&set, &mut sig);
            eprintln!("veil-bench: signal {sig}, cleaning up");
            run_all();
            std::process::exit(130);
        });
    }
    Guard
}
