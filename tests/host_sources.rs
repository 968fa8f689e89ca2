#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! Issue 15: which properties `source_ip` and `jwt_claim` read, as Envoy 1.40 presents them.
//! Envoy's `source.address` is the TCP peer (`ip:port`), or, when the connection manager took
//! the client from X-Forwarded-For (or an original-IP detection extension), that address
//! with port 0.

mod host;
use host::{Request, Vm, World};

fn config(source: &str) -> String {
    format!(
        r#"{{"capacity":1,"refill_rate":0.001,"tenant":{{"from":[{source},{{"header":"x-tenant-id"}}],"default":"nobody"}}}}"#
    )
}

fn allowed(vm: &Vm, req: Request) -> bool {
    vm.request(&req).unwrap().allowed()
}

#[test]
fn source_ip_refuses_an_address_envoy_took_from_a_header() {
    let world = World::new();
    let vm = Vm::configured(&world, &config(r#"{"source_ip":true}"#));
    let peer = || Request::get("/").source("127.0.0.1:40000");
    assert!(allowed(&vm, peer()));
    assert!(!allowed(&vm, peer().source("127.0.0.1:40001")));
    // Forged X-Forwarded-For values reach the filter as 7.7.7.7:0, 8.8.8.8:0: each used to be
    // a fresh bucket; now they share tenant.default ("nobody"), and the tenant header after
    // source_ip is not consulted.
    assert!(allowed(&vm, Request::get("/").source("7.7.7.7:0").header("x-tenant-id", "a")));
    assert!(!allowed(&vm, Request::get("/").source("8.8.8.8:0").header("x-tenant-id", "b")));
    assert!(!allowed(&vm, Request::get("/").source("[2001:db8::9]:0")));
    // "nobody" is spent: that is the bucket they were in
    assert!(!allowed(&vm, Request::get("/")));
}

#[test]
fn trusted_client_address_takes_envoys_address_as_it_is() {
    let world = World::new();
    let vm = Vm::configured(&world, &config(r#"{"source_ip":{"trusted_client_address":true}}"#));
    assert!(allowed(&vm, Request::get("/").source("7.7.7.7:0")));
    assert!(!allowed(&vm, Request::get("/").source("7.7.7.7:0")));
    assert!(allowed(&vm, Request::get("/").source("8.8.8.8:0")));
    assert!(allowed(&vm, Request::get("/").source("127.0.0.1:40000")));
}

#[test]
fn jwt_claim_reads_istios_payload_key_by_default() {
    let world = World::new();
    let vm = Vm::configured(&world, &config(r#"{"jwt_claim":{"claim":"org.id"}}"#));
    let claim = |key: &str, v: &str| {
        Request::get("/")
            .property(&["metadata", "filter_metadata", "envoy.filters.http.jwt_authn", key, "org", "id"], v)
    };
    assert!(allowed(&vm, claim("payload", "org-1")));
    assert!(!allowed(&vm, claim("payload", "org-1").header("x-tenant-id", "other")));
    // the earlier default key still works
    assert!(allowed(&vm, claim("jwt_payload", "org-2")));
    assert!(!allowed(&vm, claim("jwt_payload", "org-2")));
}
