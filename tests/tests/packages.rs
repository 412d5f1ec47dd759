//! The Debian packages (deploy/package.sh, cargo-deb): they build from the debug binaries that
//! deploy/test.sh has just built, pass lintian without errors, hold what a VPS needs (binaries, units,
//! conffiles, maintainer scripts, man pages, copyright), extract into a throwaway root, and on this
//! machine install, upgrade, remove and purge the way a Debian admin expects: an install starts
//! nothing, state survives upgrade and remove and is gone after purge, remove takes the exit's
//! nftables table away. Under systemd (simulated in a private mount namespace with logging fakes),
//! the scripts enable and start nothing on a first install, restart on upgrade and stop on remove.
//! deploy/install.sh installs the packages (and fills in the configs they ship), and from a checkout
//! without packages points the units' /usr/bin paths at /usr/local.
//!
//! The machine test refuses to run where homeport is installed for real (it would purge it), and a
//! guard purges what it installed even when it fails half way.

use homeport_tests::{in_ci, require_root_and, which};
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// (package, binary, role of its example config, unit)
const PACKAGES: [(&str, &str, &str, &str); 3] = [
    (
        "homeport-coordinator",
        "homeport-coordinator",
        "coordinator",
        "homeport-coordinator.service",
    ),
    (
        "homeport-exit",
        "homeport-exit",
        "exit",
        "homeport-exit.service",
    ),
    ("homeport", "homeport", "node", "homeport.service"),
];

/// What building the packages needs; missing is a failure under CI=true, a visible skip elsewhere.
fn have_tools() -> bool {
    let mut missing: Vec<String> = ["dpkg-deb", "dpkg", "lintian", "help2man"]
        .into_iter()
        .filter(|t| which(t).is_none())
        .map(|t| format!("`{t}`"))
        .collect();
    let cargo_deb = Command::new(cargo())
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !cargo_deb {
        missing.push("cargo-deb (`cargo deb`)".into());
    }
    if missing.is_empty() {
        return true;
    }
    let what = missing.join(", ");
    if in_ci() {
        panic!("needs {what}; under CI=true that is a failure (deploy/setup.sh installs them)");
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIP packages test: needs {what} (deploy/setup.sh installs them)"
    );
    false
}

fn cargo() -> PathBuf {
    std::env::var_os("CARGO").map_or_else(|| PathBuf::from("cargo"), PathBuf::from)
}

/// The .deb files of one build, by package name.
struct Build {
    dir: PathBuf,
    debs: BTreeMap<&'static str, PathBuf>,
}

/// Runs deploy/package.sh --dev (the debug binaries, no build) with Debian revision `revision`.
fn package(revision: &str) -> Build {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("packages")
        .join(format!("r{revision}"));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    // cargo-deb and cargo metadata run as `cargo …`: the cargo running this test comes first on PATH.
    let mut path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(dir) = cargo().parent().filter(|d| !d.as_os_str().is_empty()) {
        let mut dirs = vec![dir.to_path_buf()];
        dirs.extend(std::env::split_paths(&path));
        path = std::env::join_paths(dirs).unwrap();
    }
    let start = Instant::now();
    let o = Command::new(repo().join("deploy/package.sh"))
        .args(["--dev", "--fast", "--deb-revision", revision, "--out"])
        .arg(&out)
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "deploy/package.sh --dev --deb-revision {revision} failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let printed = String::from_utf8_lossy(&o.stdout);
    let mut debs = BTreeMap::new();
    for (pkg, ..) in PACKAGES {
        let want = format!("/{pkg}_0.1.0-{revision}_");
        let deb = printed
            .lines()
            .find(|l| l.contains(&want) && l.ends_with(".deb"))
            .unwrap_or_else(|| panic!("package.sh printed no {pkg} package:\n{printed}"));
        assert!(Path::new(deb).is_file(), "{deb} was printed but is missing");
        debs.insert(pkg, PathBuf::from(deb));
    }
    let _ = writeln!(
        std::io::stderr(),
        "packages revision {revision} built in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    Build { dir: out, debs }
}

/// Both builds (revision 1, and revision 2 for the upgrade), made once per test run: package.sh
/// writes the man pages into one place, so two builds must not run at the same time.
fn builds() -> &'static (Build, Build) {
    static BUILDS: OnceLock<(Build, Build)> = OnceLock::new();
    BUILDS.get_or_init(|| {
        for (_, bin, ..) in PACKAGES {
            let exe = homeport_tests::bin_dir().join(bin);
            assert!(
                exe.is_file(),
                "{} is not built: deploy/test.sh runs `cargo build --workspace --bins` first",
                exe.display()
            );
        }
        (package("1"), package("2"))
    })
}

