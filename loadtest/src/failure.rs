//! Why a run could not finish: one [`Failure`] naming what failed (which
//! observer or shard), in which [`Step`] of the run, and why (the
//! gateway's close code and reason when it closed the socket), so a run
//! that cannot go on ends with one line saying so instead of a panic.
//!
//! A failure is not an incorrect run: a run that finishes reports what it
//! measured and checked ([`crate::Report`]), however wrong; a failure means
//! the checks could not be made. Both exit with status 1.

use serde_json::json;

use crate::{observer::ObserverError, options::Scenario, shard::ShardFailure, step::Step};

/// What ended a run before its report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The options cannot run (checked before anything connects).
    #[error("{0}")]
    Options(String),
    /// Observer number `index` failed.
    #[error("observer {index} {error} during {step}{}", error.hint())]
    Observer {
        /// The observer's number (`--observers`).
        index: usize,
        /// The step the run was in.
        step: Step,
        /// What happened.
        error: ObserverError,
    },
    /// Shard number `shard` (its worker process with `--procs`) failed.
    #[error("shard {shard} {error} during {step}")]
    Shard {
        /// The shard's number.
        shard: usize,
        /// The step the run was in.
        step: Step,
        /// What happened.
        error: ShardFailure,
    },
    /// The cluster's Redis (`--redis`) could not be read.
    #[error("--redis {url} could not be read during {step}: {reason}")]
    Redis {
        /// `--redis`.
        url: String,
        /// The step the run was in.
        step: Step,
        /// What went wrong.
        reason: String,
    },
}

impl Failure {
    /// The one line a failed run prints where its report would go: a
    /// sentence, or with `json` a one-line JSON object
    /// (`{"scenario", "result": "FAILED", "failure"}`), newline included.
    pub fn report_line(&self, scenario: Scenario, json: bool) -> String {
        if json {
            let line =
                json!({"scenario": scenario, "result": "FAILED", "failure": self.to_string()});
            format!("{line}\n")
        } else {
            format!("presenced-load {}: FAILED: {self}\n", scenario.name())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::SocketEnd;

    fn slow_consumer() -> Failure {
        Failure::Observer {
            index: 0,
            step: Step::Actions(Scenario::Storm),
            error: ObserverError::Closed {
                target: "ws://127.0.0.1:8081/ws".into(),
                end: SocketEnd::Closed {
                    code: 4008,
                    reason: "slow consumer".into(),
                },
            },
        }
    }

    #[test]
    fn an_observer_closed_by_the_gateway_is_one_line_with_code_reason_and_step() {
        let line = slow_consumer().report_line(Scenario::Storm, false);
        assert!(
            line.starts_with(
                "presenced-load storm: FAILED: observer 0 was closed by ws://127.0.0.1:8081/ws \
                 with 4008 slow consumer during the storm; "
            ),
            "{line}"
        );
        assert!(line.contains("--outbox-messages"), "{line}");
        assert_eq!(line.lines().count(), 1);
    }

    #[test]
    fn the_json_failure_line_is_one_object() {
        let line = slow_consumer().report_line(Scenario::Storm, true);
        assert_eq!(line.lines().count(), 1);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["result"], "FAILED");
        assert_eq!(v["scenario"], "storm");
        assert!(
            v["failure"]
                .as_str()
                .unwrap()
                .starts_with("observer 0 was closed")
        );
    }

    #[test]
    fn a_refused_watch_names_the_flag_to_raise() {
        let f = Failure::Observer {
            index: 1,
            step: Step::Setup,
            error: ObserverError::Refused {
                target: "ws://h:1/ws".into(),
                request: "watch".into(),
                code: "limit_exceeded".into(),
            },
        };
        assert_eq!(
            f.to_string(),
            "observer 1 was refused \"watch\" by ws://h:1/ws with limit_exceeded during the setup; \
             start the gateways with --max-watch at least the run's --users"
        );
    }
}
