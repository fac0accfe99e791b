//! Builds the eBPF programs in `../../ebpf` for bpfel-unknown-none with the nightly toolchain and
//! bpf-linker, and leaves the object in OUT_DIR for `include_bytes_aligned!`.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir
        .ancestors()
        .nth(2)
        .expect("agent/daemon lives in the workspace");
    let ebpf_dir = workspace.join("ebpf");
    for p in [
        "src",
        "Cargo.toml",
        "Cargo.lock",
        "common/src",
        "common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", ebpf_dir.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=VEIL_EBPF_TARGET_DIR");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    // One eBPF target dir for every host profile, so switching debug/release/test does not
    // rebuild the programs.
    let target_dir = env::var_os("VEIL_EBPF_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_target_dir(&manifest_dir, &out_dir).join("ebpf"));

    let mut cmd = Command::new("cargo");
    cmd.current_dir(&ebpf_dir)
        .args([
            "+nightly",
            "build",
            "--release",
            "--locked",
            "--target",
            "bpfel-unknown-none",
        ])
        .args(["-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer cargo's settings are for the host build; none of them may leak into this one.
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
        "CARGO_PROFILE_RELEASE_DEBUG",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTDOCFLAGS",
    ] {
        cmd.env_remove(var);
    }
    if let Some(home) = env::var_os("HOME") {
        // bpf-linker is installed by scripts/setup.sh into cargo's bin dir.
        let cargo_bin = Path::new(&home).join(".cargo/bin");
        let path = env::var_os("PATH").unwrap_or_default();
        let mut paths: Vec<PathBuf> = env::split_paths(&path).collect();
        paths.insert(0, cargo_bin);
        cmd.env("PATH", env::join_paths(paths).expect("PATH is joinable"));
    }
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run cargo +nightly for the eBPF programs ({e}); run scripts/setup.sh first")
    });
    if !status.success() {
        panic!(
            "building the eBPF programs failed ({status}); scripts/setup.sh installs the nightly \
             rust-src component and bpf-linker they need"
        );
    }
    let object = target_dir.join("bpfel-unknown-none/release/veil");
    std::fs::copy(&object, out_dir.join("veil.bpf.o"))
        .unwrap_or_else(|e| panic!("cannot copy {}: {e}", object.display()));
}

/// `<target>` from `<target>/<profile>/build/<pkg>/out`, else the workspace's `target`.
fn workspace_target_dir(manifest_dir: &Path, out_dir: &Path) -> PathBuf {
    if let Some(t) = env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(t);
    }
    out_dir
        .ancestors()
        .nth(4)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| {
            manifest_dir
                .ancestors()
                .nth(2)
                .expect("workspace")
                .join("target")
        })
}
