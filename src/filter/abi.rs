//! The proxy-wasm ABI 0.2.1, our side of it: one raw import per host call the filter makes,
//! each wrapped at once in a safe function, and the memory-allocation export the host copies
//! results through. Written from the ABI spec (proxy-wasm/spec, abi-versions/v0.2.1); the
//! callbacks the host calls are in `mod.rs`.
//!
//! Statuses are the ABI's `WasmResult` codes; a wrapper returns `Err(status)` for anything but
//! the success the call documents, and never aborts the VM on an unexpected one.

/// `WasmResult` codes (proxy-wasm spec; Envoy's proxy-wasm-cpp-host uses the same numbers).
pub const OK: u32 = 0;
pub const NOT_FOUND: u32 = 1;
pub const CAS_MISMATCH: u32 = 8;

/// `MapType`.
pub const REQUEST_HEADERS: u32 = 0;
pub const RESPONSE_HEADERS: u32 = 2;
/// `BufferType`.
const GRPC_RECEIVE_BUFFER: u32 = 5;
const PLUGIN_CONFIGURATION: u32 = 7;
/// `MetricType`.
pub const COUNTER: u32 = 0;
pub const GAUGE: u32 = 1;
/// `LogLevel`.
pub const INFO: u32 = 2;
pub const ERROR: u32 = 4;
pub const CRITICAL: u32 = 5;
/// `StreamType::HttpRequest`, for `proxy_continue_stream`.
const HTTP_REQUEST: u32 = 0;
/// `Action` returned by the stream callbacks.
pub const CONTINUE: u32 = 0;
pub const PAUSE: u32 = 1;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_add_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_set_property(path_data: *const u8, path_size: usize, value_data: *const u8, value_size: usize) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    #[allow(clippy::too_many_arguments)]
    fn proxy_send_local_response(
        status_code: u32,
        details_data: *const u8,
        details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_define_metric(metric_type: u32, name_data: *const u8, name_size: usize, return_id: *mut u32) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    #[allow(clippy::too_many_arguments)]
    fn proxy_grpc_call(
        upstream_data: *const u8,
        upstream_size: usize,
        service_name_data: *const u8,
        service_name_size: usize,
        method_name_data: *const u8,
        method_name_size: usize,
        initial_metadata_data: *const u8,
        initial_metadata_size: usize,
        message_data: *const u8,
        message_size: usize,
        timeout_milliseconds: u32,
        return_token: *mut u32,
    ) -> u32;
}

/// The host copies every value it returns into memory it gets from this export, and hands the
/// block over: the wrapper that made the call owns it (see [`take`]).
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let mut block = std::mem::ManuallyDrop::new(Vec::<u8>::with_capacity(size));
    block.as_mut_ptr()
}

/// Takes ownership of a block the host filled after [`proxy_on_memory_allocate`]`(size)`.
///
/// # Safety
/// `data`/`size` must come from a host call that returned Ok: a block from
/// `proxy_on_memory_allocate(size)` (capacity `size`), filled with `size` bytes, or null.
unsafe fn take(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() || size == 0 {
        return Vec::new();
    }
    // SAFETY: per the contract above, a Vec<u8> allocation of capacity `size`, initialised.
    unsafe { Vec::from_raw_parts(data, size, size) }
}

fn status(st: u32) -> Result<(), u32> {
    if st == OK {
        Ok(())
    } else {
        Err(st)
    }
}

/// A call that returns bytes: `Ok(None)` for NotFound.
fn bytes(call: impl FnOnce(*mut *mut u8, *mut usize) -> u32) -> Result<Option<Vec<u8>>, u32> {
    let (mut data, mut size) = (std::ptr::null_mut(), 0usize);
    match call(&mut data, &mut size) {
        // SAFETY: Ok: the host wrote a block from proxy_on_memory_allocate(size), or null.
        OK => Ok(Some(unsafe { take(data, size) })),
        NOT_FOUND => Ok(None),
        st => Err(st),
    }
}

pub fn log(level: u32, message: &str) {
    // SAFETY: a live slice for the duration of the call.
    let _ = unsafe { proxy_log(level, message.as_ptr(), message.len()) };
}

/// Nanoseconds since the Unix epoch (0 if the host will not say).
pub fn now_ns() -> u64 {
    let mut t = 0u64;
    // SAFETY: a valid pointer for the call.
    let st = unsafe { proxy_get_current_time_nanoseconds(&mut t) };
    if st == OK {
        t
    } else {
        0
    }
}

pub fn set_tick_period_ms(ms: u32) {
    // SAFETY: no pointers.
    let _ = unsafe { proxy_set_tick_period_milliseconds(ms) };
}

fn buffer(kind: u32, size: usize) -> Option<Vec<u8>> {
    // SAFETY: valid return pointers for the call.
    bytes(|d, s| unsafe { proxy_get_buffer_bytes(kind, 0, size, d, s) }).ok().flatten()
}

