//! Envoy's rate-limit service API (`envoy.service.ratelimit.v3.RateLimitService`), the
//! messages only: the filter sends them with the proxy-wasm gRPC call, so no gRPC stack is
//! compiled into the module. Field numbers follow the published protos
//! (envoy/service/ratelimit/v3/rls.proto, envoy/extensions/common/ratelimit/v3/ratelimit.proto,
//! envoy/config/core/v3/base.proto); the tests check them against the `envoy-types` crate.

pub const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
pub const METHOD: &str = "ShouldRateLimit";

pub const CODE_OK: u64 = 1;
pub const CODE_OVER_LIMIT: u64 = 2;

/// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// Protobuf output: just the three field kinds the request has.
struct Out(Vec<u8>);

impl Out {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn key(&mut self, field: u32, wire: u8) {
        self.varint(u64::from(field) << 3 | u64::from(wire));
    }

    fn bytes(&mut self, field: u32, b: &[u8]) {
        self.key(field, LEN);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }

    /// A nested message written by `write` into its own buffer first (its length goes first).
    fn message(&mut self, field: u32, write: impl FnOnce(&mut Out)) {
        let mut inner = Out(Vec::new());
        write(&mut inner);
        self.bytes(field, &inner.0);
    }
}

/// Protobuf input: the fields of one message, in order, unknown ones included.
struct Fields<'a> {
    rest: &'a [u8],
}

/// One field's value.
enum Value<'a> {
    Int(u64),
    Bytes(&'a [u8]),
}

impl<'a> Fields<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.rest.split_first()?;
            self.rest = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.rest.len() {
            return None;
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Some(head)
    }

    /// The next (field number, value); `Some(Err)`-like garbage ends the walk as `None` from
    /// [`fields`].
    fn next_field(&mut self) -> Option<(u64, Value<'a>)> {
        let key = self.varint()?;
        let value = match (key & 7) as u8 {
            VARINT => Value::Int(self.varint()?),
            FIXED64 => Value::Bytes(self.take(8)?),
            LEN => {
                let n = usize::try_from(self.varint()?).ok()?;
                Value::Bytes(self.take(n)?)
            }
            FIXED32 => Value::Bytes(self.take(4)?),
            _ => return None, // groups (deprecated) and invalid wire types
        };
        Some((key >> 3, value))
    }
}

/// Calls `each` with every field of `msg`; `None` if the bytes are not a valid message.
fn fields<'a>(msg: &'a [u8], mut each: impl FnMut(u64, Value<'a>) -> Option<()>) -> Option<()> {
    let mut f = Fields { rest: msg };
    while !f.rest.is_empty() {
        let (number, value) = f.next_field()?;
        each(number, value)?;
    }
    Some(())
}

fn int(v: &Value) -> Option<u64> {
    match v {
        Value::Int(n) => Some(*n),
        Value::Bytes(_) => None,
    }
}

fn bytes<'a>(v: &Value<'a>) -> Option<&'a [u8]> {
    match v {
        Value::Bytes(b) => Some(b),
        Value::Int(_) => None,
    }
}

/// The descriptor entries of one request, in a fixed order.
pub struct DescriptorInput<'a> {
    pub tenant_key: &'a str,
    pub tenant: &'a str,
    pub method: Option<(&'a str, &'a str)>,
    pub path: Option<(&'a str, &'a str)>,
    pub plan: Option<(&'a str, &'a str)>,
}

/// Encodes a `RateLimitRequest` (domain 1, descriptors 2, hits_addend 3) for one descriptor
/// (entries 1: key 1, value 2).
pub fn encode_request(domain: &str, input: &DescriptorInput<'_>, hits: u32) -> Vec<u8> {
    let mut out = Out(Vec::with_capacity(64 + domain.len() + input.tenant.len()));
    out.bytes(1, domain.as_bytes());
    out.message(2, |d| {
        let entries = [Some((input.tenant_key, input.tenant)), input.method, input.path, input.plan];
        for (key, value) in entries.into_iter().flatten() {
            d.message(1, |e| {
                e.bytes(1, key.as_bytes());
                e.bytes(2, value.as_bytes());
            });
        }
    });
    if hits != 0 {
        out.key(3, VARINT);
        out.varint(u64::from(hits));
    }
    out.0
}

