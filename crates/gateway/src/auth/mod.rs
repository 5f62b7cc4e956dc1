//! Who is connecting: token verification, and the [`Claims`] every
//! connection and channel acts with.
//!
//! Auth is **configured** when any of these is set: `API_JWT_SECRET` (HS256/
//! 384/512), a JWKS (`API_JWT_JWKS` inline, or `--jwks-url`; RS256/384/512,
//! ES256/384, EdDSA, and `oct` keys for HS), or opaque API keys
//! (`sb_publishable_…` → `anon`, `sb_secret_…` → `service_role`). Then every
//! token must verify like Supabase Realtime checks it: a known algorithm
//! matching its key (`none` never), `exp` in the future (no leeway), `nbf`
//! honoured (1 s leeway), `role` present.
//!
//! With nothing configured the gateway serves only on loopback (see
//! `main`), and claims are the token's payload decoded **without**
//! verification when it is a JWT, else `{"role":"anon"}` — local development.
//!
//! # Layout
//! - [`Claims`] (`claims.rs`): verified payload plus typed `role`/`sub`/`exp`.
//! - `keys.rs`: JWKS parsing and key selection by `alg`/`kid`.
//! - `fetch.rs`: the JWKS URL, fetched at start and on an unknown `kid` (rate-limited).

mod claims;
mod fetch;
mod keys;
pub(crate) mod local;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{DecodingKey, Validation};
use parking_lot::{Mutex, RwLock};
use serde_json::{Map, Value};

pub use claims::Claims;
use keys::{Jwk, NoKey};

/// Leeway for `nbf` (clock skew between the issuer and us). `exp` has none,
/// so an expired token is refused at its `exp` second, like Realtime.
const NBF_LEEWAY_SECS: i64 = 1;

/// Why a token was refused; messages are Realtime's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token at all.
    #[error("API key is missing")]
    Missing,
    /// Not a JWT.
    #[error("The token provided is not a valid JWT")]
    Malformed,
    /// Bad signature.
    #[error("Failed to validate JWT signature")]
    Signature,
    /// No key for this token: algorithm not accepted (`none`, ...), no `kid`
    /// for an asymmetric token, or no secret for an HS one.
    #[error("Failed to generate JWT signer, check your JWT secret or JWKS configuration")]
    Signer,
    /// No key with the token's `kid`.
    #[error("Failed to generate JWT signer for key ID (kid) \"{0}\", check your JWT secret or JWKS configuration")]
    UnknownKid(String),
    /// `role` or `exp` missing.
    #[error("Fields `role` and `exp` are required in JWT")]
    MissingClaims,
    /// `exp` in the past.
    #[error("Token has expired {0} seconds ago")]
    Expired(i64),
    /// `nbf` in the future.
    #[error("Token is not valid yet")]
    NotYetValid,
    /// `role` is `none`: PostgreSQL reads `set_config('role', 'none')` as
    /// "back to the session user", so such claims would act in the database
    /// as the gateway itself, past every policy.
    #[error("The role \"none\" is not a database role")]
    RoleNone,
    /// An `sb_…` key that is not configured.
    #[error("Invalid API key")]
    UnknownApiKey,
}

impl AuthError {
    /// Realtime's error code.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "MissingAPIKey",
            AuthError::Malformed => "MalformedJWT",
            AuthError::Signature => "JwtSignatureError",
            AuthError::Signer | AuthError::UnknownKid(_) => "JwtSignerError",
            AuthError::MissingClaims
            | AuthError::Expired(_)
            | AuthError::NotYetValid
            | AuthError::RoleNone => "InvalidJWTToken",
            AuthError::UnknownApiKey => "InvalidAPIKey",
        }
    }

    /// The `error` of the HTTP 401 a refused WebSocket upgrade gets (Realtime
    /// says only "Token has expired" there).
    pub fn connect_message(&self) -> String {
        match self {
            AuthError::Expired(_) => "Token has expired".to_owned(),
            other => other.to_string(),
        }
    }
}

/// What configures verification (from `Config`).
#[derive(Clone, Debug, Default)]
pub struct AuthSettings {
    /// `API_JWT_SECRET`.
    pub secret: Option<String>,
    /// `API_JWT_JWKS`: inline JSON.
    pub jwks: Option<String>,
    /// `--jwks-url`.
    pub jwks_url: Option<String>,
    /// Opaque keys acting as `anon`.
    pub publishable_keys: Vec<String>,
    /// Opaque keys acting as `service_role`.
    pub secret_keys: Vec<String>,
}

/// The configured verifier.
pub struct Auth {
    secret: Option<DecodingKey>,
    /// Inline keys plus the last fetched URL keys (swapped whole on refresh).
    jwks: RwLock<Arc<Vec<Jwk>>>,
    inline_jwks: Option<String>,
    url: Option<fetch::JwksUrl>,
    /// `(key, claims)` of the opaque API keys.
    api_keys: Vec<(String, Arc<Claims>)>,
    /// Last URL refresh, for the rate limit.
    last_refresh: Mutex<Option<std::time::Instant>>,
    configured: bool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never a secret or a key.
        f.debug_struct("Auth")
            .field("configured", &self.configured)
            .field("secret", &self.secret.is_some())
            .field("jwks_keys", &self.jwks.read().len())
            .field("jwks_url", &self.url.is_some())
            .field("api_keys", &self.api_keys.len())
            .finish()
    }
}

