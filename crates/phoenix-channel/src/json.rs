//! Shared JSON plumbing: the simd-json tape walk used by both text decoders,
//! and the `Ref` serializer used by both text encoders.

use serde::{Serialize, Serializer};
use serde_json::{Map, Number, Value};
use simd_json::prelude::*;
use simd_json::{Node, StaticNode};

use crate::{DecodeError, Ref};

/// Deepest array/object nesting accepted, counting the frame itself.
///
/// Matches serde_json's recursion limit (127 levels), so both parsers agree on
/// which frames are valid; it also bounds the recursion in [`to_value`], since
/// simd-json itself has no limit and a deep payload would overflow the stack.
pub(crate) const MAX_DEPTH: usize = 127;

/// Parses `buf` in place into a simd-json tape and checks the nesting depth.
///
/// Frames with a long number go through serde_json first (see
/// [`has_long_number`]); `scratch` then holds the canonical re-encoding that
/// the tape borrows from. Leave it empty; it is not touched otherwise.
pub(crate) fn parse<'a>(
    buf: &'a mut [u8],
    scratch: &'a mut Vec<u8>,
) -> Result<simd_json::Tape<'a>, DecodeError> {
    // A raw NUL is never valid JSON (not even inside a string), but simd-json
    // 0.15 accepts one right after a number or literal and silently drops the
    // rest of that token: `[1\u{0}2]` parses as `[1]`.
    if buf.contains(&0) || has_lone_high_surrogate(buf) {
        return Err(DecodeError::InvalidJson);
    }
    let buf = if has_long_number(buf) {
        let value: Value = serde_json::from_slice(buf).map_err(|_| DecodeError::InvalidJson)?;
        *scratch = serde_json::to_vec(&value).map_err(|_| DecodeError::InvalidJson)?;
        &mut scratch[..]
    } else {
        buf
    };
    let tape = simd_json::to_tape(buf).map_err(|_| DecodeError::InvalidJson)?;
    check_depth(&tape.0)?;
    Ok(tape)
}

/// Digits (in a run of digits and `.`) from which simd-json 0.15 leaves its
/// fast number path. Its slow paths (integers of 18+ digits, floats of 19+
/// significant digits) do not check what follows the number, so
/// `[12345678901234567890null]` parses; they also reject 19-digit negatives
/// below `i64::MIN`, which serde_json and JavaScript read as floats. Such
/// frames are rare (and JavaScript prints integers up to 1e21 in full), so
/// they are validated and re-encoded by serde_json, whose output only holds
/// well-formed, in-range numbers. The run may also be inside a string; that
/// only costs the slower path.
const LONG_NUMBER_DIGITS: usize = 17;

fn has_long_number(buf: &[u8]) -> bool {
    let mut digits = 0;
    for &b in buf {
        if b.is_ascii_digit() {
            digits += 1;
            if digits >= LONG_NUMBER_DIGITS {
                return true;
            }
        } else if b != b'.' {
            digits = 0;
        }
    }
    false
}

/// simd-json 0.15 turns a `\uD800`–`\uDBFF` escape not followed by another `\u` escape
/// into a NUL character instead of failing; serde_json rejects it. Check for it
/// up front (the parse is in place, so afterwards the escape is gone). Most
/// frames contain no backslash at all, and `contains` is a fast memchr.
fn has_lone_high_surrogate(buf: &[u8]) -> bool {
    if !buf.contains(&b'\\') {
        return false;
    }
    let mut i = 0;
    while i + 1 < buf.len() {
        if buf[i] != b'\\' {
            i += 1;
            continue;
        }
        if buf[i + 1] == b'u' && is_high_surrogate(buf.get(i + 2..i + 6)) {
            // A following low surrogate is validated by simd-json itself.
            if buf.get(i + 6..i + 8) != Some(&b"\\u"[..]) {
                return true;
            }
            i += 6;
        } else {
            // Skip the escaped character, so an escaped backslash before `u` is not an escape.
            i += 2;
        }
    }
    false
}

fn is_high_surrogate(hex: Option<&[u8]>) -> bool {
    let Some(&[a, b, _, _]) = hex else {
        return false;
    };
    a.eq_ignore_ascii_case(&b'd') && matches!(b.to_ascii_lowercase(), b'8' | b'9' | b'a' | b'b')
}

