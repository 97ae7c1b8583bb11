//! The HTTP side of the one port: routing, the `/ws` upgrade, JSON errors.
//!
//! hyper 1.x serves each accepted socket on the worker it was handed to.
//! `GET /ws` is checked (upgrade headers, origin, token, connection
//! bounds) before anything is upgraded; a refused handshake gets a JSON
//! error with its status and no WebSocket, and is counted and logged (with
//! any `token` in the URL redacted, and at most a few lines a second per
//! code: [`crate::logs`]). A client gets `--handshake-timeout-ms` to send
//! its request head and `--max-request-head-bytes` for it ([`head`]), so a
//! stalled or endless head costs a socket and that many bytes for that
//! long, and nothing else. An accepted one is answered `101`, then the
//! socket is taken back from hyper, wrapped by tokio-tungstenite and a
//! [`Conn`] is started on the same worker. No extension is ever negotiated
//! (permessage-deflate stays off).
//! `GET /client.js` and, with `--dev`, the demo page at `GET /` are static
//! files built into the binary ([`assets`]).

mod api;
mod assets;
mod error;
mod head;

use std::{convert::Infallible, rc::Rc, sync::Arc, time::Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderMap, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{handshake::derive_accept_key, protocol::Role, protocol::WebSocketConfig},
};
use tracing::{debug, error, info};

pub use self::error::HttpError;
use self::head::HeadLimit;
use crate::{
    auth::{Identity, TokenError, redact_token},
    broadcast::SharedHub,
    config::Config,
    conn::{Conn, ConnSettings},
    health::Health,
    ids::{Meta, MetaError, UserId},
    logs::LogLimiter,
    metrics::metrics,
    origin::OriginPattern,
    registry::RegistryLink,
    slots::{ConnSlots, SlotError},
    store::Store,
};

/// A worker's shared state for serving connections.
#[derive(Debug)]
pub struct WorkerState {
    /// The configuration.
    pub config: Arc<Config>,
    /// Settings every `Conn` of this worker gets.
    pub conn: ConnSettings,
    /// This worker's line to the node's registry.
    pub registry: RegistryLink,
    /// This worker's subscriptions.
    pub hub: SharedHub,
    /// The presence store, for the read-only `/v1` API.
    pub store: Arc<dyn Store>,
    /// Store reachability and drain state, for `/readyz`.
    pub health: Arc<Health>,
    /// `--allowed-origin`, parsed (empty: any origin).
    pub origins: Arc<[OriginPattern]>,
    /// The node's connection bounds, shared by every worker.
    pub slots: Arc<ConnSlots>,
    /// Which refused handshakes get a log line, shared by every worker.
    pub refusal_log: Arc<LogLimiter>,
}

/// The tungstenite settings: small buffers so an idle socket costs little.
/// A frame longer than the read buffer gets its whole length reserved once
/// its header is read, so big messages still arrive in few reads.
/// `max_message_bytes` bounds what a client sends; what the gateway sends
/// is bounded by the outbox, and with no write buffer tungstenite holds
/// one frame at a time, so its own write bound would only refuse a big
/// frame (a join snapshot of a big room) and drop the connection.
pub fn websocket_config(max_message_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(256)
        .write_buffer_size(0)
        .max_write_buffer_size(usize::MAX)
        .max_message_size(Some(max_message_bytes))
        .max_frame_size(Some(max_message_bytes))
}

type Body = Full<Bytes>;

/// The socket type hyper serves, and hands back on an upgrade.
type Io = TokioIo<HeadLimit<TcpStream>>;

