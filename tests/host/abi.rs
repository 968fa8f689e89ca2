//! The host calls: proxy-wasm ABI 0.2.1 (module `env`) and the WASI preview1 calls the
//! module needs. Argument and return-pointer layouts follow proxy-wasm-rust-sdk's
//! `hostcalls.rs`; statuses follow Envoy (proxy-wasm-cpp-host).

use super::world::{lock, status, Interference, Metric, MetricKind, Point, SharedOp};
use super::{LocalReply, VmState, World};
use std::collections::BTreeSet;
use std::sync::{Arc, Weak};
use wasmtime::{bail, Caller, Engine, IntoFunc, Linker, Result};

type C<'a> = Caller<'a, VmState>;

/// The linker with every host call, and the (module, name) pairs it defines.
/// (module, name) of every host call defined.
pub(crate) type Names = BTreeSet<(String, String)>;

pub(crate) fn linker(engine: &Engine) -> Result<(Linker<VmState>, Names)> {
    let mut d = Defs { linker: Linker::new(engine), names: BTreeSet::new() };
    proxy(&mut d)?;
    grpc(&mut d)?;
    unmodelled(&mut d)?;
    wasi(&mut d)?;
    Ok((d.linker, d.names))
}

struct Defs {
    linker: Linker<VmState>,
    names: Names,
}

impl Defs {
    fn def<P, A>(&mut self, module: &str, name: &str, f: impl IntoFunc<VmState, P, A>) -> Result<()> {
        self.linker.func_wrap(module, name, f)?;
        self.names.insert((module.to_string(), name.to_string()));
        Ok(())
    }

    fn env<P, A>(&mut self, name: &str, f: impl IntoFunc<VmState, P, A>) -> Result<()> {
        self.def("env", name, f)
    }
}

// ---- guest memory ----

fn memory(c: &C) -> Result<wasmtime::Memory> {
    match c.data().memory {
        Some(m) => Ok(m),
        None => bail!("test host: guest memory not available yet"),
    }
}

fn read(c: &C, ptr: i32, len: i32) -> Result<Vec<u8>> {
    let mem = memory(c)?;
    let (start, len) = (ptr as u32 as usize, len as u32 as usize);
    match start.checked_add(len).and_then(|end| mem.data(c).get(start..end)) {
        Some(bytes) => Ok(bytes.to_vec()),
        None => bail!("test host: guest passed out-of-bounds memory ({start:#x}, {len} bytes)"),
    }
}

fn read_str(c: &C, ptr: i32, len: i32) -> Result<String> {
    Ok(String::from_utf8_lossy(&read(c, ptr, len)?).into_owned())
}

fn write(c: &mut C, ptr: i32, bytes: &[u8]) -> Result<()> {
    let mem = memory(c)?;
    let start = ptr as u32 as usize;
    match start.checked_add(bytes.len()).and_then(|end| mem.data_mut(&mut *c).get_mut(start..end)) {
        Some(dst) => {
            dst.copy_from_slice(bytes);
            Ok(())
        }
        None => bail!("test host: return pointer out of bounds ({start:#x}, {} bytes)", bytes.len()),
    }
}

fn write_u32(c: &mut C, ptr: i32, v: u32) -> Result<()> {
    write(c, ptr, &v.to_le_bytes())
}

fn write_u64(c: &mut C, ptr: i32, v: u64) -> Result<()> {
    write(c, ptr, &v.to_le_bytes())
}

/// Copies `bytes` into guest memory allocated by `proxy_on_memory_allocate` and stores the
/// pointer and size at the return pointers (empty: null, 0, as Envoy does).
fn copy_out(c: &mut C, bytes: &[u8], ptr_ptr: i32, size_ptr: i32) -> Result<()> {
    let mut addr = 0;
    if !bytes.is_empty() {
        let Some(alloc) = c.data().alloc.clone() else { bail!("test host: no proxy_on_memory_allocate") };
        let len = i32::try_from(bytes.len())?;
        addr = alloc.call(&mut *c, len)?;
        if addr == 0 {
            bail!("test host: proxy_on_memory_allocate({len}) returned null");
        }
        write(c, addr, bytes)?;
    }
    write_u32(c, ptr_ptr, addr as u32)?;
    write_u32(c, size_ptr, bytes.len() as u32)
}

// ---- header maps ----

