//! A test-only proxy-wasm host (ABI 0.2.1) that runs the release `tenant_ratelimit.wasm`
//! under wasmtime, so integration tests drive the real module the way Envoy does.
//!
//! # Writing a test
//!
//! ```ignore
//! #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! mod host;
//! use host::{Request, Vm, World};
//!
//! #[test]
//! fn third_request_is_denied() {
//!     let world = World::new();                       // shared data, stats, clock: this test's only
//!     let vm = Vm::new(&world).unwrap();              // one worker; Vm::new again for more
//!     assert!(vm.configure(r#"{"capacity":2,"refill_rate":1}"#).unwrap());
//!     let acme = Request::get("/").tenant("acme");    // x-tenant-id: acme
//!     assert!(vm.request(&acme).unwrap().allowed());
//!     assert!(vm.request(&acme).unwrap().allowed());
//!     let reply = vm.request(&acme).unwrap();
//!     assert_eq!(reply.local_reply.unwrap().status, 429);
//!     world.advance_secs(1.0);                        // the virtual clock
//!     assert_eq!(world.counter("tenant_ratelimit.denied"), 1);
//! }
//! ```
//!
//! `vm.logs()` gives what the module logged (level + message); `Reply` says whether the
//! request continued, the local reply (status, headers, body) and the response headers the
//! filter added. Several `Vm`s on one `World` are Envoy workers sharing one shared-data store
//! and one set of stats; [`Cluster`] runs a workload over them with a seeded [`Scheduler`]
//! that lets another VM run a whole request, or writes the key itself, between one VM's
//! shared-data get and its set. [`World::cas_storm`], [`World::fail_sets`] and
//! [`World::fail_gets`] inject faults. A trap (the module is `panic = "abort"`) or running out
//! of fuel comes back as [`HostError::Trap`], with the module's last log lines.
//!
//! The module counts per worker and publishes its counters on the tick, so every stats read
//! ([`World::counter`], [`World::metric`], [`World::metrics`]) first runs `proxy_on_tick` on
//! each idle VM ([`World::flush_stats`]); [`World::published`] reads without it. Dropping a
//! [`Vm`] deletes its root context, as Envoy does when a plugin goes away.
//! [`Vm::add_plugin`] adds another plugin (root context) to a VM; [`Request::plugin`] sends a
//! request to it.
//!
//! Nothing is global except the compiled module (immutable code, compiled once per test
//! binary); every test has its own `World`, so tests run in parallel.
//!
//! # ABI calls
//!
//! The host refuses (with [`HostError::Refused`], naming the call) a module that imports
//! anything not listed here, so a change of the module's imports cannot silently skip
//! behaviour. As in Envoy, the callbacks `proxy_on_context_create`, `proxy_on_done`,
//! `proxy_on_log`, `proxy_on_grpc_*` and `proxy_on_tick` are called only if exported.
//!
//! Modelled (Envoy's semantics): `proxy_log`, `proxy_get_log_level`,
//! `proxy_get_current_time_nanoseconds` (virtual clock), `proxy_set_tick_period_milliseconds`
//! (recorded), `proxy_get_buffer_bytes` / `proxy_set_buffer_bytes` (plugin and VM
//! configuration, request/response body), `proxy_get_header_map_pairs`,
//! `proxy_set_header_map_pairs`, `proxy_get_header_map_value` (case-insensitive, first value,
//! `NotFound` when absent), `proxy_add_header_map_value`, `proxy_replace_header_map_value`,
//! `proxy_remove_header_map_value` (response maps only exist in the response phase, as in
//! Envoy), `proxy_get_property` / `proxy_set_property` (NUL-separated paths; per-request then
//! per-VM values; `plugin_root_id`, `plugin_name`, `plugin_vm_id` preset), `proxy_get_shared_data`
//! / `proxy_set_shared_data` (Envoy's: missing key `NotFound`, cas counter skips 0, cas 0
//! overwrites, stale cas `CasMismatch`, missing key created whatever the cas, no delete),
//! `proxy_send_local_response`, `proxy_continue_stream`, `proxy_close_stream`, `proxy_done`,
//! `proxy_get_status`, `proxy_set_effective_context`, `proxy_define_metric`,
//! `proxy_increment_metric` (counters: offset must be > 0, as in Envoy), `proxy_record_metric`,
//! `proxy_get_metric`, `proxy_grpc_call` (recorded with cluster, service, method, initial
//! metadata, message and timeout; a test answers it, see "gRPC calls and ticks" below),
//! `proxy_on_grpc_receive` / `proxy_on_grpc_close` / `proxy_on_tick` (called by the host).
//! WASI: `environ_get`, `environ_sizes_get`, `args_get`, `args_sizes_get` (all empty),
//! `fd_write` (captured per VM), `proc_exit` (a trap), `clock_time_get` (virtual clock),
//! `random_get` (seeded).
//!
//! Linked but not modelled (a call traps naming itself; extend `abi.rs` when the filter starts
//! using one): `proxy_http_call`, `proxy_grpc_stream`, `proxy_grpc_send`,
//! `proxy_grpc_cancel`, `proxy_grpc_close`, `proxy_register_shared_queue`,
//! `proxy_resolve_shared_queue`, `proxy_enqueue_shared_queue`, `proxy_dequeue_shared_queue`,
//! `proxy_call_foreign_function`.
//!
//! # gRPC calls and ticks
//!
//! [`Vm::begin`] runs a stream's request phase and keeps the stream open; [`Vm::grpc_calls`]
//! lists the calls it dispatched; [`Vm::answer`] delivers one answer the way Envoy does for a
//! unary `proxy_grpc_call` (Envoy's async client hands a unary call's result over once:
//! success is `proxy_on_grpc_receive(context, token, size)` alone, with the message readable
//! as buffer 5 (`GrpcReceiveBuffer`) during that call; a failure or a timeout is
//! `proxy_on_grpc_close(context, token, grpc_status)` alone: no metadata callbacks);
//! [`Vm::finish`] runs the response phase (if the stream went on or got a local reply), done,
//! log and delete, cancelling calls still outstanding as Envoy's `~Context` does.
//! [`Vm::request_answering`] does all of it with a closure answering each call.
//! [`Vm::fail_grpc_dispatch`] makes the next calls fail to dispatch (`ParseFailure` is
//! Envoy's status for an unknown cluster). [`Vm::tick`] calls `proxy_on_tick` when the
//! period set by `proxy_set_tick_period_milliseconds` has passed on the virtual clock since
//! it was set or since the last tick.
#![allow(dead_code)]

