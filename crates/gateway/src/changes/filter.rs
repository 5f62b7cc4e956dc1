//! `postgres_changes` filters: `column=op.value`, comma-AND, `not.` negation.
//!
//! Parsed once at join time, evaluated per matching change against the row's
//! JSON values, after casting the filter value to the column's type (numbers
//! compare as numbers, timestamps as instants, booleans as booleans, text as
//! text). SQL NULL semantics: a comparison with NULL is unknown, and unknown
//! (negated or not) never matches.

use std::cmp::Ordering;

use serde_json::{Map, Value};

/// Comparison operators (Realtime's set, minus the regex ones).
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
            "is" => FilterOp::Is,
            "isdistinct" => FilterOp::IsDistinct,
            _ => return None,
        })
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
            ')' if !quoted => depth -= 1,
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

/// Parses a filter string. `Err` carries the detail of Realtime's
/// ``Error parsing `filter` params: <detail>`` message.
pub fn parse(filter: &str) -> Result<Vec<Condition>, String> {
    if filter.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for segment in split_top_level(filter, ',') {
        let segment = segment.trim();
        if segment.is_empty() {
            return Err("filter must not contain empty segments (check for extra commas)".into());
        }
        let Some((column, rest)) = segment.split_once('=') else {
            return Err(format!("[{segment:?}]"));
        };
        let (negated, rest) = match rest.strip_prefix("not.") {
            Some(r) => (true, r),
            None => (false, rest),
        };
        let Some((op, value)) = rest.split_once('.') else {
            return Err(format!("[{rest:?}]"));
        };
        let Some(op) = FilterOp::parse(op) else {
            return Err(format!("[{op:?}, {value:?}]"));
        };
        let values = if op == FilterOp::In {
            let inner = value
                .trim()
                .strip_prefix('(')
                .and_then(|v| v.strip_suffix(')'))
                .ok_or_else(|| "`in` filter value must be wrapped by parentheses".to_owned())?;
            let vals: Vec<String> = split_top_level(inner, ',')
                .into_iter()
                .map(unquote)
                .collect();
            if vals.len() > 100 {
                return Err("too many values for `in` filter. Maximum 100".into());
            }
            vals
        } else {
            if op == FilterOp::Is
                && !["null", "true", "false", "unknown"]
                    .contains(&value.trim().to_ascii_lowercase().as_str())
            {
                return Err(format!("invalid value for is filter: {value}"));
            }
            vec![unquote(value)]
        };
        out.push(Condition {
            column: column.trim().to_owned(),
            op,
            negated,
            values,
        });
    }
    Ok(out)
}

/// How a column's values compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// int2/4/8, float4/8, numeric, oid.
    Number,
    /// bool.
    Bool,
    /// timestamp, timestamptz, date.
    Time,
    /// uuid (case-insensitive text).
    Uuid,
    /// Everything else, compared as text.
    Text,
}

/// The comparison kind of a `pg_type.typname`.
pub fn kind_of(type_name: &str) -> Kind {
    match type_name {
        "int2" | "int4" | "int8" | "float4" | "float8" | "numeric" | "oid" | "money" => {
            Kind::Number
        }
        "bool" => Kind::Bool,
        "timestamp" | "timestamptz" | "date" => Kind::Time,
        "uuid" => Kind::Uuid,
        _ => Kind::Text,
    }
}

/// Parses `YYYY-MM-DD[( |T)HH:MM[:SS[.ffffff]]][Z|±HH[:MM]]` into microseconds since the epoch.
pub(crate) fn parse_time(s: &str) -> Option<i128> {
    let s = s.trim();
    let b = s.as_bytes();
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (mut secs, mut micros, mut offset) = (0i64, 0i64, 0i64);
    let mut rest = &s[10..];
    if rest.starts_with('T') || rest.starts_with(' ') {
        let t = &rest[1..];
        let h: i64 = t.get(0..2)?.parse().ok()?;
        let mi: i64 = t.get(3..5)?.parse().ok()?;
        secs = h * 3600 + mi * 60;
        rest = &t[5..];
        if let Some(r) = rest.strip_prefix(':') {
            secs += r.get(0..2)?.parse::<i64>().ok()?;
            rest = &r[2..];
            if let Some(r) = rest.strip_prefix('.') {
                let digits: String = r.chars().take_while(char::is_ascii_digit).collect();
                let mut frac = digits.clone();
                frac.truncate(6);
                while frac.len() < 6 {
                    frac.push('0');
                }
                micros = frac.parse().ok()?;
                rest = &r[digits.len()..];
            }
        }
    }
    let rest = rest.trim();
    if rest == "Z" || rest == "z" {
    } else if let Some(sign) = rest.chars().next().filter(|c| *c == '+' || *c == '-') {
        let r = &rest[1..];
        let oh: i64 = r.get(0..2)?.parse().ok()?;
        let om: i64 = r
            .get(2..)
            .map(|x| x.trim_start_matches(':'))
            .filter(|x| !x.is_empty())
            .map_or(Some(0), |x| x.parse().ok())?;
        offset = (oh * 3600 + om * 60) * if sign == '-' { -1 } else { 1 };
    } else if !rest.is_empty() {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + secs - offset) as i128) * 1_000_000 + micros as i128)
}

