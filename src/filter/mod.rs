//! The only module that talks to the proxy-wasm host. `abi` is the ABI 0.2.1 itself (imports,
//! the allocation export); `host` implements the flow's `RequestFacts`/`SharedStore` and the
//! stats; here are the callbacks the host calls (the exports) and the state they keep. Per
//! request it reads facts, calls the pure [`flow`], and applies the [`Step`] it returns; it
//! decides nothing.
//!
//! Hot path (headers off, header tenant): `proxy_on_request_headers` (one header read, the
//! clock, one shared-data get and one set), then `proxy_on_response_headers` and
//! `proxy_on_delete`, which return at once when the stream kept no state. No heap allocation
//! is kept per stream unless it needs state past its request headers (response headers to
//! add, a rate-limit service call in flight), and no stats call is made: counters are added up
//! per worker and handed to the host on the tick. Each callback Envoy makes into the module
//! costs about 1,500 instructions, so the ones the filter does not need are not exported and
//! the host skips them: `proxy_on_context_create` (see [`plugin_of`]), `proxy_on_done`,
//! `proxy_on_log`.

mod abi;
mod host;

use crate::config::Config;
use crate::flow::{self, Decided, Headers, Next, Outcome, Plugin, Step, Worker};
use crate::global::Call;
use crate::metrics::Events;
use crate::response;
use crate::rls;
use crate::store::Namespace;
use crate::tenant::TenantId;
use host::{add_request_header, publish_decision, send_deny, HostFacts, HostStore, Stats};
use std::cell::RefCell;
use std::rc::Rc;

/// How often the root context ticks: worker leases go back and counters are flushed.
const TICK_MS: u32 = 1_000;

/// Everything a request needs, built once per configuration and shared by its streams.
struct Active {
    plugin: Plugin,
    stats: RefCell<Stats>,
    worker: RefCell<Worker>,
}

impl Active {
    /// Gives every unspent worker lease back to the shared buckets and flushes the counters.
    fn settle(&self) {
        if let Ok(mut worker) = self.worker.try_borrow_mut() {
            worker.leases.settle(&mut HostStore, &self.plugin.ns, abi::now_ns());
        }
        if let Ok(mut stats) = self.stats.try_borrow_mut() {
            stats.flush();
        }
    }

    fn count(&self, events: &Events) {
        if let Ok(mut stats) = self.stats.try_borrow_mut() {
            stats.add(events);
        }
    }
}

/// A stream that needs state after its request headers.
struct Stream {
    id: u32,
    active: Rc<Active>,
    /// Headers to add to the upstream's response.
    headers: Headers,
    /// A rate-limit service call in flight: its gRPC token and the call.
    waiting: Option<(u32, Call)>,
    /// The decision waiting for the service's answer (`filter_state`).
    decided: Option<Decided>,
}

/// A root context: one per plugin sharing the VM.
struct Root {
    id: u32,
    /// The plugin's `plugin_root_id`, which tells its streams apart when the VM has several.
    root_id: Vec<u8>,
    /// The accepted configuration (`None` until one is).
    active: Option<Rc<Active>>,
}

/// What this VM keeps between callbacks.
struct Vm {
    roots: Vec<Root>,
    /// Streams with state ([`Stream`]); usually empty with headers off.
    streams: Vec<Stream>,
}

thread_local! {
    static VM: RefCell<Vm> = const { RefCell::new(Vm { roots: Vec::new(), streams: Vec::new() }) };
}

/// Runs `f` on the VM state (`None` on a re-entrant call, which the host never makes).
fn vm<R>(f: impl FnOnce(&mut Vm) -> R) -> Option<R> {
    VM.with(|v| v.try_borrow_mut().ok().map(|mut v| f(&mut v)))
}

fn root(id: u32) -> Option<Rc<Active>> {
    vm(|vm| vm.roots.iter().find(|r| r.id == id).and_then(|r| r.active.clone())).flatten()
}

/// The configuration of the plugin a new stream belongs to. The module does not export
/// `proxy_on_context_create` (a callback per stream), so a stream's parent is not announced:
/// with one plugin in the VM (the usual case) it is that one; with several (plugins sharing a
/// VM by `vm_id`) the stream's `plugin_root_id` property tells, at the price of a property
/// read per request.
fn plugin_of() -> Option<Rc<Active>> {
    let only = vm(|vm| match vm.roots.as_slice() {
        [only] => Ok(only.active.clone()),
        _ => Err(()),
    })?;
    match only {
        Ok(active) => active,
        Err(()) => {
            let root_id = abi::property(&["plugin_root_id"]).unwrap_or_default();
            vm(|vm| vm.roots.iter().find(|r| r.root_id == root_id).and_then(|r| r.active.clone())).flatten()
        }
    }
}