mod abi;
pub mod world;

#[allow(unused_imports)]
pub use world::{status, Completed, Interference, MetricKind, Point, Rng, Scheduler, SharedOp, World, SEC, T0_NS};

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use wasmtime::{Engine, InstancePre, Memory, Module, Store, TypedFunc};
use world::lock;

/// Instructions one guest call may run before it counts as a hang.
const FUEL_PER_CALL: u64 = 2_000_000_000;
/// The root context of the (only) plugin of each VM.
pub const ROOT_CONTEXT: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Critical,
}

impl Level {
    fn from_raw(level: i32) -> Level {
        match level {
            0 => Level::Trace,
            1 => Level::Debug,
            2 => Level::Info,
            3 => Level::Warn,
            4 => Level::Error,
            _ => Level::Critical,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub level: Level,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

#[derive(Debug)]
pub enum HostError {
    /// The module imports a call this host does not implement, or lacks an export it needs.
    Refused(String),
    /// The guest trapped (abort, unreachable, out of fuel, a host call's error).
    Trap {
        message: String,
        logs: Vec<LogLine>,
        stderr: String,
    },
    /// A call on a VM that trapped before.
    Dead(String),
    Setup(String),
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostError::Refused(m) => write!(f, "module refused: {m}"),
            HostError::Trap { message, logs, stderr } => {
                write!(f, "guest trapped: {message}")?;
                for l in logs.iter().rev().take(5).rev() {
                    write!(f, "\n  log {:?}: {}", l.level, l.message)?;
                }
                if !stderr.is_empty() {
                    write!(f, "\n  stderr: {stderr}")?;
                }
                Ok(())
            }
            HostError::Dead(m) => write!(f, "VM is dead after an earlier trap: {m}"),
            HostError::Setup(m) => write!(f, "host setup: {m}"),
        }
    }
}

impl std::error::Error for HostError {}

/// A request as the filter sees it: pseudo-headers and headers, properties (e.g.
/// `source.address`), and the upstream's response headers for the response phase.
#[derive(Debug, Clone)]
pub struct Request {
    /// Free text for grouping results (set by [`Request::tenant`], or [`Request::label`]).
    pub label: String,
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub properties: Vec<(Vec<String>, Vec<u8>)>,
    pub response_headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub end_of_stream: bool,
}

impl Request {
    pub fn new(method: &str, path: impl AsRef<[u8]>) -> Request {
        Request {
            label: String::new(),
            headers: vec![
                (b":method".to_vec(), method.as_bytes().to_vec()),
                (b":path".to_vec(), path.as_ref().to_vec()),
                (b":authority".to_vec(), b"example.test".to_vec()),
                (b":scheme".to_vec(), b"http".to_vec()),
            ],
            properties: Vec::new(),
            response_headers: vec![(b":status".to_vec(), b"200".to_vec())],
            end_of_stream: true,
        }
    }

    pub fn get(path: impl AsRef<[u8]>) -> Request {
        Request::new("GET", path)
    }

