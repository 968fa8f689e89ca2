//! The only module that talks to the proxy-wasm host (with its `host` half): reads the
//! config once per `on_configure`; per request it reads facts, calls the pure [`flow`], and
//! applies the [`Step`] it returns (headers, a deny reply, a service call, counters). Host
//! calls on the hot path (headers off, header tenant): one header read, one shared-data get,
//! one set, one counter increment.

mod host;

use crate::config::Config;
use crate::flow::{self, Decided, Headers, Next, Outcome, Plugin, Step, Worker};
use crate::global::Call;
use crate::metrics::Events;
use crate::policy::PolicyId;
use crate::response;
use crate::rls;
use crate::store::Namespace;
use crate::tenant::TenantId;
use host::{
    add_request_header, define_metrics, now_ns, publish_decision, record, send_deny, HostFacts, HostStore, MetricIds,
};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

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
                config.default_policy.limits.first().capacity,
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
            Some(active) => {
                Some(Box::new(Filter { active, headers: Headers::default(), waiting: None, decided: None }))
            }
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
    /// The decision waiting for the service's answer (`filter_state`).
    decided: Option<Decided>,
}

impl Filter {
    /// Applies what the flow decided: counters first, then the request's fate.
    fn apply(&mut self, step: Step) -> Action {
        let active = Rc::clone(&self.active);
        active.count(&step);
        let config = &active.plugin.config;
        // A service answer settles the decision its call left waiting.
        let decided = step.decided.or_else(|| self.decided.take().map(|d| d.settled(&step)));
        match decided {
            Some(d) if d.outcome == Outcome::Asking => self.decided = Some(d),
            Some(d) => publish_decision(&d.render(config)),
            None => {}
        }
        match step.next {
            Next::Continue(headers) => {
                if let (Some(policy), Some(name)) = (headers.would_deny, &config.shadow_header) {
                    add_request_header(name, policy.name(config));
                }
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
        let Headers { quota, service, .. } = std::mem::take(&mut self.headers);
        if let Some((policy, quota)) = quota {
            response::rate_limit_headers(config, policy, &quota, &mut |n, v| {
                let _ = hostcalls::add_map_value(MapType::HttpResponseHeaders, n, v);
            });
        }
        for (name, value) in service {
            let _ = hostcalls::add_map_value(MapType::HttpResponseHeaders, &name, &value);
        }
        Action::Continue
    }
}
