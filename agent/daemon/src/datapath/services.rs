//! datapath::services: socket-level Service load balancing. Loads the cgroup sock_addr
//! programs, attaches them to the cgroup that holds the node's pods with pinned links, and
//! writes the frontend and backend maps from the cluster state's Services.
//!
//! A restarted agent attaches its own programs first and then renames its pin over the earlier
//! agent's (which detaches that link): for a moment both run, and the second sees only backend
//! addresses, so nothing is translated twice and no connect goes untranslated.

use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::{
    programs::{links::FdLink, CgroupAttachMode, CgroupSockAddr},
    Ebpf,
};
use veil_common::{
    maps::{self as names, service_flags, Backend, BackendKey, ServiceEntry, ServiceKey},
    programs,
};

use super::{
    maps::{ip_key, sync, KernelHash},
    Datapath, Error,
};
use crate::cluster::Service;

/// A socket program attached to a cgroup, as `veil status` shows it.
#[derive(Debug, Clone)]
pub struct SockAttachment {
    pub program: &'static str,
    pub cgroup: PathBuf,
    pub program_id: u32,
    pub link_id: u32,
    /// It replaced a link an earlier agent pinned for the same cgroup.
    pub adopted: bool,
}

/// Loads the socket programs. Their failure (a kernel before 5.18 lacks `bpf_set_retval` in
/// them) leaves the rest of the datapath working: the error is returned for the caller to report.
pub(super) fn load(ebpf: &mut Ebpf) -> Result<(), Error> {
    for name in programs::SOCK {
        sock_program(ebpf, name)?
            .load()
            .map_err(|source| Error::Program { name, source })?;
    }
    Ok(())
}

fn sock_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, Error> {
    super::program_of(ebpf, name)
}

impl Datapath {
    /// Attaches the socket programs to `cgroup` (idempotent), replacing the links an earlier
    /// agent pinned for the same cgroup.
    pub fn attach_sockets(&mut self, cgroup: &Path) -> Result<(), Error> {
        if let Some(e) = &self.sock_error {
            return Err(Error::SocketPrograms(e.clone()));
        }
        if self
            .sock_attachments
            .first()
            .is_some_and(|a| a.cgroup == cgroup)
        {
            return Ok(());
        }
        let attach_err = |program: &'static str, source| Error::Attach {
            program,
            interface: cgroup.display().to_string(),
            source,
        };
        let dir = std::fs::File::open(cgroup).map_err(|source| Error::PinDir {
            path: cgroup.into(),
            source,
        })?;
        let cgroup_id = dir.metadata().map(|m| m.ino()).unwrap_or(0);
        let pins = self.pin_dir.join("cgroup-links");
        std::fs::create_dir_all(&pins).map_err(|source| Error::PinDir {
            path: pins.clone(),
            source,
        })?;
        let mut attached = Vec::new();
        for program in programs::SOCK {
            let prog = sock_program(&mut self.ebpf, program)?;
            // A cgroup link is always one of many (bpf_link_create takes no flags for it):
            // `Single` passes none; other programs on the cgroup keep running.
            let id = prog
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(|e| attach_err(program, e))?;
            let program_id = prog.info().map(|i| i.id()).unwrap_or(0);
            let link = prog.take_link(id).map_err(|e| attach_err(program, e))?;
            let fd = FdLink::try_from(link).map_err(|e| Error::PinLink {
                interface: cgroup.display().to_string(),
                source: Box::new(e),
            })?;
            let link_id = fd.info().map(|i| i.id()).unwrap_or(0);
            // bpffs names may not contain '.': `<program>:<cgroup inode>`.
            let pin = pins.join(format!("{program}:{cgroup_id}"));
            let fresh = pins.join(format!("{program}:{cgroup_id}:new"));
            let _ = std::fs::remove_file(&fresh);
            let pin_err = |e: Box<dyn std::error::Error + Send + Sync>| Error::PinLink {
                interface: cgroup.display().to_string(),
                source: e,
            };
            fd.pin(&fresh).map_err(|e| pin_err(Box::new(e)))?;
            let adopted = pin.exists();
            // Replacing the earlier agent's pin releases its link: make before break.
            std::fs::rename(&fresh, &pin).map_err(|e| pin_err(Box::new(e)))?;
            attached.push(SockAttachment {
                program,
                cgroup: cgroup.into(),
                program_id,
                link_id,
                adopted,
            });
        }
        self.sock_attachments = attached;
        Ok(())
    }

    /// Why the socket programs did not load, if they did not.
    pub fn sock_error(&self) -> Option<&str> {
        self.sock_error.as_deref()
    }

    /// The socket programs' attachments.
    pub fn sock_attachments(&self) -> &[SockAttachment] {
        &self.sock_attachments
    }
}

