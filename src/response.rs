//! Rate-limit response headers and the denial's `retry-after`, formatted into stack buffers
//! so the request path does not allocate.

use crate::bucket::{ticks_to_seconds_ceil, Verdict};
use crate::config::HeaderStyle;

/// What a response tells the client about its bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub capacity: u64,
    pub remaining: u64,
    /// Seconds until the bucket is full again, rounded up.
    pub reset_seconds: u64,
    /// Seconds for an empty bucket to refill, rounded up.
    pub window_seconds: u64,
}

impl Quota {
    pub fn new(capacity: u64, window_seconds: u64, verdict: &Verdict) -> Quota {
        Quota {
            capacity,
            remaining: verdict.remaining,
            reset_seconds: ticks_to_seconds_ceil(verdict.reset),
            window_seconds,
        }
    }
}

/// `retry-after` in whole seconds, rounded up, at least 1 (0 would invite a retry storm).
pub fn retry_after_seconds(verdict: &Verdict) -> u64 {
    ticks_to_seconds_ceil(verdict.retry_after).max(1)
}

/// Room for a quoted policy name (128 visible characters, each possibly escaped) and numbers.
const VALUE_CAP: usize = 2 * 128 + 2 + 3 * 24;

/// A header value built on the stack.
pub struct Value {
    buf: [u8; VALUE_CAP],
    len: usize,
}

impl Value {
    fn new() -> Value {
        Value { buf: [0; VALUE_CAP], len: 0 }
    }

    fn push(&mut self, bytes: &[u8]) -> &mut Self {
        for &b in bytes {
            if let Some(slot) = self.buf.get_mut(self.len) {
                *slot = b;
                self.len += 1;
            }
        }
        self
    }

    fn num(&mut self, n: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut n = n;
        loop {
            i -= 1;
            if let Some(d) = digits.get_mut(i) {
                *d = b'0' + (n % 10) as u8;
            }
            n /= 10;
            if n == 0 || i == 0 {
                break;
            }
        }
        self.push(digits.get(i..).unwrap_or(&[]))
    }

    /// A Structured Field string: `"..."` with `"` and `\` escaped. Policy names are visible
    /// ASCII (checked by config), which is exactly what sf-string allows.
    fn sf_string(&mut self, s: &str) -> &mut Self {
        self.push(b"\"");
        for &b in s.as_bytes() {
            if b == b'"' || b == b'\\' {
                self.push(b"\\");
            }
            self.push(&[b]);
        }
        self.push(b"\"")
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.buf.get(..self.len).unwrap_or(&[])).unwrap_or("")
    }
}

pub fn number(n: u64) -> Value {
    let mut v = Value::new();
    v.num(n);
    v
}

/// Emits the configured rate-limit headers through `emit(name, value)`.
pub fn rate_limit_headers(style: HeaderStyle, policy: &str, quota: &Quota, mut emit: impl FnMut(&'static str, &str)) {
    match style {
        HeaderStyle::Off => {}
        HeaderStyle::XRateLimit => {
            emit("x-ratelimit-limit", number(quota.capacity).as_str());
            emit("x-ratelimit-remaining", number(quota.remaining).as_str());
            emit("x-ratelimit-reset", number(quota.reset_seconds).as_str());
        }
        HeaderStyle::Ietf => {
            let mut p = Value::new();
            p.sf_string(policy).push(b";q=").num(quota.capacity).push(b";w=").num(quota.window_seconds);
            emit("ratelimit-policy", p.as_str());
            let mut r = Value::new();
            r.sf_string(policy).push(b";r=").num(quota.remaining).push(b";t=").num(quota.reset_seconds);
            emit("ratelimit", r.as_str());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bucket::{debit, Limit};

    fn collect(style: HeaderStyle, policy: &str, q: &Quota) -> Vec<(String, String)> {
        let mut out = Vec::new();
        rate_limit_headers(style, policy, q, |n, v| out.push((n.to_string(), v.to_string())));
        out
    }

    const Q: Quota = Quota { capacity: 120, remaining: 7, reset_seconds: 57, window_seconds: 60 };

    #[test]
    fn x_ratelimit_headers() {
        assert_eq!(
            collect(HeaderStyle::XRateLimit, "acme", &Q),
            vec![
                ("x-ratelimit-limit".into(), "120".into()),
                ("x-ratelimit-remaining".into(), "7".into()),
                ("x-ratelimit-reset".into(), "57".into())
            ]
        );
        assert!(collect(HeaderStyle::Off, "acme", &Q).is_empty());
    }

    #[test]
    fn ietf_draft_10_headers() {
        assert_eq!(
            collect(HeaderStyle::Ietf, "acme", &Q),
            vec![
                ("ratelimit-policy".into(), "\"acme\";q=120;w=60".into()),
                ("ratelimit".into(), "\"acme\";r=7;t=57".into())
            ]
        );
        let odd = collect(HeaderStyle::Ietf, "a\"b\\c", &Q);
        assert_eq!(odd[0].1, "\"a\\\"b\\\\c\";q=120;w=60");
    }

    #[test]
    fn numbers_format_at_the_extremes() {
        assert_eq!(number(0).as_str(), "0");
        assert_eq!(number(u64::MAX).as_str(), "18446744073709551615");
        let long = "x".repeat(128);
        let q = Quota { capacity: u64::MAX, remaining: u64::MAX, reset_seconds: u64::MAX, window_seconds: u64::MAX };
        let h = collect(HeaderStyle::Ietf, &long, &q);
        assert!(h[1].1.ends_with(";t=18446744073709551615"));
    }

    #[test]
    fn retry_after_rounds_up_and_is_at_least_one() {
        let l = Limit::new(1, 0.4).unwrap(); // 2.5 s per token
        let t0 = 1_000_000_000_000;
        let v1 = debit(&l, 0, t0, 1);
        let v2 = debit(&l, v1.t_full, t0, 1);
        assert!(!v2.allowed);
        assert_eq!(retry_after_seconds(&v2), 3);
        let v3 = debit(&l, v1.t_full, t0 + 2_499_999_999, 1);
        assert_eq!(retry_after_seconds(&v3), 1);
    }
}
