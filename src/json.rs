//! A small JSON reader for the plugin configuration: RFC 8259 values into a [`Value`] shaped
//! like serde_json's, so `config.rs` walks it the same way. The module parses one document
//! per `on_configure`; serde_json cost the .wasm 13.7 KB more than this file (README, "Design
//! notes and decisions", build profile). Native tools (the checker, the service) read their
//! files with serde_json and convert ([`Value::from`], native only).
//!
//! Stricter than most readers where a config benefits: a key given twice in one object is an
//! error (the second would silently win elsewhere), and nesting is capped at
//! [`MAX_DEPTH`] so a hostile document cannot exhaust the stack.

use std::collections::BTreeMap;
use std::fmt;

/// Object members, sorted by key (serde_json's default order too).
pub type Map<K, V> = BTreeMap<K, V>;

/// Deeper documents are refused (serde_json's default recursion limit is 128 as well).
pub const MAX_DEPTH: usize = 128;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Number(Number),
    String(String),
    Array(Vec<Value>),
    Object(Map<String, Value>),
}

/// A JSON number: an integer when it has no fraction or exponent and fits, else an f64.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Number(N);

#[derive(Debug, Clone, Copy, PartialEq)]
enum N {
    Unsigned(u64),
    Negative(i64),
    Float(f64),
}

