//! Just enough IPv4/IPv6 header parsing for routing, the filter and publish admission.
//! Never allocates; returns None for anything malformed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// The facts about one IP packet that the engine decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketInfo {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number (after IPv6 extension headers we understand).
    pub proto: u8,
    /// TCP/UDP ports; 0 for other protocols or fragments without a transport header.
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP flags byte (0 for non-TCP).
    pub tcp_flags: u8,
    /// ICMP/ICMPv6 type (0 otherwise... but 0 is echo reply for v4: check proto too).
    pub icmp_type: u8,
    /// Whether this is part of a fragmented datagram, and which part.
    pub frag: Frag,
    /// Offset of the transport header in the packet (0 for later fragments).
    pub l4_off: u16,
    /// Length of the transport header (TCP with options, UDP 8, ICMP 8; 0 for other protocols
    /// and later fragments). A first fragment always holds all of it.
    pub l4_hdr: u16,
}

/// Fragmentation of a packet (IPv4 flags/offset, IPv6 fragment header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    /// A whole datagram (also an IPv6 "atomic fragment": offset 0, no more fragments).
    Whole,
    /// Offset 0, more fragments follow: carries the transport header.
    First { id: u32 },
    /// Offset > 0 (bytes): no transport header; belongs to the datagram `id`.
    Later { id: u32, offset: u16 },
}

/// Shortest transport header the filter needs whole: TCP's fixed header, UDP's header, an
/// ICMP header with the echo identifier (or the error's 4 unused bytes).
const TCP_MIN: usize = 20;
const UDP_LEN: usize = 8;
const ICMP_LEN: usize = 8;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

