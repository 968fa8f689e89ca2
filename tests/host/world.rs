//! What the VMs of one test share, as Envoy's workers share it: shared data (with Envoy's
//! semantics), stats by name, the virtual clock, fault injection and the seeded scheduler.
//! One `World` per test; nothing here is global.

use super::Request;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// proxy-wasm status codes (ABI 0.2.1) the host returns.
pub mod status {
    pub const OK: u32 = 0;
    pub const NOT_FOUND: u32 = 1;
    pub const BAD_ARGUMENT: u32 = 2;
    pub const SERIALIZATION_FAILURE: u32 = 3;
    pub const CAS_MISMATCH: u32 = 8;
    pub const INTERNAL_FAILURE: u32 = 10;
    /// `proxy_grpc_call` with a cluster Envoy does not know.
    pub const PARSE_FAILURE: u32 = 4;
}

/// The virtual clock starts here (2023-11-14), in nanoseconds since the Unix epoch.
pub const T0_NS: u64 = 1_700_000_000_000_000_000;
pub const SEC: u64 = 1_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Debug, Clone)]
pub(crate) struct Metric {
    pub kind: MetricKind,
    /// Counter total, gauge value, or the last value recorded into a histogram.
    pub value: i64,
    pub samples: u64,
}

/// Faults the next shared-data calls will see.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// The next `n` `proxy_set_shared_data` calls return `CasMismatch` and write nothing.
    pub cas_storm: u32,
    /// The next `n` `proxy_set_shared_data` calls return this status and write nothing.
    pub fail_sets: Option<(u32, u32)>,
    /// The next `n` `proxy_get_shared_data` calls return this status.
    pub fail_gets: Option<(u32, u32)>,
}

/// A shared-data call, as seen by hooks and recorded in the trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedOp {
    Get { vm: usize, key: String, status: u32, cas: u32 },
    Set { vm: usize, key: String, cas: u32, status: u32 },
}

/// What the scheduler (or a test's hook) does at an interleaving point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interference {
    /// Another worker rewrites the key with its current bytes: the cas moves on, so the
    /// interrupted VM's pending `set` fails with `CasMismatch`. On a missing key it writes
    /// `bytes` instead.
    ForeignWrite { bytes: Vec<u8> },
    /// Another VM (one that is not busy) runs the next queued request to completion.
    RunQueued,
    /// The virtual clock moves by this many nanoseconds (negative: back), so what runs next
    /// (another VM's request) sees a later instant than the interrupted VM read.
    AdvanceNs(i64),
}

/// Where a VM can be interrupted: right after its `get` returned, or just before its `set`
/// is applied (both lie between one debit's read and its write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    AfterGet,
    BeforeSet,
}

pub type Hook = Box<dyn FnMut(Point, usize, &str) -> Vec<Interference> + Send>;

/// A deterministic interleaver: at each interleaving point it draws from a SplitMix64 seeded
/// by the test, so a failing seed replays exactly.
#[derive(Debug, Clone)]
pub struct Scheduler {
    pub(crate) rng: Rng,
    /// Per mille of interleaving points at which another VM runs a queued request.
    pub run_other_permille: u32,
    /// Per mille of interleaving points at which a foreign write hits the key.
    pub foreign_write_permille: u32,
    /// At most this many interferences per top-level request (keep it below the filter's CAS
    /// attempts unless exhaustion is the point).
    pub max_per_request: u32,
}

impl Scheduler {
    pub fn new(seed: u64) -> Scheduler {
        Scheduler { rng: Rng::new(seed), run_other_permille: 150, foreign_write_permille: 100, max_per_request: 4 }
    }
}

/// SplitMix64: tiny, seedable, good enough to pick interleavings.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn permille(&mut self, p: u32) -> bool {
        self.below(1000) < p as u64
    }
}

