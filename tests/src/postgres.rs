//! A throwaway PostgreSQL cluster inside a lab host, for coordinator replicas that share it.
//! Debian's server packages (deploy/setup.sh installs `postgresql`); the cluster lives in a temp
//! dir, runs as the `postgres` user (initdb refuses root) and is stopped on drop.

use crate::{Lab, in_ci, run};
use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::process::Command;

pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// `postgres://postgres@127.0.0.1:PORT/postgres`, reachable inside the host it runs in.
    pub url: String,
}

impl Postgres {
    /// Starts a cluster in lab host `host`, listening on 127.0.0.1:`port` there. Ok(None) with
    /// a notice when PostgreSQL is not installed, except under CI=true (an error then).
    pub fn start_in(lab: &Lab, host: &str, port: u16) -> Result<Option<Postgres>> {
        let bin = std::fs::read_dir("/usr/lib/postgresql").ok().and_then(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .find(|b| b.join("initdb").is_file())
        });
        let Some(bin) = bin else {
            if in_ci() {
                bail!(
                    "PostgreSQL (initdb under /usr/lib/postgresql) is missing under CI=true: deploy/setup.sh installs postgresql"
                );
            }
            eprintln!("SKIP: PostgreSQL is not installed (deploy/setup.sh installs it)");
            return Ok(None);
        };
        let dir = tempfile::tempdir()?;
        run(Command::new("chown")
            .args(["-R", "postgres"])
            .arg(dir.path()))?;
        let data = dir.path().join("data");
        let data_s = data.to_str().context("temp dir is not UTF-8")?.to_string();
        let pg = Postgres {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            dir,
            bin,
        };
        pg.as_postgres(
            None,
            "initdb",
            &["-D", &data_s, "-A", "trust", "-U", "postgres"],
        )?;
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            pg.dir.path().display()
        );
        let log = pg.dir.path().join("log");
        let log_s = log.to_str().context("temp dir is not UTF-8")?.to_string();
        pg.as_postgres(
            Some(&lab.ns(host)),
            "pg_ctl",
            &["-D", &data_s, "-o", &opts, "-l", &log_s, "-w", "start"],
        )?;
        Ok(Some(pg))
    }

    /// Runs a PostgreSQL program as the `postgres` user, in namespace `ns` if given.
    fn as_postgres(&self, ns: Option<&str>, program: &str, args: &[&str]) -> Result<String> {
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "runuser"]);
                c
            }
            None => Command::new("runuser"),
        };
        cmd.args(["-u", "postgres", "--"])
            .arg(self.bin.join(program))
            .args(args);
        run(&mut cmd)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = self.as_postgres(
            None,
            "pg_ctl",
            &["-D", data.to_str().unwrap_or(""), "-m", "immediate", "stop"],
        );
    }
}