fn run(program: &str, args: &[&str]) -> String {
    let o = Command::new(program).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "`{program} {}` failed ({}):\n{}{}",
        args.join(" "),
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn deb_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn packages_pass_lintian_without_errors() {
    if !have_tools() {
        return;
    }
    let (r1, _) = builds();
    let start = Instant::now();
    let debs: Vec<&str> = r1.debs.values().map(|p| deb_str(p)).collect();
    let mut args = vec!["--fail-on", "error", "--display-level", ">=warning"];
    args.extend(&debs);
    let o = Command::new("lintian").args(&args).output().unwrap();
    let report = String::from_utf8_lossy(&o.stdout);
    let _ = writeln!(
        std::io::stderr(),
        "lintian ({:.1} s): {} warnings\n{report}",
        start.elapsed().as_secs_f64(),
        report.lines().filter(|l| l.starts_with("W:")).count()
    );
    assert!(
        o.status.success(),
        "lintian reports errors:\n{report}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !report.lines().any(|l| l.starts_with("E:")),
        "lintian errors:\n{report}"
    );
}

/// `dpkg-deb --contents` as path → (mode string, owner).
fn contents(deb: &Path) -> BTreeMap<String, (String, String)> {
    run("dpkg-deb", &["--contents", deb_str(deb)])
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let path = f[5].trim_start_matches('.').to_string();
            (path, (f[0].to_string(), f[1].to_string()))
        })
        .collect()
}

#[test]
fn packages_hold_binaries_units_conffiles_and_maintainer_scripts() {
    if !have_tools() {
        return;
    }
    let (r1, _) = builds();
    for (pkg, bin, role, unit) in PACKAGES {
        let deb = &r1.debs[pkg];
        let files = contents(deb);
        let mode = |p: &str| {
            files
                .get(p)
                .unwrap_or_else(|| panic!("{pkg}: no {p} in the package; it holds {files:#?}"))
                .clone()
        };
        assert_eq!(mode(&format!("/usr/bin/{bin}")).0, "-rwxr-xr-x", "{pkg}");
        let unit_path = format!("/lib/systemd/system/{unit}");
        assert_eq!(mode(&unit_path).0, "-rw-r--r--", "{pkg}");
        // The node and the exit run as root and read their config alone; the coordinator's dynamic
        // user must read its config.
        let conf_mode = if role == "coordinator" {
            "-rw-r--r--"
        } else {
            "-rw-------"
        };
        let conf = format!("/etc/homeport/{role}.toml");
        assert_eq!(mode(&conf).0, conf_mode, "{pkg}: {conf}");
        for p in [
            format!("/usr/share/doc/{pkg}/copyright"),
            format!("/usr/share/doc/{pkg}/changelog.Debian.gz"),
            format!("/usr/share/man/man1/{bin}.1.gz"),
            format!("/usr/share/lintian/overrides/{pkg}"),
            format!("/usr/share/bash-completion/completions/{bin}"),
            format!("/usr/share/zsh/vendor-completions/_{bin}"),
            format!("/usr/share/fish/vendor_completions.d/{bin}.fish"),
        ] {
            assert_eq!(mode(&p).0, "-rw-r--r--", "{pkg}: {p}");
        }
        for (path, (_, owner)) in &files {
            assert!(
                owner == "root/root" || owner == "0/0",
                "{pkg}: {path} is owned by {owner}, not root"
            );
            assert!(
                !path.starts_with("/usr/local") && !path.starts_with("/var"),
                "{pkg}: {path}: a package installs no files under /usr/local or /var (state is made at run time)"
            );
        }

        // Control fields.
        let field = |f: &str| {
            run("dpkg-deb", &["--field", deb_str(deb), f])
                .trim()
                .to_string()
        };
        assert_eq!(field("Package"), pkg);
        assert_eq!(field("Version"), "0.1.0-1");
        assert_eq!(field("Section"), "net", "{pkg}");
        assert!(field("Maintainer").contains('@'), "{pkg}: Maintainer");
        let depends = field("Depends");
        assert!(depends.contains("libc6"), "{pkg}: Depends {depends}");
        assert!(
            depends.contains("init-system-helpers"),
            "{pkg}: Depends {depends}"
        );
        let needs: &[&str] = match role {
            "exit" => &["nftables", "conntrack", "iproute2"],
            "node" => &["nftables", "iproute2"],
            _ => &[],
        };
        for n in needs {
            assert!(depends.contains(n), "{pkg}: Depends lacks {n}: {depends}");
        }
        let info = run("dpkg-deb", &["--info", deb_str(deb)]);
        for script in ["postinst", "prerm", "postrm", "conffiles", "md5sums"] {
            assert!(info.contains(script), "{pkg}: no {script}:\n{info}");
        }

        // conffiles: the example config, and nothing else.
        let dir = tempfile::tempdir().unwrap();
        run(
            "dpkg-deb",
            &["--control", deb_str(deb), dir.path().to_str().unwrap()],
        );
        let conffiles = std::fs::read_to_string(dir.path().join("conffiles")).unwrap();
        assert_eq!(conffiles.trim(), conf, "{pkg}: conffiles");
        for script in ["postinst", "prerm", "postrm"] {
            let p = dir.path().join(script);
            let m = p.metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(m, 0o755, "{pkg}: {script} mode {m:o}");
            let text = std::fs::read_to_string(&p).unwrap();
            assert_eq!(
                text,
                std::fs::read_to_string(repo().join(format!("deploy/debian/{pkg}/{script}")))
                    .unwrap(),
                "{pkg}: {script} is not deploy/debian/{pkg}/{script}"
            );
        }
    }
}

