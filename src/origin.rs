//! Which origins may open a WebSocket: `--allowed-origin` patterns.
//!
//! A leaf: the configuration validates the patterns with it and the `/ws`
//! handshake matches the `Origin` header with it, so it imports nothing of
//! ours. Matching is on the text of the header, case-insensitive; a
//! pattern never matches a bare domain by its wildcard, and never a
//! lookalike that merely ends with the domain.

/// One `--allowed-origin`: `[scheme://]host[:port]`, where host may start
/// with `*.` (any subdomain, not the bare domain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPattern {
    scheme: Option<String>,
    host: String,
    wildcard: bool,
}

impl OriginPattern {
    /// Parses a pattern; `None` if it has a path or is empty.
    pub fn parse(pattern: &str) -> Option<Self> {
        let pattern = pattern.trim().to_ascii_lowercase();
        let (scheme, rest) = match pattern.split_once("://") {
            Some((scheme, rest)) => (Some(scheme.to_owned()), rest.to_owned()),
            None => (None, pattern),
        };
        let (wildcard, host) = match rest.strip_prefix("*.") {
            Some(host) => (true, host.to_owned()),
            None => (false, rest),
        };
        if host.is_empty() || host.contains(['/', '*', ' ']) {
            return None;
        }
        Some(Self {
            scheme,
            host,
            wildcard,
        })
    }

    /// Whether the `Origin` header value `origin` matches.
    pub fn matches(&self, origin: &str) -> bool {
        let origin = origin.to_ascii_lowercase();
        let Some((scheme, host)) = origin.split_once("://") else {
            return false;
        };
        if self.scheme.as_deref().is_some_and(|s| s != scheme) {
            return false;
        }
        if self.wildcard {
            host.strip_suffix(self.host.as_str())
                .and_then(|sub| sub.strip_suffix('.'))
                .is_some_and(|sub| !sub.is_empty())
        } else {
            host == self.host
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_match_exactly_or_by_subdomain() {
        let exact = OriginPattern::parse("https://app.example.com").unwrap();
        assert!(exact.matches("https://app.example.com"));
        assert!(exact.matches("HTTPS://APP.example.com"));
        assert!(!exact.matches("http://app.example.com"));
        assert!(!exact.matches("https://app.example.com.evil.net"));
        assert!(!exact.matches("https://app.example.com:8443"));
        assert!(!exact.matches("null"));

        let any_scheme = OriginPattern::parse("*.example.com").unwrap();
        assert!(any_scheme.matches("https://a.example.com"));
        assert!(any_scheme.matches("http://a.b.example.com"));
        assert!(!any_scheme.matches("https://example.com"));
        assert!(!any_scheme.matches("https://evilexample.com"));
        assert!(!any_scheme.matches("https://a.example.com.evil.net"));

        let https_only = OriginPattern::parse("https://*.example.com").unwrap();
        assert!(!https_only.matches("http://a.example.com"));
        assert!(OriginPattern::parse("https://example.com/path").is_none());
        assert!(OriginPattern::parse("").is_none());
    }
}
