//! Pure helpers on policy text: what a stored policy expression refers to,
//! whether its claim-reading calls can be replaced by per-cohort columns, and
//! the SQL that evaluates a role's policies on captured row images.
//!
//! Nothing here talks to the database; `catalog` feeds it what it loaded.

use crate::tables::quote_ident;

/// Names of the columns our generated SQL adds next to the table's own
/// (unlikely to collide with user columns; documented).
pub(super) const ORD: &str = "\"__rg_ord\"";
const COHORT_REL: &str = "\"__rg_c\"";
const COHORT_ID: &str = "\"__rg_i\"";

/// What a stored expression (`pg_policy.polqual`, a node tree) refers to.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct TreeRefs {
    /// Every function the expression calls, directly or through operators,
    /// aggregates and window functions.
    pub(super) funcs: Vec<u32>,
    /// Every relation a sub-query reads.
    pub(super) rels: Vec<u32>,
    /// A whole-row reference (`tbl.*`): our row relation has an extra column.
    pub(super) whole_row: bool,
    /// A domain coercion (its CHECK may call anything).
    pub(super) domain: bool,
}

/// Scans a node tree (`pg_node_tree` text) for the oids it references.
///
/// Tokens are separated by unescaped whitespace (`outfuncs.c` backslash-escapes
/// whitespace and brackets inside names, so a name cannot fake a key).
pub(super) fn scan_tree(tree: &str) -> TreeRefs {
    let mut refs = TreeRefs::default();
    let mut tokens = Tokens { rest: tree };
    let mut key: Option<&str> = None;
    let mut in_var = false;
    while let Some(tok) = tokens.next() {
        if tok.starts_with('{') {
            let node = tok.trim_start_matches('{');
            in_var = node == "VAR";
            if node == "COERCETODOMAIN" {
                refs.domain = true;
            }
            key = None;
            continue;
        }
        if let Some(k) = tok.strip_prefix(':') {
            key = Some(k);
            continue;
        }
        if let Some(k) = key.take() {
            let Ok(n) = tok.parse::<i64>() else { continue };
            if k.ends_with("funcid") || k.ends_with("fnoid") {
                if n > 0 {
                    refs.funcs.push(n as u32);
                }
            } else if k == "relid" {
                if n > 0 {
                    refs.rels.push(n as u32);
                }
            } else if k == "varattno" && in_var && n == 0 {
                refs.whole_row = true;
            }
        }
    }
    refs.funcs.sort_unstable();
    refs.funcs.dedup();
    refs.rels.sort_unstable();
    refs.rels.dedup();
    refs
}

struct Tokens<'a> {
    rest: &'a str,
}

impl<'a> Tokens<'a> {
    fn next(&mut self) -> Option<&'a str> {
        let s = self.rest.trim_start_matches(|c: char| c.is_whitespace());
        if s.is_empty() {
            self.rest = s;
            return None;
        }
        let mut escaped = false;
        let mut end = s.len();
        for (i, c) in s.char_indices() {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c.is_whitespace() {
                end = i;
                break;
            }
        }
        self.rest = &s[end..];
        Some(&s[..end])
    }
}