/// Rejects tapes nested deeper than [`MAX_DEPTH`], in one pass and without recursion.
fn check_depth(nodes: &[Node<'_>]) -> Result<(), DecodeError> {
    // ends[d] = index one past the last node of the container open at depth d.
    let mut ends = [0usize; MAX_DEPTH];
    let mut depth = 0usize;
    for (i, node) in nodes.iter().enumerate() {
        while depth > 0 && ends[depth - 1] <= i {
            depth -= 1;
        }
        if let Node::Object { count, .. } | Node::Array { count, .. } = *node {
            if depth == MAX_DEPTH {
                return Err(DecodeError::InvalidJson);
            }
            ends[depth] = i + 1 + count;
            depth += 1;
        }
    }
    Ok(())
}

/// Number of tape nodes the value starting at `nodes[0]` spans (itself included).
pub(crate) fn span(node: &Node<'_>) -> usize {
    match *node {
        Node::Object { count, .. } | Node::Array { count, .. } => count + 1,
        Node::String(_) | Node::Static(_) => 1,
    }
}

/// Converts the value starting at `nodes[0]` into a `serde_json::Value`.
///
/// Recursion depth is bounded because [`parse`] already checked the tape.
pub(crate) fn to_value(nodes: &[Node<'_>]) -> Result<Value, DecodeError> {
    let Some(first) = nodes.first() else {
        return Err(DecodeError::InvalidJson);
    };
    Ok(match *first {
        Node::String(s) => Value::String(s.to_owned()),
        Node::Static(s) => static_to_value(&s)?,
        Node::Array { len, .. } => {
            let mut out = Vec::with_capacity(len);
            let mut i = 1;
            for _ in 0..len {
                let node = nodes.get(i).ok_or(DecodeError::InvalidJson)?;
                out.push(to_value(&nodes[i..])?);
                i += span(node);
            }
            Value::Array(out)
        }
        Node::Object { len, .. } => {
            let mut out = Map::new();
            let mut i = 1;
            for _ in 0..len {
                let Some(Node::String(key)) = nodes.get(i) else {
                    return Err(DecodeError::InvalidJson);
                };
                let node = nodes.get(i + 1).ok_or(DecodeError::InvalidJson)?;
                // Last duplicate wins, as in serde_json.
                out.insert((*key).to_owned(), to_value(&nodes[i + 1..])?);
                i += 1 + span(node);
            }
            Value::Object(out)
        }
    })
}

/// Goes through the scalar accessors rather than matching variants, so the
/// code is unaffected by simd-json's `128bit` / `ordered-float` features.
fn static_to_value(s: &StaticNode) -> Result<Value, DecodeError> {
    if s.is_null() {
        Ok(Value::Null)
    } else if is_negative_zero(s) {
        // serde_json reads the literal `-0` as the float -0.0; keep that.
        Ok(Value::Number(
            Number::from_f64(-0.0).ok_or(DecodeError::InvalidJson)?,
        ))
    } else if let Some(b) = s.as_bool() {
        Ok(Value::Bool(b))
    } else if let Some(i) = s.as_i64() {
        Ok(Value::Number(Number::from(i)))
    } else if let Some(u) = s.as_u64() {
        Ok(Value::Number(Number::from(u)))
    } else {
        // Non-finite floats cannot come from valid JSON text; serde_json
        // rejects overflowing literals such as `1e400` the same way.
        s.cast_f64()
            .and_then(Number::from_f64)
            .map(Value::Number)
            .ok_or(DecodeError::InvalidJson)
    }
}

/// simd-json yields `U64` for non-negative integer literals and `I64` only for
/// literals with a minus sign, so `I64(0)` can only come from `-0`.
fn is_negative_zero(s: &StaticNode) -> bool {
    matches!(s, StaticNode::I64(0))
}

/// Iterates over an object's `(key, value_nodes)` pairs; `nodes[0]` must be the object.
pub(crate) fn object_entries<'t, 'i>(
    nodes: &'t [Node<'i>],
) -> impl Iterator<Item = (&'i str, &'t [Node<'i>])> + 't {
    let len = match nodes.first() {
        Some(Node::Object { len, .. }) => *len,
        _ => 0,
    };
    let mut i = 1;
    (0..len).map_while(move |_| {
        let Some(Node::String(key)) = nodes.get(i) else {
            return None;
        };
        let value = nodes.get(i + 1..)?;
        i += 1 + span(value.first()?);
        Some((*key, value))
    })
}

/// Iterates over an array's element node slices; `nodes[0]` must be the array.
pub(crate) fn array_elements<'t, 'i>(
    nodes: &'t [Node<'i>],
) -> impl Iterator<Item = &'t [Node<'i>]> + 't {
    let len = match nodes.first() {
        Some(Node::Array { len, .. }) => *len,
        _ => 0,
    };
    let mut i = 1;
    (0..len).map_while(move |_| {
        let value = nodes.get(i..)?;
        i += span(value.first()?);
        Some(value)
    })
}