    pub fn header(mut self, name: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Request {
        self.headers.push((name.as_ref().to_vec(), value.as_ref().to_vec()));
        self
    }

    /// `x-tenant-id: <id>`, and the label.
    pub fn tenant(self, id: &str) -> Request {
        self.header("x-tenant-id", id).label(id)
    }

    pub fn label(mut self, label: &str) -> Request {
        self.label = label.to_string();
        self
    }

    /// A request to the plugin with this `plugin_root_id` ([`Vm::add_plugin`]), which Envoy
    /// answers per stream.
    pub fn plugin(self, root_id: &str) -> Request {
        self.property(&["plugin_root_id"], root_id)
    }

    /// Envoy's `source.address` (`ip:port`).
    pub fn source(self, address: &str) -> Request {
        self.property(&["source", "address"], address)
    }

    /// Envoy's `xds.route_name`: the name of the route the request matched (Envoy answers it
    /// for every stream that matched a route, with "" for a route without a name).
    pub fn route(self, name: &str) -> Request {
        self.property(&["xds", "route_name"], name)
    }

    pub fn property(mut self, path: &[&str], value: impl AsRef<[u8]>) -> Request {
        self.properties.push((path.iter().map(|s| s.to_string()).collect(), value.as_ref().to_vec()));
        self
    }

    pub fn response_header(mut self, name: &str, value: &str) -> Request {
        self.response_headers.push((name.as_bytes().to_vec(), value.as_bytes().to_vec()));
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub details: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub grpc_status: i32,
}

impl LocalReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// What happened to one HTTP stream.
#[derive(Debug, Clone)]
pub struct Reply {
    pub request_action: Action,
    pub local_reply: Option<LocalReply>,
    /// `None` when the response phase did not run (paused without a local reply).
    pub response_action: Option<Action>,
    /// The response headers after the filter's `on_response_headers` (upstream's, or the
    /// local reply's).
    pub response_headers: Vec<(String, Vec<u8>)>,
    /// What the filter added/replaced in the response headers, in order.
    pub added_response_headers: Vec<(String, String)>,
    pub continue_calls: u32,
    pub close_calls: u32,
    /// The request headers after the filter (what the upstream gets).
    pub request_headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// The stream's properties after the filter, with what it set (`proxy_set_property`,
    /// Envoy's filter state `wasm.<path>`), keyed by NUL-joined path.
    pub properties: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Reply {
    /// A request header as the upstream gets it, as text.
    pub fn upstream_header(&self, name: &str) -> Option<String> {
        self.request_headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    /// A property the filter set on the stream, as text.
    pub fn property(&self, path: &[&str]) -> Option<String> {
        self.properties.get(&property_key(path)).map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// Continued to the upstream with no local reply.
    pub fn allowed(&self) -> bool {
        self.request_action == Action::Continue && self.local_reply.is_none()
    }

    pub fn status(&self) -> Option<u32> {
        self.local_reply.as_ref().map(|r| r.status)
    }

    /// A response header (final map), as text.
    pub fn response_header(&self, name: &str) -> Option<String> {
        self.response_headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    /// `x-ratelimit-remaining` as a number.
    pub fn remaining(&self) -> Option<u64> {
        self.response_header("x-ratelimit-remaining").and_then(|v| v.parse().ok())
    }
}

/// One HTTP stream in flight inside a VM.
#[derive(Debug, Default)]
pub(crate) struct Stream {
    pub id: u32,
    pub request_headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub request_trailers: Vec<(Vec<u8>, Vec<u8>)>,
    pub response_headers: Option<Vec<(Vec<u8>, Vec<u8>)>>,
    pub response_trailers: Vec<(Vec<u8>, Vec<u8>)>,
    pub request_body: Vec<u8>,
    pub response_body: Vec<u8>,
    pub properties: BTreeMap<Vec<u8>, Vec<u8>>,
    pub local_reply: Option<LocalReply>,
    pub added_response_headers: Vec<(String, String)>,
    pub continue_calls: u32,
    pub close_calls: u32,
}

/// The per-VM host state (the wasmtime `Store`'s data).
pub(crate) struct VmState {
    pub world: World,
    pub index: usize,
    pub memory: Option<Memory>,
    pub alloc: Option<TypedFunc<i32, i32>>,
    pub plugin_config: Vec<u8>,
    pub vm_config: Vec<u8>,
    pub properties: BTreeMap<Vec<u8>, Vec<u8>>,
    pub stream: Option<Stream>,
    pub logs: Vec<LogLine>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Metric id - 1 -> name.
    pub metric_ids: Vec<String>,
    pub tick_period_ms: u32,
    pub effective_context: u32,
    /// gRPC calls and answers (see "gRPC calls and ticks").
    pub grpc: GrpcState,
    /// Streams paused between [`Vm::begin`] and [`Vm::finish`], by context id.
    pub parked: BTreeMap<u32, Parked>,
    /// Virtual time the tick period was set or the last tick ran.
    pub tick_since_ns: u64,
    /// Root contexts added by [`Vm::add_plugin`]: (plugin_root_id, context id).
    pub roots: Vec<(String, u32)>,
    /// Interferences the scheduler applied during the current request.
    pub interference: u32,
    pub rng: Rng,
}

/// NUL-joined property path, the key of property maps.
pub(crate) fn property_key(path: &[&str]) -> Vec<u8> {
    path.join("\0").into_bytes()
}

struct Exports {
    /// Optional, as in Envoy (the module then keeps no per-context state of its own).
    on_context_create: Option<TypedFunc<(i32, i32), ()>>,
    on_vm_start: TypedFunc<(i32, i32), i32>,
    on_configure: TypedFunc<(i32, i32), i32>,
    on_request_headers: TypedFunc<(i32, i32, i32), i32>,
    on_response_headers: TypedFunc<(i32, i32, i32), i32>,
    /// Optional, as in Envoy: a callback the module does not export is skipped.
    on_done: Option<TypedFunc<i32, i32>>,
    on_log: Option<TypedFunc<i32, ()>>,
    on_delete: TypedFunc<i32, ()>,
    grpc: GrpcExports,
}

pub(crate) struct VmCore {
    store: Store<VmState>,
    exports: Exports,
    pub index: usize,
    dead: Option<String>,
    next_context: u32,
}

/// A loaded module, checked against the host's calls, ready to instantiate.
pub struct Loaded {
    engine: Engine,
    pre: InstancePre<VmState>,
}

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut config = wasmtime::Config::new();
        config.consume_fuel(true);
        Engine::new(&config).unwrap_or_else(|e| panic!("wasmtime engine: {e}"))
    })
}

/// Where the release module is: `$TENANT_RATELIMIT_WASM`, else under the target directory.
pub fn wasm_path() -> PathBuf {
    if let Ok(p) = std::env::var("TENANT_RATELIMIT_WASM") {
        return PathBuf::from(p);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("wasm32-wasip1/release/tenant_ratelimit.wasm")
}

/// The release module, compiled once per test binary.
pub fn release_module() -> &'static Loaded {
    static MODULE: OnceLock<Loaded> = OnceLock::new();
    MODULE.get_or_init(|| {
        let path = wasm_path();
        let bytes = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "cannot read {}: {e}\nbuild it first: cargo build --release --target wasm32-wasip1 --lib (or make wasm)",
                path.display()
            )
        });
        warn_if_stale(&path);
        Loaded::from_bytes(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    })
}

/// A stale module would test old code: say so loudly (the Makefile builds it before tests).
fn warn_if_stale(wasm: &std::path::Path) {
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let Some(built) = modified(wasm) else { return };
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let newer: Vec<String> = std::fs::read_dir(&src)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| modified(p).is_some_and(|m| m > built))
        .map(|p| p.display().to_string())
        .collect();
    if !newer.is_empty() {
        eprintln!(
            "WARNING: {} is older than {}; rebuild with `make wasm` to test the current source",
            wasm.display(),
            newer.join(", ")
        );
    }
}

impl Loaded {
    /// Compiles `bytes` and checks it: every import must be a call this host implements, and
    /// the proxy-wasm 0.2.1 exports must be there.
    pub fn from_bytes(bytes: &[u8]) -> Result<Loaded, HostError> {
        let engine = engine().clone();
        let module = Module::new(&engine, bytes).map_err(|e| HostError::Setup(format!("compile: {e}")))?;
        let (linker, implemented) = abi::linker(&engine).map_err(|e| HostError::Setup(format!("linker: {e}")))?;
        let missing: Vec<String> = module
            .imports()
            .filter(|i| !implemented.contains(&(i.module().to_string(), i.name().to_string())))
            .map(|i| format!("{}.{}", i.module(), i.name()))
            .collect();
        if !missing.is_empty() {
            return Err(HostError::Refused(format!(
                "it imports host calls this test host does not implement: {}",
                missing.join(", ")
            )));
        }
        for export in [
            "proxy_abi_version_0_2_1",
            "memory",
            "proxy_on_memory_allocate",
            "proxy_on_vm_start",
            "proxy_on_configure",
            "proxy_on_request_headers",
            "proxy_on_response_headers",
            "proxy_on_delete",
        ] {
            if module.get_export(export).is_none() {
                return Err(HostError::Refused(format!("it does not export `{export}`")));
            }
        }
        let pre = linker.instantiate_pre(&module).map_err(|e| HostError::Refused(format!("{e:#}")))?;
        Ok(Loaded { engine, pre })
    }
}

fn trap(state: &VmState, e: &wasmtime::Error) -> HostError {
    HostError::Trap {
        message: format!("{e:#}"),
        logs: state.logs.clone(),
        stderr: String::from_utf8_lossy(&state.stderr).into_owned(),
    }
}

/// A VM going away is Envoy tearing the plugin down: the root context's `proxy_on_delete`
/// (its `proxy_on_done` too, when exported), so the module can flush what it holds.
impl Drop for VmCore {
    fn drop(&mut self) {
        if let Some(done) = self.exports.on_done.clone() {
            let _ = self.guest(|s| done.call(s, ROOT_CONTEXT as i32));
        }
        let delete = self.exports.on_delete.clone();
        let _ = self.guest(|s| delete.call(s, ROOT_CONTEXT as i32));
    }
}

impl VmCore {
    fn new(world: &World, loaded: &Loaded, index: usize) -> Result<VmCore, HostError> {
        let mut properties = BTreeMap::new();
        properties.insert(property_key(&["plugin_root_id"]), b"tenant-ratelimit".to_vec());
        properties.insert(property_key(&["plugin_name"]), b"tenant-ratelimit".to_vec());
        properties.insert(property_key(&["plugin_vm_id"]), b"".to_vec());
        let state = VmState {
            world: world.clone(),
            index,
            memory: None,
            alloc: None,
            plugin_config: Vec::new(),
            vm_config: Vec::new(),
            properties,
            stream: None,
            logs: Vec::new(),
            stdout: Vec::new(),
            stderr: Vec::new(),
            metric_ids: Vec::new(),
            tick_period_ms: 0,
            effective_context: 0,
            grpc: GrpcState::default(),
            parked: BTreeMap::new(),
            tick_since_ns: 0,
            roots: Vec::new(),
            interference: 0,
            rng: Rng::new(0x5eed ^ index as u64),
        };
        let mut store = Store::new(&loaded.engine, state);
        let setup = |e: wasmtime::Error| HostError::Setup(format!("{e:#}"));
        store.set_fuel(FUEL_PER_CALL).map_err(setup)?;
        let instance = loaded.pre.instantiate(&mut store).map_err(|e| trap(store.data(), &e))?;
        let memory =
            instance.get_memory(&mut store, "memory").ok_or_else(|| HostError::Refused("no exported memory".into()))?;
        let alloc = instance.get_typed_func::<i32, i32>(&mut store, "proxy_on_memory_allocate").map_err(setup)?;
        store.data_mut().memory = Some(memory);
        store.data_mut().alloc = Some(alloc);
        let exports = Exports {
            on_context_create: instance.get_typed_func(&mut store, "proxy_on_context_create").ok(),
            on_vm_start: instance.get_typed_func(&mut store, "proxy_on_vm_start").map_err(setup)?,
            on_configure: instance.get_typed_func(&mut store, "proxy_on_configure").map_err(setup)?,
            on_request_headers: instance.get_typed_func(&mut store, "proxy_on_request_headers").map_err(setup)?,
            on_response_headers: instance.get_typed_func(&mut store, "proxy_on_response_headers").map_err(setup)?,
            on_done: instance.get_typed_func(&mut store, "proxy_on_done").ok(),
            on_log: instance.get_typed_func(&mut store, "proxy_on_log").ok(),
            on_delete: instance.get_typed_func(&mut store, "proxy_on_delete").map_err(setup)?,
            grpc: GrpcExports {
                on_receive: instance.get_typed_func(&mut store, "proxy_on_grpc_receive").ok(),
                on_close: instance.get_typed_func(&mut store, "proxy_on_grpc_close").ok(),
                on_tick: instance.get_typed_func(&mut store, "proxy_on_tick").ok(),
            },
        };
        // WASI reactor initialisation (runs the SDK's `main!`), then the root context.
        let init = instance
            .get_typed_func::<(), ()>(&mut store, "_initialize")
            .or_else(|_| instance.get_typed_func::<(), ()>(&mut store, "_start"));
        let mut core = VmCore { store, exports, index, dead: None, next_context: ROOT_CONTEXT + 1 };
        if let Ok(init) = init {
            core.guest(|s| init.call(s, ()))?;
        }
        core.create_context(ROOT_CONTEXT, 0)?;
        let start = core.exports.on_vm_start.clone();
        let size = core.store.data().vm_config.len() as i32;
        let ok = core.guest(|s| start.call(s, (ROOT_CONTEXT as i32, size)))?;
        if ok == 0 {
            return Err(HostError::Setup("proxy_on_vm_start returned false".into()));
        }
        Ok(core)
    }

