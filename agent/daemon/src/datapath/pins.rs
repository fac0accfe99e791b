//! Pinned maps an earlier agent left that this build's programs declare differently: an upgrade
//! or downgrade that changed a map (a drop-reason array grown from 16 to 32 entries, a value
//! struct with a new field), or a changed `map_max_entries`.
//!
//! aya reuses a pinned map as it finds it. A map of another size then silently loses what does
//! not fit (a drop counted at reason 20 in an array of 16 is never counted), and one whose value
//! size changed makes the verifier refuse the programs, so the upgraded agent never starts. So,
//! before loading, each pin is compared with the object's definition: type, key size, value
//! size, entries (after `map_max_entries`) and flags. A pin that differs is set aside (its pin
//! removed, the map kept open here) and the loader makes the map anew. The programs attached
//! by the earlier agent keep using the old map until this agent swaps its programs in.
//!
//! What the old map held is carried into the new one when its layout is the same (type, key
//! and value size; only entries or flags differ): once right after loading, and again for keys
//! still missing once this agent's programs are attached everywhere (what the old programs
//! added in between: a connection opened during the restart keeps its conntrack entry). Keys
//! the new map cannot take (fewer entries) are counted and said at WARN. A map whose layout
//! changed starts empty, said at WARN: the agent writes its own state again at its first
//! reconcile; conntrack, auth and counters begin afresh.

