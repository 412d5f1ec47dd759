//! The host's interface addresses.

use std::net::IpAddr;

/// Every IPv4 and IPv6 address of the host's interfaces, sorted, without repeats (empty when
/// the kernel will not list them). Callers pick what they need: the node its local candidates,
/// the coordinator its certificate names.
pub fn interface_addrs() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return vec![];
    };
    let mut out: Vec<IpAddr> = addrs
        .filter_map(|a| {
            let a = a.address?;
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_loopback() {
        // Every Linux network namespace has lo; it is up in the initial one.
        let addrs = interface_addrs();
        assert!(
            addrs.iter().any(|a| a.is_loopback()) || addrs.is_empty(),
            "{addrs:?}"
        );
        assert!(addrs.windows(2).all(|w| w[0] < w[1]), "{addrs:?}");
    }
}