    /// One top-level guest call with a fresh fuel budget; a trap kills the VM.
    fn guest<R>(&mut self, f: impl FnOnce(&mut Store<VmState>) -> wasmtime::Result<R>) -> Result<R, HostError> {
        if let Some(why) = &self.dead {
            return Err(HostError::Dead(why.clone()));
        }
        let setup = |e: wasmtime::Error| HostError::Setup(format!("{e:#}"));
        self.store.set_fuel(FUEL_PER_CALL).map_err(setup)?;
        match f(&mut self.store) {
            Ok(r) => Ok(r),
            Err(e) => {
                let err = trap(self.store.data(), &e);
                self.dead = Some(format!("{e:#}"));
                Err(err)
            }
        }
    }

    /// `proxy_on_context_create(id, parent)` if the module exports it (Envoy skips it if not).
    fn create_context(&mut self, id: u32, parent: u32) -> Result<(), HostError> {
        let Some(create) = self.exports.on_context_create.clone() else { return Ok(()) };
        self.guest(|s| create.call(s, (id as i32, parent as i32)))
    }

    /// The root context of the plugin a request goes to: the one whose `plugin_root_id` the
    /// request carries as a property ([`Request::plugin`]), else the first.
    fn parent_of(&self, req: &Request) -> u32 {
        let key = vec!["plugin_root_id".to_string()];
        let Some((_, root_id)) = req.properties.iter().find(|(p, _)| *p == key) else { return ROOT_CONTEXT };
        self.store.data().roots.iter().find(|(r, _)| r.as_bytes() == root_id.as_slice()).map_or(ROOT_CONTEXT, |r| r.1)
    }

