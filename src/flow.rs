//! One request, start to end, without the host: which tenant and rule, the local bucket
//! (or this worker's lease), the rate-limit service (or a service grant), and what to do
//! next ([`Next`]) with which counters ([`Step::events`]). `filter/` reads the facts,
//! calls [`on_request`] (and [`on_service_answer`] when the service replies) and applies
//! the result; everything it decides is here, where unit tests reach it.

use crate::config::{Config, GlobalMode, HeaderStyle};
use crate::decision::{decide, from_lease, Decision, Metered};
use crate::global::{Call, Plan, Service};
use crate::metrics::{Counter, Events, Pending};
use crate::policy::PolicyId;
use crate::response::{Denial, Quota};
use crate::rls::{self, Answer};
use crate::rules::{self, Lookup, Metering};
use crate::store::{Namespace, SharedStore};
use crate::tenant::{self, RequestFacts, TenantId};
use crate::worker_lease::WorkerLeases;

/// A plugin's configured state, built once per `on_configure`.
pub struct Plugin {
    pub config: Config,
    pub ns: Namespace,
    pub default_tenant: TenantId,
}

/// What one worker (one VM) keeps between requests.
#[derive(Debug, Default)]
pub struct Worker {
    /// Tokens leased from shared buckets (`worker_lease`), given back every tick.
    pub leases: WorkerLeases,
    /// Until when this worker asks the rate-limit service for no grant (it answered without
    /// a reset time; see global/mod.rs). 0: grants on.
    pub grants_off_until: u64,
}

/// What a request (or a service answer) leads to, and the counters to apply.
#[derive(Debug)]
pub struct Step {
    pub next: Next,
    pub events: Events,
    /// With `filter_state` on: the decision for the access log.
    pub decided: Option<Decided>,
    /// The request was admitted from a worker lease without touching shared data: its
    /// counters may wait for the next flush (see `filter/mod.rs`).
    pub batch: bool,
}

#[derive(Debug)]
pub enum Next {
    /// Let the request through; add these headers to the upstream's response.
    Continue(Headers),
    /// Answer with the deny reply.
    Deny(Deny),
    /// Pause the request and ask the rate-limit service; its answer goes to
    /// [`on_service_answer`] with the call.
    AskService { body: Vec<u8>, call: Call },
}

/// Headers for the upstream's response.
#[derive(Debug, Default, PartialEq)]
pub struct Headers {
    /// Rate-limit headers: the policy (`None`: the rate-limit service's limit) and quota.
    pub quota: Option<(Option<PolicyId>, Quota)>,
    /// The service's `response_headers_to_add`.
    pub service: Vec<(String, String)>,
    /// With `shadow_header` set: the request passed as a shadow denial of this policy; tell
    /// the upstream in that request header.
    pub would_deny: Option<PolicyId>,
}

/// A denial to answer.
#[derive(Debug, PartialEq)]
pub struct Deny {
    pub why: Denial,
    pub retry_after: u64,
    /// The policy for `RateLimit` headers (`None`: the rate-limit service's limit).
    pub policy: Option<PolicyId>,
    pub quota: Option<Quota>,
    /// Headers the rate-limit service asked to add.
    pub headers: Vec<(String, String)>,
}

impl Step {
    fn go(headers: Headers, events: Events) -> Step {
        Step { next: Next::Continue(headers), events, batch: false, decided: None }
    }

    /// Records the decision (`filter_state`) and marks a shadow denial for the upstream.
    fn finish(self, config: &Config, who: Who) -> Step {
        let mut step = self.mark_shadow(config, who.policy);
        if config.filter_state {
            let limits = step.events.limits_denied.map_or(0, |(_, mask)| mask);
            step.decided = Some(Decided { who, outcome: Outcome::of(&step), limits });
        }
        step
    }

    /// Marks a request that passed as a shadow denial of `policy` for the upstream
    /// (`shadow_header`).
    fn mark_shadow(mut self, config: &Config, policy: PolicyId) -> Step {
        let shadow = Outcome::of(&self) == Outcome::ShadowDenied;
        if let (Next::Continue(headers), true, Some(_)) = (&mut self.next, shadow, &config.shadow_header) {
            headers.would_deny = Some(policy);
        }
        self
    }
}

