//! Pure decision core: which bucket each descriptor of a request debits, and the answer
//! from the script's outcomes. No I/O.
//!
//! A descriptor's `tenant` entry (key `tenant_key`) picks the tenant's bucket; with a `rule`
//! entry (key `rule_key`) naming a rule that has its own limit, the (tenant, rule) bucket; a
//! `plan` entry (key `plan_key`) the plan whose limit an unlisted tenant gets.
//! Other entries (e.g. the filter's method/path) are ignored. An invalid tenant value
//! (empty, over 128 bytes, spaces or control characters) counts as the domain's
//! `tenant.default`, as in the filter, so no value can escape the limiter; a descriptor with
//! no tenant entry, or an unknown rule, is `unmatched` (config).

use crate::settings::{Settings, Unmatched};
use crate::units::{units_to_seconds_ceil, BucketLimit, UNITS_PER_US};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{Code, DescriptorStatus, RateLimit};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use tenant_ratelimit::store::hash128;
use tenant_ratelimit::tenant::is_valid_tenant_id;

/// Keys start with this (one namespace in a shared Redis).
pub const KEY_PREFIX: &str = "trl:";

/// One bucket to debit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Debit {
    /// `trl:{<hash of domain, tenant>}` or `...:r:<rule>`. The hash tag keeps a tenant's
    /// buckets in one Redis Cluster slot, so a request's descriptors for one tenant are
    /// decided by one script.
    pub key: String,
    /// The hash tag (the slot group).
    pub tag: String,
    pub limit: BucketLimit,
    pub cost: u64,
}

/// Why a descriptor met no limit and was answered `OK` (`unmatched: "ok"`); counted per
/// reason (`trl_service_unmatched_total{reason}`), so a typo in a domain or a rule name shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    UnknownDomain = 0,
    NoTenant = 1,
    UnknownRule = 2,
}

impl Miss {
    pub const ALL: [Miss; 3] = [Miss::UnknownDomain, Miss::NoTenant, Miss::UnknownRule];

    pub fn label(self) -> &'static str {
        match self {
            Miss::UnknownDomain => "unknown_domain",
            Miss::NoTenant => "no_tenant",
            Miss::UnknownRule => "unknown_rule",
        }
    }
}

/// What a request needs: debits (one per matched descriptor, in order) and which
/// descriptor maps to which debit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub debits: Vec<Debit>,
    /// Per descriptor: `Some(index in debits)` or `None` (unmatched, answered OK).
    pub slots: Vec<Option<usize>>,
    /// Descriptors answered OK without a limit, per `Miss` reason.
    pub misses: [u64; 3],
}

impl Plan {
    fn missed(&mut self, why: Miss, n: u64) {
        if let Some(c) = self.misses.get_mut(why as usize) {
            *c += n;
        }
    }
}

/// A request the config says to refuse with an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub String);

/// The script's result for one debit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Result1 {
    pub allowed: bool,
    pub remaining: u64,
    /// U until the bucket is full again.
    pub reset: u64,
    /// U until the cost fits; `None`: never (cost above capacity).
    pub retry: Option<u64>,
}

fn tag_of(domain: &str, bucket: Option<&str>) -> String {
    // `None` is the shared bucket of unlisted tenants; the NUL byte keeps it apart from any
    // tenant id (ids are visible ASCII).
    let h = hash128(&[domain.as_bytes(), bucket.map_or(&b"\0shared"[..], str::as_bytes)]);
    format!("{h:032x}")
}

