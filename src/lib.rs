//! tenant-ratelimit: a per-tenant token-bucket rate limiter for Envoy, as a proxy-wasm
//! HTTP filter. Pure core (flow, decision, policy, global, worker_lease, store, bucket,
//! config, tenant, rules, response, metrics) with one thin module, `filter`, that talks to
//! the proxy-wasm host; that module is compiled only for wasm so the core's tests and the
//! config checker build natively. docs/architecture.md draws the request path.

pub mod bucket;
pub mod config;
pub mod decision;
pub mod flow;
pub mod global;
pub mod json;
pub mod metrics;
pub mod policy;
pub mod rate;
pub mod response;
pub mod rls;
pub mod rules;
pub mod store;
pub mod tenant;
pub mod worker_lease;

#[cfg(target_arch = "wasm32")]
mod filter;
