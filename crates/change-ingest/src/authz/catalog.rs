//! What each role may read of each enabled table: column privileges, whether
//! RLS applies, and the SELECT policies to evaluate. Loaded in a few
//! queries for all enabled tables × roles at once, kept until the catalog
//! fingerprint changes — never a query per change.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio_postgres::Client;

use super::policy::{self, CohortFunc, RowRelation};
use crate::IngestError;

/// What one role may read of one table.
#[derive(Debug)]
pub struct TableAccess {
    /// The table's oid.
    pub table_oid: u32,
    /// `schema.table` (for messages).
    pub table_name: String,
    /// The role.
    pub role: String,
    /// Columns the role may `SELECT`, in attnum order.
    pub selectable: Vec<String>,
    /// Every column is selectable (row images need no narrowing).
    pub all_selectable: bool,
    /// Primary-key columns (empty: no primary key).
    pub primary_key: Vec<String>,
    /// Row level security is enabled on the table.
    pub rls_enabled: bool,
    /// Which rows the role sees.
    pub rule: RowRule,
}

impl TableAccess {
    /// Whether the role may select `column`.
    pub fn can_select(&self, column: &str) -> bool {
        self.all_selectable || self.selectable.iter().any(|c| c == column)
    }

    /// Whether the role may select every primary-key column.
    pub fn pk_selectable(&self) -> bool {
        self.primary_key.iter().all(|c| self.can_select(c))
    }
}

/// Which rows a role sees.
#[derive(Debug)]
pub enum RowRule {
    /// Every row: RLS is off for the table, or the role bypasses it
    /// (superuser, `BYPASSRLS`, table owner without `FORCE`).
    All,
    /// No row: RLS is on and no permissive SELECT policy applies to the role.
    Nothing,
    /// The rows the role's policies let through.
    Check(Arc<Check>),
}

/// A role's combined SELECT policies on one table, ready to evaluate.
#[derive(Debug)]
pub struct Check {
    /// Unique per loaded check (keys the "suspect cohort" memory).
    pub(super) id: u64,
    /// The table's oid.
    pub table_oid: u32,
    /// `schema.table` (for messages).
    pub table_name: String,
    /// The general form: the combined policy text, run once per cohort.
    pub(super) slow_sql: String,
    /// The cohort-join form, when the policies read the claims only through
    /// functions whose value depends on the claims alone.
    pub(super) fast: Option<Fast>,
}

impl Check {
    /// Whether one statement evaluates every cohort at once.
    pub fn is_fast(&self) -> bool {
        self.fast.is_some()
    }
}

#[derive(Debug)]
pub(super) struct Fast {
    pub(super) sql: String,
    pub(super) funcs: Vec<CohortFunc>,
}

/// Roles, and per enabled table and role, what that role may read.
#[derive(Debug, Default)]
pub struct Catalog {
    roles: HashMap<String, u32>,
    tables: HashMap<u32, HashMap<String, Arc<TableAccess>>>,
    /// The fingerprint it was loaded at.
    pub(super) fingerprint: String,
}

impl Catalog {
    /// How many roles were loaded (0: never loaded).
    pub fn role_count(&self) -> usize {
        self.roles.len()
    }

    /// Whether `role` exists in the database.
    pub fn role_exists(&self, role: &str) -> bool {
        self.roles.contains_key(role)
    }

    /// What `role` may read of the table, if both are known.
    pub fn access(&self, table_oid: u32, role: &str) -> Option<&Arc<TableAccess>> {
        self.tables.get(&table_oid)?.get(role)
    }

    /// Whether the table was loaded (it was enabled at load time).
    pub fn has_table(&self, table_oid: u32) -> bool {
        self.tables.contains_key(&table_oid)
    }

    /// Adds a role by hand (callers that know the answer, and tests).
    pub fn add_role(&mut self, role: &str) {
        let oid = self.roles.len() as u32 + 1;
        self.roles.entry(role.to_owned()).or_insert(oid);
    }

    /// Adds what a role may read of a table by hand (see [`Catalog::add_role`]).
    pub fn add_access(&mut self, access: TableAccess) {
        self.tables
            .entry(access.table_oid)
            .or_default()
            .insert(access.role.clone(), Arc::new(access));
    }
}

