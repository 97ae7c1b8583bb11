//! What the registry sends: each queued op's [`Answer`] rendered from the
//! store's outcome, each event serialized once for its audience, and the
//! error frames it answers itself. No actix, no store calls.

use std::sync::Arc;

use serde_json::Value;
use tracing::warn;

use crate::{
    broadcast::{Delivery, SubChange, UserSync},
    ids::{ConnId, RoomName, UserId},
    metrics::{Sent, metrics},
    protocol::{self, Audience, ErrorCode, Event, ReplyBody, UserState},
    store::{Read, UserPresence},
};

/// Renders a reply's body from what its op read.
pub(super) type RenderBody = Box<dyn FnOnce(Read) -> ReplyBody>;

/// What waits for an op's outcome, besides its events.
pub(super) enum Answer {
    /// Nobody: a bare write.
    None,
    /// A request's reply, rendered from the op's read.
    Reply {
        /// The connection that asked.
        conn: ConnId,
        /// Its `ref`.
        reference: Option<Value>,
        /// What the request changes once accepted.
        change: SubChange,
        /// The reply's body from the read.
        body: RenderBody,
    },
    /// The presence of these watched users, as a `sync` to their watchers.
    SyncUsers(Vec<UserId>),
    /// This room's members, as a `sync` to its members.
    SyncRoom(RoomName),
    /// Answered without the store, in order with the rest.
    Ready(Delivery),
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answer::None => f.write_str("None"),
            Answer::Reply { conn, change, .. } => f
                .debug_struct("Reply")
                .field("conn", conn)
                .field("change", change)
                .finish_non_exhaustive(),
            Answer::SyncUsers(users) => f.debug_tuple("SyncUsers").field(users).finish(),
            Answer::SyncRoom(room) => f.debug_tuple("SyncRoom").field(room).finish(),
            Answer::Ready(delivery) => f.debug_tuple("Ready").field(delivery).finish(),
        }
    }
}

impl Answer {
    /// A reply to `conn`'s request, its body rendered by `body`.
    pub(super) fn reply(
        conn: ConnId,
        reference: Option<Value>,
        change: SubChange,
        body: impl FnOnce(Read) -> ReplyBody + 'static,
    ) -> Self {
        Answer::Reply {
            conn,
            reference,
            change,
            body: Box::new(body),
        }
    }

    /// The connection this answers, if any.
    pub(super) fn conn(&self) -> Option<&ConnId> {
        match self {
            Answer::Reply { conn, .. } | Answer::Ready(Delivery::Reply { conn, .. }) => Some(conn),
            _ => None,
        }
    }

    /// Whether something waits for this op's outcome.
    pub(super) fn waits(&self) -> bool {
        !matches!(self, Answer::None)
    }

    /// The delivery that answers, from what the op read.
    pub(super) fn render(self, read: Read) -> Option<Delivery> {
        Some(match (self, read) {
            (Answer::None, _) => return None,
            (Answer::Ready(delivery), _) => delivery,
            (
                Answer::Reply {
                    conn,
                    reference,
                    change,
                    body,
                },
                read,
            ) => Delivery::Reply {
                conn,
                frame: protocol::reply_frame(reference.as_ref(), &body(read)),
                change,
                accepted: true,
            },
            (Answer::SyncUsers(users), Read::Presence(presence)) => {
                let states = users
                    .iter()
                    .cloned()
                    .zip(states(&users, &presence))
                    .collect();
                Delivery::SyncUsers(Arc::new(UserSync(states)))
            }
            (Answer::SyncRoom(room), Read::Members(members)) => Delivery::Broadcast {
                frame: protocol::sync_room_frame(&room, &members),
                audience: Audience::Room(room),
                kind: Sent::Sync,
            },
            (answer, read) => {
                warn!(?answer, ?read, "store outcome does not match its op");
                return None;
            }
        })
    }
}

/// An event serialized once for its audience.
pub(super) fn event(event: &Event) -> Delivery {
    Delivery::Broadcast {
        audience: event.audience(),
        frame: event.encode(),
        kind: Sent::Event(event.kind()),
    }
}

/// An error answering `conn`'s request (counted); the request's change is
/// dropped.
pub(super) fn refusal(
    conn: ConnId,
    reference: Option<&Value>,
    change: SubChange,
    code: ErrorCode,
    message: &str,
) -> Delivery {
    metrics().errors_sent.get(code).inc();
    Delivery::Reply {
        conn,
        frame: protocol::error_frame(reference, code, message),
        change,
        accepted: false,
    }
}

/// Each requested user's state, in request order.
pub(super) fn states(users: &[UserId], presence: &[UserPresence]) -> Vec<UserState> {
    users
        .iter()
        .zip(presence)
        .map(|(u, p)| UserState {
            user: u.clone(),
            online: p.online,
            seq: p.seq,
        })
        .collect()
}