/// Who a metered request is: tenant, plan, matching rule, and the policy it met.
#[derive(Debug, Clone, Copy)]
pub struct Who {
    pub tenant: TenantId,
    pub plan: Option<usize>,
    pub rule: Option<usize>,
    pub policy: PolicyId,
}

/// How a request ended, as the access log shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Denied,
    ShadowDenied,
    Unmetered,
    /// Waiting for the rate-limit service; its answer's step has the final outcome.
    Asking,
}

impl Outcome {
    fn of(step: &Step) -> Outcome {
        let count = |c| step.events.count(c) > 0;
        match &step.next {
            Next::AskService { .. } => Outcome::Asking,
            _ if count(Counter::Denied) || matches!(step.next, Next::Deny(_)) => Outcome::Denied,
            _ if count(Counter::ShadowDenied) => Outcome::ShadowDenied,
            _ if count(Counter::Allowed) => Outcome::Allowed,
            _ => Outcome::Unmetered,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
            Outcome::ShadowDenied => "shadow_denied",
            Outcome::Unmetered => "unmetered",
            Outcome::Asking => "asking",
        }
    }
}

/// A decision for the access log (`filter_state`); `who` is `None` for an unmetered request
/// (no tenant is resolved for it).
#[derive(Debug, Clone, Copy)]
pub struct Decided {
    pub who: Who,
    pub outcome: Outcome,
    /// Bit `i`: the policy's limit `i` refused the request (see `Events::limits_denied`).
    pub limits: u8,
}

impl Decided {
    /// This decision once the rate-limit service's answer (`answer`, the step
    /// [`on_service_answer`] returned) settled it.
    pub fn settled(self, answer: &Step) -> Decided {
        Decided { outcome: Outcome::of(answer), ..self }
    }

    /// The filter-state value: space-separated `key=value` pairs (logfmt), `-` for none,
    /// e.g. `tenant=acme plan=pro rule=login policy=login limit=daily outcome=denied`.
    pub fn render(&self, config: &Config) -> String {
        let Who { tenant, plan, rule, policy } = self.who;
        let named = policy.policy(config);
        let refused: Vec<&str> =
            (0..8usize).filter(|i| self.limits >> i & 1 == 1).map(|i| named.limit_name(i)).collect();
        let limits = if refused.is_empty() { "-".to_string() } else { refused.join(",") };
        let plan = plan.and_then(|p| config.plans.get(p)).map_or("-", |p| p.name.as_str());
        let rule = rule.and_then(|r| config.rule(r)).and_then(|r| r.name.as_deref()).unwrap_or("-");
        let mut out = String::with_capacity(96);
        for (key, value) in [
            ("tenant", tenant.as_str()),
            ("plan", plan),
            ("rule", rule),
            ("policy", policy.name(config)),
            ("limit", limits.as_str()),
            ("outcome", self.outcome.name()),
        ] {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(key);
            out.push('=');
            // Names are visible ASCII; a space (a rule name may have one) would split the pair.
            out.extend(value.chars().map(|c| if c == ' ' { '_' } else { c }));
        }
        out
    }
}