static CHECK_IDS: AtomicU64 = AtomicU64::new(1);

/// Everything the fingerprint covers changes what [`load`] would return:
/// roles and memberships, privileges, RLS flags and owners of enabled tables
/// (and RLS flags of any table a policy may read), columns, policies, and
/// the functions policies call.
const FINGERPRINT_SQL: &str = "select pg_catalog.md5(pg_catalog.concat_ws('|',
    (select pg_catalog.string_agg((r.oid, r.rolname, r.rolsuper, r.rolbypassrls, r.rolinherit)::text, ';' order by r.oid)
       from pg_catalog.pg_roles r),
    (select pg_catalog.string_agg(m::text, ';' order by m::text) from pg_catalog.pg_auth_members m),
    (select pg_catalog.string_agg((c.oid, c.relacl, c.relrowsecurity, c.relforcerowsecurity, c.relowner, c.relkind)::text, ';' order by c.oid)
       from pg_catalog.pg_class c where c.oid = any($1) or c.relrowsecurity),
    (select pg_catalog.string_agg((a.attrelid, a.attnum, a.attname, a.attacl)::text, ';' order by a.attrelid, a.attnum)
       from pg_catalog.pg_attribute a where a.attrelid = any($1) and a.attnum > 0 and not a.attisdropped),
    (select pg_catalog.string_agg((i.indrelid, i.indkey, i.indisprimary)::text, ';' order by i.indexrelid)
       from pg_catalog.pg_index i where i.indrelid = any($1) and i.indisprimary),
    (select pg_catalog.string_agg((p.oid, p.polrelid, p.polcmd, p.polpermissive, p.polroles, p.polqual)::text, ';' order by p.oid)
       from pg_catalog.pg_policy p where p.polrelid = any($1)),
    (select pg_catalog.string_agg((f.oid, f.provolatile, f.prosrc, f.prorettype)::text, ';' order by f.oid)
       from pg_catalog.pg_proc f
       join pg_catalog.pg_namespace n on n.oid = f.pronamespace
       where n.nspname <> 'pg_catalog' and f.pronargs = 0)))";

/// The current fingerprint of what [`load`] reads for these tables.
pub(super) async fn fingerprint(client: &Client, tables: &[u32]) -> Result<String, IngestError> {
    Ok(client
        .query_one(FINGERPRINT_SQL, &[&tables])
        .await?
        .get::<_, Option<String>>(0)
        .unwrap_or_default())
}

struct TableRow {
    oid: u32,
    schema: String,
    name: String,
    rls: bool,
    columns: Vec<String>,
    pk: Vec<String>,
}

struct PolicyRow {
    permissive: bool,
    expr: String,
    refs: policy::TreeRefs,
}