    /// Another plugin in this VM (Envoy shares a VM between plugins with the same `vm_id` and
    /// code): a new root context with `root_id`, started and configured with `config`.
    fn add_plugin(&mut self, root_id: &str, config: &[u8]) -> Result<(u32, bool), HostError> {
        let root = self.next_context;
        self.next_context += 1;
        let state = self.store.data_mut();
        state.roots.push((root_id.to_string(), root));
        state.properties.insert(property_key(&["plugin_root_id"]), root_id.as_bytes().to_vec());
        state.plugin_config = config.to_vec();
        self.create_context(root, 0)?;
        let (start, f) = (self.exports.on_vm_start.clone(), self.exports.on_configure.clone());
        let vm_size = self.store.data().vm_config.len() as i32;
        self.guest(|s| start.call(s, (root as i32, vm_size)))?;
        let size = config.len() as i32;
        let ok = self.guest(|s| f.call(s, (root as i32, size)))? != 0;
        Ok((root, ok))
    }

    fn configure(&mut self, config: &[u8]) -> Result<bool, HostError> {
        self.store.data_mut().plugin_config = config.to_vec();
        let f = self.exports.on_configure.clone();
        let size = config.len() as i32;
        Ok(self.guest(|s| f.call(s, (ROOT_CONTEXT as i32, size)))? != 0)
    }

    /// A new stream for `req`, made current: its context id and request header count.
    fn open_stream(&mut self, req: &Request) -> (u32, i32) {
        let id = self.next_context;
        self.next_context += 1;
        let mut stream = Stream { id, request_headers: req.headers.clone(), ..Stream::default() };
        for (path, value) in &req.properties {
            let path: Vec<&str> = path.iter().map(String::as_str).collect();
            stream.properties.insert(property_key(&path), value.clone());
        }
        let n_headers = stream.request_headers.len() as i32;
        let state = self.store.data_mut();
        state.stream = Some(stream);
        state.interference = 0;
        (id, n_headers)
    }

    pub(crate) fn run_request(&mut self, req: &Request, nested: bool) -> Result<Reply, HostError> {
        let (id, n_headers) = self.open_stream(req);
        let e = &self.exports;
        let on_req = e.on_request_headers.clone();
        let ctx = id as i32;
        self.create_context(id, self.parent_of(req))?;
        let eos = i32::from(req.end_of_stream);
        let request_action = action(self.guest(|s| on_req.call(s, (ctx, n_headers, eos)))?);

        self.respond(ctx, req, request_action, request_action == Action::Continue, nested)
    }

