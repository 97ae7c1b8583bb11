//! Identity and authorization: JWT handshakes (HS256, RS256, ES256 and every
//! way a token can be wrong), what the claims allow (rooms, watch, the
//! global feed, meta), token refresh and expiry, and the origin check. Each
//! refusal is checked on the wire (status and JSON code, error frame, close
//! code), and a bystander checks that nobody else's presence moved.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use support::{
    Client, EVENT_TIMEOUT, Gateway, QUIET_WINDOW, UserState, http, joined, offline, online,
    within_scenario_timeout,
};

const SECRET: &str = "test-secret-that-is-long-enough-for-hs256";
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwt");

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn fixture(name: &str) -> String {
    format!("{FIXTURES}/{name}")
}

fn read_fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// Claims for `sub`, valid for an hour, merged with `extra`.
fn claims(sub: &str, extra: Value) -> Value {
    let mut claims = json!({"sub": sub, "exp": now() + 3600, "iat": now()});
    if let (Some(claims), Value::Object(extra)) = (claims.as_object_mut(), extra) {
        claims.extend(extra);
    }
    claims
}

fn hs256(claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        claims,
    )
}

fn sign(algorithm: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(algorithm), claims, key).expect("token signs")
}

/// A token `for_user` with the default claims, signed with the test secret.
fn token(for_user: &str) -> String {
    hs256(&claims(for_user, json!({})))
}

/// An unsigned token (`alg: none`), built by hand: no library makes one.
fn unsigned(claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{payload}.")
}

/// A gateway verifying HS256 tokens with the test secret, no `--dev`.
async fn hs256_gateway(extra: &[&str]) -> Gateway {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("secret");
    std::fs::write(&path, format!("{SECRET}\n")).expect("write the secret");
    let path = path.to_string_lossy().into_owned();
    let mut args = vec!["--jwt-secret-file", path.as_str()];
    args.extend_from_slice(extra);
    // The gateway reads the file at start; the directory may go after.
    Gateway::start(&args).await
}

fn ws(gateway: &Gateway, token: &str) -> String {
    format!("ws://{}/ws?token={token}", gateway.addr)
}

/// The status and JSON error code of a refused upgrade of `path`.
async fn refused(gateway: &Gateway, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let response = http::websocket_upgrade(gateway.addr, path, headers).await;
    assert_ne!(response.status, 101, "{path} must be refused");
    (response.status, response.error_code())
}

/// Asserts the bystander (watching `user`) heard nothing and `user` is
/// offline, never seen.
async fn nobody_moved(bystander: &mut Client, user: &str) {
    bystander
        .expect_no_event_within(support::any_presence_event(), QUIET_WINDOW)
        .await;
    assert_eq!(
        bystander.query_one(user).await,
        UserState::new(user, false, 0)
    );
}