/// A string node, or `None`.
pub(crate) fn as_str<'i>(nodes: &[Node<'i>]) -> Option<&'i str> {
    match nodes.first() {
        Some(Node::String(s)) => Some(s),
        _ => None,
    }
}

/// Decodes a `ref`/`join_ref`: a string, an integer that fits `i64`, or null.
///
/// The outer `None` means the value has another type.
pub(crate) fn as_ref(nodes: &[Node<'_>]) -> Option<Option<Ref>> {
    match nodes.first()? {
        Node::String(s) => Some(Some(Ref::Str((*s).to_owned()))),
        Node::Static(s) if s.is_null() => Some(None),
        // as_i64 is None for floats and for integers outside i64; `-0` is a
        // float for serde_json, so it is not an integer ref either.
        Node::Static(s) if is_negative_zero(s) => None,
        Node::Static(s) => s.as_i64().map(|n| Some(Ref::Num(n))),
        _ => None,
    }
}

/// Serializes an optional [`Ref`] with its original JSON type: string, number or null.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RefJson<'a>(pub(crate) Option<&'a Ref>);

impl Serialize for RefJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            None => s.serialize_none(),
            Some(Ref::Str(r)) => s.serialize_str(r),
            Some(Ref::Num(n)) => s.serialize_i64(*n),
        }
    }
}

/// A guess at an unknown payload's encoded length: the buffer starts with
/// room for a small one and grows if needed.
pub(crate) const PAYLOAD_GUESS: usize = 192;

