use clap::{Parser, Subcommand};
use homeport_exit::logcmd::LogArgs;
use homeport_exit::{ExitArgs, config};
use homeport_host::cli::parse_or_print_completions;
use homeport_node::config::UpArgs;
use tokio_util::sync::CancellationToken;

/// homeport exit: a mesh node that publishes ports of the mesh on this VPS.
#[derive(Parser, Debug)]
#[command(name = "homeport-exit", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at start: the size difference of the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the exit (node + publisher) in the foreground (systemd runs it)
    Up {
        #[command(flatten)]
        up: UpArgs,
        #[command(flatten)]
        exit: ExitArgs,
    },
    /// Print the audit log of published connections
    Log(LogArgs),
    /// Who connected to the published ports, per source (label or "unknown", country, first and
    /// last seen, connections, bytes, hours of day active, UTC) with what stands out: new
    /// sources and countries, unusual hours, connections open for hours, repeated denies
    Report(homeport_exit::report::ReportArgs),
    /// Leave the VPS as it was after an exit that did not stop cleanly (killed): restore the
    /// forwarding and conntrack sysctls it changed, delete the conntrack entries of published
    /// flows and remove its nftables table. systemd runs this as ExecStopPost
    Cleanup {
        /// The exit's state dir (where it saved the sysctl values to restore)
        #[arg(long, default_value = homeport_node::config::EXIT_DEFAULTS.state_dir)]
        state_dir: std::path::PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    let Some(cli) = parse_or_print_completions::<Cli>() else {
        return std::process::ExitCode::SUCCESS;
    };
    let r = match cli.cmd {
        Cmd::Log(args) => {
            homeport_exit::logcmd::print(&args, &mut std::io::stdout().lock(), &|| false)
        }
        Cmd::Report(args) => homeport_exit::report::run(&args, &mut std::io::stdout().lock()),
        Cmd::Cleanup { state_dir } => homeport_exit::nft::cleanup(
            &homeport_exit::nft::Exec::default(),
            std::path::Path::new("/proc/sys"),
            &state_dir,
        )
        .map(|did| {
            for d in did {
                println!("{d}");
            }
        }),
        Cmd::Up { up, exit } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                let cfg = config::resolve(up, exit)?;
                homeport_node::daemon::init_logging(cfg.up.log_format);
                let shutdown = CancellationToken::new();
                homeport_node::cli::cancel_on_signals(shutdown.clone());
                homeport_exit::run(cfg, shutdown).await
            })
        }
    };
    if let Err(e) = &r {
        eprintln!("error: {e:#}");
    }
    homeport_node::daemon::exit_code(&r)
}