#[test]
fn packages_extract_into_a_throwaway_root_with_a_working_layout() {
    if !have_tools() {
        return;
    }
    let (r1, _) = builds();
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for deb in r1.debs.values() {
        run("dpkg", &["-x", deb_str(deb), r.to_str().unwrap()]);
    }
    for (pkg, bin, role, unit) in PACKAGES {
        let unit_text = std::fs::read_to_string(r.join("lib/systemd/system").join(unit)).unwrap();
        assert_eq!(
            unit_text,
            std::fs::read_to_string(repo().join("deploy/systemd").join(unit)).unwrap(),
            "{pkg}: the unit is not deploy/systemd/{unit}"
        );
        // Every program and file the unit names is in the package (under the throwaway root).
        for line in unit_text.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            if key.starts_with("Exec") {
                let program = value.split_whitespace().next().unwrap();
                assert!(
                    r.join(program.trim_start_matches('/')).is_file(),
                    "{pkg}: {unit} runs {program}, which the package does not install"
                );
            }
            if key == "Documentation" {
                for doc in value.split_whitespace() {
                    if let Some(file) = doc.strip_prefix("file:") {
                        assert!(
                            r.join(file.trim_start_matches('/')).is_file(),
                            "{pkg}: {unit} documents {file}, which the package does not install"
                        );
                    } else if let Some(man) = doc.strip_prefix("man:") {
                        let page = man.replace('(', ".").replace(')', "");
                        let section = page.rsplit('.').next().unwrap();
                        assert!(
                            r.join(format!("usr/share/man/man{section}/{page}.gz"))
                                .is_file(),
                            "{pkg}: {unit} documents {doc}, which the package does not install"
                        );
                    }
                }
            }
            if key == "ExecStart" {
                assert!(
                    value.ends_with(&format!("--config /etc/homeport/{role}.toml")),
                    "{pkg}: {line}"
                );
            }
        }
        assert_eq!(
            std::fs::read(r.join(format!("etc/homeport/{role}.toml"))).unwrap(),
            std::fs::read(repo().join(format!("deploy/config/{role}.toml"))).unwrap(),
            "{pkg}: the config is not deploy/config/{role}.toml"
        );
        // The extracted binary runs from the throwaway root.
        let exe = r.join("usr/bin").join(bin);
        let version = run(exe.to_str().unwrap(), &["--version"]);
        assert!(
            version.contains("0.1.0"),
            "{pkg}: {bin} --version: {version}"
        );
        // The bash completion names the binary's subcommands (clap's script, not an empty file).
        let completion =
            std::fs::read_to_string(r.join(format!("usr/share/bash-completion/completions/{bin}")))
                .unwrap();
        let sub = if role == "coordinator" { "serve" } else { "up" };
        assert!(
            completion.contains(&format!("complete -F _{}", bin.replace('-', "__")))
                && completion.contains(sub),
            "{pkg}: the bash completion is not clap's for {bin}:\n{completion:.300}"
        );
        let copyright =
            std::fs::read_to_string(r.join(format!("usr/share/doc/{pkg}/copyright"))).unwrap();
        assert!(
            copyright.contains("License: Apache-2.0")
                && copyright.contains("/usr/share/common-licenses/Apache-2.0"),
            "{pkg}: copyright:\n{copyright}"
        );
    }
}