/// Serves one accepted TCP connection until it closes or upgrades.
pub async fn serve(stream: TcpStream, state: Rc<WorkerState>) {
    let cap = state.config.max_request_head_bytes;
    let service_state = state.clone();
    let service = service_fn(move |req| {
        let state = service_state.clone();
        async move { Ok::<_, Infallible>(route(req, &state).await) }
    });
    let io: Io = TokioIo::new(HeadLimit::new(stream, cap));
    let mut connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(state.config.handshake_timeout())
        // Bounds the heads HeadLimit stops counting (after a body it does
        // not follow); it never sees a full cap of a head HeadLimit counts.
        .max_header_size(cap)
        // Keeps hyper's read buffer the size of a head (hyper's floor is
        // 8 KiB), not ~400 KB.
        .max_buf_size(cap.max(8192))
        .serve_connection(io, service)
        .with_upgrades();
    // Counted while hyper still holds the socket: a client that sees it
    // closed sees it counted.
    if let Err(error) = (&mut connection).await {
        if error.is_timeout() {
            metrics().handshake_timeouts.inc();
        } else if error.is_parse_too_large() {
            // hyper's own bound answered, with a bare 431: a head after a
            // body HeadLimit does not follow, or more than 100 header fields
            // (or, with a cap over 64 KiB, a 414 for a longer URI).
            record_refusal(&HttpError::RequestHeadTooLarge(cap), None, &state);
        }
        debug!(%error, "http connection ended with an error");
    }
    // A refused head ends hyper's connection as an error, or as a clean
    // end when hyper held none of that head yet; the socket is ours then.
    let refused = connection
        .into_parts()
        .and_then(|parts| parts.io.into_inner().into_refused());
    if let Some(socket) = refused {
        record_refusal(&HttpError::RequestHeadTooLarge(cap), None, &state);
        head::refuse(socket, cap).await;
    }
}

/// Counts a refused handshake, and logs it unless its code has had its
/// lines this second (see [`crate::logs`]). `target` is the request's,
/// token redacted.
fn record_refusal(error: &HttpError, target: Option<&str>, state: &WorkerState) {
    let code = error.code();
    metrics().handshakes_refused.get(code).inc();
    if !state.refusal_log.admit(code, Instant::now()) {
        return;
    }
    match target {
        Some(target) => info!(%target, code, "handshake refused"),
        None => info!(code, "handshake refused"),
    }
}

