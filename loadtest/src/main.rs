//! `presenced-load`: parse the command line, run it, exit; nothing else.

use std::{io::IsTerminal, process::ExitCode};

use clap::Parser;
use presenced_load::{cli, options::Cli};

#[tokio::main]
async fn main() -> ExitCode {
    if cli::execute(Cli::parse(), std::io::stderr().is_terminal()).await {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
