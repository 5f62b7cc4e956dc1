//! Stage 2 of routing: who may see what. Runs between match (under the index
//! lock) and deliver, **with no lock held**, in the router task.
//!
//! Every hit carries its channel's claims cohort. Column privileges, the
//! primary-key rules (401 / 400) and roles that see every row are settled
//! here from the cached [`Catalog`] without a query. Hits on a table whose
//! policies must be evaluated are gathered per (table, role) — rows and
//! distinct cohorts — and judged in **one pipelined round trip per step**
//! by change-ingest's [`Authorizer`]. Nothing here runs for a change nobody
//! matched; a step with no policy to evaluate never awaits.
//!
//! A cohort whose policy evaluation raised gets no rows of that table, and
//! each of its channels one `system` error per episode (until it passes
//! again); everyone else is unaffected.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use change_ingest::authz::{
    Authorizer, Catalog, CheckRequest, Cohort, RowRule, TableAccess, Verdict,
};
use change_ingest::{Change, Op, TableInfo};
use parking_lot::Mutex;
use serde_json::Value;

use super::binding::{Binding, Invalid};
use super::route::{Outcome, Plan};
use crate::auth::Claims;

/// Claims left out of a cohort: they differ between tokens of one session.
const VOLATILE_CLAIMS: [&str; 3] = ["exp", "iat", "jti"];

/// The catalog lookup of the previous hit: (table oid, cohort, its access).
type LastLookup<'a> = (u32, Arc<Cohort>, Option<&'a Arc<TableAccess>>);

/// Interns cohorts, so channels with equal claims share one `Arc` (grouping
/// hits by cohort is then a pointer comparison).
#[derive(Debug, Default)]
pub(super) struct Cohorts {
    map: HashMap<Arc<str>, Weak<Cohort>>,
    /// Size after the last sweep of dead entries.
    swept: usize,
}

impl Cohorts {
    /// The cohort of these claims.
    pub(super) fn of(&mut self, claims: &Claims) -> Arc<Cohort> {
        let mut payload = claims.payload.clone();
        for k in VOLATILE_CLAIMS {
            payload.remove(k);
        }
        let text = Value::Object(payload).to_string();
        let key: Arc<str> = Arc::from(format!("{}\u{0}{text}", claims.role));
        if let Some(c) = self.map.get(&key).and_then(Weak::upgrade) {
            return c;
        }
        let cohort = Arc::new(Cohort {
            key: Arc::clone(&key),
            role: claims.role.clone(),
            claims: text,
            sub: claims.sub.clone(),
        });
        self.map.insert(key, Arc::downgrade(&cohort));
        if self.map.len() > 2 * self.swept.max(512) {
            self.map.retain(|_, w| w.strong_count() > 0);
            self.swept = self.map.len();
        }
        cohort
    }
}

/// The join-time checks that depend on the subscriber: its role exists, and
/// it may select the columns its filter and `select` name (Realtime's
/// "invalid column for filter/select" otherwise).
pub(super) fn check_binding(
    catalog: &Catalog,
    table: Option<&TableInfo>,
    role: &str,
    binding: &Binding,
) -> Result<(), Invalid> {
    let exception = |what: String| {
        format!(
            "Unable to subscribe to changes with given parameters. An exception happened so please check your connect parameters: {}. Exception: {what}",
            binding.describe
        )
    };
    if !catalog.role_exists(role) {
        return Err(Invalid {
            message: exception(format!("role \"{role}\" does not exist")),
            may_become_valid: true,
        });
    }
    let Some(table) = table else {
        return Ok(()); // wildcards: judged per change
    };
    let Some(access) = catalog.access(table.oid, role) else {
        return Err(Invalid {
            message: exception(format!(
                "the privileges of role \"{role}\" on {}.{} are not loaded yet",
                table.schema, table.table
            )),
            may_become_valid: true,
        });
    };
    if let Some(c) = binding
        .conditions
        .iter()
        .find(|c| !access.can_select(&c.column))
    {
        return Err(Invalid::final_(exception(format!(
            "invalid column for filter {}",
            c.column
        ))));
    }
    if let Some(c) = binding
        .select
        .iter()
        .flat_map(|s| s.iter())
        .find(|c| !access.can_select(c))
    {
        return Err(Invalid::final_(exception(format!(
            "invalid column for select {c}"
        ))));
    }
    Ok(())
}

/// How long to keep retrying a step whose authorization connection failed
/// before its hits are reported as unauthorized (fail closed).
const RETRY: [Duration; 4] = [
    Duration::from_millis(50),
    Duration::from_millis(250),
    Duration::from_secs(1),
    Duration::from_secs(3),
];

/// The router task's authorization state.
#[derive(Debug)]
pub(super) struct Authz {
    /// `None` without a database (then only catalog-settled hits deliver).
    authorizer: Option<Authorizer>,
    /// Enabled tables, as the catalog should cover them.
    tables: Vec<u32>,
}

