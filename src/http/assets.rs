//! The two static files on the gateway's port: the browser client at
//! `GET /client.js` (every mode) and the demo page at `GET /` (`--dev`
//! only; elsewhere `/` is 404 like any unknown path).
//!
//! Both are compiled into the binary with `include_str!`, so the client a
//! page loads is always the one written for this gateway's protocol; a
//! build without `client-js/presenced.js` fails, naming the file. Neither
//! route touches the store or any actor.
//!
//! Caching: `/client.js` carries a strong `ETag` (FNV-1a of its bytes,
//! computed once) and `Cache-Control: no-cache`, so a browser keeps its copy
//! but asks every time, and gets `304 Not Modified` with no body while the
//! gateway is the same build. After an upgrade the ETag changes and the new
//! client arrives on the next page load, never a stale one for minutes.
//! `Access-Control-Allow-Origin: *` lets pages on other origins import it.

use std::sync::LazyLock;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Response, StatusCode,
    header::{self, HeaderMap, HeaderValue},
};

use super::HttpError;

/// The browser client, `client-js/presenced.js`, as built into this binary.
pub(super) const CLIENT_JS: &str = include_str!("../../client-js/presenced.js");

/// The demo page, `client-js/demo/index.html`: one self-contained file that
/// imports `/client.js`.
pub(super) const DEMO_PAGE: &str = include_str!("../../client-js/demo/index.html");

/// The `ETag` of [`CLIENT_JS`], quoted as the header wants it.
static CLIENT_JS_ETAG: LazyLock<HeaderValue> = LazyLock::new(|| {
    let tag = format!("\"{:016x}\"", fnv1a64(CLIENT_JS.as_bytes()));
    // unwrap: a quoted hex string is always a valid header value.
    HeaderValue::from_str(&tag).unwrap()
});

/// Serves `path` if it names a static file: `None` for every other path.
pub(super) fn serve(
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    dev: bool,
) -> Option<Result<Response<Full<Bytes>>, HttpError>> {
    match (method, path) {
        (&Method::GET, "/client.js") => Some(Ok(client_js(headers))),
        (_, "/client.js") => Some(Err(HttpError::MethodNotAllowed)),
        (_, "/") if !dev => Some(Err(HttpError::NotFound)),
        (&Method::GET, "/") => Some(Ok(demo_page())),
        (_, "/") => Some(Err(HttpError::MethodNotAllowed)),
        _ => None,
    }
}

/// The client, or `304` when the request already holds this version.
fn client_js(headers: &HeaderMap) -> Response<Full<Bytes>> {
    let etag = &*CLIENT_JS_ETAG;
    let mut res = if none_match_holds(headers, etag) {
        let mut res = Response::new(Full::new(Bytes::new()));
        *res.status_mut() = StatusCode::NOT_MODIFIED;
        res
    } else {
        let mut res = Response::new(Full::new(Bytes::from_static(CLIENT_JS.as_bytes())));
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/javascript; charset=utf-8"),
        );
        res
    };
    let h = res.headers_mut();
    h.insert(header::ETAG, etag.clone());
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Module scripts load in CORS mode: an application served from its own
    // origin imports the client from the gateway's. A public file sent
    // without credentials, so any origin may read it.
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    res
}

fn demo_page() -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from_static(DEMO_PAGE.as_bytes())));
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}

/// True when `If-None-Match` lists `etag` or is `*`. The comparison is the
/// weak one RFC 9110 prescribes for this header: a `W/` prefix is ignored.
fn none_match_holds(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    let ours = etag.as_bytes();
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.trim_start_matches("W/").as_bytes() == ours)
}

/// 64-bit FNV-1a: a few lines instead of a hashing crate, and stable across
/// builds and Rust versions (unlike `DefaultHasher`), so equal files give
/// equal ETags.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str, headers: &HeaderMap, dev: bool) -> Option<Result<u16, HttpError>> {
        serve(&Method::GET, path, headers, dev).map(|r| r.map(|res| res.status().as_u16()))
    }

    #[test]
    fn demo_page_is_served_in_dev_only() {
        let none = HeaderMap::new();
        assert_eq!(get("/", &none, true), Some(Ok(200)));
        assert_eq!(get("/", &none, false), Some(Err(HttpError::NotFound)));
        assert_eq!(
            serve(&Method::POST, "/", &none, false).map(|r| r.err()),
            Some(Some(HttpError::NotFound))
        );
        assert_eq!(
            serve(&Method::POST, "/", &none, true).map(|r| r.err()),
            Some(Some(HttpError::MethodNotAllowed))
        );
    }

    #[test]
    fn client_is_served_in_every_mode() {
        let none = HeaderMap::new();
        assert_eq!(get("/client.js", &none, false), Some(Ok(200)));
        assert_eq!(get("/client.js", &none, true), Some(Ok(200)));
        assert_eq!(get("/other.js", &none, true), None);
    }

    #[test]
    fn if_none_match_with_our_etag_answers_304() {
        let etag = CLIENT_JS_ETAG.to_str().unwrap().to_owned();
        for value in [
            etag.clone(),
            format!("W/{etag}"),
            format!("\"x\", {etag}"),
            "*".to_owned(),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(header::IF_NONE_MATCH, value.parse().unwrap());
            assert_eq!(get("/client.js", &headers, false), Some(Ok(304)), "{value}");
        }
        let mut headers = HeaderMap::new();
        headers.insert(header::IF_NONE_MATCH, "\"0\"".parse().unwrap());
        assert_eq!(get("/client.js", &headers, false), Some(Ok(200)));
    }

    #[test]
    fn fnv1a64_matches_the_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
