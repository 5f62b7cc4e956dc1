//! `like`/`ilike`/`match`/`imatch` patterns, compiled once at join time.
//!
//! Both kinds run on the `regex` crate's finite automata: matching costs
//! time linear in the value (times a factor bounded by the compiled pattern's
//! size, itself capped), never the exponential backtracking a naive LIKE or
//! a backtracking regex engine can hit on the single router task.
//!
//! - LIKE follows PostgreSQL: `%` any run, `_` any one character, `\` escapes
//!   the next character; the whole value must match. `*` is a literal, as in
//!   upstream Realtime (which hands the value to SQL `LIKE` unchanged).
//! - `match`/`imatch` are PostgreSQL's `~`/`~*`: an unanchored search, `.`
//!   matching newlines too. The syntax is the `regex` crate's, which shares
//!   POSIX/ARE's common core (classes, `[[:alpha:]]`, `\d`, `\w`, `\s`,
//!   quantifiers, alternation); back-references and look-around, which need
//!   backtracking, are refused at join time with a clear error.

use std::sync::Arc;

use regex::{Regex, RegexBuilder};

/// Largest compiled program a pattern may produce (bytes): bounds both the
/// memory a binding holds and the per-character factor of matching.
const SIZE_LIMIT: usize = 256 * 1024;

/// A compiled pattern (cheap to clone: the program is shared).
#[derive(Debug, Clone)]
pub struct Pattern {
    regex: Arc<Regex>,
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.regex.as_str() == other.regex.as_str()
    }
}

impl Pattern {
    /// A SQL LIKE pattern (`ci`: ILIKE).
    pub fn like(pattern: &str, ci: bool) -> Result<Self, String> {
        let mut re = String::with_capacity(pattern.len() + 8);
        re.push_str(r"\A(?:");
        let mut chars = pattern.chars();
        while let Some(c) = chars.next() {
            match c {
                '%' => re.push_str(".*"),
                '_' => re.push('.'),
                '\\' => match chars.next() {
                    Some(esc) => push_literal(&mut re, esc),
                    None => return Err("LIKE pattern must not end with escape character".into()),
                },
                c => push_literal(&mut re, c),
            }
        }
        re.push_str(r")\z");
        build(&re, ci).map_err(|e| format!("LIKE pattern too complex: {e}"))
    }

    /// A `match` (`~`) or, with `ci`, `imatch` (`~*`) regular expression.
    pub fn regex(pattern: &str, ci: bool) -> Result<Self, String> {
        build(pattern, ci).map_err(|e| format!("invalid regular expression: {e}"))
    }

    /// Whether `text` matches.
    pub fn is_match(&self, text: &str) -> bool {
        self.regex.is_match(text)
    }
}

fn push_literal(re: &mut String, c: char) {
    let mut buf = [0u8; 4];
    re.push_str(&regex::escape(c.encode_utf8(&mut buf)));
}

fn build(re: &str, ci: bool) -> Result<Pattern, String> {
    RegexBuilder::new(re)
        .case_insensitive(ci)
        .dot_matches_new_line(true)
        .size_limit(SIZE_LIMIT)
        .build()
        .map(|regex| Pattern {
            regex: Arc::new(regex),
        })
        .map_err(|e| one_line(&e))
}

/// The `regex` crate's error without its multi-line source diagram.
fn one_line(e: &regex::Error) -> String {
    match e {
        regex::Error::Syntax(text) => text
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("error: "))
            .unwrap_or("syntax error")
            .to_owned(),
        regex::Error::CompiledTooBig(limit) => {
            format!("pattern compiles to more than {limit} bytes")
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn like(p: &str, t: &str) -> bool {
        Pattern::like(p, false).unwrap().is_match(t)
    }

    #[test]
    fn like_is_sql_like() {
        assert!(like("al%", "alice"));
        assert!(like("%ip%", "shipped"));
        assert!(!like("%ip%", "paid"));
        assert!(like("a_c", "abc"));
        assert!(!like("a_c", "abbc"));
        assert!(like("a_c", "aéc"), "_ is one character, not one byte");
        assert!(like("100\\%", "100%"));
        assert!(!like("100\\%", "1000"));
        assert!(like("a\\_b", "a_b") && !like("a\\_b", "axb"));
        assert!(like("*", "*") && !like("*", "x"), "* is a literal");
        assert!(
            like("a.c", "a.c") && !like("a.c", "abc"),
            "regex characters are literals"
        );
        assert!(like("%", "line\nbreak"));
        assert!(!like("abc", "abcd"), "anchored at both ends");
        assert!(Pattern::like("PAID", true).unwrap().is_match("paid"));
        assert!(Pattern::like("ab\\", false)
            .unwrap_err()
            .contains("must not end with escape character"));
    }

    #[test]
    fn regex_is_an_unanchored_search() {
        let m = |p: &str, t: &str| Pattern::regex(p, false).unwrap().is_match(t);
        assert!(m("ip", "shipped"));
        assert!(m("^sh", "shipped") && !m("^ip", "shipped"));
        assert!(m("[[:digit:]]+$", "order 42"));
        assert!(Pattern::regex("^PAID$", true).unwrap().is_match("paid"));
        assert!(!Pattern::regex("^PAID$", false).unwrap().is_match("paid"));
        let e = Pattern::regex("(", false).unwrap_err();
        assert!(e.starts_with("invalid regular expression: "), "{e}");
        assert!(!e.contains('\n'));
        assert!(
            Pattern::regex(r"(a)\1", false).is_err(),
            "no back-references"
        );
    }

    #[test]
    fn hostile_patterns_stay_linear_and_bounded() {
        // A classic blow-up for backtracking matchers: many `%` against a long
        // run that almost matches. Automata answer it in one pass.
        let p = "%a".repeat(200) + "%b";
        let text = "a".repeat(100_000);
        assert!(!like(&p, &text));
        assert!(Pattern::regex("(a+)+$", false).unwrap().is_match(&text));
        // Patterns whose automaton would be huge are refused, not built.
        let e = Pattern::regex("(?:a{1000}){1000}", false).unwrap_err();
        assert!(e.contains("compiles to more than"), "{e}");
    }
}
