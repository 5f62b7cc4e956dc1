//! Verification rules, with fixed test keys (generated for these tests only).

use super::*;
use base64::engine::general_purpose::STANDARD;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;

const SECRET: &str = "super-secret-jwt-token-with-at-least-32-characters-long";
/// P-256 private key (PKCS#8 DER, base64) and its public JWK coordinates.
const EC_PRIV: &str = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgaXGOTpBdYMtstdBbzmCC5ES0Sbfw1o8EZMZ1VHZTdIKhRANCAASGvSbllU30vBlBoNXHZGO/Ay913BorsB6kgneMtCGp9xqnoZPbKUGGPTYNszs+44XTQozjkNu3AJWlczLVpgnA";
const EC_X: &str = "hr0m5ZVN9LwZQaDVx2RjvwMvddwaK7AepIJ3jLQhqfc";
const EC_Y: &str = "Gqehk9spQYY9Ng2zOz7jhdNCjOOQ27cAlaVzMtWmCcA";
/// Ed25519 private key (PKCS#8 DER, base64) and its public `x`.
const ED_PRIV: &str = "MC4CAQAwBQYDK2VwBCIEIN+QrHPJyj2Rs+9PxnLunCMgF9dpPemhpb9blQ0FBasm";
const ED_X: &str = "nQ5LTl4cGEGJ5b3sU7zroPnhZveUnYd3xEDuhULBBBU";

fn far() -> i64 {
    now_secs() + 3600
}

