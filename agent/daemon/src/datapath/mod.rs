//! datapath: loads veil's eBPF object, pins its maps, attaches TC programs with pinned links and
//! reads counters back.
//!
//! Maps are pinned by name under the node's pin directory and links under `links/`, so a
//! restarted agent re-adopts both: it reuses the maps (counters, policy, auth entries survive)
//! and atomically swaps its freshly loaded program into each existing link (`bpf_link_update`),
//! so a pod interface is never without a program. Shutdown detaches nothing; removal is
//! explicit (`veil lab down`, or deleting the pin directory).
//!
//! Kernels without tcx (before 6.6; the 5.15 and 6.1 LTS lines) get the same programs through
//! the clsact qdisc ([`AttachMode::Clsact`]): one cls_bpf filter per hook at veil's fixed
//! priority and handle, which a restarted agent replaces in place (netlink `RTM_NEWTFILTER`
//! without `NLM_F_CREATE` swaps the program atomically), so there is no window without a
//! program either. The minimum kernel is 5.15 ([`MIN_KERNEL`]).

pub mod auth_map;
pub mod events;
pub mod maps;
pub mod pins;
pub mod policy;
pub mod services;
pub mod testrun;

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
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
    #[error("cannot read the eBPF object's map definitions")]
    Object(#[source] aya_obj::ParseError),
    #[error("eBPF program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("cannot wait on the flow-event ring buffer")]
    Events(#[source] io::Error),
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
    #[error("{failed} of {wanted} writes failed (the map is full, or its entries are refused); the rest were made and stale entries removed")]
    SomeWritesFailed {
        failed: usize,
        wanted: usize,
        #[source]
        first: Box<Error>,
    },
    #[error("interface {0} not found")]
    NoInterface(String),
    #[error("cannot mount bpffs")]
    Bpffs(#[source] crate::sys::Error),
    #[error("kernel {found} is too old: veil needs Linux {}.{} or newer (clsact, ring buffers, bpf_redirect_neigh); tcx is used from 6.6", MIN_KERNEL.0, MIN_KERNEL.1)]
    KernelTooOld { found: String },
    #[error("VEIL_ATTACH_MODE={0:?}: say tcx or clsact")]
    BadAttachMode(String),
    #[error("socket programs (Service load balancing) did not load: {0}")]
    SocketPrograms(String),
}

/// The oldest kernel veil runs on.
pub const MIN_KERNEL: (u32, u32) = (5, 15);
/// The first kernel with tcx.
const TCX_KERNEL: (u32, u32) = (6, 6);
/// veil's cls_bpf filter on clsact: priority 1 (before any other filter) and a fixed handle,
/// so a restarted agent finds and replaces its own filter.
const CLSACT_PRIORITY: u16 = 1;
const CLSACT_HANDLE: TcHandle = TcHandle::new(0, 0x0e11);

/// How TC programs are hooked on this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// tcx links (Linux 6.6+), pinned so they outlive the agent.
    Tcx,
    /// cls_bpf filters on the clsact qdisc (older kernels).
    Clsact,
}

impl AttachMode {
    /// tcx where the kernel has it, else clsact; `VEIL_ATTACH_MODE=tcx|clsact` overrides
    /// (operators pinning a mode; tests running the lab on clsact on a tcx kernel). Kernels
    /// older than [`MIN_KERNEL`] are refused with a clear error.
    pub fn detect() -> Result<Self, Error> {
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        let version = parse_kernel_version(&release);
        if version.is_some_and(|v| v < MIN_KERNEL) {
            return Err(Error::KernelTooOld { found: release });
        }
        match std::env::var("VEIL_ATTACH_MODE").ok().as_deref() {
            Some("tcx") => return Ok(Self::Tcx),
            Some("clsact") => return Ok(Self::Clsact),
            Some(other) => return Err(Error::BadAttachMode(other.to_string())),
            None => {}
        }
        Ok(match version {
            Some(v) if v >= TCX_KERNEL => Self::Tcx,
            Some(_) => Self::Clsact,
            // An unparseable release: try the modern path.
            None => Self::Tcx,
        })
    }
}

/// `major.minor` of a kernel release string (`6.18.3-amd64` → (6, 18)).
fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

/// Where a program is hooked. Callers name the tcx hooks; on a kernel without tcx the
/// datapath hooks the clsact equivalent, which [`Attachment::hook`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    TcxIngress,
    TcxEgress,
    ClsactIngress,
    ClsactEgress,
}

