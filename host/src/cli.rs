//! The command line every binary parses the same way.

/// Parses the command line like `T::parse()`, with one more, hidden subcommand: `completions SHELL`
/// prints the completion script of `T` for bash, zsh, fish, elvish or powershell (deploy/package.sh
/// puts them into the Debian packages). Returns `None` when it printed one.
pub fn parse_or_print_completions<T: clap::Parser>() -> Option<T> {
    use clap::{Arg, Command, value_parser};
    use clap_complete::Shell;
    let matches = T::command()
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
        let mut cmd = T::command();
        let name = cmd.get_name().to_string();
        clap_complete::generate(shell, &mut cmd, name, &mut std::io::stdout());
        return None;
    }
    Some(T::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut T::command()).exit()))
}