type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// u32 count, count x (u32 key len, u32 value len), then each key and value + NUL.
pub(crate) fn serialize_map(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

pub(crate) fn deserialize_map(bytes: &[u8]) -> Option<Pairs> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let word =
        |at: usize| -> Option<usize> { Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize) };
    let n = word(0)?;
    let mut p = 4usize.checked_add(n.checked_mul(8)?)?;
    let mut out = Vec::with_capacity(n.min(1024));
    for i in 0..n {
        let (kl, vl) = (word(4 + i * 8)?, word(8 + i * 8)?);
        let k = bytes.get(p..p.checked_add(kl)?)?.to_vec();
        p += kl + 1;
        let v = bytes.get(p..p.checked_add(vl)?)?.to_vec();
        p += vl + 1;
        out.push((k, v));
    }
    Some(out)
}

/// The header map of `map_type` in the current stream; `None` where Envoy has none (no
/// stream, a response map before the response phase, gRPC and callout maps).
fn map_mut(state: &mut VmState, map_type: i32) -> Option<&mut Pairs> {
    let s = state.stream.as_mut()?;
    match map_type {
        0 => Some(&mut s.request_headers),
        1 => Some(&mut s.request_trailers),
        2 => s.response_headers.as_mut(),
        3 => s.response_headers.is_some().then_some(&mut s.response_trailers),
        _ => None,
    }
}

fn same_name(a: &[u8], b: &[u8]) -> bool {
    a.eq_ignore_ascii_case(b)
}

fn note_response_header(state: &mut VmState, map_type: i32, key: &[u8], value: &[u8]) {
    if map_type == 2 {
        if let Some(s) = state.stream.as_mut() {
            s.added_response_headers
                .push((String::from_utf8_lossy(key).into_owned(), String::from_utf8_lossy(value).into_owned()));
        }
    }
}

// ---- shared data: interleaving ----

/// Runs the test's hook and the scheduler at an interleaving point of VM `c`.
fn interleave(c: &mut C, point: Point, key: &str) -> Result<()> {
    let world = c.data().world.clone();
    let vm = c.data().index;
    let used = c.data().interference;
    let actions = {
        let mut s = world.shared();
        let mut out = Vec::new();
        if let Some(hook) = s.hook.as_mut() {
            out.extend(hook(point, vm, key));
        }
        let exists = s.data.contains_key(key);
        let queued = !s.queue.is_empty();
        if let Some(sch) = s.scheduler.as_mut() {
            if used < sch.max_per_request {
                let (run, write) = (sch.run_other_permille, sch.foreign_write_permille);
                if queued && sch.rng.permille(run) {
                    out.push(Interference::RunQueued);
                } else if exists && point == Point::BeforeSet && sch.rng.permille(write) {
                    out.push(Interference::ForeignWrite { bytes: Vec::new() });
                }
            }
        }
        out
    };
    for a in actions {
        c.data_mut().interference += 1;
        match a {
            Interference::ForeignWrite { bytes } => {
                let mut s = world.shared();
                let value = s.data.get(key).map(|(v, _)| v.clone()).unwrap_or(bytes);
                s.set(key, &value, 0);
            }
            Interference::RunQueued => run_queued_elsewhere(&world, vm)?,
            Interference::AdvanceNs(ns) => world.advance_ns(ns),
        }
    }
    Ok(())
}

/// Runs the next queued request on a VM other than `me` that is not busy (every VM up the
/// current call stack is); puts it back if there is none.
fn run_queued_elsewhere(world: &World, me: usize) -> Result<()> {
    let Some(req) = world.pop_queued() else { return Ok(()) };
    let vms: Vec<Arc<_>> = lock(&world.inner.vms).iter().filter_map(Weak::upgrade).collect();
    let n = vms.len();
    let start = world.shared().scheduler.as_mut().map_or(0, |s| s.rng.below(n as u64) as usize);
    for i in 0..n {
        let Some(vm) = vms.get((start + i) % n) else { continue };
        let Ok(mut core) = vm.try_lock() else { continue };
        if core.index == me {
            continue;
        }
        return match core.run_request(&req, true) {
            Ok(_) => Ok(()),
            Err(e) => bail!("a request run on VM {} inside VM {me}'s shared-data window failed: {e}", core.index),
        };
    }
    world.push_front_queued(req);
    Ok(())
}