/// Seconds since the epoch.
pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A JWT split into its decoded header and payload (signature unchecked).
struct Parts {
    header: Map<String, Value>,
    payload: Map<String, Value>,
}

fn parse_jwt(token: &str) -> Option<Parts> {
    let mut it = token.split('.');
    let (h, p, _sig) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() {
        return None;
    }
    let object = |part: &str| -> Option<Map<String, Value>> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part.trim_end_matches('='))
            .ok()?;
        match serde_json::from_slice(&bytes).ok()? {
            Value::Object(m) => Some(m),
            _ => None,
        }
    };
    Some(Parts {
        header: object(h)?,
        payload: object(p)?,
    })
}

/// Percent-decodes and strips whitespace, as Realtime cleans tokens.
fn clean(token: &str) -> String {
    percent_encoding::percent_decode_str(token)
        .decode_utf8_lossy()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect()
}

/// Whether a token is an opaque `sb_…` API key, judged on the cleaned text
/// as verification sees it (so ` sb_…` or `%73b_…` is one too). A join's
/// `access_token` that is one falls back to the connection's token, and an
/// `access_token` event carrying one is ignored (PROTOCOL.md §9).
pub fn is_api_key(token: &str) -> bool {
    clean(token).starts_with("sb_")
}

/// Constant-time equality (API keys are secrets).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Auth {
    /// A verifier from settings; fetches the JWKS URL once (a failure is
    /// logged, and retried on the first token that needs it). `Err` for an
    /// unparseable inline JWKS or URL.
    pub async fn new(settings: AuthSettings) -> Result<Auth, String> {
        let secret = settings
            .secret
            .filter(|s| !s.is_empty())
            .map(|s| DecodingKey::from_secret(s.as_bytes()));
        let inline_jwks = settings.jwks.filter(|j| !j.trim().is_empty());
        let inline = match &inline_jwks {
            Some(text) => keys::parse_jwks(text).map_err(|e| format!("API_JWT_JWKS: {e}"))?,
            None => Vec::new(),
        };
        let url = settings
            .jwks_url
            .filter(|u| !u.is_empty())
            .map(|u| fetch::JwksUrl::parse(&u))
            .transpose()?;
        let mut api_keys = Vec::new();
        for (keys, role, var, prefix) in [
            (
                &settings.publishable_keys,
                "anon",
                "PUBLISHABLE_KEYS",
                "sb_publishable_",
            ),
            (
                &settings.secret_keys,
                "service_role",
                "SECRET_KEYS",
                "sb_secret_",
            ),
        ] {
            for (i, k) in keys.iter().map(|k| k.trim()).enumerate() {
                if k.is_empty() {
                    continue;
                }
                // A key of the other kind here (a publishable key among the
                // secret ones would act as service_role), or one that could
                // never be presented as an API key, is a configuration error.
                // The message never quotes the key.
                if !k.starts_with(prefix) || k.len() <= prefix.len() {
                    return Err(format!("{var}: entry {} is not a {prefix}… key", i + 1));
                }
                api_keys.push((k.to_owned(), Arc::new(Claims::for_role(role))));
            }
        }
        let configured =
            secret.is_some() || inline_jwks.is_some() || url.is_some() || !api_keys.is_empty();
        let auth = Auth {
            secret,
            jwks: RwLock::new(Arc::new(inline)),
            inline_jwks,
            url,
            api_keys,
            last_refresh: Mutex::new(None),
            configured,
        };
        if auth.url.is_some() {
            auth.refresh().await;
        }
        Ok(auth)
    }

    /// No verification (loopback development).
    pub fn disabled() -> Auth {
        Auth {
            secret: None,
            jwks: RwLock::new(Arc::new(Vec::new())),
            inline_jwks: None,
            url: None,
            api_keys: Vec::new(),
            last_refresh: Mutex::new(None),
            configured: false,
        }
    }

    /// Whether tokens are verified (anything configured).
    pub fn enabled(&self) -> bool {
        self.configured
    }

    /// The claims a token acts with: verified when auth is configured (then a
    /// missing token is refused); in dev mode, decoded without verification.
    pub async fn claims(&self, token: Option<&str>) -> Result<Arc<Claims>, AuthError> {
        if !self.configured {
            return Ok(Arc::new(unverified(token)));
        }
        self.verify(token.ok_or(AuthError::Missing)?).await
    }

    /// Verifies a token. An unknown `kid` refreshes the JWKS URL (at most
    /// once per [`fetch::MIN_REFRESH`]) and tries again.
    pub async fn verify(&self, token: &str) -> Result<Arc<Claims>, AuthError> {
        match self.verify_now(token) {
            Err(AuthError::UnknownKid(kid)) if self.url.is_some() => {
                if self.refresh_allowed() {
                    self.refresh().await;
                    return self.verify_now(token);
                }
                Err(AuthError::UnknownKid(kid))
            }
            other => other,
        }
    }

    /// Verifies with the keys at hand (no fetch).
    pub fn verify_now(&self, token: &str) -> Result<Arc<Claims>, AuthError> {
        let token = clean(token);
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.starts_with("sb_") {
            return self
                .api_keys
                .iter()
                .find(|(k, _)| ct_eq(k.as_bytes(), token.as_bytes()))
                .map(|(_, c)| Arc::clone(c))
                .ok_or(AuthError::UnknownApiKey);
        }
        let parts = parse_jwt(&token).ok_or(AuthError::Malformed)?;
        let alg_name = parts
            .header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or(AuthError::Signer)?;
        let alg = keys::algorithm(alg_name).ok_or(AuthError::Signer)?;
        let kid = parts.header.get("kid").and_then(Value::as_str);
        let jwks = Arc::clone(&self.jwks.read());
        let key =
            keys::select(self.secret.as_ref(), &jwks, alg, alg_name, kid).map_err(|e| match e {
                NoKey::Kid(k) => AuthError::UnknownKid(k),
                NoKey::Signer => AuthError::Signer,
            })?;
        let mut validation = Validation::new(alg);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.leeway = 0;
        validation.required_spec_claims.clear();
        jsonwebtoken::decode::<serde::de::IgnoredAny>(&token, key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::Base64(_) | K::Json(_) | K::Utf8(_) => AuthError::Malformed,
                _ => AuthError::Signature,
            }
        })?;
        check_times(parts.payload, now_secs()).map(Arc::new)
    }

    fn refresh_allowed(&self) -> bool {
        let mut last = self.last_refresh.lock();
        let now = std::time::Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < fetch::MIN_REFRESH) {
            return false;
        }
        *last = Some(now);
        true
    }

    /// Fetches the JWKS URL and swaps in inline + fetched keys; on failure
    /// keeps the current keys (logged).
    async fn refresh(&self) {
        let Some(url) = &self.url else { return };
        match url.get().await.and_then(|text| keys::parse_jwks(&text)) {
            Ok(mut fetched) => {
                let mut all = match &self.inline_jwks {
                    Some(text) => keys::parse_jwks(text).unwrap_or_default(),
                    None => Vec::new(),
                };
                tracing::info!(keys = fetched.len(), url = %url, "JWKS fetched");
                all.append(&mut fetched);
                *self.jwks.write() = Arc::new(all);
            }
            Err(e) => {
                tracing::warn!(url = %url, cause = %e, "JWKS fetch failed; keeping the current keys")
            }
        }
    }
}