/// The plugin configuration (`size` bytes, as `proxy_on_configure` said).
pub fn plugin_configuration(size: usize) -> Option<Vec<u8>> {
    buffer(PLUGIN_CONFIGURATION, size)
}

/// The message of the gRPC answer being delivered (inside `proxy_on_grpc_receive` only).
pub fn grpc_receive_buffer(size: usize) -> Option<Vec<u8>> {
    buffer(GRPC_RECEIVE_BUFFER, size)
}

/// A header of `map` (first value of a repeated one); `None` when absent or unreadable.
pub fn header(map: u32, name: &str) -> Option<Vec<u8>> {
    // SAFETY: a live key slice and valid return pointers for the call.
    bytes(|d, s| unsafe { proxy_get_header_map_value(map, name.as_ptr(), name.len(), d, s) }).ok().flatten()
}

pub fn add_header(map: u32, name: &str, value: &str) -> Result<(), u32> {
    // SAFETY: live slices for the call.
    status(unsafe { proxy_add_header_map_value(map, name.as_ptr(), name.len(), value.as_ptr(), value.len()) })
}

/// A property path as the ABI wants it: the segments joined with NUL.
fn property_path(path: &[&str]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.iter().map(|p| p.len() + 1).sum());
    for (i, segment) in path.iter().enumerate() {
        if i > 0 {
            out.push(0);
        }
        out.extend_from_slice(segment.as_bytes());
    }
    out
}

/// A property (`["source", "address"]`, `["plugin_root_id"]`, ...); `None` when absent.
pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    let p = property_path(path);
    // SAFETY: a live path slice and valid return pointers for the call.
    bytes(|d, s| unsafe { proxy_get_property(p.as_ptr(), p.len(), d, s) }).ok().flatten()
}

#[allow(dead_code)] // for the filter state the lead adds next (docs/architecture.md)
pub fn set_property(path: &[&str], value: &[u8]) -> Result<(), u32> {
    let p = property_path(path);
    // SAFETY: live slices for the call.
    status(unsafe { proxy_set_property(p.as_ptr(), p.len(), value.as_ptr(), value.len()) })
}

/// Shared data: `Ok(None)` for a missing key, else the value and its cas.
pub fn shared_get(key: &str) -> Result<Option<(Vec<u8>, u32)>, u32> {
    let mut cas = 0u32;
    // SAFETY: a live key slice and valid return pointers for the call.
    let value = bytes(|d, s| unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), d, s, &mut cas) })?;
    Ok(value.map(|v| (v, cas)))
}

/// Writes shared data if its cas is still `cas` (0: unconditionally): the raw status.
pub fn shared_set(key: &str, value: &[u8], cas: u32) -> u32 {
    // SAFETY: live slices for the call.
    unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) }
}

/// Answers the current stream without the upstream (`grpc_status` -1: not a gRPC reply).
/// `headers` is a serialized header map.
pub fn send_local_response(status_code: u32, details: &str, body: &[u8], headers: &[u8], grpc_status: i32) {
    // SAFETY: live slices for the call.
    let _ = unsafe {
        proxy_send_local_response(
            status_code,
            details.as_ptr(),
            details.len(),
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            grpc_status,
        )
    };
}

/// Resumes the current stream's paused request.
pub fn continue_request() {
    // SAFETY: no pointers.
    let _ = unsafe { proxy_continue_stream(HTTP_REQUEST) };
}

/// Makes `context_id` the context later host calls act on (a stream, from a callback the host
/// delivered elsewhere).
pub fn set_effective_context(context_id: u32) {
    // SAFETY: no pointers.
    let _ = unsafe { proxy_set_effective_context(context_id) };
}

pub fn define_metric(kind: u32, name: &str) -> Result<u32, u32> {
    let mut id = 0u32;
    // SAFETY: a live name slice and a valid return pointer for the call.
    status(unsafe { proxy_define_metric(kind, name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

pub fn increment_metric(id: u32, by: i64) {
    // SAFETY: no pointers.
    let _ = unsafe { proxy_increment_metric(id, by) };
}

/// A unary gRPC call with no initial metadata: its token.
pub fn grpc_call(cluster: &str, service: &str, method: &str, message: &[u8], timeout_ms: u32) -> Result<u32, u32> {
    // An empty serialized header map: a count of 0.
    let metadata = [0u8; 4];
    let mut token = 0u32;
    // SAFETY: live slices and a valid return pointer for the call.
    status(unsafe {
        proxy_grpc_call(
            cluster.as_ptr(),
            cluster.len(),
            service.as_ptr(),
            service.len(),
            method.as_ptr(),
            method.len(),
            metadata.as_ptr(),
            metadata.len(),
            message.as_ptr(),
            message.len(),
            timeout_ms,
            &mut token,
        )
    })?;
    Ok(token)
}
