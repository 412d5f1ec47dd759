//! Country data for country rules: an mmdb file the user provides (MaxMind GeoLite2-Country or
//! DB-IP's "IP to Country Lite", the same format), read with the `maxminddb` crate.
//!
//! The ruleset never asks this module per packet: [`CountryDb::nets`] gives every network of a
//! country once, aggregated, and the ruleset puts them in nftables interval sets, so the kernel
//! decides at the speed of a set lookup. The reader is kept for the audit log and the report
//! (the country of one source).

use anyhow::{Context, Result};
use ipnet::{Ipv4Net, Ipv6Net};
use maxminddb::{Reader, WithinOptions};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

pub use homeport_proto::exit::COUNTRY_DB_HINT;

#[derive(Deserialize)]
struct Country {
    iso_code: Option<String>,
}

/// The part of a GeoLite2-Country / DB-IP country record we read. `registered_country` stands
/// in where `country` is missing (GeoLite2 leaves it out for some satellite and anycast
/// networks).
#[derive(Deserialize)]
struct Record {
    country: Option<Country>,
    registered_country: Option<Country>,
}

impl Record {
    fn code(self) -> Option<String> {
        self.country
            .and_then(|c| c.iso_code)
            .or_else(|| self.registered_country.and_then(|c| c.iso_code))
            .filter(|c| c.len() == 2 && c.bytes().all(|b| b.is_ascii_alphabetic()))
            .map(|c| c.to_ascii_uppercase())
    }
}

/// When a file was last changed, as far as reloading cares: modification time and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp(Option<SystemTime>, u64);

impl Stamp {
    pub fn of(path: &Path) -> Option<Stamp> {
        let m = std::fs::metadata(path).ok()?;
        Some(Stamp(m.modified().ok(), m.len()))
    }
}

/// A loaded country database.
pub struct CountryDb {
    pub path: PathBuf,
    pub stamp: Option<Stamp>,
    /// Type and build date, e.g. `GeoLite2-Country 2026-11-20`.
    pub desc: String,
    v4: BTreeMap<String, Vec<Ipv4Net>>,
    v6: BTreeMap<String, Vec<Ipv6Net>>,
    reader: Reader<Vec<u8>>,
}

impl std::fmt::Debug for CountryDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CountryDb({}, {})", self.path.display(), self.desc)
    }
}

impl CountryDb {
    /// Reads `path` and every network in it.
    pub fn load(path: &Path) -> Result<CountryDb> {
        let stamp = Stamp::of(path);
        let bytes = std::fs::read(path).with_context(|| {
            format!(
                "--country-db {}: cannot read it; {COUNTRY_DB_HINT}",
                path.display()
            )
        })?;
        Self::from_bytes(path, stamp, bytes)
    }

    fn from_bytes(path: &Path, stamp: Option<Stamp>, bytes: Vec<u8>) -> Result<CountryDb> {
        let bad = |e: &dyn std::fmt::Display| {
            anyhow::anyhow!(
                "--country-db {}: not a readable mmdb country database ({e}); expected GeoLite2-Country.mmdb or DB-IP's dbip-country-lite-*.mmdb",
                path.display()
            )
        };
        let reader = Reader::from_source(bytes).map_err(|e| bad(&e))?;
        let md = reader.metadata();
        let date = time::OffsetDateTime::from_unix_timestamp(md.build_epoch as i64)
            .map(|t| t.date().to_string())
            .unwrap_or_else(|_| md.build_epoch.to_string());
        let desc = format!("{} {date}", md.database_type);
        let mut v4: BTreeMap<String, Vec<Ipv4Net>> = BTreeMap::new();
        let mut v6: BTreeMap<String, Vec<Ipv6Net>> = BTreeMap::new();
        for item in reader
            .networks(WithinOptions::default())
            .map_err(|e| bad(&e))?
        {
            let item = item.map_err(|e| bad(&e))?;
            let Some(code) = item
                .decode::<Record>()
                .map_err(|e| bad(&e))?
                .and_then(Record::code)
            else {
                continue;
            };
            let net: ipnet::IpNet = item
                .network()
                .map_err(|e| bad(&e))?
                .to_string()
                .parse()
                .map_err(|e| bad(&e))?;
            match net.trunc() {
                ipnet::IpNet::V4(n) => v4.entry(code).or_default().push(n),
                ipnet::IpNet::V6(n) => {
                    // An IPv4-mapped alias of the IPv4 tree: the IPv4 part covers it.
                    if n.addr().to_ipv4_mapped().is_some() {
                        continue;
                    }
                    v6.entry(code).or_default().push(n)
                }
            }
        }
        for nets in v4.values_mut() {
            *nets = Ipv4Net::aggregate(nets);
        }
        for nets in v6.values_mut() {
            *nets = Ipv6Net::aggregate(nets);
        }
        Ok(CountryDb {
            path: path.to_path_buf(),
            stamp,
            desc,
            v4,
            v6,
            reader,
        })
    }