/// The frontend and backend map contents for `services`: one frontend per (ClusterIP, port,
/// protocol), the ready backends of the ClusterIP's family in slots `0..count` ordered by
/// address (so a set that did not change is not rewritten). A frontend two Services claim goes
/// to the first.
pub fn desired(
    services: &[Service],
) -> (
    BTreeMap<ServiceKey, ServiceEntry>,
    BTreeMap<BackendKey, Backend>,
) {
    let mut frontends = BTreeMap::new();
    let mut backends = BTreeMap::new();
    for svc in services {
        for cluster_ip in svc.cluster_ips() {
            let mut ready: Vec<_> = svc
                .backends
                .iter()
                .filter(|b| b.ready && b.ip.is_ipv4() == cluster_ip.is_ipv4())
                .map(|b| b.ip)
                .collect();
            ready.sort_unstable();
            ready.dedup();
            for port in &svc.ports {
                let Some(protocol) = port.protocol_number() else {
                    continue;
                };
                let key = ServiceKey {
                    addr: ip_key(cluster_ip),
                    port: port.port,
                    protocol,
                    _pad: 0,
                };
                if frontends.contains_key(&key) {
                    continue;
                }
                let (flags, affinity_timeout_s) = match svc.affinity_timeout_s {
                    Some(t) => (service_flags::AFFINITY, t),
                    None => (0, 0),
                };
                frontends.insert(
                    key,
                    ServiceEntry {
                        count: ready.len() as u32,
                        flags,
                        affinity_timeout_s,
                        _pad: 0,
                    },
                );
                for (slot, ip) in ready.iter().enumerate() {
                    backends.insert(
                        BackendKey {
                            service: key,
                            slot: slot as u32,
                        },
                        Backend {
                            addr: ip_key(*ip),
                            port: port.target_port,
                            _pad: 0,
                        },
                    );
                }
            }
        }
    }
    (frontends, backends)
}