/// What the service said, reduced to what the filter acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub over_limit: bool,
    /// From the first descriptor status, when the service sent one.
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    /// Whole seconds until the service's window resets, rounded up.
    pub reset_seconds: Option<u64>,
    /// A lower bound on the nanoseconds until reset (the longest a grant may live). A
    /// duration in whole seconds is taken as rounded up (envoyproxy/ratelimit sends
    /// `unit - now % unit` in whole seconds), so one second comes off it.
    pub reset_ns: Option<u64>,
    /// Seconds in the limit's unit (`w` of RateLimit-Policy), when the service said.
    pub window_seconds: Option<u64>,
    pub headers: Vec<(String, String)>,
}

/// The first `DescriptorStatus` of an answer: code 1, current_limit 2 (requests_per_unit 1,
/// unit 2), limit_remaining 3, duration_until_reset 4 (seconds 1, nanos 2).
#[derive(Default)]
struct Status {
    limit: Option<(u64, u64)>,
    remaining: u64,
    reset: Option<(u64, u64)>,
}

fn status(msg: &[u8]) -> Option<Status> {
    let mut s = Status::default();
    let pair = |msg: &[u8]| {
        let (mut a, mut b) = (0, 0);
        fields(msg, |n, v| {
            match n {
                1 => a = int(&v)?,
                2 => b = int(&v)?,
                _ => {}
            }
            Some(())
        })
        .map(|()| (a, b))
    };
    fields(msg, |n, v| {
        match n {
            2 => s.limit = Some(pair(bytes(&v)?)?),
            3 => s.remaining = int(&v)?,
            4 => s.reset = Some(pair(bytes(&v)?)?),
            _ => {}
        }
        Some(())
    })?;
    Some(s)
}

/// A `response_headers_to_add` entry (key 1, value 2, raw_value 3), if it is safe to add.
fn header(msg: &[u8]) -> Option<Option<(String, String)>> {
    let (mut key, mut value, mut raw): (&[u8], &[u8], &[u8]) = (b"", b"", b"");
    fields(msg, |n, v| {
        match n {
            1 => key = bytes(&v)?,
            2 => value = bytes(&v)?,
            3 => raw = bytes(&v)?,
            _ => {}
        }
        Some(())
    })?;
    let value = if value.is_empty() { raw } else { value };
    let (Ok(key), Ok(value)) = (std::str::from_utf8(key), std::str::from_utf8(value)) else { return Some(None) };
    // A control character (CR, LF) would let the service inject headers.
    let safe = !key.is_empty() && !key.bytes().chain(value.bytes()).any(|b| b.is_ascii_control());
    Some(safe.then(|| (key.to_ascii_lowercase(), value.to_string())))
}