/// Time and presence checks on a verified payload, in Realtime's order:
/// expiry first, then `role`/`exp` presence.
fn check_times(payload: Map<String, Value>, now: i64) -> Result<Claims, AuthError> {
    let exp = payload.get("exp");
    if let Some(exp) = exp.and_then(Value::as_f64) {
        // `as` saturates: -1e300 becomes i64::MIN, which must not overflow below.
        let exp = exp.round() as i64;
        if exp <= now {
            return Err(AuthError::Expired(now.saturating_sub(exp)));
        }
    }
    if payload
        .get("nbf")
        .and_then(Value::as_f64)
        .is_some_and(|nbf| nbf.round() as i64 > now + NBF_LEEWAY_SECS)
    {
        return Err(AuthError::NotYetValid);
    }
    let claims = Claims::from_payload(payload)?;
    if claims.exp.is_none() {
        return Err(AuthError::MissingClaims);
    }
    Ok(claims)
}

/// Dev-mode claims: the JWT payload unverified (role defaults to `anon`), else `anon`.
fn unverified(token: Option<&str>) -> Claims {
    let Some(parts) = token.map(clean).as_deref().and_then(parse_jwt) else {
        return Claims::for_role("anon");
    };
    match Claims::from_payload(parts.payload.clone()) {
        Ok(c) => c,
        Err(_) => {
            let mut c = Claims::for_role("anon");
            c.payload = parts.payload;
            c.sub = c
                .payload
                .get("sub")
                .and_then(Value::as_str)
                .map(str::to_owned);
            c.exp = c.payload.get("exp").and_then(Value::as_i64);
            c
        }
    }
}

/// How long until a channel's token must be checked again: Realtime
/// re-verifies it every 5 minutes, and at its expiry (to the millisecond, so
/// the channel closes within 1 s of `exp`).
pub fn recheck_in(claims: &Claims) -> Duration {
    const EVERY: Duration = Duration::from_secs(300);
    let Some(exp) = claims.exp else {
        return EVERY;
    };
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let left = exp.saturating_mul(1000).saturating_sub(now_ms).max(0) as u64;
    EVERY.min(Duration::from_millis(left))
}

#[cfg(test)]
mod tests;
