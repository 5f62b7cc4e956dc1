//! Evaluating checks: one pipelined round trip per routing step.
//!
//! Everything a step needs is sent at once inside one transaction that is
//! rolled back at the end. Each role group and each cohort runs between a
//! `savepoint` and a `rollback to savepoint`, so a statement that raises
//! aborts only its own group or cohort, and role and claims settings
//! (`set_config(..., true)`) end with it. A query whose role switch failed
//! never counts, even if it ran: nothing is judged as the wrong role.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::future::join_all;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement};

use super::catalog::{Check, Fast};
use super::claims::{AsClaims, SET_CLAIMS_SQL};
use super::policy::CohortFunc;
use super::{Cohort, RowSet, Verdict};
use crate::error::PgDisplay;
use crate::IngestError;

type Pending<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<Row>, tokio_postgres::Error>> + Send + 'a>>;

const SET_ROLE_SQL: &str = "select pg_catalog.set_config('role', $1::pg_catalog.text, true)";

/// The value of one cohort function for one cohort: `Err` (the message) when
/// computing it raised — the policy raises for that cohort.
type Value = Result<Option<String>, String>;

/// Cached cohort values beyond this are dropped wholesale (recomputed on use).
const MAX_VALUES: usize = 200_000;

/// Per-connection state: prepared statements and per-cohort values.
#[derive(Debug, Default)]
pub(super) struct EvalState {
    statements: HashMap<String, Statement>,
    /// (cohort key, function oid) → value.
    values: HashMap<(Arc<str>, u32), Value>,
    /// (check id, cohort key) that raised last time: evaluated alone until they pass.
    suspects: HashSet<(u64, Arc<str>)>,
}

impl EvalState {
    async fn statement(&mut self, client: &Client, sql: &str) -> Result<Statement, IngestError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = client.prepare(sql).await?;
        self.statements.insert(sql.to_owned(), s.clone());
        Ok(s)
    }

    /// Forgets what depends on the catalog (prepared statements stay valid:
    /// PostgreSQL re-plans them when what they read changes).
    pub(super) fn catalog_changed(&mut self) {
        self.values.clear();
        self.suspects.clear();
    }

    /// Forgets everything tied to the connection.
    pub(super) fn reconnected(&mut self) {
        self.statements.clear();
        self.catalog_changed();
    }
}

/// One table × role to check: the check, the row images, the cohorts.
#[derive(Debug)]
pub(super) struct Job<'a> {
    pub(super) check: &'a Check,
    rows: String,
    n_rows: usize,
    pub(super) cohorts: &'a [&'a Cohort],
}

impl<'a> Job<'a> {
    /// The rows go as one JSON array (text) shared by every statement of the job.
    pub(super) fn new(check: &'a Check, rows: &[&[u8]], cohorts: &'a [&'a Cohort]) -> Self {
        let mut s = String::with_capacity(rows.iter().map(|r| r.len() + 1).sum::<usize>() + 2);
        s.push('[');
        for (i, r) in rows.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str(std::str::from_utf8(r).unwrap_or("null"));
        }
        s.push(']');
        Job {
            check,
            rows: s,
            n_rows: rows.len(),
            cohorts,
        }
    }

    fn key(&self, cohort: usize) -> (u64, Arc<str>) {
        (self.check.id, Arc::clone(&self.cohorts[cohort].key))
    }
}

/// A statement that raised: its message, and whether it was cancelled by
/// `statement_timeout` (then re-running its cohorts one by one would only
/// multiply the wait).
#[derive(Debug, Clone)]
struct Fail {
    message: String,
    timeout: bool,
}

fn fail(e: &tokio_postgres::Error) -> Fail {
    match e.as_db_error() {
        Some(db) => Fail {
            message: db.message().to_owned(),
            timeout: db.code() == &tokio_postgres::error::SqlState::QUERY_CANCELED,
        },
        None => Fail {
            message: PgDisplay(e).to_string(),
            timeout: false,
        },
    }
}

/// How a control statement's failure affects the statements after it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Control {
    /// `begin`: if it fails nothing after it can be trusted.
    Start,
    /// `savepoint`, role and claims settings: a failure fails the group.
    Setup,
    /// `rollback to savepoint`: success ends the group (and its failure).
    End,
}

/// Statements sent back to back; answers come back in order.
struct Pipeline<'a, T> {
    futures: Vec<Pending<'a>>,
    tags: Vec<Result<T, Control>>,
}

