//! How many NAT layers sit in front of this node: a traceroute towards a STUN server, every TTL
//! at once. Hole-punching openers are sent with just enough TTL to leave the outermost NAT (and
//! open its mapping) without reaching the peer's NAT (which would mark the flow as refused).

use homeport_proto::addr::is_public;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Hops probed when measuring the NAT depth (home router + carrier NAT + a few ISP routers).
const NAT_DEPTH_MAX_TTL: u8 = 8;
/// How long the NAT depth measurement waits for hops that do not answer (silent routers).
const NAT_DEPTH_WAIT: Duration = Duration::from_millis(400);

/// What one TTL-limited probe towards the STUN server met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hop {
    /// Nothing yet (or a router that sends no ICMP).
    Silent,
    /// An ICMP time-exceeded from this router.
    Router(IpAddr),
    /// The STUN server itself answered.
    Target,
}

/// The opener TTL from a traceroute's hops (index 0 = TTL 1): the hop number of the first
/// public router or of the target when private/CGNAT routers come before it; Some(0) when none
/// do (no NAT in front of us). None while undecided: a lower hop is still `Silent` and `done`
/// is false, or nothing public was reached.
fn nat_depth_from_hops(hops: &[Hop], done: bool) -> Option<u8> {
    let mut last_private = 0u8;
    for (i, hop) in hops.iter().enumerate() {
        let ttl = i as u8 + 1;
        match hop {
            Hop::Target => return Some(if last_private == 0 { 0 } else { ttl }),
            Hop::Router(ip) if is_public(*ip) => {
                return Some(if last_private == 0 { 0 } else { ttl });
            }
            Hop::Router(_) => last_private = ttl,
            Hop::Silent if !done => return None,
            Hop::Silent => {}
        }
    }
    None
}

/// Traceroute towards `target` (a STUN server), every TTL at once from its own socket, so it
/// takes one round trip rather than one per hop: the TTL that just leaves our outermost NAT
/// (see [`nat_depth_from_hops`]); None when nothing answered.
pub fn nat_depth(target: SocketAddr) -> Option<u8> {
    use quinn_udp::{UdpSockRef, UdpSocketState};
    let mut probes = vec![];
    for ttl in 1..=NAT_DEPTH_MAX_TTL {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
        let state = UdpSocketState::new(UdpSockRef::from(&sock)).ok()?;
        state
            .enable_transport_errors(UdpSockRef::from(&sock))
            .ok()?;
        sock.set_nonblocking(true).ok()?;
        sock.set_ttl(ttl as u32).ok()?;
        let txid: [u8; 12] = rand::random();
        let _ = sock.send_to(&crate::stun::binding_request(txid), target);
        probes.push((sock, state, txid));
    }
    let mut hops = vec![Hop::Silent; probes.len()];
    let deadline = std::time::Instant::now() + NAT_DEPTH_WAIT;
    let mut buf = [0u8; 1500];
    loop {
        for (i, (sock, state, txid)) in probes.iter().enumerate() {
            if hops[i] != Hop::Silent {
                continue;
            }
            while let Ok(Some(e)) = state.recv_transport_error(UdpSockRef::from(sock)) {
                if let Some(a) = e.addr
                    && a.ip() != target.ip()
                {
                    hops[i] = Hop::Router(a.ip());
                }
            }
            if let Ok((n, from)) = sock.recv_from(&mut buf)
                && from == target
                && crate::stun::parse_binding_response(&buf[..n]).is_ok_and(|(id, _)| id == *txid)
            {
                hops[i] = Hop::Target;
            }
        }
        let done = std::time::Instant::now() >= deadline;
        if let Some(d) = nat_depth_from_hops(&hops, done) {
            return Some(d);
        }
        if done {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::{Hop, nat_depth_from_hops};

    fn r(ip: &str) -> Hop {
        Hop::Router(ip.parse().unwrap())
    }

    #[test]
    fn nat_depth_is_the_first_public_hop_after_private_ones() {
        // Home router, carrier NAT, then the ISP's public router: openers need TTL 3.
        let hops = [
            r("10.10.1.1"),
            r("100.64.0.1"),
            r("203.0.113.1"),
            Hop::Target,
        ];
        assert_eq!(nat_depth_from_hops(&hops, false), Some(3));
        // No private router before the public internet: no NAT to open.
        let hops = [r("198.51.100.1"), Hop::Target];
        assert_eq!(nat_depth_from_hops(&hops, false), Some(0));
        // The STUN server right behind one NAT whose routers stay silent.
        let hops = [r("192.168.1.1"), Hop::Target];
        assert_eq!(nat_depth_from_hops(&hops, false), Some(2));
    }

    #[test]
    fn nat_depth_waits_for_lower_hops_then_skips_silent_ones() {
        // TTL 2 has not answered yet: a private router there would change the answer.
        let hops = [r("10.0.0.1"), Hop::Silent, r("203.0.113.1")];
        assert_eq!(nat_depth_from_hops(&hops, false), None);
        // Out of time: a silent router counts as neither.
        assert_eq!(nat_depth_from_hops(&hops, true), Some(3));
        // Nothing answered at all.
        assert_eq!(nat_depth_from_hops(&[Hop::Silent; 8], true), None);
    }
}
