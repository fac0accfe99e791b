//! `veil-wg [--foreground] [--mtu N] [--queues N] IFNAME`: a userspace WireGuard device.
//!
//! Creates the TUN device IFNAME and serves the WireGuard UAPI at
//! `/var/run/wireguard/IFNAME.sock`, like wireguard-go and boringtun-cli, so `wg` and any UAPI
//! client configure it. Without `--foreground` it detaches once the device is up.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use veil_transport::userspace::{io, UAPI_DIR};

struct Args {
    foreground: bool,
    mtu: u16,
    queues: usize,
    name: String,
}

fn usage() -> String {
    "usage: veil-wg [--foreground] [--mtu N] [--queues N] IFNAME".to_string()
}

/// The value after `flag`, as a number.
fn number_after<T: std::str::FromStr>(
    it: &mut impl Iterator<Item = String>,
    flag: &str,
) -> Result<T, String> {
    let v = it.next().ok_or(format!("{flag} needs a value"))?;
    v.parse()
        .map_err(|_| format!("{flag}: {v:?} is not a number"))
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        foreground: false,
        mtu: 1420,
        queues: 1,
        name: String::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-f" | "--foreground" => a.foreground = true,
            "--mtu" => {
                a.mtu = number_after(&mut it, "--mtu")?;
                if !(576..=9000).contains(&a.mtu) {
                    return Err(format!("--mtu: {} is outside 576..=9000", a.mtu));
                }
            }
            "--queues" => {
                a.queues = number_after(&mut it, "--queues")?;
                if !(1..=16).contains(&a.queues) {
                    return Err("--queues: must be 1..=16".into());
                }
            }
            "-h" | "--help" => return Err(usage()),
            s if s.starts_with('-') => return Err(format!("unknown option {s}\n{}", usage())),
            s => {
                if !a.name.is_empty() {
                    return Err(format!("unexpected argument {s}\n{}", usage()));
                }
                a.name = s.to_string();
            }
        }
    }
    if a.name.is_empty() || a.name.len() > 15 || a.name.contains('/') {
        return Err(format!(
            "IFNAME must be 1-15 characters without '/'\n{}",
            usage()
        ));
    }
    Ok(a)
}

fn main() -> ExitCode {
    veil_transport::abort_on_panic();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("veil-wg: {e}");
            return ExitCode::from(2);
        }
    };
    if !args.foreground {
        // Re-run ourselves in the foreground, detached, and return once it answers.
        let exe = std::env::current_exe().expect("own path");
        let mut tunnel = veil_transport::userspace::UserspaceTunnel::new(
            &args.name,
            std::path::Path::new(UAPI_DIR),
        );
        let log = PathBuf::from("/dev/null");
        return match tunnel.ensure_running(&exe, args.mtu, &log, None) {
            Ok(_) => {
                let _ = &mut tunnel;
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("veil-wg: {e}");
                ExitCode::FAILURE
            }
        };
    }
    // Block the stop signals before any thread exists, so only `sigwait` below receives them.
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGTERM);
    set.add(nix::sys::signal::Signal::SIGINT);
    let _ = set.thread_block();
    let opts = io::Options {
        name: args.name.clone(),
        mtu: args.mtu,
        queues: args.queues,
        uapi_dir: UAPI_DIR.into(),
    };
    let running = match io::start(&opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("veil-wg: cannot start {}: {e}", args.name);
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "veil-wg: {} up (mtu {}, {} queue(s)), uapi {}",
        args.name,
        args.mtu,
        args.queues,
        io::uapi_path(&opts.uapi_dir, &args.name).display()
    );
    // Exit on SIGTERM/SIGINT: remove the socket; the TUN device goes with the process.
    let sig = set.wait();
    eprintln!("veil-wg: {sig:?}, shutting down");
    running
        .stop
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = std::fs::remove_file(io::uapi_path(&opts.uapi_dir, &args.name));
    std::thread::sleep(Duration::from_millis(10));
    ExitCode::SUCCESS
}
