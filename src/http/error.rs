//! Errors answered over plain HTTP, each with one status and one code.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Response, StatusCode,
    header::{self, HeaderMap, HeaderValue},
};
use serde::Serialize;

use crate::auth::TokenError;

/// A refused HTTP request. [`HttpError::into_response`] is the one place
/// that maps a variant to its status and wire code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// No route for this path.
    #[error("no such path")]
    NotFound,
    /// A known path with another method.
    #[error("method not allowed on this path")]
    MethodNotAllowed,
    /// `/ws` without a WebSocket upgrade.
    #[error("this endpoint speaks WebSocket: send an Upgrade: websocket handshake")]
    UpgradeRequired,
    /// A WebSocket version other than 13.
    #[error("only WebSocket version 13 is supported")]
    UnsupportedVersion,
    /// No `Sec-WebSocket-Key`.
    #[error("missing Sec-WebSocket-Key header")]
    MissingKey,
    /// `--dev` and no `?user=`.
    #[error("--dev mode takes the user id from the query: /ws?user=ID")]
    MissingUser,
    /// A user id outside the naming rules.
    #[error("user id must be 1-128 bytes of A-Z a-z 0-9 _ - . : @")]
    InvalidUser,
    /// `meta` that is not a JSON object.
    #[error("meta must be a JSON object")]
    InvalidMeta,
    /// `meta` over `--max-meta-bytes`.
    #[error("meta is larger than --max-meta-bytes ({0} bytes)")]
    MetaTooLarge(usize),
    /// A room name outside the naming rules.
    #[error("room name must be 1-200 bytes of A-Z a-z 0-9 _ - . : @ / + =")]
    InvalidRoom,
    /// A malformed body or query.
    #[error("{0}")]
    BadRequest(String),
    /// More ids than allowed.
    #[error("{0}")]
    LimitExceeded(String),
    /// `/v1` without the right bearer key.
    #[error("missing or wrong API key: send Authorization: Bearer KEY")]
    Unauthorized,
    /// `/v1` on a non-loopback address with no key configured.
    #[error("the /v1 API is disabled: the gateway listens beyond loopback and no --api-key is set")]
    ApiKeyRequired,
    /// The presence store did not answer.
    #[error("the presence store is unavailable; retry later")]
    Unavailable,
    /// `/readyz` while the store is unreachable or the node drains; `/ws`
    /// while it drains.
    #[error("{0}")]
    NotReady(&'static str),
    /// `/ws` without a valid token.
    #[error("{0}")]
    Token(TokenError),
    /// `/ws` from an origin outside `--allowed-origin`.
    #[error("this origin may not open a WebSocket here (see --allowed-origin)")]
    ForbiddenOrigin,
    /// `/ws` for a user holding `--max-conns-per-user` on this node.
    #[error("this user already has {0} connections on this node (--max-conns-per-user)")]
    TooManyConnections(usize),
    /// `/ws` on a node holding `--max-connections`.
    #[error("this node holds its most connections ({0}, --max-connections): connect to another")]
    NodeFull(usize),
    /// `?meta=` on a connection whose token carries `meta`.
    #[error("the token carries this connection's meta; ?meta= is not accepted with it")]
    MetaLocked,
    /// A request head (request line and headers) over
    /// `--max-request-head-bytes`, refused before hyper parses it.
    #[error("the request line and headers are longer than --max-request-head-bytes ({0} bytes)")]
    RequestHeadTooLarge(usize),
}

