//! Running `nft` (and the other netfilter tools), once for every binary: directly, or inside a
//! network namespace for the lab tests. The node's policy routes and the exit's publisher both
//! go through [`run`].

/// How `nft` and `conntrack` are run: directly, or behind a wrapper such as
/// `ip netns exec NS` (the lab tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exec {
    pub wrap: Vec<String>,
}

impl Exec {
    /// Runs the tools inside network namespace `ns`.
    pub fn netns(ns: &str) -> Exec {
        Exec {
            wrap: vec!["ip".into(), "netns".into(), "exec".into(), ns.into()],
        }
    }
    pub fn command(&self, prog: &str) -> std::process::Command {
        match self.wrap.split_first() {
            Some((first, rest)) => {
                let mut c = std::process::Command::new(first);
                c.args(rest).arg(prog);
                c
            }
            None => std::process::Command::new(prog),
        }
    }
    pub fn tokio_command(&self, prog: &str) -> tokio::process::Command {
        tokio::process::Command::from(self.command(prog))
    }
}

/// A failed `nft` run, with what nft said.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run nft (install Debian's nftables package): {0}")]
    Spawn(std::io::Error),
    #[error("nft {what} failed: {stderr}")]
    Failed { what: String, stderr: String },
    #[error("nft {what} printed JSON that is not understood: {err}")]
    Json { what: String, err: String },
}

/// Runs `nft ARGS`, feeding `stdin` when given; returns what it printed.
pub fn run(exec: &Exec, args: &[&str], stdin: Option<&str>) -> Result<String, NftError> {
    use std::io::Write;
    use std::process::Stdio;
    let mut c = exec.command("nft");
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    c.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = c.spawn().map_err(NftError::Spawn)?;
    if let Some(input) = stdin {
        let mut w = child.stdin.take().expect("piped");
        w.write_all(input.as_bytes()).map_err(NftError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if !out.status.success() {
        return Err(NftError::Failed {
            what: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
