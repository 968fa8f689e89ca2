//! Pure decision core: which bucket each descriptor of a request debits, and the answer
//! from the script's outcomes. No I/O.
//!
//! A descriptor's `tenant` entry (key `tenant_key`) picks the tenant's bucket; with a `rule`
//! entry (key `rule_key`) naming a rule that has its own limit, the (tenant, rule) bucket; a
//! `plan` entry (key `plan_key`) the plan whose limits an unlisted tenant gets. A bucket is
//! one Redis key per limit of its policy (`limit_key`), all in one hash slot, so one script
//! call decides every limit of every descriptor of a tenant together.
//! Other entries (e.g. the filter's method/path) are ignored. An invalid tenant value
//! (empty, over 128 bytes, spaces or control characters) counts as the domain's
//! `tenant.default`, as in the filter, so no value can escape the limiter; a descriptor with
//! no tenant entry, or an unknown rule, is `unmatched` (config).

use crate::settings::{NamedLimit, Settings, Unmatched};
use crate::units::{units_to_seconds_ceil, BucketLimit, UNITS_PER_US};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{Code, DescriptorStatus, RateLimit};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use std::ops::Range;
use tenant_ratelimit::store::hash128;
use tenant_ratelimit::tenant::is_valid_tenant_id;

/// Keys start with this (one namespace in a shared Redis).
pub const KEY_PREFIX: &str = "trl:";

/// One limit of a bucket to debit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Debit {
    /// `trl:{<hash of domain, tenant>}` or `...:r:<rule>`, with `:l:<limit name>` when the
    /// policy has several limits (`limit_key`). The hash tag keeps a tenant's buckets, and all
    /// their limits, in one Redis Cluster slot, so a request's descriptors for one tenant are
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

/// What a request needs: debits (one per limit of each matched descriptor's policy, in
/// order) and which descriptor maps to which debits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub debits: Vec<Debit>,
    /// Per descriptor: `Some(its range in debits)`, one debit per limit, or `None`
    /// (unmatched, answered OK).
    pub slots: Vec<Option<Range<usize>>>,
    /// Descriptors answered OK without a limit, per `Miss` reason.
    pub misses: [u64; 3],
}

impl Plan {
    fn missed(&mut self, why: Miss, n: u64) {
        if let Some(c) = self.misses.get_mut(why as usize) {
            *c += n;
        }
    }

    /// Decided descriptors (`trl_service_decisions_total`): (admitted, over the limit); a
    /// descriptor is over when any of its limits denied.
    pub fn decided(&self, results: &[Result1]) -> (u64, u64) {
        let (mut ok, mut over) = (0, 0);
        for range in self.slots.iter().flatten() {
            match results.get(range.clone()) {
                Some(rs) if rs.iter().all(|r| r.allowed) => ok += 1,
                _ => over += 1,
            }
        }
        (ok, over)
    }

    /// Tokens requested by the decided descriptors (`trl_service_hits_total`): each
    /// descriptor's cost once, however many limits it debits.
    pub fn hits(&self) -> u64 {
        self.slots
            .iter()
            .flatten()
            .filter_map(|range| self.debits.get(range.start))
            .fold(0u64, |sum, d| sum.saturating_add(d.cost))
    }
}