#[tokio::test]
async fn every_kind_of_bad_token_is_refused_before_the_upgrade() {
    within_scenario_timeout(async {
        let gateway = hs256_gateway(&[
            "--jwt-audience",
            "presenced",
            "--jwt-issuer",
            "https://auth.example.com",
        ])
        .await;
        let good = |extra: Value| {
            let mut extra = extra;
            let defaults = json!({"aud": "presenced", "iss": "https://auth.example.com"});
            for (k, v) in defaults.as_object().unwrap() {
                extra.as_object_mut().unwrap().entry(k).or_insert(v.clone());
            }
            claims("mallory", extra)
        };
        let mut bystander = Client::connect(&ws(
            &gateway,
            &hs256(&claims(
                "bystander",
                json!({"aud": "presenced", "iss": "https://auth.example.com"}),
            )),
        ))
        .await;
        bystander.watch(&["mallory"]).await;

        let other_key = EncodingKey::from_secret(b"another secret, not the gateway's");
        let mut no_sub = good(json!({}));
        no_sub.as_object_mut().unwrap().remove("sub");
        let mut no_exp = good(json!({}));
        no_exp.as_object_mut().unwrap().remove("exp");
        let cases: Vec<(&str, String, &str)> = vec![
            ("garbage", "not-a-jwt".into(), "invalid_token"),
            (
                "wrong signature",
                sign(Algorithm::HS256, &other_key, &good(json!({}))),
                "invalid_token",
            ),
            ("alg none", unsigned(&good(json!({}))), "invalid_token"),
            (
                "HS512 with the right secret",
                sign(
                    Algorithm::HS512,
                    &EncodingKey::from_secret(SECRET.as_bytes()),
                    &good(json!({})),
                ),
                "invalid_token",
            ),
            (
                "expired",
                hs256(&good(json!({"exp": now() - 120}))),
                "token_expired",
            ),
            ("no exp", hs256(&no_exp), "invalid_token"),
            (
                "nbf in the future",
                hs256(&good(json!({"nbf": now() + 300}))),
                "token_not_yet_valid",
            ),
            (
                "iat in the future",
                hs256(&good(json!({"iat": now() + 300}))),
                "token_not_yet_valid",
            ),
            (
                "wrong audience",
                hs256(&good(json!({"aud": "another-service"}))),
                "invalid_audience",
            ),
            (
                "wrong issuer",
                hs256(&good(json!({"iss": "https://evil.example.com"}))),
                "invalid_issuer",
            ),
            ("no sub", hs256(&no_sub), "invalid_subject"),
            (
                "sub not a user id",
                hs256(&good(json!({"sub": "mallory with spaces"}))),
                "invalid_subject",
            ),
            (
                "rooms not a list",
                hs256(&good(json!({"rooms": "doc:1"}))),
                "invalid_token",
            ),
        ];
        for (what, token, code) in &cases {
            let (status, got) = refused(&gateway, &format!("/ws?token={token}"), &[]).await;
            assert_eq!((status, got.as_str()), (401, *code), "{what}");
            let bearer = format!("Bearer {token}");
            let (status, got) =
                refused(&gateway, "/ws", &[("Authorization", bearer.as_str())]).await;
            assert_eq!(
                (status, got.as_str()),
                (401, *code),
                "{what}, as a bearer header"
            );
        }
        // A user id in the URL is not identity without --dev.
        let (status, code) = refused(&gateway, "/ws?user=mallory", &[]).await;
        assert_eq!((status, code.as_str()), (401, "missing_token"));
        nobody_moved(&mut bystander, "mallory").await;

        // A good token, as a header, is mallory; the watcher hears it.
        let bearer = format!("Bearer {}", hs256(&good(json!({}))));
        let response =
            http::websocket_upgrade(gateway.addr, "/ws", &[("Authorization", bearer.as_str())])
                .await;
        assert_eq!(response.status, 101, "{}", response.body_text());
        bystander.expect_event(online("mallory")).await;

        let refused = |code: &str| format!("presenced_handshakes_refused_total{{code=\"{code}\"}}");
        // Six kinds of invalid token, each as a query and as a header.
        assert_eq!(gateway.metric(&refused("invalid_token")).await, 12.0);
        assert_eq!(gateway.metric(&refused("token_expired")).await, 2.0);
        assert_eq!(gateway.metric(&refused("missing_token")).await, 1.0);

        // No token, good or bad, reaches the logs.
        let logs = gateway.stderr();
        for (what, token, _) in &cases {
            if token.len() > 20 {
                assert!(
                    !logs.contains(token.as_str()),
                    "{what}: the token is in the logs"
                );
            }
        }
        assert!(
            logs.contains("token=REDACTED"),
            "refusals are logged, redacted:\n{logs}"
        );
    })
    .await
}

