//! Row level security for Postgres Changes: which subscriber may see which
//! captured row, judged like a `SELECT` by that subscriber would.
//!
//! # Semantics
//! - A subscriber is a role plus JWT claims. Subscribers whose role and
//!   claims are equal apart from `exp`/`iat`/`jti` form one [`Cohort`] and are
//!   judged once.
//! - Columns the role cannot `SELECT` are left out; tables without RLS, and
//!   roles that bypass it (superuser, `BYPASSRLS`, the table owner unless
//!   `FORCE ROW LEVEL SECURITY`) see every row ([`RowRule::All`]).
//! - Otherwise the table's SELECT policies that apply to the role (`FOR
//!   SELECT`/`FOR ALL`, `TO PUBLIC` or a role it has the privileges of;
//!   permissive ones OR'ed, restrictive ones AND'ed, none permissive =
//!   nothing visible) are evaluated on the **captured row image**
//!   (`json_populate_recordset(null::tbl, rows)` named like the table), not
//!   on the current row: a row deleted right after its INSERT is still judged.
//!
//! # Cost
//! Everything a routing step needs is one pipelined round trip on a dedicated
//! connection ([`Authorizer`]). When the policies read the claims only
//! through functions whose value depends on the claims alone (Supabase's
//! `auth.uid()`, `auth.jwt()`, `auth.role()`, `auth.email()` qualify: their
//! bodies only read `request.jwt.*` settings), those calls are replaced by
//! columns of a cohort relation, computed once per cohort, and **one
//! statement judges every cohort of a role at once** — `user_id = auth.uid()`
//! becomes a hash join, O(rows + cohorts). Other policies run once per cohort
//! with the claims set ([`claims`]), in the same pipeline.
//!
//! # Failures
//! A policy that raises for some claims fails only those cohorts: a group
//! that raises is re-run one cohort at a time, the raising ones get
//! [`Verdict::Failed`] and are run alone from then on until they pass.
//!
//! # Layout
//! - [`claims`]: the shared "run as these claims" settings.
//! - `catalog`: roles, column privileges, policies → [`Catalog`] of [`TableAccess`].
//! - `policy`: pure helpers (node-tree scan, call substitution, SQL text).
//! - `eval`: the pipelined evaluation.

mod catalog;
pub mod claims;
mod eval;
mod policy;

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;

pub use catalog::{Catalog, Check, RowRule, TableAccess};

use crate::IngestError;

/// Supabase's API roles (`anon`, `authenticated`, `service_role` with
/// `BYPASSRLS`) and its default grants on `public`, for databases that lack
/// them: the embedded development database, tests and benchmarks. Changes
/// are judged as the subscriber's role, so that role must exist. Idempotent.
pub const SUPABASE_ROLES_SQL: &str = r#"
do $$
begin
    if not exists (select 1 from pg_catalog.pg_roles where rolname = 'anon') then
        create role anon nologin noinherit;
    end if;
    if not exists (select 1 from pg_catalog.pg_roles where rolname = 'authenticated') then
        create role authenticated nologin noinherit;
    end if;
    if not exists (select 1 from pg_catalog.pg_roles where rolname = 'service_role') then
        create role service_role nologin noinherit bypassrls;
    end if;
exception when duplicate_object or unique_violation then
    null; -- created concurrently
end
$$;
grant usage on schema public to anon, authenticated, service_role;
grant select, insert, update, delete on all tables in schema public to anon, authenticated, service_role;
alter default privileges in schema public
    grant select, insert, update, delete on tables to anon, authenticated, service_role;
"#;

/// `application_name` of the authorization connection.
pub const AUTHORIZER_APPLICATION_NAME: &str = "realtime_gateway_authorizer";

/// Longest a policy may take on one statement before its group fails.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Subscribers judged alike: same role and claims apart from `exp`/`iat`/`jti`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Cohort {
    /// Canonical identity (role + claims without `exp`/`iat`/`jti`).
    pub key: Arc<str>,
    /// Postgres role.
    pub role: String,
    /// `request.jwt.claims`: the claims without `exp`/`iat`/`jti`.
    pub claims: String,
    /// `claims.sub`.
    pub sub: Option<String>,
}

/// Which rows of a request one cohort sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowSet {
    bits: Vec<u64>,
}

impl RowSet {
    /// No row of `n`.
    pub fn new(n: usize) -> Self {
        RowSet {
            bits: vec![0; n.div_ceil(64)],
        }
    }

