//! IP prefixes and the allowed-IPs table (cryptokey routing): longest-prefix match from an
//! address to the peer that owns it. Lookup walks only the prefix lengths in use (one hash probe
//! each), so its cost does not grow with the number of peers.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

/// Errors parsing a prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error("{0:?} is not an IP address or prefix")]
    Address(String),
    #[error("prefix length {len} is too long for {addr}")]
    Length { addr: String, len: u32 },
}

/// An IP prefix in canonical form (host bits cleared).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpPrefix {
    addr: IpAddr,
    len: u8,
}

impl IpPrefix {
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, PrefixError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if u32::from(len) > max {
            return Err(PrefixError::Length {
                addr: addr.to_string(),
                len: u32::from(len),
            });
        }
        Ok(Self {
            addr: mask(addr, len),
            len,
        })
    }

    /// The prefix holding `addr` alone: a /32 or a /128.
    pub fn host(addr: IpAddr) -> Self {
        let len = if addr.is_ipv4() { 32 } else { 128 };
        Self { addr, len }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn len(&self) -> u8 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.len) == self.addr
    }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

impl std::str::FromStr for IpPrefix {
    type Err = PrefixError;
    fn from_str(s: &str) -> Result<Self, PrefixError> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| PrefixError::Address(s.to_string()))?;
        let len = match l {
            Some(l) => l
                .parse::<u8>()
                .map_err(|_| PrefixError::Address(s.to_string()))?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        Self::new(addr, len)
    }
}

impl std::fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Longest-prefix-match table from prefixes to values (peers).
#[derive(Debug, Clone)]
pub struct AllowedIps<T> {
    /// (is_v4, len) → masked address → value. Iterated longest first.
    by_len: BTreeMap<(bool, u8), HashMap<IpAddr, T>>,
}

impl<T> Default for AllowedIps<T> {
    fn default() -> Self {
        Self {
            by_len: BTreeMap::new(),
        }
    }
}

impl<T: Clone> AllowedIps<T> {
    pub fn insert(&mut self, p: IpPrefix, v: T) -> Option<T> {
        self.by_len
            .entry((p.addr.is_ipv4(), p.len))
            .or_default()
            .insert(p.addr, v)
    }

    pub fn remove(&mut self, p: &IpPrefix) -> Option<T> {
        let key = (p.addr.is_ipv4(), p.len);
        let m = self.by_len.get_mut(&key)?;
        let v = m.remove(&p.addr);
        if m.is_empty() {
            self.by_len.remove(&key);
        }
        v
    }

    /// Removes every prefix whose value matches.
    pub fn retain(&mut self, mut keep: impl FnMut(&IpPrefix, &T) -> bool) {
        for ((_, len), m) in self.by_len.iter_mut() {
            m.retain(|a, v| {
                keep(
                    &IpPrefix {
                        addr: *a,
                        len: *len,
                    },
                    v,
                )
            });
        }
        self.by_len.retain(|_, m| !m.is_empty());
    }

    pub fn lookup(&self, ip: IpAddr) -> Option<&T> {
        let v4 = ip.is_ipv4();
        self.by_len
            .iter()
            .rev()
            .filter(|((is_v4, _), _)| *is_v4 == v4)
            .find_map(|((_, len), m)| m.get(&mask(ip, *len)))
    }

    pub fn iter(&self) -> impl Iterator<Item = (IpPrefix, &T)> {
        self.by_len.iter().flat_map(|((_, len), m)| {
            m.iter().map(move |(a, v)| {
                (
                    IpPrefix {
                        addr: *a,
                        len: *len,
                    },
                    v,
                )
            })
        })
    }

    pub fn len(&self) -> usize {
        self.by_len.values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_len.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> IpPrefix {
        s.parse().unwrap()
    }

    #[test]
    fn parse_and_canonicalize() {
        assert_eq!(p("198.19.2.77/24").to_string(), "198.19.2.0/24");
        assert_eq!(p("198.19.2.7").to_string(), "198.19.2.7/32");
        assert_eq!(p("fd00::1/64").to_string(), "fd00::/64");
        assert!("198.19.2.0/33".parse::<IpPrefix>().is_err());
        assert!("nonsense/8".parse::<IpPrefix>().is_err());
        assert!(p("198.19.2.0/24").contains("198.19.2.200".parse().unwrap()));
        assert!(!p("198.19.2.0/24").contains("198.19.3.1".parse().unwrap()));
        assert!(p("0.0.0.0/0").contains("1.2.3.4".parse().unwrap()));
    }

    #[test]
    fn longest_prefix_wins_and_families_stay_apart() {
        let mut t = AllowedIps::default();
        t.insert(p("198.19.0.0/16"), 1);
        t.insert(p("198.19.2.0/24"), 2);
        t.insert(p("198.19.2.10/32"), 3);
        t.insert(p("::/0"), 9);
        let at = |t: &AllowedIps<i32>, s: &str| t.lookup(s.parse().unwrap()).copied();
        assert_eq!(at(&t, "198.19.2.10"), Some(3));
        assert_eq!(at(&t, "198.19.2.11"), Some(2));
        assert_eq!(at(&t, "198.19.7.1"), Some(1));
        assert_eq!(at(&t, "10.0.0.1"), None);
        assert_eq!(at(&t, "fd00::1"), Some(9));
        t.retain(|_, v| *v != 2);
        assert_eq!(at(&t, "198.19.2.11"), Some(1));
        assert_eq!(t.len(), 3);
        assert_eq!(t.remove(&p("198.19.2.10/32")), Some(3));
    }

    /// Property: the table agrees with a linear scan for the longest containing prefix.
    #[test]
    fn agrees_with_linear_scan() {
        let mut seed: u64 = 0x1234_5678;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..50 {
            let mut t = AllowedIps::default();
            let mut model: Vec<(IpPrefix, u32)> = Vec::new();
            for v in 0..20 {
                let addr = std::net::Ipv4Addr::from(0xc613_0000 | (next() as u32 & 0xffff));
                let pre = IpPrefix::new(IpAddr::V4(addr), (next() % 33) as u8).unwrap();
                t.insert(pre, v);
                model.retain(|(q, _)| *q != pre);
                model.push((pre, v));
            }
            for _ in 0..200 {
                let ip = IpAddr::V4(std::net::Ipv4Addr::from(
                    0xc613_0000 | (next() as u32 & 0xffff),
                ));
                let want = model
                    .iter()
                    .filter(|(q, _)| q.contains(ip))
                    .max_by_key(|(q, _)| q.len())
                    .map(|(_, v)| *v);
                assert_eq!(t.lookup(ip).copied(), want, "{ip}");
            }
        }
    }
}
