//! Who a connection is and what it may do.
//!
//! Identity comes only from a verified token: a JWT whose `sub` is the
//! user id, signed with the configured key. The accepted algorithm is
//! pinned by the key (an HS256 secret accepts HS256 only, an RSA public key
//! RS256 only, an EC key ES256 only), so `alg: none` and algorithm swaps
//! fail before any claim is read. A user id a client writes in a frame or
//! a query string is never identity, except with `--dev` on loopback.
//!
//! The token's claims become [`Grants`]: the rooms the connection may join,
//! the users it may watch or query, and whether it may read the global
//! online/offline feed. The `/ws` handshake ([`crate::http`]) checks the
//! origin ([`crate::origin`]), the identity ([`Verifier`]) and takes a
//! connection slot ([`crate::slots`]) before anything is upgraded. Nothing
//! here talks to the store.

use std::{
    path::Path,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;
use serde_json::Value;

use crate::{
    config::Config,
    ids::{Meta, MetaError, RoomName, UserId},
};

/// Why a token was refused; each variant is one wire code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No token in the handshake.
    #[error(
        "no token: send ?token=JWT or Authorization: Bearer JWT (?user= is accepted only with --dev)"
    )]
    Missing,
    /// Malformed, wrongly signed, or signed with another algorithm.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// Past `exp` (plus the leeway).
    #[error("the token has expired")]
    Expired,
    /// Before `nbf` or `iat` (minus the leeway).
    #[error("the token is not valid yet")]
    NotYetValid,
    /// `aud` is not the configured audience.
    #[error("the token is for another audience")]
    Audience,
    /// `iss` is not the configured issuer.
    #[error("the token is from another issuer")]
    Issuer,
    /// `sub` missing or not a valid user id.
    #[error("the token's sub must be a user id (1-128 bytes of A-Z a-z 0-9 _ - . : @)")]
    Subject,
}

impl TokenError {
    /// The wire code (HTTP error body, refresh error message).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Missing => "missing_token",
            Self::Invalid(_) => "invalid_token",
            Self::Expired => "token_expired",
            Self::NotYetValid => "token_not_yet_valid",
            Self::Audience => "invalid_audience",
            Self::Issuer => "invalid_issuer",
            Self::Subject => "invalid_subject",
        }
    }
}

/// A room or user id pattern from a claim: exact, or `prefix*`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    Prefix(String),
}

impl Pattern {
    fn parse(s: &str) -> Self {
        match s.strip_suffix('*') {
            Some(prefix) => Pattern::Prefix(prefix.to_owned()),
            None => Pattern::Exact(s.to_owned()),
        }
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Exact(exact) => exact == name,
            Pattern::Prefix(prefix) => name.starts_with(prefix.as_str()),
        }
    }
}

/// Names allowed by a claim: all of them, or those matching a list.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Allowed {
    All,
    Only(Vec<Pattern>),
}

impl Allowed {
    fn permits(&self, name: &str) -> bool {
        match self {
            Allowed::All => true,
            Allowed::Only(patterns) => patterns.iter().any(|p| p.matches(name)),
        }
    }

    fn from_list(list: &[String]) -> Self {
        Allowed::Only(list.iter().map(|s| Pattern::parse(s)).collect())
    }
}

/// What a connection may do, from its token's claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grants {
    rooms: Allowed,
    watch: Allowed,
    feed: bool,
}

impl Grants {
    /// Everything: `--dev` connections.
    pub fn all() -> Self {
        Self {
            rooms: Allowed::All,
            watch: Allowed::All,
            feed: true,
        }
    }

    /// May join (or page) this room.
    pub fn may_join(&self, room: &RoomName) -> bool {
        self.rooms.permits(room.as_str())
    }

    /// May watch or query this user.
    pub fn may_watch(&self, user: &UserId) -> bool {
        self.watch.permits(user.as_str())
    }

    /// May subscribe to the global online/offline feed.
    pub fn may_read_feed(&self) -> bool {
        self.feed
    }
}

/// A verified connection identity.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The user (the token's `sub`).
    pub user: UserId,
    /// The connection's metadata from the token's `meta`.
    pub meta: Option<Meta>,
    /// What it may do.
    pub grants: Arc<Grants>,
    /// The token's `exp`, Unix seconds (`None`: a `--dev` connection).
    pub expires_at: Option<u64>,
    /// `meta` came from the token: the client may not replace it.
    pub meta_locked: bool,
}

impl Identity {
    /// A `--dev` connection: the user from the URL, allowed everything,
    /// never expiring.
    pub fn dev(user: UserId, meta: Option<Meta>) -> Self {
        Self {
            user,
            meta,
            grants: Arc::new(Grants::all()),
            expires_at: None,
            meta_locked: false,
        }
    }
}

/// `watch`: `true` (anyone), `false` (nobody) or a list of patterns.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum WatchClaim {
    Any(bool),
    Only(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct Claims {
    /// Required (checked by the validation); optional here so that a
    /// missing `sub` is told apart from malformed claims.
    sub: Option<String>,
    exp: u64,
    iat: Option<u64>,
    rooms: Option<Vec<String>>,
    watch: Option<WatchClaim>,
    #[serde(default)]
    feed: bool,
    meta: Option<Value>,
}

/// Why the token key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read.
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    /// The file is not an RSA or EC public key in PEM.
    #[error("{0} is not a PEM RSA or EC (P-256) public key")]
    NotAKey(String),
    /// An empty secret.
    #[error("the JWT secret is empty")]
    EmptySecret,
}

