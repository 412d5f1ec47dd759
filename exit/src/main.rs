use clap::{Parser, Subcommand};
use homeport_exit::logcmd::LogArgs;
use homeport_exit::{ExitArgs, config};
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
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Log(args) => {
            homeport_exit::logcmd::print(&args, &mut std::io::stdout().lock(), &|| false)
        }
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