/// The ABI version this module speaks.
#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_root: u32, _vm_configuration_size: usize) -> u32 {
    // A panic aborts the VM (panic = "abort"); say why first, at the level operators alert on.
    std::panic::set_hook(Box::new(|info| abi::log(abi::CRITICAL, &format!("tenant-ratelimit: panic: {info}"))));
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(root: u32, size: usize) -> u32 {
    u32::from(configure(root, size))
}

fn configure(root: u32, size: usize) -> bool {
    let bytes = abi::plugin_configuration(size).unwrap_or_default();
    let config = match Config::from_json_bytes(&bytes) {
        Ok(c) => c,
        Err(e) => {
            abi::log(abi::ERROR, &format!("tenant-ratelimit: {e}"));
            return false;
        }
    };
    let Some(default_tenant) = TenantId::new(config.default_tenant.as_bytes()) else {
        abi::log(abi::ERROR, "tenant-ratelimit: invalid plugin config: field `tenant.default`: invalid");
        return false;
    };
    let root_bytes = abi::property(&["plugin_root_id"]).unwrap_or_default();
    let root_id = String::from_utf8(root_bytes.clone()).unwrap_or_default();
    let stats = match Stats::define(&config) {
        Ok(s) => s,
        Err(status) => {
            abi::log(abi::ERROR, &format!("tenant-ratelimit: cannot define stats: status {status}"));
            return false;
        }
    };
    abi::log(
        abi::INFO,
        &format!(
            "tenant-ratelimit: configured: capacity {}, {} listed tenants, {} rules, mode {:?}, root id \"{root_id}\"",
            config.default_policy.limits.first().capacity,
            config.tenants.len(),
            config.rules.len(),
            config.mode
        ),
    );
    // The tick gives worker leases back and flushes counters, so it always runs.
    abi::set_tick_period_ms(TICK_MS);
    let active = Rc::new(Active {
        plugin: Plugin { ns: Namespace::new(&root_id), config, default_tenant },
        stats: RefCell::new(stats),
        worker: RefCell::new(Worker::default()),
    });
    let old = vm(|vm| match vm.roots.iter_mut().find(|r| r.id == root) {
        Some(r) => r.active.replace(active),
        None => {
            vm.roots.push(Root { id: root, root_id: root_bytes, active: Some(active) });
            None
        }
    });
    // Leases taken and counters counted under the old config go back and out.
    if let Some(old) = old.flatten() {
        old.settle();
    }
    true
}

