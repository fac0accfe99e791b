//! datapath: loads veil's eBPF object, pins its maps, attaches TC programs with pinned links and
//! reads counters back.
//!
//! Maps are pinned by name under the node's pin directory and links under `links/`, so a
//! restarted agent re-adopts both: it reuses the maps (counters, policy, auth entries survive)
//! and atomically swaps its freshly loaded program into each existing link (`bpf_link_update`),
//! so a pod interface is never without a program. Shutdown detaches nothing; removal is
//! explicit (`veil lab down`, or deleting the pin directory).

pub mod maps;
pub mod policy;
pub mod testrun;

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        LinkOrder, SchedClassifier, TcAttachType,
    },
    Ebpf, EbpfLoader,
};
use veil_common::{maps::DatapathConfig, programs};

/// The eBPF object, built for bpfel-unknown-none by build.rs and embedded in the binary.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/veil.bpf.o"));

/// Errors loading, attaching or reading the datapath.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot prepare pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot load the eBPF object")]
    Load(#[source] aya::EbpfError),
    #[error("eBPF program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("eBPF program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot attach {program} to {interface}")]
    Attach {
        program: &'static str,
        interface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot pin link for {interface}")]
    PinLink {
        interface: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("eBPF map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("interface {0} not found")]
    NoInterface(String),
    #[error("cannot mount bpffs")]
    Bpffs(#[source] crate::sys::Error),
}

/// Where a program is hooked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    TcxIngress,
    TcxEgress,
}

impl Hook {
    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::TcxIngress => TcAttachType::Ingress,
            Hook::TcxEgress => TcAttachType::Egress,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Hook::TcxIngress => "tcx-ingress",
            Hook::TcxEgress => "tcx-egress",
        }
    }
}

/// An attached program as `veil status` shows it.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub program: &'static str,
    pub interface: String,
    pub ifindex: u32,
    pub hook: Hook,
    pub program_id: u32,
    pub link_id: u32,
    /// True when this agent adopted a link an earlier agent pinned.
    pub adopted: bool,
}

pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    attachments: BTreeMap<(String, Hook), Attachment>,
}

impl Datapath {
    /// Mounts bpffs if needed, loads the object with maps pinned under `pin_dir` (reusing pins
    /// an earlier agent left), loads the programs and writes the datapath config.
    pub fn open(bpffs: &Path, pin_dir: &Path, config: DatapathConfig) -> Result<Self, Error> {
        crate::sys::ensure_bpffs(bpffs).map_err(Error::Bpffs)?;
        let links_dir = pin_dir.join("links");
        std::fs::create_dir_all(&links_dir).map_err(|source| Error::PinDir {
            path: links_dir.clone(),
            source,
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(OBJECT)
            .map_err(Error::Load)?;
        for name in [
            programs::FROM_POD,
            programs::FROM_TUNNEL,
            programs::FROM_UNDERLAY,
            programs::TO_TUNNEL,
            programs::FROM_HOLD,
        ] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(Error::MissingProgram(name))?
                .try_into()
                .map_err(|source| Error::Program { name, source })?;
            prog.load()
                .map_err(|source| Error::Program { name, source })?;
        }
        let mut dp = Self {
            ebpf,
            pin_dir: pin_dir.into(),
            attachments: BTreeMap::new(),
        };
        // A restarted agent finds the config its predecessor left in the pinned map: the live
        // policy slot and node-wide audit mode carry over, so packets keep seeing the policy
        // set in force (slot 0 may hold an older generation) until the first reconcile.
        let mut config = config;
        if let Ok(prev) = dp.config_map()?.get() {
            if prev.node_id != 0 && prev.node_id == config.node_id {
                config.policy_slot = prev.policy_slot;
                config.flags |= prev.flags & veil_common::config_flags::AUDIT;
            }
        }
        dp.config_map()?.set(config)?;
        Ok(dp)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn config_map(&mut self) -> Result<maps::ConfigMap<'_>, Error> {
        maps::ConfigMap::new(&mut self.ebpf)
    }

    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Attaches `program` at `hook` on `interface`, adopting a link an earlier agent pinned for
    /// the same interface (same ifindex) by swapping the program in atomically.
    pub fn attach(
        &mut self,
        program: &'static str,
        interface: &str,
        hook: Hook,
    ) -> Result<(), Error> {
        let ifindex = nix::net::if_::if_nametoindex(interface)
            .map_err(|_| Error::NoInterface(interface.to_string()))?;
        if let Some(a) = self.attachments.get(&(interface.to_string(), hook)) {
            if a.ifindex == ifindex && a.program == program {
                return Ok(());
            }
        }
        let pin = self.link_pin_path(interface, ifindex, hook);
        self.remove_stale_pins(interface, ifindex, hook);
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(program)
            .ok_or(Error::MissingProgram(program))?
            .try_into()
            .map_err(|source| Error::Program {
                name: program,
                source,
            })?;
        let attach_err = |source| Error::Attach {
            program,
            interface: interface.to_string(),
            source,
        };
        let (link_id, adopted) = match PinnedLink::from_pin(&pin) {
            Ok(old) => {
                let fd: FdLink = old.into();
                match SchedClassifierLink::try_from(fd) {
                    Ok(link) => (prog.attach_to_link(link).map_err(attach_err)?, true),
                    Err(_) => {
                        let _ = std::fs::remove_file(&pin);
                        (
                            Self::attach_new(prog, interface, hook).map_err(attach_err)?,
                            false,
                        )
                    }
                }
            }
            Err(_) => (
                Self::attach_new(prog, interface, hook).map_err(attach_err)?,
                false,
            ),
        };
        let program_id = prog.info().map(|i| i.id()).unwrap_or(0);
        let link = prog.take_link(link_id).map_err(attach_err)?;
        let fd: FdLink = link
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| Error::PinLink {
                interface: interface.to_string(),
                source: Box::new(e),
            })?;
        let link_id = fd.info().map(|i| i.id()).unwrap_or(0);
        if !adopted {
            // The pin keeps the link (and the program) attached after this agent exits.
            fd.pin(&pin).map_err(|e| Error::PinLink {
                interface: interface.to_string(),
                source: Box::new(e),
            })?;
        }
        self.attachments.insert(
            (interface.to_string(), hook),
            Attachment {
                program,
                interface: interface.to_string(),
                ifindex,
                hook,
                program_id,
                link_id,
                adopted,
            },
        );
        Ok(())
    }