impl<'a, T> Pipeline<'a, T> {
    fn new() -> Self {
        Pipeline {
            futures: Vec::new(),
            tags: Vec::new(),
        }
    }

    fn control(&mut self, kind: Control, f: Pending<'a>) {
        self.futures.push(f);
        self.tags.push(Err(kind));
    }

    fn query(&mut self, tag: T, f: Pending<'a>) {
        self.futures.push(f);
        self.tags.push(Ok(tag));
    }

    /// Runs everything. Each query's result is replaced by the error of a
    /// control statement of its group that failed before it. A connection
    /// failure is `Err` (the caller retries the whole step).
    async fn run(self) -> Result<Vec<(T, Result<Vec<Row>, Fail>)>, IngestError> {
        let results = join_all(self.futures).await;
        let mut out = Vec::new();
        let mut blocker: Option<Fail> = None;
        let mut sticky = false;
        for (tag, result) in self.tags.into_iter().zip(results) {
            let result = match result {
                Err(e) if e.as_db_error().is_none() => return Err(e.into()),
                r => r.map_err(|e| fail(&e)),
            };
            match tag {
                Err(kind) => match result {
                    Ok(_) if kind == Control::End && !sticky => blocker = None,
                    Ok(_) => {}
                    Err(e) => {
                        sticky |= kind != Control::Setup;
                        blocker.get_or_insert(e);
                    }
                },
                Ok(tag) => {
                    let result = match &blocker {
                        Some(b) => Err(b.clone()),
                        None => result,
                    };
                    out.push((tag, result));
                }
            }
        }
        Ok(out)
    }
}

struct Common {
    begin: Statement,
    savepoint: Statement,
    rollback_to: Statement,
    rollback: Statement,
    set_role: Statement,
    set_claims: Statement,
}

async fn common(state: &mut EvalState, client: &Client) -> Result<Common, IngestError> {
    Ok(Common {
        begin: state.statement(client, "begin").await?,
        savepoint: state.statement(client, "savepoint rg").await?,
        rollback_to: state.statement(client, "rollback to savepoint rg").await?,
        rollback: state.statement(client, "rollback").await?,
        set_role: state.statement(client, SET_ROLE_SQL).await?,
        set_claims: state.statement(client, SET_CLAIMS_SQL).await?,
    })
}

fn as_claims(cohort: &Cohort) -> AsClaims<'_> {
    AsClaims {
        role: &cohort.role,
        claims_json: &cohort.claims,
        sub: cohort.sub.as_deref(),
    }
}

fn query<'a>(
    client: &'a Client,
    stmt: &'a Statement,
    params: Vec<&'a (dyn ToSql + Sync)>,
) -> Pending<'a> {
    Box::pin(async move { client.query(stmt, &params).await })
}

/// What a query of the main pipeline answers.
enum Ask {
    /// Fast statement: these cohort positions of the job.
    Fast { job: usize, cohorts: Vec<usize> },
    /// Slow statement: one cohort of the job.
    Slow { job: usize, cohort: usize },
}

