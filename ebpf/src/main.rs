//! veil's eBPF programs. Fails closed: a packet the program cannot classify (truncated headers,
//! missing configuration, a full map) is dropped and counted, never passed on unexamined.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, PerCpuHashMap},
    programs::TcContext,
};
use veil_common::{
    maps::{
        DatapathConfig, IfStats, IpInfo, IpKey, NodeInfo, IF_STATS_MAX, IPCACHE_MAX, NODES_MAX,
    },
    reason,
};

#[map(name = "VEIL_CONFIG")]
static VEIL_CONFIG: Array<DatapathConfig> = Array::pinned(1, 0);
#[map(name = "VEIL_IF_STATS")]
static VEIL_IF_STATS: PerCpuHashMap<u32, IfStats> = PerCpuHashMap::pinned(IF_STATS_MAX, 0);
#[map(name = "VEIL_DROPS")]
static VEIL_DROPS: PerCpuArray<u64> = PerCpuArray::pinned(reason::MAX, 0);
#[map(name = "VEIL_IPCACHE")]
static VEIL_IPCACHE: LpmTrie<IpKey, IpInfo> = LpmTrie::pinned(IPCACHE_MAX, 0);
#[map(name = "VEIL_NODES")]
static VEIL_NODES: HashMap<u32, NodeInfo> = HashMap::pinned(NODES_MAX, 0);

/// Packets leaving a pod, on the host side of its veth.
#[classifier]
pub fn veil_from_pod(ctx: TcContext) -> i32 {
    match try_veil_from_pod(&ctx) {
        Ok(action) => action,
        Err(code) => drop_packet(&ctx, code),
    }
}

/// Decrypted packets arriving from peer nodes, on the tunnel device.
#[classifier]
pub fn veil_from_tunnel(ctx: TcContext) -> i32 {
    match try_veil_from_tunnel(&ctx) {
        Ok(action) => action,
        Err(code) => drop_packet(&ctx, code),
    }
}

fn try_veil_from_pod(ctx: &TcContext) -> Result<i32, u32> {
    count_interface(ctx);
    Ok(TC_ACT_OK)
}

fn try_veil_from_tunnel(ctx: &TcContext) -> Result<i32, u32> {
    count_interface(ctx);
    Ok(TC_ACT_OK)
}

#[inline(always)]
fn count_interface(ctx: &TcContext) {
    // SAFETY: reading ifindex from the context is always valid in a TC program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let len = ctx.len() as u64;
    match VEIL_IF_STATS.get_ptr_mut(&ifindex) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU while the program runs.
        Some(stats) => unsafe {
            (*stats).packets += 1;
            (*stats).bytes += len;
        },
        None => {
            let stats = IfStats {
                packets: 1,
                bytes: len,
                drops: 0,
            };
            // A full map only loses the per-interface count, never the packet's verdict.
            let _ = VEIL_IF_STATS.insert(&ifindex, &stats, 0);
        }
    }
}

#[inline(always)]
fn drop_packet(_ctx: &TcContext, code: u32) -> i32 {
    if let Some(counter) = VEIL_DROPS.get_ptr_mut(code) {
        // SAFETY: per-CPU slot.
        unsafe { *counter += 1 };
    }
    TC_ACT_SHOT
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
