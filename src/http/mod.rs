//! The HTTP side of the one port: routing, the `/ws` upgrade, JSON errors.
//!
//! hyper 1.x serves each accepted socket on the worker it was handed to.
//! `GET /ws` is checked (upgrade headers, origin, token, connection
//! bounds) before anything is upgraded; a refused handshake gets a JSON
//! error with its status and no WebSocket, and is counted and logged (with
//! any `token` in the URL redacted). A client gets `--handshake-timeout-ms`
//! to send its request head, so stalled half-open handshakes cost a socket
//! for that long and nothing else. An accepted one is answered `101`, then the upgraded stream
//! is wrapped by tokio-tungstenite and a [`Conn`] is started on the same
//! worker. No extension is ever negotiated (permessage-deflate stays off).
//! `GET /client.js` and, with `--dev`, the demo page at `GET /` are static
//! files built into the binary ([`assets`]).

mod api;
mod assets;
mod error;

use std::{convert::Infallible, rc::Rc, sync::Arc};

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
use tracing::{debug, info};

pub use self::error::HttpError;
use crate::{
    auth::{Identity, TokenError, redact_token},
    broadcast::SharedHub,
    config::Config,
    conn::{Conn, ConnSettings},
    health::Health,
    ids::{Meta, MetaError, UserId},
    metrics::metrics,
    origin::OriginPattern,
    registry::RegistryLink,
    slots::{ConnSlots, SlotError},
    store::Store,
};

/// A worker's shared state for serving connections.
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
}

/// The tungstenite settings: small buffers so an idle socket costs little.
/// A frame longer than the read buffer gets its whole length reserved once
/// its header is read, so big messages still arrive in few reads.
pub fn websocket_config(max_message_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(256)
        .write_buffer_size(0)
        .max_write_buffer_size(max_message_bytes.saturating_mul(4))
        .max_message_size(Some(max_message_bytes))
        .max_frame_size(Some(max_message_bytes))
}

type Body = Full<Bytes>;

/// Serves one accepted TCP connection until it closes or upgrades.
pub async fn serve(stream: TcpStream, state: Rc<WorkerState>) {
    let timeout = state.config.handshake_timeout();
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(route(req, &state).await) }
    });
    let result = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
    if let Err(error) = result {
        if error.is_timeout() {
            metrics().handshake_timeouts.inc();
        }
        debug!(%error, "http connection ended with an error");
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
                metrics().handshakes_refused.get(e.code()).inc();
                let target = redact_token(&uri.to_string());
                info!(%target, code = e.code(), "handshake refused");
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
        match on_upgrade.await {
            Ok(upgraded) => {
                let socket = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(ws_config),
                )
                .await;
                Conn::start(socket, identity, Some(slot), settings, registry, hub);
            }
            Err(error) => debug!(%error, "websocket upgrade failed"),
        }
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