pub fn plan(settings: &Settings, req: &RateLimitRequest) -> Result<Plan, Refusal> {
    let refuse_or_ok = |why: String, n: usize| match settings.unmatched {
        Unmatched::Error => Err(Refusal(why)),
        Unmatched::Ok => {
            let mut plan = Plan { debits: Vec::new(), slots: vec![None; n], misses: [0; 3] };
            plan.missed(Miss::UnknownDomain, n as u64);
            Ok(plan)
        }
    };
    if req.descriptors.is_empty() {
        return Err(Refusal("the request has no descriptors".into()));
    }
    if req.descriptors.len() > settings.max_descriptors {
        return Err(Refusal(format!(
            "{} descriptors; at most {} per request (max_descriptors)",
            req.descriptors.len(),
            settings.max_descriptors
        )));
    }
    let Some(domain) = settings.domains.get(&req.domain) else {
        let shown: String = req.domain.chars().take(64).collect();
        return refuse_or_ok(format!("unknown domain \"{shown}\""), req.descriptors.len());
    };
    // Envoy: hits_addend 0 means 1.
    let request_hits = u64::from(req.hits_addend.max(1));
    let mut plan = Plan { debits: Vec::new(), slots: Vec::with_capacity(req.descriptors.len()), misses: [0; 3] };
    for (i, d) in req.descriptors.iter().enumerate() {
        if d.is_negative_hits {
            return Err(Refusal(format!("descriptor {i}: negative hits (refills) are not accepted")));
        }
        let cost = d.hits_addend.as_ref().map_or(request_hits, |h| h.value);
        let (mut tenant, mut rule, mut plan_name) = (None, None, None);
        for e in &d.entries {
            if tenant.is_none() && e.key == settings.tenant_key {
                tenant = Some(e.value.as_str());
            } else if rule.is_none() && e.key == settings.rule_key {
                rule = Some(e.value.as_str());
            } else if plan_name.is_none() && e.key == settings.plan_key {
                plan_name = Some(e.value.as_str());
            }
        }
        let Some(tenant) = tenant else {
            match settings.unmatched {
                Unmatched::Error => {
                    return Err(Refusal(format!("descriptor {i} has no \"{}\" entry", settings.tenant_key)))
                }
                Unmatched::Ok => {
                    plan.slots.push(None);
                    plan.missed(Miss::NoTenant, 1);
                    continue;
                }
            }
        };
        let tenant = if is_valid_tenant_id(tenant.as_bytes()) { tenant } else { domain.config.default_tenant.as_str() };
        let (bucket, tenant_limit) = domain.tenant(tenant, plan_name);
        let tag = tag_of(&req.domain, bucket.as_deref());
        let (key, limit) = match rule {
            None => (format!("{KEY_PREFIX}{{{tag}}}"), tenant_limit),
            Some(r) => match domain.rule(r) {
                Some(limit) if bucket.is_some() => (format!("{KEY_PREFIX}{{{tag}}}:r:{r}"), limit),
                // An unlisted tenant under `unknown_tenants: shared` shares the top-level
                // bucket but has its own bucket per rule, as in the filter (policy.rs). The
                // key keeps the shared bucket's hash tag, so the request is still one script
                // call on a Redis Cluster (that slot serves every unlisted tenant anyway).
                Some(limit) => (format!("{KEY_PREFIX}{{{tag}}}:t:{}:r:{r}", tag_of(&req.domain, Some(tenant))), limit),
                None => match settings.unmatched {
                    Unmatched::Error => {
                        let shown: String = r.chars().take(64).collect();
                        return Err(Refusal(format!("descriptor {i}: no rule named \"{shown}\" with its own limit")));
                    }
                    Unmatched::Ok => {
                        plan.slots.push(None);
                        plan.missed(Miss::UnknownRule, 1);
                        continue;
                    }
                },
            },
        };
        plan.slots.push(Some(plan.debits.len()));
        plan.debits.push(Debit { key, tag, limit, cost });
    }
    Ok(plan)
}

/// The smallest RLS unit at least as long as the bucket's refill time: `current_limit` says
/// "capacity per unit", the burst a client may spend at once (a token bucket has no window;
/// the headers are a hint, the decision is the bucket's).
fn unit_for(limit: &BucketLimit) -> Unit {
    let secs = units_to_seconds_ceil(limit.tau());
    match secs {
        0..=1 => Unit::Second,
        2..=60 => Unit::Minute,
        61..=3600 => Unit::Hour,
        3601..=86_400 => Unit::Day,
        86_401..=604_800 => Unit::Week,
        604_801..=2_678_400 => Unit::Month,
        _ => Unit::Year,
    }
}

fn duration(u: u64) -> PbDuration {
    let us = u.div_ceil(UNITS_PER_US);
    PbDuration { seconds: (us / 1_000_000) as i64, nanos: ((us % 1_000_000) * 1000) as i32 }
}

