//! podckptd: the per-node daemon. Parses configuration and runs the library.

use podckpt::config::{DaemonConfig, LoadError};

fn main() -> std::process::ExitCode {
    // A checkpoint's guardian is podckptd re-executed: it needs neither the
    // configuration nor an async runtime (see podckpt::pod::guardian).
    let args: Vec<_> = std::env::args_os().collect();
    if podckpt::pod::guardian::is_guardian_invocation(&args) {
        return podckpt::pod::guardian::run();
    }
    daemon()
}

#[tokio::main]
async fn daemon() -> std::process::ExitCode {
    // Flags, environment and the configuration file. clap's own errors
    // exit 2 (and --help, --version 0) as clap does; the file's too.
    let config = match DaemonConfig::load() {
        Ok(c) => c,
        Err(LoadError::Args(err)) => err.exit(),
        Err(LoadError::File(err)) => {
            eprintln!("podckptd: {err}");
            return std::process::ExitCode::from(2);
        }
    };
    let config = match config.validate() {
        Ok(c) => c,
        Err(err) => {
            eprintln!("podckptd: invalid configuration: {err}");
            return std::process::ExitCode::from(2);
        }
    };
    if config.config.check_config {
        return check_config(&config);
    }
    if let Err(err) = config.prepare_dirs() {
        eprintln!("podckptd: {err}");
        return std::process::ExitCode::from(2);
    }
    podckpt::node::memory::return_large_buffers();
    podckpt::telemetry::init(config.config.log_format, &config.config.log);
    match podckpt::daemon::run(config, podckpt::daemon::shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(%err, "podckptd failed");
            eprintln!("podckptd: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `--check-config`: what podckptd would use, or why it would not start.
fn check_config(config: &podckpt::config::Validated) -> std::process::ExitCode {
    let file = config.config.config_file_in_use();
    match config.check(file.as_deref()) {
        Ok(lines) => {
            for line in lines {
                println!("{line}");
            }
            println!("podckptd: configuration OK");
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("podckptd: {err}");
            std::process::ExitCode::from(2)
        }
    }
}
