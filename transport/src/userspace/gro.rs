//! Receive-side coalescing for the TUN device (sans-IO): decrypted TCP segments of one flow that
//! follow each other in sequence are merged into one virtio-net GSO super-packet, so the kernel
//! runs its TCP receive path once per ~64 KB instead of once per segment — what GRO does on a
//! NIC, and what wireguard-go does on its TUN.
//!
//! Packets are decrypted straight into the next free buffer ([`Coalescer::slot`]); a packet that
//! continues the open super-packet has its payload copied onto it and its buffer is reused, any
//! other packet stays where it was decrypted (no copy) and becomes the open one.
//!
//! Checksums are not verified: a packet here was authenticated by the WireGuard AEAD, so it is
//! handed over as `DATA_VALID` (single packets) or `NEEDS_CSUM` with a pseudo-header sum
//! (super-packets) — kernel WireGuard marks decrypted packets `CHECKSUM_UNNECESSARY` likewise.

/// Size of `struct virtio_net_hdr` in front of every TUN read and write.
pub const VNET_HDR_LEN: usize = 10;
/// Largest IP packet a super-packet may become (IPv4 total length / IPv6 payload length field).
const MAX_SUPER: usize = 65535;
/// Each buffer holds the header plus the largest super-packet.
pub const BUF_LEN: usize = VNET_HDR_LEN + MAX_SUPER;

const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;

/// The super-packet being built.
#[derive(Debug, Clone, Copy)]
struct Open {
    idx: usize,
    is_v6: bool,
    /// IP header length + TCP header length.
    hdrs: usize,
    iph_len: usize,
    gso_size: usize,
    next_seq: u32,
    segments: usize,
    /// No packet can follow (PSH seen, or a segment shorter than gso_size).
    closed: bool,
}

/// Buffers of decrypted packets waiting for one TUN write each.
pub struct Coalescer {
    bufs: Vec<Vec<u8>>,
    /// Length (header included) of each used buffer.
    lens: Vec<usize>,
    used: usize,
    open: Option<Open>,
}

/// What the TCP/IP headers of a candidate segment say.
#[derive(Debug, Clone, Copy)]
struct Tcp {
    is_v6: bool,
    iph_len: usize,
    tcph_len: usize,
    seq: u32,
    flags: u8,
    payload: usize,
}

fn parse_tcp(p: &[u8]) -> Option<Tcp> {
    let (is_v6, iph_len) = match p.first()? >> 4 {
        4 => {
            // No IP options, no fragments, TCP, length as the header says.
            if p.len() < 20 || p[0] & 0x0f != 5 || p[9] != 6 {
                return None;
            }
            if usize::from(u16::from_be_bytes([p[2], p[3]])) != p.len()
                || p[6] & 0x3f != 0
                || p[7] != 0
            {
                return None;
            }
            (false, 20)
        }
        6 => {
            if p.len() < 40
                || p[6] != 6
                || usize::from(u16::from_be_bytes([p[4], p[5]])) + 40 != p.len()
            {
                return None;
            }
            (true, 40)
        }
        _ => return None,
    };
    let t = p.get(iph_len..iph_len + 20)?;
    let tcph_len = usize::from(t[12] >> 4) * 4;
    if !(20..=60).contains(&tcph_len) || p.len() < iph_len + tcph_len {
        return None;
    }
    Some(Tcp {
        is_v6,
        iph_len,
        tcph_len,
        seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
        flags: t[13],
        payload: p.len() - iph_len - tcph_len,
    })
}

/// Whether everything but the lengths, IPv4 id/checksum and the TCP seq/checksum matches.
fn same_flow(a: &[u8], b: &[u8], t: &Tcp) -> bool {
    let i = t.iph_len;
    let ip_same = if t.is_v6 {
        // Version, traffic class, flow label; next header, hop limit, addresses.
        a[0..4] == b[0..4] && a[6..40] == b[6..40]
    } else {
        // TOS; flags/fragment; TTL, protocol; addresses.
        a[1] == b[1] && a[6..10] == b[6..10] && a[12..20] == b[12..20]
    };
    // Ports; ack number, data offset; window; urgent pointer and options. Flags may differ only
    // in PSH (checked by the caller).
    ip_same
        && a[i..i + 4] == b[i..i + 4]
        && a[i + 8..i + 13] == b[i + 8..i + 13]
        && a[i + 14..i + 16] == b[i + 14..i + 16]
        && a[i + 18..i + t.tcph_len] == b[i + 18..i + t.tcph_len]
}

