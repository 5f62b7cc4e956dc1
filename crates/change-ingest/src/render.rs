//! Row images as the gateway receives them: a cheap scanner over the top level of
//! the `row_to_json` text (no parsing of values), used to check that a change's
//! columns are the table's current ones, to render `bytea` like upstream Realtime
//! (hex without `\x`), and to recognise the key-only placeholder of an oversized row.

use std::ops::Range;

/// Iterates the top-level members of a JSON object: raw key text (still escaped)
/// and the byte range of the value. Stops at the first malformed token.
pub(crate) struct Members<'a> {
    text: &'a [u8],
    pos: usize,
}

impl<'a> Members<'a> {
    /// `None` unless `text` starts with `{` (after whitespace).
    pub(crate) fn new(text: &'a [u8]) -> Option<Self> {
        let mut pos = skip_ws(text, 0);
        if text.get(pos) != Some(&b'{') {
            return None;
        }
        pos += 1;
        Some(Members { text, pos })
    }
}

impl<'a> Iterator for Members<'a> {
    type Item = (&'a [u8], Range<usize>);

    fn next(&mut self) -> Option<Self::Item> {
        let t = self.text;
        let mut pos = skip_ws(t, self.pos);
        if t.get(pos) == Some(&b',') {
            pos = skip_ws(t, pos + 1);
        }
        if t.get(pos) != Some(&b'"') {
            return None; // `}` or malformed
        }
        let key_end = string_end(t, pos)?;
        let key = &t[pos + 1..key_end - 1];
        pos = skip_ws(t, key_end);
        if t.get(pos) != Some(&b':') {
            return None;
        }
        let start = skip_ws(t, pos + 1);
        let end = value_end(t, start)?;
        self.pos = end;
        Some((key, start..end))
    }
}

fn skip_ws(t: &[u8], mut pos: usize) -> usize {
    while matches!(t.get(pos), Some(b' ' | b'\n' | b'\r' | b'\t')) {
        pos += 1;
    }
    pos
}

/// End (exclusive) of the string starting at `start` (a `"`).
fn string_end(t: &[u8], start: usize) -> Option<usize> {
    let mut pos = start + 1;
    loop {
        match t.get(pos)? {
            b'\\' => pos += 2,
            b'"' => return Some(pos + 1),
            _ => pos += 1,
        }
    }
}

/// End (exclusive) of the value starting at `start`.
fn value_end(t: &[u8], start: usize) -> Option<usize> {
    match t.get(start)? {
        b'"' => string_end(t, start),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut pos = start;
            loop {
                match t.get(pos)? {
                    b'"' => {
                        pos = string_end(t, pos)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(pos + 1);
                        }
                    }
                    _ => {}
                }
                pos += 1;
            }
        }
        _ => {
            let mut pos = start;
            while let Some(c) = t.get(pos) {
                if matches!(c, b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t') {
                    break;
                }
                pos += 1;
            }
            (pos > start).then_some(pos)
        }
    }
}

/// A raw (escaped) JSON key equals `name`.
pub(crate) fn key_is(raw: &[u8], name: &str) -> bool {
    if !raw.contains(&b'\\') {
        return raw == name.as_bytes();
    }
    unescape(raw).is_some_and(|k| k == name)
}

/// The key as a string.
pub(crate) fn unescape(raw: &[u8]) -> Option<String> {
    let quoted = [b"\"", raw, b"\""].concat();
    serde_json::from_slice(&quoted).ok()
}

/// The object's keys are exactly `names`, in order.
pub(crate) fn keys_are<'n>(json: &[u8], names: impl IntoIterator<Item = &'n str>) -> bool {
    let Some(mut members) = Members::new(json) else {
        return false;
    };
    let mut names = names.into_iter();
    loop {
        match (members.next(), names.next()) {
            (None, None) => return true,
            (Some((key, _)), Some(name)) if key_is(key, name) => {}
            _ => return false,
        }
    }
}

/// The object's keys, unescaped.
pub(crate) fn keys(json: &[u8]) -> Vec<String> {
    Members::new(json)
        .map(|m| m.filter_map(|(k, _)| unescape(k)).collect())
        .unwrap_or_default()
}

/// Renders `bytea` values like upstream Realtime (`"0102"`, no `\x` prefix): `row_to_json`
/// writes the hex output form, whose backslash is escaped (`"\\x0102"`). Returns `None`
/// when nothing changes.
pub(crate) fn strip_bytea_prefix(json: &[u8], is_bytea: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
    let mut cuts = Vec::new();
    for (key, value) in Members::new(json)? {
        if json[value.clone()].starts_with(br#""\\x"#) && is_bytea(key) {
            cuts.push(value.start + 1..value.start + 4);
        }
    }
    if cuts.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(json.len());
    let mut at = 0;
    for cut in cuts {
        out.extend_from_slice(&json[at..cut.start]);
        at = cut.end;
    }
    out.extend_from_slice(&json[at..]);
    Some(out)
}

/// The placeholder the capture stores for a row it could not render
/// (`[{"id":1}, "Error 413: Payload Too Large"]`): the key columns and the reason.
pub(crate) fn placeholder(json: &[u8]) -> Option<(Vec<u8>, String)> {
    let start = skip_ws(json, 0);
    if json.get(start) != Some(&b'[') {
        return None;
    }
    let (key, reason): (Box<serde_json::value::RawValue>, String) =
        serde_json::from_slice(json).ok()?;
    Some((key.get().as_bytes().to_vec(), reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_of_row_to_json_output() {
        let j =
            br#"{"id":1,"t":"a,\"}b","j":{"k":[1,{"x":"]"}]},"n":null,"f":-1.5e3,"My \"c\"":true}"#;
        let got: Vec<(String, String)> = Members::new(j)
            .unwrap()
            .map(|(k, v)| {
                (
                    String::from_utf8(k.to_vec()).unwrap(),
                    String::from_utf8(j[v].to_vec()).unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("id".into(), "1".into()),
                ("t".into(), r#""a,\"}b""#.into()),
                ("j".into(), r#"{"k":[1,{"x":"]"}]}"#.into()),
                ("n".into(), "null".into()),
                ("f".into(), "-1.5e3".into()),
                (r#"My \"c\""#.into(), "true".into()),
            ]
        );
        assert!(keys_are(j, ["id", "t", "j", "n", "f", "My \"c\""]));
        assert!(!keys_are(j, ["id", "t", "j", "n", "f"]));
        assert!(!keys_are(j, ["id", "x", "j", "n", "f", "My \"c\""]));
        assert_eq!(keys(br#"{ "a" : 1 , "b":2 }"#), vec!["a", "b"]);
        assert!(Members::new(b"[1]").is_none());
    }

    #[test]
    fn bytea_loses_its_prefix() {
        let j = br#"{"id":1,"b":"\\x0102","t":"\\xnot bytea","e":"\\x"}"#;
        let out = strip_bytea_prefix(j, |k| k == b"b" || k == b"e").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"id":1,"b":"0102","t":"\\xnot bytea","e":""}"#
        );
        assert!(strip_bytea_prefix(br#"{"b":null}"#, |_| true).is_none());
    }

    #[test]
    fn placeholders() {
        let (key, reason) =
            placeholder(br#"[{"id" : 5}, "Error 413: Payload Too Large"]"#).unwrap();
        assert_eq!(key, br#"{"id" : 5}"#);
        assert_eq!(reason, "Error 413: Payload Too Large");
        assert!(placeholder(br#"{"id":5}"#).is_none());
    }
}