use std::{
    collections::BTreeMap,
    io,
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

use aya::maps::MapData;

/// The definition a map has in the object or in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl Shape {
    /// Same type, key and value: the entries mean the same in both.
    fn same_layout(&self, other: &Shape) -> bool {
        (self.map_type, self.key_size, self.value_size)
            == (other.map_type, other.key_size, other.value_size)
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {}, key {} B, value {} B, {} entries, flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// A pinned map set aside for a new one of its name.
pub struct SetAside {
    pub name: String,
    pub old: Shape,
    pub new: Shape,
    map: MapData,
}

/// What carrying a set-aside map over did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Carried {
    pub copied: u64,
    /// Keys the new map refused (it has fewer entries).
    pub refused: u64,
}

/// Each map `object` declares (its entries overridden by `sizes`) by name.
pub fn declared(
    object: &[u8],
    sizes: &BTreeMap<String, u32>,
) -> Result<BTreeMap<String, Shape>, aya_obj::ParseError> {
    let obj = aya_obj::Object::parse(object)?;
    Ok(obj
        .maps
        .iter()
        .filter(|(name, _)| !name.starts_with('.'))
        .map(|(name, m)| {
            let shape = Shape {
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries: sizes.get(name).copied().unwrap_or(m.max_entries()),
                flags: m.map_flags(),
            };
            (name.clone(), shape)
        })
        .collect())
}

/// The shape of a map in the kernel.
pub fn shape_of(map: &MapData) -> Result<Shape, aya::maps::MapError> {
    let info = map.info()?;
    Ok(Shape {
        map_type: info.map_type()? as u32,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    })
}

/// Sets aside every map pinned in `pin_dir` whose shape differs from its declaration in
/// `declared`, removing its pin so the loader makes it anew. A pin that cannot be opened or
/// read is left for the loader (which reports what is wrong with it).
pub fn set_aside_mismatched(
    pin_dir: &Path,
    declared: &BTreeMap<String, Shape>,
) -> io::Result<Vec<SetAside>> {
    let mut out = Vec::new();
    for (name, new) in declared {
        let pin = pin_dir.join(name);
        if !pin.exists() {
            continue;
        }
        let Ok(map) = MapData::from_pin(&pin) else {
            continue;
        };
        let Ok(old) = shape_of(&map) else {
            continue;
        };
        if old == *new {
            continue;
        }
        std::fs::remove_file(&pin)?;
        tracing::warn!(
            map = %name, pinned = %old, declared = %new,
            carried = old.same_layout(new),
            "pinned map differs from this build's: made anew{}",
            if old.same_layout(new) {
                ", its entries carried over"
            } else {
                " and empty (its layout changed)"
            }
        );
        out.push(SetAside {
            name: name.clone(),
            old,
            new: *new,
            map,
        });
    }
    Ok(out)
}

/// Copies what `from` holds into the map pinned as `to_pin` when their layouts are the same;
/// with `only_missing`, only keys `to_pin` does not hold yet.
pub fn carry(set_aside: &SetAside, to_pin: &Path, only_missing: bool) -> io::Result<Carried> {
    if !set_aside.old.same_layout(&set_aside.new) {
        return Ok(Carried::default());
    }
    let to = MapData::from_pin(to_pin).map_err(io::Error::other)?;
    copy_entries(
        &set_aside.map,
        &to,
        set_aside.old,
        if only_missing { BPF_NOEXIST } else { BPF_ANY },
    )
}

/// [`carry`] for every map set aside into its new pin under `pin_dir`, logging what did not fit;
/// the total carried.
pub fn carry_all(set_aside: &[SetAside], pin_dir: &Path, only_missing: bool) -> Carried {
    let mut total = Carried::default();
    for s in set_aside {
        match carry(s, &pin_dir.join(&s.name), only_missing) {
            Ok(c) => {
                if c.refused > 0 {
                    tracing::warn!(
                        map = %s.name, copied = c.copied, refused = c.refused,
                        "the new map cannot hold every entry of the one it replaces"
                    );
                }
                total.copied += c.copied;
                total.refused += c.refused;
            }
            Err(e) => tracing::warn!(map = %s.name, error = %e, "entries not carried over"),
        }
    }
    total
}

const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
// Map types whose values are one slot per possible CPU (uapi/linux/bpf.h).
const PERCPU_TYPES: [u32; 3] = [5, 6, 10];
// A ring buffer has no keys (BPF_MAP_TYPE_RINGBUF).
const RINGBUF: u32 = 27;

/// `union bpf_attr` as the map element commands read it.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn map_elem(
    cmd: libc::c_long,
    fd: i32,
    key: *const u8,
    value: *const u8,
    flags: u64,
) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd as u32,
        _pad: 0,
        key: key as u64,
        value: value as u64,
        flags,
    };
    // SAFETY: `attr` is the element commands' bpf_attr layout and outlives the call; `key` and
    // `value` point at buffers of the map's key size and (per-CPU) value size, or are null
    // where the command allows it (the first GET_NEXT_KEY).
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &mut attr as *mut ElemAttr,
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Copies every key of `from` (of shape `shape`) into `to` with `flags`.
fn copy_entries(from: &MapData, to: &MapData, shape: Shape, flags: u64) -> io::Result<Carried> {
    let mut c = Carried::default();
    if shape.map_type == RINGBUF {
        return Ok(c);
    }
    let (from, to) = (from.fd().as_fd().as_raw_fd(), to.fd().as_fd().as_raw_fd());
    let cpus = if PERCPU_TYPES.contains(&shape.map_type) {
        aya::util::nr_cpus().map_err(|(_, e)| e)?
    } else {
        1
    };
    let value_len = if cpus > 1 {
        (shape.value_size as usize).div_ceil(8) * 8 * cpus
    } else {
        shape.value_size as usize
    };
    let mut key = vec![0u8; shape.key_size as usize];
    let mut next = vec![0u8; shape.key_size as usize];
    let mut value = vec![0u8; value_len];
    let mut first = true;
    loop {
        let prev = if first {
            std::ptr::null()
        } else {
            key.as_ptr()
        };
        match map_elem(BPF_MAP_GET_NEXT_KEY, from, prev, next.as_mut_ptr(), 0) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(c),
            Err(e) => return Err(e),
        }
        first = false;
        std::mem::swap(&mut key, &mut next);
        // A key removed between the walk and the lookup is simply not carried.
        if map_elem(
            BPF_MAP_LOOKUP_ELEM,
            from,
            key.as_ptr(),
            value.as_mut_ptr(),
            0,
        )
        .is_err()
        {
            continue;
        }
        match map_elem(BPF_MAP_UPDATE_ELEM, to, key.as_ptr(), value.as_ptr(), flags) {
            Ok(()) => c.copied += 1,
            Err(e) if flags == BPF_NOEXIST && e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(_) => c.refused += 1,
        }
    }
}