/// Bytes a text frame needs for a payload of about `payload_len` bytes.
pub(crate) fn text_capacity(topic: &str, event: &str, payload_len: usize) -> usize {
    const OVERHEAD: usize = 64;
    OVERHEAD + topic.len() + event.len() + payload_len
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tape_of(s: &str) -> Result<Value, DecodeError> {
        let mut buf = s.as_bytes().to_vec();
        let mut scratch = Vec::new();
        let tape = parse(&mut buf, &mut scratch)?;
        to_value(&tape.0)
    }

    #[test]
    fn converts_every_json_type() {
        let src =
            r#"{"a":[1,-2,3.5,true,false,null,"s\u00e9"],"b":{},"c":[],"d":18446744073709551615}"#;
        let expected: Value = serde_json::from_str(src).unwrap();
        assert_eq!(tape_of(src).unwrap(), expected);
    }

    #[test]
    fn duplicate_keys_last_wins() {
        assert_eq!(
            tape_of(r#"{"a":1,"a":2}"#).unwrap(),
            serde_json::json!({"a":2})
        );
    }

    #[test]
    fn depth_limit_matches_serde_json() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(tape_of(&ok).is_ok());
        assert!(serde_json::from_str::<Value>(&ok).is_ok());
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert_eq!(tape_of(&deep), Err(DecodeError::InvalidJson));
        assert!(serde_json::from_str::<Value>(&deep).is_err());
    }

    #[test]
    fn very_deep_nesting_is_an_error_not_a_stack_overflow() {
        let deep = format!("{}{}", "[".repeat(200_000), "]".repeat(200_000));
        assert_eq!(tape_of(&deep), Err(DecodeError::InvalidJson));
    }

    #[test]
    fn siblings_after_nested_containers_do_not_count_as_deeper() {
        let s = format!("[{}]", vec!["[[1]]"; 300].join(","));
        assert!(tape_of(&s).is_ok());
    }

    #[test]
    fn lone_high_surrogate_is_invalid() {
        for bad in [
            r#""\ud800""#,
            r#""a\uDBFFb""#,
            r#"["\ud800",1]"#,
            r#"{"\udbff":1}"#,
            r#""\ud800\n""#,
        ] {
            assert_eq!(tape_of(bad), Err(DecodeError::InvalidJson), "{bad}");
            assert!(serde_json::from_str::<Value>(bad).is_err(), "{bad}");
        }
        for good in [
            r#""\ud83d\ude00""#,
            r#""\\ud800""#,
            r#""\u0000""#,
            r#""\udfff\"""#,
        ] {
            let expected = serde_json::from_str::<Value>(good);
            let actual = tape_of(good);
            match expected {
                Ok(v) => assert_eq!(actual, Ok(v), "{good}"),
                Err(_) => assert!(actual.is_err(), "{good}"),
            }
        }
    }

    #[test]
    fn raw_nul_is_invalid() {
        for bad in [
            "[1\u{0}2]",
            "[1\u{0}]",
            "{\"a\":-1\u{0},\"b\":2}",
            "[true\u{0}]",
            "1\u{0}",
            "\"a\u{0}\"",
        ] {
            assert_eq!(tape_of(bad), Err(DecodeError::InvalidJson), "{bad:?}");
            assert!(serde_json::from_str::<Value>(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn long_numbers_are_checked_by_serde_json() {
        for bad in [
            "[12345678901234567890null]",
            "[7815155207091750938x]",
            "[1.2345678901234567890123e5x]",
            "[-99999999999999999999]]",
        ] {
            assert_eq!(tape_of(bad), Err(DecodeError::InvalidJson), "{bad}");
        }
        // JavaScript prints -9.3e18 as a 19-digit integer; simd-json alone rejects it.
        let js = "[-9300000000000000000,12345678901234567890,0.12345678901234567890123]";
        assert_eq!(tape_of(js), Ok(serde_json::from_str::<Value>(js).unwrap()));
        assert!(has_long_number(b"1234567890.1234567"));
        assert!(!has_long_number(b"1234567890123456,1234567890123456"));
    }

    #[test]
    fn numbers_match_serde_json() {
        for n in [
            "-9223372036854775809",
            "-0",
            "0",
            "-0.0",
            "18446744073709551616",
            "123456789012345678901234567890",
            "-18446744073709551616",
            "1e-400",
            "9007199254740993.0",
        ] {
            assert_eq!(
                tape_of(n),
                Ok(serde_json::from_str::<Value>(n).unwrap()),
                "{n}"
            );
        }
        assert_eq!(tape_of("1e400"), Err(DecodeError::InvalidJson));
    }

    #[test]
    fn refs() {
        let r = |s: &str| {
            let mut buf = s.as_bytes().to_vec();
            let mut scratch = Vec::new();
            let tape = parse(&mut buf, &mut scratch).unwrap();
            as_ref(&tape.0)
        };
        assert_eq!(r(r#""6""#), Some(Some(Ref::Str("6".to_owned()))));
        assert_eq!(r("7"), Some(Some(Ref::Num(7))));
        assert_eq!(r("-7"), Some(Some(Ref::Num(-7))));
        assert_eq!(r("null"), Some(None));
        assert_eq!(r("1.5"), None);
        assert_eq!(r("18446744073709551615"), None);
        assert_eq!(r("true"), None);
        assert_eq!(r("-0"), None);
        assert_eq!(r("0"), Some(Some(Ref::Num(0))));
        assert_eq!(r("{}"), None);
    }

    #[test]
    fn ref_json() {
        let s = |r: Option<&Ref>| serde_json::to_string(&RefJson(r)).unwrap();
        assert_eq!(s(None), "null");
        assert_eq!(s(Some(&Ref::Str("6".to_owned()))), r#""6""#);
        assert_eq!(s(Some(&Ref::Num(6))), "6");
    }
}
