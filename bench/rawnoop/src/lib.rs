//! A proxy-wasm HTTP filter that does nothing, written against the ABI (0.2.1) directly.
//!
//! The SDK's no-op (bench/noop) boxes a context object per stream, keeps it in a hash map and
//! dispatches through trait objects; this module exports only what an HTTP filter needs and
//! keeps no state, so the difference between the two is the price of the SDK's dispatch layer.
//! Callbacks it does not export (`proxy_on_done`, `proxy_on_log`, `proxy_on_delete`, bodies,
//! trailers) are skipped by the host.

/// Marks the module as ABI 0.2.1 for the host.
#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// The host's allocations into the module (configuration bytes, header values): never made by
/// this module's callbacks, but the host requires the export.
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let mut buf: Vec<u8> = Vec::with_capacity(size);
    let ptr = buf.as_mut_ptr();
    std::mem::forget(buf);
    ptr
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(_context_id: u32, _parent_context_id: u32) {}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_context_id: u32, _vm_configuration_size: usize) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(_context_id: u32, _plugin_configuration_size: usize) -> u32 {
    1
}

/// 0 = Continue.
#[no_mangle]
pub extern "C" fn proxy_on_request_headers(_context_id: u32, _num_headers: usize, _end_of_stream: u32) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(_context_id: u32, _num_headers: usize, _end_of_stream: u32) -> u32 {
    0
}
