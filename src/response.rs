//! Local replies (HTTP and gRPC) and rate-limit headers. Header values are formatted into
//! stack buffers so the allowed path does not allocate; only a denial builds a reply.

use crate::bucket::{ticks_to_seconds_ceil, Limit, Limits, Verdict, Verdicts};
use crate::config::{Config, HeaderStyle};
use crate::metrics::{Counter, Events};
use crate::policy::PolicyId;

/// What a response tells the client about its bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub capacity: u64,
    pub remaining: u64,
    /// Seconds until the bucket is full again, rounded up (`x-ratelimit-reset`).
    pub reset_seconds: u64,
    /// Seconds until at least one more token is available, rounded up; 0 when the bucket
    /// is full (the `t` of draft-10's `RateLimit`).
    pub next_seconds: u64,
    /// Seconds for an empty bucket to refill, rounded up.
    pub window_seconds: u64,
    /// Which of the policy's limits this is (0 for a one-limit policy, the overflow bucket
    /// and the rate-limit service).
    pub limit: usize,
}

impl Quota {
    pub fn new(limit: &Limit, verdict: &Verdict) -> Quota {
        Quota {
            capacity: limit.capacity,
            remaining: verdict.remaining,
            reset_seconds: ticks_to_seconds_ceil(verdict.reset),
            next_seconds: ticks_to_seconds_ceil(next_token_ticks(limit, verdict)),
            window_seconds: limit.window_seconds(),
            limit: 0,
        }
    }

    /// The limit closest to denying, which `RateLimit` and `x-ratelimit-*` report: the fewest
    /// whole tokens left; on a tie the one whose next token is furthest away (a request needs
    /// every limit, so that one says when the next can pass); then the first listed.
    pub fn tightest(limits: &Limits, verdicts: &Verdicts) -> Quota {
        let mut best: Option<Quota> = None;
        for (i, (limit, verdict)) in limits.iter().zip(verdicts.iter()).enumerate() {
            let q = Quota { limit: i, ..Quota::new(limit, verdict) };
            best = match best {
                Some(b)
                    if b.remaining < q.remaining
                        || (b.remaining == q.remaining && b.next_seconds >= q.next_seconds) =>
                {
                    Some(b)
                }
                _ => Some(q),
            };
        }
        best.unwrap_or(Quota {
            capacity: 0,
            remaining: 0,
            reset_seconds: 0,
            next_seconds: 0,
            window_seconds: 0,
            limit: 0,
        })
    }
}

/// Ticks until the bucket holds `remaining + 1` whole tokens (0 if it is full). `reset` is
/// the debt (ticks until full) and `remaining` the whole tokens at the verdict's time, so
/// the next token arrives when the debt has shrunk to `tau - (remaining + 1) * interval`.
/// On a denial `remaining < cost`, so this is never later than the verdict's `retry_after`.
fn next_token_ticks(limit: &Limit, verdict: &Verdict) -> u128 {
    if verdict.remaining >= limit.capacity {
        return 0;
    }
    let wanted = (verdict.remaining as u128).saturating_add(1).saturating_mul(limit.interval);
    verdict.reset.saturating_add(wanted).saturating_sub(limit.tau())
}

/// Why the filter sent a local reply: the response code details Envoy logs as
/// `%RESPONSE_CODE_DETAILS%`. Envoy requires details without whitespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// The tenant's (or rule's, or overflow) bucket is empty.
    OverLimit,
    /// `overflow: "deny"`: no slot for a new tenant.
    Overflow,
    /// `on_store_error: "deny"`: shared data could not be updated.
    StoreError,
    /// The rate-limit service answered OVER_LIMIT.
    GlobalOverLimit,
    /// The rate-limit service failed or timed out, with `failure_mode: "deny"`.
    GlobalError,
}

impl Denial {
    pub const ALL: [Denial; 5] =
        [Denial::OverLimit, Denial::Overflow, Denial::StoreError, Denial::GlobalOverLimit, Denial::GlobalError];

