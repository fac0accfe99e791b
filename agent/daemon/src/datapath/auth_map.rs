//! `VEIL_AUTH` in the map layer: the datapath's auth entries, written by the mesh alone.
//!
//! Taking the map out of the loaded object makes the mesh its only writer by construction; the
//! status code only counts entries through the pinned map.

use aya::maps::{HashMap, MapData};
use veil_common::maps::{self as names, AuthEntry, AuthKey};

use super::{Datapath, Error};

/// The auth map, owned.
pub struct AuthMap(HashMap<MapData, AuthKey, AuthEntry>);

impl AuthMap {
    /// Takes the map out of the datapath: from here on this value is its one writer.
    pub fn take(datapath: &mut Datapath) -> Result<Self, Error> {
        let map = datapath
            .ebpf_mut()
            .take_map(names::AUTH)
            .ok_or(Error::MissingMap(names::AUTH))?;
        HashMap::try_from(map)
            .map(Self)
            .map_err(|source| Error::Map {
                name: names::AUTH,
                source,
            })
    }

    /// The entries in the map now (an earlier run's, when the agent restarts).
    pub fn keys(&self) -> Vec<AuthKey> {
        self.0.keys().filter_map(Result::ok).collect()
    }

    /// Writes the pair's entry, valid until `expires_boot_ns` (CLOCK_BOOTTIME).
    pub fn write(&mut self, key: AuthKey, expires_boot_ns: u64) -> Result<(), Error> {
        self.0
            .insert(key, AuthEntry { expires_boot_ns }, 0)
            .map_err(|source| Error::Map {
                name: names::AUTH,
                source,
            })
    }

    /// Deletes the pair's entry; an absent one is no error.
    pub fn delete(&mut self, key: &AuthKey) {
        let _ = self.0.remove(key);
    }
}