/// `dpkg --root` into an empty directory, the maintainer scripts run outside it with DPKG_ROOT set
/// (--force-script-chrootless): they make the state dirs there, leave the machine's systemd and files
/// alone, and purge deletes the state they made.
#[test]
fn packages_install_upgrade_and_purge_in_a_throwaway_root() {
    if !have_tools() || !require_root_and(&[]) {
        return;
    }
    // A script that ignored DPKG_ROOT would act on this machine: same refusal as the machine tests.
    refuse_if_homeport_is_installed();
    let (r1, r2) = builds();
    let _turn = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::create_dir_all(r.join("var/lib/dpkg/info")).unwrap();
    std::fs::create_dir_all(r.join("var/lib/dpkg/updates")).unwrap();
    std::fs::write(r.join("var/lib/dpkg/status"), "").unwrap();
    let root_arg = format!("--root={}", r.display());
    // The throwaway root has no libc6, nftables…: --force-depends.
    let dpkg_root = |action: &str, what: Vec<&str>| {
        let mut args = vec![
            root_arg.as_str(),
            "--force-script-chrootless",
            "--force-depends",
            "--log=/dev/null",
            action,
        ];
        args.extend(what);
        dpkg(&args)
    };
    let debs = |b: &'static Build| PACKAGES.iter().map(|p| deb_str(&b.debs[p.0])).collect();
    let names = || PACKAGES.iter().map(|p| p.0).collect::<Vec<_>>();

    let out = dpkg_root("--install", debs(r1));
    assert!(out.contains("installed, not started"), "{out}");
    for dir in ["var/lib/homeport", "var/lib/homeport-exit"] {
        let m = r
            .join(dir)
            .metadata()
            .unwrap_or_else(|e| panic!("{dir}: {e}"));
        assert_eq!(m.permissions().mode() & 0o777, 0o700, "{dir}");
        std::fs::write(r.join(dir).join("wg.key"), "key\n").unwrap();
    }
    for (_, bin, role, unit) in PACKAGES {
        assert!(r.join(format!("usr/bin/{bin}")).is_file());
        assert!(r.join(format!("lib/systemd/system/{unit}")).is_file());
        assert!(r.join(format!("etc/homeport/{role}.toml")).is_file());
    }
    dpkg_root("--install", debs(r2));
    dpkg_root("--remove", names());
    for dir in ["var/lib/homeport", "var/lib/homeport-exit"] {
        assert_eq!(
            std::fs::read_to_string(r.join(dir).join("wg.key")).unwrap(),
            "key\n",
            "{dir}/wg.key lost by upgrade or remove"
        );
    }
    dpkg_root("--purge", names());
    for dir in [
        "var/lib/homeport",
        "var/lib/homeport-exit",
        "etc/homeport",
        "usr/bin/homeport",
    ] {
        assert!(
            r.join(dir).symlink_metadata().is_err(),
            "{dir} is left in the throwaway root after purge"
        );
    }
}

// ---- install, upgrade, remove, purge on this machine -------------------------------------------

/// The tests that run maintainer scripts on this machine take turns (a purge deletes auth key files).
static MACHINE: Mutex<()> = Mutex::new(());

/// Everything the packages leave on a machine until purge; the guard deletes these.
const STATE_PATHS: [&str; 5] = [
    "/etc/homeport",
    "/var/lib/homeport",
    "/var/lib/homeport-exit",
    "/var/lib/homeport-coordinator",
    "/var/lib/private/homeport-coordinator",
];

/// If any of these exists before the test, homeport is in real use here (from a package or a
/// checkout's deploy/install.sh) and the test must not purge it.
const IN_USE_PATHS: [&str; 10] = [
    "/etc/homeport",
    "/var/lib/homeport",
    "/var/lib/homeport-exit",
    "/var/lib/homeport-coordinator",
    "/var/lib/private/homeport-coordinator",
    "/usr/local/bin/homeport",
    "/usr/local/bin/homeport-exit",
    "/usr/local/bin/homeport-coordinator",
    "/usr/local/share/doc/homeport",
    "/etc/systemd/system/homeport.service",
];

/// What `deploy/install.sh home --bin-dir …` (from a checkout, no packages) writes; the guard deletes it.
const CHECKOUT_INSTALL_FILES: [&str; 3] = [
    "/usr/local/bin/homeport",
    "/etc/systemd/system/homeport.service",
    "/usr/local/share/doc/homeport",
];

/// dpkg's word for a package that is not on the machine (never was, or purged).
fn absent(status: &str) -> bool {
    status == "not-installed" || status.starts_with("unknown ok not-installed")
}

fn dpkg_status(pkg: &str) -> String {
    let o = Command::new("dpkg-query")
        .args(["-W", "-f=${Status} ${Version}", pkg])
        .output()
        .unwrap();
    if o.status.success() {
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    } else {
        "not-installed".into()
    }
}