#[no_mangle]
pub extern "C" fn proxy_on_tick(root_id: u32) {
    if let Some(active) = root(root_id) {
        active.settle();
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(id: u32, _num_headers: usize, _end_of_stream: u32) -> u32 {
    // Without an accepted config Envoy does not use the plugin; a stream that comes anyway
    // passes through.
    let Some(active) = plugin_of() else { return abi::CONTINUE };
    let mut worker = active.worker.try_borrow_mut().ok();
    let mut facts = HostFacts { path: None };
    let step = flow::on_request(&active.plugin, worker.as_deref_mut(), &mut facts, &mut HostStore, abi::now_ns);
    drop(worker);
    apply(id, &active, step)
}

/// Keeps state for stream `id`, changed by `f`.
fn keep(id: u32, active: &Rc<Active>, f: impl FnOnce(&mut Stream)) {
    vm(|vm| match vm.streams.iter_mut().find(|s| s.id == id) {
        Some(s) => f(s),
        None => {
            let mut s =
                Stream { id, active: Rc::clone(active), headers: Headers::default(), waiting: None, decided: None };
            f(&mut s);
            vm.streams.push(s);
        }
    });
}

/// Applies what the flow decided for stream `id`: counters first, then the request's fate.
/// Returns the `Action`.
fn apply(id: u32, active: &Rc<Active>, step: Step) -> u32 {
    active.count(&step.events);
    let config = &active.plugin.config;
    if config.filter_state {
        // A service answer settles the decision its call left waiting.
        let decided = step.decided.or_else(|| {
            let waiting = vm(|vm| vm.streams.iter_mut().find(|s| s.id == id).and_then(|s| s.decided.take()));
            waiting.flatten().map(|d| d.settled(&step))
        });
        match decided {
            Some(d) if d.outcome == Outcome::Asking => keep(id, active, |s| s.decided = Some(d)),
            Some(d) => publish_decision(&d.render(config)),
            None => {}
        }
    }
    match step.next {
        Next::Continue(headers) => {
            if let (Some(policy), Some(name)) = (headers.would_deny, &config.shadow_header) {
                add_request_header(name, policy.name(config));
            }
            if headers.quota.is_some() || !headers.service.is_empty() {
                keep(id, active, |s| s.headers = headers);
            }
            abi::CONTINUE
        }
        Next::Deny(deny) => {
            send_deny(&active.plugin.config, &deny);
            abi::PAUSE
        }
        Next::AskService { body, call } => {
            let Some(global) = active.plugin.config.global.as_ref() else { return abi::CONTINUE };
            let timeout = u32::try_from(global.timeout_ms).unwrap_or(u32::MAX);
            match abi::grpc_call(&global.cluster, rls::SERVICE, rls::METHOD, &body, timeout) {
                Ok(token) => {
                    keep(id, active, |s| s.waiting = Some((token, call)));
                    abi::PAUSE
                }
                Err(_) => answer(id, active, &call, None),
            }
        }
    }
}

/// Applies the service's answer (`None`: no answer) to `call` of stream `id`.
fn answer(id: u32, active: &Rc<Active>, call: &Call, answer: Option<rls::Answer>) -> u32 {
    let mut worker = active.worker.try_borrow_mut().ok();
    let step =
        flow::on_service_answer(&active.plugin, worker.as_deref_mut(), &mut HostStore, call, answer, abi::now_ns());
    drop(worker);
    apply(id, active, step)
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(id: u32, _num_headers: usize, _end_of_stream: u32) -> u32 {
    let headers = vm(|vm| {
        let s = vm.streams.iter_mut().find(|s| s.id == id)?;
        Some((Rc::clone(&s.active), std::mem::take(&mut s.headers)))
    });
    let Some((active, Headers { quota, service, .. })) = headers.flatten() else { return abi::CONTINUE };
    let config = &active.plugin.config;
    if let Some((policy, quota)) = quota {
        response::rate_limit_headers(config, policy, &quota, &mut |n, v| {
            let _ = abi::add_header(abi::RESPONSE_HEADERS, n, v);
        });
    }
    for (name, value) in &service {
        let _ = abi::add_header(abi::RESPONSE_HEADERS, name, value);
    }
    abi::CONTINUE
}

/// The call with gRPC `token`, taken from the stream waiting for it, and that stream's id.
/// Found by token (unique per VM), whichever context the host delivers the answer to.
fn take_call(token: u32) -> Option<(u32, Rc<Active>, Call)> {
    vm(|vm| {
        let s = vm.streams.iter_mut().find(|s| s.waiting.as_ref().is_some_and(|(t, _)| *t == token))?;
        let (_, call) = s.waiting.take()?;
        Some((s.id, Rc::clone(&s.active), call))
    })
    .flatten()
}

/// Settles a service call and resumes the stream unless it was answered with a reply.
fn conclude(context: u32, token: u32, read: impl FnOnce() -> Option<rls::Answer>) {
    let Some((id, active, call)) = take_call(token) else { return };
    if context != id {
        abi::set_effective_context(id);
    }
    if answer(id, &active, &call, read()) == abi::CONTINUE {
        abi::continue_request();
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_grpc_receive(context: u32, token: u32, response_size: usize) {
    conclude(context, token, || abi::grpc_receive_buffer(response_size).and_then(|b| rls::decode_response(&b)));
}

/// A unary call closed without a message: failed, timed out, or cancelled.
#[no_mangle]
pub extern "C" fn proxy_on_grpc_close(context: u32, token: u32, _status_code: u32) {
    conclude(context, token, || None);
}

#[no_mangle]
pub extern "C" fn proxy_on_delete(id: u32) {
    let gone = vm(|vm| {
        if let Some(at) = vm.streams.iter().position(|s| s.id == id) {
            vm.streams.swap_remove(at);
        }
        let at = vm.roots.iter().position(|r| r.id == id)?;
        vm.roots.swap_remove(at).active
    });
    // A plugin going away: its leases go back and its counters out.
    if let Some(active) = gone.flatten() {
        active.settle();
    }
}