/// Brings the Service maps to `services`. Backends first: a frontend's count never covers a
/// slot not yet written (a slot removed ahead of its count falls back to slot 0 in the
/// program). Returns the number of entries changed.
pub fn install(ebpf: &mut Ebpf, services: &[Service]) -> Result<usize, Error> {
    let (frontends, backends) = desired(services);
    let mut changes = sync(
        &mut KernelHash::<BackendKey, Backend>::new(ebpf, names::BACKENDS)?,
        &backends,
    )?;
    changes += sync(
        &mut KernelHash::<ServiceKey, ServiceEntry>::new(ebpf, names::SERVICES)?,
        &frontends,
    )?;
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use veil_common::maps::IpKey;

    use super::*;
    use crate::cluster::{ServiceBackend, ServicePort};

    fn svc(ip: [u8; 4], backends: &[([u8; 4], bool)]) -> Service {
        Service {
            namespace: "shop".into(),
            name: "backend".into(),
            cluster_ip: Ipv4Addr::from(ip).into(),
            cluster_ipv6: None,
            ports: vec![
                ServicePort {
                    name: "http".into(),
                    port: 80,
                    target_port: 8080,
                    protocol: "TCP".into(),
                },
                ServicePort {
                    name: "dns".into(),
                    port: 53,
                    target_port: 5353,
                    protocol: "UDP".into(),
                },
            ],
            affinity_timeout_s: None,
            backends: backends
                .iter()
                .map(|(ip, ready)| ServiceBackend {
                    pod: "shop/p".into(),
                    ip: Ipv4Addr::from(*ip).into(),
                    ready: *ready,
                })
                .collect(),
        }
    }

    fn key(ip: [u8; 4], port: u16, protocol: u8) -> ServiceKey {
        ServiceKey {
            addr: IpKey::from_v4(ip).addr,
            port,
            protocol,
            _pad: 0,
        }
    }

    #[test]
    fn ready_backends_fill_slots_in_address_order_per_port() {
        let s = svc(
            [198, 18, 16, 10],
            &[
                ([198, 19, 2, 11], true),
                ([198, 19, 1, 10], true),
                ([198, 19, 2, 12], false),
            ],
        );
        let (f, b) = desired(&[s]);
        let http = key([198, 18, 16, 10], 80, 6);
        let dns = key([198, 18, 16, 10], 53, 17);
        assert_eq!(f[&http].count, 2, "the not-ready backend is not counted");
        assert_eq!(f[&dns].count, 2);
        assert_eq!(f[&http].flags, 0);
        assert_eq!(b.len(), 4);
        let slot = |k: ServiceKey, slot| b[&BackendKey { service: k, slot }];
        assert_eq!(slot(http, 0).addr, IpKey::from_v4([198, 19, 1, 10]).addr);
        assert_eq!(slot(http, 1).addr, IpKey::from_v4([198, 19, 2, 11]).addr);
        assert_eq!(slot(http, 0).port, 8080);
        assert_eq!(slot(dns, 1).port, 5353);
    }

    #[test]
    fn no_ready_backend_is_a_frontend_with_count_zero_and_affinity_sets_its_flag() {
        let mut s = svc([198, 18, 16, 11], &[([198, 19, 1, 10], false)]);
        s.affinity_timeout_s = Some(10800);
        let (f, b) = desired(&[s]);
        let http = key([198, 18, 16, 11], 80, 6);
        assert_eq!(f[&http].count, 0);
        assert_eq!(f[&http].flags, service_flags::AFFINITY);
        assert_eq!(f[&http].affinity_timeout_s, 10800);
        assert!(b.is_empty());
    }

    #[test]
    fn a_frontend_claimed_twice_goes_to_the_first_and_unknown_protocols_are_skipped() {
        let a = svc([198, 18, 16, 12], &[([198, 19, 1, 10], true)]);
        let mut b = svc([198, 18, 16, 12], &[([198, 19, 1, 20], true)]);
        b.ports[1].protocol = "QUIC".into();
        let (f, bk) = desired(&[a, b]);
        assert_eq!(f.len(), 2);
        let http = key([198, 18, 16, 12], 80, 6);
        assert_eq!(
            bk[&BackendKey {
                service: http,
                slot: 0
            }]
                .addr,
            IpKey::from_v4([198, 19, 1, 10]).addr
        );
    }

    #[test]
    fn each_cluster_ip_of_a_dual_stack_service_gets_the_backends_of_its_family() {
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        let mut s = svc(
            [198, 18, 16, 13],
            &[([198, 19, 1, 10], true), ([198, 19, 2, 10], true)],
        );
        s.cluster_ipv6 = Some(v6("fd00:198:16::d"));
        for (ip, ready) in [("fd00:198:19:2::a", true), ("fd00:198:19:1::a", false)] {
            s.backends.push(ServiceBackend {
                pod: "shop/p".into(),
                ip: IpAddr::V6(v6(ip)),
                ready,
            });
        }
        let (f, b) = desired(&[s]);
        assert_eq!(f.len(), 4, "two ports on each of two ClusterIPs");
        let http4 = key([198, 18, 16, 13], 80, 6);
        let http6 = ServiceKey {
            addr: v6("fd00:198:16::d").octets(),
            ..http4
        };
        assert_eq!(f[&http4].count, 2);
        assert_eq!(f[&http6].count, 1, "only the ready IPv6 backend");
        let slot = |k: ServiceKey, slot| b[&BackendKey { service: k, slot }];
        assert_eq!(slot(http6, 0).addr, v6("fd00:198:19:2::a").octets());
        assert_eq!(slot(http6, 0).port, 8080);
        for i in 0..2 {
            assert!(
                slot(http4, i).addr[..12] == IpKey::from_v4([0; 4]).addr[..12],
                "the IPv4 ClusterIP's backends are IPv4"
            );
        }
        assert_eq!(b.len(), 6);
    }
}