impl Authz {
    pub(super) fn new(database_url: Option<&str>) -> Self {
        Authz {
            authorizer: database_url.map(Authorizer::new),
            tables: Vec::new(),
        }
    }

    /// Loads the catalog for these enabled tables (`None`: no database, or
    /// it failed — logged; the previous catalog stays).
    pub(super) async fn load(&mut self, tables: Vec<u32>) -> Option<Arc<Catalog>> {
        self.tables = tables;
        let authorizer = self.authorizer.as_mut()?;
        match authorizer.load(self.tables.clone()).await {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "could not load the authorization catalog; retrying");
                None
            }
        }
    }

    /// A new catalog if grants, policies or roles changed.
    pub(super) async fn refresh(&mut self) -> Option<Arc<Catalog>> {
        let authorizer = self.authorizer.as_mut()?;
        if authorizer.catalog().role_count() == 0 {
            // Never loaded (or the first load failed): load.
            return self.load(self.tables.clone()).await;
        }
        match authorizer.refresh().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "authorization catalog refresh failed; retrying");
                None
            }
        }
    }

    /// Tables of this run of changes that have hits but are missing from the
    /// catalog (enabled a moment ago): reload including them.
    pub(super) async fn cover(
        &mut self,
        catalog: &Catalog,
        changes: &[Change],
        plan: &Plan,
    ) -> Option<Arc<Catalog>> {
        let mut missing = false;
        for (i, change) in changes.iter().enumerate().take(plan.changes.len()) {
            if !plan.changes[i].is_empty() && !catalog.has_table(change.table.oid) {
                if !self.tables.contains(&change.table.oid) {
                    self.tables.push(change.table.oid);
                }
                missing = true;
            }
        }
        if missing {
            self.load(self.tables.clone()).await
        } else {
            None
        }
    }

    /// Decides every hit of the plan (see the module docs).
    pub(super) async fn authorize(
        &mut self,
        catalog: &Catalog,
        changes: &[Change],
        plan: &mut Plan,
        episodes: &Mutex<HashSet<(u64, u32)>>,
    ) {
        // Jobs: per check (table × role), the rows and cohorts to judge.
        let mut jobs: Vec<JobBuilder<'_>> = Vec::new();
        // Keyed by address: the catalog (and so every check) lives through the step.
        let mut job_of: HashMap<usize, usize> = HashMap::new();
        // Hits waiting for a verdict: (hit, job, row, old row, cohort).
        let mut waiting: Vec<(usize, usize, usize, Option<usize>, usize)> = Vec::new();
        // Consecutive hits mostly share table and role: remember the last lookup.
        let mut last: Option<LastLookup<'_>> = None;
        for (i, change) in changes.iter().enumerate().take(plan.changes.len()) {
            for h in plan.changes[i].clone() {
                let hit = &mut plan.hits[h];
                let oid = change.table.oid;
                let access = match &last {
                    Some((o, c, a))
                        if *o == oid
                            && (Arc::ptr_eq(c, &hit.cohort) || c.role == hit.cohort.role) =>
                    {
                        *a
                    }
                    _ => {
                        let a = catalog.access(oid, &hit.cohort.role);
                        last = Some((oid, Arc::clone(&hit.cohort), a));
                        a
                    }
                };
                let Some(access) = access else {
                    hit.outcome = Outcome::Skip;
                    continue;
                };
                hit.outcome = settle(change, access);
                hit.access = (!access.all_selectable).then(|| Arc::clone(access));
                if hit.outcome != Outcome::Deliver {
                    continue;
                }
                let RowRule::Check(check) = &access.rule else {
                    continue;
                };
                // Judged on the row as committed: the new row (INSERT, UPDATE),
                // the old one (DELETE). An UPDATE's old row is judged too: if
                // the subscriber could not see it, only its key is sent.
                let (row, old) = match change.op {
                    Op::Delete => (change.old_record.as_deref(), None),
                    Op::Update => (change.record.as_deref(), change.old_record.as_deref()),
                    Op::Insert => (change.record.as_deref(), None),
                    // Never routed as a change (a `system` message instead).
                    Op::Truncate => (None, None),
                };
                let Some(row) = row else {
                    hit.outcome = Outcome::Skip; // no image to judge: fail closed
                    continue;
                };
                let j = *job_of
                    .entry(Arc::as_ptr(check) as usize)
                    .or_insert_with(|| {
                        jobs.push(JobBuilder::new(check));
                        jobs.len() - 1
                    });
                let r = jobs[j].row((i, false), row);
                let o = old.map(|old| jobs[j].row((i, true), old));
                let c = jobs[j].cohort(&hit.cohort);
                waiting.push((h, j, r, o, c));
            }
        }
        if waiting.is_empty() {
            return;
        }
        let verdicts = self.check(&jobs).await;
        let mut episodes = episodes.lock();
        for (h, j, r, o, c) in waiting {
            let hit = &mut plan.hits[h];
            let key = (hit.chan.id, jobs[j].check.table_oid);
            hit.outcome = match verdicts.as_ref().map(|v| &v[j][c]) {
                Ok(Verdict::Visible(rows)) => {
                    episodes.remove(&key);
                    hit.old_pk_only = o.is_some_and(|o| !rows.contains(o));
                    if rows.contains(r) {
                        Outcome::Deliver
                    } else {
                        Outcome::Skip
                    }
                }
                Ok(Verdict::Failed(e)) => failed(&mut episodes, key, jobs[j].check, e),
                Err(e) => failed(&mut episodes, key, jobs[j].check, e),
            };
        }
    }

    /// Runs the jobs, retrying a failed connection; `Err` after the retries.
    async fn check(&mut self, jobs: &[JobBuilder<'_>]) -> Result<Vec<Vec<Verdict>>, String> {
        let Some(authorizer) = self.authorizer.as_mut() else {
            return Err("no database configured".to_owned());
        };
        let cohorts: Vec<Vec<&Cohort>> = jobs
            .iter()
            .map(|j| j.cohorts.iter().map(|c| &**c).collect())
            .collect();
        let requests: Vec<CheckRequest<'_>> = jobs
            .iter()
            .zip(&cohorts)
            .map(|(j, cohorts)| CheckRequest {
                check: j.check,
                rows: &j.rows,
                cohorts,
            })
            .collect();
        let mut attempt = 0;
        loop {
            let started = std::time::Instant::now();
            match authorizer.check(&requests).await {
                Ok(v) => {
                    metrics::histogram!(crate::metrics::RLS_CHECK_SECONDS)
                        .record(started.elapsed().as_secs_f64());
                    return Ok(v);
                }
                Err(e) if attempt < RETRY.len() => {
                    tracing::warn!(error = %e, attempt, "authorizing changes failed; retrying");
                    tokio::time::sleep(RETRY[attempt]).await;
                    attempt += 1;
                }
                Err(e) => {
                    tracing::error!(error = %e, "authorizing changes failed; their subscribers are told");
                    return Err(format!("authorization unavailable: {e}"));
                }
            }
        }
    }
}