#[tokio::test]
async fn a_valid_token_is_the_identity_and_message_fields_never_are() {
    within_scenario_timeout(async {
        let gateway = hs256_gateway(&[]).await;
        let mut bystander = Client::connect(&ws(&gateway, &token("bystander"))).await;
        bystander.watch(&["alice", "mallory"]).await;
        bystander.join("doc:1").await;

        let mut alice = Client::connect(&ws(&gateway, &token("alice"))).await;
        assert_eq!(alice.welcome()["user"], "alice");
        bystander.expect_event(online("alice")).await;
        // A `user` or `userId` in a frame changes nothing about who joins.
        let reply = alice.ask_ok(json!({"type": "join", "room": "doc:1", "user": "mallory", "userId": "mallory", "ref": 1}))
            .await;
        let members: Vec<&str> = reply["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["user"].as_str().unwrap())
            .collect();
        assert_eq!(members, ["alice", "bystander"]);
        bystander.expect_event(joined("doc:1", "alice")).await;
        assert_eq!(bystander.query_one("mallory").await, UserState::new("mallory", false, 0));
    })
    .await
}

#[tokio::test]
async fn rs256_and_es256_keys_pin_their_algorithm() {
    within_scenario_timeout(async {
        for (public, private, algorithm) in [
            ("rsa_public.pem", "rsa_private.pem", Algorithm::RS256),
            ("ec_public.pem", "ec_private.pem", Algorithm::ES256),
        ] {
            let key_file = fixture(public);
            let gateway = Gateway::start(&["--jwt-public-key-file", &key_file]).await;
            let signing = match algorithm {
                Algorithm::RS256 => EncodingKey::from_rsa_pem(&read_fixture(private)),
                _ => EncodingKey::from_ec_pem(&read_fixture(private)),
            }
            .expect("test private key");
            let good = sign(algorithm, &signing, &claims("alice", json!({})));
            let mut alice = Client::connect(&ws(&gateway, &good)).await;
            assert_eq!(alice.welcome()["user"], "alice", "{algorithm:?}");
            alice.watch(&["mallory"]).await;

            // The algorithm swap: an HS256 token whose "secret" is the
            // public key everybody may know.
            let swapped = sign(
                Algorithm::HS256,
                &EncodingKey::from_secret(&read_fixture(public)),
                &claims("mallory", json!({})),
            );
            let unsigned = unsigned(&claims("mallory", json!({})));
            for bad in [swapped, unsigned] {
                let (status, code) = refused(&gateway, &format!("/ws?token={bad}"), &[]).await;
                assert_eq!(
                    (status, code.as_str()),
                    (401, "invalid_token"),
                    "{algorithm:?}"
                );
            }
            nobody_moved(&mut alice, "mallory").await;
        }
    })
    .await
}

#[tokio::test]
async fn claims_bound_rooms_watching_and_the_feed() {
    within_scenario_timeout(async {
        let gateway = hs256_gateway(&[]).await;
        // The insider may go anywhere, watch anyone and read the feed.
        let mut insider = Client::connect(&ws(
            &gateway,
            &hs256(&claims("insider", json!({"feed": true}))),
        ))
        .await;
        insider.join("secret").await;
        insider.join("doc:1").await;
        insider.expect_event(joined("secret", "insider")).await;
        insider.expect_event(joined("doc:1", "insider")).await;

        let limited = hs256(&claims(
            "limited",
            json!({"rooms": ["doc:*", "lobby"], "watch": ["team:*"]}),
        ));
        let mut limited = Client::connect(&ws(&gateway, &limited)).await;
        assert_eq!(limited.join("doc:1").await, ["insider", "limited"]);
        insider.expect_event(joined("doc:1", "limited")).await;
        assert_eq!(limited.join("lobby").await, ["limited"]);

        for (request, code) in [
            (json!({"type": "join", "room": "secret"}), "forbidden"),
            (json!({"type": "join", "room": "lobby2"}), "forbidden"),
            (json!({"type": "room", "room": "secret"}), "forbidden"),
            (
                json!({"type": "update", "room": "secret", "state": {"x": 1}}),
                "forbidden",
            ),
            (
                json!({"type": "watch", "users": ["team:a", "insider"]}),
                "forbidden",
            ),
            (json!({"type": "query", "users": ["insider"]}), "forbidden"),
            (json!({"type": "subscribe_feed"}), "forbidden"),
        ] {
            let answer = limited.ask(request.clone()).await;
            assert_eq!(
                (answer["type"].as_str(), answer["code"].as_str()),
                (Some("error"), Some(code)),
                "{request}: {answer}"
            );
        }
        let watched = limited.watch(&["team:a", "team:b"]).await;
        assert_eq!(watched.len(), 2);
        // Nothing forbidden was written: the secret room still has one member.
        let page = insider
            .ask_ok(json!({"type": "room", "room": "secret"}))
            .await;
        assert_eq!(page["users"], json!(["insider"]));
        insider
            .expect_no_event_within(joined("secret", "limited"), QUIET_WINDOW)
            .await;

        // `watch: false` allows no watching at all.
        let blind = hs256(&claims("blind", json!({"watch": false})));
        let mut blind = Client::connect(&ws(&gateway, &blind)).await;
        let answer = blind
            .ask(json!({"type": "watch", "users": ["team:a"]}))
            .await;
        assert_eq!(answer["code"], "forbidden", "{answer}");

        // The feed: every user's online/offline, once, to the insider only.
        insider.ask_ok(json!({"type": "subscribe_feed"})).await;
        let newcomer = Client::connect(&ws(&gateway, &token("newcomer"))).await;
        insider.expect_event(online("newcomer")).await;
        newcomer.close().await;
        let gone = insider.expect_event(offline("newcomer")).await;
        assert_eq!(gone["reason"], "closed");
        limited
            .expect_no_event_within(online("newcomer").or(offline("newcomer")), QUIET_WINDOW)
            .await;
        insider.ask_ok(json!({"type": "unsubscribe_feed"})).await;
        let late = Client::connect(&ws(&gateway, &token("late"))).await;
        insider
            .expect_no_event_within(online("late"), QUIET_WINDOW)
            .await;
        drop(late);
    })
    .await
}

#[tokio::test]
async fn meta_from_the_token_is_the_connections_and_cannot_be_replaced() {
    within_scenario_timeout(async {
        let gateway = hs256_gateway(&[]).await;
        let ann = hs256(&claims("ann", json!({"meta": {"name": "Ann"}})));
        let mut ann_tab = Client::connect(&ws(&gateway, &ann)).await;
        let reply = ann_tab
            .ask_ok(json!({"type": "join", "room": "doc:1"}))
            .await;
        assert_eq!(
            reply["members"],
            json!([{"user": "ann", "meta": {"name": "Ann"}}])
        );
        let answer = ann_tab
            .ask(json!({"type": "join", "room": "doc:2", "meta": {"name": "Eve"}}))
            .await;
        assert_eq!(answer["code"], "forbidden", "{answer}");
        let (status, code) = refused(
            &gateway,
            &format!("/ws?token={ann}&meta=%7B%22name%22%3A%22Eve%22%7D"),
            &[],
        )
        .await;
        assert_eq!((status, code.as_str()), (400, "invalid_meta"));
        let too_big = hs256(&claims("big", json!({"meta": {"x": "y".repeat(2000)}})));
        let (status, code) = refused(&gateway, &format!("/ws?token={too_big}"), &[]).await;
        assert_eq!((status, code.as_str()), (401, "invalid_token"));
        let reply = ann_tab
            .ask_ok(json!({"type": "join", "room": "doc:1"}))
            .await;
        assert_eq!(
            reply["members"],
            json!([{"user": "ann", "meta": {"name": "Ann"}}])
        );
    })
    .await
}

#[tokio::test]
async fn an_expiring_token_closes_with_4001_unless_refreshed() {
    within_scenario_timeout(async {
        let gateway = hs256_gateway(&["--jwt-leeway-s", "0"]).await;
        let mut watcher = Client::connect(&ws(&gateway, &token("watcher"))).await;
        watcher.watch(&["short", "renewed"]).await;

        let short = hs256(&claims("short", json!({"exp": now() + 2})));
        let mut short_tab = Client::connect(&ws(&gateway, &short)).await;
        let renewed = hs256(&claims("renewed", json!({"exp": now() + 2})));
        let mut renewed_tab = Client::connect(&ws(&gateway, &renewed)).await;
        watcher.expect_event(online("short")).await;
        watcher.expect_event(online("renewed")).await;

        // Bad refreshes change nothing.
        for (token, code) in [
            (token("someone-else"), "forbidden"),
            (
                hs256(&claims("renewed", json!({"exp": now() - 60}))),
                "invalid_token",
            ),
            ("garbage".to_owned(), "invalid_token"),
        ] {
            let answer = renewed_tab.ask(json!({"type": "refresh", "token": token})).await;
            assert_eq!(answer["code"], code, "{answer}");
        }
        let later = now() + 3600;
        let reply = renewed_tab.ask_ok(json!({"type": "refresh", "token": hs256(&claims("renewed", json!({"exp": later})))}),
        )
        .await;
        assert_eq!(reply["expires_at"], later);

        assert_eq!(short_tab.expect_close(EVENT_TIMEOUT).await, Some(4001));
        let gone = watcher.expect_event(offline("short")).await;
        assert_eq!(gone["reason"], "closed");
        // Well past the old expiry, the refreshed tab is still there.
        renewed_tab.ping().await;
        watcher
            .expect_no_event_within(offline("renewed"), Duration::from_secs(1))
            .await;
        renewed_tab.ping().await;
                assert_eq!(
            gateway.metric("presenced_connections_closed_total{reason=\"token_expired\"}"
            ).await,
            1.0
        );
    })
    .await
}

#[tokio::test]
async fn only_allowed_origins_may_open_a_websocket() {
    within_scenario_timeout(async {
        let gateway = Gateway::memory(&[
            "--allowed-origin",
            "https://app.example.com",
            "--allowed-origin",
            "*.example.org",
        ])
        .await;
        let mut bystander = Client::connect_with_headers(
            &gateway.ws_url("bystander"),
            &[("Origin", "https://app.example.com")],
        )
        .await;
        bystander.watch(&["mallory", "alice"]).await;
        for origin in [
            Some("https://evil.example.net"),
            Some("https://app.example.com.evil.net"),
            Some("http://app.example.com"),
            Some("https://example.org"),
            Some("null"),
            None,
        ] {
            let headers: Vec<(&str, &str)> = origin.iter().map(|o| ("Origin", *o)).collect();
            let (status, code) = refused(&gateway, "/ws?user=mallory", &headers).await;
            assert_eq!(
                (status, code.as_str()),
                (403, "forbidden_origin"),
                "{origin:?}"
            );
        }
        nobody_moved(&mut bystander, "mallory").await;
        for origin in [
            "https://app.example.com",
            "https://x.example.org",
            "http://a.b.example.org",
        ] {
            let response =
                http::websocket_upgrade(gateway.addr, "/ws?user=alice", &[("Origin", origin)])
                    .await;
            assert_eq!(response.status, 101, "{origin}: {}", response.body_text());
        }
        bystander.expect_event(online("alice")).await.to_string();
    })
    .await
}
