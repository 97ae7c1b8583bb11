//! Every way a connection ends, and the close code the gateway sends for it:
//! one table.
//!
//! Each [`CloseReason`] has one row ([`CloseReason::spec`]): the code of the
//! Close frame the gateway sends (none when the client closed or the socket
//! failed), the frame's reason text, when it is sent, what a client should
//! do about it, and the `reason` label it is counted under in
//! `presenced_connections_closed_total`. The Conn, the outbox and the drain
//! take their close frames from here and the metrics take their labels from
//! here, so a new code is one new row. docs/protocol.md's close-code table
//! is checked against this one by a test below, column by column.
//!
//! Codes follow RFC 6455 section 7.4: 1000-2999 are the protocol's own,
//! 4000-4999 are private to an application. Ours in that range mirror the
//! HTTP status a client would know (4001 ~ 401, 4008 ~ 408, 4029 ~ 429).
//! A leaf: nothing of ours is imported.

use tokio_tungstenite::tungstenite::{
    Utf8Bytes,
    protocol::{CloseFrame, frame::coding::CloseCode},
};

/// What a client should do after a close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconnect {
    /// Reconnect with its usual backoff.
    Backoff,
    /// Reconnect with backoff, and do not let the next `welcome` reset it
    /// if the same happens again soon after: the client itself is the
    /// cause, and would meet the gateway with the same again.
    BackoffKept,
    /// Reconnect at once (within 100 ms, jittered): another node is up.
    AtOnce,
    /// Reconnect only with a fresh token.
    WithFreshToken,
}

impl Reconnect {
    /// The words docs/protocol.md uses for it.
    pub const fn describe(self) -> &'static str {
        match self {
            Reconnect::Backoff => "with backoff",
            Reconnect::BackoffKept => {
                "with backoff, kept growing if it happens again soon after the `welcome`"
            }
            Reconnect::AtOnce => "at once (within 100 ms), to another node",
            Reconnect::WithFreshToken => "only with a fresh token",
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    /// The code of the Close frame the gateway sends; `None` when it sends
    /// none of its own (a client's Close is answered with the client's code).
    pub code: Option<u16>,
    /// The Close frame's reason text.
    pub text: &'static str,
    /// When it is sent, as docs/protocol.md says it.
    pub when: &'static str,
    /// What a client should do.
    pub reconnect: Reconnect,
    /// The `reason` label of `presenced_connections_closed_total`.
    pub label: &'static str,
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed, or the TCP connection ended.
    Client,
    /// Nothing heard within the idle timeout (1001).
    IdleTimeout,
    /// A frame or message over the size limit (1009).
    TooBig,
    /// A WebSocket protocol violation (1002).
    ProtocolError,
    /// A text message that is not UTF-8 (1007).
    InvalidPayload,
    /// The outbox overflowed (4008).
    SlowConsumer,
    /// The socket failed while writing.
    WriteError,
    /// The node drained (1012).
    Shutdown,
    /// Kept sending past the rate limit (4029).
    RateLimited,
    /// The token expired and was not refreshed (4001).
    TokenExpired,
}

impl CloseReason {
    /// Every reason.
    pub const ALL: [CloseReason; 10] = [
        CloseReason::Client,
        CloseReason::IdleTimeout,
        CloseReason::TooBig,
        CloseReason::ProtocolError,
        CloseReason::InvalidPayload,
        CloseReason::SlowConsumer,
        CloseReason::WriteError,
        CloseReason::Shutdown,
        CloseReason::RateLimited,
        CloseReason::TokenExpired,
    ];

    /// This reason's row of the table.
    pub const fn spec(self) -> Spec {
        match self {
            CloseReason::Client => Spec {
                code: None,
                text: "",
                when: "the client closed the connection, or the TCP connection ended",
                reconnect: Reconnect::Backoff,
                label: "client",
            },
            CloseReason::IdleTimeout => Spec {
                code: Some(1001),
                text: "idle timeout",
                when: "nothing (no frame, no pong) arrived within `--idle-timeout-ms` (60 s)",
                reconnect: Reconnect::Backoff,
                label: "idle_timeout",
            },
            CloseReason::ProtocolError => Spec {
                code: Some(1002),
                text: "protocol error",
                when: "the client broke RFC 6455: an unmasked frame, a fragmented or oversized \
                       control frame, reserved bits or opcodes",
                reconnect: Reconnect::Backoff,
                label: "protocol_error",
            },
            CloseReason::InvalidPayload => Spec {
                code: Some(1007),
                text: "invalid UTF-8",
                when: "a text message that is not valid UTF-8",
                reconnect: Reconnect::Backoff,
                label: "invalid_payload",
            },
            CloseReason::TooBig => Spec {
                code: Some(1009),
                text: "message too big",
                when: "a frame or message over `--max-message-bytes` (64 KiB)",
                reconnect: Reconnect::Backoff,
                label: "too_big",
            },
            CloseReason::Shutdown => Spec {
                code: Some(1012),
                text: "node shutting down",
                when: "the node is draining (SIGTERM, SIGINT)",
                reconnect: Reconnect::AtOnce,
                label: "shutdown",
            },
            CloseReason::TokenExpired => Spec {
                code: Some(4001),
                text: "token expired",
                when: "the token's `exp` plus `--jwt-leeway-s` passed and no `refresh` came",
                reconnect: Reconnect::WithFreshToken,
                label: "token_expired",
            },
            CloseReason::SlowConsumer => Spec {
                code: Some(4008),
                text: "slow consumer",
                when: "frames queued for the connection stayed over `--outbox-messages` / \
                       `--outbox-bytes` for more than 1 s, or passed 4× that bound; sent when it \
                       can still be written (a peer that reads nothing just sees the connection \
                       end)",
                reconnect: Reconnect::BackoffKept,
                label: "slow_consumer",
            },
            CloseReason::RateLimited => Spec {
                code: Some(4029),
                text: "rate limited",
                when: "the client kept sending while its messages were refused with \
                       `rate_limited`",
                reconnect: Reconnect::BackoffKept,
                label: "rate_limited",
            },
            CloseReason::WriteError => Spec {
                code: None,
                text: "",
                when: "writing to the socket failed",
                reconnect: Reconnect::Backoff,
                label: "write_error",
            },
        }
    }

