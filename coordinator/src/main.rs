use homeport_coordinator::cli::{Cli, Cmd};
use homeport_coordinator::{cli, config};
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let Some(cli) = homeport_host::cli::parse_or_print_completions::<Cli>() else {
        return ExitCode::SUCCESS;
    };
    let result = match cli.cmd {
        Cmd::Serve(args) => match config::resolve(&args) {
            Ok(cfg) => {
                homeport_coordinator::init_logging(cfg.log_format);
                let shutdown = CancellationToken::new();
                homeport_coordinator::cancel_on_signals(shutdown.clone());
                homeport_coordinator::run(cfg, shutdown).await
            }
            Err(e) => Err(e),
        },
        other => cli::admin(other).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