/// Verifies client tokens with one key and one pinned algorithm.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    leeway: u64,
    max_meta_bytes: usize,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// The verifier the configuration asks for, if any.
    pub fn from_config(config: &Config) -> Result<Option<Self>, KeyError> {
        let (key, algorithm) = if let Some(secret) = &config.jwt_secret {
            (secret_key(secret.expose())?, Algorithm::HS256)
        } else if let Some(path) = &config.jwt_secret_file {
            let secret = read(path)?;
            (secret_key(secret.trim())?, Algorithm::HS256)
        } else if let Some(path) = &config.jwt_public_key_file {
            let pem = read(path)?;
            if let Ok(key) = DecodingKey::from_rsa_pem(pem.as_bytes()) {
                (key, Algorithm::RS256)
            } else if let Ok(key) = DecodingKey::from_ec_pem(pem.as_bytes()) {
                (key, Algorithm::ES256)
            } else {
                return Err(KeyError::NotAKey(path.display().to_string()));
            }
        } else {
            return Ok(None);
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = config.jwt_leeway_s;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        match &config.jwt_audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &config.jwt_issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Ok(Some(Self {
            key,
            validation,
            leeway: config.jwt_leeway_s,
            max_meta_bytes: config.max_meta_bytes,
        }))
    }

    /// The clock leeway, seconds.
    pub fn leeway(&self) -> u64 {
        self.leeway
    }

    /// Verifies `token` and turns its claims into an identity.
    pub fn verify(&self, token: &str) -> Result<Identity, TokenError> {
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                ErrorKind::InvalidAudience => TokenError::Audience,
                ErrorKind::InvalidIssuer => TokenError::Issuer,
                ErrorKind::MissingRequiredClaim(c) if c == "sub" => TokenError::Subject,
                ErrorKind::MissingRequiredClaim(c) if c == "aud" => TokenError::Audience,
                ErrorKind::MissingRequiredClaim(c) if c == "iss" => TokenError::Issuer,
                ErrorKind::InvalidAlgorithm => TokenError::Invalid(
                    "signed with an algorithm this gateway does not accept".into(),
                ),
                ErrorKind::InvalidSignature => TokenError::Invalid("bad signature".into()),
                ErrorKind::MissingRequiredClaim(c) => TokenError::Invalid(format!("no {c} claim")),
                ErrorKind::Json(_) => TokenError::Invalid("malformed claims".into()),
                _ => TokenError::Invalid("malformed token".into()),
            })?
            .claims;
        if claims.iat.is_some_and(|iat| iat > now_s() + self.leeway) {
            return Err(TokenError::NotYetValid);
        }
        let user = claims
            .sub
            .as_deref()
            .and_then(|sub| UserId::parse(sub).ok())
            .ok_or(TokenError::Subject)?;
        let meta = match claims.meta {
            None => None,
            Some(value) => Some(Meta::from_value(&value, self.max_meta_bytes).map_err(|e| {
                TokenError::Invalid(match e {
                    MetaError::TooLarge { max, .. } => {
                        format!("the meta claim is over {max} bytes")
                    }
                    MetaError::NotJson | MetaError::NotObject => {
                        "the meta claim must be an object".into()
                    }
                })
            })?),
        };
        let grants = Grants {
            rooms: claims
                .rooms
                .as_deref()
                .map_or(Allowed::All, Allowed::from_list),
            watch: match &claims.watch {
                None | Some(WatchClaim::Any(true)) => Allowed::All,
                Some(WatchClaim::Any(false)) => Allowed::Only(Vec::new()),
                Some(WatchClaim::Only(list)) => Allowed::from_list(list),
            },
            feed: claims.feed,
        };
        Ok(Identity {
            user,
            meta_locked: meta.is_some(),
            meta,
            grants: Arc::new(grants),
            expires_at: Some(claims.exp),
        })
    }
}

fn secret_key(secret: &str) -> Result<DecodingKey, KeyError> {
    if secret.is_empty() {
        return Err(KeyError::EmptySecret);
    }
    Ok(DecodingKey::from_secret(secret.as_bytes()))
}

fn read(path: &Path) -> Result<String, KeyError> {
    std::fs::read_to_string(path).map_err(|e| KeyError::Read(path.display().to_string(), e))
}

/// Now, Unix seconds.
pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `target` with the value of every `token` query parameter replaced, for
/// logs.
pub fn redact_token(target: &str) -> String {
    let Some((path, query)) = target.split_once('?') else {
        return target.to_owned();
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if name.eq_ignore_ascii_case("token") => format!("{name}=REDACTED"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{path}?{}", query.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_patterns_match_exactly_or_by_prefix() {
        let allowed = Allowed::from_list(&["lobby".into(), "doc:*".into()]);
        assert!(allowed.permits("lobby"));
        assert!(allowed.permits("doc:1"));
        assert!(allowed.permits("doc:"));
        assert!(!allowed.permits("lobby2"));
        assert!(!allowed.permits("doc"));
        assert!(!Allowed::Only(Vec::new()).permits("lobby"));
        assert!(Allowed::All.permits("anything"));
    }

    #[test]
    fn tokens_are_redacted_from_targets() {
        assert_eq!(
            redact_token("/ws?token=abc.def.ghi&x=1"),
            "/ws?token=REDACTED&x=1"
        );
        assert_eq!(redact_token("/ws?user=a"), "/ws?user=a");
        assert_eq!(redact_token("/ws"), "/ws");
    }
}