/// What the catalog alone says about one hit.
fn settle(change: &Change, access: &TableAccess) -> Outcome {
    if change.op != Op::Delete {
        // Upstream's rules: no key on an RLS table cannot be secured; a key
        // the role cannot read cannot identify the row.
        if access.rls_enabled && access.primary_key.is_empty() {
            return Outcome::Error("Error 400: Bad Request, no primary key");
        }
        if !access.pk_selectable() {
            return Outcome::Error("Error 401: Unauthorized");
        }
    }
    match access.rule {
        RowRule::Nothing => Outcome::Skip,
        RowRule::All | RowRule::Check(_) => Outcome::Deliver,
    }
}

/// A cohort's evaluation raised: tell each channel once per episode.
fn failed(
    episodes: &mut HashSet<(u64, u32)>,
    key: (u64, u32),
    check: &change_ingest::authz::Check,
    error: &str,
) -> Outcome {
    metrics::counter!(crate::metrics::RLS_ERRORS).increment(1);
    if episodes.insert(key) {
        Outcome::PolicyError(Arc::from(format!(
            "Unable to authorize changes of {} for this subscriber: {error}. Changes of this table are withheld from it until the policy evaluates",
            check.table_name
        )))
    } else {
        Outcome::Skip
    }
}

/// One check's rows and cohorts, deduplicated.
struct JobBuilder<'a> {
    check: &'a change_ingest::authz::Check,
    rows: Vec<&'a [u8]>,
    /// (change, old image?) → row position.
    row_of: HashMap<(usize, bool), usize>,
    cohorts: Vec<Arc<Cohort>>,
    /// By address: interned cohorts are shared by every channel of the cohort.
    cohort_of: HashMap<usize, usize>,
}

impl<'a> JobBuilder<'a> {
    fn new(check: &'a change_ingest::authz::Check) -> Self {
        JobBuilder {
            check,
            rows: Vec::new(),
            row_of: HashMap::new(),
            cohorts: Vec::new(),
            cohort_of: HashMap::new(),
        }
    }

    fn row(&mut self, key: (usize, bool), image: &'a [u8]) -> usize {
        *self.row_of.entry(key).or_insert_with(|| {
            self.rows.push(image);
            self.rows.len() - 1
        })
    }

    fn cohort(&mut self, cohort: &Arc<Cohort>) -> usize {
        *self
            .cohort_of
            .entry(Arc::as_ptr(cohort) as usize)
            .or_insert_with(|| {
                self.cohorts.push(Arc::clone(cohort));
                self.cohorts.len() - 1
            })
    }
}