fn hs(claims: Value, secret: &str, alg: Algorithm) -> String {
    encode(
        &Header::new(alg),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn ec(claims: Value, kid: &str) -> String {
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some(kid.into());
    let der = STANDARD.decode(EC_PRIV).unwrap();
    encode(&h, &claims, &EncodingKey::from_ec_der(&der)).unwrap()
}

fn ed(claims: Value, kid: &str) -> String {
    let mut h = Header::new(Algorithm::EdDSA);
    h.kid = Some(kid.into());
    let der = STANDARD.decode(ED_PRIV).unwrap();
    encode(&h, &claims, &EncodingKey::from_ed_der(&der)).unwrap()
}

fn jwks() -> String {
    json!({"keys": [
        {"kty": "EC", "kid": "ec1", "crv": "P-256", "x": EC_X, "y": EC_Y, "alg": "ES256", "use": "sig"},
        {"kty": "OKP", "kid": "ed1", "crv": "Ed25519", "x": ED_X},
        {"kty": "oct", "kid": "hs1", "k": "b2N0LWtleS1vY3Qta2V5LW9jdC1rZXktb2N0LWtleQ"},
    ]})
    .to_string()
}

async fn auth(secret: Option<&str>, jwks: Option<String>) -> Auth {
    Auth::new(AuthSettings {
        secret: secret.map(str::to_owned),
        jwks,
        publishable_keys: vec!["sb_publishable_abc".into()],
        secret_keys: vec!["sb_secret_xyz".into()],
        ..AuthSettings::default()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn hs_family_like_realtime() {
    let a = auth(Some(SECRET), None).await;
    for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        let t = hs(json!({"role": "anon", "exp": far()}), SECRET, alg);
        assert_eq!(a.verify(&t).await.unwrap().role, "anon");
    }
    assert_eq!(a.claims(None).await.unwrap_err(), AuthError::Missing);
    assert_eq!(a.verify("nope").await.unwrap_err(), AuthError::Malformed);
    let other = hs(
        json!({"role": "anon", "exp": far()}),
        "other",
        Algorithm::HS256,
    );
    assert_eq!(a.verify(&other).await.unwrap_err(), AuthError::Signature);
    let no_role = hs(json!({"exp": far()}), SECRET, Algorithm::HS256);
    assert_eq!(
        a.verify(&no_role).await.unwrap_err(),
        AuthError::MissingClaims
    );
    let no_exp = hs(json!({"role": "anon"}), SECRET, Algorithm::HS256);
    assert_eq!(
        a.verify(&no_exp).await.unwrap_err(),
        AuthError::MissingClaims
    );
    let expired = hs(
        json!({"role": "anon", "exp": now_secs() - 10}),
        SECRET,
        Algorithm::HS256,
    );
    assert!(matches!(a.verify(&expired).await, Err(AuthError::Expired(n)) if n >= 10));
    let future = hs(
        json!({"role": "anon", "exp": far(), "nbf": now_secs() + 60}),
        SECRET,
        Algorithm::HS256,
    );
    assert_eq!(a.verify(&future).await.unwrap_err(), AuthError::NotYetValid);
    // Whitespace and percent-encoding are cleaned, as Realtime does.
    let good = hs(
        json!({"role": "anon", "exp": far()}),
        SECRET,
        Algorithm::HS256,
    );
    assert!(a.verify(&format!(" {good}\n")).await.is_ok());
}

#[tokio::test]
async fn alg_none_and_confusion_are_refused() {
    let a = auth(Some(SECRET), Some(jwks())).await;
    let b64 = |v: Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string().as_bytes())
    };
    let payload = b64(json!({"role": "service_role", "exp": far()}));
    let none = format!("{}.{payload}.", b64(json!({"alg": "none", "typ": "JWT"})));
    assert_eq!(a.verify(&none).await.unwrap_err(), AuthError::Signer);
    // An HS256 token "signed" with the EC public key's text under an EC kid:
    // the EC key can only verify ES tokens, and the secret does not match.
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("ec1".into());
    let forged = encode(
        &h,
        &json!({"role": "service_role", "exp": far()}),
        &EncodingKey::from_secret(EC_X.as_bytes()),
    )
    .unwrap();
    assert_eq!(a.verify(&forged).await.unwrap_err(), AuthError::Signature);
    // ES token without kid, or with an unknown one.
    let mut h = Header::new(Algorithm::ES256);
    h.kid = None;
    let der = STANDARD.decode(EC_PRIV).unwrap();
    let no_kid = encode(
        &h,
        &json!({"role": "anon", "exp": far()}),
        &EncodingKey::from_ec_der(&der),
    )
    .unwrap();
    assert_eq!(a.verify(&no_kid).await.unwrap_err(), AuthError::Signer);
    let unknown = ec(json!({"role": "anon", "exp": far()}), "nope");
    assert_eq!(
        a.verify(&unknown).await.unwrap_err(),
        AuthError::UnknownKid("nope".into())
    );
    assert_eq!(
        AuthError::UnknownKid("nope".into()).to_string(),
        "Failed to generate JWT signer for key ID (kid) \"nope\", check your JWT secret or JWKS configuration"
    );
}

#[tokio::test]
async fn jwks_keys_verify() {
    let a = auth(None, Some(jwks())).await;
    let c = a
        .verify(&ec(
            json!({"role": "authenticated", "sub": "u1", "exp": far()}),
            "ec1",
        ))
        .await
        .unwrap();
    assert_eq!(
        (c.role.as_str(), c.sub.as_deref()),
        ("authenticated", Some("u1"))
    );
    assert!(a
        .verify(&ed(json!({"role": "anon", "exp": far()}), "ed1"))
        .await
        .is_ok());
    // The ES key does not verify an EdDSA token under its kid.
    assert_eq!(
        a.verify(&ed(json!({"role": "anon", "exp": far()}), "ec1"))
            .await
            .unwrap_err(),
        AuthError::UnknownKid("ec1".into())
    );
    // oct key by kid.
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("hs1".into());
    let oct = encode(
        &h,
        &json!({"role": "anon", "exp": far()}),
        &EncodingKey::from_secret(b"oct-key-oct-key-oct-key-oct-key"),
    )
    .unwrap();
    assert!(a.verify(&oct).await.is_ok());
    // No secret configured: an HS token without a known kid has no signer.
    let plain = hs(
        json!({"role": "anon", "exp": far()}),
        SECRET,
        Algorithm::HS256,
    );
    assert_eq!(a.verify(&plain).await.unwrap_err(), AuthError::Signer);
}

#[tokio::test]
async fn opaque_api_keys() {
    let a = auth(Some(SECRET), None).await;
    assert_eq!(a.verify("sb_publishable_abc").await.unwrap().role, "anon");
    assert_eq!(
        a.verify("sb_secret_xyz").await.unwrap().role,
        "service_role"
    );
    assert_eq!(
        a.verify("sb_publishable_abd").await.unwrap_err(),
        AuthError::UnknownApiKey
    );
    assert!(!format!("{a:?}").contains("abc"));
}

#[tokio::test]
async fn dev_mode_decodes_without_verifying() {
    let a = Auth::disabled();
    assert!(!a.enabled());
    assert_eq!(a.claims(None).await.unwrap().role, "anon");
    assert_eq!(a.claims(Some("whatever")).await.unwrap().role, "anon");
    let t = hs(
        json!({"role": "authenticated", "sub": "u9", "exp": 1}),
        "any",
        Algorithm::HS256,
    );
    let c = a.claims(Some(&t)).await.unwrap();
    assert_eq!(
        (c.role.as_str(), c.sub.as_deref()),
        ("authenticated", Some("u9"))
    );
    let no_role = hs(json!({"sub": "u9"}), "any", Algorithm::HS256);
    let c = a.claims(Some(&no_role)).await.unwrap();
    assert_eq!(c.role, "anon");
    assert_eq!(c.payload["sub"], json!("u9"));
}

#[test]
fn bad_jwks_is_a_startup_error() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt
        .block_on(Auth::new(AuthSettings {
            jwks: Some("{not json".into()),
            ..AuthSettings::default()
        }))
        .unwrap_err();
    assert!(err.contains("API_JWT_JWKS"));
}

#[test]
fn recheck_interval() {
    let mut c = Claims::for_role("anon");
    assert_eq!(recheck_in(&c), Duration::from_secs(300));
    c.exp = Some(now_secs() + 2);
    assert!(recheck_in(&c) <= Duration::from_secs(2));
    c.exp = Some(now_secs() - 5);
    assert_eq!(recheck_in(&c), Duration::ZERO);
}

#[tokio::test]
async fn role_none_never_acts_as_the_gateway() {
    // `set_config('role', 'none', true)` resets to the gateway's own database
    // user: such claims must never reach a policy check.
    let a = auth(Some(SECRET), None).await;
    let t = hs(
        json!({"role": "none", "sub": "u1", "exp": far()}),
        SECRET,
        Algorithm::HS256,
    );
    let e = a.verify(&t).await.unwrap_err();
    assert_eq!(e, AuthError::RoleNone);
    assert_eq!(e.code(), "InvalidJWTToken");
    // Dev mode keeps the payload but acts as anon.
    let c = Auth::disabled().claims(Some(&t)).await.unwrap();
    assert_eq!(c.role, "anon");
    // Only the exact keyword is special to PostgreSQL.
    let t = hs(
        json!({"role": "None", "exp": far()}),
        SECRET,
        Algorithm::HS256,
    );
    assert_eq!(a.verify(&t).await.unwrap().role, "None");
}

#[tokio::test]
async fn extreme_time_claims_do_not_panic() {
    let a = auth(Some(SECRET), None).await;
    for exp in [json!(-1e300), json!(i64::MIN), json!(-9.3e18)] {
        let t = hs(
            json!({"role": "anon", "exp": exp}),
            SECRET,
            Algorithm::HS256,
        );
        assert!(
            matches!(a.verify(&t).await, Err(AuthError::Expired(n)) if n > 0),
            "exp {exp}"
        );
    }
    for (exp, nbf) in [
        (json!(1e300), json!(-1e300)),
        (json!(u64::MAX), json!(0)),
        (json!(far() as f64 + 0.4), json!(1e300)),
    ] {
        let t = hs(
            json!({"role": "anon", "exp": exp, "nbf": nbf}),
            SECRET,
            Algorithm::HS256,
        );
        let _ = a.verify(&t).await;
    }
    // Strings are not times: `exp` missing as far as Realtime is concerned.
    let t = hs(
        json!({"role": "anon", "exp": far().to_string()}),
        SECRET,
        Algorithm::HS256,
    );
    assert_eq!(a.verify(&t).await.unwrap_err(), AuthError::MissingClaims);
}

#[tokio::test]
async fn api_keys_are_recognised_after_cleaning() {
    assert!(is_api_key("sb_publishable_abc"));
    assert!(is_api_key(" sb_publishable_abc\n"));
    assert!(is_api_key("%73b_secret_xyz"));
    assert!(!is_api_key("eyJhbGciOi.x.y"));
    // Whatever the spelling, the key verifies as itself (never another role).
    let a = auth(Some(SECRET), None).await;
    assert_eq!(
        a.verify("%73b_secret_xyz").await.unwrap().role,
        "service_role"
    );
}

#[tokio::test]
async fn misfiled_api_keys_are_a_startup_error() {
    let new = |publishable: &[&str], secret: &[&str]| {
        Auth::new(AuthSettings {
            publishable_keys: publishable.iter().map(|k| k.to_string()).collect(),
            secret_keys: secret.iter().map(|k| k.to_string()).collect(),
            ..AuthSettings::default()
        })
    };
    // A publishable key filed as a secret one would make every anon client service_role.
    let e = new(&[], &["sb_publishable_abc"]).await.unwrap_err();
    assert!(e.contains("SECRET_KEYS: entry 1"), "{e}");
    assert!(!e.contains("abc"), "the key is never quoted: {e}");
    let e = new(&["sb_publishable_abc", "sb_secret_xyz"], &[])
        .await
        .unwrap_err();
    assert!(e.contains("PUBLISHABLE_KEYS: entry 2"), "{e}");
    assert!(
        new(&[], &["sb_secret_"]).await.is_err(),
        "a bare prefix is no key"
    );
    assert!(new(&["", "sb_publishable_abc"], &["sb_secret_xyz"])
        .await
        .is_ok());
}
