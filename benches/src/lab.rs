//! The lab contract as the harness uses it: `veil lab up/show/exec/down` and `veil status`,
//! through the built binary only (design.md §4).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
};

use anyhow::{bail, Context as _};

/// `veil lab show -o json` and `veil status -o json` read with the types that write them, so
/// a field the harness reads cannot drift from what the binary prints.
pub use veil_agent::{
    api::Status,
    lab::{LabView, NodeView, PodView},
};

/// `veil status --name LAB --node NODE -o json`.
pub fn status(veil: &Path, lab: &str, node: &str) -> anyhow::Result<Status> {
    let out =
        run(Command::new(veil).args(["status", "--name", lab, "--node", node, "-o", "json"]))?;
    // One node asked: the answer is an object (or a one-element array).
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let v = match v {
        serde_json::Value::Array(mut a) if !a.is_empty() => a.remove(0),
        v => v,
    };
    serde_json::from_value(v).context("parsing `veil status -o json`")
}

/// A lab this harness brought up; `down` is idempotent.
pub struct Lab {
    veil: PathBuf,
    pub view: LabView,
}

/// Runs `cmd` to completion; its output, or an error with its stdout and stderr.
pub fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

impl Lab {
    /// `veil lab up --name NAME --control-plane files -f FILE ARGS…`, then `lab show`. The
    /// files control plane: an apiserver and etcd on this 2-core machine would share the cores
    /// being measured; the datapath is the same in both modes.
    pub fn up(veil: &Path, name: &str, file: &Path, args: &[&str]) -> anyhow::Result<Lab> {
        Self::up_with(veil, name, "files", file, args)
    }

    /// `veil lab up --name NAME --control-plane CONTROL_PLANE -f FILE ARGS…`, then `lab show`.
    pub fn up_with(
        veil: &Path,
        name: &str,
        control_plane: &str,
        file: &Path,
        args: &[&str],
    ) -> anyhow::Result<Lab> {
        // A lab of the same name left by an interrupted run goes first.
        Self::down_named(veil, name);
        crate::cleanup::register_lab(veil, name);
        let mut cmd = Command::new(veil);
        cmd.args([
            "lab",
            "up",
            "--name",
            name,
            "--control-plane",
            control_plane,
            "-f",
        ])
        .arg(file)
        .args(args)
        .stdin(Stdio::null());
        run(&mut cmd).with_context(|| format!("lab {name} did not come up"))?;
        let view = Self::show(veil, name)?;
        Ok(Lab {
            veil: veil.to_path_buf(),
            view,
        })
    }

    pub fn show(veil: &Path, name: &str) -> anyhow::Result<LabView> {
        let out = run(Command::new(veil).args(["lab", "show", "--name", name, "-o", "json"]))?;
        serde_json::from_slice(&out.stdout).context("parsing `veil lab show -o json`")
    }

    pub fn name(&self) -> &str {
        &self.view.name
    }

    /// The `veil` binary that runs this lab.
    pub fn veil(&self) -> &Path {
        &self.veil
    }

    pub fn node(&self, name: &str) -> anyhow::Result<&NodeView> {
        self.view
            .node(name)
            .with_context(|| format!("lab {} has no node {name}", self.name()))
    }

    pub fn pod(&self, name: &str) -> anyhow::Result<&PodView> {
        self.view
            .pod(name)
            .with_context(|| format!("lab {} has no pod {name}", self.name()))
    }

    /// `veil status --node N -o json`.
    pub fn status(&self, node: &str) -> anyhow::Result<Status> {
        status(&self.veil, self.name(), node)
    }

    /// The command `veil lab exec POD -- ARGV…` (not started).
    pub fn exec_cmd(&self, pod: &str, argv: &[&str]) -> Command {
        let mut c = Command::new(&self.veil);
        c.args(["lab", "exec", "--name", self.name(), pod, "--"])
            .args(argv);
        c
    }

    /// Runs a command in a pod to completion and returns its stdout.
    pub fn exec(&self, pod: &str, argv: &[&str]) -> anyhow::Result<String> {
        let out = run(self.exec_cmd(pod, argv).stdin(Stdio::null()))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts a long-running command in a pod (`lab exec` execs, so the child is the command).
    pub fn spawn(&self, pod: &str, argv: &[&str]) -> anyhow::Result<Child> {
        let mut cmd = self.exec_cmd(pod, argv);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        crate::cleanup::spawn(&mut cmd)
    }

    fn down_named(veil: &Path, name: &str) {
        let _ = Command::new(veil)
            .args(["lab", "down", "--name", name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// `veil lab down`: removes the lab, every process in its cgroups included.
    pub fn down(&self) {
        Self::down_named(&self.veil, self.name());
    }
}

/// Runs `ip ARGS…` inside a netns.
pub fn ip_in(netns: &str, args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(["-n", netns]).args(args)).map(|_| ())
}
