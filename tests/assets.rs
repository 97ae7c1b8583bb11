//! The static files on the gateway's port: the browser client at
//! `/client.js` and the `--dev` demo page at `/`.
//!
//! A gateway without `--dev` refuses to start (no other identity source
//! exists yet), so "`/` is 404 without `--dev`" is checked by the unit tests
//! in `src/http/assets.rs`; here everything runs on a `--dev` gateway.

mod support;

use support::{Gateway, http, within_scenario_timeout};

/// The client as it is in the source tree, which the binary must serve
/// byte for byte.
fn client_source() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/client-js/presenced.js");
    std::fs::read_to_string(path).unwrap_or_else(|error| panic!("cannot read {path}: {error}"))
}

#[tokio::test]
async fn client_js_is_the_bundled_client_as_javascript() {
    within_scenario_timeout(async {
        let gateway = Gateway::memory(&[]).await;
        let response = http::get(gateway.addr, "/client.js").await;
        assert_eq!(response.status, 200, "{}", response.body_text());
        assert_eq!(
            response.header("content-type"),
            Some("text/javascript; charset=utf-8")
        );
        assert_eq!(response.header("cache-control"), Some("no-cache"));
        // Importable as a module from a page on another origin.
        assert_eq!(response.header("access-control-allow-origin"), Some("*"));
        assert!(
            response.body_text() == client_source(),
            "/client.js differs from client-js/presenced.js (rebuild the gateway)"
        );
        assert!(response.body_text().contains("PresenceClient"));
    })
    .await
}

#[tokio::test]
async fn client_js_with_its_etag_answers_304_without_a_body() {
    within_scenario_timeout(async {
        let gateway = Gateway::memory(&[]).await;
        let first = http::get(gateway.addr, "/client.js").await;
        let etag = first.header("etag").expect("an ETag").to_owned();
        assert!(
            etag.starts_with('"') && etag.ends_with('"') && etag.len() > 2,
            "a strong, quoted ETag: {etag}"
        );

        let again = http::request(
            gateway.addr,
            "GET",
            "/client.js",
            &[("If-None-Match", &etag)],
        )
        .await;
        assert_eq!(again.status, 304, "{}", again.body_text());
        assert!(again.body.is_empty(), "{}", again.body_text());
        assert_eq!(again.header("etag"), Some(etag.as_str()));

        let stale = http::request(
            gateway.addr,
            "GET",
            "/client.js",
            &[("If-None-Match", "\"some-older-build\"")],
        )
        .await;
        assert_eq!(stale.status, 200);
        assert_eq!(stale.body, first.body);
    })
    .await
}

#[tokio::test]
async fn client_js_with_another_method_answers_405() {
    within_scenario_timeout(async {
        let gateway = Gateway::memory(&[]).await;
        let response = http::request(gateway.addr, "POST", "/client.js", &[]).await;
        assert_eq!(response.status, 405, "{}", response.body_text());
        assert_eq!(response.error_code(), "method_not_allowed");
    })
    .await
}

#[tokio::test]
async fn dev_serves_the_demo_page_at_root() {
    within_scenario_timeout(async {
        let gateway = Gateway::memory(&[]).await;
        let response = http::get(gateway.addr, "/").await;
        assert_eq!(response.status, 200, "{}", response.body_text());
        assert_eq!(
            response.header("content-type"),
            Some("text/html; charset=utf-8")
        );
        let page = response.body_text();
        assert!(page.starts_with("<!doctype html>"), "{page}");
        assert!(page.contains(r#"from "/client.js""#), "{page}");
        // Self-contained: nothing is loaded from another origin.
        assert!(!page.contains("http://") && !page.contains("https://"));

        let post = http::request(gateway.addr, "POST", "/", &[]).await;
        assert_eq!(post.status, 405, "{}", post.body_text());
    })
    .await
}