fn nft_table_exists() -> bool {
    Command::new("nft")
        .args(["list", "table", "inet", "homeport_exit"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Purges the packages and what the test wrote, also when the test fails half way.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let pkgs: Vec<&str> = PACKAGES.iter().map(|p| p.0).collect();
        let _ = Command::new("dpkg").arg("--purge").args(&pkgs).output();
        for p in STATE_PATHS {
            let _ = std::fs::remove_dir_all(p);
        }
        for p in CHECKOUT_INSTALL_FILES {
            let _ = std::fs::remove_file(p).or_else(|_| std::fs::remove_dir_all(p));
        }
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", "homeport_exit"])
            .output();
    }
}

fn dpkg(args: &[&str]) -> String {
    let o = Command::new("dpkg").args(args).output().unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.status.success(),
        "`dpkg {}` failed:\n{all}",
        args.join(" ")
    );
    all
}

fn read(p: &str) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

/// Whether systemd runs here; only then can units be enabled or active.
fn systemd() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

fn assert_not_running(unit: &str) {
    if !systemd() {
        return;
    }
    let active = Command::new("systemctl")
        .args(["is-active", unit])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&active.stdout).trim(),
        "inactive",
        "{unit} runs after the install: a service without config must not start"
    );
    let enabled = Command::new("systemctl")
        .args(["is-enabled", unit])
        .output()
        .unwrap();
    assert_ne!(
        String::from_utf8_lossy(&enabled.stdout).trim(),
        "enabled",
        "{unit} is enabled by the install"
    );
}

