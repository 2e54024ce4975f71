//! Registry authentication: parsing `WWW-Authenticate` challenges, requesting Bearer tokens
//! from the token server (Docker's token flow: GET with Basic credentials or anonymous,
//! POST `grant_type=refresh_token` for identity tokens), and the token's lifetime.

use std::time::{Duration, Instant};

use reqwest::Url;
use serde::Deserialize;

use super::RegistryError;
use crate::auth::Credential;

/// How a registry wants to be authenticated, learnt from `GET /v2/` or a 401.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// No authentication needed.
    Anonymous,
    /// HTTP Basic with the registry's credential.
    Basic,
    /// Bearer tokens from `realm`.
    Bearer { realm: String, service: Option<String> },
}

/// One `repository:<name>:<actions>` scope.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Scope {
    /// Repository path.
    pub repository: String,
    /// `pull` or `pull,push`.
    pub actions: &'static str,
}

impl Scope {
    /// Pull access to `repository`.
    pub fn pull(repository: &str) -> Scope {
        Scope { repository: repository.to_string(), actions: "pull" }
    }
    /// Pull and push access to `repository`.
    pub fn push(repository: &str) -> Scope {
        Scope { repository: repository.to_string(), actions: "pull,push" }
    }
    /// The scope string of the token request.
    pub fn as_string(&self) -> String {
        format!("repository:{}:{}", self.repository, self.actions)
    }
}

/// The cache key of a set of scopes.
pub fn scope_key(scopes: &[Scope]) -> String {
    let mut s: Vec<String> = scopes.iter().map(Scope::as_string).collect();
    s.sort();
    s.join(" ")
}

/// Parse a `WWW-Authenticate` header value. Unknown schemes give `None`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(char::is_whitespace).unwrap_or((header, ""));
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => {
            let params = parse_params(rest);
            let get = |k: &str| params.iter().find(|(key, _)| key.eq_ignore_ascii_case(k)).map(|(_, v)| v.clone());
            let realm = get("realm")?;
            Some(Challenge::Bearer { realm, service: get("service") })
        }
        _ => None,
    }
}

/// `key=value` or `key="quoted \" value"`, comma separated.
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('=') {
            continue;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n)
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((key.trim().to_string(), value.trim().to_string()));
    }
    out
}

/// An access token and when to stop using it.
#[derive(Debug, Clone)]
pub struct Token {
    /// The bearer token.
    pub value: String,
    /// When to fetch a new one (a little before it expires).
    pub refresh_at: Instant,
}

impl Token {
    /// Whether it may still be used.
    pub fn fresh(&self) -> bool {
        Instant::now() < self.refresh_at
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// The spec's default lifetime when the server does not say.
const DEFAULT_EXPIRY: u64 = 60;

/// Ask the token server at `realm` for a token for `scopes`.
pub async fn fetch_token(
    http: &reqwest::Client,
    registry: &str,
    realm: &str,
    service: Option<&str>,
    scopes: &[Scope],
    credential: Option<&Credential>,
) -> Result<Token, RegistryError> {
    let what = format!("a token for {}", scope_key(scopes));
    let refused = |reason: String| RegistryError::Unauthorized { registry: registry.to_string(), what: what.clone(), reason };
    let mut url = Url::parse(realm).map_err(|e| RegistryError::Protocol {
        registry: registry.to_string(),
        reason: format!("the token realm {realm:?} is not a valid URL: {e}"),
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(RegistryError::Protocol {
            registry: registry.to_string(),
            reason: format!("the token realm {realm:?} is not http(s)"),
        });
    }
    let request = match credential {
        Some(Credential::IdentityToken(refresh)) => {
            // OAuth2 refresh-token grant, as the Docker CLI does for identity tokens.
            let mut form = Url::parse("http://form.invalid/").expect("static URL parses");
            {
                let mut q = form.query_pairs_mut();
                q.append_pair("grant_type", "refresh_token");
                q.append_pair("refresh_token", refresh);
                q.append_pair("client_id", "hoist");
                if let Some(s) = service {
                    q.append_pair("service", s);
                }
                if !scopes.is_empty() {
                    q.append_pair("scope", &scope_key(scopes));
                }
            }
            let body = form.query().unwrap_or_default().to_string();
            http.post(url).header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded").body(body)
        }
        other => {
            {
                let mut q = url.query_pairs_mut();
                if let Some(s) = service {
                    q.append_pair("service", s);
                }
                for scope in scopes {
                    q.append_pair("scope", &scope.as_string());
                }
                if let Some(Credential::UsernamePassword { username, .. }) = other {
                    q.append_pair("account", username);
                }
            }
            let req = http.get(url);
            match other {
                Some(Credential::UsernamePassword { username, password }) => req.basic_auth(username, Some(password)),
                _ => req,
            }
        }
    };
    let response = request.send().await.map_err(|e| super::transport_error(registry, &what, e))?;
    let status = response.status();
    let body = super::read_limited(response, 1 << 20).await.map_err(|e| super::transport_error(registry, &what, e))?;
    if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
        return Err(refused(format!("the token server {realm} answered {status}: {}", super::error_message(&body))));
    }
    if !status.is_success() {
        return Err(RegistryError::Status {
            registry: registry.to_string(),
            what,
            status: status.as_u16(),
            reason: format!("the token server {realm} answered: {}", super::error_message(&body)),
            retry_after: None,
        });
    }
    let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|e| RegistryError::Protocol {
        registry: registry.to_string(),
        reason: format!("the token server {realm} sent an invalid answer: {e}"),
    })?;
    let value = parsed.token.or(parsed.access_token).filter(|t| !t.is_empty()).ok_or_else(|| RegistryError::Protocol {
        registry: registry.to_string(),
        reason: format!("the token server {realm} sent no token"),
    })?;
    let lifetime = parsed.expires_in.filter(|&s| s > 0).unwrap_or(DEFAULT_EXPIRY);
    // Refresh 10 s early, or at half-life for very short-lived tokens.
    let usable = if lifetime > 20 { lifetime - 10 } else { lifetime / 2 };
    Ok(Token { value, refresh_at: Instant::now() + Duration::from_secs(usable) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenges() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        );
        assert_eq!(c, Some(Challenge::Bearer { realm: "https://auth.docker.io/token".into(), service: Some("registry.docker.io".into()) }));
        let c = parse_challenge(r#"bearer service=reg, realm="http://x/t?a=1,b", error="invalid_token""#);
        assert_eq!(c, Some(Challenge::Bearer { realm: "http://x/t?a=1,b".into(), service: Some("reg".into()) }));
        let c = parse_challenge(r#"Bearer realm="a\"b""#);
        assert_eq!(c, Some(Challenge::Bearer { realm: "a\"b".into(), service: None }));
    }

    #[test]
    fn parses_basic_and_rejects_the_rest() {
        assert_eq!(parse_challenge(r#"Basic realm="Registry Realm""#), Some(Challenge::Basic));
        assert_eq!(parse_challenge("Bearer service=x"), None, "a bearer challenge needs a realm");
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(parse_challenge(""), None);
    }

    #[test]
    fn scope_keys_are_order_independent() {
        let a = [Scope::push("to/repo"), Scope::pull("from/repo")];
        let b = [Scope::pull("from/repo"), Scope::push("to/repo")];
        assert_eq!(scope_key(&a), scope_key(&b));
        assert_eq!(scope_key(&a), "repository:from/repo:pull repository:to/repo:pull,push");
    }
}