/// Decodes a `RateLimitResponse` (overall_code 1, statuses 2, response_headers_to_add 3);
/// `None` if it is not one, or its code is neither OK nor OVER_LIMIT (UNKNOWN is a service
/// error, handled by `failure_mode`).
pub fn decode_response(bytes: &[u8]) -> Option<Answer> {
    let (mut code, mut first, mut headers) = (0, None, Vec::new());
    fields(bytes, |n, v| {
        match n {
            1 => code = int(&v)?,
            2 if first.is_none() => first = Some(status(self::bytes(&v)?)?),
            3 => headers.extend(header(self::bytes(&v)?)?),
            _ => {}
        }
        Some(())
    })?;
    let over_limit = match code {
        CODE_OK => false,
        CODE_OVER_LIMIT => true,
        _ => return None,
    };
    // int64 seconds and int32 nanos arrive as two's complement varints: negative ones are
    // huge here and refused by the conversions below.
    let duration = first
        .as_ref()
        .and_then(|s| s.reset)
        .and_then(|(secs, nanos)| (i64::try_from(secs).is_ok() && nanos < 1_000_000_000).then_some((secs, nanos)));
    let reset = duration.map(|(secs, nanos)| secs.saturating_mul(1_000_000_000).saturating_add(nanos));
    let reset_floor = duration.map(|(secs, nanos)| match nanos {
        0 => secs.saturating_sub(1).saturating_mul(1_000_000_000),
        _ => secs.saturating_mul(1_000_000_000).saturating_add(nanos),
    });
    let limit = first.as_ref().and_then(|s| s.limit);
    Some(Answer {
        over_limit,
        limit: limit.map(|(per_unit, _)| per_unit & u64::from(u32::MAX)),
        window_seconds: limit.and_then(|(_, unit)| unit_seconds(unit)),
        remaining: first.as_ref().map(|s| s.remaining & u64::from(u32::MAX)),
        reset_seconds: reset.map(|ns| ns.div_ceil(1_000_000_000)),
        reset_ns: reset_floor,
        headers,
    })
}