#[test]
fn packages_install_upgrade_keep_state_remove_and_purge_on_this_machine() {
    if !have_tools() || !require_root_and(&["dpkg-query"]) {
        return;
    }
    refuse_if_homeport_is_installed();
    let (r1, r2) = builds();
    let _turn = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    let _guard = Purge;
    let start = Instant::now();
    let all = |b: &'static Build| -> Vec<&'static str> {
        PACKAGES.iter().map(|p| deb_str(&b.debs[p.0])).collect()
    };
    // ---- install: files in place, state dirs made, nothing started, the next step printed.
    let mut args = vec!["--install"];
    args.extend(all(r1));
    let out = dpkg(&args);
    for (pkg, bin, role, unit) in PACKAGES {
        assert_eq!(dpkg_status(pkg), "install ok installed 0.1.0-1");
        assert!(
            out.contains(&format!("{pkg}: installed, not started")),
            "{pkg}: the install prints no next step:\n{out}"
        );
        assert!(
            out.contains(&format!(
                "systemctl enable --now {}",
                unit.trim_end_matches(".service")
            )),
            "{pkg}: the next step does not say how to start it:\n{out}"
        );
        let exe = format!("/usr/bin/{bin}");
        assert!(
            run(&exe, &["--version"]).contains("0.1.0"),
            "{exe} --version"
        );
        assert!(run(&exe, &["--help"]).contains("Usage:"), "{exe} --help");
        assert!(Path::new(&format!("/lib/systemd/system/{unit}")).is_file());
        assert!(Path::new(&format!("/etc/homeport/{role}.toml")).is_file());
        assert_not_running(unit);
    }
    for dir in ["/var/lib/homeport", "/var/lib/homeport-exit"] {
        let m = Path::new(dir).metadata().unwrap();
        assert!(m.is_dir(), "{dir} not made by the install");
        assert_eq!(m.permissions().mode() & 0o777, 0o700, "{dir}");
    }
    // Every installed file matches the package's md5sums.
    let pkgs: Vec<&str> = PACKAGES.iter().map(|p| p.0).collect();
    let mut args = vec!["--verify"];
    args.extend(&pkgs);
    let verify = dpkg(&args);
    assert!(
        verify.trim().is_empty(),
        "dpkg --verify after the install:\n{verify}"
    );
    let installed_at = start.elapsed();

    // ---- state as a running system has it: keys, the database, an admin's edit to a conffile,
    // the auth key files.
    std::fs::create_dir_all("/var/lib/private/homeport-coordinator").unwrap();
    std::os::unix::fs::symlink(
        "private/homeport-coordinator",
        "/var/lib/homeport-coordinator",
    )
    .unwrap();
    let state = [
        ("/var/lib/homeport-coordinator/homeport.db", "the database"),
        ("/var/lib/homeport-coordinator/tls.key", "the TLS key"),
        ("/var/lib/homeport/wg.key", "the node's key"),
        ("/var/lib/homeport-exit/wg.key", "the exit's key"),
        ("/var/lib/homeport-exit/audit.jsonl", "the audit log"),
        ("/etc/homeport/node.authkey", "an auth key"),
        ("/etc/homeport/exit.authkey", "an auth key"),
    ];
    for (p, what) in state {
        std::fs::write(p, format!("{what}\n")).unwrap();
    }
    let edited = read("/etc/homeport/node.toml").replace(
        "coordinator = \"https://VPS_PUBLIC_IP:8443\"",
        "coordinator = \"https://203.0.113.7:8443\"",
    );
    assert!(
        edited.contains("203.0.113.7"),
        "node.toml has no coordinator line to edit"
    );
    std::fs::write("/etc/homeport/node.toml", &edited).unwrap();

    // ---- upgrade to the rebuilt packages: state and the edited config stay, nothing new printed.
    let mut args = vec!["--install"];
    args.extend(all(r2));
    let out = dpkg(&args);
    for (pkg, _, _, unit) in PACKAGES {
        assert_eq!(dpkg_status(pkg), "install ok installed 0.1.0-2");
        assert!(
            !out.contains(&format!("{pkg}: installed, not started")),
            "{pkg}: the upgrade prints the first-install text:\n{out}"
        );
        assert_not_running(unit);
    }
    for (p, what) in state {
        assert_eq!(read(p), format!("{what}\n"), "{p} changed by the upgrade");
    }
    assert_eq!(
        read("/etc/homeport/node.toml"),
        edited,
        "the upgrade lost the admin's edit"
    );

    // ---- remove: binaries and units go; state, configs and keys stay; the exit's nftables table
    // goes (prerm runs `homeport-exit cleanup`). The table stands in for a running exit's rules.
    run("nft", &["add", "table", "inet", "homeport_exit"]);
    run(
        "nft",
        &[
            "add",
            "chain",
            "inet",
            "homeport_exit",
            "prerouting",
            "{ type nat hook prerouting priority -100; }",
        ],
    );
    assert!(nft_table_exists());
    let mut args = vec!["--remove"];
    args.extend(PACKAGES.iter().map(|p| p.0));
    let out = dpkg(&args);
    assert!(
        !nft_table_exists(),
        "dpkg --remove homeport-exit left the nftables table inet homeport_exit:\n{out}"
    );
    for (pkg, bin, role, unit) in PACKAGES {
        assert!(
            dpkg_status(pkg).starts_with("deinstall ok config-files"),
            "{pkg}: {}",
            dpkg_status(pkg)
        );
        assert!(
            !Path::new(&format!("/usr/bin/{bin}")).exists(),
            "{bin} left"
        );
        assert!(
            !Path::new(&format!("/lib/systemd/system/{unit}")).exists(),
            "{unit} left by remove"
        );
        assert!(
            Path::new(&format!("/etc/homeport/{role}.toml")).is_file(),
            "remove deleted the config of {pkg}"
        );
    }
    for (p, what) in state {
        assert_eq!(read(p), format!("{what}\n"), "{p} changed by remove");
    }

    // ---- purge: state, configs and keys are gone.
    let mut args = vec!["--purge"];
    args.extend(PACKAGES.iter().map(|p| p.0));
    dpkg(&args);
    for (pkg, ..) in PACKAGES {
        assert!(
            absent(&dpkg_status(pkg)),
            "{pkg} after purge: {}",
            dpkg_status(pkg)
        );
    }
    for p in STATE_PATHS {
        assert!(
            Path::new(p).symlink_metadata().is_err(),
            "{p} is left after purge"
        );
    }
    let cycle = start.elapsed();

    // ---- deploy/install.sh with packages: it installs them and fills in the example configs they
    // ship (vps: the coordinator's public URL; home: coordinator, pin, hostname, the auth key).
    let key = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key.path(), "KEY-FROM-THE-VPS\n").unwrap();
    let install_with = |args: &[&str]| {
        let o = Command::new(repo().join("deploy/install.sh"))
            .args(args)
            .output()
            .unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(o.status.success(), "install.sh {}: {all}", args.join(" "));
        all
    };
    let install = |args: &[&str]| {
        let mut args = args.to_vec();
        args.extend(["--no-start", "--packages", r1.dir.to_str().unwrap()]);
        install_with(&args)
    };
    install(&["vps", "--public-ip", "203.0.113.7"]);
    install(&[
        "home",
        "--coordinator",
        "https://203.0.113.7:8443",
        "--pin",
        "PIN-OF-THE-VPS",
        "--authkey-file",
        key.path().to_str().unwrap(),
        "--hostname",
        "testhome",
    ]);
    for (pkg, bin, ..) in PACKAGES {
        assert_eq!(
            dpkg_status(pkg),
            "install ok installed 0.1.0-1",
            "install.sh"
        );
        assert!(
            Path::new(&format!("/usr/local/bin/{bin}"))
                .symlink_metadata()
                .is_err(),
            "install.sh copied {bin} to /usr/local/bin although it had packages"
        );
    }
    let coordinator = read("/etc/homeport/coordinator.toml");
    assert!(
        coordinator.contains("\npublic-url = \"https://203.0.113.7:8443\"\n"),
        "install.sh vps did not fill in the packaged coordinator.toml:\n{coordinator}"
    );
    let node = read("/etc/homeport/node.toml");
    for line in [
        "coordinator = \"https://203.0.113.7:8443\"",
        "pin = \"PIN-OF-THE-VPS\"",
        "hostname = \"testhome\"",
        "authkey-file = \"/etc/homeport/node.authkey\"",
    ] {
        assert!(
            node.lines().any(|l| l == line),
            "install.sh home did not write `{line}` into the packaged node.toml:\n{node}"
        );
    }
    let m = |p: &str| Path::new(p).metadata().unwrap().permissions().mode() & 0o777;
    assert_eq!(m("/etc/homeport/node.toml"), 0o600);
    assert_eq!(m("/etc/homeport/node.authkey"), 0o600);
    assert_eq!(read("/etc/homeport/node.authkey"), "KEY-FROM-THE-VPS\n");
    let mut args = vec!["--purge"];
    args.extend(PACKAGES.iter().map(|p| p.0));
    dpkg(&args);
    for p in STATE_PATHS {
        assert!(
            Path::new(p).symlink_metadata().is_err(),
            "{p} is left after purging what install.sh installed"
        );
    }

    // ---- deploy/install.sh from a checkout (--bin-dir, no packages): the units name /usr/bin for
    // the packages; install.sh points them at /usr/local.
    let bin_dir = homeport_tests::bin_dir();
    install_with(&["home", "--bin-dir", bin_dir.to_str().unwrap(), "--no-start"]);
    assert!(
        absent(&dpkg_status("homeport")),
        "install.sh --bin-dir installed the package"
    );
    let unit = read("/etc/systemd/system/homeport.service");
    assert!(
        unit.contains("\nExecStart=/usr/local/bin/homeport up --config /etc/homeport/node.toml\n"),
        "install.sh did not point the unit at /usr/local/bin:\n{unit}"
    );
    for doc in unit
        .lines()
        .filter_map(|l| l.strip_prefix("Documentation="))
    {
        for file in doc
            .split_whitespace()
            .filter_map(|d| d.strip_prefix("file:"))
        {
            assert!(
                Path::new(file).is_file(),
                "the unit documents {file}, which install.sh did not install"
            );
        }
    }
    assert!(run("/usr/local/bin/homeport", &["--version"]).contains("0.1.0"));
    for p in CHECKOUT_INSTALL_FILES {
        let _ = std::fs::remove_file(p).or_else(|_| std::fs::remove_dir_all(p));
    }
    let _ = std::fs::remove_dir_all("/etc/homeport");
    let _ = writeln!(
        std::io::stderr(),
        "dpkg: install {:.1} s, install/upgrade/remove/purge {:.1} s, with install.sh {:.1} s",
        installed_at.as_secs_f64(),
        cycle.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
}