/// Evaluates every job: which of its rows each of its cohorts sees.
pub(super) async fn evaluate(
    client: &Client,
    state: &mut EvalState,
    jobs: &[Job<'_>],
) -> Result<Vec<Vec<Verdict>>, IngestError> {
    let mut verdicts: Vec<Vec<Option<Verdict>>> =
        jobs.iter().map(|j| vec![None; j.cohorts.len()]).collect();
    compute_values(client, state, jobs).await?;

    // Per job: the cohorts of its fast group, and those that run alone.
    let mut runs: Vec<(usize, Vec<usize>)> = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        let mut group = Vec::new();
        for (c, cohort) in job.cohorts.iter().enumerate() {
            match &job.check.fast {
                Some(fast) => {
                    if let Some(err) = value_error(state, fast, cohort) {
                        verdicts[j][c] = Some(Verdict::Failed(err));
                    } else if state.suspects.contains(&job.key(c)) {
                        runs.push((j, vec![c]));
                    } else {
                        group.push(c);
                    }
                }
                None => runs.push((j, vec![c])),
            }
        }
        if !group.is_empty() {
            runs.push((j, group));
        }
    }
    let mut retry: Vec<(usize, Vec<usize>)> = Vec::new();
    for (ask, result) in run_pipeline(client, state, jobs, &runs).await? {
        let (job, cohorts, alone) = match ask {
            Ask::Fast { job, cohorts } => {
                let alone = cohorts.len() == 1;
                (job, cohorts, alone)
            }
            Ask::Slow { job, cohort } => (job, vec![cohort], true),
        };
        match result {
            Ok(rows) => {
                for (c, set) in read_sets(&jobs[job], &cohorts, &rows) {
                    if alone {
                        state.suspects.remove(&jobs[job].key(c));
                    }
                    verdicts[job][c] = Some(Verdict::Visible(set));
                }
            }
            Err(e) if alone => {
                state.suspects.insert(jobs[job].key(cohorts[0]));
                verdicts[job][cohorts[0]] = Some(Verdict::Failed(e.message));
            }
            Err(e) if e.timeout => {
                for c in cohorts {
                    verdicts[job][c] = Some(Verdict::Failed(e.message.clone()));
                }
            }
            // A group raised: find out who, one cohort each. They stay suspects
            // (run alone) until they pass, so the group runs clean from now on.
            Err(_) => retry.push((job, cohorts)),
        }
    }
    if !retry.is_empty() {
        let alone: Vec<(usize, Vec<usize>)> = retry
            .into_iter()
            .flat_map(|(j, cs)| cs.into_iter().map(move |c| (j, vec![c])))
            .collect();
        for (ask, result) in run_pipeline(client, state, jobs, &alone).await? {
            let Ask::Fast { job, cohorts } = ask else {
                continue;
            };
            let c = cohorts[0];
            verdicts[job][c] = Some(match result {
                Ok(rows) => {
                    let (_, set) = read_sets(&jobs[job], &cohorts, &rows).remove(0);
                    Verdict::Visible(set)
                }
                Err(e) => {
                    state.suspects.insert(jobs[job].key(c));
                    Verdict::Failed(e.message)
                }
            });
        }
    }
    Ok(verdicts
        .into_iter()
        .map(|v| {
            v.into_iter()
                .map(|x| x.unwrap_or_else(|| Verdict::Failed("not evaluated".to_owned())))
                .collect()
        })
        .collect())
}

/// Fast rows are `(cohort position, ordinal)`, slow rows `(ordinal)`.
fn read_sets(job: &Job<'_>, cohorts: &[usize], rows: &[Row]) -> Vec<(usize, RowSet)> {
    let mut sets: Vec<(usize, RowSet)> = cohorts
        .iter()
        .map(|&c| (c, RowSet::new(job.n_rows)))
        .collect();
    let slow = job.check.fast.is_none();
    for row in rows {
        let (c, ord): (i32, i64) = if slow {
            (cohorts[0] as i32, row.get(0))
        } else {
            (row.get(0), row.get(1))
        };
        if let Ok(k) = cohorts.binary_search(&(c as usize)) {
            sets[k].1.insert((ord - 1) as usize);
        }
    }
    sets
}

fn value_error(state: &EvalState, fast: &Fast, cohort: &Cohort) -> Option<String> {
    fast.funcs.iter().find_map(
        |f| match state.values.get(&(Arc::clone(&cohort.key), f.oid)) {
            Some(Err(e)) => Some(e.clone()),
            Some(Ok(_)) => None,
            None => Some("internal error: cohort value missing".to_owned()),
        },
    )
}