fn trace(world: &World, op: SharedOp) {
    if let Some(t) = world.shared().trace.as_mut() {
        t.push(op);
    }
}

// ---- proxy-wasm calls ----

fn proxy(d: &mut Defs) -> Result<()> {
    d.env("proxy_log", |mut c: C, level: i32, ptr: i32, len: i32| -> Result<i32> {
        let message = read_str(&c, ptr, len)?;
        c.data_mut().logs.push(super::LogLine { level: super::Level::from_raw(level), message });
        Ok(status::OK as i32)
    })?;
    d.env("proxy_get_log_level", |mut c: C, ptr: i32| -> Result<i32> {
        write_u32(&mut c, ptr, 0)?; // trace: the host records everything
        Ok(status::OK as i32)
    })?;
    d.env("proxy_get_current_time_nanoseconds", |mut c: C, ptr: i32| -> Result<i32> {
        let now = c.data().world.now_ns();
        write_u64(&mut c, ptr, now)?;
        Ok(status::OK as i32)
    })?;
    d.env("proxy_set_tick_period_milliseconds", |mut c: C, ms: i32| -> Result<i32> {
        c.data_mut().tick_period_ms = ms as u32;
        c.data_mut().tick_since_ns = c.data().world.now_ns();
        Ok(status::OK as i32)
    })?;

    // Buffers: Envoy's proxy_get_buffer_bytes clips the range and returns Ok with nothing
    // for an empty one; a buffer that does not exist here is NotFound.
    d.env(
        "proxy_get_buffer_bytes",
        |mut c: C, kind: i32, start: i32, max: i32, ptr_ptr: i32, size_ptr: i32| -> Result<i32> {
            let state = c.data();
            let buffer = match kind {
                0 => state.stream.as_ref().map(|s| s.request_body.clone()),
                1 => state.stream.as_ref().map(|s| s.response_body.clone()),
                5 => state.grpc.receive.clone(),
                6 => Some(state.vm_config.clone()),
                7 => Some(state.plugin_config.clone()),
                _ => None,
            };
            let Some(buffer) = buffer else { return Ok(status::NOT_FOUND as i32) };
            let (start, max) = (start as u32 as usize, max as u32 as usize);
            if start.checked_add(max).is_none() {
                return Ok(status::BAD_ARGUMENT as i32);
            }
            let end = start.saturating_add(max).min(buffer.len());
            let slice = buffer.get(start..end).unwrap_or(&[]);
            if !slice.is_empty() {
                copy_out(&mut c, slice, ptr_ptr, size_ptr)?;
            }
            Ok(status::OK as i32)
        },
    )?;
    d.env("proxy_set_buffer_bytes", |mut c: C, kind: i32, start: i32, size: i32, ptr: i32, len: i32| -> Result<i32> {
        let data = read(&c, ptr, len)?;
        let Some(s) = c.data_mut().stream.as_mut() else { return Ok(status::NOT_FOUND as i32) };
        let buffer = match kind {
            0 => &mut s.request_body,
            1 => &mut s.response_body,
            _ => return Ok(status::NOT_FOUND as i32),
        };
        let start = (start as u32 as usize).min(buffer.len());
        let end = start.saturating_add(size as u32 as usize).min(buffer.len());
        buffer.splice(start..end, data);
        Ok(status::OK as i32)
    })?;

    // Header maps.
    d.env("proxy_get_header_map_pairs", |mut c: C, map: i32, ptr_ptr: i32, size_ptr: i32| -> Result<i32> {
        let Some(pairs) = map_mut(c.data_mut(), map).map(|m| serialize_map(m)) else {
            return Ok(status::BAD_ARGUMENT as i32);
        };
        copy_out(&mut c, &pairs, ptr_ptr, size_ptr)?;
        Ok(status::OK as i32)
    })?;
    d.env("proxy_set_header_map_pairs", |mut c: C, map: i32, ptr: i32, len: i32| -> Result<i32> {
        let Some(pairs) = deserialize_map(&read(&c, ptr, len)?) else {
            return Ok(status::SERIALIZATION_FAILURE as i32);
        };
        let Some(m) = map_mut(c.data_mut(), map) else { return Ok(status::BAD_ARGUMENT as i32) };
        *m = pairs;
        Ok(status::OK as i32)
    })?;
    d.env(
        "proxy_get_header_map_value",
        |mut c: C, map: i32, kp: i32, kl: i32, ptr_ptr: i32, size_ptr: i32| -> Result<i32> {
            let key = read(&c, kp, kl)?;
            let Some(m) = map_mut(c.data_mut(), map) else { return Ok(status::BAD_ARGUMENT as i32) };
            // Envoy returns the first value of a repeated header.
            let Some(value) = m.iter().find(|(k, _)| same_name(k, &key)).map(|(_, v)| v.clone()) else {
                return Ok(status::NOT_FOUND as i32);
            };
            copy_out(&mut c, &value, ptr_ptr, size_ptr)?;
            Ok(status::OK as i32)
        },
    )?;
    d.env("proxy_add_header_map_value", |mut c: C, map: i32, kp: i32, kl: i32, vp: i32, vl: i32| -> Result<i32> {
        let (key, value) = (read(&c, kp, kl)?, read(&c, vp, vl)?);
        let Some(m) = map_mut(c.data_mut(), map) else { return Ok(status::BAD_ARGUMENT as i32) };
        m.push((key.to_ascii_lowercase(), value.clone()));
        note_response_header(c.data_mut(), map, &key, &value);
        Ok(status::OK as i32)
    })?;
    d.env("proxy_replace_header_map_value", |mut c: C, map: i32, kp: i32, kl: i32, vp: i32, vl: i32| -> Result<i32> {
        let (key, value) = (read(&c, kp, kl)?, read(&c, vp, vl)?);
        let Some(m) = map_mut(c.data_mut(), map) else { return Ok(status::BAD_ARGUMENT as i32) };
        m.retain(|(k, _)| !same_name(k, &key));
        m.push((key.to_ascii_lowercase(), value.clone()));
        note_response_header(c.data_mut(), map, &key, &value);
        Ok(status::OK as i32)
    })?;
    d.env("proxy_remove_header_map_value", |mut c: C, map: i32, kp: i32, kl: i32| -> Result<i32> {
        let key = read(&c, kp, kl)?;
        let Some(m) = map_mut(c.data_mut(), map) else { return Ok(status::BAD_ARGUMENT as i32) };
        m.retain(|(k, _)| !same_name(k, &key));
        Ok(status::OK as i32)
    })?;

    // Properties: the path arrives as NUL-separated segments.
    d.env("proxy_get_property", |mut c: C, pp: i32, pl: i32, ptr_ptr: i32, size_ptr: i32| -> Result<i32> {
        let path = read(&c, pp, pl)?;
        let state = c.data();
        let value = state
            .stream
            .as_ref()
            .and_then(|s| s.properties.get(&path))
            .or_else(|| state.properties.get(&path))
            .cloned();
        let Some(value) = value else { return Ok(status::NOT_FOUND as i32) };
        copy_out(&mut c, &value, ptr_ptr, size_ptr)?;
        Ok(status::OK as i32)
    })?;
    d.env("proxy_set_property", |mut c: C, pp: i32, pl: i32, vp: i32, vl: i32| -> Result<i32> {
        let (path, value) = (read(&c, pp, pl)?, read(&c, vp, vl)?);
        let state = c.data_mut();
        match state.stream.as_mut() {
            Some(s) => s.properties.insert(path, value),
            None => state.properties.insert(path, value),
        };
        Ok(status::OK as i32)
    })?;

    // Shared data, with Envoy's semantics (see world::Shared::set), faults and interleaving.
    d.env(
        "proxy_get_shared_data",
        |mut c: C, kp: i32, kl: i32, ptr_ptr: i32, size_ptr: i32, cas_ptr: i32| -> Result<i32> {
            let key = read_str(&c, kp, kl)?;
            let world = c.data().world.clone();
            let vm = c.data().index;
            let found = {
                let mut s = world.shared();
                s.gets += 1;
                match s.faults.fail_gets {
                    Some((n, st)) if n > 0 => {
                        s.faults.fail_gets = Some((n - 1, st));
                        Err(st)
                    }
                    _ => Ok(s.data.get(&key).cloned()),
                }
            };
            let (st, cas) = match found {
                Err(st) => (st, 0),
                Ok(None) => (status::NOT_FOUND, 0),
                Ok(Some((value, cas))) => {
                    copy_out(&mut c, &value, ptr_ptr, size_ptr)?;
                    write_u32(&mut c, cas_ptr, cas)?;
                    (status::OK, cas)
                }
            };
            trace(&world, SharedOp::Get { vm, key: key.clone(), status: st, cas });
            if st == status::OK || st == status::NOT_FOUND {
                interleave(&mut c, Point::AfterGet, &key)?;
            }
            Ok(st as i32)
        },
    )?;
    d.env("proxy_set_shared_data", |mut c: C, kp: i32, kl: i32, vp: i32, vl: i32, cas: i32| -> Result<i32> {
        let key = read_str(&c, kp, kl)?;
        let value = read(&c, vp, vl)?;
        let cas = cas as u32;
        interleave(&mut c, Point::BeforeSet, &key)?;
        let world = c.data().world.clone();
        let st = {
            let mut s = world.shared();
            s.sets += 1;
            if s.faults.cas_storm > 0 {
                s.faults.cas_storm -= 1;
                status::CAS_MISMATCH
            } else if let Some((n, st)) = s.faults.fail_sets.filter(|(n, _)| *n > 0) {
                s.faults.fail_sets = Some((n - 1, st));
                st
            } else {
                s.set(&key, &value, cas)
            }
        };
        trace(&world, SharedOp::Set { vm: c.data().index, key, cas, status: st });
        Ok(st as i32)
    })?;

    // Streams.
    d.env(
        "proxy_send_local_response",
        |mut c: C, code: i32, dp: i32, dl: i32, bp: i32, bl: i32, hp: i32, hl: i32, grpc: i32| -> Result<i32> {
            let details = read_str(&c, dp, dl)?;
            let body = read(&c, bp, bl)?;
            let Some(headers) = deserialize_map(&read(&c, hp, hl)?) else {
                return Ok(status::SERIALIZATION_FAILURE as i32);
            };
            let Some(s) = c.data_mut().stream.as_mut() else { return Ok(status::BAD_ARGUMENT as i32) };
            if s.local_reply.is_some() {
                bail!("test host: proxy_send_local_response called twice on stream {}", s.id);
            }
            let headers = headers
                .into_iter()
                .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), String::from_utf8_lossy(&v).into_owned()))
                .collect();
            s.local_reply = Some(LocalReply { status: code as u32, details, headers, body, grpc_status: grpc });
            Ok(status::OK as i32)
        },
    )?;
    d.env("proxy_continue_stream", |mut c: C, _kind: i32| -> Result<i32> {
        let Some(s) = c.data_mut().stream.as_mut() else { return Ok(status::BAD_ARGUMENT as i32) };
        s.continue_calls += 1;
        Ok(status::OK as i32)
    })?;
    d.env("proxy_close_stream", |mut c: C, _kind: i32| -> Result<i32> {
        let Some(s) = c.data_mut().stream.as_mut() else { return Ok(status::BAD_ARGUMENT as i32) };
        s.close_calls += 1;
        Ok(status::OK as i32)
    })?;
    d.env("proxy_done", |_c: C| -> Result<i32> { Ok(status::OK as i32) })?;
    d.env("proxy_get_status", |mut c: C, code_ptr: i32, ptr_ptr: i32, size_ptr: i32| -> Result<i32> {
        write_u32(&mut c, code_ptr, 0)?;
        copy_out(&mut c, &[], ptr_ptr, size_ptr)?;
        Ok(status::OK as i32)
    })?;
    d.env("proxy_set_effective_context", |mut c: C, ctx: i32| -> Result<i32> {
        let ctx = ctx as u32;
        let known = ctx == super::ROOT_CONTEXT || c.data().stream.as_ref().is_some_and(|s| s.id == ctx);
        if !known {
            return Ok(status::BAD_ARGUMENT as i32);
        }
        c.data_mut().effective_context = ctx;
        Ok(status::OK as i32)
    })?;

    // Stats: one value per name across all VMs of the world (Envoy shares stats by name).
    d.env("proxy_define_metric", |mut c: C, kind: i32, np: i32, nl: i32, id_ptr: i32| -> Result<i32> {
        let kind = match kind {
            0 => MetricKind::Counter,
            1 => MetricKind::Gauge,
            2 => MetricKind::Histogram,
            _ => return Ok(status::BAD_ARGUMENT as i32),
        };
        let name = read_str(&c, np, nl)?;
        {
            let world = c.data().world.clone();
            let mut s = world.shared();
            let m = s.metrics.entry(name.clone()).or_insert(Metric { kind, value: 0, samples: 0 });
            if m.kind != kind {
                return Ok(status::BAD_ARGUMENT as i32);
            }
        }
        let ids = &mut c.data_mut().metric_ids;
        ids.push(name);
        let id = ids.len() as u32;
        write_u32(&mut c, id_ptr, id)?;
        Ok(status::OK as i32)
    })?;
    d.env("proxy_increment_metric", |c: C, id: i32, offset: i64| -> Result<i32> {
        with_metric(&c, id, |m| match m.kind {
            MetricKind::Counter if offset > 0 => {
                m.value = m.value.saturating_add(offset);
                status::OK
            }
            MetricKind::Gauge => {
                m.value = m.value.saturating_add(offset);
                status::OK
            }
            _ => status::BAD_ARGUMENT,
        })
    })?;
    d.env("proxy_record_metric", |c: C, id: i32, value: i64| -> Result<i32> {
        with_metric(&c, id, |m| {
            match m.kind {
                MetricKind::Counter => m.value = m.value.saturating_add(value),
                MetricKind::Gauge => m.value = value,
                MetricKind::Histogram => {
                    m.value = value;
                    m.samples += 1;
                }
            }
            status::OK
        })
    })?;
    d.env("proxy_get_metric", |mut c: C, id: i32, ptr: i32| -> Result<i32> {
        let mut out = None;
        let st = with_metric(&c, id, |m| match m.kind {
            MetricKind::Histogram => status::BAD_ARGUMENT,
            _ => {
                out = Some(m.value as u64);
                status::OK
            }
        })?;
        if let Some(v) = out {
            write_u64(&mut c, ptr, v)?;
        }
        Ok(st)
    })?;
    Ok(())
}

