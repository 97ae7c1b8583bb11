//! The `/v1` JSON API: presence questions for backends without a WebSocket.
//!
//! Reads go straight to the store from the worker that got the request
//! (no registry round trip: nothing here changes presence). Each endpoint
//! is one store round trip. With `--api-key` every call needs
//! `Authorization: Bearer KEY`; without one, `/v1` answers only when the
//! gateway listens on loopback. docs/http-api.md is the reference.

use std::collections::BTreeMap;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Incoming};
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{HttpError, WorkerState, json};
use crate::{
    ids::{Meta, RoomName, UserId},
    metrics::metrics,
    store::{Read, StoreError, StoreOp},
};

/// Default page size when `?limit=` is absent.
pub(super) const DEFAULT_LIMIT: usize = 100;

type Body = Full<Bytes>;

impl From<StoreError> for HttpError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::BadCursor => HttpError::BadRequest("invalid cursor".into()),
            other => {
                warn!(error = %other, "store read for the HTTP API failed");
                HttpError::Unavailable
            }
        }
    }
}

/// Serves one `/v1` request.
pub(super) async fn serve(
    req: Request<Incoming>,
    state: &WorkerState,
) -> Result<Response<Body>, HttpError> {
    authorize(&req, state)?;
    let path = req.uri().path().to_owned();
    match (req.method(), path.as_str()) {
        (&Method::POST, "/v1/presence") => presence(req, state).await,
        (_, "/v1/presence") => Err(HttpError::MethodNotAllowed),
        (&Method::GET, "/v1/users") => users(&req, state).await,
        (&Method::GET, "/v1/stats") => stats(state).await,
        (_, "/v1/users" | "/v1/stats") => Err(HttpError::MethodNotAllowed),
        (method, p) if p.starts_with("/v1/users/") => {
            if method != Method::GET {
                return Err(HttpError::MethodNotAllowed);
            }
            let id = segment(&p["/v1/users/".len()..]).ok_or(HttpError::InvalidUser)?;
            let user = UserId::parse(&id).map_err(|_| HttpError::InvalidUser)?;
            one_user(user, state).await
        }
        (method, p) => match p.strip_prefix("/v1/rooms/") {
            Some(_) if method != Method::GET => Err(HttpError::MethodNotAllowed),
            Some(room) => {
                let room = segment(room).ok_or(HttpError::InvalidRoom)?;
                let room = RoomName::parse(&room).map_err(|_| HttpError::InvalidRoom)?;
                room_members(&req, room, state).await
            }
            None => Err(HttpError::NotFound),
        },
    }
}

/// A percent-encoded path segment as text.
fn segment(raw: &str) -> Option<std::borrow::Cow<'_, str>> {
    percent_encoding::percent_decode_str(raw).decode_utf8().ok()
}

/// Equal-length byte comparison whose time does not depend on where the
/// first difference is.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorize(req: &Request<Incoming>, state: &WorkerState) -> Result<(), HttpError> {
    if !state.config.api_open() {
        return Err(HttpError::ApiKeyRequired);
    }
    let Some(key) = &state.config.api_key else {
        return Ok(());
    };
    let given = super::bearer(req.headers()).unwrap_or("");
    if same_secret(given.as_bytes(), key.expose().as_bytes()) {
        Ok(())
    } else {
        Err(HttpError::Unauthorized)
    }
}

fn ok_json<T: Serialize>(body: &T) -> Response<Body> {
    // unwrap: these bodies hold only strings, numbers, bools and maps.
    json(StatusCode::OK, serde_json::to_string(body).unwrap())
}

/// `?limit=` and `?cursor=`.
fn page_params(req: &Request<Incoming>, max: usize) -> Result<(usize, Option<String>), HttpError> {
    let mut limit = DEFAULT_LIMIT.min(max);
    let mut cursor = None;
    for (k, v) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        match &*k {
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=max).contains(n))
                    .ok_or_else(|| HttpError::BadRequest(format!("limit must be 1 to {max}")))?;
            }
            "cursor" if !v.is_empty() => cursor = Some(v.into_owned()),
            _ => {}
        }
    }
    Ok((limit, cursor))
}

