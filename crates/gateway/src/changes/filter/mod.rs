//! `postgres_changes` filters: `column=op.value`, comma-AND, `not.` negation.
//!
//! Parsed once at join time ([`parse`]: syntax, `in` lists, `is` keywords,
//! patterns compiled), checked against the table's column types when the
//! table is known ([`check_types`]: upstream's `subscription_check_filters`,
//! with its messages), and evaluated per matching change against the row's
//! JSON values ([`matches`]) with the filter value read as the column's type
//! (numbers compare as numbers, timestamps as instants, booleans as
//! booleans, text as text). SQL NULL semantics: a comparison with NULL is
//! unknown, and unknown (negated or not) never matches.
//!
//! Every filter costs bounded work per change: at most 100 `in` values, and
//! `like`/`ilike`/`match`/`imatch` run on finite automata, linear in the
//! value ([`pattern`]).

mod pattern;
mod value;

use std::cmp::Ordering;

use serde_json::{Map, Value};

pub use pattern::Pattern;
pub(crate) use value::parse_time;
pub use value::{check_cast, kind_of, sql_type_name, text_compatible, Kind};

/// Most values an `in` list may carry (upstream's limit).
pub const MAX_IN_VALUES: usize = 100;

/// Upstream's operators (`@filter_types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterOp {
    /// `=`
    Eq,
    /// `<>`
    Neq,
    /// `<`
    Lt,
    /// `<=`
    Lte,
    /// `>`
    Gt,
    /// `>=`
    Gte,
    /// `= ANY(list)`
    In,
    /// `LIKE`
    Like,
    /// `ILIKE`
    Ilike,
    /// `~` (regular expression, case-sensitive)
    Match,
    /// `~*` (regular expression, case-insensitive)
    Imatch,
    /// `IS null|true|false|unknown`
    Is,
    /// `IS DISTINCT FROM`
    IsDistinct,
}

impl FilterOp {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "eq" => FilterOp::Eq,
            "neq" => FilterOp::Neq,
            "lt" => FilterOp::Lt,
            "lte" => FilterOp::Lte,
            "gt" => FilterOp::Gt,
            "gte" => FilterOp::Gte,
            "in" => FilterOp::In,
            "like" => FilterOp::Like,
            "ilike" => FilterOp::Ilike,
            "match" => FilterOp::Match,
            "imatch" => FilterOp::Imatch,
            "is" => FilterOp::Is,
            "isdistinct" => FilterOp::IsDistinct,
            _ => return None,
        })
    }

    /// The operator's name in filters and upstream's messages.
    pub fn name(self) -> &'static str {
        match self {
            FilterOp::Eq => "eq",
            FilterOp::Neq => "neq",
            FilterOp::Lt => "lt",
            FilterOp::Lte => "lte",
            FilterOp::Gt => "gt",
            FilterOp::Gte => "gte",
            FilterOp::In => "in",
            FilterOp::Like => "like",
            FilterOp::Ilike => "ilike",
            FilterOp::Match => "match",
            FilterOp::Imatch => "imatch",
            FilterOp::Is => "is",
            FilterOp::IsDistinct => "isdistinct",
        }
    }

    fn is_pattern(self) -> bool {
        matches!(
            self,
            FilterOp::Like | FilterOp::Ilike | FilterOp::Match | FilterOp::Imatch
        )
    }
}

/// One condition.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    /// Column name.
    pub column: String,
    /// Operator.
    pub op: FilterOp,
    /// `not.` prefix.
    pub negated: bool,
    /// Value(s), unquoted; one unless `in`.
    pub values: Vec<String>,
    /// The compiled pattern of `like`/`ilike`/`match`/`imatch`.
    pub pattern: Option<Pattern>,
}

/// Why a filter was refused, worded as upstream words each case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterError {
    /// Realtime's parser refused it: ``Error parsing `filter` params: <detail>``.
    Syntax(String),
    /// Realtime's subscription check (in the database upstream) refused it:
    /// ``Unable to subscribe … Exception: <detail>``.
    Exception(String),
}

