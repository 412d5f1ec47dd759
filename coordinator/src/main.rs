use homeport_coordinator::cli::{Cli, Cmd};
use homeport_coordinator::{cli, config};
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let Some(cli) = parse_or_print_completions() else {
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

/// Parses the command line like `Cli::parse()`, with one more, hidden subcommand: `completions SHELL`
/// prints the completion script for bash, zsh, fish, elvish or powershell (deploy/package.sh puts them
/// into the Debian package). Returns `None` when it printed one. (The node's binaries have the same in
/// `homeport_node::cli`; the coordinator does not depend on the node crate.)
fn parse_or_print_completions() -> Option<Cli> {
    use clap::{Arg, Command, CommandFactory, FromArgMatches, value_parser};
    use clap_complete::Shell;
    let matches = Cli::command()
        .subcommand(
            Command::new("completions")
                .hide(true)
                .about("Print the shell completion script")
                .arg(
                    Arg::new("shell")
                        .required(true)
                        .value_parser(value_parser!(Shell)),
                ),
        )
        .get_matches();
    if let Some(("completions", m)) = matches.subcommand() {
        let shell = *m.get_one::<Shell>("shell").expect("required");
        clap_complete::generate(
            shell,
            &mut Cli::command(),
            "homeport-coordinator",
            &mut std::io::stdout(),
        );
        return None;
    }
    Some(Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut Cli::command()).exit()))
}