    pub const fn details(self) -> &'static str {
        match self {
            Denial::OverLimit => "tenant_ratelimit_denied",
            Denial::Overflow => "tenant_ratelimit_overflow_denied",
            Denial::StoreError => "tenant_ratelimit_store_error",
            Denial::GlobalOverLimit => "tenant_ratelimit_global_over_limit",
            Denial::GlobalError => "tenant_ratelimit_global_error",
        }
    }

    /// The reason behind a denying local decision (`decision::decide`, via the flow), read from the
    /// counters it bumped: each denial path bumps exactly one of these.
    pub fn local(events: &Events) -> Denial {
        if events.count(Counter::OverflowDenied) > 0 {
            Denial::Overflow
        } else if events.count(Counter::StoreErrors) > 0 {
            Denial::StoreError
        } else {
            Denial::OverLimit
        }
    }

    /// The reason behind a denying service verdict (`global::Service::conclude`).
    pub fn global(events: &Events) -> Denial {
        if events.count(Counter::ServiceOverLimit) > 0 {
            Denial::GlobalOverLimit
        } else {
            Denial::GlobalError
        }
    }
}

/// Whether a request's `content-type` makes it a gRPC call (`application/grpc`,
/// `application/grpc+proto`, `application/grpc-web`, ...). ASCII case-insensitive.
pub fn is_grpc(content_type: &[u8]) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    content_type.get(..GRPC.len()).is_some_and(|p| p.eq_ignore_ascii_case(GRPC))
}

/// A denial to answer.
#[derive(Debug, Clone, Copy)]
pub struct Denied<'a> {
    pub why: Denial,
    /// Whole seconds, at least 1.
    pub retry_after: u64,
    /// The policy whose limits go into `RateLimit` headers (`None`: the rate-limit service).
    pub policy: Option<PolicyId>,
    /// The bucket, when one was consulted.
    pub quota: Option<&'a Quota>,
    /// Headers the rate-limit service asked to add.
    pub extra: &'a [(String, String)],
}

/// The arguments of `proxy_send_local_response`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply<'a> {
    pub status: u32,
    pub details: &'static str,
    pub body: &'a [u8],
    pub headers: Vec<(&'a str, String)>,
    /// -1: not a gRPC reply.
    pub grpc_status: i32,
}

/// Builds the local reply for a denial. `grpc_content_type` is the request's content type
/// when it is a gRPC request ([`is_grpc`]).
///
/// A gRPC client needs HTTP 200 and a `grpc-status`: Envoy turns a local reply to an
/// `application/grpc` request into a trailers-only response with `:status` 200 and its own
/// content type whatever status we pass, sets `grpc-status` from our `grpc_status` unless a
/// `grpc-status` header is already there, and keeps our `grpc-message` when the body is
/// empty. So the reply says 200, carries both gRPC headers itself and has no body: that way
/// content types Envoy does not treat as gRPC (`application/grpc-web` without the grpc_web
/// filter in front) get the same answer, and no body can corrupt gRPC framing.
pub fn local_reply<'a>(config: &'a Config, denied: &Denied<'a>, grpc_content_type: Option<&'a str>) -> LocalReply<'a> {
    let deny = &config.deny;
    let mut headers: Vec<(&'a str, String)> = Vec::with_capacity(8 + denied.extra.len());
    headers.push(("retry-after", number(denied.retry_after).as_str().to_string()));
    let mut reply = match grpc_content_type {
        Some(content_type) => {
            headers.push(("content-type", content_type.to_string()));
            headers.push(("grpc-status", number(u64::from(deny.grpc_status)).as_str().to_string()));
            headers.push(("grpc-message", deny.grpc_message.clone()));
            // gRFC A6: the delay a retrying client must wait, in milliseconds.
            let ms = denied.retry_after.saturating_mul(1000);
            headers.push(("grpc-retry-pushback-ms", number(ms).as_str().to_string()));
            let grpc_status = i32::try_from(deny.grpc_status).unwrap_or(8);
            LocalReply { status: 200, details: denied.why.details(), body: &[], headers, grpc_status }
        }
        None => {
            headers.push(("content-type", deny.content_type.clone()));
            LocalReply {
                status: deny.status,
                details: denied.why.details(),
                body: deny.body.as_bytes(),
                headers,
                grpc_status: -1,
            }
        }
    };
    if let Some(quota) = denied.quota {
        // `t` must not send a client back before `retry-after` says it may succeed.
        let quota = Quota { next_seconds: quota.next_seconds.min(denied.retry_after), ..*quota };
        rate_limit_headers(config, denied.policy, &quota, &mut |n, v| reply.headers.push((n, v.to_string())));
    }
    for (n, v) in denied.extra {
        reply.headers.push((n.as_str(), v.clone()));
    }
    reply
}

