//! The kernel settings the exit needs, saved before and restored after.

/// File in the exit's state dir with the sysctl values from before the exit changed them.
pub const SYSCTL_BEFORE_FILE: &str = "sysctl-before.json";

/// Turns on what the exit needs from the kernel, under `proc_sys` (normally `/proc/sys`):
/// IPv4 and IPv6 forwarding, conntrack byte accounting and timestamps (for the audit log), and
/// strict TCP tracking (`nf_conntrack_tcp_loose=0`, which the synproxy needs). Before IPv6
/// forwarding is turned on, interfaces that accept router advertisements (`accept_ra` = 1) are
/// switched to 2, which keeps accepting them while forwarding: otherwise a VPS configured by
/// SLAAC would lose its IPv6 default route.
///
/// The values found are first saved in `<state_dir>/sysctl-before.json` (0600), for
/// [`restore_sysctls`] when the exit stops. A file that is already there was left by an exit
/// that did not stop cleanly: its values are the ones from before, and are kept.
pub fn enable_forwarding(
    proc_sys: &std::path::Path,
    state_dir: &std::path::Path,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut wanted: Vec<(String, &str)> = vec![("net/ipv4/ip_forward".into(), "1")];
    if let Ok(dir) = std::fs::read_dir(proc_sys.join("net/ipv6/conf")) {
        let mut names: Vec<String> = dir
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for n in names {
            let rel = format!("net/ipv6/conf/{n}/accept_ra");
            if std::fs::read_to_string(proc_sys.join(&rel))
                .map(|s| s.trim() == "1")
                .unwrap_or(false)
            {
                wanted.push((rel, "2"));
            }
        }
        wanted.push(("net/ipv6/conf/all/forwarding".into(), "1"));
    }
    // Exist only once nf_conntrack is loaded (the ruleset loads it).
    for (k, v) in [
        ("net/netfilter/nf_conntrack_acct", "1"),
        ("net/netfilter/nf_conntrack_timestamp", "1"),
        ("net/netfilter/nf_conntrack_tcp_loose", "0"),
    ] {
        if proc_sys.join(k).exists() {
            wanted.push((k.into(), v));
        }
    }
    let saved = state_dir.join(SYSCTL_BEFORE_FILE);
    let mut before: std::collections::BTreeMap<String, String> = std::fs::read(&saved)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let n = before.len();
    for (rel, _) in &wanted {
        if !before.contains_key(rel)
            && let Ok(v) = std::fs::read_to_string(proc_sys.join(rel))
        {
            before.insert(rel.clone(), v.trim().to_string());
        }
    }
    if before.len() != n || !saved.exists() {
        homeport_host::fs::write_private(&saved, &serde_json::to_vec_pretty(&before)?)
            .with_context(|| format!("saving the sysctls to restore in {}", saved.display()))?;
    }
    for (rel, v) in &wanted {
        let p = proc_sys.join(rel);
        std::fs::write(&p, v).with_context(|| format!("writing {v} to {}", p.display()))?;
    }
    Ok(())
}

/// Puts back the sysctl values [`enable_forwarding`] saved in `state_dir` and removes the file.
/// Returns whether there was anything to restore.
pub fn restore_sysctls(
    proc_sys: &std::path::Path,
    state_dir: &std::path::Path,
) -> anyhow::Result<bool> {
    use anyhow::Context;
    let saved = state_dir.join(SYSCTL_BEFORE_FILE);
    let bytes = match std::fs::read(&saved) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("reading {}", saved.display())),
    };
    let before: std::collections::BTreeMap<String, String> = serde_json::from_slice(&bytes)
        .with_context(|| {
            format!(
                "{}: expected a JSON object of sysctl values",
                saved.display()
            )
        })?;
    // `all/forwarding` resets every interface's forwarding (and with it how accept_ra acts):
    // restore it first, then the per-interface values.
    let mut order: Vec<(&String, &String)> = before.iter().collect();
    order.sort_by_key(|(k, _)| !k.ends_with("/all/forwarding"));
    let mut failed = Vec::new();
    for (rel, v) in order {
        let p = proc_sys.join(rel);
        // An interface that is gone has nothing to restore.
        if p.exists()
            && let Err(e) = std::fs::write(&p, v)
        {
            failed.push(format!("{}: {e}", p.display()));
        }
    }
    if !failed.is_empty() {
        anyhow::bail!("restoring sysctls failed: {}", failed.join("; "));
    }
    std::fs::remove_file(&saved).with_context(|| format!("removing {}", saved.display()))?;
    Ok(true)
}