/// Panics when homeport is installed on this machine: the tests that run the maintainer scripts
/// here would purge it.
fn refuse_if_homeport_is_installed() {
    for (pkg, ..) in PACKAGES {
        let status = dpkg_status(pkg);
        assert!(
            absent(&status),
            "refusing to run: package {pkg} is on this machine ({status}); this test installs and purges \
             homeport's packages, which would delete a real install's keys and database. Run it on a \
             machine without homeport, or `dpkg --purge {pkg}` first if it is a leftover"
        );
    }
    for p in IN_USE_PATHS {
        assert!(
            Path::new(p).symlink_metadata().is_err(),
            "refusing to run: {p} exists, so homeport is installed here (from a checkout or a package); \
             this test purges homeport's packages and state, which would delete it. Run it on a machine \
             without homeport, or remove {p} first if it is a leftover"
        );
    }
}

// ---- the maintainer scripts under systemd -------------------------------------------------------

/// Runs `deploy/debian/PKG/SCRIPT args…` as dpkg would on a machine with systemd: in a private mount
/// namespace where /run/systemd/system exists and /var/lib is an empty tmpfs, with deb-systemd-helper,
/// deb-systemd-invoke, systemctl and homeport-exit replaced by fakes that log their arguments.
/// `installed`/`enabled` are what the fake deb-systemd-helper answers to debian-installed/was-enabled.
/// Returns (the calls, the script's output).
fn run_script(
    pkg: &str,
    script: &str,
    args: &[&str],
    installed: bool,
    enabled: bool,
) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let log = dir.path().join("calls");
    std::fs::write(&log, "").unwrap();
    for fake in [
        "deb-systemd-helper",
        "deb-systemd-invoke",
        "systemctl",
        "homeport-exit",
    ] {
        let p = bin.join(fake);
        std::fs::write(
            &p,
            format!(
                "#!/bin/sh\necho \"{fake} $*\" >>\"$FAKE_LOG\"\n\
                 case \"$1 $2\" in\n\
                 \"debian-installed \"*) [ \"$FAKE_INSTALLED\" = yes ] ;;\n\
                 \"--quiet was-enabled\") [ \"$FAKE_ENABLED\" = yes ] ;;\n\
                 *) exit 0 ;;\nesac\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let yes = |b: bool| if b { "yes" } else { "no" };
    let o = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system \
             && mount -t tmpfs tmpfs /var/lib && exec sh \"$0\" \"$@\"",
        ])
        .arg(repo().join(format!("deploy/debian/{pkg}/{script}")))
        .args(args)
        .env("PATH", path)
        .env("FAKE_LOG", &log)
        .env("FAKE_INSTALLED", yes(installed))
        .env("FAKE_ENABLED", yes(enabled))
        .env_remove("DPKG_ROOT")
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.status.success(),
        "{pkg} {script} {}: {out}",
        args.join(" ")
    );
    (std::fs::read_to_string(&log).unwrap(), out)
}