/// One finished request, in completion order (nested requests finish inside others).
#[derive(Debug, Clone)]
pub struct Completed {
    pub vm: usize,
    pub label: String,
    pub allowed: bool,
    pub status: Option<u32>,
    /// Run by the scheduler inside another VM's get/set window.
    pub nested: bool,
    pub now_ns: u64,
}

pub(crate) struct Shared {
    pub data: BTreeMap<String, (Vec<u8>, u32)>,
    pub last_cas: u32,
    pub now_ns: u64,
    pub metrics: BTreeMap<String, Metric>,
    pub faults: Faults,
    pub scheduler: Option<Scheduler>,
    pub hook: Option<Hook>,
    pub queue: VecDeque<Request>,
    pub completed: Vec<Completed>,
    pub trace: Option<Vec<SharedOp>>,
    pub sets: u64,
    pub gets: u64,
}

impl Shared {
    /// Envoy's cas counter: increments, skips 0.
    pub fn next_cas(&mut self) -> u32 {
        self.last_cas = self.last_cas.wrapping_add(1);
        if self.last_cas == 0 {
            self.last_cas = 1;
        }
        self.last_cas
    }

    /// `proxy_set_shared_data` as Envoy implements it (faults aside).
    pub fn set(&mut self, key: &str, value: &[u8], cas: u32) -> u32 {
        let current = self.data.get(key).map(|(_, c)| *c);
        if let Some(current) = current {
            if cas != 0 && cas != current {
                return status::CAS_MISMATCH;
            }
        }
        let next = self.next_cas();
        self.data.insert(key.to_string(), (value.to_vec(), next));
        status::OK
    }
}

pub(crate) struct WorldInner {
    pub shared: Mutex<Shared>,
    /// Every VM of this world, for the scheduler to run queued requests on.
    pub vms: Mutex<Vec<Weak<Mutex<super::VmCore>>>>,
}

/// The state shared by the VMs (workers) of one test. Cheap to clone (an `Arc`).
#[derive(Clone)]
pub struct World {
    pub(crate) inner: Arc<WorldInner>,
}

