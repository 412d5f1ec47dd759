//! homeport-exit: a mesh node plus the publisher (nftables rules for published ports, edge
//! protection, audit log).

pub mod audit;
#[cfg(test)]
mod lab;
pub mod nft;