/// Compares a row value with a filter value under the column's kind; `None` = incomparable/NULL.
fn compare(kind: Kind, row: &Value, filter: &str) -> Option<Ordering> {
    match (kind, row) {
        (_, Value::Null) => None,
        (Kind::Number, Value::Number(n)) => {
            if let (Some(a), Ok(b)) = (n.as_i64(), filter.trim().parse::<i64>()) {
                return Some(a.cmp(&b));
            }
            let b: f64 = filter.trim().parse().ok()?;
            n.as_f64()?.partial_cmp(&b)
        }
        (Kind::Number, Value::String(s)) => {
            // numeric values too large for JSON numbers may arrive as strings.
            s.parse::<f64>()
                .ok()?
                .partial_cmp(&filter.trim().parse::<f64>().ok()?)
        }
        (Kind::Bool, Value::Bool(a)) => {
            let b = match filter.trim().to_ascii_lowercase().as_str() {
                "true" | "t" | "yes" | "on" | "1" => true,
                "false" | "f" | "no" | "off" | "0" => false,
                _ => return None,
            };
            Some(a.cmp(&b))
        }
        (Kind::Time, Value::String(s)) => Some(parse_time(s)?.cmp(&parse_time(filter)?)),
        (Kind::Uuid, Value::String(s)) => Some(
            s.to_ascii_lowercase()
                .cmp(&filter.trim().to_ascii_lowercase()),
        ),
        (_, Value::String(s)) => Some(s.as_str().cmp(filter)),
        (_, other) => Some(other.to_string().as_str().cmp(filter)),
    }
}

/// SQL LIKE with `%` and `_` (and PostgREST's `*` for `%`).
fn like(text: &str, pattern: &str, ci: bool) -> bool {
    let (t, p): (Vec<char>, Vec<char>) = if ci {
        (
            text.to_lowercase().chars().collect(),
            pattern.to_lowercase().chars().collect(),
        )
    } else {
        (text.chars().collect(), pattern.chars().collect())
    };
    // Iterative wildcard matching with backtracking on the last `%`.
    let (mut ti, mut pi) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '_' || (p[pi] != '%' && p[pi] != '*' && p[pi] == t[ti])) {
            ti += 1;
            pi += 1;
        } else if pi < p.len() && (p[pi] == '%' || p[pi] == '*') {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && (p[pi] == '%' || p[pi] == '*') {
        pi += 1;
    }
    pi == p.len()
}

impl Condition {
    /// Three-valued evaluation against a row.
    fn eval(&self, kind: Kind, row: &Map<String, Value>) -> Option<bool> {
        let v = row.get(&self.column).unwrap_or(&Value::Null);
        let first = self.values.first().map(String::as_str).unwrap_or_default();
        let result = match self.op {
            FilterOp::Is => {
                let target = first.trim().to_ascii_lowercase();
                Some(match target.as_str() {
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
                    compare(kind, v, first).map(|o| o != Ordering::Equal)
                }
            }
            FilterOp::In => {
                if v.is_null() {
                    None
                } else {
                    Some(
                        self.values
                            .iter()
                            .any(|f| compare(kind, v, f) == Some(Ordering::Equal)),
                    )
                }
            }
            FilterOp::Like | FilterOp::Ilike => match v {
                Value::Null => None,
                Value::String(s) => Some(like(s, first, self.op == FilterOp::Ilike)),
                other => Some(like(&other.to_string(), first, self.op == FilterOp::Ilike)),
            },
            op => compare(kind, v, first).map(|o| match op {
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

    #[test]
    fn parses_operators() {
        let c = parse("id=eq.1").unwrap();
        assert_eq!(c[0].column, "id");
        assert_eq!(c[0].op, FilterOp::Eq);
        let c = parse(r#"status=in.(paid,"ship,ped"),total=not.gt.10"#).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].values, vec!["paid", "ship,ped"]);
        assert!(c[1].negated);
        assert_eq!(parse("subject=foo.hey").unwrap_err(), r#"["foo", "hey"]"#);
        assert!(parse("a=eq.1,,b=eq.2")
            .unwrap_err()
            .contains("empty segments"));
        assert!(parse("a=in.1,2").unwrap_err().contains("parentheses"));
        assert!(parse("").unwrap().is_empty());
        assert!(parse("a=is.maybe").is_err());
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
        assert!(check("name=ilike.*LIC*", &[Text], json!({"name": "alice"})));
        assert!(check("done=is.true", &[Bool], json!({"done": true})));
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

    #[test]
    fn time_parsing() {
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_time("1970-01-01 00:00:01.5"), Some(1_500_000));
        assert_eq!(parse_time("1970-01-02"), Some(86_400_000_000));
        assert_eq!(parse_time("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(parse_time("nonsense"), None);
    }
}