/// Seconds of `RateLimit.Unit` (SECOND=1, MINUTE=2, HOUR=3, DAY=4, MONTH=5, YEAR=6, WEEK=7).
fn unit_seconds(unit: u64) -> Option<u64> {
    match unit {
        1 => Some(1),
        2 => Some(60),
        3 => Some(3600),
        4 => Some(86_400),
        5 => Some(30 * 86_400),
        6 => Some(365 * 86_400),
        7 => Some(7 * 86_400),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::ratelimit::v3 as published;
    use prost::Message;

    fn input() -> DescriptorInput<'static> {
        DescriptorInput {
            tenant_key: "tenant",
            tenant: "acme",
            method: Some(("method", "GET")),
            path: None,
            plan: None,
        }
    }

    #[test]
    fn request_decodes_as_the_published_message() {
        let bytes = encode_request("tenants", &input(), 7);
        let r = published::RateLimitRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(r.domain, "tenants");
        assert_eq!(r.hits_addend, 7);
        let entries = &r.descriptors[0].entries;
        assert_eq!((entries[0].key.as_str(), entries[0].value.as_str()), ("tenant", "acme"));
        assert_eq!((entries[1].key.as_str(), entries[1].value.as_str()), ("method", "GET"));
        assert_eq!(entries.len(), 2);
    }

    #[test]
    fn published_response_decodes() {
        use envoy_types::pb::envoy::config::core::v3::HeaderValue as PubHeader;
        use envoy_types::pb::google::protobuf::Duration as PubDuration;
        let response = published::RateLimitResponse {
            overall_code: published::rate_limit_response::Code::OverLimit as i32,
            statuses: vec![published::rate_limit_response::DescriptorStatus {
                code: published::rate_limit_response::Code::OverLimit as i32,
                current_limit: Some(published::rate_limit_response::RateLimit {
                    requests_per_unit: 20,
                    unit: 2,
                    ..Default::default()
                }),
                limit_remaining: 0,
                duration_until_reset: Some(PubDuration { seconds: 41, nanos: 500_000_000 }),
                ..Default::default()
            }],
            response_headers_to_add: vec![PubHeader {
                key: "X-Quota".into(),
                value: "gold".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let a = decode_response(&response.encode_to_vec()).unwrap();
        assert!(a.over_limit);
        assert_eq!(a.limit, Some(20));
        assert_eq!(a.remaining, Some(0));
        assert_eq!(a.reset_seconds, Some(42));
        assert_eq!(a.reset_ns, Some(41_500_000_000));
        // Whole seconds are taken as rounded up (envoyproxy/ratelimit): a grant may live at
        // most one second less, and none at all on a 1 s answer.
        let whole = |seconds| {
            let mut r = response.clone();
            r.statuses[0].duration_until_reset = Some(PubDuration { seconds, nanos: 0 });
            decode_response(&r.encode_to_vec()).unwrap()
        };
        assert_eq!((whole(42).reset_ns, whole(42).reset_seconds), (Some(41_000_000_000), Some(42)));
        assert_eq!(whole(1).reset_ns, Some(0));
        assert_eq!(a.window_seconds, Some(60));
        assert_eq!(a.headers, vec![("x-quota".to_string(), "gold".to_string())]);
        let ok = published::RateLimitResponse { overall_code: 1, ..Default::default() };
        let a = decode_response(&ok.encode_to_vec()).unwrap();
        assert!(!a.over_limit);
        assert_eq!(a.remaining, None);
    }

    #[test]
    fn garbage_and_unknown_codes_are_errors() {
        assert_eq!(decode_response(&[0xff, 0xff, 0xff]), None);
        let unknown = published::RateLimitResponse { overall_code: 0, ..Default::default() };
        assert_eq!(decode_response(&unknown.encode_to_vec()), None);
    }

    #[test]
    fn header_injection_is_dropped() {
        use envoy_types::pb::envoy::config::core::v3::HeaderValue as PubHeader;
        let h = |key: &str, value: &str| PubHeader { key: key.into(), value: value.into(), ..Default::default() };
        let r = published::RateLimitResponse {
            overall_code: 1,
            response_headers_to_add: vec![h("x-a", "ok"), h("x-b", "bad\r\nx-evil: 1"), h("", "v")],
            ..Default::default()
        };
        let a = decode_response(&r.encode_to_vec()).unwrap();
        assert_eq!(a.headers, vec![("x-a".to_string(), "ok".to_string())]);
    }

    #[test]
    fn raw_value_unknown_fields_and_negative_durations() {
        use envoy_types::pb::envoy::config::core::v3::HeaderValue as PubHeader;
        use envoy_types::pb::google::protobuf::Duration as PubDuration;
        let r = published::RateLimitResponse {
            overall_code: 2,
            statuses: vec![published::rate_limit_response::DescriptorStatus {
                duration_until_reset: Some(PubDuration { seconds: -5, nanos: 0 }),
                limit_remaining: 3,
                ..Default::default()
            }],
            response_headers_to_add: vec![PubHeader {
                key: "x-raw".into(),
                raw_value: b"v".to_vec(),
                ..Default::default()
            }],
            raw_body: b"ignored".to_vec(),
            ..Default::default()
        };
        let a = decode_response(&r.encode_to_vec()).unwrap();
        assert!(a.over_limit);
        assert_eq!((a.remaining, a.reset_ns, a.reset_seconds), (Some(3), None, None));
        assert_eq!(a.headers, vec![("x-raw".to_string(), "v".to_string())]);
        // Truncated anywhere: not an answer.
        let bytes = r.encode_to_vec();
        for cut in 1..bytes.len() {
            let _ = decode_response(&bytes[..cut]); // never panics
        }
        assert_eq!(decode_response(&bytes[..bytes.len() - 1]), None);
    }

    #[test]
    fn request_without_hits_and_with_every_entry() {
        let input = DescriptorInput {
            tenant_key: "t",
            tenant: "a",
            method: Some(("m", "GET")),
            path: Some(("p", "/x")),
            plan: Some(("plan", "pro")),
        };
        let r = published::RateLimitRequest::decode(encode_request("d", &input, 0).as_slice()).unwrap();
        assert_eq!(r.hits_addend, 0);
        let pairs: Vec<_> = r.descriptors[0].entries.iter().map(|e| (e.key.as_str(), e.value.as_str())).collect();
        assert_eq!(pairs, [("t", "a"), ("m", "GET"), ("p", "/x"), ("plan", "pro")]);
    }
}
