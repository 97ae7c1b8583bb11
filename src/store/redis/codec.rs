//! What crosses between this process and the Lua scripts, in one place:
//! the op codes and their arguments going in, the outcomes and events
//! coming back, all MessagePack (the scripts use Redis's `cmsgpack`).
//!
//! MessagePack carries any string unchanged, so metadata (JSON text that
//! may hold spaces, quotes, newlines or any Unicode) travels as it is and
//! nothing is split on a separator. Events arrive as maps with the wire
//! field names and are read by serde straight into [`Event`], the one
//! definition of each event; the Lua side builds them in common.lua.
//! Replies are typed ([`Packed`] implements `FromRedisValue`), so no code
//! walks `redis::Value` trees.

use serde::{Deserialize, Serialize, Serializer, de::DeserializeOwned};

use crate::{
    ids::{Meta, UserId},
    protocol::{Ends, Event, Member},
    store::{NodeState, Outcome, Read, ReadKind, StoreError, StoreOp, Tally, UserPresence},
};

/// A reply that is one MessagePack value, decoded into `T`.
#[derive(Debug)]
pub(super) struct Packed<T>(pub(super) T);

impl<T: DeserializeOwned> redis::FromRedisValue for Packed<T> {
    fn from_redis_value(v: redis::Value) -> Result<Self, redis::ParsingError> {
        let bytes: Vec<u8> = redis::FromRedisValue::from_redis_value(v)?;
        unpack(&bytes)
            .map(Packed)
            .map_err(|e| redis::ParsingError::from(e.to_string()))
    }
}

/// A user id in a reply (a hash field), checked as any id from outside.
impl redis::FromRedisValue for UserId {
    fn from_redis_value(v: redis::Value) -> Result<Self, redis::ParsingError> {
        let text: String = redis::FromRedisValue::from_redis_value(v)?;
        UserId::parse(&text)
            .map_err(|_| redis::ParsingError::from(format!("not a user id: {text:?}")))
    }
}

/// Decodes one MessagePack value.
pub(super) fn unpack<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    rmp_serde::from_slice(bytes).map_err(|e| StoreError::Protocol(format!("msgpack: {e}")))
}

/// A batch's ops as batch.lua reads them (its header lists the codes).
pub(super) fn encode_ops(ops: &[StoreOp]) -> Vec<u8> {
    // unwrap: these are arrays of strings, integers and nils, which
    // MessagePack always encodes.
    rmp_serde::to_vec(&Ops(ops)).unwrap()
}

struct Ops<'a>(&'a [StoreOp]);

impl Serialize for Ops<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(Op))
    }
}

/// One op: `[code, args...]`.
struct Op<'a>(&'a StoreOp);

fn graced(ends: Ends) -> bool {
    ends == Ends::AfterGrace
}

fn meta(meta: &Option<Meta>) -> Option<&str> {
    meta.as_ref().map(Meta::as_str)
}

impl Serialize for Op<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            StoreOp::Connect(user) => ("C", user).serialize(s),
            StoreOp::Disconnect(user, reason, ends) => {
                ("D", user, reason, graced(*ends)).serialize(s)
            }
            StoreOp::Join(room, user) => ("J", room, user).serialize(s),
            StoreOp::Leave(room, user, reason, ends) => {
                ("L", room, user, reason, graced(*ends)).serialize(s)
            }
            StoreOp::Members(room) => ("M", room).serialize(s),
            StoreOp::Update(room, user, conn, state) => {
                ("U", room, user, conn, state.as_str()).serialize(s)
            }
            StoreOp::Presence(users) => ("P", users).serialize(s),
            StoreOp::Attach(user, conn, m) => ("A", user, conn, meta(m)).serialize(s),
            StoreOp::Detach(user, conn) => ("X", user, conn).serialize(s),
            StoreOp::Reassert(state) => reassert(state).serialize(s),
            StoreOp::Expire => ("E",).serialize(s),
        }
    }
}

type ReassertArgs<'a> = (
    &'static str,
    Vec<(&'a UserId, &'a crate::ids::ConnId, Option<&'a str>)>,
    &'a [(crate::ids::RoomName, UserId, u64)],
    crate::protocol::Reason,
);

fn reassert(state: &NodeState) -> ReassertArgs<'_> {
    (
        "R",
        state
            .conns
            .iter()
            .map(|(user, conn, m)| (user, conn, meta(m)))
            .collect(),
        &state.rooms,
        state.gone,
    )
}

/// What batch.lua returns: the feed number before its first event, and
/// one outcome per op.
pub(super) type BatchReply = (u64, Vec<OutcomeWire>);

/// One op's outcome as batch.lua writes it (keys `e`, `m`, `p`).
#[derive(Debug, Deserialize)]
pub(super) struct OutcomeWire {
    #[serde(default)]
    e: Vec<Event>,
    #[serde(default)]
    t: Tally,
    m: Option<Vec<MemberWire>>,
    p: Option<Vec<UserPresenceWire>>,
}

#[derive(Debug, Deserialize)]
struct MemberWire {
    user: UserId,
    meta: Option<String>,
    state: Option<String>,
}

#[derive(Debug, Deserialize)]
struct UserPresenceWire {
    online: bool,
    seq: u64,
}

impl OutcomeWire {
    /// The outcome of `op`; a read the op does not make is a protocol
    /// error (the script and this file disagree).
    pub(super) fn into_outcome(self, op: &StoreOp) -> Result<Outcome, StoreError> {
        let read = match (op.reads(), self.m, self.p) {
            (ReadKind::Members, Some(members), None) => {
                let mut members: Vec<Member> = members
                    .into_iter()
                    .map(|m| Member {
                        user: m.user,
                        meta: m.meta.and_then(Meta::from_stored),
                        state: m.state.and_then(Meta::from_stored),
                    })
                    .collect();
                members.sort();
                Read::Members(members)
            }
            (ReadKind::Presence, None, Some(presence)) => Read::Presence(
                presence
                    .into_iter()
                    .map(|p| UserPresence {
                        online: p.online,
                        seq: p.seq,
                    })
                    .collect(),
            ),
            (ReadKind::Nothing, None, None) => Read::Nothing,
            (_, m, p) => {
                return Err(StoreError::Protocol(format!(
                    "outcome of {op:?} read members: {}, presence: {}",
                    m.is_some(),
                    p.is_some()
                )));
            }
        };
        if let (StoreOp::Presence(users), Read::Presence(presence)) = (op, &read)
            && users.len() != presence.len()
        {
            return Err(StoreError::Protocol(format!(
                "{} presence entries for {} users",
                presence.len(),
                users.len()
            )));
        }
        Ok(Outcome {
            events: self.e,
            read,
            tally: self.t,
        })
    }
}

/// One message of the event channel: `[number, event]`.
pub(super) fn decode_published(payload: &[u8]) -> Result<(u64, Event), StoreError> {
    unpack(payload)
}

/// A connection record in `user_conns` (common.lua's `conn_record`).
#[derive(Debug, Deserialize)]
pub(super) struct ConnRecordWire {
    pub(super) node: String,
    pub(super) since_ms: u64,
    pub(super) meta: Option<String>,
}

/// What reap.lua returns.
#[derive(Debug, Deserialize)]
pub(super) struct ReapReply {
    pub(super) events: u64,
    pub(super) nodes: Vec<String>,
    #[serde(default)]
    pub(super) t: Tally,
}