impl Hook {
    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::TcxIngress | Hook::ClsactIngress => TcAttachType::Ingress,
            Hook::TcxEgress | Hook::ClsactEgress => TcAttachType::Egress,
        }
    }

    /// The same direction in `mode`.
    fn in_mode(self, mode: AttachMode) -> Self {
        let egress = matches!(self, Hook::TcxEgress | Hook::ClsactEgress);
        match (mode, egress) {
            (AttachMode::Tcx, true) => Hook::TcxEgress,
            (AttachMode::Tcx, false) => Hook::TcxIngress,
            (AttachMode::Clsact, true) => Hook::ClsactEgress,
            (AttachMode::Clsact, false) => Hook::ClsactIngress,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Hook::TcxIngress => "tcx-ingress",
            Hook::TcxEgress => "tcx-egress",
            Hook::ClsactIngress => "clsact-ingress",
            Hook::ClsactEgress => "clsact-egress",
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
    mode: AttachMode,
    pin_dir: PathBuf,
    attachments: BTreeMap<(String, Hook), Attachment>,
    /// Why the socket programs did not load, if they did not (Services unavailable).
    sock_error: Option<String>,
    sock_attachments: Vec<services::SockAttachment>,
    /// Maps an earlier agent pinned that were made anew at open, held until this agent's
    /// programs replaced the earlier ones ([`Datapath::settle_set_aside`]).
    set_aside: Vec<pins::SetAside>,
}

impl Datapath {
    /// Mounts bpffs if needed, loads the object with maps pinned under `pin_dir` (reusing pins
    /// an earlier agent left), loads the programs and writes the datapath config.
    pub fn open(
        bpffs: &Path,
        pin_dir: &Path,
        config: DatapathConfig,
        sizes: &BTreeMap<String, u32>,
    ) -> Result<Self, Error> {
        let mode = AttachMode::detect()?;
        crate::sys::ensure_bpffs(bpffs).map_err(Error::Bpffs)?;
        let links_dir = pin_dir.join("links");
        std::fs::create_dir_all(&links_dir).map_err(|source| Error::PinDir {
            path: links_dir.clone(),
            source,
        })?;
        // aya reuses a pinned map as it finds it: one an earlier agent (another version, or
        // another `map_max_entries`) made differently is set aside and made anew (`pins`).
        let declared = pins::declared(OBJECT, sizes).map_err(Error::Object)?;
        let set_aside =
            pins::set_aside_mismatched(pin_dir, &declared).map_err(|source| Error::PinDir {
                path: pin_dir.into(),
                source,
            })?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pin_dir);
        for (name, n) in sizes {
            loader.map_max_entries(name, *n);
        }
        let mut ebpf = loader.load(OBJECT).map_err(Error::Load)?;
        if !set_aside.is_empty() {
            let c = pins::carry_all(&set_aside, pin_dir, false);
            tracing::info!(
                maps = set_aside.len(),
                copied = c.copied,
                refused = c.refused,
                "maps made anew, entries of the same layout carried over"
            );
        }
        for name in [
            programs::FROM_POD,
            programs::FROM_TUNNEL,
            programs::FROM_UNDERLAY,
            programs::TO_UNDERLAY,
            programs::TO_TUNNEL,
            programs::FROM_HOLD,
            programs::TO_POD,
        ] {
            classifier(&mut ebpf, name)?
                .load()
                .map_err(|source| Error::Program { name, source })?;
        }
        let sock_error = services::load(&mut ebpf).err().map(|e| {
            let e = crate::error_chain(&e);
            tracing::error!(error = %e, "socket programs did not load: Services are not balanced on this node");
            e
        });
        let mut dp = Self {
            ebpf,
            mode,
            pin_dir: pin_dir.into(),
            attachments: BTreeMap::new(),
            sock_error,
            sock_attachments: Vec::new(),
            set_aside,
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

    /// Once this agent's TC programs are attached everywhere (the earlier agent's programs,
    /// which wrote to the maps set aside at open, are gone): carries the connections the old
    /// programs tracked meanwhile (conntrack and fragment keys still missing) into the new maps,
    /// then lets the old maps go. Before any conntrack pruning, so a cut is never undone.
    pub fn settle_set_aside(&mut self) {
        if self.set_aside.is_empty() {
            return;
        }
        let tracked: Vec<_> = std::mem::take(&mut self.set_aside)
            .into_iter()
            .filter(|s| {
                [veil_common::maps::CT, veil_common::maps::FRAGS].contains(&s.name.as_str())
            })
            .collect();
        let c = pins::carry_all(&tracked, &self.pin_dir, true);
        tracing::info!(
            copied = c.copied,
            "maps set aside at start released; connections tracked meanwhile carried over"
        );
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn attach_mode(&self) -> AttachMode {
        self.mode
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
        let hook = hook.in_mode(self.mode);
        if let Some(a) = self.attachments.get(&(interface.to_string(), hook)) {
            if a.ifindex == ifindex && a.program == program {
                return Ok(());
            }
        }
        let (program_id, link_id, adopted) = if self.mode == AttachMode::Clsact {
            self.attach_clsact(program, interface, hook)?
        } else {
            self.attach_tcx(program, interface, ifindex, hook)?
        };
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

    /// tcx: a link pinned per interface and ifindex; returns (program id, link id, adopted).
    fn attach_tcx(
        &mut self,
        program: &'static str,
        interface: &str,
        ifindex: u32,
        hook: Hook,
    ) -> Result<(u32, u32, bool), Error> {
        let pin = self.link_pin_path(interface, ifindex, hook);
        self.remove_stale_pins(interface, ifindex, hook);
        let prog = classifier(&mut self.ebpf, program)?;
        let attach_err = |source| attach_error(program, interface, source);
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
        Ok((program_id, link_id, adopted))
    }

    /// clsact: replaces veil's filter on `interface` in place if one is there (an earlier
    /// agent's: atomic, no window), else creates it. The filter outlives this agent (no link
    /// object owns it), so the recorded link id is 0. Returns (program id, 0, adopted).
    fn attach_clsact(
        &mut self,
        program: &'static str,
        interface: &str,
        hook: Hook,
    ) -> Result<(u32, u32, bool), Error> {
        let prog = classifier(&mut self.ebpf, program)?;
        let attach_err = |source| attach_error(program, interface, source);
        // Already there is fine; any other failure shows in the attach below.
        let _ = aya::programs::tc::qdisc_add_clsact(interface);
        let existing = SchedClassifierLink::attached(
            interface,
            hook.attach_type(),
            CLSACT_PRIORITY,
            CLSACT_HANDLE,
            None,
        )
        .map_err(|_| Error::NoInterface(interface.to_string()))?;
        let (link_id, adopted) = match prog.attach_to_link(existing) {
            Ok(id) => (id, true),
            Err(_) => (
                prog.attach_with_options(
                    interface,
                    hook.attach_type(),
                    TcAttachOptions::Netlink(NlOptions {
                        priority: CLSACT_PRIORITY,
                        handle: CLSACT_HANDLE,
                        classid: None,
                    }),
                )
                .map_err(attach_err)?,
                false,
            ),
        };
        let program_id = prog.info().map(|i| i.id()).unwrap_or(0);
        // The filter stays attached when this agent exits or reloads: take the link out of the
        // program (whose drop would detach it) and forget it (its drop would too).
        let link = prog.take_link(link_id).map_err(attach_err)?;
        std::mem::forget(link);
        Ok((program_id, 0, adopted))
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
        let hook = hook.in_mode(self.mode);
        if self.mode == AttachMode::Clsact {
            if self
                .attachments
                .remove(&(interface.to_string(), hook))
                .is_some()
            {
                // Dropping a link naming veil's filter deletes the filter.
                drop(SchedClassifierLink::attached(
                    interface,
                    hook.attach_type(),
                    CLSACT_PRIORITY,
                    CLSACT_HANDLE,
                    None,
                ));
            }
            return;
        }
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

/// A loaded TC program of the object, by name.
fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    program: &'static str,
) -> Result<&'a mut SchedClassifier, Error> {
    program_of(ebpf, program)
}

/// A program of the object, by name, as its type.
fn program_of<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, Error>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(Error::MissingProgram(name))?
        .try_into()
        .map_err(|source| Error::Program { name, source })
}

fn attach_error(
    program: &'static str,
    interface: &str,
    source: aya::programs::ProgramError,
) -> Error {
    Error::Attach {
        program,
        interface: interface.to_string(),
        source,
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
    fn kernel_versions_parse_and_pick_the_attach_mode() {
        assert_eq!(parse_kernel_version("6.18.3-amd64"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(parse_kernel_version("6.1"), Some((6, 1)));
        assert_eq!(parse_kernel_version("garbage"), None);
        assert!((6, 1) < TCX_KERNEL && (6, 6) >= TCX_KERNEL && (5, 10) < MIN_KERNEL);
        assert_eq!(
            Hook::TcxIngress.in_mode(AttachMode::Clsact),
            Hook::ClsactIngress
        );
        assert_eq!(
            Hook::TcxEgress.in_mode(AttachMode::Clsact),
            Hook::ClsactEgress
        );
        assert_eq!(Hook::ClsactEgress.in_mode(AttachMode::Tcx), Hook::TcxEgress);
    }

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
