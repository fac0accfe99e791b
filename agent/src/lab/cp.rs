//! The lab control plane as a writer: policies go into `cp/policies.json` (validated, compiled
//! once against every identity, written atomically with the next generation, under a lock so
//! two `veil policy` commands never interleave), then each node agent is asked how that
//! generation landed on it.

use std::{
    fs::File,
    path::Path,
    time::{Duration, Instant},
};

use super::{spec::LabSpec, Error, LabPaths, Result};
use crate::{
    api,
    cluster::files::FileSource,
    policy::{self, Applied, Policy},
};

fn cp_err(e: crate::cluster::Error) -> Error {
    Error::Prerequisite(crate::error_chain(&e))
}

fn policy_err(e: policy::Error) -> Error {
    Error::Spec(super::spec::Error::Invalid {
        path: "policy".into(),
        message: e.to_string(),
    })
}

/// Holds the control-plane write lock while alive.
struct CpLock(#[allow(dead_code)] nix::fcntl::Flock<File>);

fn lock(dir: &Path) -> Result<CpLock> {
    let path = dir.join("policies.lock");
    let f = File::create(&path).map_err(|source| Error::Write {
        path: path.clone(),
        source,
    })?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map(CpLock)
        .map_err(|(_, e)| Error::Write {
            path,
            source: e.into(),
        })
}

/// Applies policies (all or nothing). Returns the new generation and what happened to each.
pub fn apply(paths: &LabPaths, policies: Vec<Policy>) -> Result<(u64, Vec<(String, Applied)>)> {
    let dir = paths.control_plane();
    let _lock = lock(&dir)?;
    let (generation, mut set) = FileSource::read_policies(&dir).map_err(cp_err)?;
    let results = set.apply_all(policies).map_err(policy_err)?;
    // Compile once for every identity, so a set no node can install is refused here, before
    // anything is written (nodes compile again for their own endpoints).
    let state = FileSource::read(&dir).map_err(cp_err)?;
    let table = state.identity_table();
    let all: Vec<u32> = table.iter().map(|(id, _)| *id).collect();
    policy::compile(set.list(), &table, &all).map_err(policy_err)?;
    FileSource::write_policies(&dir, generation + 1, &set)?;
    Ok((
        generation + 1,
        results
            .into_iter()
            .map(|(n, a)| (n.to_string(), a))
            .collect(),
    ))
}

/// Deletes policies by `namespace/name`. Unknown names are an error and nothing changes.
pub fn delete(paths: &LabPaths, names: &[(String, String)]) -> Result<u64> {
    let dir = paths.control_plane();
    let _lock = lock(&dir)?;
    let (generation, mut set) = FileSource::read_policies(&dir).map_err(cp_err)?;
    for (ns, name) in names {
        set.delete(ns, name).map_err(policy_err)?;
    }
    FileSource::write_policies(&dir, generation + 1, &set)?;
    Ok(generation + 1)
}

/// The policies in force, with their generation.
pub fn list(paths: &LabPaths) -> Result<(u64, Vec<Policy>)> {
    let (generation, set) = FileSource::read_policies(&paths.control_plane()).map_err(cp_err)?;
    Ok((generation, set.list().to_vec()))
}

/// Waits until every node reports `generation` in force (or an error for it); returns the
/// per-node outcome.
pub fn wait_applied(
    spec: &LabSpec,
    paths: &LabPaths,
    generation: u64,
    timeout: Duration,
) -> Vec<(String, std::result::Result<api::PolicyStatus, String>)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let deadline = Instant::now() + timeout;
    spec.nodes
        .iter()
        .map(|n| {
            let sock = paths.admin_socket(&n.name);
            loop {
                let st = rt.block_on(crate::admin::get_json::<api::Status>(&sock, "/v1/status"));
                match st {
                    Ok(st) if st.policy.generation >= generation => {
                        break (n.name.clone(), Ok(st.policy))
                    }
                    Ok(st)
                        if st.policy.last_error.as_deref().is_some_and(|e| {
                            e.starts_with(&format!("generation {generation}:"))
                        }) =>
                    {
                        break (
                            n.name.clone(),
                            Err(st.policy.last_error.unwrap_or_default()),
                        )
                    }
                    Err(e) if Instant::now() > deadline => {
                        break (n.name.clone(), Err(e.to_string()))
                    }
                    Ok(st) if Instant::now() > deadline => {
                        // An install the agent keeps retrying says why it has not gone in.
                        let why = st
                            .policy
                            .last_error
                            .map(|e| format!(" (last error: {e})"))
                            .unwrap_or_default();
                        break (
                            n.name.clone(),
                            Err(format!(
                                "generation {generation} not in force after {timeout:?}{why}"
                            )),
                        );
                    }
                    _ => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        })
        .collect()
}