fn with_metric(c: &C, id: i32, f: impl FnOnce(&mut Metric) -> u32) -> Result<i32> {
    let state = c.data();
    let Some(name) = (id as u32).checked_sub(1).and_then(|i| state.metric_ids.get(i as usize)) else {
        return Ok(status::NOT_FOUND as i32);
    };
    let mut s = state.world.shared();
    Ok(s.metrics.get_mut(name).map_or(status::NOT_FOUND, f) as i32)
}

// ---- gRPC calls ----

/// `proxy_grpc_call`: records the call for the test to answer (see mod.rs, "gRPC calls and
/// ticks"); the token is this VM's counter, as Envoy's per-VM call ids.
fn grpc(d: &mut Defs) -> Result<()> {
    d.env(
        "proxy_grpc_call",
        |mut c: C,
         up: i32,
         up_len: i32,
         svc: i32,
         svc_len: i32,
         method: i32,
         method_len: i32,
         md: i32,
         md_len: i32,
         msg: i32,
         msg_len: i32,
         timeout_ms: i32,
         token_ptr: i32|
         -> Result<i32> {
            let cluster = read_str(&c, up, up_len)?;
            let service = read_str(&c, svc, svc_len)?;
            let method = read_str(&c, method, method_len)?;
            let Some(initial_metadata) = deserialize_map(&read(&c, md, md_len)?) else {
                return Ok(status::SERIALIZATION_FAILURE as i32);
            };
            let message = read(&c, msg, msg_len)?;
            let state = c.data_mut();
            if let Some((n, st)) = state.grpc.dispatch_fail.filter(|(n, _)| *n > 0) {
                state.grpc.dispatch_fail = Some((n - 1, st));
                return Ok(st as i32);
            }
            // The stream being called back, else the root context (e.g. from a tick).
            let context = state.stream.as_ref().map_or(super::ROOT_CONTEXT, |s| s.id);
            state.grpc.next_token += 1;
            let token = state.grpc.next_token;
            let call = super::GrpcCall {
                token,
                context,
                cluster,
                service,
                method,
                initial_metadata,
                message,
                timeout_ms: timeout_ms as u32,
            };
            state.grpc.log.push(call.clone());
            state.grpc.outstanding.push(call);
            write_u32(&mut c, token_ptr, token)?;
            Ok(status::OK as i32)
        },
    )?;
    Ok(())
}