/// Splits on `sep` outside parentheses and double quotes.
fn split_top_level(s: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut quoted, mut escaped, mut start) = (0i32, false, false, 0);
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => depth = (depth - 1).max(0),
            c if c == sep && !quoted && depth == 0 => {
                parts.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// Removes surrounding double quotes and backslash escapes.
fn unquote(s: &str) -> String {
    let t = s.trim();
    if t.len() >= 2 && t.starts_with('"') && t.ends_with('"') {
        let mut out = String::with_capacity(t.len());
        let mut esc = false;
        for c in t[1..t.len() - 1].chars() {
            if esc {
                out.push(c);
                esc = false;
            } else if c == '\\' {
                esc = true;
            } else {
                out.push(c);
            }
        }
        out
    } else {
        t.to_owned()
    }
}

/// Parses a filter string and compiles its patterns.
pub fn parse(filter: &str) -> Result<Vec<Condition>, FilterError> {
    if filter.trim().is_empty() {
        return Ok(Vec::new());
    }
    let syntax = |d: String| FilterError::Syntax(d);
    let mut out = Vec::new();
    for segment in split_top_level(filter.trim(), ',') {
        let segment = segment.trim();
        if segment.is_empty() {
            return Err(syntax(
                "filter must not contain empty segments (check for extra commas)".into(),
            ));
        }
        let Some((column, rest)) = segment.split_once('=') else {
            return Err(syntax(format!("[{segment:?}]")));
        };
        let (negated, rest) = match rest.strip_prefix("not.") {
            Some(r) => (true, r),
            None => (false, rest),
        };
        let Some((op, value)) = rest.split_once('.') else {
            return Err(syntax(format!("[{rest:?}]")));
        };
        let Some(op) = FilterOp::parse(op) else {
            return Err(syntax(format!("[{op:?}, {value:?}]")));
        };
        let values = if op == FilterOp::In {
            let inner = value
                .strip_prefix('(')
                .and_then(|v| v.strip_suffix(')'))
                .ok_or_else(|| syntax("`in` filter value must be wrapped by parentheses".into()))?;
            let vals: Vec<String> = split_top_level(inner, ',')
                .into_iter()
                .map(unquote)
                .collect();
            if vals.len() > MAX_IN_VALUES {
                return Err(FilterError::Exception(format!(
                    "too many values for `in` filter. Maximum {MAX_IN_VALUES}"
                )));
            }
            vals
        } else {
            vec![unquote(value)]
        };
        let first = values[0].as_str();
        if op == FilterOp::Is && !["null", "true", "false", "unknown"].contains(&first) {
            return Err(FilterError::Exception(
                "invalid value for is filter: must be null, true, false, or unknown".into(),
            ));
        }
        let pattern = match op {
            FilterOp::Like | FilterOp::Ilike => {
                Some(Pattern::like(first, op == FilterOp::Ilike).map_err(FilterError::Exception)?)
            }
            FilterOp::Match | FilterOp::Imatch => {
                Some(Pattern::regex(first, op == FilterOp::Imatch).map_err(|e| {
                    FilterError::Exception(format!(
                        "invalid regular expression for {} filter: {e}",
                        op.name()
                    ))
                })?)
            }
            _ => None,
        };
        out.push(Condition {
            column: column.trim().to_owned(),
            op,
            negated,
            values,
            pattern,
        });
    }
    Ok(out)
}

/// Upstream's join-time checks of each condition against its column's type
/// (`type_of` gives a column's `pg_type.typname`; columns are known to exist):
/// operators that need text or boolean columns, and values that must cast to
/// the column type. `Err` is the exception's message.
pub fn check_types<'a>(
    conds: &[Condition],
    type_of: impl Fn(&str) -> Option<&'a str>,
) -> Result<(), String> {
    for c in conds {
        let Some(ty) = type_of(&c.column) else {
            return Err(format!("failed to lookup type for column {}", c.column));
        };
        match c.op {
            FilterOp::Is => {
                if c.values[0] != "null" && ty != "bool" {
                    return Err(format!(
                        "is {} filter requires a boolean column, got {}",
                        c.values[0],
                        sql_type_name(ty)
                    ));
                }
            }
            op if op.is_pattern() => {
                if !text_compatible(ty) {
                    return Err(format!(
                        "operator {} requires a text-compatible column type, got {}",
                        op.name(),
                        sql_type_name(ty)
                    ));
                }
            }
            _ => {
                for v in &c.values {
                    check_cast(ty, v)?;
                }
            }
        }
    }
    Ok(())
}

