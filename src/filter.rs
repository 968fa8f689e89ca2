//! The only module that talks to the proxy-wasm host: reads the config once per
//! `on_configure`; per request it reads facts, calls the pure [`flow`], and applies the
//! [`Step`] it returns (headers, a deny reply, a service call, counters). Host calls on the
//! hot path (headers off, header tenant): one header read, one shared-data get, one set, one
//! counter increment.

use crate::config::Config;
use crate::flow::{self, Deny, Headers, Next, Plugin, Step, Worker};
use crate::global::Call;
use crate::metrics::{self, Counter, Events, Final};
use crate::policy::PolicyId;
use crate::response::{self, Denied};
use crate::rls;
use crate::store::{GetError, Namespace, SetError, SharedStore};
use crate::tenant::{RequestFacts, TenantId};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType, MetricType, Status};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

pub fn start() {
    // A panic aborts the VM (panic = "abort"); say why first, at the level operators alert on.
    std::panic::set_hook(Box::new(|info| {
        let _ = hostcalls::log(LogLevel::Critical, &format!("tenant-ratelimit: panic: {info}"));
    }));
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| Box::new(Root { active: None }));
}

/// Everything a request needs, built once per configuration and shared by HTTP contexts.
struct Active {
    plugin: Plugin,
    metrics: MetricIds,
    worker: RefCell<Worker>,
    /// Counters of worker-lease admissions, flushed with the next shared-data decision or
    /// tick, so the lease path makes no host call for stats.
    batched: RefCell<Events>,
}

impl Active {
    /// Gives every unspent worker lease back to the shared buckets and flushes batched counters.
    fn settle(&self) {
        if let Ok(mut worker) = self.worker.try_borrow_mut() {
            worker.leases.settle(&mut HostStore, &self.plugin.ns, now_ns());
        }
        self.flush();
    }

    fn flush(&self) {
        if let Ok(mut batched) = self.batched.try_borrow_mut() {
            record(&self.metrics, &batched);
            *batched = Events::default();
        }
    }

    /// Applies a step's counters: a worker-lease admission's wait for the next flush (unless
    /// they include per-name counters); any other decision's go at once, with the batch.
    fn count(&self, step: &Step) {
        let named = step.events.named.is_some_and(|(id, _)| id != PolicyId::Default);
        if step.batch && !named {
            if let Ok(mut batched) = self.batched.try_borrow_mut() {
                batched.add(&step.events);
                return;
            }
        }
        record(&self.metrics, &step.events);
        if !step.batch {
            self.flush();
        }
    }
}

struct MetricIds {
    plugin: [u32; Counter::ALL.len()],
    live_slots: u32,
    tenants: Vec<[u32; Final::ALL.len()]>,
    rules: Vec<Option<[u32; Final::ALL.len()]>>,
}

