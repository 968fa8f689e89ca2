#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! Hostile requests: random header names and values (non-UTF-8, 64 KiB, control
//! characters), query strings and paths never trap the VM, and never bypass the limit: an
//! invalid tenant id falls back to the `default` tenant's bucket.

mod host;
use host::{Request, Vm, World};
use proptest::prelude::*;

const CAPACITY: usize = 5;

/// No rules: every request is metered, whatever its path (with rules, a request matching
/// none passes unmetered by design).
fn config() -> String {
    format!(r#"{{"capacity":{CAPACITY},"refill_rate":"1/h"}}"#)
}

fn valid_id(b: &[u8]) -> bool {
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
}

fn hostile_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        prop::collection::vec(0u8..0x20, 1..16),     // control characters
        prop::collection::vec(0x80u8..=0xff, 1..16), // not UTF-8
        (0usize..4).prop_map(|k| vec![b'a'; 129 + k * 1000]), // too long
        Just(vec![b'x'; 64 * 1024]),                 // 64 KiB
        Just(b"acme corp".to_vec()),                 // a space
        Just(b"acme\0".to_vec()),                    // NUL
        Just(Vec::new()),                            // empty
    ]
}

#[derive(Debug, Clone)]
struct Hostile {
    tenant_header: Vec<u8>,
    extra: Vec<(Vec<u8>, Vec<u8>)>,
    path: Vec<u8>,
}

fn hostile_request() -> impl Strategy<Value = Hostile> {
    let path = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..80),
        hostile_bytes().prop_map(|v| [b"/?tenant=".as_slice(), &v].concat()),
        Just(b"/?tenant=%ZZ".to_vec()),
        Just(b"/?tenant=%00acme".to_vec()),
        Just(b"/?tenant=a%20b&tenant=ok".to_vec()),
        Just(b"/?tenant".to_vec()),
        Just(b"/?&&=&tenant=&#tenant=x".to_vec()),
        Just([b"/?tenant=".as_slice(), &[b'%'; 300]].concat()),
        Just(vec![b'/'; 64 * 1024]),
    ];
    let extra = prop::collection::vec((hostile_bytes(), hostile_bytes()), 0..4);
    (hostile_bytes(), extra, path).prop_map(|(tenant_header, extra, path)| Hostile { tenant_header, extra, path })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    /// Every request carries an invalid tenant header and garbage elsewhere: no trap, and
    /// all of them together are admitted at most `capacity` times (the default bucket),
    /// unless the query string held a valid id of its own.
    #[test]
    fn garbage_never_traps_and_falls_back_to_the_default_bucket(reqs in prop::collection::vec(hostile_request(), 1..12)) {
        let world = World::new();
        let vm = Vm::configured(&world, &config());
        let mut default_admitted = 0;
        for h in &reqs {
            prop_assume!(!valid_id(&h.tenant_header));
            let mut r = Request::new("GET", &h.path).header("x-tenant-id", &h.tenant_header);
            for (n, v) in &h.extra {
                r = r.header(n, v);
            }
            let reply = vm.request(&r).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let query_tenant = String::from_utf8_lossy(&h.path).contains("tenant=");
            if !query_tenant && reply.allowed() {
                default_admitted += 1;
            }
        }
        prop_assert!(default_admitted <= CAPACITY, "{default_admitted}");
        prop_assert!(!vm.is_dead());
    }
}

#[test]
fn invalid_ids_share_the_default_tenants_bucket() {
    let world = World::new();
    let vm = Vm::configured(&world, &config());
    let bad: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"a b".to_vec(),
        b"tab\there".to_vec(),
        vec![0xff, 0xfe],
        "caf\u{e9}".as_bytes().to_vec(),
        vec![b'z'; 129],
        vec![b'y'; 64 * 1024],
        b"nul\0".to_vec(),
        b"\x1b[31m".to_vec(),
        b"line\r\nx-injected: 1".to_vec(),
    ];
    let mut admitted = 0;
    for round in 0..3 {
        for v in &bad {
            let r = Request::get(format!("/x?r={round}")).header("x-tenant-id", v);
            admitted += usize::from(vm.request(&r).unwrap().allowed());
        }
    }
    assert_eq!(admitted, CAPACITY);
    // The `default` tenant named explicitly is that same bucket.
    assert!(!vm.request(&Request::get("/").tenant("default")).unwrap().allowed());
    // A valid tenant is unaffected.
    assert!(vm.request(&Request::get("/").tenant("acme")).unwrap().allowed());
}

#[test]
fn duplicate_tenant_headers_use_the_first_as_envoy_does() {
    let world = World::new();
    let vm = Vm::configured(&world, r#"{"capacity":1,"refill_rate":"1/h"}"#);
    let r = Request::get("/").header("x-tenant-id", "a").header("x-tenant-id", "b");
    assert!(vm.request(&r).unwrap().allowed());
    assert!(!vm.request(&Request::get("/").tenant("a")).unwrap().allowed());
    assert!(vm.request(&Request::get("/").tenant("b")).unwrap().allowed());
}

#[test]
fn header_names_are_case_insensitive_and_query_ids_are_decoded() {
    let world = World::new();
    let vm = Vm::configured(&world, r#"{"capacity":1,"refill_rate":"1/h"}"#);
    assert!(vm.request(&Request::get("/").header("X-Tenant-ID", "acme")).unwrap().allowed());
    assert!(!vm.request(&Request::get("/?tenant=ac%6De")).unwrap().allowed());
    assert!(vm.request(&Request::get("/?x=1&tenant=globex#frag")).unwrap().allowed());
}