/// Replaces each occurrence of `from` (a deparsed call such as `auth.uid()`)
/// outside string literals and quoted identifiers by `to`. Occurrences glued
/// to a preceding identifier character are not calls of that function.
pub(super) fn substitute(expr: &str, from: &str, to: &str) -> String {
    let bytes = expr.as_bytes();
    let mut out = String::with_capacity(expr.len());
    let mut i = 0;
    let mut copied = 0;
    while i < bytes.len() {
        match bytes[i] {
            q @ (b'\'' | b'"') => {
                // Skip the quoted run ('' and "" are escaped quotes).
                i += 1;
                while i < bytes.len() {
                    if bytes[i] == q {
                        if bytes.get(i + 1) == Some(&q) {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            _ if expr[i..].starts_with(from)
                && (i == 0 || !is_ident_byte(bytes[i - 1]) && bytes[i - 1] != b'.') =>
            {
                out.push_str(&expr[copied..i]);
                out.push_str(to);
                i += from.len();
                copied = i;
            }
            _ => i += 1,
        }
    }
    out.push_str(&expr[copied.min(expr.len())..]);
    out
}

fn is_ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

/// Whether a SQL function body only combines the request settings: every word
/// outside string literals is in a small allowlist (Supabase's `auth.uid()`,
/// `auth.jwt()`, `auth.role()`, `auth.email()` bodies pass; anything reading a
/// table or calling another function does not). Such a function's value is a
/// function of the claims alone, so it can be computed once per cohort.
pub(super) fn settings_only_body(body: &str) -> bool {
    const ALLOWED: &[&str] = &[
        "select",
        "coalesce",
        "nullif",
        "current_setting",
        "pg_catalog",
        "true",
        "false",
        "null",
        "jsonb",
        "json",
        "text",
        "uuid",
        "varchar",
        "character",
        "varying",
        "as",
        "is",
        "not",
        "and",
        "or",
        "case",
        "when",
        "then",
        "else",
        "end",
    ];
    let bytes = body.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\'' {
            // A string literal ('' is an escaped quote): its words do not count.
            i += 1;
            while i < bytes.len() {
                if bytes[i] == b'\'' {
                    if bytes.get(i + 1) == Some(&b'\'') {
                        i += 2;
                        continue;
                    }
                    break;
                }
                i += 1;
            }
            i += 1;
        } else if b == b'"' || b == b';' || b == b'$' {
            return false; // quoted names, several statements, dollar quoting: not ours to judge
        } else if b == b'-' && bytes.get(i + 1) == Some(&b'-') || b == b'/' {
            return false; // comments or division: keep it simple
        } else if b.is_ascii_alphabetic() || b == b'_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            let word = body[start..i].to_ascii_lowercase();
            if !ALLOWED.contains(&word.as_str()) {
                return false;
            }
        } else if b >= 0x80 {
            return false;
        } else {
            i += 1;
        }
    }
    true
}

/// One claim-reading function replaced by a cohort column in the fast path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct CohortFunc {
    pub(super) oid: u32,
    /// How `pg_get_expr` prints a call (`auth.uid()`).
    pub(super) call: String,
    /// Its return type, as `format_type` prints it (`uuid`, `jsonb`).
    pub(super) type_name: String,
}

/// The table a check runs on.
#[derive(Debug, Clone)]
pub(super) struct RowRelation {
    /// `"schema"."table"`.
    pub(super) qualified: String,
    /// The alias the policy text uses (the table's name).
    pub(super) alias: String,
    /// Column names in attnum order (for the alias column list).
    pub(super) columns: Vec<String>,
}

impl RowRelation {
    pub(super) fn new(schema: &str, table: &str, columns: Vec<String>) -> Self {
        RowRelation {
            qualified: format!("{}.{}", quote_ident(schema), quote_ident(table)),
            alias: quote_ident(table),
            columns,
        }
    }

    /// The row images (`$1`, a JSON array as text) as a relation named like
    /// the table, plus the 1-based ordinal of each row.
    fn recordset(&self) -> String {
        let cols: Vec<String> = self.columns.iter().map(|c| quote_ident(c)).collect();
        format!(
            "pg_catalog.json_populate_recordset(null::{}, $1::pg_catalog.text::pg_catalog.json) \
             with ordinality as {}({}, {ORD})",
            self.qualified,
            self.alias,
            cols.join(", ")
        )
    }
}

/// `(p1) or (p2) ...` and `(r1) and ...`: how PostgreSQL combines the
/// permissive and restrictive policies that apply. `None` when no permissive
/// policy applies (nothing is visible).
pub(super) fn combine(permissive: &[&str], restrictive: &[&str]) -> Option<String> {
    if permissive.is_empty() {
        return None;
    }
    let any: Vec<String> = permissive.iter().map(|p| format!("({p})")).collect();
    let mut expr = format!("({})", any.join(" or "));
    for r in restrictive {
        expr.push_str(&format!(" and ({r})"));
    }
    Some(expr)
}

/// The slow (general) check: the rows the current settings may see.
/// `$1`: the rows. Whole-row references work (the row relation is the
/// table's own row type).
pub(super) fn slow_sql(rel: &RowRelation, expr: &str) -> String {
    format!(
        "select e.{ORD} from pg_catalog.json_array_elements($1::pg_catalog.text::pg_catalog.json) \
         with ordinality as e(\"__rg_j\", {ORD}) \
         cross join lateral pg_catalog.json_populate_record(null::{q}, e.\"__rg_j\") as {a} \
         where ({expr})",
        q = rel.qualified,
        a = rel.alias
    )
}

/// The fast check: which cohort sees which row, in one statement. `$1`: the
/// rows; `$2`: cohort ids (`int4[]`); `$3..`: one `text[]` per function of
/// `funcs`, the value of that call for each cohort. `expr` must already have
/// each call replaced by [`cohort_column`]. The cohort relation is fenced
/// (`offset 0`) so each value is cast once, not once per comparison.
pub(super) fn fast_sql(rel: &RowRelation, expr: &str, funcs: &[CohortFunc]) -> String {
    let mut unnests = vec!["pg_catalog.unnest($2::pg_catalog.int4[])".to_owned()];
    let mut names = vec!["i".to_owned()];
    let mut casts = vec![format!("u.i as {COHORT_ID}")];
    for (k, f) in funcs.iter().enumerate() {
        unnests.push(format!("pg_catalog.unnest(${}::pg_catalog.text[])", k + 3));
        names.push(format!("v{k}"));
        casts.push(format!("u.v{k}::{} as \"__rg_v{k}\"", f.type_name));
    }
    format!(
        "select {COHORT_REL}.{COHORT_ID}, {a}.{ORD} from {rows} \
         join (select {casts} from rows from ({unnests}) as u({names}) offset 0) as {COHORT_REL} \
         on ({expr})",
        a = rel.alias,
        rows = rel.recordset(),
        casts = casts.join(", "),
        unnests = unnests.join(", "),
        names = names.join(", "),
    )
}

/// What replaces the `k`-th cohort function's calls in a fast expression.
pub(super) fn cohort_column(k: usize) -> String {
    format!("{COHORT_REL}.\"__rg_v{k}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_node_trees() {
        let tree = r#"{BOOLEXPR :boolop or :args ({SUBLINK :subLinkType 0 :subselect {QUERY :rtable ({RANGETBLENTRY :alias {ALIAS :aliasname m\ :funcid\ 7 :colnames <>} :rtekind 0 :relid 16404 :relkind r}) :jointree {FROMEXPR :quals {OPEXPR :opno 96 :opfuncid 65 :args ({VAR :varno 1 :varattno 1 :vartype 23} {FUNCEXPR :funcid 16388 :args <>})}}}} {NULLTEST :arg {VAR :varno 1 :varattno 0 :vartype 16393} :nulltesttype 1})}"#;
        let refs = scan_tree(tree);
        assert_eq!(refs.funcs, vec![65, 16388]);
        assert_eq!(refs.rels, vec![16404]);
        assert!(refs.whole_row);
        assert!(!refs.domain);
        let plain = scan_tree("{OPEXPR :opno 96 :opfuncid 65 :args ({VAR :varno 1 :varattno 3} {CONST :consttype 23 :constvalue 4 [ 0 0 0 0 ]})}");
        assert!(!plain.whole_row);
        assert!(plain.rels.is_empty());
    }

    #[test]
    fn substitutes_calls_outside_literals() {
        let expr = "((body IS DISTINCT FROM 'auth.uid()'::text) AND (user_id = auth.uid()) AND (\"auth.uid()\" = xauth.uid()))";
        assert_eq!(
            substitute(expr, "auth.uid()", "c.v0"),
            "((body IS DISTINCT FROM 'auth.uid()'::text) AND (user_id = c.v0) AND (\"auth.uid()\" = xauth.uid()))"
        );
        assert_eq!(
            substitute("a = 'it''s auth.uid()'", "auth.uid()", "X"),
            "a = 'it''s auth.uid()'"
        );
        assert_eq!(
            substitute("auth.uid() = auth.uid()", "auth.uid()", "X"),
            "X = X"
        );
    }

    #[test]
    fn recognises_settings_only_bodies() {
        // Supabase's definitions.
        assert!(settings_only_body(" select coalesce(nullif(current_setting('request.jwt.claim.sub', true), ''), (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub'))::uuid "));
        assert!(settings_only_body("select coalesce(nullif(current_setting('request.jwt.claim', true), ''), nullif(current_setting('request.jwt.claims', true), ''))::jsonb"));
        assert!(settings_only_body("select nullif(current_setting('request.jwt.claims', true)::jsonb ->> 'role', '')::text"));
        // Anything else goes the general way.
        assert!(!settings_only_body(
            "select id from users where email = current_setting('x')"
        ));
        assert!(!settings_only_body("select public.lookup()"));
        assert!(!settings_only_body("select now()"));
        assert!(!settings_only_body("select 1; delete from t"));
        assert!(!settings_only_body("select $$x$$"));
    }

    #[test]
    fn combines_like_postgres() {
        assert_eq!(combine(&[], &["a"]), None);
        assert_eq!(
            combine(&["a", "b"], &["c", "d"]).unwrap(),
            "((a) or (b)) and (c) and (d)"
        );
    }

    #[test]
    fn builds_sql() {
        let rel = RowRelation::new("public", "Notes", vec!["id".into(), "user_id".into()]);
        let f = CohortFunc {
            oid: 1,
            call: "auth.uid()".into(),
            type_name: "uuid".into(),
        };
        let expr = substitute("(user_id = auth.uid())", &f.call, &cohort_column(0));
        let sql = fast_sql(&rel, &expr, &[f]);
        assert!(sql.contains("null::\"public\".\"Notes\""), "{sql}");
        assert!(
            sql.contains("as \"Notes\"(\"id\", \"user_id\", \"__rg_ord\")"),
            "{sql}"
        );
        assert!(sql.contains("u.v0::uuid as \"__rg_v0\""), "{sql}");
        assert!(
            sql.contains("on ((user_id = \"__rg_c\".\"__rg_v0\"))"),
            "{sql}"
        );
        let slow = slow_sql(&rel, "(user_id = auth.uid())");
        assert!(
            slow.contains(
                "json_populate_record(null::\"public\".\"Notes\", e.\"__rg_j\") as \"Notes\""
            ),
            "{slow}"
        );
    }
}