/// Decides a request from its facts. `now` reads the clock; it is called at most once, and
/// only when a decision needs the time (a worker-lease admission and a service call without
/// grants do not).
pub fn on_request(
    plugin: &Plugin,
    worker: Option<&mut Worker>,
    facts: &mut impl RequestFacts,
    store: &mut impl SharedStore,
    now: impl Fn() -> u64,
) -> Step {
    // Mode both needs the time for the local bucket and again for a grant: one host call.
    let read = std::cell::Cell::new(None);
    let now = || {
        let t = read.get().unwrap_or_else(&now);
        read.set(Some(t));
        t
    };
    let config = &plugin.config;
    let mut events = Events::default();

    let mut req = Lookup::new(facts);
    let (metering, who) = rules::meter(config, &plugin.default_tenant, &mut req);
    let Metering::Charge { cost, rule } = metering else {
        events.bump(Counter::Unmetered, 1);
        let mut step = Step::go(Headers::default(), events);
        if config.filter_state {
            let who = Who { tenant: plugin.default_tenant, plan: None, rule: None, policy: PolicyId::Default };
            step.decided = Some(Decided { who, outcome: Outcome::Unmetered, limits: 0 });
        }
        return step;
    };
    let (tenant, plan) = who.unwrap_or_else(|| {
        let tenant = tenant::resolve(&config.tenant_sources, &plugin.default_tenant, req.facts());
        (tenant, crate::policy::plan_of(config, &tenant, req.facts()))
    });
    let request = Metered::new(config, tenant, plan, rule, cost);
    let who = Who { tenant, plan, rule: rule.map(|(id, _)| id), policy: request.policy };
    metered(plugin, worker, &mut req, store, &now, request, plan).finish(config, who)
}

/// [`on_request`] for a metered request.
fn metered<'c, F: RequestFacts>(
    plugin: &'c Plugin,
    mut worker: Option<&mut Worker>,
    req: &mut Lookup<'c, '_, F>,
    store: &mut impl SharedStore,
    now: &impl Fn() -> u64,
    request: Metered,
    plan: Option<usize>,
) -> Step {
    let config = &plugin.config;
    let service = Service::of(config, &plugin.ns);
    let Metered { tenant, cost, .. } = request;
    let mut events = Events::default();

    let mut pending = Pending { shadow_denied: false, policy: request.policy };
    if service.is_none_or(|s| s.global.mode == GlobalMode::Both) {
        let (decision, from_worker_lease) = local(plugin, worker.as_deref_mut(), store, &request, &now);
        events = decision.events;
        let batch = from_worker_lease;
        if decision.deny {
            let deny = Deny {
                why: Denial::local(&events),
                retry_after: decision.retry_after_seconds,
                policy: Some(decision.policy),
                quota: decision.quota,
                headers: Vec::new(),
            };
            return Step { next: Next::Deny(deny), events, batch, decided: None };
        }
        if service.is_none() {
            let quota = decision.quota.filter(|_| config.headers != HeaderStyle::Off);
            let headers = Headers { quota: quota.map(|q| (Some(decision.policy), q)), ..Headers::default() };
            return Step { next: Next::Continue(headers), events, batch, decided: None };
        }
        // Mode both: a request the local bucket lets through is not final; the service (or a
        // grant) decides, and its outcome is counted then, once.
        pending = events.defer(decision.policy);
    }
    let Some(service) = service else { return Step::go(Headers::default(), events) };

    // Only grants (`lease_tokens`) need the time: a plain call makes no clock read.
    let asked_ns = if service.global.lease_tokens.is_some() { now() } else { 0 };
    let listed = config.tenant_index(tenant.as_bytes()).is_some();
    let mut call = Call { tenant, cost, hits: 0, pending, asked_ns, listed };
    let off = worker.as_deref().map_or(0, |w| w.grants_off_until);
    call.hits = match service.plan(store, &call, off, asked_ns, &mut events) {
        Plan::Admit => return Step::go(Headers::default(), events),
        Plan::Ask { hits } => hits,
    };
    let global = service.global;
    let (method, path) = req.method_and_path(global.method_key.is_some(), global.path_key.is_some());
    let method = std::str::from_utf8(method.unwrap_or_default()).unwrap_or("");
    let path = path.map(|p| {
        let end = p.iter().position(|&b| b == b'?').unwrap_or(p.len());
        std::str::from_utf8(p.get(..end).unwrap_or_default()).unwrap_or("")
    });
    let input = rls::DescriptorInput {
        tenant_key: &global.tenant_key,
        tenant: tenant.as_str(),
        method: global.method_key.as_deref().map(|k| (k, method)),
        path: global.path_key.as_deref().zip(path),
        plan: global.plan_key.as_deref().zip(plan.and_then(|p| config.plans.get(p)).map(|p| p.name.as_str())),
    };
    let body = rls::encode_request(&global.domain, &input, call.hits);
    events.bump(Counter::ServiceCalls, 1);
    // A lease-admitted local verdict has no counters left after `defer`: nothing to batch.
    Step { next: Next::AskService { body, call }, events, batch: false, decided: None }
}