impl Condition {
    /// Three-valued evaluation against a row.
    fn eval(&self, kind: Kind, row: &Map<String, Value>) -> Option<bool> {
        let v = row.get(&self.column).unwrap_or(&Value::Null);
        let first = self.values.first().map(String::as_str).unwrap_or_default();
        let result = match self.op {
            FilterOp::Is => {
                Some(match first {
                    "null" => v.is_null(),
                    "true" => v == &Value::Bool(true),
                    "false" => v == &Value::Bool(false),
                    _ => v.is_null(), // unknown
                })
            }
            FilterOp::IsDistinct => {
                if v.is_null() {
                    Some(true)
                } else {
                    value::compare(kind, v, first).map(|o| o != Ordering::Equal)
                }
            }
            FilterOp::In => {
                if v.is_null() {
                    None
                } else {
                    Some(
                        self.values
                            .iter()
                            .any(|f| value::compare(kind, v, f) == Some(Ordering::Equal)),
                    )
                }
            }
            FilterOp::Like | FilterOp::Ilike | FilterOp::Match | FilterOp::Imatch => {
                let pattern = self.pattern.as_ref()?;
                match v {
                    Value::Null => None,
                    Value::String(s) => Some(pattern.is_match(s)),
                    // Wildcard bindings only (a known table's column is text).
                    other => Some(pattern.is_match(&other.to_string())),
                }
            }
            op => value::compare(kind, v, first).map(|o| match op {
                FilterOp::Eq => o == Ordering::Equal,
                FilterOp::Neq => o != Ordering::Equal,
                FilterOp::Lt => o == Ordering::Less,
                FilterOp::Lte => o != Ordering::Greater,
                FilterOp::Gt => o == Ordering::Greater,
                FilterOp::Gte => o != Ordering::Less,
                _ => false,
            }),
        };
        if self.negated {
            result.map(|r| !r)
        } else {
            result
        }
    }
}