    /// Every network of the countries `codes`, aggregated (no overlaps: what an nftables
    /// interval set takes). A country the database does not know has none.
    pub fn nets(&self, codes: &[String]) -> (Vec<Ipv4Net>, Vec<Ipv6Net>) {
        let mut a = Vec::new();
        let mut b = Vec::new();
        for c in codes {
            if let Some(n) = self.v4.get(c) {
                a.extend_from_slice(n);
            }
            if let Some(n) = self.v6.get(c) {
                b.extend_from_slice(n);
            }
        }
        (Ipv4Net::aggregate(&a), Ipv6Net::aggregate(&b))
    }

    /// The country of `ip`, None when the database does not know it.
    pub fn country(&self, ip: IpAddr) -> Option<String> {
        let ip = ip.to_canonical();
        self.reader
            .lookup(ip)
            .ok()?
            .decode::<Record>()
            .ok()
            .flatten()
            .and_then(Record::code)
    }

    /// Countries the database knows, with their number of networks (v4, v6).
    pub fn countries(&self) -> BTreeMap<&str, (usize, usize)> {
        let mut m: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for (c, n) in &self.v4 {
            m.entry(c).or_default().0 = n.len();
        }
        for (c, n) in &self.v6 {
            m.entry(c).or_default().1 = n.len();
        }
        m
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Path of the mmdb-writer virtualenv's python (deploy/setup.sh installs it).
    pub const MMDB_PYTHON: &str = "/opt/homeport-mmdb-writer/bin/python";

    /// Writes a small GeoLite2-Country-like database of test-net ranges to `out` with PyPI's
    /// `mmdb-writer` (installed by deploy/setup.sh): 192.0.2.0/25 and 2001:db8:1::/48 are DE,
    /// 198.51.100.0/24 and 2001:db8:2::/48 are US, 203.0.113.0/24 and 2001:db8:3::/48 are CN;
    /// 192.0.2.128/25 and the rest of 2001:db8::/32 are unknown.
    pub fn write_test_db(out: &Path, extra: &[(&str, &str)]) -> Result<()> {
        let mut nets: Vec<(String, String)> = [
            ("192.0.2.0/25", "DE"),
            ("2001:db8:1::/48", "DE"),
            ("198.51.100.0/24", "US"),
            ("2001:db8:2::/48", "US"),
            ("203.0.113.0/24", "CN"),
            ("2001:db8:3::/48", "CN"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        nets.extend(extra.iter().map(|(a, b)| (a.to_string(), b.to_string())));
        let script = r#"
import sys, json
from netaddr import IPSet
from mmdb_writer import MMDBWriter
w = MMDBWriter(ip_version=6, database_type="GeoLite2-Country", languages=["en"], description="homeport test", ipv4_compatible=True)
for net, cc in json.loads(sys.argv[2]):
    w.insert_network(IPSet([net]), {"country": {"iso_code": cc}})
w.to_db_file(sys.argv[1])
"#;
        let st = std::process::Command::new(MMDB_PYTHON)
            .arg("-c")
            .arg(script)
            .arg(out)
            .arg(serde_json::to_string(&nets)?)
            .status()
            .with_context(|| format!("{MMDB_PYTHON} (run deploy/setup.sh)"))?;
        anyhow::ensure!(st.success(), "mmdb-writer failed");
        Ok(())
    }

    pub fn have_writer() -> bool {
        Path::new(MMDB_PYTHON).exists()
    }

    #[test]
    fn reads_countries_and_aggregates_networks() {
        if !have_writer() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{MMDB_PYTHON} missing: run deploy/setup.sh"
            );
            eprintln!("skipped: {MMDB_PYTHON} missing (deploy/setup.sh installs it)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.mmdb");
        write_test_db(&p, &[("192.0.2.64/26", "DE")]).unwrap();
        let db = CountryDb::load(&p).unwrap();
        assert!(db.desc.starts_with("GeoLite2-Country "), "{}", db.desc);
        let (v4, v6) = db.nets(&["DE".into()]);
        assert_eq!(v4, vec!["192.0.2.0/25".parse::<Ipv4Net>().unwrap()]);
        assert_eq!(v6, vec!["2001:db8:1::/48".parse::<Ipv6Net>().unwrap()]);
        let (v4, _) = db.nets(&["DE".into(), "US".into()]);
        assert_eq!(v4.len(), 2);
        assert_eq!(
            db.country("192.0.2.5".parse().unwrap()).as_deref(),
            Some("DE")
        );
        assert_eq!(
            db.country("2001:db8:3::9".parse().unwrap()).as_deref(),
            Some("CN")
        );
        assert_eq!(db.country("192.0.2.200".parse().unwrap()), None);
        assert_eq!(db.country("2001:db8:9::1".parse().unwrap()), None);
        assert!(db.nets(&["FR".into()]).0.is_empty());

        let bad = dir.path().join("bad.mmdb");
        std::fs::write(&bad, b"not a database").unwrap();
        let e = CountryDb::load(&bad).unwrap_err().to_string();
        assert!(e.contains("GeoLite2-Country.mmdb"), "{e}");
        let e = format!(
            "{:#}",
            CountryDb::load(&dir.path().join("none")).unwrap_err()
        );
        assert!(
            e.contains("dev.maxmind.com") && e.contains("db-ip.com"),
            "{e}"
        );
    }
}