/// The answer, from one result per debit (same order as `plan.debits`).
pub fn answer(plan: &Plan, results: &[Result1]) -> RateLimitResponse {
    let mut over = false;
    let statuses = plan
        .slots
        .iter()
        .map(|slot| {
            let Some((debit, r)) = slot.and_then(|i| Some((plan.debits.get(i)?, results.get(i)?))) else {
                return DescriptorStatus { code: Code::Ok as i32, ..Default::default() };
            };
            over |= !r.allowed;
            // When over the limit, the reset is when this request's cost would fit (what a
            // client should wait: the filter's retry-after); when admitted, when the bucket
            // is full again (a lease's lifetime).
            let reset = if r.allowed { r.reset } else { r.retry.unwrap_or(debit.limit.tau()) };
            DescriptorStatus {
                code: if r.allowed { Code::Ok } else { Code::OverLimit } as i32,
                current_limit: Some(RateLimit {
                    requests_per_unit: u32::try_from(debit.limit.capacity).unwrap_or(u32::MAX),
                    unit: unit_for(&debit.limit) as i32,
                    ..Default::default()
                }),
                limit_remaining: u32::try_from(r.remaining).unwrap_or(u32::MAX),
                duration_until_reset: Some(duration(reset)),
                ..Default::default()
            }
        })
        .collect();
    RateLimitResponse {
        overall_code: if over { Code::OverLimit } else { Code::Ok } as i32,
        statuses,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
    use envoy_types::pb::google::protobuf::UInt64Value;

    fn settings(extra: &str) -> Settings {
        Settings::from_json_bytes(
            format!(
                r#"{{"domains": {{"d": {{"capacity": 3, "refill_rate": 1, "tenant": {{"default": "anon"}},
                   "tenants": {{"big": {{"capacity": 100}}}},
                   "rules": [{{"name": "up", "capacity": 2, "refill_rate": 1}}, {{"path_prefix": "/x"}}]}}}}{extra}}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    fn desc(entries: &[(&str, &str)]) -> RateLimitDescriptor {
        RateLimitDescriptor {
            entries: entries.iter().map(|(k, v)| Entry { key: k.to_string(), value: v.to_string() }).collect(),
            ..Default::default()
        }
    }

    fn req(domain: &str, descriptors: Vec<RateLimitDescriptor>, hits: u32) -> RateLimitRequest {
        RateLimitRequest { domain: domain.into(), descriptors, hits_addend: hits }
    }

    #[test]
    fn tenant_and_rule_buckets_share_a_slot_tag() {
        let s = settings("");
        let p = plan(
            &s,
            &req(
                "d",
                vec![desc(&[("tenant", "big"), ("method", "GET")]), desc(&[("tenant", "big"), ("rule", "up")])],
                0,
            ),
        )
        .unwrap();
        assert_eq!(p.debits.len(), 2);
        assert_eq!(p.debits[0].limit.capacity, 100);
        assert_eq!(p.debits[1].limit.capacity, 2);
        assert_eq!(p.debits[0].tag, p.debits[1].tag);
        assert_eq!(p.debits[1].key, format!("{}:r:up", p.debits[0].key));
        assert!(p.debits[0].key.starts_with("trl:{") && p.debits[0].key.ends_with('}'));
        assert_eq!(p.debits[0].cost, 1);
        assert_eq!(p.slots, vec![Some(0), Some(1)]);
    }

    #[test]
    fn hits_addend_is_the_cost() {
        let s = settings("");
        let mut d = desc(&[("tenant", "a")]);
        assert_eq!(plan(&s, &req("d", vec![d.clone()], 7)).unwrap().debits[0].cost, 7);
        d.hits_addend = Some(UInt64Value { value: 5 });
        assert_eq!(plan(&s, &req("d", vec![d], 7)).unwrap().debits[0].cost, 5);
    }

    #[test]
    fn invalid_tenant_values_fall_back_to_the_default_tenant() {
        let s = settings("");
        let anon = plan(&s, &req("d", vec![desc(&[("tenant", "anon")])], 1)).unwrap();
        for bad in ["", "has space", &"x".repeat(65_536), "ctl\u{7}"] {
            let p = plan(&s, &req("d", vec![desc(&[("tenant", bad)])], 1)).unwrap();
            assert_eq!(p.debits[0].key, anon.debits[0].key);
            assert!(p.debits[0].key.len() < 64);
        }
    }

    #[test]
    fn unmatched_follows_the_config() {
        let ok = settings("");
        let hostile = (0..1000).map(|i| (format!("k{i}"), "v".repeat(64))).collect::<Vec<_>>();
        let entries: Vec<(&str, &str)> = hostile.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let p = plan(&ok, &req("d", vec![desc(&entries)], 1)).unwrap();
        assert_eq!((p.debits.len(), p.slots.clone(), p.misses), (0, vec![None], [0, 1, 0]));
        let p = plan(&ok, &req("nope", vec![desc(&[("tenant", "a")]), desc(&[("tenant", "b")])], 1)).unwrap();
        assert_eq!((p.slots, p.misses), (vec![None, None], [2, 0, 0]));
        let p =
            plan(&ok, &req("d", vec![desc(&[("tenant", "a"), ("rule", "zz")]), desc(&[("tenant", "a")])], 1)).unwrap();
        assert_eq!((p.slots, p.misses), (vec![None, Some(0)], [0, 0, 1]));
        let strict = settings(r#", "unmatched": "error""#);
        assert!(plan(&strict, &req("nope", vec![desc(&[("tenant", "a")])], 1)).is_err());
        assert!(plan(&strict, &req("d", vec![desc(&[("k", "a")])], 1)).is_err());
        assert!(plan(&strict, &req("d", vec![desc(&[("tenant", "a"), ("rule", "zz")])], 1)).is_err());
        // Bounded work whatever the config: too many descriptors, none at all.
        assert!(plan(&ok, &req("d", vec![desc(&[("tenant", "a")]); 65], 1)).is_err());
        assert!(plan(&ok, &req("d", vec![], 1)).is_err());
    }

    #[test]
    fn shared_unlisted_tenants_keep_their_own_rule_buckets() {
        // As in the filter: under `unknown_tenants: shared` every unlisted tenant debits one
        // top-level bucket, but each has its own bucket per rule; listed tenants their own.
        let s = Settings::from_json_bytes(
            br#"{"domains": {"d": {"capacity": 3, "refill_rate": 1, "unknown_tenants": "shared",
                 "tenants": {"big": {"capacity": 100}},
                 "rules": [{"name": "up", "path_prefix": "/up", "capacity": 2, "refill_rate": 1}]}}}"#,
        )
        .unwrap();
        let both = |t: &str| {
            let p =
                plan(&s, &req("d", vec![desc(&[("tenant", t)]), desc(&[("tenant", t), ("rule", "up")])], 1)).unwrap();
            (p.debits[0].clone(), p.debits[1].clone())
        };
        let (a, a_up) = both("a");
        let (b, b_up) = both("b");
        assert_eq!(a.key, b.key);
        assert_ne!(a_up.key, b_up.key);
        assert_eq!(a_up.limit.capacity, 2);
        // One slot for the request: the shared bucket's tag.
        assert_eq!((a_up.tag.as_str(), b_up.tag.as_str()), (a.tag.as_str(), a.tag.as_str()));
        assert!(a_up.key.starts_with(&format!("trl:{{{}}}:t:", a.tag)) && a_up.key.ends_with(":r:up"));
        let (big, big_up) = both("big");
        assert_ne!(big.key, a.key);
        assert_eq!(big_up.key, format!("{}:r:up", big.key));
        // Under `separate` nothing changes: a tenant's rule bucket sits next to its own.
        let (x, x_up) = {
            let s = settings("");
            let p = plan(&s, &req("d", vec![desc(&[("tenant", "x")]), desc(&[("tenant", "x"), ("rule", "up")])], 1))
                .unwrap();
            (p.debits[0].clone(), p.debits[1].clone())
        };
        assert_eq!(x_up.key, format!("{}:r:up", x.key));
    }

    #[test]
    fn answers_carry_limits_and_resets() {
        let s = settings("");
        let p = plan(&s, &req("d", vec![desc(&[("tenant", "a")]), desc(&[("x", "y")])], 1)).unwrap();
        let sec = UNITS_PER_US * 1_000_000;
        let a = answer(&p, &[Result1 { allowed: true, remaining: 2, reset: sec, retry: Some(0) }]);
        assert_eq!(a.overall_code, Code::Ok as i32);
        assert_eq!(a.statuses[0].limit_remaining, 2);
        assert_eq!(a.statuses[0].current_limit.as_ref().unwrap().requests_per_unit, 3);
        assert_eq!(a.statuses[0].current_limit.as_ref().unwrap().unit, Unit::Minute as i32);
        assert_eq!(a.statuses[0].duration_until_reset, Some(PbDuration { seconds: 1, nanos: 0 }));
        assert_eq!(a.statuses[1], DescriptorStatus { code: Code::Ok as i32, ..Default::default() });
        let a = answer(&p, &[Result1 { allowed: false, remaining: 0, reset: 3 * sec, retry: Some(sec / 2) }]);
        assert_eq!(a.overall_code, Code::OverLimit as i32);
        assert_eq!(a.statuses[0].duration_until_reset, Some(PbDuration { seconds: 0, nanos: 500_000_000 }));
    }
}
