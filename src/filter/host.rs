//! The host side of the filter: the [`SharedStore`]/[`RequestFacts`] implementations the pure
//! flow takes, the stats of one configuration ([`Stats`]: counted in the module, flushed to
//! the host on the tick), and the deny reply. Every host call goes through [`abi`].

use super::abi;
use crate::config::Config;
use crate::flow::Deny;
use crate::metrics::{self, Counter, Events, Final};
use crate::policy::PolicyId;
use crate::response::{self, Denied};
use crate::store::{GetError, SetError, SharedStore};
use crate::tenant::RequestFacts;

/// A stat id and the increments not yet handed to the host.
type Cell = (u32, u32);

/// The stats of one configuration: each counter's id and what this worker counted since the
/// last flush. Requests only add here (no host call); [`Stats::flush`] runs on the tick, on
/// reconfigure and on teardown, as Envoy itself only publishes stats every few seconds.
pub struct Stats {
    plugin: [Cell; Counter::ALL.len()],
    live_slots: Cell,
    tenants: Vec<[Cell; Final::ALL.len()]>,
    rules: Vec<Option<[Cell; Final::ALL.len()]>>,
    plans: Vec<[Cell; Final::ALL.len()]>,
    /// Per-limit `denied` of the policies with several limits, sorted by policy, each
    /// policy's in its limits' order.
    limits: Vec<(PolicyId, Cell)>,
}

impl Stats {
    pub fn define(config: &Config) -> Result<Stats, u32> {
        let mut plugin = [(0, 0); Counter::ALL.len()];
        for (slot, c) in plugin.iter_mut().zip(Counter::ALL) {
            slot.0 = abi::define_metric(abi::COUNTER, &metrics::plugin_name(c.name()))?;
        }
        let live_slots = (abi::define_metric(abi::GAUGE, &metrics::plugin_name(metrics::LIVE_SLOTS))?, 0);
        let scoped = |scope: &str, name: &str| -> Result<[Cell; Final::ALL.len()], u32> {
            let mut ids = [(0, 0); Final::ALL.len()];
            for (slot, f) in ids.iter_mut().zip(Final::ALL) {
                slot.0 = abi::define_metric(abi::COUNTER, &metrics::scoped_name(scope, name, f.counter().name()))?;
            }
            Ok(ids)
        };
        let tenants = config.tenants.iter().map(|t| scoped("tenant", &t.name)).collect::<Result<_, _>>()?;
        let rules = config
            .all_rules()
            .map(|r| r.name.as_deref().map(|n| scoped("rule", n)).transpose())
            .collect::<Result<_, _>>()?;
        let plans = config.plans.iter().map(|p| scoped("plan", &p.name)).collect::<Result<_, _>>()?;
        let mut limits = Vec::new();
        for (policy, name) in metrics::limit_denied_names(config) {
            limits.push((policy, (abi::define_metric(abi::COUNTER, &name)?, 0)));
        }
        Ok(Stats { plugin, live_slots, tenants, rules, plans, limits })
    }

    /// Counts one decision's events (no host call).
    pub fn add(&mut self, events: &Events) {
        for (cell, n) in self.plugin.iter_mut().zip(events.counters.iter()) {
            cell.1 = cell.1.saturating_add(*n);
        }
        self.live_slots.1 = self.live_slots.1.saturating_add(events.slots_created);
        if let Some((policy, outcome)) = events.named {
            let set = match policy {
                PolicyId::Default => None,
                PolicyId::Tenant(i) | PolicyId::TenantOnPlan(i, _) => self.tenants.get_mut(i),
                PolicyId::Rule(i) => self.rules.get_mut(i).and_then(Option::as_mut),
                PolicyId::Plan(i) => self.plans.get_mut(i),
            };
            if let Some(cell) = set.and_then(|s| s.get_mut(outcome as usize)) {
                cell.1 = cell.1.saturating_add(1);
            }
        }
        if let Some((policy, mask)) = events.limits_denied {
            let first = self.limits.partition_point(|(p, _)| *p < policy);
            let of_policy =
                self.limits.get_mut(first..).unwrap_or_default().iter_mut().take_while(|(p, _)| *p == policy);
            for (i, (_, cell)) in of_policy.enumerate() {
                cell.1 = cell.1.saturating_add(u32::from(mask >> i & 1));
            }
        }
    }

    /// Hands everything counted since the last flush to the host.
    pub fn flush(&mut self) {
        let named =
            self.tenants.iter_mut().chain(self.rules.iter_mut().flatten()).chain(self.plans.iter_mut()).flatten();
        let limits = self.limits.iter_mut().map(|(_, cell)| cell);
        for cell in self.plugin.iter_mut().chain(std::iter::once(&mut self.live_slots)).chain(named).chain(limits) {
            if cell.1 > 0 {
                abi::increment_metric(cell.0, i64::from(cell.1));
                cell.1 = 0;
            }
        }
    }
}

/// Request facts read lazily from the host; `:path` is read at most once.
pub struct HostFacts {
    pub path: Option<Vec<u8>>,
}

impl RequestFacts for HostFacts {
    fn header(&mut self, name: &str) -> Option<Vec<u8>> {
        abi::header(abi::REQUEST_HEADERS, name)
    }

    fn path(&mut self) -> Option<&[u8]> {
        if self.path.is_none() {
            self.path = self.header(":path");
        }
        self.path.as_deref()
    }

    fn property(&mut self, path: &[&str]) -> Option<Vec<u8>> {
        abi::property(path)
    }
}

/// Shared data. Any status but Ok, NotFound and CasMismatch is a store error, to which
/// `on_store_error` applies (the VM never aborts on one).
pub struct HostStore;

impl SharedStore for HostStore {
    fn get(&mut self, key: &str) -> Result<Option<(Vec<u8>, u32)>, GetError> {
        abi::shared_get(key).map_err(|_| GetError)
    }

    fn set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
        match abi::shared_set(key, value, cas) {
            abi::OK => Ok(()),
            abi::CAS_MISMATCH => Err(SetError::CasMismatch),
            _ => Err(SetError::Failed),
        }
    }
}

/// The filter-state key of a decision (`filter_state`): Envoy stores it as
/// `wasm.tenant_ratelimit`, which access logs read with `%FILTER_STATE(wasm.tenant_ratelimit:PLAIN)%`.
const DECISION_PROPERTY: &str = "tenant_ratelimit";

pub fn publish_decision(value: &str) {
    let _ = abi::set_property(&[DECISION_PROPERTY], value.as_bytes());
}

/// Adds a header to the request the upstream gets.
pub fn add_request_header(name: &str, value: &str) {
    let _ = abi::add_header(abi::REQUEST_HEADERS, name, value);
}

/// The local reply for a denied request. The request's `content-type` is read only here,
/// on the deny path, to tell a gRPC call (which needs a gRPC status) from plain HTTP.
pub fn send_deny(config: &Config, deny: &Deny) {
    let denied = Denied {
        why: deny.why,
        retry_after: deny.retry_after,
        policy: deny.policy,
        quota: deny.quota.as_ref(),
        extra: &deny.headers,
    };
    let content_type = abi::header(abi::REQUEST_HEADERS, "content-type");
    let grpc = content_type
        .as_deref()
        .filter(|ct| response::is_grpc(ct))
        .map(|ct| std::str::from_utf8(ct).unwrap_or("application/grpc"));
    let reply = response::local_reply(config, &denied, grpc);
    let headers = response::serialize_pairs(&reply.headers);
    abi::send_local_response(reply.status, reply.details, reply.body, &headers, reply.grpc_status);
}
