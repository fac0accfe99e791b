//! `VEIL_EVENTS` in the map layer: the ring buffer of flow events, read by the agent alone.
//! A restarted agent reopens the pinned map and picks up where the kernel left off.

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use veil_common::maps::{self as names, FlowEvent};

use super::{Datapath, Error};

/// The flow-event ring buffer, owned, with its readiness registered in the runtime.
pub struct EventRing(AsyncFd<RingBuf<MapData>>);

impl EventRing {
    /// Takes the ring buffer out of the datapath (`None`: the object has none).
    pub fn take(datapath: &mut Datapath) -> Result<Option<Self>, Error> {
        let Some(map) = datapath.ebpf_mut().take_map(names::EVENTS) else {
            return Ok(None);
        };
        let ring = RingBuf::try_from(map).map_err(|source| Error::Map {
            name: names::EVENTS,
            source,
        })?;
        // SAFETY: the ring buffer owns its fd for as long as the AsyncFd holds it; nothing else
        // closes or reuses that descriptor.
        let fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| Error::Events(e.into_parts().1))?;
        Ok(Some(Self(fd)))
    }

    /// Waits for events and returns at most `max` of them (a flood cannot monopolize the
    /// reader: what is left is returned by the next call at once).
    pub async fn next_batch(&mut self, max: usize) -> std::io::Result<Vec<FlowEvent>> {
        let mut guard = self.0.readable_mut().await?;
        let rb = guard.get_inner_mut();
        let mut batch = Vec::new();
        while batch.len() < max {
            let Some(item) = rb.next() else { break };
            if item.len() >= std::mem::size_of::<FlowEvent>() {
                // SAFETY: the kernel wrote a FlowEvent (repr(C), any bit pattern valid) here.
                let ev: FlowEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                batch.push(ev);
            }
        }
        if batch.len() < max {
            guard.clear_ready();
        }
        Ok(batch)
    }
}