    /// The end of a stream whose request phase is over (`went_on`: it went to the upstream):
    /// the response phase, with the upstream's headers or the local reply's (Envoy encodes a
    /// local reply through the filter chain too), then done, log and delete; the outcome is
    /// recorded in the world.
    fn respond(
        &mut self,
        ctx: i32,
        req: &Request,
        request_action: Action,
        went_on: bool,
        nested: bool,
    ) -> Result<Reply, HostError> {
        let local = self.store.data().stream.as_ref().and_then(|s| s.local_reply.clone());
        let response = match (&local, went_on) {
            (Some(l), _) => {
                let mut h = vec![(b":status".to_vec(), l.status.to_string().into_bytes())];
                h.extend(l.headers.iter().map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec())));
                Some(h)
            }
            (None, true) => Some(req.response_headers.clone()),
            (None, false) => None,
        };
        let e = &self.exports;
        let (on_resp, done, log, delete) =
            (e.on_response_headers.clone(), e.on_done.clone(), e.on_log.clone(), e.on_delete.clone());
        let mut response_action = None;
        if let Some(headers) = response {
            let n = headers.len() as i32;
            if let Some(s) = self.store.data_mut().stream.as_mut() {
                s.response_headers = Some(headers);
            }
            response_action = Some(action(self.guest(|s| on_resp.call(s, (ctx, n, 1)))?));
        }
        if let Some(done) = done {
            self.guest(|s| done.call(s, ctx))?;
        }
        if let Some(log) = log {
            self.guest(|s| log.call(s, ctx))?;
        }
        self.guest(|s| delete.call(s, ctx))?;

        let stream = self.store.data_mut().stream.take().unwrap_or_default();
        let reply = Reply {
            request_action,
            local_reply: stream.local_reply,
            response_action,
            response_headers: stream
                .response_headers
                .unwrap_or_default()
                .into_iter()
                .map(|(n, v)| (String::from_utf8_lossy(&n).into_owned(), v))
                .collect(),
            added_response_headers: stream.added_response_headers,
            continue_calls: stream.continue_calls,
            close_calls: stream.close_calls,
            request_headers: stream.request_headers,
            properties: stream.properties,
        };
        let world = self.store.data().world.clone();
        let mut shared = world.shared();
        let now_ns = shared.now_ns;
        shared.completed.push(Completed {
            vm: self.index,
            label: req.label.clone(),
            allowed: reply.local_reply.is_none() && went_on,
            status: reply.status(),
            nested,
            now_ns,
        });
        drop(shared);
        Ok(reply)
    }
}

fn action(raw: i32) -> Action {
    if raw == 0 {
        Action::Continue
    } else {
        Action::Pause
    }
}

/// One VM instance (an Envoy worker) of the module, on a [`World`].
#[derive(Clone)]
pub struct Vm {
    core: Arc<Mutex<VmCore>>,
    pub world: World,
    pub index: usize,
}

impl Vm {
    /// Instantiates the release module on `world` and starts it (`_initialize`, root context,
    /// `proxy_on_vm_start`).
    pub fn new(world: &World) -> Result<Vm, HostError> {
        Vm::with_module(world, release_module())
    }

    pub fn with_module(world: &World, loaded: &Loaded) -> Result<Vm, HostError> {
        let mut vms = lock(&world.inner.vms);
        let index = vms.len();
        let core = Arc::new(Mutex::new(VmCore::new(world, loaded, index)?));
        vms.push(Arc::downgrade(&core));
        Ok(Vm { core, world: world.clone(), index })
    }

    /// A VM with `config` applied; panics if the module refuses it.
    pub fn configured(world: &World, config: &str) -> Vm {
        let vm = Vm::new(world).unwrap_or_else(|e| panic!("{e}"));
        match vm.configure(config) {
            Ok(true) => vm,
            Ok(false) => panic!("config refused: {config}\nlogs: {:?}", vm.logs()),
            Err(e) => panic!("{e}"),
        }
    }

    fn core(&self) -> std::sync::MutexGuard<'_, VmCore> {
        lock(&self.core)
    }

    /// `proxy_on_configure` with this plugin configuration: whether the module accepted it.
    pub fn configure(&self, config: &str) -> Result<bool, HostError> {
        self.configure_bytes(config.as_bytes())
    }

    pub fn configure_bytes(&self, config: &[u8]) -> Result<bool, HostError> {
        self.core().configure(config)
    }

    /// Runs one HTTP stream: context create, request headers, response headers (if the
    /// request continued or a local reply was sent), done, log, delete.
    pub fn request(&self, req: &Request) -> Result<Reply, HostError> {
        self.core().run_request(req, false)
    }

    /// Adds a plugin with `root_id` and `config` to this VM (see [`VmCore::add_plugin`]):
    /// whether it accepted the config. Its requests carry [`Request::plugin`].
    pub fn add_plugin(&self, root_id: &str, config: &str) -> Result<bool, HostError> {
        Ok(self.core().add_plugin(root_id, config.as_bytes())?.1)
    }

    /// Sets a VM-wide property (e.g. `plugin_root_id`, before `configure`).
    pub fn set_property(&self, path: &[&str], value: impl AsRef<[u8]>) {
        self.core().store.data_mut().properties.insert(property_key(path), value.as_ref().to_vec());
    }

    pub fn logs(&self) -> Vec<LogLine> {
        self.core().store.data().logs.clone()
    }

    pub fn take_logs(&self) -> Vec<LogLine> {
        std::mem::take(&mut self.core().store.data_mut().logs)
    }

    /// What the module wrote to stdout and stderr through WASI.
    pub fn output(&self) -> (String, String) {
        let core = self.core();
        let s = core.store.data();
        (String::from_utf8_lossy(&s.stdout).into_owned(), String::from_utf8_lossy(&s.stderr).into_owned())
    }

    pub fn is_dead(&self) -> bool {
        self.core().dead.is_some()
    }

    pub fn tick_period_ms(&self) -> u32 {
        self.core().store.data().tick_period_ms
    }
}