/// The local bucket's verdict: from this worker's lease if it has one, else from shared data
/// (taking a lease along when worker leases are on). `true`: from the lease.
fn local(
    plugin: &Plugin,
    worker: Option<&mut Worker>,
    store: &mut impl SharedStore,
    request: &Metered,
    now: &impl Fn() -> u64,
) -> (Decision, bool) {
    let mut leases = worker.map(|w| &mut w.leases);
    if let Some(decision) = leases.as_deref_mut().and_then(|l| from_lease(&plugin.config, l, request)) {
        return (decision, true);
    }
    (decide(&plugin.config, &plugin.ns, store, leases, request, now()), false)
}

/// Applies the rate-limit service's answer (`None`: the call failed, timed out, or the answer
/// cannot be read) to the call [`on_request`] asked for.
pub fn on_service_answer(
    plugin: &Plugin,
    worker: Option<&mut Worker>,
    store: &mut impl SharedStore,
    call: &Call,
    answer: Option<Answer>,
    now_ns: u64,
) -> Step {
    let mut events = Events::default();
    let Some(service) = Service::of(&plugin.config, &plugin.ns) else {
        return Step::go(Headers::default(), events);
    };
    let verdict = service.conclude(store, call, answer, now_ns, &mut events);
    if let (Some(until), Some(worker)) = (verdict.grants_off_until, worker) {
        worker.grants_off_until = until;
    }
    if verdict.deny {
        let deny = Deny {
            why: Denial::global(&events),
            retry_after: verdict.retry_after_seconds,
            policy: None,
            quota: verdict.quota,
            headers: verdict.headers,
        };
        return Step { next: Next::Deny(deny), events, batch: false, decided: None };
    }
    let headers = Headers { quota: verdict.quota.map(|q| (None, q)), service: verdict.headers, would_deny: None };
    Step::go(headers, events).mark_shadow(&plugin.config, call.pending.policy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Final;
    use crate::store::fake::FakeStore;

    const SEC: u64 = 1_000_000_000;
    const T0: u64 = 1_700_000_000 * SEC;

    fn plugin(json: &str) -> Plugin {
        let config = Config::from_json_bytes(json.as_bytes()).unwrap();
        let default_tenant = TenantId::new(config.default_tenant.as_bytes()).unwrap();
        Plugin { config, ns: Namespace::new("t"), default_tenant }
    }

    struct Facts {
        tenant: &'static str,
        method: &'static [u8],
        path: &'static [u8],
    }

    impl RequestFacts for Facts {
        fn header(&mut self, name: &str) -> Option<Vec<u8>> {
            match name {
                "x-tenant-id" => Some(self.tenant.as_bytes().to_vec()),
                ":method" => Some(self.method.to_vec()),
                _ => None,
            }
        }
        fn path(&mut self) -> Option<&[u8]> {
            Some(self.path)
        }
        fn property(&mut self, _: &[&str]) -> Option<Vec<u8>> {
            None
        }
    }

    fn get(tenant: &'static str, path: &'static [u8]) -> Facts {
        Facts { tenant, method: b"GET", path }
    }

    fn answer(over_limit: bool, reset_s: u64) -> Answer {
        Answer {
            over_limit,
            limit: Some(10),
            remaining: Some(3),
            reset_seconds: Some(reset_s),
            reset_ns: Some(reset_s * SEC),
            window_seconds: Some(60),
            headers: vec![("x-service".into(), "1".into())],
        }
    }

    /// Runs requests through the flow as `filter/` does, answering service calls with
    /// `service`; returns what each request got (true: passed) and the summed counters.
    struct Run {
        plugin: Plugin,
        store: FakeStore,
        worker: Worker,
        events: Events,
        named: Vec<(PolicyId, Final)>,
        requests: u32,
        calls: u32,
    }

    impl Run {
        fn new(json: &str) -> Run {
            Run {
                plugin: plugin(json),
                store: FakeStore::default(),
                worker: Worker::default(),
                events: Events::default(),
                named: Vec::new(),
                requests: 0,
                calls: 0,
            }
        }

        fn take(&mut self, step: Step) -> Next {
            self.events.add(&step.events);
            self.named.extend(step.events.named);
            step.next
        }

        fn send(&mut self, mut facts: Facts, service: impl Fn() -> Option<Answer>) -> Next {
            self.requests += 1;
            let step = on_request(&self.plugin, Some(&mut self.worker), &mut facts, &mut self.store, || T0);
            match self.take(step) {
                Next::AskService { call, .. } => {
                    self.calls += 1;
                    let step =
                        on_service_answer(&self.plugin, Some(&mut self.worker), &mut self.store, &call, service(), T0);
                    let next = self.take(step);
                    assert!(!matches!(next, Next::AskService { .. }));
                    next
                }
                next => next,
            }
        }

        fn passed(&mut self, n: u32, facts: impl Fn() -> Facts, service: impl Fn() -> Option<Answer>) -> u32 {
            (0..n).filter(|_| matches!(self.send(facts(), &service), Next::Continue(_))).count() as u32
        }

        /// allowed + denied + shadow_denied = metered requests, and per name the same.
        fn assert_counted_once(&self) {
            let metered = self.requests - self.events.count(Counter::Unmetered);
            let outcomes: u32 = Final::ALL.iter().map(|f| self.events.count(f.counter())).sum();
            assert_eq!(outcomes, metered, "{:?}", self.events.counters);
            for f in Final::ALL {
                let named = self.named.iter().filter(|(_, o)| *o == f).count() as u32;
                assert_eq!(named, self.events.count(f.counter()), "{f:?}");
            }
        }
    }

    fn no_service() -> Option<Answer> {
        None
    }

    /// The clock is a host call: at most one per request, none where nothing needs it.
    #[test]
    fn the_clock_is_read_at_most_once_and_only_when_needed() {
        let reads = |json: &str| {
            let r = Run::new(json);
            let count = std::cell::Cell::new(0);
            let mut store = FakeStore::default();
            let mut worker = Worker::default();
            let _ = on_request(&r.plugin, Some(&mut worker), &mut get("a", b"/"), &mut store, || {
                count.set(count.get() + 1);
                T0
            });
            count.get()
        };
        let service = |extra: &str| {
            format!(r#"{{"capacity":5,"refill_rate":1,"global":{{"cluster":"rls","domain":"d"{extra}}}}}"#)
        };
        assert_eq!(reads(r#"{"capacity":5,"refill_rate":1}"#), 1);
        assert_eq!(reads(&service("")), 0);
        assert_eq!(reads(&service(r#","lease_tokens":5"#)), 1);
        assert_eq!(reads(&service(r#","mode":"both""#)), 1);
        assert_eq!(reads(&service(r#","mode":"both","lease_tokens":5"#)), 1);
    }

    #[test]
    fn local_admits_the_capacity_with_headers_then_denies() {
        let mut r =
            Run::new(r#"{"capacity":3,"refill_rate":0.001,"rate_limit_headers":"x-ratelimit","tenants":{"vip":{}}}"#);
        let Next::Continue(h) = r.send(get("vip", b"/"), no_service) else { panic!() };
        assert_eq!(h.quota.map(|(p, q)| (p, q.remaining)), Some((Some(PolicyId::Tenant(0)), 2)));
        assert_eq!(r.passed(5, || get("vip", b"/"), no_service), 2);
        let Next::Deny(d) = r.send(get("vip", b"/"), no_service) else { panic!() };
        assert_eq!((d.why, d.policy, d.retry_after > 0), (Denial::OverLimit, Some(PolicyId::Tenant(0)), true));
        assert_eq!(r.events.count(Counter::Allowed), 3);
        assert_eq!(r.events.count(Counter::Denied), 4);
        assert!(r.named.iter().all(|(p, _)| *p == PolicyId::Tenant(0)));
        r.assert_counted_once();
        // Headers off: no quota to add.
        let mut r = Run::new(r#"{"capacity":3,"refill_rate":1,"rate_limit_headers":"off"}"#);
        assert_eq!(r.send(get("a", b"/"), no_service).continued(), Some(Headers::default()));
    }

    #[test]
    fn unmetered_requests_count_only_as_unmetered() {
        let mut r = Run::new(r#"{"capacity":1,"refill_rate":0.001,"rules":[{"path_prefix":"/api"}]}"#);
        assert_eq!(r.passed(5, || get("a", b"/health"), no_service), 5);
        assert_eq!(r.passed(3, || get("a", b"/api"), no_service), 1);
        assert_eq!(r.events.count(Counter::Unmetered), 5);
        assert!(r.store.data.len() <= 1);
        r.assert_counted_once();
    }

    #[test]
    fn shadow_mode_passes_and_counts_shadow_denials() {
        let mut r = Run::new(r#"{"capacity":2,"refill_rate":0.001,"mode":"shadow"}"#);
        assert_eq!(r.passed(6, || get("a", b"/"), no_service), 6);
        assert_eq!((r.events.count(Counter::Allowed), r.events.count(Counter::ShadowDenied)), (2, 4));
        r.assert_counted_once();
    }

    #[test]
    fn store_errors_follow_on_store_error() {
        for (policy, passed) in [("allow", 4), ("deny", 0)] {
            let mut r = Run::new(&format!(r#"{{"capacity":5,"refill_rate":1,"on_store_error":"{policy}"}}"#));
            r.store.fail_gets = true;
            assert_eq!(r.passed(4, || get("a", b"/"), no_service), passed);
            assert_eq!(r.events.count(Counter::StoreErrors), 4);
            if passed == 0 {
                let Next::Deny(d) = r.send(get("a", b"/"), no_service) else { panic!() };
                assert_eq!(d.why, Denial::StoreError);
            }
            r.assert_counted_once();
        }
    }

    #[test]
    fn overflow_bucket_and_overflow_deny() {
        let mut r = Run::new(
            r#"{"capacity":5,"refill_rate":0.001,"max_tenants":1,"overflow":{"capacity":2,"refill_rate":0.001}}"#,
        );
        assert_eq!(r.passed(1, || get("first", b"/"), no_service), 1);
        assert_eq!(r.passed(4, || get("second", b"/"), no_service), 2);
        assert_eq!(r.events.count(Counter::OverflowUsed), 4);
        r.assert_counted_once();
        let mut r = Run::new(r#"{"capacity":5,"refill_rate":0.001,"max_tenants":1,"overflow":"deny"}"#);
        assert_eq!(r.passed(1, || get("first", b"/"), no_service), 1);
        let Next::Deny(d) = r.send(get("second", b"/"), no_service) else { panic!() };
        assert_eq!(d.why, Denial::Overflow);
        r.assert_counted_once();
    }

    #[test]
    fn worker_leases_admit_without_shared_data_and_batch_their_counters() {
        let mut r = Run::new(r#"{"capacity":40,"refill_rate":0.001,"worker_lease":4}"#);
        let first = on_request(&r.plugin, Some(&mut r.worker), &mut get("a", b"/"), &mut r.store, || T0);
        assert!(!first.batch);
        r.take(first);
        r.requests += 1;
        r.store.gets = 0;
        let leased = on_request(&r.plugin, Some(&mut r.worker), &mut get("a", b"/"), &mut r.store, || panic!("clock"));
        assert!(leased.batch);
        assert_eq!(r.store.gets, 0);
        r.take(leased);
        r.requests += 1;
        // 40 tokens: never more admitted, whatever sits in the lease.
        assert_eq!(r.passed(60, || get("a", b"/"), no_service), 38);
        r.assert_counted_once();
        // Given back, the bucket has exactly what was not admitted.
        r.worker.leases.settle(&mut r.store, &r.plugin.ns, T0);
        assert_eq!(r.passed(5, || get("a", b"/"), no_service), 0);
    }

    #[test]
    fn mode_global_asks_the_service_and_counts_its_verdict_once() {
        let mut r = Run::new(
            r#"{"capacity":1,"refill_rate":0.001,"tenants":{"vip":{}},
            "global":{"cluster":"rls","domain":"d","mode":"global"}}"#,
        );
        // No local bucket: the service decides every request.
        assert_eq!(r.passed(3, || get("vip", b"/"), || Some(answer(false, 5))), 3);
        assert!(r.store.data.is_empty());
        let Next::Continue(h) = r.send(get("vip", b"/"), || Some(answer(false, 5))) else { panic!() };
        assert_eq!(h.quota.map(|(p, q)| (p, q.remaining)), Some((None, 3)));
        assert_eq!(h.service, vec![("x-service".to_string(), "1".to_string())]);
        let Next::Deny(d) = r.send(get("vip", b"/"), || Some(answer(true, 5))) else { panic!() };
        assert_eq!((d.why, d.policy, d.retry_after), (Denial::GlobalOverLimit, None, 5));
        let Next::Continue(_) = r.send(get("vip", b"/"), no_service) else { panic!("failure_mode allow") };
        assert_eq!(r.calls, 6);
        assert_eq!(r.events.count(Counter::ServiceCalls), 6);
        assert_eq!(r.events.count(Counter::ServiceErrors), 1);
        assert!(r.named.iter().all(|(p, _)| *p == PolicyId::Tenant(0)));
        r.assert_counted_once();
    }

    #[test]
    fn mode_both_denies_locally_first_and_counts_once() {
        let mut r =
            Run::new(r#"{"capacity":2,"refill_rate":0.001,"global":{"cluster":"rls","domain":"d","mode":"both"}}"#);
        assert_eq!(r.passed(2, || get("a", b"/"), || Some(answer(false, 5))), 2);
        let Next::Deny(d) = r.send(get("a", b"/"), || Some(answer(false, 5))) else { panic!() };
        assert_eq!(d.why, Denial::OverLimit);
        assert_eq!(r.calls, 2, "a local denial asks no service");
        // The service denies what the local bucket allowed.
        let mut r =
            Run::new(r#"{"capacity":5,"refill_rate":0.001,"global":{"cluster":"rls","domain":"d","mode":"both"}}"#);
        assert_eq!(r.passed(3, || get("a", b"/"), || Some(answer(true, 5))), 0);
        assert_eq!((r.events.count(Counter::Allowed), r.events.count(Counter::Denied)), (0, 3));
        r.assert_counted_once();
        // Shadow: a local shadow denial stays one when the service allows.
        let mut r = Run::new(
            r#"{"capacity":1,"refill_rate":0.001,"mode":"shadow","global":{"cluster":"rls","domain":"d","mode":"both"}}"#,
        );
        assert_eq!(r.passed(3, || get("a", b"/"), || Some(answer(false, 5))), 3);
        assert_eq!((r.events.count(Counter::Allowed), r.events.count(Counter::ShadowDenied)), (1, 2));
        r.assert_counted_once();
    }

    #[test]
    fn service_grants_admit_without_a_call() {
        let mut r = Run::new(
            r#"{"capacity":5,"refill_rate":1,"global":{"cluster":"rls","domain":"d","mode":"global","lease_tokens":4}}"#,
        );
        assert_eq!(r.passed(8, || get("a", b"/"), || Some(answer(false, 30))), 8);
        assert_eq!(r.calls, 2);
        assert_eq!(r.events.count(Counter::GrantHits), 6);
        r.assert_counted_once();
        // No reset time: spare tokens dropped, and this worker asks per request for a while.
        let mut r = Run::new(
            r#"{"capacity":5,"refill_rate":1,"global":{"cluster":"rls","domain":"d","mode":"global","lease_tokens":4}}"#,
        );
        let bare = || Some(Answer { reset_ns: None, reset_seconds: None, ..answer(false, 0) });
        assert_eq!(r.passed(3, || get("a", b"/"), bare), 3);
        assert_eq!(r.calls, 3);
        assert!(r.worker.grants_off_until > T0);
        r.assert_counted_once();
    }

    impl Next {
        fn continued(self) -> Option<Headers> {
            match self {
                Next::Continue(h) => Some(h),
                _ => None,
            }
        }
    }

    #[test]
    fn a_shadow_denial_names_its_policy_to_the_upstream_and_every_decision_is_recorded() {
        let plugin = plugin(
            r#"{"capacity":1,"refill_rate":0.001,"shadow_header":"x-ratelimit-would-deny","filter_state":true,
            "plans":{"pro":{"capacity":1,"mode":"shadow"}},"tenant":{"plan_from":[{"header":"x-plan"}]},
            "rules":[{"path_prefix":"/healthz","cost":0},{"path_prefix":"/"}]}"#,
        );
        struct Planned(Facts);
        impl RequestFacts for Planned {
            fn header(&mut self, name: &str) -> Option<Vec<u8>> {
                if name == "x-plan" {
                    return Some(b"pro".to_vec());
                }
                self.0.header(name)
            }
            fn path(&mut self) -> Option<&[u8]> {
                self.0.path()
            }
            fn property(&mut self, p: &[&str]) -> Option<Vec<u8>> {
                self.0.property(p)
            }
        }
        let mut store = FakeStore::default();
        let mut pro = || on_request(&plugin, None, &mut Planned(get("a", b"/x")), &mut store, || T0);
        let (first, second) = (pro(), pro());
        let render = |s: &Step| s.decided.map(|d| d.render(&plugin.config)).unwrap_or_default();
        assert_eq!(render(&first), "tenant=a plan=pro rule=- policy=pro limit=- outcome=allowed");
        assert_eq!(render(&second), "tenant=a plan=pro rule=- policy=pro limit=pro outcome=shadow_denied");
        let Next::Continue(h) = second.next else { panic!("a shadow denial passes") };
        assert_eq!(h.would_deny.map(|p| p.name(&plugin.config)), Some("pro"));
        let Next::Continue(h) = first.next else { panic!() };
        assert_eq!(h.would_deny, None);
        // Enforced: no header (the request is denied); unmetered: recorded as such.
        let mut store = FakeStore::default();
        let mut free = |path: &'static [u8]| on_request(&plugin, None, &mut get("b", path), &mut store, || T0);
        let (_, denied, health) = (free(b"/x"), free(b"/x"), free(b"/healthz"));
        assert!(matches!(denied.next, Next::Deny(_)));
        assert!(render(&denied).ends_with("policy=default limit=default outcome=denied"), "{}", render(&denied));
        assert!(render(&health).ends_with("outcome=unmetered"));
    }

    #[test]
    fn the_service_hears_the_plan_with_plan_key() {
        use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
        use prost::Message;
        let entries = |json: &str, tenant: &'static str| {
            let plugin = plugin(json);
            let step = on_request(&plugin, None, &mut get(tenant, b"/"), &mut FakeStore::default(), || T0);
            let Next::AskService { body, .. } = step.next else { panic!("asks the service") };
            let r = RateLimitRequest::decode(body.as_slice()).unwrap();
            r.descriptors[0].entries.iter().map(|e| format!("{}={}", e.key, e.value)).collect::<Vec<_>>()
        };
        let config = r#"{"capacity":5,"refill_rate":1,"plans":{"pro":{}},"tenants":{"acme":{"plan":"pro"}},
            "global":{"cluster":"rls","domain":"d","plan_key":"plan"}}"#;
        assert_eq!(entries(config, "acme"), ["tenant=acme", "plan=pro"]);
        // No plan: no entry (the service then applies its default_plan or top level).
        assert_eq!(entries(config, "other"), ["tenant=other"]);
        // Without plan_key the descriptor is unchanged (envoyproxy/ratelimit matches entries).
        let config = config.replace(r#","plan_key":"plan""#, "");
        assert_eq!(entries(&config, "acme"), ["tenant=acme"]);
    }
}