impl Number {
    pub fn as_u64(&self) -> Option<u64> {
        match self.0 {
            N::Unsigned(u) => Some(u),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self.0 {
            N::Unsigned(u) => i64::try_from(u).ok(),
            N::Negative(i) => Some(i),
            N::Float(_) => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        Some(match self.0 {
            N::Unsigned(u) => u as f64,
            N::Negative(i) => i as f64,
            N::Float(f) => f,
        })
    }
}

impl Value {
    pub fn as_object(&self) -> Option<&Map<String, Value>> {
        match self {
            Value::Object(m) => Some(m),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&Vec<Value>> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Number(n) => n.as_u64(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Number(n) => n.as_i64(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Number(n) => n.as_f64(),
            _ => None,
        }
    }

    pub fn is_object(&self) -> bool {
        matches!(self, Value::Object(_))
    }

    /// An object's member.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.as_object()?.get(key)
    }
}

/// Why a document is not JSON, and where (1-based line and column, in bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub reason: &'static str,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at line {} column {}", self.reason, self.line, self.column)
    }
}

impl std::error::Error for ParseError {}

/// Parses one JSON document (surrounding whitespace allowed, nothing else).
pub fn parse(bytes: &[u8]) -> Result<Value, ParseError> {
    let mut p = Parser { bytes, at: 0 };
    if std::str::from_utf8(bytes).is_err() {
        // Point at the first invalid byte.
        p.at = std::str::from_utf8(bytes).err().map_or(0, |e| e.valid_up_to());
        return Err(p.error("invalid UTF-8"));
    }
    let value = p.value(0)?;
    p.skip_whitespace();
    if p.at < bytes.len() {
        return Err(p.error("trailing characters"));
    }
    Ok(value)
}

struct Parser<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn error(&self, reason: &'static str) -> ParseError {
        let before = self.bytes.get(..self.at).unwrap_or(self.bytes);
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let column = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
        ParseError { reason, line, column }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn bump(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.at += 1;
        Some(b)
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn expect_word(&mut self, word: &[u8], value: Value) -> Result<Value, ParseError> {
        if self.bytes.get(self.at..self.at + word.len()) == Some(word) {
            self.at += word.len();
            Ok(value)
        } else {
            Err(self.error("expected value"))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, ParseError> {
        self.skip_whitespace();
        match self.peek() {
            None => Err(self.error("EOF while parsing a value")),
            Some(b'n') => self.expect_word(b"null", Value::Null),
            Some(b't') => self.expect_word(b"true", Value::Bool(true)),
            Some(b'f') => self.expect_word(b"false", Value::Bool(false)),
            Some(b'"') => Ok(Value::String(self.string()?)),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b'[') if depth < MAX_DEPTH => self.array(depth + 1),
            Some(b'{') if depth < MAX_DEPTH => self.object(depth + 1),
            Some(b'[' | b'{') => Err(self.error("nested too deeply")),
            Some(_) => Err(self.error("expected value")),
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, ParseError> {
        self.at += 1; // '['
        let mut items = Vec::new();
        self.skip_whitespace();
        if self.peek() == Some(b']') {
            self.at += 1;
            return Ok(Value::Array(items));
        }
        loop {
            items.push(self.value(depth)?);
            self.skip_whitespace();
            match self.bump() {
                Some(b',') => {}
                Some(b']') => return Ok(Value::Array(items)),
                _ => {
                    self.at = self.at.saturating_sub(1);
                    return Err(self.error("expected `,` or `]`"));
                }
            }
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value, ParseError> {
        self.at += 1; // '{'
        let mut members = Map::new();
        self.skip_whitespace();
        if self.peek() == Some(b'}') {
            self.at += 1;
            return Ok(Value::Object(members));
        }
        loop {
            self.skip_whitespace();
            if self.peek() != Some(b'"') {
                return Err(self.error("expected a key in double quotes"));
            }
            let key_at = self.at;
            let key = self.string()?;
            self.skip_whitespace();
            if self.bump() != Some(b':') {
                self.at = self.at.saturating_sub(1);
                return Err(self.error("expected `:`"));
            }
            let value = self.value(depth)?;
            if members.insert(key, value).is_some() {
                self.at = key_at;
                return Err(self.error("duplicate key"));
            }
            self.skip_whitespace();
            match self.bump() {
                Some(b',') => {}
                Some(b'}') => return Ok(Value::Object(members)),
                _ => {
                    self.at = self.at.saturating_sub(1);
                    return Err(self.error("expected `,` or `}`"));
                }
            }
        }
    }

    fn string(&mut self) -> Result<String, ParseError> {
        self.at += 1; // '"'
        let mut out = String::new();
        loop {
            let start = self.at;
            while matches!(self.peek(), Some(b) if b != b'"' && b != b'\\' && b >= 0x20) {
                self.at += 1;
            }
            // The document is valid UTF-8 and the run stops at ASCII bytes only.
            out.push_str(std::str::from_utf8(self.bytes.get(start..self.at).unwrap_or_default()).unwrap_or_default());
            match self.bump() {
                Some(b'"') => return Ok(out),
                Some(b'\\') => self.escape(&mut out)?,
                Some(_) => {
                    self.at -= 1;
                    return Err(self.error("control character in a string"));
                }
                None => return Err(self.error("EOF while parsing a string")),
            }
        }
    }

    fn escape(&mut self, out: &mut String) -> Result<(), ParseError> {
        let c = match self.bump() {
            Some(b'"') => '"',
            Some(b'\\') => '\\',
            Some(b'/') => '/',
            Some(b'b') => '\u{8}',
            Some(b'f') => '\u{c}',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => {
                let first = self.hex4()?;
                let code = match first {
                    0xD800..=0xDBFF => {
                        if self.bump() != Some(b'\\') || self.bump() != Some(b'u') {
                            return Err(self.error("lone surrogate in a \\u escape"));
                        }
                        let second = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&second) {
                            return Err(self.error("lone surrogate in a \\u escape"));
                        }
                        0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)
                    }
                    0xDC00..=0xDFFF => return Err(self.error("lone surrogate in a \\u escape")),
                    other => other,
                };
                char::from_u32(code).ok_or_else(|| self.error("invalid \\u escape"))?
            }
            _ => return Err(self.error("invalid escape")),
        };
        out.push(c);
        Ok(())
    }

    fn hex4(&mut self) -> Result<u32, ParseError> {
        let mut v = 0;
        for _ in 0..4 {
            let digit = self.bump().and_then(|b| char::from(b).to_digit(16));
            v = v * 16 + digit.ok_or_else(|| self.error("invalid \\u escape"))?;
        }
        Ok(v)
    }

    fn digits(&mut self) -> usize {
        let start = self.at;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.at += 1;
        }
        self.at - start
    }

    fn number(&mut self) -> Result<Value, ParseError> {
        let start = self.at;
        let negative = self.peek() == Some(b'-');
        if negative {
            self.at += 1;
        }
        let int_start = self.at;
        let int_digits = self.digits();
        if int_digits == 0 || (int_digits > 1 && self.bytes.get(int_start) == Some(&b'0')) {
            return Err(self.error("invalid number"));
        }
        let mut integer = true;
        if self.peek() == Some(b'.') {
            self.at += 1;
            integer = false;
            if self.digits() == 0 {
                return Err(self.error("invalid number"));
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.at += 1;
            integer = false;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.at += 1;
            }
            if self.digits() == 0 {
                return Err(self.error("invalid number"));
            }
        }
        let text = self.bytes.get(start..self.at).unwrap_or_default();
        let n = match (integer, negative) {
            (true, false) => decimal_integer(text).map(N::Unsigned),
            // `-0` is a float (negative zero), as in serde_json.
            (true, true) => decimal_integer(text.get(1..).unwrap_or_default())
                .and_then(|u| 0i64.checked_sub_unsigned(u))
                .filter(|&i| i != 0)
                .map(N::Negative),
            (false, _) => None,
        };
        let n = match n {
            Some(n) => n,
            // A fraction, an exponent, or an integer too large for 64 bits.
            None => match float(text) {
                Some(f) => N::Float(f),
                None => return Err(self.error("number out of range")),
            },
        };
        Ok(Value::Number(Number(n)))
    }
}

/// Digits as a u64; `None` on overflow.
fn decimal_integer(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |n, &d| n.checked_mul(10)?.checked_add(u64::from(d.wrapping_sub(b'0'))))
}

/// A JSON number's value as an f64, without `f64::from_str`: its tables cost the module about
/// 15 KB (see rate.rs). The first 19 significant digits, scaled by a power of ten: exactly
/// rounded for up to 15 digits and exponents within +-22 (every rate a config holds), within
/// an ulp or two beyond. `None` when the value is not finite.
fn float(text: &[u8]) -> Option<f64> {
    let (negative, rest) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    let (mut mantissa, mut digits, mut exp10) = (0u64, 0u32, 0i64);
    let mut in_fraction = false;
    let mut i = 0;
    while let Some(&b) = rest.get(i) {
        match b {
            b'0'..=b'9' => {
                if digits < 19 {
                    mantissa = mantissa * 10 + u64::from(b - b'0');
                    if mantissa > 0 {
                        digits += 1;
                    }
                    exp10 -= i64::from(in_fraction);
                } else if !in_fraction {
                    exp10 += 1; // a dropped integer digit still scales the value
                }
            }
            b'.' => in_fraction = true,
            _ => break,
        }
        i += 1;
    }
    if let Some(b'e' | b'E') = rest.get(i) {
        let exp = rest.get(i + 1..).unwrap_or_default();
        let (sign, exp) = match exp.split_first() {
            Some((b'-', e)) => (-1, e),
            Some((b'+', e)) => (1, e),
            _ => (1, exp),
        };
        // Saturate: 1e999999999999 is out of range either way.
        let e = exp.iter().fold(0i64, |n, &d| n.saturating_mul(10).saturating_add(i64::from(d - b'0')));
        exp10 = exp10.saturating_add(sign * e);
    }
    let scale = |e: i64| 10f64.powi(i32::try_from(e.unsigned_abs().min(400)).unwrap_or(400));
    let magnitude = if mantissa == 0 {
        0.0
    } else if exp10 >= 0 {
        mantissa as f64 * scale(exp10)
    } else if exp10 >= -308 {
        mantissa as f64 / scale(exp10)
    } else {
        // Below 1e-308: two steps, so 10^-exp10 does not overflow first.
        mantissa as f64 / scale(exp10 + 308) / 1e308
    };
    let value = if negative { -magnitude } else { magnitude };
    value.is_finite().then_some(value)
}

/// The native tools read YAML and whole files with serde_json; this hands such a document
/// to the config code.
#[cfg(not(target_arch = "wasm32"))]
impl From<&serde_json::Value> for Value {
    fn from(v: &serde_json::Value) -> Value {
        match v {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => Value::Number(Number(match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => N::Unsigned(u),
                (None, Some(i)) => N::Negative(i),
                _ => N::Float(n.as_f64().unwrap_or(f64::NAN)),
            })),
            serde_json::Value::String(s) => Value::String(s.clone()),
            serde_json::Value::Array(a) => Value::Array(a.iter().map(Value::from).collect()),
            serde_json::Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), Value::from(v))).collect()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> Value {
        parse(text.as_bytes()).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn bad(text: &str) -> String {
        parse(text.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn values() {
        let v = ok(r#" {"a": [1, -2, 0.5, 1e3, true, false, null, "x\n\u00e9\ud83d\ude00"], "b": {}} "#);
        let a = v.get("a").and_then(Value::as_array).unwrap();
        assert_eq!(a[0].as_u64(), Some(1));
        assert_eq!((a[1].as_u64(), a[1].as_i64()), (None, Some(-2)));
        assert_eq!((a[2].as_u64(), a[2].as_f64()), (None, Some(0.5)));
        assert_eq!(a[3].as_f64(), Some(1000.0));
        assert_eq!(a[3].as_u64(), None, "an exponent makes a float, as in serde_json");
        assert_eq!((a[4].as_bool(), a[5].as_bool(), &a[6]), (Some(true), Some(false), &Value::Null));
        assert_eq!(a[7].as_str(), Some("x\né😀"));
        assert!(v.get("b").is_some_and(Value::is_object));
        assert_eq!(ok("18446744073709551615").as_u64(), Some(u64::MAX));
        assert_eq!(ok("18446744073709551616").as_f64(), Some(18446744073709551616.0));
    }

    #[test]
    fn errors_say_where() {
        assert_eq!(bad("{\"a\": 1,\n  \"a\": 2}"), "duplicate key at line 2 column 3");
        assert_eq!(bad("{\"a\" 1}"), "expected `:` at line 1 column 6");
        assert_eq!(bad("[1 2]"), "expected `,` or `]` at line 1 column 4");
        assert_eq!(bad("{\"a\":1,}"), "expected a key in double quotes at line 1 column 8");
        assert_eq!(bad("{} x"), "trailing characters at line 1 column 4");
        assert_eq!(bad(""), "EOF while parsing a value at line 1 column 1");
        assert_eq!(bad("\"abc"), "EOF while parsing a string at line 1 column 5");
        assert_eq!(bad("\"a\tb\""), "control character in a string at line 1 column 3");
        assert_eq!(bad("01"), "invalid number at line 1 column 3");
        assert_eq!(bad("1."), "invalid number at line 1 column 3");
        assert_eq!(bad("-"), "invalid number at line 1 column 2");
        assert_eq!(bad("1e999"), "number out of range at line 1 column 6");
        assert_eq!(bad("\"\\ud800\""), "lone surrogate in a \\u escape at line 1 column 9");
        assert_eq!(bad("\"\\x\""), "invalid escape at line 1 column 4");
        assert_eq!(bad("nul"), "expected value at line 1 column 1");
        assert_eq!(parse(b"\"\xff\"").unwrap_err().reason, "invalid UTF-8");
    }

    #[test]
    fn depth_is_capped() {
        let deep = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert!(parse(deep.as_bytes()).is_ok());
        let deeper = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert!(bad(&deeper).starts_with("nested too deeply"));
        let hostile = "[".repeat(1_000_000);
        assert!(parse(hostile.as_bytes()).is_err());
    }

    #[test]
    fn agrees_with_serde_json_on_valid_documents() {
        for text in [
            r#"{"capacity":5,"refill_rate":"60/min","tenants":{"a b":{"capacity":1}},"x":[1.25,-3,{"y":null}]}"#,
            r#"[]"#,
            r#""\"\\\/\b\f\n\r\t""#,
            "-0",
            "123456789012345678901234567890",
        ] {
            let ours = ok(text);
            let theirs: serde_json::Value = serde_json::from_str(text).unwrap();
            assert_eq!(ours, Value::from(&theirs), "{text}");
        }
        for text in ["0.5", "0.1", "1.25e2", "3.3333", "1e-7", "0.000001", "1000000000000", "2.5E+3", "-0.75", "1e-320"]
        {
            let theirs: f64 = serde_json::from_str(text).unwrap();
            assert_eq!(ok(text).as_f64(), Some(theirs), "{text}");
        }
    }

    /// Equal, floats within a relative 1e-15 (our float reading is not always the nearest).
    fn close(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) if x.as_u64().is_none() && x.as_i64().is_none() => {
                let (x, y) = (x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0));
                x == y || (x - y).abs() <= x.abs().max(y.abs()) * 1e-15
            }
            (Value::Array(a), Value::Array(b)) => a.len() == b.len() && a.iter().zip(b).all(|(x, y)| close(x, y)),
            (Value::Object(a), Value::Object(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|((k, x), (l, y))| k == l && close(x, y))
            }
            _ => a == b,
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn never_panics_on_json_like_text(text in "[\\[\\]{}\",:0-9eE.+\\-a-z\\\\ ]{0,48}") {
            let ours = parse(text.as_bytes()).ok();
            let theirs = serde_json::from_str::<serde_json::Value>(&text).ok();
            // Where serde_json accepts, we accept the same value (we refuse duplicate keys).
            if let (Some(theirs), None) = (&theirs, &ours) {
                proptest::prop_assert!(text.matches(':').count() > 1, "{text} {theirs:?}");
            }
            if let (Some(ours), Some(theirs)) = (ours, theirs) {
                proptest::prop_assert!(close(&ours, &Value::from(&theirs)), "{text}: {ours:?} {theirs:?}");
            }
        }
    }
}
