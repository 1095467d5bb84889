//! Thin: parse the command line, run it, map errors to exit codes.
use clap::Parser;
use coordinator::cli::{self, Cli, CliError};

fn main() -> std::process::ExitCode {
    // `.env` never overrides variables that are already set.
    let _ = dotenvy::dotenv();
    let cli = match Cli::try_parse() {
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