/// A step of a [`Cluster`] workload.
#[derive(Debug, Clone)]
pub enum Step {
    Request(Request),
    /// Moves the virtual clock forward.
    AdvanceNs(u64),
}

/// N workers on one world, driven by a seeded scheduler.
pub struct Cluster {
    pub world: World,
    pub vms: Vec<Vm>,
}

impl Cluster {
    /// `n` VMs, each configured with `config` (panics if refused).
    pub fn new(n: usize, config: &str) -> Cluster {
        let world = World::new();
        let vms = (0..n).map(|_| Vm::configured(&world, config)).collect();
        Cluster { world, vms }
    }

    /// Runs the workload. Requests between two clock steps are queued together; each is
    /// started on a VM the scheduler picks, and while it runs, the scheduler may run further
    /// queued requests on other VMs between its get and set, or write its key. Returns the
    /// finished requests in completion order.
    pub fn run(&self, steps: &[Step], scheduler: Scheduler) -> Result<Vec<Completed>, HostError> {
        let world = &self.world;
        world.set_scheduler(scheduler);
        world.take_completed();
        let mut i = 0;
        while i < steps.len() {
            match &steps[i] {
                Step::AdvanceNs(ns) => {
                    world.advance_ns(i64::try_from(*ns).unwrap_or(i64::MAX));
                    i += 1;
                }
                Step::Request(_) => {
                    while let Some(Step::Request(r)) = steps.get(i) {
                        world.enqueue(r.clone());
                        i += 1;
                    }
                    while let Some(r) = world.pop_queued() {
                        let pick = {
                            let mut s = world.shared();
                            let n = self.vms.len() as u64;
                            s.scheduler.as_mut().map_or(0, |sch| sch.rng.below(n)) as usize
                        };
                        self.vms[pick].request(&r)?;
                    }
                }
            }
        }
        Ok(world.take_completed())
    }
}

// ---- gRPC calls and ticks ----

/// The optional exports the gRPC and tick callbacks go to.
struct GrpcExports {
    on_receive: Option<TypedFunc<(i32, i32, i32), ()>>,
    on_close: Option<TypedFunc<(i32, i32, i32), ()>>,
    on_tick: Option<TypedFunc<i32, ()>>,
}

/// One `proxy_grpc_call` the module made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcCall {
    pub token: u32,
    /// The context that made it (the HTTP stream's id).
    pub context: u32,
    pub cluster: String,
    pub service: String,
    pub method: String,
    pub initial_metadata: Vec<(Vec<u8>, Vec<u8>)>,
    pub message: Vec<u8>,
    pub timeout_ms: u32,
}

/// How a test answers a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcAnswer {
    /// The service answered this message (gRPC status OK).
    Message(Vec<u8>),
    /// The call failed with this gRPC status (14 UNAVAILABLE, 13 INTERNAL, ...).
    Status(u32),
    /// `timeout_ms` passed: Envoy closes the call with DEADLINE_EXCEEDED.
    Timeout,
}

pub const GRPC_DEADLINE_EXCEEDED: u32 = 4;

#[derive(Debug, Default)]
pub(crate) struct GrpcState {
    pub next_token: u32,
    /// Dispatched, not answered yet.
    pub outstanding: Vec<GrpcCall>,
    /// Every call dispatched, in order.
    pub log: Vec<GrpcCall>,
    /// The message of the answer being delivered (buffer type 5).
    pub receive: Option<Vec<u8>>,
    /// (calls left, status): make the next calls fail to dispatch.
    pub dispatch_fail: Option<(u32, u32)>,
}

/// A stream between [`Vm::begin`] and [`Vm::finish`].
#[derive(Debug)]
pub(crate) struct Parked {
    stream: Stream,
    request: Request,
    request_action: Action,
}

/// The request phase of a stream left open by [`Vm::begin`].
#[derive(Debug, Clone)]
pub struct Started {
    pub id: u32,
    pub request_action: Action,
    pub local_reply: Option<LocalReply>,
}

impl Reply {
    /// Went to the upstream: continued at once, or resumed later (after a gRPC answer),
    /// with no local reply.
    pub fn passed(&self) -> bool {
        self.local_reply.is_none() && (self.request_action == Action::Continue || self.continue_calls > 0)
    }
}

impl VmCore {
    fn begin(&mut self, req: &Request) -> Result<Started, HostError> {
        let (id, n_headers) = self.open_stream(req);
        let on_req = self.exports.on_request_headers.clone();
        let ctx = id as i32;
        self.create_context(id, self.parent_of(req))?;
        let eos = i32::from(req.end_of_stream);
        let request_action = action(self.guest(|s| on_req.call(s, (ctx, n_headers, eos)))?);
        let state = self.store.data_mut();
        let stream = state.stream.take().unwrap_or_default();
        let local_reply = stream.local_reply.clone();
        state.parked.insert(id, Parked { stream, request: req.clone(), request_action });
        Ok(Started { id, request_action, local_reply })
    }

    /// Runs `f` with parked stream `id` as the current stream.
    fn on_stream<R>(&mut self, id: u32, f: impl FnOnce(&mut VmCore) -> Result<R, HostError>) -> Result<R, HostError> {
        let Some(parked) = self.store.data_mut().parked.remove(&id) else {
            return Err(HostError::Setup(format!("no open stream {id}")));
        };
        let Parked { stream, request, request_action } = parked;
        self.store.data_mut().stream = Some(stream);
        let out = f(self);
        let state = self.store.data_mut();
        if let Some(stream) = state.stream.take() {
            state.parked.insert(id, Parked { stream, request, request_action });
        }
        out
    }