impl PacketInfo {
    /// True for a packet that opens a flow: TCP SYN without ACK, ICMP echo request. UDP is
    /// decided by the flow table.
    pub fn opens_tcp(&self) -> bool {
        self.proto == PROTO_TCP && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
    pub fn is_echo_request(&self) -> bool {
        (self.proto == PROTO_ICMP && self.icmp_type == 8)
            || (self.proto == PROTO_ICMPV6 && self.icmp_type == 128)
    }
    pub fn is_icmp(&self) -> bool {
        self.proto == PROTO_ICMP || self.proto == PROTO_ICMPV6
    }
    pub fn is_echo_reply(&self) -> bool {
        (self.proto == PROTO_ICMP && self.icmp_type == 0)
            || (self.proto == PROTO_ICMPV6 && self.icmp_type == 129)
    }
    /// Destination unreachable (and packet too big), time exceeded, parameter problem.
    pub fn is_icmp_error(&self) -> bool {
        (self.proto == PROTO_ICMP && matches!(self.icmp_type, 3 | 11 | 12))
            || (self.proto == PROTO_ICMPV6 && matches!(self.icmp_type, 1..=4))
    }
}

/// Destination address only (the routing fast path).
#[inline]
pub fn dst_addr(p: &[u8]) -> Option<IpAddr> {
    match p.first()? >> 4 {
        4 if p.len() >= 20 => Some(IpAddr::V4(Ipv4Addr::new(p[16], p[17], p[18], p[19]))),
        6 if p.len() >= 40 => {
            let b: [u8; 16] = p[24..40].try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// Parses an IP packet. None for anything malformed: a truncated IP header or extension header
/// chain, or a whole datagram or first fragment that does not hold its whole transport header
/// (a filter cannot decide on ports it does not see, RFC 1858 / RFC 7112).
pub fn parse(p: &[u8]) -> Option<PacketInfo> {
    let (src, dst, proto, frag, l4_off) = match p.first()? >> 4 {
        4 => {
            if p.len() < 20 {
                return None;
            }
            let ihl = ((p[0] & 0x0f) as usize) * 4;
            if ihl < 20 || p.len() < ihl {
                return None;
            }
            let flags_off = u16::from_be_bytes([p[6], p[7]]);
            let offset = (flags_off & 0x1fff) << 3;
            let more = flags_off & 0x2000 != 0;
            let id = u16::from_be_bytes([p[4], p[5]]) as u32;
            let frag = match (offset, more) {
                (0, false) => Frag::Whole,
                (0, true) => Frag::First { id },
                (offset, _) => Frag::Later { id, offset },
            };
            let src = IpAddr::V4(Ipv4Addr::new(p[12], p[13], p[14], p[15]));
            let dst = IpAddr::V4(Ipv4Addr::new(p[16], p[17], p[18], p[19]));
            (src, dst, p[9], frag, ihl)
        }
        6 => {
            if p.len() < 40 {
                return None;
            }
            let s: [u8; 16] = p[8..24].try_into().ok()?;
            let d: [u8; 16] = p[24..40].try_into().ok()?;
            let mut next = p[6];
            let mut off = 40;
            let mut frag = Frag::Whole;
            // Skip hop-by-hop, routing, destination options and the fragment header; a later
            // fragment ends the chain (what follows is payload).
            for _ in 0..6 {
                match next {
                    0 | 43 | 60 => {
                        if p.len() < off + 8 {
                            return None;
                        }
                        next = p[off];
                        off += (p[off + 1] as usize + 1) * 8;
                    }
                    44 => {
                        if p.len() < off + 8 {
                            return None;
                        }
                        let fo = u16::from_be_bytes([p[off + 2], p[off + 3]]);
                        let offset = fo & 0xfff8;
                        let more = fo & 1 != 0;
                        let id =
                            u32::from_be_bytes([p[off + 4], p[off + 5], p[off + 6], p[off + 7]]);
                        next = p[off];
                        off += 8;
                        frag = match (offset, more) {
                            (0, false) => Frag::Whole,
                            (0, true) => Frag::First { id },
                            (offset, _) => Frag::Later { id, offset },
                        };
                        if offset != 0 {
                            break;
                        }
                    }
                    _ => break,
                }
            }
            if off > p.len() {
                return None;
            }
            (
                IpAddr::V6(Ipv6Addr::from(s)),
                IpAddr::V6(Ipv6Addr::from(d)),
                next,
                frag,
                off,
            )
        }
        _ => return None,
    };
    let mut info = PacketInfo {
        src,
        dst,
        proto,
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
        icmp_type: 0,
        frag,
        l4_off: 0,
        l4_hdr: 0,
    };
    if matches!(frag, Frag::Later { .. }) {
        return Some(info);
    }
    let l4 = &p[l4_off..];
    info.l4_off = l4_off as u16;
    match proto {
        PROTO_TCP => {
            if l4.len() < TCP_MIN {
                return None;
            }
            let hdr = ((l4[12] >> 4) as usize) * 4;
            if hdr < TCP_MIN || l4.len() < hdr {
                return None;
            }
            info.src_port = u16::from_be_bytes([l4[0], l4[1]]);
            info.dst_port = u16::from_be_bytes([l4[2], l4[3]]);
            info.tcp_flags = l4[13];
            info.l4_hdr = hdr as u16;
        }
        PROTO_UDP => {
            if l4.len() < UDP_LEN {
                return None;
            }
            info.src_port = u16::from_be_bytes([l4[0], l4[1]]);
            info.dst_port = u16::from_be_bytes([l4[2], l4[3]]);
            info.l4_hdr = UDP_LEN as u16;
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            if l4.len() < ICMP_LEN {
                return None;
            }
            info.icmp_type = l4[0];
            info.l4_hdr = ICMP_LEN as u16;
        }
        _ => {}
    }
    Some(info)
}

/// The packet an ICMP error quotes: (source, destination, protocol, source port, destination
/// port). The quote holds the IP header and at least 8 bytes of the transport header (RFC 792,
/// RFC 4443); None when it does not, or when `p` is not an ICMP error.
pub fn quoted(p: &[u8], info: &PacketInfo) -> Option<(IpAddr, IpAddr, u8, u16, u16)> {
    if !info.is_icmp_error() || info.frag != Frag::Whole {
        return None;
    }
    let q = p.get(info.l4_off as usize + ICMP_LEN..)?;
    let (src, dst, mut proto, l4) = match (q.first()? >> 4, info.proto) {
        (4, PROTO_ICMP) => {
            let ihl = ((*q.first()? & 0x0f) as usize) * 4;
            if ihl < 20 || q.len() < ihl + 8 {
                return None;
            }
            let src = IpAddr::V4(Ipv4Addr::new(q[12], q[13], q[14], q[15]));
            let dst = IpAddr::V4(Ipv4Addr::new(q[16], q[17], q[18], q[19]));
            (src, dst, q[9], &q[ihl..])
        }
        (6, PROTO_ICMPV6) => {
            if q.len() < 48 {
                return None;
            }
            let s: [u8; 16] = q[8..24].try_into().ok()?;
            let d: [u8; 16] = q[24..40].try_into().ok()?;
            (
                IpAddr::V6(Ipv6Addr::from(s)),
                IpAddr::V6(Ipv6Addr::from(d)),
                q[6],
                &q[40..],
            )
        }
        _ => return None,
    };
    let (sp, dp) = match proto {
        PROTO_TCP | PROTO_UDP => (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        ),
        PROTO_ICMP | PROTO_ICMPV6 => (0, 0),
        // Extension headers in a quote: not a flow of ours the filter knows.
        _ => {
            proto = 0;
            (0, 0)
        }
    };
    Some((src, dst, proto, sp, dp))
}

#[cfg(test)]
pub mod build {
    //! Packet builders for tests.
    use super::*;

    pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
        let total = 20 + l4.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = proto;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        p[20..].copy_from_slice(l4);
        p
    }

    pub fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
        let mut l4 = vec![0u8; 20];
        l4[0..2].copy_from_slice(&sport.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
        l4[12] = 5 << 4;
        l4[13] = flags;
        ipv4(src, dst, PROTO_TCP, &l4)
    }

    pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut l4 = vec![0u8; 8 + payload.len()];
        l4[0..2].copy_from_slice(&sport.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
        l4[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        l4[8..].copy_from_slice(payload);
        ipv4(src, dst, PROTO_UDP, &l4)
    }

    pub fn echo(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        ipv4(src, dst, PROTO_ICMP, &[8, 0, 0, 0, 0, 1, 0, 1])
    }

    pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 40 + l4.len()];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
        p[6] = proto;
        p[7] = 64;
        p[8..24].copy_from_slice(&src.octets());
        p[24..40].copy_from_slice(&dst.octets());
        p[40..].copy_from_slice(l4);
        p
    }

    /// A TCP segment (20-byte header) with `payload`, IPv4 or IPv6 by the addresses.
    pub fn tcp_with(
        src: IpAddr,
        sport: u16,
        dst: IpAddr,
        dport: u16,
        flags: u8,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut l4 = vec![0u8; 20 + payload.len()];
        l4[0..2].copy_from_slice(&sport.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
        l4[12] = 5 << 4;
        l4[13] = flags;
        l4[20..].copy_from_slice(payload);
        ip(src, dst, PROTO_TCP, &l4)
    }

    /// A UDP datagram, IPv4 or IPv6 by the addresses.
    pub fn udp_with(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut l4 = vec![0u8; 8 + payload.len()];
        l4[0..2].copy_from_slice(&sport.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
        l4[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        l4[8..].copy_from_slice(payload);
        ip(src, dst, PROTO_UDP, &l4)
    }

    pub fn ip(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> Vec<u8> {
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => ipv4(s, d, proto, l4),
            (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(
                s,
                d,
                if proto == PROTO_ICMP {
                    PROTO_ICMPV6
                } else {
                    proto
                },
                l4,
            ),
            _ => panic!("mixed address families"),
        }
    }

    /// One fragment of the unfragmented packet `p` (no IPv6 extension headers): its payload
    /// bytes `start..end` (`start` a multiple of 8), "more fragments" set when `more`.
    pub fn fragment(p: &[u8], id: u32, start: usize, end: usize, more: bool) -> Vec<u8> {
        assert_eq!(start % 8, 0, "fragment offsets are multiples of 8");
        if p[0] >> 4 == 4 {
            let payload = &p[20..];
            let mut f = p[..20].to_vec();
            f.extend_from_slice(&payload[start..end]);
            let total = f.len() as u16;
            f[2..4].copy_from_slice(&total.to_be_bytes());
            f[4..6].copy_from_slice(&(id as u16).to_be_bytes());
            let fo = (start / 8) as u16 | if more { 0x2000 } else { 0 };
            f[6..8].copy_from_slice(&fo.to_be_bytes());
            f
        } else {
            let payload = &p[40..];
            let mut f = p[..40].to_vec();
            let next = p[6];
            f[6] = 44;
            let fo = start as u16 | more as u16;
            f.extend_from_slice(&[next, 0]);
            f.extend_from_slice(&fo.to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
            f.extend_from_slice(&payload[start..end]);
            let plen = (f.len() - 40) as u16;
            f[4..6].copy_from_slice(&plen.to_be_bytes());
            f
        }
    }

    /// `p` cut into fragments at the payload offsets `cuts`.
    pub fn fragments(p: &[u8], id: u32, cuts: &[usize]) -> Vec<Vec<u8>> {
        let hdr = if p[0] >> 4 == 4 { 20 } else { 40 };
        let len = p.len() - hdr;
        let mut bounds = vec![0];
        bounds.extend_from_slice(cuts);
        bounds.push(len);
        bounds
            .windows(2)
            .enumerate()
            .map(|(i, w)| fragment(p, id, w[0], w[1], i + 2 < bounds.len()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_syn() {
        let p = build::tcp([1, 2, 3, 4].into(), 5000, [5, 6, 7, 8].into(), 80, TCP_SYN);
        let i = parse(&p).unwrap();
        assert_eq!(i.src, IpAddr::from([1, 2, 3, 4]));
        assert_eq!((i.src_port, i.dst_port), (5000, 80));
        assert!(i.opens_tcp());
        assert_eq!(dst_addr(&p), Some(IpAddr::from([5, 6, 7, 8])));
    }

    #[test]
    fn fragments_are_told_apart_and_a_first_fragment_must_hold_the_transport_header() {
        for (src, dst) in [
            (IpAddr::from([1, 2, 3, 4]), IpAddr::from([5, 6, 7, 8])),
            (
                "2001:db8::1".parse().unwrap(),
                "2001:db8::2".parse().unwrap(),
            ),
        ] {
            let syn = build::tcp_with(src, 5000, dst, 80, TCP_SYN, &[7; 100]);
            let f = build::fragments(&syn, 77, &[24, 64]);
            let first = parse(&f[0]).unwrap();
            assert_eq!(first.frag, Frag::First { id: 77 });
            assert_eq!((first.dst_port, first.l4_hdr), (80, 20));
            assert!(first.opens_tcp());
            assert_eq!(
                parse(&f[1]).unwrap().frag,
                Frag::Later { id: 77, offset: 24 }
            );
            assert_eq!(
                parse(&f[2]).unwrap().frag,
                Frag::Later { id: 77, offset: 64 }
            );
            // A first fragment with only 8 bytes of TCP header is malformed.
            let tiny = build::fragments(&syn, 78, &[8]);
            assert_eq!(parse(&tiny[0]), None);
            // So is a whole packet truncated inside its TCP or UDP header.
            assert_eq!(parse(&syn[..syn.len() - 100 - 6]), None);
            let udp = build::udp_with(src, 1, dst, 2, b"");
            assert_eq!(parse(&udp[..udp.len() - 1]), None);
        }
    }

    #[test]
    fn an_icmp_error_yields_the_packet_it_quotes() {
        let a = Ipv4Addr::new(100, 96, 0, 1);
        let b = Ipv4Addr::new(100, 96, 0, 2);
        let sent = build::udp(a, 7000, b, 53, b"query");
        let mut l4 = vec![3, 3, 0, 0, 0, 0, 0, 0];
        l4.extend_from_slice(&sent[..28]);
        let err = build::ipv4(b, a, PROTO_ICMP, &l4);
        let i = parse(&err).unwrap();
        assert!(i.is_icmp_error());
        assert_eq!(
            quoted(&err, &i),
            Some((a.into(), b.into(), PROTO_UDP, 7000, 53))
        );
        // Truncated quote: not usable.
        let short = build::ipv4(b, a, PROTO_ICMP, &l4[..8 + 24]);
        assert_eq!(quoted(&short, &parse(&short).unwrap()), None);
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse(&[]).is_none());
        assert!(parse(&[0x45, 0, 0]).is_none());
        assert!(parse(&[0x41; 30]).is_none()); // ihl 4 < 5
        assert!(parse(&[0x70; 60]).is_none());
        assert!(dst_addr(&[0x60; 20]).is_none());
    }
}
