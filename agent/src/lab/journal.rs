//! The lab journal: every resource a lab creates is appended here, synced to disk, *before* it is
//! created. `veil lab down` replays it in reverse, so a lab is removable even if `up` was killed
//! between any two steps. Removing something that never got created is a no-op.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// One thing a lab owns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Resource {
    /// A named network namespace (removing it removes every interface inside).
    Netns { name: String },
    /// A cgroup2 directory; its processes are killed with `cgroup.kill` before rmdir.
    Cgroup { path: PathBuf },
    /// A process started by the lab, told apart from pid reuse by its start time.
    Process {
        pid: u32,
        start_time: u64,
        what: String,
    },
    /// A directory tree removed recursively (bpffs pins, state).
    Dir { path: PathBuf },
    /// A single file (the userspace WireGuard UAPI socket).
    File { path: PathBuf },
}

/// Errors reading or writing the journal.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot write lab journal {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("lab journal {path} already exists")]
    AlreadyExists { path: PathBuf },
    #[error("cannot read lab journal {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub struct Journal {
    path: PathBuf,
    file: File,
}

impl Journal {
    /// Creates a new journal; an existing one is an error (`AlreadyExists`), never appended to.
    pub fn create_new(path: &Path) -> Result<Self, Error> {
        Self::open(path, OpenOptions::new().create_new(true).append(true))
    }

    /// Opens a lab's existing journal to append to it (the lab's kubelets record the pods they
    /// make). Each record is one `write` of one line to an O_APPEND file, so records from
    /// several processes never interleave.
    pub fn open_append(path: &Path) -> Result<Self, Error> {
        Self::open(path, OpenOptions::new().append(true))
    }

    fn open(path: &Path, opts: &OpenOptions) -> Result<Self, Error> {
        let file = opts.open(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => Error::AlreadyExists { path: path.into() },
            _ => Error::Write {
                path: path.into(),
                source,
            },
        })?;
        Ok(Self {
            path: path.into(),
            file,
        })
    }

    /// Appends a resource and syncs, so it is on disk before the caller creates it.
    pub fn record(&mut self, r: &Resource) -> Result<(), Error> {
        let mut line = serde_json::to_string(r).expect("resource serializes");
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.sync_data())
            .map_err(|source| Error::Write {
                path: self.path.clone(),
                source,
            })
    }

    /// Reads every resource in creation order. A torn last line (the writer was killed mid-write)
    /// is skipped: its resource was never created, because creation follows the sync.
    pub fn read(path: &Path) -> Result<Vec<Resource>, Error> {
        let f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(Error::Read {
                    path: path.into(),
                    source,
                })
            }
        };
        let mut out = Vec::new();
        for line in BufReader::new(f).lines() {
            let line = line.map_err(|source| Error::Read {
                path: path.into(),
                source,
            })?;
            if let Ok(r) = serde_json::from_str::<Resource>(&line) {
                out.push(r);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_torn_tail() {
        let dir = std::env::temp_dir().join(format!("veil-journal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("journal.jsonl");
        let _ = std::fs::remove_file(&path);
        let mut j = Journal::create_new(&path).unwrap();
        assert!(matches!(
            Journal::create_new(&path),
            Err(Error::AlreadyExists { .. })
        ));
        let a = Resource::Netns {
            name: "t-node-a".into(),
        };
        let b = Resource::Process {
            pid: 42,
            start_time: 7,
            what: "agent".into(),
        };
        j.record(&a).unwrap();
        j.record(&b).unwrap();
        drop(j);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"kind\":\"netns\",\"na").unwrap();
        assert_eq!(Journal::read(&path).unwrap(), vec![a, b]);
        assert!(Journal::read(&dir.join("missing")).unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
