//! `presenced-load`: parse the command line, run, print; nothing else.

use std::{io::IsTerminal, process::ExitCode};

use clap::Parser;
use presenced_load::options::Cli;

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let Some((scenario, opts)) = Cli::parse().scenario.split() else {
        // `worker`: a shard of a `--procs` run, started by the coordinator.
        return match presenced_load::worker::serve_from_env().await {
            Some(result) => result.map(|()| ExitCode::SUCCESS),
            None => anyhow::bail!(
                "`worker` is started by presenced-load --procs, with {} set",
                presenced_load::worker::WORKER_ENV
            ),
        };
    };
    let report = presenced_load::run(scenario, &opts, std::io::stderr().is_terminal()).await?;
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(if report.correct() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
