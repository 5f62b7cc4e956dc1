//! The claims a connection or channel acts with.

use serde_json::{Map, Value};

use super::AuthError;

/// A token's whole payload plus the fields the gateway reads.
///
/// Verification returns `Arc<Claims>`; every joined channel keeps the one it
/// was joined (or last refreshed) with, and Postgres-side checks (RLS,
/// private-channel policies) run "as" these claims.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    /// The payload exactly as signed (`exp`/`iat` rounded to integers, as Realtime does).
    pub payload: Map<String, Value>,
    /// Postgres role (`anon`, `authenticated`, `service_role`, ...).
    pub role: String,
    /// Subject (user id), when the token has one.
    pub sub: Option<String>,
    /// Expiry, seconds since the epoch; `None` for opaque API keys, which do not expire.
    pub exp: Option<i64>,
}

impl Claims {
    /// Claims from a verified payload: `role` must be a string and not
    /// `none` (see [`AuthError::RoleNone`]); `exp`/`iat` given as decimals are rounded.
    pub fn from_payload(mut payload: Map<String, Value>) -> Result<Claims, AuthError> {
        for key in ["exp", "iat", "nbf"] {
            if let Some(Value::Number(n)) = payload.get(key) {
                if n.as_i64().is_none() {
                    let rounded = n.as_f64().map(|f| f.round() as i64);
                    if let Some(r) = rounded {
                        payload.insert(key.to_owned(), Value::from(r));
                    }
                }
            }
        }
        let role = match payload.get("role") {
            Some(Value::String(r)) if r == "none" => return Err(AuthError::RoleNone),
            Some(Value::String(r)) => r.clone(),
            _ => return Err(AuthError::MissingClaims),
        };
        let sub = payload
            .get("sub")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let exp = payload.get("exp").and_then(Value::as_i64);
        Ok(Claims {
            payload,
            role,
            sub,
            exp,
        })
    }

    /// `{"role": <role>}`: what an opaque API key, or an unverifiable
    /// non-JWT token in loopback dev mode, acts as.
    pub fn for_role(role: &str) -> Claims {
        let mut payload = Map::new();
        payload.insert("role".into(), Value::from(role));
        Claims {
            payload,
            role: role.to_owned(),
            sub: None,
            exp: None,
        }
    }

    /// The payload as JSON text (`request.jwt.claims`).
    pub fn to_json(&self) -> String {
        Value::Object(self.payload.clone()).to_string()
    }

    /// Whether these claims are the service role (admin surfaces).
    pub fn is_service_role(&self) -> bool {
        self.role == "service_role"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn typed_fields_and_rounding() {
        let c = Claims::from_payload(map(
            json!({"role": "authenticated", "sub": "u1", "exp": 1700000000.6, "app": {"x": 1}}),
        ))
        .unwrap();
        assert_eq!(c.role, "authenticated");
        assert_eq!(c.sub.as_deref(), Some("u1"));
        assert_eq!(c.exp, Some(1_700_000_001));
        assert_eq!(c.payload["exp"], json!(1_700_000_001));
        assert_eq!(c.payload["app"], json!({"x": 1}));
    }

    #[test]
    fn role_must_be_a_string() {
        assert_eq!(
            Claims::from_payload(map(json!({"exp": 1}))),
            Err(AuthError::MissingClaims)
        );
        assert_eq!(
            Claims::from_payload(map(json!({"role": 1}))),
            Err(AuthError::MissingClaims)
        );
    }
}