struct Root {
    active: Option<Rc<Active>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        let config = match Config::from_json_bytes(&bytes) {
            Ok(c) => c,
            Err(e) => {
                log(LogLevel::Error, &format!("tenant-ratelimit: {e}"));
                return false;
            }
        };
        let Some(default_tenant) = TenantId::new(config.default_tenant.as_bytes()) else {
            log(LogLevel::Error, "tenant-ratelimit: invalid plugin config: field `tenant.default`: invalid");
            return false;
        };
        let root_id =
            self.get_property(vec!["plugin_root_id"]).and_then(|b| String::from_utf8(b).ok()).unwrap_or_default();
        let metrics = match define_metrics(&config) {
            Ok(m) => m,
            Err(status) => {
                log(LogLevel::Error, &format!("tenant-ratelimit: cannot define stats: {status:?}"));
                return false;
            }
        };
        log(
            LogLevel::Info,
            &format!(
                "tenant-ratelimit: configured: capacity {}, {} listed tenants, {} rules, mode {:?}, root id \"{root_id}\"",
                config.default_policy.limit.capacity,
                config.tenants.len(),
                config.rules.len(),
                config.mode
            ),
        );
        // Leases taken under the old config go back before it is replaced.
        if let Some(old) = self.active.take() {
            old.settle();
        }
        let tick = if config.worker_lease > 0 { Duration::from_secs(1) } else { Duration::ZERO };
        let _ = hostcalls::set_tick_period(tick);
        self.active = Some(Rc::new(Active {
            plugin: Plugin { ns: Namespace::new(&root_id), config, default_tenant },
            metrics,
            worker: RefCell::new(Worker::default()),
            batched: RefCell::new(Events::default()),
        }));
        true
    }

    fn on_tick(&mut self) {
        if let Some(active) = &self.active {
            active.settle();
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Without an accepted config Envoy does not use the plugin; if a stream comes anyway
        // it passes through (returning None would make the SDK abort the VM).
        match self.active.clone() {
            Some(active) => Some(Box::new(Filter { active, headers: Headers::default(), waiting: None })),
            None => Some(Box::new(PassThrough)),
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

fn define_metrics(config: &Config) -> Result<MetricIds, Status> {
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
        .rules
        .iter()
        .map(|r| r.name.as_deref().map(|n| scoped("rule", n)).transpose())
        .collect::<Result<_, _>>()?;
    Ok(MetricIds { plugin, live_slots, tenants, rules })
}

/// The HTTP context of a plugin that has no accepted config.
struct PassThrough;

impl Context for PassThrough {}
impl HttpContext for PassThrough {}

struct Filter {
    active: Rc<Active>,
    /// Headers to add to the upstream's response.
    headers: Headers,
    /// A rate-limit service call in flight: its gRPC token and the call.
    waiting: Option<(u32, Call)>,
}

impl Filter {
    /// Applies what the flow decided: counters first, then the request's fate.
    fn apply(&mut self, step: Step) -> Action {
        let active = Rc::clone(&self.active);
        active.count(&step);
        match step.next {
            Next::Continue(headers) => {
                self.headers = headers;
                Action::Continue
            }
            Next::Deny(deny) => {
                send_deny(&active.plugin.config, &deny);
                Action::Pause
            }
            Next::AskService { body, call } => {
                let Some(global) = active.plugin.config.global.as_ref() else { return Action::Continue };
                let timeout = Duration::from_millis(global.timeout_ms);
                let sent = self.dispatch_grpc_call(
                    &global.cluster,
                    rls::SERVICE,
                    rls::METHOD,
                    Vec::new(),
                    Some(&body),
                    timeout,
                );
                match sent {
                    Ok(token) => {
                        self.waiting = Some((token, call));
                        Action::Pause
                    }
                    Err(_) => self.answer(&call, None),
                }
            }
        }
    }

    /// Applies the service's answer (`None`: no answer) to `call`.
    fn answer(&mut self, call: &Call, answer: Option<rls::Answer>) -> Action {
        let active = Rc::clone(&self.active);
        let mut worker = active.worker.try_borrow_mut().ok();
        let step =
            flow::on_service_answer(&active.plugin, worker.as_deref_mut(), &mut HostStore, call, answer, now_ns());
        drop(worker);
        self.apply(step)
    }
}

impl Context for Filter {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        let Some((_, call)) = self.waiting.take_if(|(token, _)| *token == token_id) else { return };
        let answer = if status_code == 0 {
            self.get_grpc_call_response_body(0, response_size).and_then(|b| rls::decode_response(&b))
        } else {
            None
        };
        if self.answer(&call, answer) == Action::Continue {
            let _ = hostcalls::resume_http_request();
        }
    }
}

/// Request facts read lazily from the host; `:path` is read at most once.
struct HostFacts {
    path: Option<Vec<u8>>,
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
struct HostStore;

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

fn now_ns() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let active = Rc::clone(&self.active);
        let mut worker = active.worker.try_borrow_mut().ok();
        let mut facts = HostFacts { path: None };
        let step = flow::on_request(&active.plugin, worker.as_deref_mut(), &mut facts, &mut HostStore, now_ns);
        drop(worker);
        self.apply(step)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let config = &self.active.plugin.config;
        let Headers { quota, service } = std::mem::take(&mut self.headers);
        if let Some((policy, quota)) = quota {
            let name = policy.map_or("global", |id| id.name(config));
            response::rate_limit_headers(config.headers, name, &quota, |n, v| {
                let _ = hostcalls::add_map_value(MapType::HttpResponseHeaders, n, v);
            });
        }
        for (name, value) in service {
            let _ = hostcalls::add_map_value(MapType::HttpResponseHeaders, &name, &value);
        }
        Action::Continue
    }
}

fn increment(id: u32, by: u32) {
    if by > 0 {
        let _ = hostcalls::increment_metric(id, by as i64);
    }
}

fn record(ids: &MetricIds, events: &Events) {
    for (id, n) in ids.plugin.iter().zip(events.counters.iter()) {
        increment(*id, *n);
    }
    increment(ids.live_slots, events.slots_created);
    if let Some((policy, outcome)) = events.named {
        let set = match policy {
            PolicyId::Default => None,
            PolicyId::Tenant(i) => ids.tenants.get(i),
            PolicyId::Rule(i) => ids.rules.get(i).and_then(Option::as_ref),
        };
        if let Some(id) = set.and_then(|s| s.get(outcome as usize)) {
            increment(*id, 1);
        }
    }
}
/// The local reply for a denied request. The request's `content-type` is read only here,
/// on the deny path, to tell a gRPC call (which needs a gRPC status) from plain HTTP.
fn send_deny(config: &Config, deny: &Deny) {
    let denied = Denied {
        why: deny.why,
        retry_after: deny.retry_after,
        policy: deny.policy.map_or("global", |id| id.name(config)),
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