/// Ones'-complement sum of 16-bit big-endian words, not folded.
fn sum16(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

impl Default for Coalescer {
    fn default() -> Self {
        Self::new()
    }
}

impl Coalescer {
    pub fn new() -> Self {
        Self {
            bufs: Vec::new(),
            lens: Vec::new(),
            used: 0,
            open: None,
        }
    }

    /// Buffers in use; flush before it grows past what a batch should hold.
    pub fn len(&self) -> usize {
        self.used
    }

    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// The next free buffer past the virtio header, to decrypt into. Buffers are allocated on
    /// first use and kept; memory is only touched as far as packets fill it.
    pub fn slot(&mut self) -> &mut [u8] {
        if self.used == self.bufs.len() {
            self.bufs.push(vec![0u8; BUF_LEN]);
            self.lens.push(0);
        }
        &mut self.bufs[self.used][VNET_HDR_LEN..]
    }

    /// Takes the `len` bytes just decrypted into [`Coalescer::slot`] as the next packet.
    pub fn commit(&mut self, len: usize) {
        let idx = self.used;
        let pkt_end = VNET_HDR_LEN + len;
        let tcp = parse_tcp(&self.bufs[idx][VNET_HDR_LEN..pkt_end]);
        let candidate =
            tcp.filter(|t| t.payload > 0 && (t.flags == TCP_ACK || t.flags == TCP_ACK | TCP_PSH));
        if let (Some(t), Some(open)) = (candidate, self.open.as_mut()) {
            let head_len = self.lens[open.idx];
            let fits = head_len + t.payload <= VNET_HDR_LEN + MAX_SUPER;
            if !open.closed
                && fits
                && open.is_v6 == t.is_v6
                && open.hdrs == t.iph_len + t.tcph_len
                && t.seq == open.next_seq
                && t.payload <= open.gso_size
            {
                let (head, rest) = self.bufs.split_at_mut(idx);
                let head = &mut head[open.idx];
                let pkt = &rest[0][VNET_HDR_LEN..pkt_end];
                if same_flow(&head[VNET_HDR_LEN..], pkt, &t) {
                    head[head_len..head_len + t.payload].copy_from_slice(&pkt[open.hdrs..]);
                    self.lens[open.idx] = head_len + t.payload;
                    open.next_seq = open.next_seq.wrapping_add(t.payload as u32);
                    open.segments += 1;
                    if t.flags & TCP_PSH != 0 {
                        // PSH ends a coalesced run; carry it on the super-packet.
                        head[VNET_HDR_LEN + open.iph_len + 13] |= TCP_PSH;
                        open.closed = true;
                    }
                    if t.payload < open.gso_size {
                        open.closed = true;
                    }
                    // The packet's own buffer stays free for the next one.
                    return;
                }
            }
        }
        self.close_open();
        self.lens[idx] = pkt_end;
        self.used += 1;
        self.open = candidate.map(|t| Open {
            idx,
            is_v6: t.is_v6,
            hdrs: t.iph_len + t.tcph_len,
            iph_len: t.iph_len,
            gso_size: t.payload,
            next_seq: t.seq.wrapping_add(t.payload as u32),
            segments: 1,
            closed: t.flags & TCP_PSH != 0,
        });
    }

    /// Writes the virtio header (and fixes lengths and checksums) of the open super-packet.
    fn close_open(&mut self) {
        let Some(open) = self.open.take() else {
            return;
        };
        let len = self.lens[open.idx];
        let buf = &mut self.bufs[open.idx][..len];
        if open.segments == 1 {
            // Left as decrypted: single packets are written with DATA_VALID in `finish`.
            return;
        }
        let (hdr, pkt) = buf.split_at_mut(VNET_HDR_LEN);
        let ip_len = pkt.len();
        let tcp_len = ip_len - open.iph_len;
        let (gso_type, pseudo) = if open.is_v6 {
            pkt[4..6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
            let acc = sum16(&pkt[8..40], 6 + tcp_len as u64);
            (VIRTIO_NET_HDR_GSO_TCPV6, acc)
        } else {
            pkt[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
            pkt[10..12].copy_from_slice(&[0, 0]);
            let c = !fold(sum16(&pkt[..20], 0));
            pkt[10..12].copy_from_slice(&c.to_be_bytes());
            let acc = sum16(&pkt[12..20], 6 + tcp_len as u64);
            (VIRTIO_NET_HDR_GSO_TCPV4, acc)
        };
        // CHECKSUM_PARTIAL: the TCP checksum field holds the pseudo-header sum.
        let c = open.iph_len + 16;
        pkt[c..c + 2].copy_from_slice(&fold(pseudo).to_be_bytes());
        hdr[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        hdr[1] = gso_type;
        hdr[2..4].copy_from_slice(&(open.hdrs as u16).to_le_bytes());
        hdr[4..6].copy_from_slice(&(open.gso_size as u16).to_le_bytes());
        hdr[6..8].copy_from_slice(&(open.iph_len as u16).to_le_bytes());
        hdr[8..10].copy_from_slice(&16u16.to_le_bytes());
        // Mark as finished so `finish` leaves this header alone.
        self.lens[open.idx] = len | FINISHED;
    }

    /// Finalizes every buffer and hands each (virtio header + packet) to `write`, then resets.
    pub fn finish(&mut self, mut write: impl FnMut(&[u8])) {
        self.close_open();
        for i in 0..self.used {
            let len = self.lens[i];
            let buf = &mut self.bufs[i];
            if len & FINISHED == 0 {
                buf[..VNET_HDR_LEN].copy_from_slice(&[0; VNET_HDR_LEN]);
                buf[0] = VIRTIO_NET_HDR_F_DATA_VALID;
            }
            write(&buf[..len & !FINISHED]);
        }
        self.used = 0;
    }
}

/// Flag bit in `lens`: the virtio header is already written (a GSO super-packet).
const FINISHED: usize = 1 << 40;

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp4(seq: u32, payload: usize, flags: u8, ack: u32) -> Vec<u8> {
        let total = 20 + 32 + payload;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&seq.to_be_bytes()[2..]); // id varies
        p[6] = 0x40; // DF
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[198, 19, 1, 10]);
        p[16..20].copy_from_slice(&[198, 19, 2, 10]);
        let t = &mut p[20..];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&5201u16.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&ack.to_be_bytes());
        t[12] = 8 << 4; // 32-byte header (timestamps)
        t[13] = flags;
        t[14..16].copy_from_slice(&500u16.to_be_bytes());
        t[20..32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 7, 0, 0, 0, 9]);
        for (i, b) in t[32..].iter_mut().enumerate() {
            *b = (seq as usize + i) as u8;
        }
        p
    }

    /// What a fresh coalescer hands on for `pkts`, read in one batch.
    fn coalesce(pkts: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut c = Coalescer::new();
        for p in pkts {
            c.slot()[..p.len()].copy_from_slice(p);
            c.commit(p.len());
        }
        let mut out = vec![];
        c.finish(|b| out.push(b.to_vec()));
        out
    }

    #[test]
    fn in_order_segments_become_one_gso_packet() {
        let mss = 1388;
        let mut pkts: Vec<Vec<u8>> = (0..10)
            .map(|i| tcp4(1000 + i * mss as u32, mss, TCP_ACK, 77))
            .collect();
        pkts.push(tcp4(1000 + 10 * mss as u32, 100, TCP_ACK | TCP_PSH, 77));
        let out = coalesce(&pkts);
        assert_eq!(out.len(), 1);
        let b = &out[0];
        assert_eq!(b[0], VIRTIO_NET_HDR_F_NEEDS_CSUM);
        assert_eq!(b[1], VIRTIO_NET_HDR_GSO_TCPV4);
        assert_eq!(u16::from_le_bytes([b[2], b[3]]), 52);
        assert_eq!(u16::from_le_bytes([b[4], b[5]]) as usize, mss);
        let p = &b[VNET_HDR_LEN..];
        assert_eq!(p.len(), 52 + 10 * mss + 100);
        assert_eq!(u16::from_be_bytes([p[2], p[3]]) as usize, p.len());
        assert_eq!(
            fold(sum16(&p[..20], 0)),
            0xffff,
            "valid IPv4 header checksum"
        );
        assert_eq!(
            p[20 + 13],
            TCP_ACK | TCP_PSH,
            "PSH carried to the super-packet"
        );
        // Payload bytes are the concatenation, in order.
        let mut want = vec![];
        for q in &pkts {
            want.extend_from_slice(&q[52..]);
        }
        assert_eq!(&p[52..], &want[..]);
    }

    #[test]
    fn gaps_other_flows_and_pure_acks_are_not_merged() {
        let out = coalesce(&[
            tcp4(1000, 1000, TCP_ACK, 1),
            tcp4(3000, 1000, TCP_ACK, 1),     // gap
            tcp4(4000, 1000, TCP_ACK, 2),     // other ack number
            tcp4(5000, 0, TCP_ACK, 2),        // pure ACK
            tcp4(5000, 1000, 0x18 | 0x01, 2), // FIN
        ]);
        assert_eq!(out.len(), 5);
        for b in &out {
            assert_eq!(b[0], VIRTIO_NET_HDR_F_DATA_VALID);
            assert_eq!(b[1], 0);
        }
    }

    #[test]
    fn short_segment_and_psh_close_the_run() {
        let out = coalesce(&[
            tcp4(0, 1000, TCP_ACK, 1),
            tcp4(1000, 500, TCP_ACK, 1),
            tcp4(1500, 500, TCP_ACK, 1), // after a short one: new run
            tcp4(2000, 500, TCP_ACK | TCP_PSH, 1),
            tcp4(2500, 500, TCP_ACK, 1), // after PSH: new run
        ]);
        let sizes: Vec<usize> = out.iter().map(|b| b.len() - VNET_HDR_LEN - 52).collect();
        assert_eq!(sizes, vec![1500, 1000, 500]);
    }

    #[test]
    fn super_packets_stop_at_64k() {
        let pkts: Vec<Vec<u8>> = (0..60).map(|i| tcp4(i * 1388, 1388, TCP_ACK, 1)).collect();
        let out = coalesce(&pkts);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|b| b.len() - VNET_HDR_LEN <= 65535));
        let total: usize = out.iter().map(|b| b.len() - VNET_HDR_LEN - 52).sum();
        assert_eq!(total, 60 * 1388);
    }

    #[test]
    fn non_tcp_is_passed_through() {
        let mut udp = tcp4(0, 100, TCP_ACK, 1);
        udp[9] = 17;
        let out = coalesce(&[udp.clone(), udp.clone()]);
        assert_eq!(out.len(), 2);
        assert_eq!(&out[0][VNET_HDR_LEN..], &udp[..]);
    }
}
