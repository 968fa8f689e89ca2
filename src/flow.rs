//! One request, start to end, without the host: which tenant and rule, the local bucket
//! (or this worker's lease), the rate-limit service (or a service grant), and what to do
//! next ([`Next`]) with which counters ([`Step::events`]). `filter.rs` reads the facts,
//! calls [`on_request`] (and [`on_service_answer`] when the service replies) and applies
//! the result; everything it decides is here, where unit tests reach it.

use crate::config::{Config, GlobalMode, HeaderStyle};
use crate::decision::{decide, from_lease, Decision, Metered};
use crate::global::{Call, Plan, Service};
use crate::metrics::{Counter, Events, Pending};
use crate::policy::PolicyId;
use crate::response::{Denial, Quota};
use crate::rls::{self, Answer};
use crate::rules::{classify, Metering};
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
    /// The request was admitted from a worker lease without touching shared data: its
    /// counters may wait for the next flush (see `filter.rs`).
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
        Step { next: Next::Continue(headers), events, batch: false }
    }
}

/// Decides a request from its facts. `now` reads the clock; it is called only when a
/// decision needs the time (a worker-lease admission does not).
pub fn on_request(
    plugin: &Plugin,
    mut worker: Option<&mut Worker>,
    facts: &mut impl RequestFacts,
    store: &mut impl SharedStore,
    now: impl Fn() -> u64,
) -> Step {
    let config = &plugin.config;
    let service = Service::of(config, &plugin.ns);
    let mut events = Events::default();

    let needs_method = !config.rules.is_empty() || service.is_some_and(|s| s.global.method_key.is_some());
    let method = if needs_method { facts.header(":method").unwrap_or_default() } else { Vec::new() };
    let metering = if config.rules.is_empty() {
        classify(&[], b"", b"")
    } else {
        classify(&config.rules, &method, facts.path().unwrap_or_default())
    };
    let Metering::Charge { cost, rule } = metering else {
        events.bump(Counter::Unmetered, 1);
        return Step::go(Headers::default(), events);
    };
    let tenant = tenant::resolve(&config.tenant_sources, &plugin.default_tenant, facts);
    let request = Metered::new(config, tenant, rule, cost);

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
            return Step { next: Next::Deny(deny), events, batch };
        }
        if service.is_none() {
            let quota = decision.quota.filter(|_| config.headers != HeaderStyle::Off);
            let headers = Headers { quota: quota.map(|q| (Some(decision.policy), q)), service: Vec::new() };
            return Step { next: Next::Continue(headers), events, batch };
        }
        // Mode both: a request the local bucket lets through is not final; the service (or a
        // grant) decides, and its outcome is counted then, once.
        pending = events.defer(decision.policy);
    }
    let Some(service) = service else { return Step::go(Headers::default(), events) };

    let mut call = Call { tenant, cost, hits: 0, pending };
    let off = worker.as_deref().map_or(0, |w| w.grants_off_until);
    call.hits = match service.plan(store, &call, off, now(), &mut events) {
        Plan::Admit => return Step::go(Headers::default(), events),
        Plan::Ask { hits } => hits,
    };
    let method = std::str::from_utf8(&method).unwrap_or("");
    let path = facts.path().map(|p| {
        let end = p.iter().position(|&b| b == b'?').unwrap_or(p.len());
        std::str::from_utf8(p.get(..end).unwrap_or_default()).unwrap_or("")
    });
    let global = service.global;
    let input = rls::DescriptorInput {
        tenant_key: &global.tenant_key,
        tenant: tenant.as_str(),
        method: global.method_key.as_deref().map(|k| (k, method)),
        path: global.path_key.as_deref().zip(path),
    };
    let body = rls::encode_request(&global.domain, &input, call.hits);
    events.bump(Counter::ServiceCalls, 1);
    // A lease-admitted local verdict has no counters left after `defer`: nothing to batch.
    Step { next: Next::AskService { body, call }, events, batch: false }
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
        return Step { next: Next::Deny(deny), events, batch: false };
    }
    let headers = Headers { quota: verdict.quota.map(|q| (None, q)), service: verdict.headers };
    Step::go(headers, events)
}
