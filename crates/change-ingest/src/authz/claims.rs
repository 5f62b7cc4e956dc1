//! Running statements "as" a token's claims, the way Supabase does it
//! (shared contract 2: RLS for changes and private-channel policy probes use
//! this one helper).
//!
//! Inside a transaction, [`SET_CLAIMS_SQL`] switches to the token's role and
//! sets `request.jwt.claims` (the whole payload as JSON), plus the legacy
//! `request.jwt.claim.sub` and `request.jwt.claim.role` that older
//! `auth.uid()`/`auth.role()` definitions read first. Every setting is
//! transaction-local (`set_config(..., true)`): it ends with the transaction
//! or when a savepoint taken before it is rolled back.

use tokio_postgres::types::ToSql;

/// Sets role and claims for the rest of the transaction. Parameters: `$1`
/// role, `$2` claims JSON (text), `$3` subject (text, may be null).
/// Switching role needs the connecting user to be a member of that role (or
/// a superuser), as `SET ROLE` does.
pub const SET_CLAIMS_SQL: &str =
    "select pg_catalog.set_config('role', $1::pg_catalog.text, true), \
     pg_catalog.set_config('request.jwt.claims', $2::pg_catalog.text, true), \
     pg_catalog.set_config('request.jwt.claim.sub', coalesce($3::pg_catalog.text, ''), true), \
     pg_catalog.set_config('request.jwt.claim.role', $1::pg_catalog.text, true)";

/// Who a statement runs as.
#[derive(Debug, Clone, Copy)]
pub struct AsClaims<'a> {
    /// Postgres role (`claims.role`).
    pub role: &'a str,
    /// The claims, as JSON text.
    pub claims_json: &'a str,
    /// `claims.sub`, if any.
    pub sub: Option<&'a str>,
}

impl<'a> AsClaims<'a> {
    /// The parameters of [`SET_CLAIMS_SQL`].
    pub fn params(&self) -> [&(dyn ToSql + Sync); 3] {
        [&self.role, &self.claims_json, &self.sub]
    }
}

/// Runs [`SET_CLAIMS_SQL`]; the caller must be inside a transaction.
pub async fn set_claims(
    client: &tokio_postgres::Client,
    claims: AsClaims<'_>,
) -> Result<(), crate::IngestError> {
    client.execute(SET_CLAIMS_SQL, &claims.params()).await?;
    Ok(())
}
