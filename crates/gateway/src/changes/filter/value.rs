//! Filter values against column types: the join-time cast check (upstream's
//! `realtime.cast` in `subscription_check_filters`, with PostgreSQL's error
//! texts) and the typed comparison used per change.

use std::cmp::Ordering;

use serde_json::Value;

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

/// PostgreSQL's name for a `pg_type.typname` (`int4` → `integer`), as its
/// messages and `regtype` print it.
pub fn sql_type_name(type_name: &str) -> String {
    if let Some(elem) = type_name.strip_prefix('_') {
        return format!("{}[]", sql_type_name(elem));
    }
    match type_name {
        "int2" => "smallint",
        "int4" => "integer",
        "int8" => "bigint",
        "float4" => "real",
        "float8" => "double precision",
        "bool" => "boolean",
        "varchar" => "character varying",
        "bpchar" => "character",
        "timestamp" => "timestamp without time zone",
        "timestamptz" => "timestamp with time zone",
        "time" => "time without time zone",
        "timetz" => "time with time zone",
        other => other,
    }
    .to_owned()
}

/// Whether LIKE and regular expressions apply to the type (upstream: the
/// type has a `~~` operator; these are the text types that do).
pub fn text_compatible(type_name: &str) -> bool {
    matches!(type_name, "text" | "varchar" | "bpchar" | "name" | "citext")
}

/// Whether `value` casts to the column type, as `value::type` would in
/// PostgreSQL; `Err` is PostgreSQL's message. Types without a check here
/// (text, json, arrays, ...) accept anything, as their comparison is textual.
pub fn check_cast(type_name: &str, value: &str) -> Result<(), String> {
    let sql = sql_type_name(type_name);
    let invalid = || Err(format!("invalid input syntax for type {sql}: \"{value}\""));
    let v = value.trim();
    let int = |bits: u32| {
        let digits = v.strip_prefix(['+', '-']).unwrap_or(v);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return invalid();
        }
        let fits = v
            .parse::<i128>()
            .is_ok_and(|n| n >= -(1i128 << (bits - 1)) && n < (1i128 << (bits - 1)));
        if fits {
            Ok(())
        } else {
            Err(format!("value \"{value}\" is out of range for type {sql}"))
        }
    };
    match type_name {
        "int2" => int(16),
        "int4" => int(32),
        "int8" => int(64),
        "oid" => match v.parse::<u32>() {
            Ok(_) => Ok(()),
            Err(_) => invalid(),
        },
        "float4" | "float8" | "numeric" => match v.parse::<f64>() {
            Ok(_) => Ok(()),
            Err(_) => invalid(),
        },
        "bool" => match parse_bool(v) {
            Some(_) => Ok(()),
            None => invalid(),
        },
        "uuid" => {
            if is_uuid(v) {
                Ok(())
            } else {
                invalid()
            }
        }
        "timestamp" | "timestamptz" | "date" => {
            if parse_time(v).is_some() {
                return Ok(());
            }
            let keyword = ["now", "today", "tomorrow", "yesterday", "epoch", "infinity"]
                .contains(&v.trim_start_matches('-').to_ascii_lowercase().as_str());
            if keyword {
                // Valid in PostgreSQL, but not a fixed instant this gateway can
                // compare with: refused rather than silently never matching.
                Err(format!(
                    "unsupported value for type {sql}: \"{value}\" (use an ISO 8601 date or timestamp)"
                ))
            } else {
                invalid()
            }
        }
        _ => Ok(()),
    }
}

/// PostgreSQL's boolean input: `t`/`f` and unique prefixes of
/// `true`/`false`/`yes`/`no`, `on`/`off`, `1`/`0` (case-insensitive).
fn parse_bool(s: &str) -> Option<bool> {
    let s = s.to_ascii_lowercase();
    let prefix_of = |word: &str| !s.is_empty() && word.starts_with(s.as_str());
    if prefix_of("true") || prefix_of("yes") || s == "on" || s == "1" {
        Some(true)
    } else if prefix_of("false")
        || prefix_of("no")
        || (s.len() >= 2 && "off".starts_with(&s))
        || s == "0"
    {
        Some(false)
    } else {
        None
    }
}

/// 32 hex digits, optionally in braces, with single hyphens between groups.
fn is_uuid(s: &str) -> bool {
    let s = s
        .strip_prefix('{')
        .and_then(|r| r.strip_suffix('}'))
        .unwrap_or(s);
    let hex = s.bytes().filter(u8::is_ascii_hexdigit).count();
    hex == 32
        && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
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
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
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
pub(super) fn compare(kind: Kind, row: &Value, filter: &str) -> Option<Ordering> {
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
        (Kind::Bool, Value::Bool(a)) => Some(a.cmp(&parse_bool(filter.trim())?)),
        (Kind::Time, Value::String(s)) => Some(parse_time(s)?.cmp(&parse_time(filter)?)),
        (Kind::Uuid, Value::String(s)) => Some(
            s.to_ascii_lowercase()
                .cmp(&filter.trim().to_ascii_lowercase()),
        ),
        (_, Value::String(s)) => Some(s.as_str().cmp(filter)),
        (_, other) => Some(other.to_string().as_str().cmp(filter)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn casts_like_postgres() {
        assert_eq!(
            check_cast("int4", "abc").unwrap_err(),
            r#"invalid input syntax for type integer: "abc""#
        );
        assert_eq!(
            check_cast("int2", "40000").unwrap_err(),
            r#"value "40000" is out of range for type smallint"#
        );
        assert!(check_cast("int8", " -9223372036854775808 ").is_ok());
        assert!(check_cast("int8", "9223372036854775808").is_err());
        assert!(check_cast("int4", "1.5").is_err());
        assert!(check_cast("numeric", "7.5").is_ok() && check_cast("float8", "1e10").is_ok());
        assert_eq!(
            check_cast("float8", "x").unwrap_err(),
            r#"invalid input syntax for type double precision: "x""#
        );
        for ok in ["t", "TRUE", "ye", "on", "of", "0", "n"] {
            assert!(check_cast("bool", ok).is_ok(), "{ok}");
        }
        for bad in ["o", "maybe", ""] {
            assert!(check_cast("bool", bad).is_err(), "{bad}");
        }
        assert!(check_cast("uuid", "639f86b1-738b-43ed-bb09-c8d3f3bafa30").is_ok());
        assert!(check_cast("uuid", "{639F86B1738B43EDBB09C8D3F3BAFA30}").is_ok());
        assert_eq!(
            check_cast("uuid", "abc").unwrap_err(),
            r#"invalid input syntax for type uuid: "abc""#
        );
        assert!(check_cast("timestamptz", "2024-02-15T01:00:00+01:00").is_ok());
        assert!(check_cast("date", "2024-13-01").is_err());
        assert!(check_cast("timestamptz", "now")
            .unwrap_err()
            .starts_with("unsupported value for type timestamp with time zone"));
        assert!(check_cast("text", "anything at all").is_ok());
        assert!(check_cast("jsonb", "{").is_ok(), "unchecked types accept");
    }

    #[test]
    fn names_and_kinds() {
        assert_eq!(sql_type_name("_int4"), "integer[]");
        assert_eq!(sql_type_name("jsonb"), "jsonb");
        assert!(text_compatible("varchar") && !text_compatible("int4"));
        assert_eq!(kind_of("numeric"), Kind::Number);
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
