//! podckptd: the per-node daemon. Parses configuration and runs the library.

use clap::Parser;
use podckpt::config::DaemonConfig;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = DaemonConfig::parse();
    let config = match config.validate() {
        Ok(c) => c,
        Err(err) => {
            eprintln!("podckptd: invalid configuration: {err}");
            return std::process::ExitCode::from(2);
        }
    };
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