    /// Marks row `i` visible.
    pub fn insert(&mut self, i: usize) {
        if let Some(w) = self.bits.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }

    /// Whether row `i` is visible.
    pub fn contains(&self, i: usize) -> bool {
        self.bits
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// How many rows are visible.
    pub fn len(&self) -> usize {
        self.bits.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether no row is visible.
    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|w| *w == 0)
    }
}

/// What one cohort may see of one request's rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// These rows.
    Visible(RowSet),
    /// Evaluating the policies raised for this cohort (the message).
    Failed(String),
}

/// One table × role to judge: its check, the row images (JSON objects, in
/// the order verdicts refer to them), and the cohorts (all of that role).
#[derive(Debug)]
pub struct CheckRequest<'a> {
    /// The role's check on the table (from [`RowRule::Check`]).
    pub check: &'a Check,
    /// Row images.
    pub rows: &'a [&'a [u8]],
    /// Cohorts, all of the check's role.
    pub cohorts: &'a [&'a Cohort],
}

/// The dedicated authorization connection, its catalog and its caches.
#[derive(Debug)]
pub struct Authorizer {
    url: String,
    client: Option<Client>,
    state: eval::EvalState,
    /// Enabled tables the catalog covers.
    tables: Vec<u32>,
    catalog: Arc<Catalog>,
}

impl Authorizer {
    /// An authorizer for `url` (connects on first use).
    pub fn new(url: &str) -> Self {
        Authorizer {
            url: url.to_owned(),
            client: None,
            state: eval::EvalState::default(),
            tables: Vec::new(),
            catalog: Arc::new(Catalog::default()),
        }
    }

    /// The catalog loaded last.
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    async fn client(&mut self) -> Result<&Client, IngestError> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        if self.client.is_none() {
            // The crate's one way to connect (TLS and keepalives follow it).
            let client = crate::connect(&self.url).await?;
            // Empty search_path: pg_get_expr qualifies every non-catalog
            // function, and nothing we run resolves names through user schemas.
            client
                .batch_execute(&format!(
                    "set application_name = '{AUTHORIZER_APPLICATION_NAME}'; \
                     set search_path = ''; set plan_cache_mode = force_custom_plan; \
                     set statement_timeout = {}; set jit = off",
                    STATEMENT_TIMEOUT.as_millis()
                ))
                .await?;
            self.state.reconnected();
            self.client = Some(client);
        }
        Ok(self.client.as_ref().expect("just connected"))
    }

    /// Loads the catalog for these enabled tables.
    pub async fn load(&mut self, tables: Vec<u32>) -> Result<Arc<Catalog>, IngestError> {
        let result = async {
            let client = self.client().await?;
            catalog::load(client, &tables).await
        }
        .await;
        let catalog = self.keep_alive(result)?;
        self.tables = tables;
        self.catalog = Arc::new(catalog);
        self.state.catalog_changed();
        Ok(Arc::clone(&self.catalog))
    }

    /// Reloads the catalog if anything it depends on changed; returns the new one.
    pub async fn refresh(&mut self) -> Result<Option<Arc<Catalog>>, IngestError> {
        let result = async {
            self.client().await?;
            let client = self.client.as_ref().expect("connected");
            catalog::fingerprint(client, &self.tables).await
        }
        .await;
        let fingerprint = self.keep_alive(result)?;
        if fingerprint == self.catalog.fingerprint {
            return Ok(None);
        }
        let tables = std::mem::take(&mut self.tables);
        self.load(tables).await.map(Some)
    }

    /// Judges every request in one pipelined round trip (plus one when new
    /// cohorts appear, and one when a group of cohorts raised). `Err` means
    /// the connection failed: nothing was judged.
    pub async fn check(
        &mut self,
        requests: &[CheckRequest<'_>],
    ) -> Result<Vec<Vec<Verdict>>, IngestError> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let jobs: Vec<eval::Job<'_>> = requests
            .iter()
            .map(|r| eval::Job::new(r.check, r.rows, r.cohorts))
            .collect();
        let result = async {
            self.client().await?;
            let client = self.client.as_ref().expect("connected");
            eval::evaluate(client, &mut self.state, &jobs).await
        }
        .await;
        self.keep_alive(result)
    }

    /// Drops the connection after a connection-level failure.
    fn keep_alive<T>(&mut self, result: Result<T, IngestError>) -> Result<T, IngestError> {
        if result.is_err() && self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = None;
        }
        result
    }
}