/// Loads the catalog for the given (enabled) tables. The connection must
/// have `search_path = ''`, so `pg_get_expr` schema-qualifies every function
/// outside `pg_catalog`.
pub(super) async fn load(client: &Client, tables: &[u32]) -> Result<Catalog, IngestError> {
    let fingerprint = fingerprint(client, tables).await?;
    let mut catalog = Catalog {
        fingerprint,
        ..Catalog::default()
    };
    for row in client
        .query(
            "select r.rolname::text, r.oid from pg_catalog.pg_roles r where r.rolname !~ '^pg_'",
            &[],
        )
        .await?
    {
        catalog.roles.insert(row.get(0), row.get(1));
    }

    let mut table_rows: HashMap<u32, TableRow> = HashMap::new();
    for row in client
        .query(
            "select c.oid, n.nspname::text, c.relname::text, c.relrowsecurity,
                coalesce((select pg_catalog.array_agg(a.attname::text order by a.attnum)
                          from pg_catalog.pg_attribute a
                          where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped), '{}'),
                coalesce((select pg_catalog.array_agg(a.attname::text
                                  order by pg_catalog.array_position(i.indkey::int2[], a.attnum))
                          from pg_catalog.pg_index i
                          join pg_catalog.pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
                          where i.indrelid = c.oid and i.indisprimary), '{}')
             from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
             where c.oid = any($1)",
            &[&tables],
        )
        .await?
    {
        table_rows.insert(
            row.get(0),
            TableRow {
                oid: row.get(0),
                schema: row.get(1),
                name: row.get(2),
                rls: row.get(3),
                columns: row.get(4),
                pk: row.get(5),
            },
        );
    }

    let mut policies: HashMap<u32, PolicyRow> = HashMap::new();
    let mut funcs_needed: Vec<u32> = Vec::new();
    let mut rels_needed: Vec<u32> = Vec::new();
    for row in client
        .query(
            "select p.oid, p.polpermissive, pg_catalog.pg_get_expr(p.polqual, p.polrelid), p.polqual::text
             from pg_catalog.pg_policy p
             where p.polrelid = any($1) and p.polcmd in ('r', '*') and p.polqual is not null",
            &[&tables],
        )
        .await?
    {
        let refs = policy::scan_tree(row.get(3));
        funcs_needed.extend(&refs.funcs);
        rels_needed.extend(&refs.rels);
        policies.insert(
            row.get(0),
            PolicyRow {
                permissive: row.get(1),
                expr: row.get(2),
                refs,
            },
        );
    }
    let funcs = classify_functions(client, &funcs_needed).await?;
    let rls_rels = rls_relations(client, &rels_needed).await?;

    // Per (table, role): owner bypass, selectable columns, applicable policies.
    let rows = client
        .query(
            "select c.oid, r.rolname::text,
                r.rolsuper or r.rolbypassrls
                    or (pg_catalog.pg_has_role(r.oid, c.relowner, 'USAGE') and not c.relforcerowsecurity),
                coalesce((select pg_catalog.array_agg(a.attname::text order by a.attnum)
                          from pg_catalog.pg_attribute a
                          where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
                            and pg_catalog.has_column_privilege(r.oid, c.oid, a.attnum, 'SELECT')), '{}'),
                coalesce((select pg_catalog.array_agg(p.oid order by p.polname)
                          from pg_catalog.pg_policy p
                          where p.polrelid = c.oid and p.polcmd in ('r', '*') and p.polqual is not null
                            and (0::oid = any(p.polroles)
                                 or exists (select 1 from pg_catalog.unnest(p.polroles) x
                                            where x <> 0 and pg_catalog.pg_has_role(r.oid, x, 'USAGE')))), '{}')
             from pg_catalog.pg_class c cross join pg_catalog.pg_roles r
             where c.oid = any($1) and r.rolname !~ '^pg_'",
            &[&tables],
        )
        .await?;
    for row in rows {
        let oid: u32 = row.get(0);
        let Some(t) = table_rows.get(&oid) else {
            continue;
        };
        let role: String = row.get(1);
        let bypass: bool = row.get(2);
        let selectable: Vec<String> = row.get(3);
        let applicable: Vec<u32> = row.get(4);
        let table_name = format!("{}.{}", t.schema, t.name);
        let rule = if !t.rls || bypass {
            RowRule::All
        } else {
            let applied: Vec<&PolicyRow> =
                applicable.iter().filter_map(|p| policies.get(p)).collect();
            compile(t, &table_name, &applied, &funcs, &rls_rels)
        };
        let access = TableAccess {
            table_oid: oid,
            table_name,
            all_selectable: selectable.len() == t.columns.len(),
            selectable,
            primary_key: t.pk.clone(),
            rls_enabled: t.rls,
            role: role.clone(),
            rule,
        };
        catalog
            .tables
            .entry(oid)
            .or_default()
            .insert(role, Arc::new(access));
    }
    Ok(catalog)
}

/// How a function referenced by a policy may be treated.
#[derive(Debug, Clone)]
enum FuncKind {
    /// Cannot read the claims (a catalog function other than the settings
    /// readers, or an immutable one).
    Safe,
    /// Reads the claims only: its value per cohort can be precomputed.
    Cohort(CohortFunc),
    /// Anything else: the policy needs the general (per cohort) path.
    Opaque,
}

