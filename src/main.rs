//! Thin: load `.env`, parse the command line, run it, map errors to exit codes.
use clap::Parser;
use coordinator::cli::{self, env_file, Cli, CliError};

fn main() -> std::process::ExitCode {
    coordinator::db::prepare_process();
    // `.env` from the working directory only (or `--env-file`), loaded before parsing
    // because clap reads the environment; it never overrides variables that are set.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let requested = env_file::requested(&args);
    match env_file::load(requested.as_deref()) {
        Ok(Some(path)) => eprintln!("coordinator: read settings from {}", path.display()),
        Ok(None) => {}
        Err(e) => {
            eprintln!("coordinator: {e}");
            return std::process::ExitCode::from(2);
        }
    }
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            eprintln!("coordinator: {}", cli::describe_parse_error(&e));
            return std::process::ExitCode::from(2);
        }
    };
    if cli.env_file != requested {
        eprintln!(
            "coordinator: {} must be given as `{} FILE` before any `--`",
            env_file::FLAG,
            env_file::FLAG
        );
        return std::process::ExitCode::from(2);
    }
    coordinator::telemetry::logger(false).init();
    match cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("coordinator: {e}");
            match e {
                CliError::Config(_) => std::process::ExitCode::from(2),
                CliError::Failed(_) => std::process::ExitCode::FAILURE,
            }
        }
    }
}