    fn answer(&mut self, token: u32, answer: GrpcAnswer) -> Result<(), HostError> {
        let outstanding = &mut self.store.data_mut().grpc.outstanding;
        let Some(at) = outstanding.iter().position(|c| c.token == token) else {
            return Err(HostError::Setup(format!("no outstanding gRPC call {token}")));
        };
        let call = outstanding.remove(at);
        let (ctx, tok) = (call.context as i32, token as i32);
        let receive = self.exports.grpc.on_receive.clone();
        let close = self.exports.grpc.on_close.clone();
        let deliver = move |core: &mut VmCore| -> Result<(), HostError> {
            match answer {
                GrpcAnswer::Message(bytes) => {
                    let Some(f) = receive else { return Err(HostError::Refused("no proxy_on_grpc_receive".into())) };
                    let size = bytes.len() as i32;
                    core.store.data_mut().grpc.receive = Some(bytes);
                    let r = core.guest(|s| f.call(s, (ctx, tok, size)));
                    core.store.data_mut().grpc.receive = None;
                    r
                }
                GrpcAnswer::Status(code) => {
                    let Some(f) = close else { return Err(HostError::Refused("no proxy_on_grpc_close".into())) };
                    core.guest(|s| f.call(s, (ctx, tok, code as i32)))
                }
                GrpcAnswer::Timeout => {
                    let Some(f) = close else { return Err(HostError::Refused("no proxy_on_grpc_close".into())) };
                    core.guest(|s| f.call(s, (ctx, tok, GRPC_DEADLINE_EXCEEDED as i32)))
                }
            }
        };
        if call.context == ROOT_CONTEXT {
            deliver(self)
        } else {
            self.on_stream(call.context, deliver)
        }
    }

    fn finish(&mut self, id: u32) -> Result<Reply, HostError> {
        // Envoy cancels a context's outstanding calls when the stream goes away.
        self.store.data_mut().grpc.outstanding.retain(|c| c.context != id);
        let Some(parked) = self.store.data_mut().parked.remove(&id) else {
            return Err(HostError::Setup(format!("no open stream {id}")));
        };
        let Parked { stream, request, request_action } = parked;
        let went_on = request_action == Action::Continue || stream.continue_calls > 0;
        self.store.data_mut().stream = Some(stream);
        self.respond(id as i32, &request, request_action, went_on, false)
    }

    /// `proxy_on_tick` now, whatever the period (a VM without an accepted config, or dead,
    /// is skipped): [`World::flush_stats`].
    pub(crate) fn force_tick(&mut self) -> Result<(), HostError> {
        let Some(f) = self.exports.grpc.on_tick.clone() else { return Ok(()) };
        if self.dead.is_some() || self.store.data().tick_period_ms == 0 {
            return Ok(());
        }
        self.guest(|s| f.call(s, ROOT_CONTEXT as i32))?;
        Ok(())
    }

    fn tick(&mut self) -> Result<bool, HostError> {
        let state = self.store.data();
        let period = u64::from(state.tick_period_ms) * 1_000_000;
        let now = state.world.now_ns();
        if period == 0 || now.saturating_sub(state.tick_since_ns) < period {
            return Ok(false);
        }
        let Some(f) = self.exports.grpc.on_tick.clone() else {
            return Err(HostError::Refused("no proxy_on_tick".into()));
        };
        self.store.data_mut().tick_since_ns = now;
        self.guest(|s| f.call(s, ROOT_CONTEXT as i32))?;
        Ok(true)
    }
}

impl Vm {
    /// Runs a stream's request phase and leaves it open (for gRPC answers); [`Vm::finish`]
    /// closes it.
    pub fn begin(&self, req: &Request) -> Result<Started, HostError> {
        self.core().begin(req)
    }

    /// Outstanding (dispatched, unanswered) gRPC calls, oldest first.
    pub fn grpc_calls(&self) -> Vec<GrpcCall> {
        self.core().store.data().grpc.outstanding.clone()
    }

    /// Every gRPC call dispatched so far, answered or not.
    pub fn grpc_log(&self) -> Vec<GrpcCall> {
        self.core().store.data().grpc.log.clone()
    }

    /// Delivers the answer to call `token` to the context that made it.
    pub fn answer(&self, token: u32, answer: GrpcAnswer) -> Result<(), HostError> {
        self.core().answer(token, answer)
    }

    /// The response phase (when the stream went on or got a local reply), done, log, delete.
    pub fn finish(&self, id: u32) -> Result<Reply, HostError> {
        self.core().finish(id)
    }

    /// One whole stream, answering each gRPC call it makes with `answer`.
    pub fn request_answering(
        &self,
        req: &Request,
        mut answer: impl FnMut(&GrpcCall) -> GrpcAnswer,
    ) -> Result<Reply, HostError> {
        let started = self.begin(req)?;
        loop {
            let call = self.grpc_calls().into_iter().find(|c| c.context == started.id);
            let Some(call) = call else { break };
            let a = answer(&call);
            self.answer(call.token, a)?;
        }
        self.finish(started.id)
    }

    /// The next `calls` `proxy_grpc_call`s return `status` (e.g. `status::PARSE_FAILURE`).
    pub fn fail_grpc_dispatch(&self, calls: u32, status: u32) {
        self.core().store.data_mut().grpc.dispatch_fail = Some((calls, status));
    }

    /// `proxy_on_tick`, if the tick period has passed on the virtual clock: whether it ran.
    pub fn tick(&self) -> Result<bool, HostError> {
        self.core().tick()
    }
}
