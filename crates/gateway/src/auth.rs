//! JWT verification, as pure functions over a configured secret.
//!
//! With `API_JWT_SECRET` set, connections and joins need a JWT signed with it
//! (HS256/384/512) carrying `role` and an unexpired `exp`, like Supabase
//! Realtime. Without a secret, tokens are not checked (local development).

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// Why a token was refused; messages are Realtime's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token at all.
    #[error("API key is missing")]
    Missing,
    /// Not a JWT.
    #[error("The token provided is not a valid JWT")]
    Malformed,
    /// Bad signature (or wrong algorithm).
    #[error("Failed to validate JWT signature")]
    Signature,
    /// `role` or `exp` missing.
    #[error("Fields `role` and `exp` are required in JWT")]
    MissingClaims,
    /// `exp` in the past.
    #[error("Token has expired {0} seconds ago")]
    Expired(i64),
}

impl AuthError {
    /// Realtime's error code.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "MissingAPIKey",
            AuthError::Malformed => "MalformedJWT",
            AuthError::Signature => "JwtSignatureError",
            AuthError::MissingClaims | AuthError::Expired(_) => "InvalidJWTToken",
        }
    }
}

/// The claims we use.
#[derive(Debug, Clone, Deserialize)]
pub struct Claims {
    /// Postgres role (`anon`, `authenticated`, `service_role`).
    pub role: Option<String>,
    /// Expiry, seconds since the epoch (decimals are rounded).
    pub exp: Option<f64>,
    /// Subject (user id).
    pub sub: Option<String>,
}

/// The configured verifier.
pub struct Auth {
    key: Option<DecodingKey>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("enabled", &self.key.is_some())
            .finish()
    }
}

impl Auth {
    /// A verifier for `secret`; `None` disables verification.
    pub fn new(secret: Option<&str>) -> Self {
        Auth {
            key: secret
                .filter(|s| !s.is_empty())
                .map(|s| DecodingKey::from_secret(s.as_bytes())),
        }
    }

    /// Whether tokens are checked.
    pub fn enabled(&self) -> bool {
        self.key.is_some()
    }

    /// Accepts anything when disabled; otherwise the token must verify.
    pub fn authorize(&self, token: Option<&str>) -> Result<(), AuthError> {
        if !self.enabled() {
            return Ok(());
        }
        self.verify(token.ok_or(AuthError::Missing)?).map(drop)
    }

    /// Verifies a token (whitespace stripped, as Realtime does).
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let Some(key) = &self.key else {
            return Err(AuthError::Signature);
        };
        let token: String = token.chars().filter(|c| !c.is_whitespace()).collect();
        let header = jsonwebtoken::decode_header(&token).map_err(|_| AuthError::Malformed)?;
        if !matches!(
            header.alg,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
        ) {
            return Err(AuthError::Signature);
        }
        let mut validation = Validation::new(header.alg);
        validation.validate_exp = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let data = jsonwebtoken::decode::<Claims>(&token, key, &validation).map_err(|e| match e
            .kind()
        {
            jsonwebtoken::errors::ErrorKind::InvalidSignature
            | jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => AuthError::Signature,
            _ => AuthError::Malformed,
        })?;
        let claims = data.claims;
        let (Some(_), Some(exp)) = (&claims.role, claims.exp) else {
            return Err(AuthError::MissingClaims);
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let exp = exp.round() as i64;
        if exp <= now {
            return Err(AuthError::Expired(now - exp));
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "super-secret-jwt-token-with-at-least-32-characters-long";

    fn token(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn verifies_like_realtime() {
        let auth = Auth::new(Some(SECRET));
        let good = token(json!({"role": "anon", "exp": 4_000_000_000u64}), SECRET);
        assert!(auth.authorize(Some(&good)).is_ok());
        assert_eq!(auth.authorize(None), Err(AuthError::Missing));
        assert_eq!(auth.verify("nope").unwrap_err(), AuthError::Malformed);
        let other = token(
            json!({"role": "anon", "exp": 4_000_000_000u64}),
            "other-secret",
        );
        assert_eq!(auth.verify(&other).unwrap_err(), AuthError::Signature);
        let no_role = token(json!({"exp": 4_000_000_000u64}), SECRET);
        assert_eq!(auth.verify(&no_role).unwrap_err(), AuthError::MissingClaims);
        let expired = token(json!({"role": "anon", "exp": 1000}), SECRET);
        assert!(matches!(auth.verify(&expired), Err(AuthError::Expired(n)) if n > 0));
    }

    #[test]
    fn disabled_accepts_anything() {
        let auth = Auth::new(None);
        assert!(auth.authorize(None).is_ok());
        assert!(auth.authorize(Some("whatever")).is_ok());
    }
}