/// Serializes header pairs the way `proxy_send_local_response` reads them (proxy-wasm ABI
/// 0.2.1): the pair count, each pair's name and value sizes, then each name and value
/// followed by a NUL; integers little-endian u32.
pub fn serialize_pairs(pairs: &[(&str, String)]) -> Vec<u8> {
    let size: usize = 4 + pairs.iter().map(|(n, v)| 8 + n.len() + v.len() + 2).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    let u32_le = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    out.extend_from_slice(&u32_le(pairs.len()));
    for (n, v) in pairs {
        out.extend_from_slice(&u32_le(n.len()));
        out.extend_from_slice(&u32_le(v.len()));
    }
    for (n, v) in pairs {
        out.extend_from_slice(n.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// `retry-after` in whole seconds, rounded up, at least 1 (0 would invite a retry storm):
/// the longest wait among the limits that denied.
/// `retry_after` in ticks ([`Verdicts::retry_after`]).
pub fn retry_after_seconds(retry_after: u128) -> u64 {
    ticks_to_seconds_ceil(retry_after).max(1)
}

/// Room for a quoted policy name (128 visible characters, each possibly escaped) and numbers,
/// or for several limits: `MAX_LIMITS` x (a 32-character name, quotes, two numbers, `, `).
const VALUE_CAP: usize = 2 * 128 + 2 + 3 * 24;
const _: () = assert!(crate::bucket::MAX_LIMITS * (32 + 2 + 3 + 20 + 3 + 20 + 2) <= VALUE_CAP);

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

/// Emits the configured rate-limit headers through `emit(name, value)`. `quota` is the limit
/// closest to denying ([`Quota::tightest`]): `x-ratelimit-*` and `RateLimit` report it;
/// `RateLimit-Policy` lists every limit of `policy` (`None`: the rate-limit service's one
/// limit, named "global"), the reported one with the quota's own numbers (the overflow
/// bucket's, when that decided).
pub fn rate_limit_headers(
    config: &Config,
    policy: Option<PolicyId>,
    quota: &Quota,
    emit: &mut dyn FnMut(&'static str, &str),
) {
    match config.headers {
        HeaderStyle::Off => {}
        HeaderStyle::XRateLimit => {
            emit("x-ratelimit-limit", number(quota.capacity).as_str());
            emit("x-ratelimit-remaining", number(quota.remaining).as_str());
            emit("x-ratelimit-reset", number(quota.reset_seconds).as_str());
        }
        HeaderStyle::Ietf => {
            let policy = policy.map(|id| id.policy(config));
            let name = |i: usize| policy.map_or("global", |p| p.limit_name(i));
            let mut p = Value::new();
            let n = policy.map_or(1, |p| p.limits.len());
            for i in 0..n {
                let (capacity, window) = match policy.and_then(|p| p.limits.iter().nth(i)) {
                    Some(l) if i != quota.limit => (l.capacity, l.window_seconds()),
                    _ => (quota.capacity, quota.window_seconds),
                };
                if i > 0 {
                    p.push(b", ");
                }
                p.sf_string(name(i)).push(b";q=").num(capacity).push(b";w=").num(window);
            }
            emit("ratelimit-policy", p.as_str());
            let mut r = Value::new();
            r.sf_string(name(quota.limit)).push(b";r=").num(quota.remaining).push(b";t=").num(quota.next_seconds);
            emit("ratelimit", r.as_str());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bucket::{debit, Limit, TICKS_PER_NS};
    use proptest::prelude::*;

    /// The headers of tenant `policy`'s one limit.
    fn collect(style: HeaderStyle, policy: &str, q: &Quota) -> Vec<(String, String)> {
        let style = match style {
            HeaderStyle::Off => "off",
            HeaderStyle::XRateLimit => "x-ratelimit",
            HeaderStyle::Ietf => "ietf",
        };
        let json =
            serde_json::json!({"capacity": 1, "refill_rate": 1, "rate_limit_headers": style, "tenants": {policy: {}}});
        let c = Config::from_value(&crate::json::Value::from(&json)).unwrap();
        headers_of(&c, Some(PolicyId::Tenant(0)), q)
    }

    fn headers_of(c: &Config, policy: Option<PolicyId>, q: &Quota) -> Vec<(String, String)> {
        let mut out = Vec::new();
        rate_limit_headers(c, policy, q, &mut |n, v| out.push((n.to_string(), v.to_string())));
        out
    }

    const Q: Quota =
        Quota { capacity: 120, remaining: 7, reset_seconds: 57, next_seconds: 1, window_seconds: 60, limit: 0 };

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
                ("ratelimit".into(), "\"acme\";r=7;t=1".into())
            ]
        );
        let odd = collect(HeaderStyle::Ietf, "a\"b\\c", &Q);
        assert_eq!(odd[0].1, "\"a\\\"b\\\\c\";q=120;w=60");
    }

    #[test]
    fn several_limits_headers() {
        let c = config(
            r#"{"capacity":1,"refill_rate":1,"rate_limit_headers":"ietf","tenants":{"acme":{"limits":[
            {"name":"burst","capacity":20,"refill_rate":"20/s"},{"name":"hourly","capacity":1000,"refill_rate":"1000/h"}]}}}"#,
        );
        let q = Quota {
            capacity: 1000,
            remaining: 3,
            reset_seconds: 3590,
            next_seconds: 4,
            window_seconds: 3600,
            limit: 1,
        };
        let h = headers_of(&c, Some(PolicyId::Tenant(0)), &q);
        assert_eq!(h[0], ("ratelimit-policy".into(), "\"burst\";q=20;w=1, \"hourly\";q=1000;w=3600".into()));
        assert_eq!(h[1], ("ratelimit".into(), "\"hourly\";r=3;t=4".into()));
        // The rate-limit service's quota is one limit named "global".
        assert_eq!(headers_of(&c, None, &Q)[0].1, "\"global\";q=120;w=60");
        // Four limits with 32-character names and the largest numbers fit the buffer.
        let name = |i: usize| format!("{i}{}", "n".repeat(31));
        let limits: Vec<String> = (0..4)
            .map(|i| format!(r#"{{"name":"{}","capacity":1099511627776,"refill_rate":0.000001}}"#, name(i)))
            .collect();
        let c = config(&format!(r#"{{"rate_limit_headers":"ietf","limits":[{}]}}"#, limits.join(",")));
        let q = Quota { limit: 3, remaining: u64::MAX, next_seconds: u64::MAX, ..Q };
        let h = headers_of(&c, Some(PolicyId::Default), &q);
        assert_eq!(h[0].1.matches(";q=1099511627776;w=").count(), 3);
        assert!(h[0].1.ends_with(&format!("\"{}\";q=120;w=60", name(3))), "{}", h[0].1);
        assert_eq!(h[1].1, format!("\"{}\";r={};t={}", name(3), u64::MAX, u64::MAX));
    }

    #[test]
    fn the_tightest_limit_is_reported() {
        let l = |c, r| Limit::new(c, r).unwrap();
        let mut limits = Limits::default();
        limits.push(1, l(5, 5.0));
        limits.push(2, l(8, 8.0 / 60.0));
        limits.push(3, l(100, 1.0));
        // 3 taken from each: 2 left, 5 left, 97 left: the first is the tightest.
        let mut states = [0; crate::bucket::MAX_LIMITS];
        for _ in 0..3 {
            states = crate::bucket::debit_all(&limits, &states, T0, 1).states();
        }
        let q = Quota::tightest(&limits, &crate::bucket::debit_all(&limits, &states, T0, 0));
        assert_eq!((q.limit, q.remaining, q.capacity), (0, 2, 5));
        // Two more, and 0.9 s: the burst limit refilled to 4, the minute one has 3.
        for _ in 0..2 {
            states = crate::bucket::debit_all(&limits, &states, T0, 1).states();
        }
        let v = crate::bucket::debit_all(&limits, &states, T0 + 900_000_000, 0);
        let q = Quota::tightest(&limits, &v);
        assert_eq!((q.limit, q.remaining), (1, 3));
        // A tie (0 and 0) goes to the limit whose next token is further away.
        let mut tie = Limits::default();
        tie.push(1, l(2, 2.0));
        tie.push(2, l(2, 2.0 / 60.0));
        let mut states = [0; crate::bucket::MAX_LIMITS];
        for _ in 0..2 {
            states = crate::bucket::debit_all(&tie, &states, T0, 1).states();
        }
        let v = crate::bucket::debit_all(&tie, &states, T0, 1);
        assert!(!v.allowed);
        let q = Quota::tightest(&tie, &v);
        assert_eq!((q.limit, q.remaining, q.next_seconds), (1, 0, 30));
        assert_eq!(retry_after_seconds(v.retry_after()), 30);
    }

    #[test]
    fn numbers_format_at_the_extremes() {
        assert_eq!(number(0).as_str(), "0");
        assert_eq!(number(u64::MAX).as_str(), "18446744073709551615");
        let long = "x".repeat(128);
        let q = Quota {
            capacity: u64::MAX,
            remaining: u64::MAX,
            reset_seconds: u64::MAX,
            next_seconds: u64::MAX,
            window_seconds: u64::MAX,
            limit: 0,
        };
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
        assert_eq!(retry_after_seconds(v2.retry_after), 3);
        let v3 = debit(&l, v1.t_full, t0 + 2_499_999_999, 1);
        assert_eq!(retry_after_seconds(v3.retry_after), 1);
    }

    const SEC: u64 = 1_000_000_000;
    const T0: u64 = 1_700_000_000 * SEC;

    #[test]
    fn t_is_seconds_until_the_next_token_not_until_full() {
        // The issue's case: capacity 2 at 60/min, the third request at once is denied.
        let l = Limit::new(2, 1.0).unwrap();
        let v1 = debit(&l, 0, T0, 1);
        let v2 = debit(&l, v1.t_full, T0, 1);
        let v3 = debit(&l, v2.t_full, T0, 1);
        assert!(v2.allowed && !v3.allowed);
        let q = Quota::new(&l, &v3);
        assert_eq!((q.remaining, q.reset_seconds, q.next_seconds, q.window_seconds), (0, 2, 1, 2));
        assert_eq!(retry_after_seconds(v3.retry_after), 1);
        // After the first request one token is missing: it comes back in 1 s, and so does full.
        assert_eq!(Quota::new(&l, &v1).next_seconds, 1);
        // A full bucket has nothing more to come.
        let full = debit(&l, 0, T0, 0);
        assert_eq!(Quota::new(&l, &full).next_seconds, 0);
        // 10 per minute, 4 spent: the next token is 6 s away, full is 24 s away.
        let l = Limit::new(10, 1.0 / 6.0).unwrap();
        let mut t = 0;
        for _ in 0..4 {
            t = debit(&l, t, T0, 1).t_full;
        }
        let q = Quota::new(&l, &debit(&l, t, T0 + 2 * SEC, 1));
        assert_eq!((q.remaining, q.next_seconds, q.reset_seconds), (5, 4, 28));
    }

    proptest! {
        /// On a denial `t` <= `retry-after`; on any verdict `t` is exactly when one more token
        /// than `remaining` is there (to the nanosecond), or 0 when the bucket is full.
        #[test]
        fn t_is_when_one_more_token_is_there(
            capacity in 1u64..50,
            per_minute in 1u64..100_000,
            steps in prop::collection::vec((0u64..5, 0u64..3 * SEC), 1..40),
        ) {
            let l = Limit::new(capacity, per_minute as f64 / 60.0).unwrap();
            let mut state = 0u128;
            let mut now = T0;
            for (cost, gap) in steps {
                now += gap;
                let v = debit(&l, state, now, cost);
                let q = Quota::new(&l, &v);
                if v.allowed {
                    state = v.t_full;
                } else {
                    prop_assert!(q.next_seconds <= retry_after_seconds(v.retry_after));
                    prop_assert!(v.remaining < cost);
                }
                let next = next_token_ticks(&l, &v);
                if v.remaining >= capacity {
                    prop_assert_eq!(q.next_seconds, 0);
                    continue;
                }
                prop_assert!(next > 0);
                let ns = u64::try_from(next.div_ceil(TICKS_PER_NS)).unwrap();
                let want = v.remaining + 1;
                prop_assert!(debit(&l, state, now + ns, want).allowed);
                prop_assert!(!debit(&l, state, now + ns - 1, want).allowed);
            }
        }
    }

    fn config(json: &str) -> Config {
        Config::from_json_bytes(json.as_bytes()).unwrap()
    }

    const QUOTA: Quota =
        Quota { capacity: 2, remaining: 0, reset_seconds: 9, next_seconds: 5, window_seconds: 10, limit: 0 };

    fn denied<'a>(quota: Option<&'a Quota>, extra: &'a [(String, String)]) -> Denied<'a> {
        Denied { why: Denial::OverLimit, retry_after: 3, policy: Some(PolicyId::Tenant(0)), quota, extra }
    }

    fn header<'a>(r: &'a LocalReply, name: &str) -> Vec<&'a str> {
        r.headers.iter().filter(|(n, _)| *n == name).map(|(_, v)| v.as_str()).collect()
    }

    #[test]
    fn http_denial_reply() {
        let c = config(r#"{"capacity":2,"refill_rate":1,"rate_limit_headers":"ietf","tenants":{"acme":{}}}"#);
        let extra = [("x-from-service".to_string(), "1".to_string())];
        let r = local_reply(&c, &denied(Some(&QUOTA), &extra), None);
        assert_eq!((r.status, r.details, r.grpc_status), (429, "tenant_ratelimit_denied", -1));
        assert_eq!(r.body, br#"{"error":"Too Many Requests"}"#);
        assert_eq!(header(&r, "retry-after"), ["3"]);
        assert_eq!(header(&r, "content-type"), ["application/json"]);
        // `t` is clamped to retry-after (3), never the later 5.
        assert_eq!(header(&r, "ratelimit"), ["\"acme\";r=0;t=3"]);
        assert_eq!(header(&r, "x-from-service"), ["1"]);
        assert!(header(&r, "grpc-status").is_empty() && header(&r, "grpc-retry-pushback-ms").is_empty());
    }

    #[test]
    fn grpc_denial_reply() {
        let c = config(r#"{"capacity":2,"refill_rate":1,"deny":{"status":503,"grpc_message":"slow down"}}"#);
        let d = Denied { why: Denial::StoreError, ..denied(Some(&QUOTA), &[]) };
        let r = local_reply(&c, &d, Some("application/grpc+proto"));
        assert_eq!((r.status, r.details, r.grpc_status), (200, "tenant_ratelimit_store_error", 8));
        assert!(r.body.is_empty());
        assert_eq!(header(&r, "content-type"), ["application/grpc+proto"]);
        assert_eq!(header(&r, "grpc-status"), ["8"]);
        assert_eq!(header(&r, "grpc-message"), ["slow down"]);
        assert_eq!(header(&r, "grpc-retry-pushback-ms"), ["3000"]);
        assert_eq!(header(&r, "retry-after"), ["3"]);
        assert_eq!(header(&r, "x-ratelimit-remaining"), ["0"]);
        let c = config(r#"{"capacity":2,"refill_rate":1,"deny":{"grpc_status":14}}"#);
        let r = local_reply(&c, &denied(None, &[]), Some("application/grpc"));
        assert_eq!((r.grpc_status, header(&r, "grpc-status")), (14, vec!["14"]));
        assert!(header(&r, "x-ratelimit-limit").is_empty());
    }

    #[test]
    fn grpc_content_types() {
        for ct in ["application/grpc", "application/grpc+proto", "Application/GRPC+json", "application/grpc-web"] {
            assert!(is_grpc(ct.as_bytes()), "{ct}");
        }
        for ct in ["", "application/json", "application/grp", "text/grpc"] {
            assert!(!is_grpc(ct.as_bytes()), "{ct}");
        }
    }

    #[test]
    fn details_are_distinct_envoy_tokens() {
        let all: Vec<&str> = Denial::ALL.iter().map(|d| d.details()).collect();
        for (i, d) in all.iter().enumerate() {
            assert!(d.starts_with("tenant_ratelimit_"));
            assert!(d.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{d}");
            assert!(!all[..i].contains(d), "{d}");
        }
    }

    #[test]
    fn reasons_come_from_the_counters_each_path_bumps() {
        let mut e = Events::default();
        assert_eq!(Denial::local(&e), Denial::OverLimit);
        e.bump(Counter::StoreErrors, 1);
        assert_eq!(Denial::local(&e), Denial::StoreError);
        let mut e = Events::default();
        e.bump(Counter::OverflowDenied, 1);
        assert_eq!(Denial::local(&e), Denial::Overflow);
        let mut e = Events::default();
        e.bump(Counter::ServiceErrors, 1);
        assert_eq!(Denial::global(&e), Denial::GlobalError);
        e.bump(Counter::ServiceOverLimit, 1);
        assert_eq!(Denial::global(&e), Denial::GlobalOverLimit);
    }

    #[test]
    fn pairs_serialize_as_the_abi_reads_them() {
        let bytes = serialize_pairs(&[("ab", "c".to_string()), ("d", String::new())]);
        let mut want = Vec::new();
        for n in [2u32, 2, 1, 1, 0] {
            want.extend_from_slice(&n.to_le_bytes());
        }
        want.extend_from_slice(b"ab\0c\0d\0\0");
        assert_eq!(bytes, want);
        assert_eq!(serialize_pairs(&[]), 0u32.to_le_bytes());
    }
}
