//! One host call per request on top of the no-op floor (bench/noop), picked by the plugin
//! configuration (a bare word, e.g. `clock`). The bench runs each probe as its own listener and
//! subtracts the floor: the difference is what that one host crossing costs, in instructions.
//! The calls mirror the filter's own: the tenant header read, the clock, a shared-data read, a
//! read plus compare-and-swap write of one key, one counter increment, one response header; and
//! a header and a key that are absent, which price the lookups without the allocate callback.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType, MetricType};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| Box::new(ProbeRoot { probe: Probe::Nothing, counter: 0 }));
}}

const KEY: &str = "bench-probe/bucket";

#[derive(Clone, Copy)]
enum Probe {
    /// Same as the floor: checks that the probe module itself adds nothing.
    Nothing,
    HeaderRead,
    /// A header the request does not carry: the lookup without the allocate callback into the
    /// module that returning a value costs.
    HeaderAbsent,
    Clock,
    SharedGet,
    /// A key that does not exist: the shared-data lookup without the allocate callback.
    SharedGetAbsent,
    SharedGetCas,
    Counter,
    ResponseHeader,
}

impl Probe {
    fn parse(word: &[u8]) -> Option<Probe> {
        Some(match word {
            b"nothing" => Probe::Nothing,
            b"header" => Probe::HeaderRead,
            b"header_absent" => Probe::HeaderAbsent,
            b"clock" => Probe::Clock,
            b"shared_get" => Probe::SharedGet,
            b"shared_get_absent" => Probe::SharedGetAbsent,
            b"shared_get_cas" => Probe::SharedGetCas,
            b"counter" => Probe::Counter,
            b"response_header" => Probe::ResponseHeader,
            _ => return None,
        })
    }
}

struct ProbeRoot {
    probe: Probe,
    counter: u32,
}

impl Context for ProbeRoot {}

impl RootContext for ProbeRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        let Some(probe) = Probe::parse(config.trim_ascii()) else {
            let _ = hostcalls::log(LogLevel::Error, "bench-probe: unknown probe in the plugin configuration");
            return false;
        };
        self.probe = probe;
        if matches!(probe, Probe::Counter) {
            match hostcalls::define_metric(MetricType::Counter, "bench_probe.requests") {
                Ok(id) => self.counter = id,
                Err(_) => return false,
            }
        }
        if matches!(probe, Probe::SharedGet | Probe::SharedGetCas) {
            // A 57-byte value, the size of the filter's bucket record.
            let _ = hostcalls::set_shared_data(KEY, Some(&[7u8; 57]), None);
        }
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(ProbeStream { probe: self.probe, counter: self.counter }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct ProbeStream {
    probe: Probe,
    counter: u32,
}

impl Context for ProbeStream {}

impl HttpContext for ProbeStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        match self.probe {
            Probe::HeaderRead => {
                let _ = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "x-tenant-id");
            }
            Probe::HeaderAbsent => {
                let _ = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "x-not-sent");
            }
            Probe::Clock => {
                let _ = hostcalls::get_current_time();
            }
            Probe::SharedGet => {
                let _ = hostcalls::get_shared_data(KEY);
            }
            Probe::SharedGetAbsent => {
                let _ = hostcalls::get_shared_data("bench-probe/absent");
            }
            Probe::SharedGetCas => {
                if let Ok((Some(value), cas)) = hostcalls::get_shared_data(KEY) {
                    let _ = hostcalls::set_shared_data(KEY, Some(&value), cas);
                }
            }
            Probe::Counter => {
                let _ = hostcalls::increment_metric(self.counter, 1);
            }
            Probe::Nothing | Probe::ResponseHeader => {}
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Probe::ResponseHeader = self.probe {
            let _ = hostcalls::add_map_value(MapType::HttpResponseHeaders, "x-ratelimit-remaining", "9");
        }
        Action::Continue
    }
}