/// Computes, once per cohort, the value of each cohort function its fast
/// checks use, with that cohort's role and claims set.
async fn compute_values(
    client: &Client,
    state: &mut EvalState,
    jobs: &[Job<'_>],
) -> Result<(), IngestError> {
    let mut wanted: Vec<(&Cohort, &CohortFunc)> = Vec::new();
    let mut seen: HashSet<(Arc<str>, u32)> = HashSet::new();
    for job in jobs {
        let Some(fast) = &job.check.fast else {
            continue;
        };
        for cohort in job.cohorts {
            for f in &fast.funcs {
                let key = (Arc::clone(&cohort.key), f.oid);
                if !state.values.contains_key(&key) && seen.insert(key) {
                    wanted.push((cohort, f));
                }
            }
        }
    }
    if wanted.is_empty() {
        return Ok(());
    }
    if state.values.len() + wanted.len() > MAX_VALUES {
        state.values.clear();
    }
    let common = common(state, client).await?;
    let mut value_stmts: HashMap<u32, Statement> = HashMap::new();
    for (_, f) in &wanted {
        if let std::collections::hash_map::Entry::Vacant(slot) = value_stmts.entry(f.oid) {
            let sql = format!("select ({})::pg_catalog.text", f.call);
            slot.insert(state.statement(client, &sql).await?);
        }
    }
    let set_claims = &common.set_claims;
    let mut p: Pipeline<'_, (Arc<str>, u32)> = Pipeline::new();
    p.control(Control::Start, query(client, &common.begin, vec![]));
    for (cohort, f) in &wanted {
        let claims = as_claims(cohort);
        p.control(Control::Setup, query(client, &common.savepoint, vec![]));
        p.control(
            Control::Setup,
            Box::pin(async move { client.query(set_claims, &claims.params()).await }),
        );
        p.query(
            (Arc::clone(&cohort.key), f.oid),
            query(client, &value_stmts[&f.oid], vec![]),
        );
        p.control(Control::End, query(client, &common.rollback_to, vec![]));
    }
    p.control(Control::End, query(client, &common.rollback, vec![]));
    for (key, result) in p.run().await? {
        let value = result
            .map(|rows| rows.first().and_then(|r| r.get::<_, Option<String>>(0)))
            .map_err(|e| e.message);
        state.values.insert(key, value);
    }
    Ok(())
}

/// Sends the given runs (fast groups, fast lone cohorts, slow cohorts) in one pipeline.
async fn run_pipeline(
    client: &Client,
    state: &mut EvalState,
    jobs: &[Job<'_>],
    runs: &[(usize, Vec<usize>)],
) -> Result<Vec<(Ask, Result<Vec<Row>, Fail>)>, IngestError> {
    let common = common(state, client).await?;
    let mut stmts: Vec<Statement> = Vec::with_capacity(jobs.len());
    for job in jobs {
        let sql = match &job.check.fast {
            Some(f) => &f.sql,
            None => &job.check.slow_sql,
        };
        stmts.push(state.statement(client, sql).await?);
    }
    // Parameters of the fast runs: cohort positions, one text[] per function.
    type FastParams = (Vec<i32>, Vec<Vec<Option<String>>>);
    let params: Vec<FastParams> = runs
        .iter()
        .map(|(j, cohorts)| {
            let job = &jobs[*j];
            let Some(fast) = &job.check.fast else {
                return (Vec::new(), Vec::new());
            };
            let ids = cohorts.iter().map(|&c| c as i32).collect();
            let values = fast
                .funcs
                .iter()
                .map(|f| {
                    cohorts
                        .iter()
                        .map(|&c| {
                            let key = (Arc::clone(&job.cohorts[c].key), f.oid);
                            state
                                .values
                                .get(&key)
                                .cloned()
                                .and_then(Result::ok)
                                .flatten()
                        })
                        .collect()
                })
                .collect();
            (ids, values)
        })
        .collect();

    let set_claims = &common.set_claims;
    let mut p: Pipeline<'_, Ask> = Pipeline::new();
    p.control(Control::Start, query(client, &common.begin, vec![]));
    for ((j, cohorts), (ids, values)) in runs.iter().zip(&params) {
        let job = &jobs[*j];
        p.control(Control::Setup, query(client, &common.savepoint, vec![]));
        if job.check.fast.is_some() {
            let role: &(dyn ToSql + Sync) = &job.cohorts[cohorts[0]].role;
            p.control(Control::Setup, query(client, &common.set_role, vec![role]));
            let mut args: Vec<&(dyn ToSql + Sync)> = vec![&job.rows, ids];
            args.extend(values.iter().map(|v| v as &(dyn ToSql + Sync)));
            p.query(
                Ask::Fast {
                    job: *j,
                    cohorts: cohorts.clone(),
                },
                query(client, &stmts[*j], args),
            );
        } else {
            let claims = as_claims(job.cohorts[cohorts[0]]);
            p.control(
                Control::Setup,
                Box::pin(async move { client.query(set_claims, &claims.params()).await }),
            );
            p.query(
                Ask::Slow {
                    job: *j,
                    cohort: cohorts[0],
                },
                query(client, &stmts[*j], vec![&job.rows]),
            );
        }
        p.control(Control::End, query(client, &common.rollback_to, vec![]));
    }
    p.control(Control::End, query(client, &common.rollback, vec![]));
    p.run().await
}