impl HttpError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            Self::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Self::UpgradeRequired => (StatusCode::UPGRADE_REQUIRED, "upgrade_required"),
            Self::UnsupportedVersion => (StatusCode::UPGRADE_REQUIRED, "unsupported_version"),
            Self::MissingKey => (StatusCode::BAD_REQUEST, "bad_handshake"),
            Self::MissingUser => (StatusCode::BAD_REQUEST, "missing_user"),
            Self::InvalidUser => (StatusCode::BAD_REQUEST, "invalid_user"),
            Self::InvalidRoom => (StatusCode::BAD_REQUEST, "invalid_room"),
            Self::InvalidMeta => (StatusCode::BAD_REQUEST, "invalid_meta"),
            Self::MetaTooLarge(_) => (StatusCode::BAD_REQUEST, "meta_too_large"),
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::LimitExceeded(_) => (StatusCode::BAD_REQUEST, "limit_exceeded"),
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::ApiKeyRequired => (StatusCode::FORBIDDEN, "api_key_required"),
            Self::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::NotReady(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
            Self::Token(e) => (StatusCode::UNAUTHORIZED, e.code()),
            Self::ForbiddenOrigin => (StatusCode::FORBIDDEN, "forbidden_origin"),
            Self::TooManyConnections(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_connections"),
            Self::NodeFull(_) => (StatusCode::SERVICE_UNAVAILABLE, "node_full"),
            Self::MetaLocked => (StatusCode::BAD_REQUEST, "invalid_meta"),
            Self::RequestHeadTooLarge(_) => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request_header_too_large",
            ),
        }
    }

    /// The wire code of this error.
    pub fn code(&self) -> &'static str {
        self.status_and_code().1
    }

    /// The JSON response: `{"error":{"code":...,"message":...}}`.
    pub fn into_response(self) -> Response<Full<Bytes>> {
        let (status, headers, body) = self.parts();
        let mut res = Response::new(Full::new(body));
        *res.status_mut() = status;
        *res.headers_mut() = headers;
        res
    }

    /// The same response as HTTP/1.1 bytes with `Connection: close`, for a
    /// refusal written on a socket hyper no longer serves (a request head
    /// over the bound, see `http::head`).
    pub fn into_http1_bytes(self) -> Vec<u8> {
        let (status, headers, body) = self.parts();
        let mut out = format!(
            "HTTP/1.1 {} {}\r\n",
            status.as_str(),
            status.canonical_reason().unwrap_or("")
        )
        .into_bytes();
        let date = httpdate::fmt_http_date(std::time::SystemTime::now());
        for (name, value) in headers.iter().chain([
            (&header::CONTENT_LENGTH, &HeaderValue::from(body.len())),
            (&header::CONNECTION, &HeaderValue::from_static("close")),
            // unwrap: an HTTP date is ASCII.
            (&header::DATE, &HeaderValue::from_str(&date).unwrap()),
        ]) {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&body);
        out
    }

    /// Status, headers and JSON body: the one rendering of every refusal.
    fn parts(&self) -> (StatusCode, HeaderMap, Bytes) {
        #[derive(Serialize)]
        struct Body<'a> {
            error: Inner<'a>,
        }
        #[derive(Serialize)]
        struct Inner<'a> {
            code: &'a str,
            message: &'a str,
        }
        let (status, code) = self.status_and_code();
        let message = self.to_string();
        // unwrap: two strings always serialize.
        let body = serde_json::to_vec(&Body {
            error: Inner {
                code,
                message: &message,
            },
        })
        .unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match self {
            Self::UpgradeRequired | Self::UnsupportedVersion => {
                h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                h.insert("sec-websocket-version", HeaderValue::from_static("13"));
            }
            Self::Unauthorized => {
                h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::Token(_) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
            }
            _ => {}
        }
        (status, h, Bytes::from(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_written_by_hand_is_the_json_error_with_connection_close() {
        let bytes = HttpError::RequestHeadTooLarge(4096).into_http1_bytes();
        let text = String::from_utf8(bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{head}"
        );
        for line in [
            "content-type: application/json",
            "connection: close",
            &format!("content-length: {}", body.len()),
        ] {
            assert!(head.lines().any(|l| l == line), "no {line:?} in {head}");
        }
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "request_header_too_large");
        assert!(json["error"]["message"].as_str().unwrap().contains("4096"));
    }
}