/// `POST /v1/presence` `{"users":[...]}` → `{"online":{"id":bool}}`.
async fn presence(
    req: Request<Incoming>,
    state: &WorkerState,
) -> Result<Response<Body>, HttpError> {
    #[derive(Deserialize)]
    struct Ask {
        users: Vec<String>,
    }
    #[derive(Serialize)]
    struct Answer<'a> {
        online: BTreeMap<&'a str, bool>,
    }
    let max = state.config.max_ids;
    // Room for max ids of the longest length, quoted and comma-separated.
    let limit = max * (crate::ids::MAX_USER_LEN + 3) + 1024;
    let body = Limited::new(req.into_body(), limit)
        .collect()
        .await
        .map_err(|_| HttpError::LimitExceeded(format!("body over {limit} bytes")))?
        .to_bytes();
    let ask: Ask = serde_json::from_slice(&body).map_err(|e| {
        HttpError::BadRequest(format!("body must be {{\"users\":[\"id\",...]}}: {e}"))
    })?;
    let mut users: Vec<UserId> = ask
        .users
        .iter()
        .map(|u| UserId::parse(u).map_err(|_| HttpError::InvalidUser))
        .collect::<Result<_, _>>()?;
    users.sort();
    users.dedup();
    if users.len() > max {
        return Err(HttpError::LimitExceeded(format!(
            "at most {max} distinct users per request, got {}",
            users.len()
        )));
    }
    let outcome = state
        .store
        .apply(vec![StoreOp::Presence(users.clone())])
        .await?;
    let Some(Read::Presence(states)) = outcome.outcomes.into_iter().next().map(|o| o.read) else {
        return Err(HttpError::Unavailable);
    };
    let online = users
        .iter()
        .zip(&states)
        .map(|(u, p)| (u.as_str(), p.online))
        .collect();
    Ok(ok_json(&Answer { online }))
}

/// A page of user ids and where the next one starts.
#[derive(Serialize)]
struct UsersPage {
    users: Vec<UserId>,
    next_cursor: Option<String>,
}

/// `GET /v1/rooms/{room}?limit=&cursor=`.
async fn room_members(
    req: &Request<Incoming>,
    room: RoomName,
    state: &WorkerState,
) -> Result<Response<Body>, HttpError> {
    #[derive(Serialize)]
    struct Answer {
        room: RoomName,
        count: u64,
        #[serde(flatten)]
        page: UsersPage,
        members: Vec<crate::protocol::Member>,
    }
    let (limit, cursor) = page_params(req, state.config.max_page)?;
    let (page, count) = state.store.room_page(room.clone(), cursor, limit).await?;
    Ok(ok_json(&Answer {
        room,
        count,
        page: UsersPage {
            users: page.users,
            next_cursor: page.next,
        },
        members: page.members,
    }))
}

/// `GET /v1/users?limit=&cursor=`: the users online.
async fn users(req: &Request<Incoming>, state: &WorkerState) -> Result<Response<Body>, HttpError> {
    let (limit, cursor) = page_params(req, state.config.max_page)?;
    let page = state.store.users_page(cursor, limit).await?;
    Ok(ok_json(&UsersPage {
        users: page.users,
        next_cursor: page.next,
    }))
}

/// `GET /v1/users/{id}`: presence, live connections, metadata, last seen.
/// A user never seen is offline with nothing else known, not an error.
async fn one_user(user: UserId, state: &WorkerState) -> Result<Response<Body>, HttpError> {
    #[derive(Serialize)]
    struct Connection<'a> {
        conn: &'a str,
        node: &'a str,
        since_ms: u64,
        meta: &'a Option<Meta>,
    }
    #[derive(Serialize)]
    struct Answer<'a> {
        user: &'a str,
        online: bool,
        /// Only while in the offline grace (online, no live connection).
        #[serde(skip_serializing_if = "Option::is_none")]
        grace_until_ms: Option<u64>,
        connections: Vec<Connection<'a>>,
        last_seen_ms: Option<u64>,
        meta: &'a Option<Meta>,
    }
    let record = state.store.user(user.clone()).await?;
    Ok(ok_json(&Answer {
        user: user.as_str(),
        online: record.online,
        grace_until_ms: record.grace_until_ms,
        connections: record
            .connections
            .iter()
            .map(|c| Connection {
                conn: &c.conn,
                node: &c.node,
                since_ms: c.since_ms,
                meta: &c.meta,
            })
            .collect(),
        last_seen_ms: record.last_seen_ms,
        meta: &record.meta,
    }))
}

/// `GET /v1/stats`.
async fn stats(state: &WorkerState) -> Result<Response<Body>, HttpError> {
    #[derive(Serialize)]
    struct Answer {
        users_online: u64,
        connections: u64,
        nodes_alive: u64,
        node: String,
        node_connections: i64,
    }
    let stats = state.store.stats().await?;
    Ok(ok_json(&Answer {
        users_online: stats.users_online,
        connections: stats.connections,
        nodes_alive: stats.nodes_alive,
        node: state.conn.node.to_string(),
        node_connections: metrics().connections_open.get(),
    }))
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"key", b"key"));
        assert!(!same_secret(b"key", b"kez"));
        assert!(!same_secret(b"key", b"key2"));
        assert!(!same_secret(b"", b"k"));
    }
}