/// Calls the SDK links that this host does not model: linked so the module instantiates,
/// and a trap naming the call if the filter ever makes it.
fn unmodelled(d: &mut Defs) -> Result<()> {
    fn no(name: &str) -> Result<i32> {
        bail!("test host: {name} is linked but not modelled (extend tests/host/abi.rs)")
    }
    d.env(
        "proxy_http_call",
        |_: C, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| no("proxy_http_call"),
    )?;
    d.env("proxy_grpc_stream", |_: C, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| {
        no("proxy_grpc_stream")
    })?;
    d.env("proxy_grpc_send", |_: C, _: i32, _: i32, _: i32, _: i32| no("proxy_grpc_send"))?;
    d.env("proxy_grpc_cancel", |_: C, _: i32| no("proxy_grpc_cancel"))?;
    d.env("proxy_grpc_close", |_: C, _: i32| no("proxy_grpc_close"))?;
    d.env("proxy_register_shared_queue", |_: C, _: i32, _: i32, _: i32| no("proxy_register_shared_queue"))?;
    d.env("proxy_resolve_shared_queue", |_: C, _: i32, _: i32, _: i32, _: i32, _: i32| {
        no("proxy_resolve_shared_queue")
    })?;
    d.env("proxy_enqueue_shared_queue", |_: C, _: i32, _: i32, _: i32| no("proxy_enqueue_shared_queue"))?;
    d.env("proxy_dequeue_shared_queue", |_: C, _: i32, _: i32, _: i32| no("proxy_dequeue_shared_queue"))?;
    d.env("proxy_call_foreign_function", |_: C, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| {
        no("proxy_call_foreign_function")
    })?;
    Ok(())
}