    /// The `reason` label of `presenced_connections_closed_total`.
    pub const fn label(self) -> &'static str {
        self.spec().label
    }

    /// The Close frame the gateway sends for this reason, if it sends one.
    pub fn frame(self) -> Option<CloseFrame> {
        let spec = self.spec();
        spec.code.map(|code| CloseFrame {
            code: CloseCode::from(code),
            reason: Utf8Bytes::from_static(spec.text),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const PROTOCOL_MD: &str = include_str!("../docs/protocol.md");
    const OPERATIONS_MD: &str = include_str!("../docs/operations.md");

    /// The cells of each body row of the first table after `heading`.
    fn table_after(doc: &str, heading: &str) -> Vec<Vec<String>> {
        let (_, section) = doc
            .split_once(heading)
            .unwrap_or_else(|| panic!("no {heading:?} section"));
        section
            .lines()
            .skip_while(|line| !line.starts_with('|'))
            .take_while(|line| line.starts_with('|'))
            .skip(2) // the header and the separator
            .map(|line| {
                line.trim_matches('|')
                    .split(" | ")
                    .map(|cell| cell.trim().to_owned())
                    .collect()
            })
            .collect()
    }

    fn unquoted(cell: &str) -> &str {
        cell.trim_matches('`')
    }

    #[test]
    fn protocol_md_lists_exactly_the_codes_sent_with_their_rows() {
        let documented: BTreeMap<u16, Vec<String>> = table_after(PROTOCOL_MD, "## Close codes")
            .into_iter()
            .map(|cells| {
                let code = cells[0]
                    .parse()
                    .unwrap_or_else(|_| panic!("not a close code: {cells:?}"));
                (code, cells)
            })
            .collect();
        let sent: BTreeMap<u16, Spec> = CloseReason::ALL
            .iter()
            .filter_map(|r| Some((r.spec().code?, r.spec())))
            .collect();
        assert_eq!(
            documented.keys().collect::<Vec<_>>(),
            sent.keys().collect::<Vec<_>>(),
            "docs/protocol.md's close codes are the ones the gateway sends"
        );
        for (code, spec) in &sent {
            let cells = &documented[code];
            assert_eq!(
                cells.len(),
                5,
                "{code}: code | reason | sent when | reconnect | metric"
            );
            assert_eq!(unquoted(&cells[1]), spec.text, "{code}: reason text");
            assert_eq!(cells[2], spec.when, "{code}: when it is sent");
            assert_eq!(cells[3], spec.reconnect.describe(), "{code}: reconnect");
            assert_eq!(unquoted(&cells[4]), spec.label, "{code}: metric label");
        }
    }

    #[test]
    fn operations_md_lists_every_close_label() {
        let row = OPERATIONS_MD
            .lines()
            .find(|line| line.starts_with("| `presenced_connections_closed_total{reason}`"))
            .expect("the metric's row in docs/operations.md");
        let labels: Vec<&str> = row
            .trim_matches('|')
            .split(" | ")
            .nth(2)
            .expect("a labels cell")
            .split(", ")
            .map(|label| unquoted(label.trim()))
            .collect();
        let ours: Vec<&str> = CloseReason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels, ours);
    }

    #[test]
    fn every_code_is_one_reason_and_a_valid_close_code() {
        let codes: Vec<u16> = CloseReason::ALL
            .iter()
            .filter_map(|r| r.spec().code)
            .collect();
        let mut distinct = codes.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), codes.len(), "one reason per code");
        for reason in CloseReason::ALL {
            let frame = reason.frame();
            assert_eq!(frame.is_some(), reason.spec().code.is_some());
            if let Some(frame) = frame {
                assert!(frame.code.is_allowed(), "{reason:?}: may be sent");
                assert!(
                    frame.reason.len() <= 123,
                    "{reason:?}: a Close reason fits a control frame"
                );
            }
        }
        let labels: std::collections::HashSet<&str> =
            CloseReason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), CloseReason::ALL.len(), "one label per reason");
    }
}