/// Whether every condition holds; `kind` gives each column's comparison kind.
pub fn matches(conds: &[Condition], kind: impl Fn(&str) -> Kind, row: &Map<String, Value>) -> bool {
    conds
        .iter()
        .all(|c| c.eval(kind(&c.column), row) == Some(true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    fn check(filter: &str, kinds: &[Kind], r: Value) -> bool {
        let conds = parse(filter).unwrap();
        let cols: Vec<String> = conds.iter().map(|c| c.column.clone()).collect();
        let kind = |c: &str| kinds[cols.iter().position(|x| x == c).unwrap()];
        matches(&conds, kind, &row(r))
    }

    fn syntax(filter: &str) -> String {
        match parse(filter) {
            Err(FilterError::Syntax(d)) => d,
            other => panic!("{filter}: {other:?}"),
        }
    }

    fn exception(filter: &str) -> String {
        match parse(filter) {
            Err(FilterError::Exception(d)) => d,
            other => panic!("{filter}: {other:?}"),
        }
    }

    #[test]
    fn parses_operators() {
        let c = parse("id=eq.1").unwrap();
        assert_eq!(c[0].column, "id");
        assert_eq!(c[0].op, FilterOp::Eq);
        let c = parse(r#"status=in.(paid,"ship,ped"),total=not.gt.10"#).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].values, vec!["paid", "ship,ped"]);
        assert!(c[1].negated);
        for op in ["match", "imatch", "like", "ilike", "isdistinct"] {
            assert_eq!(parse(&format!("s={op}.x")).unwrap()[0].op.name(), op);
        }
        assert_eq!(syntax("subject=foo.hey"), r#"["foo", "hey"]"#);
        assert_eq!(syntax("undefined"), r#"["undefined"]"#);
        assert!(syntax("a=eq.1,,b=eq.2").contains("empty segments"));
        assert!(syntax("a=in.1,2").contains("parentheses"));
        assert!(parse("").unwrap().is_empty());
        assert!(parse("  ").unwrap().is_empty());
        // Unbalanced parentheses never make later commas invisible.
        assert_eq!(parse("a=eq.),b=eq.2").unwrap().len(), 2);
    }

    #[test]
    fn upstream_subscription_check_errors() {
        let list = (0..=MAX_IN_VALUES)
            .map(|i| i.to_string())
            .collect::<Vec<_>>();
        assert_eq!(
            exception(&format!("id=in.({})", list.join(","))),
            "too many values for `in` filter. Maximum 100"
        );
        assert!(parse(&format!("id=in.({})", list[1..].join(","))).is_ok());
        assert_eq!(
            exception("x=is.maybe"),
            "invalid value for is filter: must be null, true, false, or unknown"
        );
        assert!(exception("s=match.(").starts_with("invalid regular expression for match filter: "));
        assert!(
            exception("s=imatch.[").starts_with("invalid regular expression for imatch filter: ")
        );
        assert_eq!(
            exception("s=like.ab\\"),
            "LIKE pattern must not end with escape character"
        );
    }

    #[test]
    fn type_checks_at_join() {
        let types = |c: &str| match c {
            "id" => Some("int4"),
            "ok" => Some("bool"),
            "at" => Some("timestamptz"),
            "name" => Some("varchar"),
            _ => None,
        };
        let check = |f: &str| check_types(&parse(f).unwrap(), types);
        assert_eq!(
            check("id=eq.abc").unwrap_err(),
            r#"invalid input syntax for type integer: "abc""#
        );
        assert_eq!(
            check("id=in.(1,x)").unwrap_err(),
            r#"invalid input syntax for type integer: "x""#
        );
        assert_eq!(
            check("id=like.1%").unwrap_err(),
            "operator like requires a text-compatible column type, got integer"
        );
        assert_eq!(
            check("id=is.true").unwrap_err(),
            "is true filter requires a boolean column, got integer"
        );
        assert!(check("id=is.null,ok=is.false,name=imatch.^a,id=not.gte.5").is_ok());
        assert!(check("at=gt.2024-01-01,ok=eq.t,id=isdistinct.3").is_ok());
        assert_eq!(
            check("ghost=eq.1").unwrap_err(),
            "failed to lookup type for column ghost"
        );
    }

    #[test]
    fn evaluates_with_types() {
        use Kind::*;
        assert!(check("id=eq.1", &[Number], json!({"id": 1})));
        assert!(!check("id=eq.1", &[Number], json!({"id": 2})));
        assert!(check("total=gt.10", &[Number], json!({"total": 10.5})));
        assert!(
            check("total=gt.9", &[Number], json!({"total": 10})),
            "numeric, not text, order"
        );
        assert!(check(
            "status=in.(paid,shipped)",
            &[Text],
            json!({"status": "shipped"})
        ));
        assert!(!check(
            "status=in.(paid,shipped)",
            &[Text],
            json!({"status": "new"})
        ));
        assert!(check(
            "status=not.eq.paid",
            &[Text],
            json!({"status": "new"})
        ));
        assert!(
            !check("status=not.eq.paid", &[Text], json!({"status": null})),
            "NULL never matches"
        );
        assert!(check(
            "id=gt.1,id=lt.5",
            &[Number, Number],
            json!({"id": 3})
        ));
        assert!(!check(
            "id=gt.1,id=lt.5",
            &[Number, Number],
            json!({"id": 7})
        ));
        assert!(check("name=like.al%", &[Text], json!({"name": "alice"})));
        assert!(check("name=ilike.%LIC%", &[Text], json!({"name": "alice"})));
        assert!(
            !check("name=ilike.*LIC*", &[Text], json!({"name": "alice"})),
            "* is literal"
        );
        assert!(check("name=not.like.al%", &[Text], json!({"name": "bob"})));
        assert!(!check("name=not.like.al%", &[Text], json!({"name": null})));
        assert!(check(
            "name=match.^a.*e$",
            &[Text],
            json!({"name": "alice"})
        ));
        assert!(check("name=imatch.LIC", &[Text], json!({"name": "alice"})));
        assert!(!check("name=match.LIC", &[Text], json!({"name": "alice"})));
        assert!(check("done=is.true", &[Bool], json!({"done": true})));
        assert!(check("done=not.is.true", &[Bool], json!({"done": null})));
        assert!(check("x=is.null", &[Text], json!({"x": null})));
        assert!(check("ok=eq.t", &[Bool], json!({"ok": true})));
        assert!(check(
            "at=gt.2025-01-01T00:00:00Z",
            &[Time],
            json!({"at": "2025-01-01T01:00:00+00:00"})
        ));
        assert!(!check(
            "at=gt.2025-01-01T00:00:00Z",
            &[Time],
            json!({"at": "2025-01-01T01:00:00+02:00"})
        ));
        assert!(check("u=eq.ABC", &[Uuid], json!({"u": "abc"})));
    }
}
