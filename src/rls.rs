//! Envoy's rate-limit service API (`envoy.service.ratelimit.v3.RateLimitService`), the
//! messages only: the filter sends them with the proxy-wasm gRPC call, so no gRPC stack is
//! compiled into the module. Field numbers follow the published protos
//! (envoy/service/ratelimit/v3/rls.proto, envoy/extensions/common/ratelimit/v3/ratelimit.proto,
//! envoy/config/core/v3/base.proto); the tests check them against the `envoy-types` crate.

use prost::Message;

pub const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
pub const METHOD: &str = "ShouldRateLimit";

#[derive(Clone, PartialEq, Message)]
pub struct RateLimitRequest {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(message, repeated, tag = "2")]
    pub descriptors: Vec<RateLimitDescriptor>,
    #[prost(uint32, tag = "3")]
    pub hits_addend: u32,
}

#[derive(Clone, PartialEq, Message)]
pub struct RateLimitDescriptor {
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<Entry>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Entry {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

pub const CODE_OK: i32 = 1;
pub const CODE_OVER_LIMIT: i32 = 2;

#[derive(Clone, PartialEq, Message)]
pub struct RateLimitResponse {
    #[prost(int32, tag = "1")]
    pub overall_code: i32,
    #[prost(message, repeated, tag = "2")]
    pub statuses: Vec<DescriptorStatus>,
    #[prost(message, repeated, tag = "3")]
    pub response_headers_to_add: Vec<HeaderValue>,
}

#[derive(Clone, PartialEq, Message)]
pub struct DescriptorStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(message, optional, tag = "2")]
    pub current_limit: Option<CurrentLimit>,
    #[prost(uint32, tag = "3")]
    pub limit_remaining: u32,
    #[prost(message, optional, tag = "4")]
    pub duration_until_reset: Option<Duration>,
}

#[derive(Clone, PartialEq, Message)]
pub struct CurrentLimit {
    #[prost(uint32, tag = "1")]
    pub requests_per_unit: u32,
    #[prost(int32, tag = "2")]
    pub unit: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct Duration {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct HeaderValue {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
    #[prost(bytes = "vec", tag = "3")]
    pub raw_value: Vec<u8>,
}

/// The descriptor entries of one request, in a fixed order.
pub struct DescriptorInput<'a> {
    pub tenant_key: &'a str,
    pub tenant: &'a str,
    pub method: Option<(&'a str, &'a str)>,
    pub path: Option<(&'a str, &'a str)>,
}

/// Encodes a `RateLimitRequest` for one descriptor.
pub fn encode_request(domain: &str, input: &DescriptorInput<'_>, hits: u32) -> Vec<u8> {
    let mut entries = vec![Entry { key: input.tenant_key.into(), value: input.tenant.into() }];
    for (key, value) in [input.method, input.path].into_iter().flatten() {
        entries.push(Entry { key: key.into(), value: value.into() });
    }
    RateLimitRequest { domain: domain.into(), descriptors: vec![RateLimitDescriptor { entries }], hits_addend: hits }
        .encode_to_vec()
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

/// Decodes a `RateLimitResponse`; `None` if it is not one, or its code is neither OK nor
/// OVER_LIMIT (UNKNOWN is a service error, handled by `failure_mode`).
pub fn decode_response(bytes: &[u8]) -> Option<Answer> {
    let r = RateLimitResponse::decode(bytes).ok()?;
    let over_limit = match r.overall_code {
        CODE_OK => false,
        CODE_OVER_LIMIT => true,
        _ => return None,
    };
    let status = r.statuses.first();
    let duration = status
        .and_then(|s| s.duration_until_reset.as_ref())
        .and_then(|d| Some((u64::try_from(d.seconds).ok()?, u64::try_from(d.nanos).ok()?)));
    let reset = duration.map(|(secs, nanos)| secs.saturating_mul(1_000_000_000).saturating_add(nanos));
    let reset_floor = duration.map(|(secs, nanos)| match nanos {
        0 => secs.saturating_sub(1).saturating_mul(1_000_000_000),
        _ => secs.saturating_mul(1_000_000_000).saturating_add(nanos),
    });
    let headers = r
        .response_headers_to_add
        .into_iter()
        .filter_map(|h| {
            let value = if h.value.is_empty() { String::from_utf8(h.raw_value).ok()? } else { h.value };
            let safe = |s: &str| !s.is_empty() && !s.bytes().any(|b| b.is_ascii_control());
            (safe(&h.key) && !value.bytes().any(|b| b.is_ascii_control())).then(|| (h.key.to_ascii_lowercase(), value))
        })
        .collect();
    Some(Answer {
        over_limit,
        limit: status.and_then(|s| s.current_limit.as_ref()).map(|l| u64::from(l.requests_per_unit)),
        window_seconds: status.and_then(|s| s.current_limit.as_ref()).and_then(|l| unit_seconds(l.unit)),
        remaining: status.map(|s| u64::from(s.limit_remaining)),
        reset_seconds: reset.map(|ns| ns.div_ceil(1_000_000_000)),
        reset_ns: reset_floor,
        headers,
    })
}

/// Seconds of `RateLimit.Unit` (SECOND=1, MINUTE=2, HOUR=3, DAY=4, MONTH=5, YEAR=6, WEEK=7).
fn unit_seconds(unit: i32) -> Option<u64> {
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

    fn input() -> DescriptorInput<'static> {
        DescriptorInput { tenant_key: "tenant", tenant: "acme", method: Some(("method", "GET")), path: None }
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
        let r = RateLimitResponse {
            overall_code: CODE_OK,
            statuses: vec![],
            response_headers_to_add: vec![
                HeaderValue { key: "x-a".into(), value: "ok".into(), raw_value: vec![] },
                HeaderValue { key: "x-b".into(), value: "bad\r\nx-evil: 1".into(), raw_value: vec![] },
                HeaderValue { key: "".into(), value: "v".into(), raw_value: vec![] },
            ],
        };
        let a = decode_response(&r.encode_to_vec()).unwrap();
        assert_eq!(a.headers, vec![("x-a".to_string(), "ok".to_string())]);
    }
}