    fn attach_new(
        prog: &mut SchedClassifier,
        interface: &str,
        hook: Hook,
    ) -> Result<aya::programs::tc::SchedClassifierLinkId, aya::programs::ProgramError> {
        prog.attach_with_options(
            interface,
            hook.attach_type(),
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
    }

    /// Detaches and unpins whatever veil attached at `hook` on `interface`.
    pub fn detach(&mut self, interface: &str, hook: Hook) {
        if let Some(a) = self.attachments.remove(&(interface.to_string(), hook)) {
            let _ = std::fs::remove_file(self.link_pin_path(interface, a.ifindex, hook));
        }
    }

    /// Interfaces veil has programs on.
    pub fn attachments(&self) -> impl Iterator<Item = &Attachment> {
        self.attachments.values()
    }

    fn link_pin_path(&self, interface: &str, ifindex: u32, hook: Hook) -> PathBuf {
        self.pin_dir
            .join("links")
            .join(link_pin_name(interface, ifindex, hook))
    }

    /// Pins for the same interface name and hook but another ifindex belong to a device that
    /// was deleted and recreated; their links are already defunct.
    fn remove_stale_pins(&self, interface: &str, ifindex: u32, hook: Hook) {
        let Ok(entries) = std::fs::read_dir(self.pin_dir.join("links")) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some((h, idx, ifname)) = parse_link_pin_name(&name) {
                if h == hook.as_str() && ifname == interface && idx != ifindex {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    /// Removes pins for interfaces that no longer exist.
    pub fn prune_pins(&mut self) {
        let Ok(entries) = std::fs::read_dir(self.pin_dir.join("links")) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((_, ifindex, ifname)) = parse_link_pin_name(&name) else {
                continue;
            };
            if nix::net::if_::if_nametoindex(ifname.as_str()).ok() != Some(ifindex) {
                let _ = std::fs::remove_file(e.path());
                self.attachments.retain(|(i, _), _| *i != ifname);
            }
        }
    }
}

/// Pin file name of a link: `<hook>:<ifindex>:<ifname>`. bpffs refuses names with '.', which
/// interface names may contain, so '.' is written as '%'.
fn link_pin_name(interface: &str, ifindex: u32, hook: Hook) -> String {
    format!(
        "{}:{ifindex}:{}",
        hook.as_str(),
        interface.replace('.', "%")
    )
}

fn parse_link_pin_name(name: &str) -> Option<(String, u32, String)> {
    let mut parts = name.splitn(3, ':');
    let hook = parts.next()?.to_string();
    let ifindex = parts.next()?.parse().ok()?;
    let ifname = parts.next()?.replace('%', ".");
    Some((hook, ifindex, ifname))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pin_names_round_trip_without_dots() {
        let n = link_pin_name("eth0.100", 7, Hook::TcxIngress);
        assert!(!n.contains('.'));
        assert_eq!(
            parse_link_pin_name(&n),
            Some(("tcx-ingress".into(), 7, "eth0.100".into()))
        );
        assert_eq!(parse_link_pin_name("garbage"), None);
    }
}