// ---- WASI preview1 ----

const ERRNO_SUCCESS: i32 = 0;
const ERRNO_BADF: i32 = 8;
const ERRNO_INVAL: i32 = 28;

fn wasi(d: &mut Defs) -> Result<()> {
    const W: &str = "wasi_snapshot_preview1";
    d.def(W, "environ_sizes_get", |mut c: C, count_ptr: i32, size_ptr: i32| -> Result<i32> {
        write_u32(&mut c, count_ptr, 0)?;
        write_u32(&mut c, size_ptr, 0)?;
        Ok(ERRNO_SUCCESS)
    })?;
    d.def(W, "environ_get", |_: C, _environ: i32, _buf: i32| -> Result<i32> { Ok(ERRNO_SUCCESS) })?;
    d.def(W, "args_sizes_get", |mut c: C, count_ptr: i32, size_ptr: i32| -> Result<i32> {
        write_u32(&mut c, count_ptr, 0)?;
        write_u32(&mut c, size_ptr, 0)?;
        Ok(ERRNO_SUCCESS)
    })?;
    d.def(W, "args_get", |_: C, _argv: i32, _buf: i32| -> Result<i32> { Ok(ERRNO_SUCCESS) })?;
    d.def(W, "fd_write", |mut c: C, fd: i32, iovs: i32, iovs_len: i32, nwritten_ptr: i32| -> Result<i32> {
        if fd != 1 && fd != 2 {
            return Ok(ERRNO_BADF);
        }
        let mut data = Vec::new();
        for i in 0..iovs_len {
            let iov = read(&c, iovs.wrapping_add(i * 8), 8)?;
            let ptr = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
            let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
            data.extend(read(&c, ptr, len)?);
        }
        let n = data.len() as u32;
        let state = c.data_mut();
        if fd == 1 { &mut state.stdout } else { &mut state.stderr }.extend(data);
        write_u32(&mut c, nwritten_ptr, n)?;
        Ok(ERRNO_SUCCESS)
    })?;
    d.def(W, "proc_exit", |_: C, code: i32| -> Result<()> { bail!("guest called proc_exit({code})") })?;
    d.def(W, "clock_time_get", |mut c: C, clock: i32, _precision: i64, ptr: i32| -> Result<i32> {
        if !(0..=3).contains(&clock) {
            return Ok(ERRNO_INVAL);
        }
        let now = c.data().world.now_ns();
        write_u64(&mut c, ptr, now)?;
        Ok(ERRNO_SUCCESS)
    })?;
    d.def(W, "random_get", |mut c: C, ptr: i32, len: i32| -> Result<i32> {
        let bytes: Vec<u8> = (0..len.max(0)).map(|_| c.data_mut().rng.next_u64() as u8).collect();
        write(&mut c, ptr, &bytes)?;
        Ok(ERRNO_SUCCESS)
    })?;
    Ok(())
}