#[test]
fn maintainer_scripts_start_nothing_on_install_restart_on_upgrade_and_stop_on_remove() {
    if !require_root_and(&["unshare", "mount"]) {
        return;
    }
    refuse_if_homeport_is_installed();
    let _turn = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    for (pkg, _, _, unit) in PACKAGES {
        // First install: nothing enabled or started, the next step printed.
        let (calls, out) = run_script(pkg, "postinst", &["configure", ""], false, false);
        assert!(
            calls.contains("systemctl --system daemon-reload"),
            "{pkg}: {calls}"
        );
        assert!(
            !calls.contains("deb-systemd-invoke") && !calls.contains(" enable "),
            "{pkg}: a first install enables or starts {unit}:\n{calls}"
        );
        assert!(out.contains("installed, not started"), "{pkg}: {out}");

        // Upgrade of an enabled, running service: it stays enabled and is restarted.
        let (calls, out) = run_script(pkg, "postinst", &["configure", "0.1.0-1"], true, true);
        assert!(
            calls.contains(&format!("deb-systemd-helper enable {unit}")),
            "{pkg}: {calls}"
        );
        assert!(
            calls.contains(&format!("deb-systemd-invoke try-restart {unit}")),
            "{pkg}: the upgrade does not restart {unit}:\n{calls}"
        );
        assert!(!calls.contains("invoke start"), "{pkg}: {calls}");
        assert!(!out.contains("installed, not started"), "{pkg}: {out}");

        // Upgrade of a service the admin did not enable: not enabled (try-restart leaves a stopped one).
        let (calls, _) = run_script(pkg, "postinst", &["configure", "0.1.0-1"], true, false);
        assert!(
            !calls.contains(" enable "),
            "{pkg}: the upgrade enables {unit}:\n{calls}"
        );

        // The old package's prerm during an upgrade stops nothing (the new postinst restarts).
        let (calls, _) = run_script(pkg, "prerm", &["upgrade", "0.1.0-2"], true, true);
        assert!(calls.is_empty(), "{pkg}: prerm upgrade ran {calls}");

        // remove stops the service; the exit also removes its rules.
        let (calls, _) = run_script(pkg, "prerm", &["remove"], true, true);
        assert!(
            calls.contains(&format!("deb-systemd-invoke stop {unit}")),
            "{pkg}: remove does not stop {unit}:\n{calls}"
        );
        if pkg == "homeport-exit" {
            assert!(
                calls.contains("homeport-exit cleanup --state-dir /var/lib/homeport-exit"),
                "remove does not clean up the exit's rules:\n{calls}"
            );
        }
        let (calls, _) = run_script(pkg, "postrm", &["remove"], true, true);
        assert!(
            calls.contains(&format!("deb-systemd-helper mask {unit}")),
            "{pkg}: {calls}"
        );
        let (calls, _) = run_script(pkg, "postrm", &["purge"], true, true);
        assert!(
            calls.contains(&format!("deb-systemd-helper purge {unit}")),
            "{pkg}: {calls}"
        );
    }
}
