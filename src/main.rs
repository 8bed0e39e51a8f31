use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let (mut args, given) = kproxy::cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    // After the logger: the file's ignored fields are logged.
    if let Err(err) = kproxy::config::apply_config_file(&mut args, &given) {
        tracing::error!("{err}");
        return std::process::ExitCode::FAILURE;
    }
    match kproxy::run::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
