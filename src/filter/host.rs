//! The host side of the filter: proxy-wasm calls the contexts in `mod.rs` need, behind
//! small functions and the [`SharedStore`]/[`RequestFacts`] implementations the pure flow
//! takes. Raw ABI calls where the SDK's wrappers would abort the VM on an unexpected status.

use crate::config::Config;
use crate::flow::Deny;
use crate::metrics::{self, Counter, Events, Final};
use crate::policy::PolicyId;
use crate::response::{self, Denied};
use crate::store::{GetError, SetError, SharedStore};
use crate::tenant::RequestFacts;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{MapType, MetricType, Status};
use std::time::UNIX_EPOCH;

/// The stat ids of one configuration.
pub struct MetricIds {
    plugin: [u32; Counter::ALL.len()],
    live_slots: u32,
    tenants: Vec<[u32; Final::ALL.len()]>,
    rules: Vec<Option<[u32; Final::ALL.len()]>>,
    plans: Vec<[u32; Final::ALL.len()]>,
    /// Per-limit `denied` of the policies with several limits, sorted by policy, each
    /// policy's in its limits' order.
    limits: Vec<(PolicyId, u32)>,
}

pub fn define_metrics(config: &Config) -> Result<MetricIds, Status> {
    let mut plugin = [0u32; Counter::ALL.len()];
    for (slot, c) in plugin.iter_mut().zip(Counter::ALL) {
        *slot = hostcalls::define_metric(MetricType::Counter, &metrics::plugin_name(c.name()))?;
    }
    let live_slots = hostcalls::define_metric(MetricType::Gauge, &metrics::plugin_name(metrics::LIVE_SLOTS))?;
    let scoped = |scope: &str, name: &str| -> Result<[u32; Final::ALL.len()], Status> {
        let mut ids = [0u32; Final::ALL.len()];
        for (slot, f) in ids.iter_mut().zip(Final::ALL) {
            *slot =
                hostcalls::define_metric(MetricType::Counter, &metrics::scoped_name(scope, name, f.counter().name()))?;
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
        limits.push((policy, hostcalls::define_metric(MetricType::Counter, &name)?));
    }
    Ok(MetricIds { plugin, live_slots, tenants, rules, plans, limits })
}

fn increment(id: u32, by: u32) {
    if by > 0 {
        let _ = hostcalls::increment_metric(id, by as i64);
    }
}

pub fn record(ids: &MetricIds, events: &Events) {
    for (id, n) in ids.plugin.iter().zip(events.counters.iter()) {
        increment(*id, *n);
    }
    increment(ids.live_slots, events.slots_created);
    if let Some((policy, outcome)) = events.named {
        let set = match policy {
            PolicyId::Default => None,
            PolicyId::Tenant(i) | PolicyId::TenantOnPlan(i, _) => ids.tenants.get(i),
            PolicyId::Rule(i) => ids.rules.get(i).and_then(Option::as_ref),
            PolicyId::Plan(i) => ids.plans.get(i),
        };
        if let Some(id) = set.and_then(|s| s.get(outcome as usize)) {
            increment(*id, 1);
        }
    }
    if let Some((policy, mask)) = events.limits_denied {
        let first = ids.limits.partition_point(|(p, _)| *p < policy);
        let of_policy = ids.limits.get(first..).unwrap_or(&[]).iter().take_while(|(p, _)| *p == policy);
        for (i, (_, id)) in of_policy.enumerate() {
            increment(*id, u32::from(mask >> i & 1));
        }
    }
}

/// Request facts read lazily from the host; `:path` is read at most once.
pub struct HostFacts {
    pub path: Option<Vec<u8>>,
}

impl RequestFacts for HostFacts {
    fn header(&mut self, name: &str) -> Option<Vec<u8>> {
        hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name).ok().flatten()
    }

    fn path(&mut self) -> Option<&[u8]> {
        if self.path.is_none() {
            self.path = self.header(":path");
        }
        self.path.as_deref()
    }

    fn property(&mut self, path: &[&str]) -> Option<Vec<u8>> {
        hostcalls::get_property(path.to_vec()).ok().flatten()
    }
}

/// Shared data through the raw ABI calls: the SDK's wrappers panic on any status but Ok,
/// NotFound and CasMismatch, which would abort the VM where `on_store_error` must apply.
pub struct HostStore;

mod abi {
    // Status codes of the proxy-wasm ABI.
    pub const OK: u32 = 0;
    pub const NOT_FOUND: u32 = 1;
    pub const CAS_MISMATCH: u32 = 8;

    #[link(wasm_import_module = "env")]
    extern "C" {
        pub fn proxy_get_shared_data(
            key_data: *const u8,
            key_size: usize,
            return_value_data: *mut *mut u8,
            return_value_size: *mut usize,
            return_cas: *mut u32,
        ) -> u32;
        pub fn proxy_set_shared_data(
            key_data: *const u8,
            key_size: usize,
            value_data: *const u8,
            value_size: usize,
            cas: u32,
        ) -> u32;
        pub fn proxy_send_local_response(
            status_code: u32,
            details_data: *const u8,
            details_size: usize,
            body_data: *const u8,
            body_size: usize,
            headers_data: *const u8,
            headers_size: usize,
            grpc_status: i32,
        ) -> u32;
    }
}

impl SharedStore for HostStore {
    fn get(&mut self, key: &str) -> Result<Option<(Vec<u8>, u32)>, GetError> {
        let mut data: *mut u8 = std::ptr::null_mut();
        let mut size: usize = 0;
        let mut cas: u32 = 0;
        // SAFETY: the pointers are valid for the call; on Ok the host wrote a buffer it got
        // from this module's proxy_on_memory_allocate (the SDK's: a boxed slice of exactly
        // `size` bytes), which we take ownership of once.
        let status = unsafe { abi::proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
        match status {
            abi::OK if !data.is_null() => {
                let bytes = unsafe { Vec::from_raw_parts(data, size, size) };
                Ok(Some((bytes, cas)))
            }
            abi::OK | abi::NOT_FOUND => Ok(None),
            _ => Err(GetError),
        }
    }

    fn set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
        // SAFETY: both slices are valid for the duration of the call.
        let status = unsafe { abi::proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) };
        match status {
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
    let _ = hostcalls::set_property(vec![DECISION_PROPERTY], Some(value.as_bytes()));
}

/// Adds a header to the request the upstream gets.
pub fn add_request_header(name: &str, value: &str) {
    let _ = hostcalls::add_map_value(MapType::HttpRequestHeaders, name, value);
}

pub fn now_ns() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
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
    let content_type = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "content-type").ok().flatten();
    let grpc = content_type
        .as_deref()
        .filter(|ct| response::is_grpc(ct))
        .map(|ct| std::str::from_utf8(ct).unwrap_or("application/grpc"));
    let reply = response::local_reply(config, &denied, grpc);
    let headers = response::serialize_pairs(&reply.headers);
    // The raw call, because the SDK's `send_http_response` passes no details and no gRPC
    // status, and aborts the VM on any status but Ok.
    // SAFETY: every pointer/length pair is a live slice for the duration of the call.
    let _ = unsafe {
        abi::proxy_send_local_response(
            reply.status,
            reply.details.as_ptr(),
            reply.details.len(),
            reply.body.as_ptr(),
            reply.body.len(),
            headers.as_ptr(),
            headers.len(),
            reply.grpc_status,
        )
    };
}
