//! Verification keys: the HS secret and the keys of a JWKS, and which key a
//! token's header selects.
//!
//! Selection follows Supabase Realtime: asymmetric tokens (RS*, ES*, EdDSA)
//! need a `kid` naming a key of the matching type; HS tokens use an `oct` key
//! with their `kid` when the set has one, else the secret. A key's own `alg`,
//! when present, must equal the token's, and an EC/OKP key's curve must be the
//! algorithm's: `alg` can never pick a weaker check than the key allows.

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

/// Key type of a JWK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kty {
    Oct,
    Rsa,
    Ec,
    Okp,
}

/// One usable key of a JWKS.
pub(crate) struct Jwk {
    kid: Option<String>,
    kty: Kty,
    alg: Option<String>,
    crv: Option<String>,
    key: DecodingKey,
}

impl std::fmt::Debug for Jwk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key material.
        f.debug_struct("Jwk")
            .field("kid", &self.kid)
            .field("kty", &self.kty)
            .field("alg", &self.alg)
            .finish()
    }
}

/// Why no key was found for a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NoKey {
    /// No key with this `kid` (asymmetric tokens, or no secret for HS).
    Kid(String),
    /// HS token, no secret and no matching `oct` key; or asymmetric without `kid`.
    Signer,
}

/// The algorithms we accept, by their JOSE names (`none`, PS*, ES512 never).
pub(crate) fn algorithm(name: &str) -> Option<Algorithm> {
    Some(match name {
        "HS256" => Algorithm::HS256,
        "HS384" => Algorithm::HS384,
        "HS512" => Algorithm::HS512,
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

fn kty_of(alg: Algorithm) -> Kty {
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Kty::Oct,
        Algorithm::ES256 | Algorithm::ES384 => Kty::Ec,
        Algorithm::EdDSA => Kty::Okp,
        _ => Kty::Rsa,
    }
}

/// The curve an algorithm needs, for EC and OKP keys.
fn curve_of(alg: Algorithm) -> Option<&'static str> {
    match alg {
        Algorithm::ES256 => Some("P-256"),
        Algorithm::ES384 => Some("P-384"),
        Algorithm::EdDSA => Some("Ed25519"),
        _ => None,
    }
}

impl Jwk {
    /// Whether this key may verify a token with `alg` (`alg_name` as the token wrote it).
    fn fits(&self, alg: Algorithm, alg_name: &str) -> bool {
        self.kty == kty_of(alg)
            && self
                .alg
                .as_deref()
                .is_none_or(|a| a == alg_name || algorithm(a) == Some(alg))
            && curve_of(alg).is_none_or(|c| self.crv.as_deref() == Some(c))
    }

    /// Parses one JWK; `Err` says why it is unusable.
    fn parse(v: &Value) -> Result<Jwk, String> {
        let s = |k: &str| v.get(k).and_then(Value::as_str);
        let need = |k: &str| s(k).ok_or_else(|| format!("missing `{k}`"));
        if s("use").is_some_and(|u| u != "sig") {
            return Err("`use` is not `sig`".into());
        }
        let kty = match need("kty")? {
            "oct" => Kty::Oct,
            "RSA" => Kty::Rsa,
            "EC" => Kty::Ec,
            "OKP" => Kty::Okp,
            other => return Err(format!("unsupported kty {other:?}")),
        };
        let bad = |e: jsonwebtoken::errors::Error| e.to_string();
        let key = match kty {
            Kty::Oct => {
                let k = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(need("k")?.trim_end_matches('='))
                    .map_err(|e| e.to_string())?;
                if k.is_empty() {
                    return Err("empty `k`".into());
                }
                DecodingKey::from_secret(&k)
            }
            Kty::Rsa => DecodingKey::from_rsa_components(need("n")?, need("e")?).map_err(bad)?,
            Kty::Ec => {
                if !matches!(need("crv")?, "P-256" | "P-384") {
                    return Err("unsupported EC curve".into());
                }
                DecodingKey::from_ec_components(need("x")?, need("y")?).map_err(bad)?
            }
            Kty::Okp => {
                if need("crv")? != "Ed25519" {
                    return Err("unsupported OKP curve".into());
                }
                let x = need("x")?;
                let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(x.trim_end_matches('='))
                    .map_err(|e| e.to_string())?;
                if raw.len() != 32 {
                    // jsonwebtoken slices 32 bytes out of it when verifying.
                    return Err("Ed25519 `x` must be 32 bytes".into());
                }
                DecodingKey::from_ed_components(x).map_err(bad)?
            }
        };
        Ok(Jwk {
            kid: s("kid").map(str::to_owned),
            kty,
            alg: s("alg").map(str::to_owned),
            crv: s("crv").map(str::to_owned),
            key,
        })
    }
}

/// Parses a JWKS (`{"keys": [...]}`; a bare array or a single JWK is
/// accepted too). Unusable keys are skipped with a warning; the set must be JSON.
pub(crate) fn parse_jwks(text: &str) -> Result<Vec<Jwk>, String> {
    let v: Value =
        serde_json::from_str(text.trim()).map_err(|e| format!("JWKS is not JSON: {e}"))?;
    let list = match &v {
        Value::Object(m) if m.contains_key("keys") => m["keys"]
            .as_array()
            .cloned()
            .ok_or("JWKS `keys` is not an array")?,
        Value::Object(_) => vec![v.clone()],
        Value::Array(a) => a.clone(),
        _ => return Err("JWKS must be an object with `keys`".into()),
    };
    let mut keys = Vec::with_capacity(list.len());
    for (i, k) in list.iter().enumerate() {
        match Jwk::parse(k) {
            Ok(jwk) => keys.push(jwk),
            Err(why) => {
                let kid = k.get("kid").and_then(|v| v.as_str()).unwrap_or("");
                tracing::warn!(index = i, kid, why, "JWKS key skipped");
            }
        }
    }
    Ok(keys)
}

/// Picks the key for a token: `alg` (already known to be accepted), its `kid`.
pub(crate) fn select<'a>(
    secret: Option<&'a DecodingKey>,
    jwks: &'a [Jwk],
    alg: Algorithm,
    alg_name: &str,
    kid: Option<&str>,
) -> Result<&'a DecodingKey, NoKey> {
    let by_kid = |kid: &str| {
        jwks.iter()
            .find(|k| k.kid.as_deref() == Some(kid) && k.fits(alg, alg_name))
            .map(|k| &k.key)
    };
    if kty_of(alg) == Kty::Oct {
        if let Some(key) = kid.and_then(by_kid) {
            return Ok(key);
        }
        return secret.ok_or(match kid {
            Some(k) => NoKey::Kid(k.to_owned()),
            None => NoKey::Signer,
        });
    }
    let kid = kid.ok_or(NoKey::Signer)?;
    by_kid(kid).ok_or_else(|| NoKey::Kid(kid.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_and_skips() {
        let text = json!({"keys": [
            {"kty": "oct", "kid": "h1", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQ", "alg": "HS256"},
            {"kty": "EC", "kid": "e1", "crv": "P-521", "x": "AA", "y": "AA"},
            {"kty": "weird"},
            {"kty": "oct", "kid": "enc", "use": "enc", "k": "c2VjcmV0"},
        ]})
        .to_string();
        let keys = parse_jwks(&text).unwrap();
        assert_eq!(keys.len(), 1);
        assert!(parse_jwks("nope").is_err());
    }

    #[test]
    fn selection_rules() {
        let keys = parse_jwks(
            &json!({"keys": [{"kty": "oct", "kid": "h1", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQ", "alg": "HS256"}]})
                .to_string(),
        )
        .unwrap();
        let secret = DecodingKey::from_secret(b"s");
        // HS with a known kid uses the oct key, but only for its own alg.
        assert!(select(None, &keys, Algorithm::HS256, "HS256", Some("h1")).is_ok());
        assert_eq!(
            select(None, &keys, Algorithm::HS512, "HS512", Some("h1")).unwrap_err(),
            NoKey::Kid("h1".into())
        );
        // HS without a matching oct key falls back to the secret.
        assert!(select(Some(&secret), &keys, Algorithm::HS512, "HS512", Some("x")).is_ok());
        assert_eq!(
            select(None, &keys, Algorithm::HS256, "HS256", None).unwrap_err(),
            NoKey::Signer
        );
        // Asymmetric needs a kid of the right type: an oct key never verifies RS256.
        assert_eq!(
            select(Some(&secret), &keys, Algorithm::RS256, "RS256", Some("h1")).unwrap_err(),
            NoKey::Kid("h1".into())
        );
        assert_eq!(
            select(Some(&secret), &keys, Algorithm::ES256, "ES256", None).unwrap_err(),
            NoKey::Signer
        );
        assert_eq!(algorithm("none"), None);
        assert_eq!(algorithm("PS256"), None);
    }
}
