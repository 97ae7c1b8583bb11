//! The command line, as the binary runs it: a scenario ends with its report
//! (a table, or JSON with `--json`) or, when it could not finish, with one
//! failure line in the same place ([`Failure::report_line`]); a `worker`
//! runs its shard. Either way the outcome is an exit status, never a panic.
//!
//! It lives in the library so a test can run exactly what the binary runs.

use std::io::Write;

use crate::{failure::Failure, options::Cli, worker};

/// Runs `cli`, printing on stdout (progress on stderr when `progress`);
/// returns whether the process should exit with success: a correct report,
/// or a worker whose shard finished.
pub async fn execute(cli: Cli, progress: bool) -> bool {
    let Some((scenario, opts)) = cli.scenario.split() else {
        // `worker`: a shard of a `--procs` run, started by the coordinator,
        // which reads its failure on stdout; this line is for people.
        return match worker::serve_from_env().await {
            Some(Ok(())) => true,
            Some(Err(e)) => {
                eprintln!("presenced-load worker: {e}");
                false
            }
            None => {
                eprintln!(
                    "presenced-load: `worker` is started by presenced-load --procs, with {} set",
                    worker::WORKER_ENV
                );
                false
            }
        };
    };
    let (text, ok) = match crate::run(scenario, &opts, progress).await {
        Ok(report) => {
            let text = if opts.json {
                // A report is plain numbers and strings: this does not
                // fail, and if it ever did the line would say so.
                serde_json::to_string_pretty(&report).map_or_else(
                    |e| Failure::Options(format!("the report: {e}")).report_line(scenario, true),
                    |json| json + "\n",
                )
            } else {
                report.table()
            };
            (text, report.correct())
        }
        Err(failure) => (failure.report_line(scenario, opts.json), false),
    };
    let mut out = std::io::stdout().lock();
    // Nothing more to say if stdout is gone; the status still tells.
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
    ok
}
