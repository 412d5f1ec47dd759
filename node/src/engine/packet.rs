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
}

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

pub fn parse(p: &[u8]) -> Option<PacketInfo> {
    let (src, dst, proto, l4) = match p.first()? >> 4 {
        4 => {
            if p.len() < 20 {
                return None;
            }
            let ihl = ((p[0] & 0x0f) as usize) * 4;
            if ihl < 20 || p.len() < ihl {
                return None;
            }
            let frag_off = u16::from_be_bytes([p[6], p[7]]) & 0x1fff;
            let src = IpAddr::V4(Ipv4Addr::new(p[12], p[13], p[14], p[15]));
            let dst = IpAddr::V4(Ipv4Addr::new(p[16], p[17], p[18], p[19]));
            // Non-first fragments carry no transport header.
            let l4 = if frag_off == 0 { &p[ihl..] } else { &[][..] };
            (src, dst, p[9], l4)
        }
        6 => {
            if p.len() < 40 {
                return None;
            }
            let s: [u8; 16] = p[8..24].try_into().ok()?;
            let d: [u8; 16] = p[24..40].try_into().ok()?;
            let mut next = p[6];
            let mut off = 40;
            // Skip hop-by-hop, routing, destination options; stop at a fragment header.
            for _ in 0..4 {
                match next {
                    0 | 43 | 60 if p.len() >= off + 8 => {
                        next = p[off];
                        off += (p[off + 1] as usize + 1) * 8;
                    }
                    _ => break,
                }
            }
            let l4 = if off <= p.len() { &p[off..] } else { &[][..] };
            (
                IpAddr::V6(Ipv6Addr::from(s)),
                IpAddr::V6(Ipv6Addr::from(d)),
                next,
                l4,
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
    };
    match proto {
        PROTO_TCP if l4.len() >= 14 => {
            info.src_port = u16::from_be_bytes([l4[0], l4[1]]);
            info.dst_port = u16::from_be_bytes([l4[2], l4[3]]);
            info.tcp_flags = l4[13];
        }
        PROTO_UDP if l4.len() >= 8 => {
            info.src_port = u16::from_be_bytes([l4[0], l4[1]]);
            info.dst_port = u16::from_be_bytes([l4[2], l4[3]]);
        }
        PROTO_ICMP | PROTO_ICMPV6 if !l4.is_empty() => info.icmp_type = l4[0],
        _ => {}
    }
    Some(info)
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
    fn rejects_garbage() {
        assert!(parse(&[]).is_none());
        assert!(parse(&[0x45, 0, 0]).is_none());
        assert!(parse(&[0x41; 30]).is_none()); // ihl 4 < 5
        assert!(parse(&[0x70; 60]).is_none());
        assert!(dst_addr(&[0x60; 20]).is_none());
    }
}