async fn classify_functions(
    client: &Client,
    oids: &[u32],
) -> Result<HashMap<u32, FuncKind>, IngestError> {
    let mut out = HashMap::new();
    if oids.is_empty() {
        return Ok(out);
    }
    for row in client
        .query(
            "select f.oid, n.nspname::text, f.proname::text, f.provolatile::text, f.pronargs::int4,
                    l.lanname::text, f.prosrc, pg_catalog.format_type(f.prorettype, null),
                    pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(f.proname) || '()'
             from pg_catalog.pg_proc f
             join pg_catalog.pg_namespace n on n.oid = f.pronamespace
             join pg_catalog.pg_language l on l.oid = f.prolang
             where f.oid = any($1)",
            &[&oids],
        )
        .await?
    {
        let oid: u32 = row.get(0);
        let schema: String = row.get(1);
        let name: String = row.get(2);
        let volatility: String = row.get(3);
        let nargs: i32 = row.get(4);
        let language: String = row.get(5);
        let body: String = row.get(6);
        let kind = if schema == "pg_catalog" {
            if matches!(name.as_str(), "current_setting" | "set_config") {
                FuncKind::Opaque
            } else {
                FuncKind::Safe
            }
        } else if nargs == 0
            && volatility != "v"
            && language == "sql"
            && policy::settings_only_body(&body)
        {
            FuncKind::Cohort(CohortFunc {
                oid,
                type_name: row.get(7),
                call: row.get(8),
            })
        } else if volatility == "i" {
            FuncKind::Safe
        } else {
            FuncKind::Opaque
        };
        out.insert(oid, kind);
    }
    Ok(out)
}

/// Relations a policy may read whose content can depend on the claims:
/// tables with RLS, and anything that is not a plain table (views, ...).
async fn rls_relations(client: &Client, oids: &[u32]) -> Result<Vec<u32>, IngestError> {
    if oids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(client
        .query(
            "select c.oid from pg_catalog.pg_class c
             where c.oid = any($1) and (c.relrowsecurity or c.relkind not in ('r', 'p'))",
            &[&oids],
        )
        .await?
        .into_iter()
        .map(|r| r.get(0))
        .collect())
}

/// Builds the check for one role's applicable policies.
fn compile(
    t: &TableRow,
    table_name: &str,
    applied: &[&PolicyRow],
    funcs: &HashMap<u32, FuncKind>,
    rls_rels: &[u32],
) -> RowRule {
    let permissive: Vec<&str> = applied
        .iter()
        .filter(|p| p.permissive)
        .map(|p| p.expr.as_str())
        .collect();
    let restrictive: Vec<&str> = applied
        .iter()
        .filter(|p| !p.permissive)
        .map(|p| p.expr.as_str())
        .collect();
    let Some(expr) = policy::combine(&permissive, &restrictive) else {
        return RowRule::Nothing;
    };
    let rel = RowRelation::new(&t.schema, &t.name, t.columns.clone());
    // The fast form: every claim reader is a cohort function, nothing opaque,
    // no whole-row reference, no relation whose rows depend on the claims.
    let mut cohort_funcs: Vec<CohortFunc> = Vec::new();
    let mut fast_ok = true;
    for p in applied {
        if p.refs.whole_row || p.refs.domain || p.refs.rels.iter().any(|r| rls_rels.contains(r)) {
            fast_ok = false;
        }
        for f in &p.refs.funcs {
            match funcs.get(f) {
                Some(FuncKind::Safe) => {}
                Some(FuncKind::Cohort(cf)) => {
                    if !cohort_funcs.iter().any(|x| x.oid == cf.oid) {
                        cohort_funcs.push(cf.clone());
                    }
                }
                Some(FuncKind::Opaque) | None => fast_ok = false,
            }
        }
    }
    let fast = fast_ok.then(|| {
        let mut fast_expr = expr.clone();
        for (k, f) in cohort_funcs.iter().enumerate() {
            fast_expr = policy::substitute(&fast_expr, &f.call, &policy::cohort_column(k));
        }
        Fast {
            sql: policy::fast_sql(&rel, &fast_expr, &cohort_funcs),
            funcs: cohort_funcs,
        }
    });
    RowRule::Check(Arc::new(Check {
        id: CHECK_IDS.fetch_add(1, Ordering::Relaxed),
        table_oid: t.oid,
        table_name: table_name.to_owned(),
        slow_sql: policy::slow_sql(&rel, &expr),
        fast,
    }))
}