/// The Redis key of one limit of a bucket whose key is `bucket`: a one-limit policy's only
/// limit is the bucket key itself (the key every earlier build used: no migration); with
/// several, `<bucket>:l:<limit name>` (limit names are letters, digits, `-`, `_`). The suffix
/// comes after the hash tag, so every limit stays in the bucket's slot.
pub fn limit_key(bucket: &str, limits: &[NamedLimit], limit: &NamedLimit) -> String {
    if limits.len() == 1 {
        bucket.to_string()
    } else {
        format!("{bucket}:l:{}", limit.name)
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
        let (bucket, tenant_limits) = domain.tenant(tenant, plan_name);
        let tag = tag_of(&req.domain, bucket.as_deref());
        let (key, limits) = match rule {
            None => (format!("{KEY_PREFIX}{{{tag}}}"), tenant_limits),
            Some(r) => match domain.rule(r) {
                Some(limits) if bucket.is_some() => (format!("{KEY_PREFIX}{{{tag}}}:r:{r}"), limits),
                // An unlisted tenant under `unknown_tenants: shared` shares the top-level
                // bucket but has its own bucket per rule, as in the filter (policy.rs). The
                // key keeps the shared bucket's hash tag, so the request is still one script
                // call on a Redis Cluster (that slot serves every unlisted tenant anyway).
                Some(limits) => {
                    (format!("{KEY_PREFIX}{{{tag}}}:t:{}:r:{r}", tag_of(&req.domain, Some(tenant))), limits)
                }
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
        let start = plan.debits.len();
        for l in limits {
            plan.debits.push(Debit { key: limit_key(&key, limits, l), tag: tag.clone(), limit: l.limit, cost });
        }
        plan.slots.push(Some(start..plan.debits.len()));
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

/// Which of a descriptor's limits its status reports, from one result per limit. The same
/// rule as the filter's headers (src/response.rs):
/// - denied: among the limits that denied, the longest wait until this cost fits (what a
///   client must wait before every limit can admit it: the filter's `retry-after`); a cost
///   above a limit's capacity never fits and counts as the longest; then the first listed.
/// - admitted: the limit closest to denying (`Quota::tightest`): the fewest whole tokens
///   left; on a tie the one that takes longer to give tokens back (the filter compares the
///   next token; a status carries only the time until full, so that is compared here); then
///   the first listed.
fn reported<'a>(debits: &'a [Debit], results: &'a [Result1]) -> Option<(&'a Debit, &'a Result1)> {
    let mut best: Option<(&Debit, &Result1)> = None;
    if results.iter().any(|r| !r.allowed) {
        let wait = |r: &Result1| r.retry.unwrap_or(u64::MAX);
        for (d, r) in debits.iter().zip(results).filter(|(_, r)| !r.allowed) {
            best = match best {
                Some((_, b)) if wait(b) >= wait(r) => best,
                _ => Some((d, r)),
            };
        }
    } else {
        for (d, r) in debits.iter().zip(results) {
            best = match best {
                Some((_, b)) if b.remaining < r.remaining || (b.remaining == r.remaining && b.reset >= r.reset) => best,
                _ => Some((d, r)),
            };
        }
    }
    best
}

/// The answer, from one result per debit (same order as `plan.debits`): a descriptor is
/// `OVER_LIMIT` when any of its limits denied; its status is the limit `reported` picks.
pub fn answer(plan: &Plan, results: &[Result1]) -> RateLimitResponse {
    let mut over = false;
    let statuses = plan
        .slots
        .iter()
        .map(|slot| {
            let picked =
                slot.as_ref().and_then(|range| reported(plan.debits.get(range.clone())?, results.get(range.clone())?));
            let Some((debit, r)) = picked else {
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
        assert_eq!(p.slots, vec![Some(0..1), Some(1..2)]);
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
        assert_eq!((p.decided(&[]), p.hits()), ((0, 0), 0));
        let p = plan(&ok, &req("nope", vec![desc(&[("tenant", "a")]), desc(&[("tenant", "b")])], 1)).unwrap();
        assert_eq!((p.slots, p.misses), (vec![None, None], [2, 0, 0]));
        let p =
            plan(&ok, &req("d", vec![desc(&[("tenant", "a"), ("rule", "zz")]), desc(&[("tenant", "a")])], 1)).unwrap();
        assert_eq!((p.slots, p.misses), (vec![None, Some(0..1)], [0, 0, 1]));
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

    const SEC: u64 = UNITS_PER_US * 1_000_000;

    fn several() -> Settings {
        Settings::from_json_bytes(
            br#"{"domains": {"d": {"capacity": 3, "refill_rate": 1,
                 "tenants": {"acme": {"limits": [{"name": "burst", "capacity": 3, "refill_rate": 10},
                                                 {"name": "hour", "capacity": 5, "refill_rate": "5/h"}]}},
                 "rules": [{"name": "up", "path_prefix": "/up",
                            "limits": [{"name": "a", "capacity": 2, "refill_rate": 1},
                                       {"name": "b", "capacity": 4, "refill_rate": "4/min"}]}]}}}"#,
        )
        .unwrap()
    }

    #[test]
    fn several_limits_are_one_key_each_in_one_slot() {
        let s = several();
        let one = plan(&s, &req("d", vec![desc(&[("tenant", "other")])], 1)).unwrap();
        let p = plan(
            &s,
            &req(
                "d",
                vec![
                    desc(&[("tenant", "acme")]),
                    desc(&[("x", "y")]),
                    desc(&[("tenant", "acme"), ("rule", "up")]),
                    desc(&[("tenant", "other"), ("rule", "up")]),
                ],
                2,
            ),
        )
        .unwrap();
        assert_eq!(p.slots, vec![Some(0..2), None, Some(2..4), Some(4..6)]);
        let base = format!("trl:{{{}}}", p.debits[0].tag);
        let keys: Vec<&str> = p.debits.iter().map(|d| d.key.as_str()).collect();
        assert_eq!(
            &keys[..4],
            [
                format!("{base}:l:burst"),
                format!("{base}:l:hour"),
                format!("{base}:r:up:l:a"),
                format!("{base}:r:up:l:b")
            ]
        );
        // One tag for all limits of all of a tenant's buckets: one script on a cluster.
        assert!(p.debits[..4].iter().all(|d| d.tag == p.debits[0].tag));
        assert_eq!(p.debits.iter().map(|d| d.limit.capacity).collect::<Vec<_>>(), vec![3, 5, 2, 4, 2, 4]);
        assert!(p.debits.iter().all(|d| d.cost == 2));
        // A one-limit policy keeps the key it always had (no `:l:`), next to its rule's limits.
        assert_eq!(one.debits.len(), 1);
        assert!(!one.debits[0].key.contains(":l:"));
        assert_eq!(p.debits[4].key, format!("{}:r:up:l:a", one.debits[0].key));
        // Three descriptors decided, each costing 2 once however many limits it has.
        assert_eq!(p.hits(), 6);
    }

    fn ok(remaining: u64, reset: u64) -> Result1 {
        Result1 { allowed: true, remaining, reset, retry: Some(0) }
    }

    fn denied(remaining: u64, reset: u64, retry: Option<u64>) -> Result1 {
        Result1 { allowed: false, remaining, reset, retry }
    }

    /// (code, capacity, remaining, reset in ms) of each status.
    fn shown(a: &RateLimitResponse) -> Vec<(i32, u32, u32, i64)> {
        a.statuses
            .iter()
            .map(|s| {
                let limit = s.current_limit.as_ref().map_or(0, |l| l.requests_per_unit);
                let reset =
                    s.duration_until_reset.as_ref().map_or(-1, |d| d.seconds * 1000 + i64::from(d.nanos) / 1_000_000);
                (s.code, limit, s.limit_remaining, reset)
            })
            .collect()
    }

    #[test]
    fn several_limits_answer_as_the_filters_headers() {
        let s = several();
        let p = plan(&s, &req("d", vec![desc(&[("tenant", "acme")]), desc(&[("tenant", "acme"), ("rule", "up")])], 1))
            .unwrap();
        let (o, over) = (Code::Ok as i32, Code::OverLimit as i32);
        // Admitted: the fewest tokens left (hour: 1 of 5, not burst: 2 of 3).
        let a = answer(&p, &[ok(2, SEC / 10), ok(1, 4 * 720 * SEC), ok(1, SEC), ok(1, 15 * SEC)]);
        assert_eq!(a.overall_code, o);
        // A tie on tokens left: the longer reset (b: 15 s to full, not a: 1 s).
        assert_eq!(shown(&a), vec![(o, 5, 1, 2_880_000), (o, 4, 1, 15_000)]);
        // Denied by one limit: that one, with its wait; the descriptor is over, the other
        // descriptor of the request is reported as admitted.
        let a = answer(&p, &[ok(2, SEC / 10), denied(0, 3600 * SEC, Some(720 * SEC)), ok(1, SEC), ok(3, SEC)]);
        assert_eq!(a.overall_code, over);
        assert_eq!(shown(&a), vec![(over, 5, 0, 720_000), (o, 2, 1, 1000)]);
        assert_eq!(p.decided(&[ok(2, 0), denied(0, 0, Some(1)), ok(1, 0), ok(3, 0)]), (1, 1));
        // Denied by both: the longest wait (what a client must wait for every limit), not
        // the first listed nor the fewest tokens.
        let a =
            answer(&p, &[denied(0, SEC, Some(SEC / 10)), denied(1, 3600 * SEC, Some(720 * SEC)), ok(2, 0), ok(4, 0)]);
        assert_eq!(shown(&a)[0], (over, 5, 1, 720_000));
        // A cost above a capacity never fits: the longest wait of all, shown as a full refill.
        let a = answer(&p, &[denied(3, 0, None), denied(0, 3600 * SEC, Some(720 * SEC)), ok(2, 0), ok(4, 0)]);
        assert_eq!(shown(&a)[0], (over, 3, 3, 300));
        // Equal waits: the first listed.
        let a = answer(&p, &[denied(0, SEC, Some(2 * SEC)), denied(0, SEC, Some(2 * SEC)), ok(2, 0), ok(4, 0)]);
        assert_eq!(shown(&a)[0], (over, 3, 0, 2000));
        // Results missing (never expected): OK without a limit, not a panic.
        assert_eq!(shown(&answer(&p, &[ok(1, 0)]))[0], (o, 0, 0, -1));
    }
}