async fn route(req: Request<Incoming>, state: &Rc<WorkerState>) -> Response<Body> {
    if req.uri().path().starts_with("/v1/") {
        return api::serve(req, state)
            .await
            .unwrap_or_else(HttpError::into_response);
    }
    if let Some(result) = assets::serve(
        req.method(),
        req.uri().path(),
        req.headers(),
        state.config.dev,
    ) {
        return result.unwrap_or_else(HttpError::into_response);
    }
    let result = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => Ok(json(StatusCode::OK, r#"{"status":"ok"}"#.into())),
        (&Method::GET, "/readyz") => readyz(&state.health),
        (&Method::GET, "/ws") => {
            // A Uri clone shares its bytes; the redacted copy is made only
            // for a refusal's log line.
            let uri = req.uri().clone();
            upgrade(req, state).inspect_err(|e| {
                let target = redact_token(&uri.to_string());
                record_refusal(e, Some(&target), state);
            })
        }
        (&Method::GET, "/metrics") => Ok(metrics_page()),
        (_, "/healthz" | "/readyz" | "/ws" | "/metrics") => Err(HttpError::MethodNotAllowed),
        _ => Err(HttpError::NotFound),
    };
    result.unwrap_or_else(HttpError::into_response)
}

/// 200 while the store answers and the node is not draining, else 503.
fn readyz(health: &Health) -> Result<Response<Body>, HttpError> {
    if health.draining() {
        Err(HttpError::NotReady("the node is draining"))
    } else if !health.ready() {
        Err(HttpError::NotReady("the presence store is unreachable"))
    } else {
        Ok(json(StatusCode::OK, r#"{"status":"ready"}"#.into()))
    }
}

/// Prometheus text exposition: atomics and /proc only, no store call.
fn metrics_page() -> Response<Body> {
    let mut res = Response::new(Full::new(Bytes::from(metrics().render())));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    res
}

fn json(status: StatusCode, body: String) -> Response<Body> {
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

/// True when the comma-separated header `name` holds `token`.
fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The first value of query parameter `name`, decoded.
fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    let query = req.uri().query().unwrap_or("");
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The credentials of `Authorization: Bearer …`, if given. The scheme
/// name is case-insensitive (RFC 7235).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
}

/// The token of a handshake: `Authorization: Bearer`, else `?token=`.
fn token(req: &Request<Incoming>) -> Option<String> {
    bearer(req.headers())
        .map(str::to_owned)
        .or_else(|| query_param(req, "token"))
}

/// Who is connecting: a verified token, else (`--dev` only) `?user=`.
fn identify(req: &Request<Incoming>, state: &WorkerState) -> Result<Identity, HttpError> {
    match (token(req), &state.conn.verifier) {
        (Some(token), Some(verifier)) => verifier.verify(&token).map_err(HttpError::Token),
        (Some(_), None) => Err(HttpError::Token(TokenError::Invalid(
            "this gateway has no token key configured (--dev only)".into(),
        ))),
        (None, _) if state.config.dev => Ok(Identity::dev(dev_user(req)?, None)),
        (None, _) => Err(HttpError::Token(TokenError::Missing)),
    }
}

/// Whether the handshake's `Origin` is allowed (always, when no
/// `--allowed-origin` is set).
fn origin_allowed(req: &Request<Incoming>, origins: &[OriginPattern]) -> bool {
    if origins.is_empty() {
        return true;
    }
    req.headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|origin| origins.iter().any(|p| p.matches(origin)))
}

/// The user id of a `--dev` connection, from `?user=`.
fn dev_user(req: &Request<Incoming>) -> Result<UserId, HttpError> {
    let user = query_param(req, "user").ok_or(HttpError::MissingUser)?;
    UserId::parse(&user).map_err(|_| HttpError::InvalidUser)
}

/// A connection's metadata from `?meta=` (a JSON object); `None` when
/// absent.
fn query_meta(req: &Request<Incoming>, max: usize) -> Result<Option<Meta>, HttpError> {
    let Some(raw) = query_param(req, "meta") else {
        return Ok(None);
    };
    Meta::parse(&raw, max).map(Some).map_err(|e| match e {
        MetaError::TooLarge { .. } => HttpError::MetaTooLarge(max),
        MetaError::NotJson | MetaError::NotObject => HttpError::InvalidMeta,
    })
}

fn upgrade(
    mut req: Request<Incoming>,
    state: &Rc<WorkerState>,
) -> Result<Response<Body>, HttpError> {
    let headers = req.headers();
    if !header_has_token(headers, header::UPGRADE, "websocket")
        || !header_has_token(headers, header::CONNECTION, "upgrade")
    {
        return Err(HttpError::UpgradeRequired);
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v != "13")
    {
        return Err(HttpError::UnsupportedVersion);
    }
    let accept = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| derive_accept_key(k.as_bytes()))
        .ok_or(HttpError::MissingKey)?;
    if state.health.draining() {
        return Err(HttpError::NotReady(
            "the node is draining; connect to another",
        ));
    }
    if !origin_allowed(&req, &state.origins) {
        return Err(HttpError::ForbiddenOrigin);
    }
    let mut identity = identify(&req, state)?;
    let meta = query_meta(&req, state.config.max_meta_bytes)?;
    if meta.is_some() {
        if identity.meta_locked {
            return Err(HttpError::MetaLocked);
        }
        identity.meta = meta;
    }
    let slot = state.slots.take(&identity.user).map_err(|e| match e {
        SlotError::NodeFull => HttpError::NodeFull(state.config.max_connections),
        SlotError::UserFull => HttpError::TooManyConnections(state.config.max_conns_per_user),
    })?;

    let on_upgrade = hyper::upgrade::on(&mut req);
    let settings = state.conn.clone();
    let registry = state.registry.clone();
    let hub = state.hub.clone();
    let ws_config = websocket_config(state.config.max_message_bytes);
    actix_rt::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                debug!(%error, "websocket upgrade failed");
                return;
            }
        };
        // The socket itself, out of hyper's box and out of HeadLimit, with
        // whatever the client sent after the head: nothing is counted or
        // boxed on a WebSocket's reads.
        let Ok(parts) = upgraded.downcast::<Io>() else {
            error!("an upgraded connection is not the socket hyper was given");
            return;
        };
        let socket = WebSocketStream::from_partially_read(
            parts.io.into_inner().into_inner(),
            parts.read_buf.to_vec(),
            Role::Server,
            Some(ws_config),
        )
        .await;
        Conn::start(socket, identity, Some(slot), settings, registry, hub);
    });

    let mut res = Response::new(Full::new(Bytes::new()));
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = res.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    // unwrap: derive_accept_key yields base64, always a valid header value.
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).unwrap(),
    );
    Ok(res)
}
