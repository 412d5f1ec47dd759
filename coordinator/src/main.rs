use homeport_coordinator::cli::{Cli, Cmd};
use homeport_coordinator::{cli, config};
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// glibc malloc arenas. By default glibc gives busy threads up to 8 per core, and memory freed
/// in one arena is not reused by another; with thousands of map streams served by every worker
/// thread that keeps more resident than the streams use (3,000 streams: 161 MB before this and
/// the batched last_seen writes, 131 MB after). Two are enough for the coordinator's few threads.
const MALLOC_ARENAS: i32 = 2;

fn main() -> ExitCode {
    // SAFETY: mallopt only tunes the allocator; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
    }
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(async_main()),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn async_main() -> ExitCode {
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
