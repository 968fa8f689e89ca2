#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! Bad plugin configurations are refused by `on_configure` with one log line naming the field.

mod host;
use host::{Level, Request, Vm, World};

/// (config, the field the error must name; "" for errors about the whole document)
const BAD: &[(&str, &str)] = &[
    // unknown fields, at each level
    (r#"{"capacity":10,"refill_rate":1,"capacty":5}"#, "capacty"),
    (r#"{"capacity":10,"refill_rate":1,"tenants":{"acme":{"capacity":1,"burst":2}}}"#, "tenants.acme.burst"),
    (r#"{"capacity":10,"refill_rate":1,"tenant":{"form":[]}}"#, "tenant.form"),
    (r#"{"capacity":10,"refill_rate":1,"deny":{"status":429,"bodyy":"x"}}"#, "deny.bodyy"),
    // wrong types
    (r#"{"capacity":"ten","refill_rate":1}"#, "capacity"),
    (r#"{"capacity":10,"refill_rate":true}"#, "refill_rate"),
    (r#"{"capacity":10,"refill_rate":1,"tenants":[]}"#, "tenants"),
    (r#"{"capacity":10,"refill_rate":1,"mode":1}"#, "mode"),
    (r#"{"capacity":10,"refill_rate":1,"rules":{"path_prefix":"/"}}"#, "rules"),
    // out of range
    (r#"{"capacity":0,"refill_rate":1}"#, "capacity"),
    (r#"{"capacity":1.5,"refill_rate":1}"#, "capacity"),
    (r#"{"capacity":10,"refill_rate":0}"#, "refill_rate"),
    (r#"{"capacity":10,"refill_rate":-1}"#, "refill_rate"),
    (r#"{"capacity":10,"refill_rate":1,"max_tenants":0}"#, "max_tenants"),
    (r#"{"capacity":10,"refill_rate":1,"tenants":{"acme":{"capacity":0}}}"#, "tenants.acme.capacity"),
    // bad rate units
    (r#"{"capacity":10,"refill_rate":"5/fortnight"}"#, "refill_rate"),
    (r#"{"capacity":10,"refill_rate":"fast"}"#, "refill_rate"),
    (r#"{"capacity":10,"refill_rate":1,"tenants":{"acme":{"refill_rate":"2/lightyear"}}}"#, "tenants.acme.refill_rate"),
    // bad enum values
    (r#"{"capacity":10,"refill_rate":1,"on_store_error":"maybe"}"#, "on_store_error"),
    // required field missing
    (r#"{"refill_rate":1}"#, "capacity"),
];

const NOT_JSON: &[&str] = &["", "{", "capacity: 10", "{\"capacity\":10,}", "\u{0}\u{1}"];

#[test]
fn each_kind_of_bad_config_is_refused_with_a_line_naming_the_field() {
    let world = World::new();
    for (config, field) in BAD {
        let vm = Vm::new(&world).unwrap();
        let accepted = vm.configure(config).unwrap();
        let logs = vm.logs();
        assert!(!accepted, "accepted {config}");
        let errors: Vec<_> = logs.iter().filter(|l| l.level >= Level::Error).collect();
        assert_eq!(errors.len(), 1, "{config}: {logs:?}");
        let want = format!("invalid plugin config: field `{field}`: ");
        assert!(errors[0].message.contains(&want), "{config}: wanted {want:?} in {:?}", errors[0].message);
    }
}

#[test]
fn not_json_is_refused_with_a_clear_line() {
    let world = World::new();
    for config in NOT_JSON {
        let vm = Vm::new(&world).unwrap();
        assert!(!vm.configure(config).unwrap(), "accepted {config:?}");
        let logs = vm.logs();
        assert!(
            logs.iter().any(|l| l.level == Level::Error && l.message.contains("invalid plugin config: not valid JSON")),
            "{config:?}: {logs:?}"
        );
    }
    // Bytes that are not UTF-8 at all.
    let vm = Vm::new(&world).unwrap();
    assert!(!vm.configure_bytes(&[0xff, 0xfe, b'{']).unwrap());
}

#[test]
fn the_seed_config_and_the_full_example_are_accepted() {
    let world = World::new();
    let vm = Vm::new(&world).unwrap();
    assert!(vm.configure(r#"{"capacity":1000,"refill_rate":100}"#).unwrap(), "{:?}", vm.logs());
    let full = r#"{
      "capacity": 1000, "refill_rate": 100,
      "tenant": {"from": [{"header": "x-tenant-id"}, {"query": "tenant"}], "default": "default"},
      "tenants": {"acme": {"capacity": 120, "refill_rate": 2}, "globex": {"capacity": 300, "refill_rate": 5}},
      "rules": [{"methods": ["GET", "HEAD"], "path_prefix": "/", "cost": 1}],
      "deny": {"status": 429, "body": "{\"error\":\"Too Many Requests\"}", "content_type": "application/json"},
      "rate_limit_headers": true, "mode": "enforce", "on_store_error": "allow", "max_tenants": 10000
    }"#;
    let vm = Vm::new(&world).unwrap();
    assert!(vm.configure(full).unwrap(), "{:?}", vm.logs());
    assert!(vm.request(&Request::get("/").tenant("acme")).unwrap().allowed());
}

#[test]
fn a_refused_reconfiguration_keeps_the_previous_config_working() {
    let world = World::new();
    let vm = Vm::configured(&world, r#"{"capacity":2,"refill_rate":"1/h"}"#);
    assert!(!vm.configure(r#"{"capacity":"many","refill_rate":1}"#).unwrap());
    let r = Request::get("/").tenant("a");
    assert!(vm.request(&r).unwrap().allowed());
    assert!(vm.request(&r).unwrap().allowed());
    assert!(!vm.request(&r).unwrap().allowed());
}

/// The filter's comment (src/filter/mod.rs, `create_http_context`) says a stream on a plugin whose
/// `on_configure` failed passes through. It does not: it returns `None`, on which the SDK
/// panics ("create_http_context returned None") and the VM aborts.
#[test]
fn a_stream_on_a_never_configured_plugin_passes_through() {
    let world = World::new();
    let vm = Vm::new(&world).unwrap();
    assert!(!vm.configure("{").unwrap());
    let r = vm.request(&Request::get("/").tenant("a"));
    assert!(r.as_ref().is_ok_and(|r| r.allowed()), "{}", r.err().map(|e| e.to_string()).unwrap_or_default());
}