impl Default for World {
    fn default() -> Self {
        World::new()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl World {
    pub fn new() -> World {
        World {
            inner: Arc::new(WorldInner {
                shared: Mutex::new(Shared {
                    data: BTreeMap::new(),
                    last_cas: 0,
                    now_ns: T0_NS,
                    metrics: BTreeMap::new(),
                    faults: Faults::default(),
                    scheduler: None,
                    hook: None,
                    queue: VecDeque::new(),
                    completed: Vec::new(),
                    trace: None,
                    sets: 0,
                    gets: 0,
                }),
                vms: Mutex::new(Vec::new()),
            }),
        }
    }

    pub(crate) fn shared(&self) -> MutexGuard<'_, Shared> {
        lock(&self.inner.shared)
    }

    // --- clock ---

    pub fn now_ns(&self) -> u64 {
        self.shared().now_ns
    }

    pub fn set_time_ns(&self, ns: u64) {
        self.shared().now_ns = ns;
    }

    /// Moves the clock forward (or, with a negative step, backward) by `ns`.
    pub fn advance_ns(&self, ns: i64) {
        let mut s = self.shared();
        s.now_ns = s.now_ns.saturating_add_signed(ns);
    }

    pub fn advance_secs(&self, secs: f64) {
        self.advance_ns((secs * SEC as f64).round() as i64);
    }

    // --- shared data ---

    /// All keys with their bytes and cas.
    pub fn shared_data(&self) -> BTreeMap<String, (Vec<u8>, u32)> {
        self.shared().data.clone()
    }

    pub fn key_count(&self) -> usize {
        self.shared().data.len()
    }

    /// Writes a key as another worker would (Envoy semantics, no faults).
    pub fn set_shared(&self, key: &str, value: &[u8], cas: u32) -> u32 {
        self.shared().set(key, value, cas)
    }

    /// (gets, sets) made by all VMs so far.
    pub fn shared_calls(&self) -> (u64, u64) {
        let s = self.shared();
        (s.gets, s.sets)
    }

    /// Starts recording every shared-data call.
    pub fn trace_shared(&self) {
        self.shared().trace = Some(Vec::new());
    }

    pub fn take_trace(&self) -> Vec<SharedOp> {
        self.shared().trace.as_mut().map(std::mem::take).unwrap_or_default()
    }

    // --- faults ---

    /// The next `k` sets return `CasMismatch`.
    pub fn cas_storm(&self, k: u32) {
        self.shared().faults.cas_storm = k;
    }

    /// The next `n` sets return `status` (e.g. `status::INTERNAL_FAILURE`).
    pub fn fail_sets(&self, n: u32, status: u32) {
        self.shared().faults.fail_sets = Some((n, status));
    }

    /// The next `n` gets return `status`.
    pub fn fail_gets(&self, n: u32, status: u32) {
        self.shared().faults.fail_gets = Some((n, status));
    }

    // --- scheduling ---

    /// Interleaves VMs at every shared-data get/set from now on.
    pub fn set_scheduler(&self, scheduler: Scheduler) {
        self.shared().scheduler = Some(scheduler);
    }

    /// A test's own interleaving: called at each point with (point, vm index, key).
    pub fn set_hook(&self, hook: impl FnMut(Point, usize, &str) -> Vec<Interference> + Send + 'static) {
        self.shared().hook = Some(Box::new(hook));
    }

    /// Queues a request for the scheduler to run inside another VM's window.
    pub fn enqueue(&self, request: Request) {
        self.shared().queue.push_back(request);
    }

    pub fn queued(&self) -> usize {
        self.shared().queue.len()
    }

    pub(crate) fn pop_queued(&self) -> Option<Request> {
        self.shared().queue.pop_front()
    }

    pub(crate) fn push_front_queued(&self, r: Request) {
        self.shared().queue.push_front(r);
    }

    /// Every finished request so far, in completion order.
    pub fn completed(&self) -> Vec<Completed> {
        self.shared().completed.clone()
    }

    pub fn take_completed(&self) -> Vec<Completed> {
        std::mem::take(&mut self.shared().completed)
    }

    // --- stats ---

    /// The module counts per worker and hands its counters to the host on the tick (README
    /// "Stats"): this runs `proxy_on_tick` on every VM not busy in a call now, as the next
    /// tick would, so a read after it sees every request finished so far. The stats reads
    /// below call it; a tick also gives worker leases back, as a real one does.
    pub fn flush_stats(&self) {
        let vms: Vec<_> = lock(&self.inner.vms).iter().filter_map(std::sync::Weak::upgrade).collect();
        for vm in vms {
            if let Ok(mut core) = vm.try_lock() {
                if let Err(e) = core.force_tick() {
                    panic!("VM {}: the tick that flushes stats failed: {e}", core.index);
                }
            }
        }
    }

    /// A counter's or gauge's value by name, summed across VMs (one stat per name, as in
    /// Envoy), after [`World::flush_stats`]; 0 if no VM defined it.
    pub fn metric(&self, name: &str) -> i64 {
        self.flush_stats();
        self.published(name)
    }

    /// What the host has of a stat now, without a flush: what the module handed over so far.
    pub fn published(&self, name: &str) -> i64 {
        self.shared().metrics.get(name).map_or(0, |m| m.value)
    }

    pub fn counter(&self, name: &str) -> u64 {
        u64::try_from(self.metric(name)).unwrap_or(0)
    }

    pub fn metric_kind(&self, name: &str) -> Option<MetricKind> {
        self.shared().metrics.get(name).map(|m| m.kind)
    }

    /// Every defined stat and its value (after [`World::flush_stats`]).
    pub fn metrics(&self) -> BTreeMap<String, i64> {
        self.flush_stats();
        self.shared().metrics.iter().map(|(k, m)| (k.clone(), m.value)).collect()
    }
}
