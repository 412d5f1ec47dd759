use homeport_host::cli::parse_or_print_completions;
use homeport_node::cli::{Cli, Cmd, cancel_on_signals};
use homeport_node::config::NODE_DEFAULTS;
use tokio_util::sync::CancellationToken;

fn main() -> std::process::ExitCode {
    let Some(cli) = parse_or_print_completions::<Cli>() else {
        return std::process::ExitCode::SUCCESS;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let r = rt.block_on(async move {
        match cli.cmd {
            Cmd::Up(args) => {
                let cfg = args.resolve(&NODE_DEFAULTS, &[])?;
                homeport_node::daemon::init_logging(cfg.log_format);
                let shutdown = CancellationToken::new();
                cancel_on_signals(shutdown.clone());
                homeport_node::daemon::run(cfg, shutdown, Default::default()).await
            }
            cmd => homeport_node::cli::run(cmd).await,
        }
    });
    if let Err(e) = &r {
        eprintln!("error: {e:#}");
    }
    homeport_node::daemon::exit_code(&r)
}
