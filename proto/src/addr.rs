//! What kind of address an IP is, decided once for every crate.

use std::net::IpAddr;

/// A globally routable unicast address as homeport sees it: not private (RFC 1918, IPv6 ULA
/// fc00::/7), not carrier-grade NAT (100.64.0.0/10, which is also the default mesh range's
/// neighbourhood), not loopback, link-local or unspecified. The engine prefers such candidates,
/// the NAT-depth traceroute counts a router as outside our NATs by it, and netcheck trusts only
/// such an outside view of this node.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            !(a.is_private()
                || a.is_loopback()
                || a.is_link_local()
                || a.is_unspecified()
                || (o[0] == 100 && (o[1] & 0xc0) == 64))
        }
        IpAddr::V6(a) => {
            let s0 = a.segments()[0];
            !(a.is_loopback() || a.is_unspecified() || (s0 & 0xfe00) == 0xfc00 || is_link_local(ip))
        }
    }
}

/// A link-local address (169.254.0.0/16, fe80::/10): valid on one link only, never a name in a
/// certificate or a candidate for a peer.
pub fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => v.is_link_local(),
        IpAddr::V6(v) => (v.segments()[0] & 0xffc0) == 0xfe80,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn public(s: &str) -> bool {
        is_public(s.parse().unwrap())
    }

    #[test]
    fn public_means_globally_routable_unicast() {
        for p in [
            "198.51.100.10",
            "203.0.113.1",
            "8.8.8.8",
            "2001:db8::1",
            "100.128.0.1",
        ] {
            assert!(public(p), "{p}");
        }
        for n in [
            "10.10.1.2",
            "192.168.1.1",
            "172.16.0.1",
            "100.64.0.1",
            "100.127.255.254",
            "127.0.0.1",
            "169.254.1.1",
            "0.0.0.0",
            "fd00::1",
            "fe80::1",
            "::1",
            "::",
        ] {
            assert!(!public(n), "{n}");
        }
        assert!(is_link_local("fe80::1".parse().unwrap()));
        assert!(!is_link_local("fd00::1".parse().unwrap()));
    }
}
