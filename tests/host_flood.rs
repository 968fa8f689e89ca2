#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! Issue 15, item 2: a flood of junk tenant ids fills every slot of the slot table with live
//! buckets (and drains the overflow bucket), yet a tenant listed in the config, never seen
//! before the flood, and its per-rule bucket still get exactly their capacity: listed tenants
//! have reserved keys outside the slot table. Two workers over one shared store.

mod host;
use host::{Request, Vm, World};

const MAX_TENANTS: usize = 300;
const CONFIG: &str = r#"{"capacity":5,"refill_rate":0.001,"max_tenants":300,
    "tenants":{"vip":{"capacity":10,"refill_rate":0.001}},
    "rules":[{"name":"login","path_prefix":"/login","capacity":3,"refill_rate":0.001},{"path_prefix":"/"}]}"#;

fn admitted(vms: &[Vm], req: &Request, n: usize) -> usize {
    (0..n).filter(|i| vms[i % vms.len()].request(req).unwrap().allowed()).count()
}

#[test]
fn a_junk_id_flood_never_locks_out_a_listed_tenant_or_its_rule_bucket() {
    let world = World::new();
    let vms = [Vm::configured(&world, CONFIG), Vm::configured(&world, CONFIG)];
    // The flood: many more fresh ids than slots, on both workers; with a refill of 0.001/s
    // no junk bucket is full again, so no slot can be reclaimed.
    for i in 0..4 * MAX_TENANTS {
        let id = format!("junk-{:08x}", (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        vms[i % 2].request(&Request::get("/").tenant(&id)).unwrap();
    }
    let slot_keys = world.shared_data().keys().filter(|k| k.rsplit('/').next().unwrap().parse::<u32>().is_ok()).count();
    assert_eq!(slot_keys, MAX_TENANTS, "every slot holds a junk bucket");
    assert!(world.counter("tenant_ratelimit.overflow_used") > 2 * MAX_TENANTS as u64);
    // The overflow bucket is drained: one more junk id is denied.
    assert!(!vms[0].request(&Request::get("/").tenant("junk-late")).unwrap().allowed());

    // `vip` arrives after the flood: exactly its 10 tokens, then exactly its login rule's 3.
    assert_eq!(admitted(&vms, &Request::get("/").tenant("vip"), 15), 10);
    assert_eq!(admitted(&vms, &Request::get("/login").tenant("vip"), 6), 3);
    assert_eq!(world.counter("tenant_ratelimit.tenant.vip.allowed"), 10);
    assert_eq!(world.counter("tenant_ratelimit.rule.login.allowed"), 3);

    // Bounded by the config, not by traffic: the slots, the overflow key, and two reserved
    // keys (vip, vip's login bucket); the gauge counts them all.
    let keys = world.shared_data();
    assert_eq!(keys.len(), MAX_TENANTS + 1 + 2);
    assert_eq!(keys.keys().filter(|k| k.rsplit('/').next().unwrap().starts_with('r')).count(), 2);
    assert!(keys.keys().all(|k| k.starts_with("trl/")));
    assert_eq!(world.metric("tenant_ratelimit.live_slots"), keys.len() as i64);

    // A second flood changes nothing for vip: still exhausted, not refilled, not lost.
    for i in 0..MAX_TENANTS {
        vms[i % 2].request(&Request::get("/login").tenant(&format!("more-{i}"))).unwrap();
    }
    assert_eq!(admitted(&vms, &Request::get("/").tenant("vip"), 4), 0);
    assert_eq!(world.key_count(), MAX_TENANTS + 1 + 2);
}

#[test]
fn a_listed_tenants_worker_leases_go_back_to_its_reserved_bucket() {
    let config = r#"{"capacity":5,"refill_rate":0.001,"max_tenants":10,"worker_lease":4,
        "tenants":{"vip":{"capacity":100,"refill_rate":0.001}}}"#;
    let world = World::new();
    let vms = [Vm::configured(&world, config), Vm::configured(&world, config)];
    for i in 0..100 {
        vms[i % 2].request(&Request::get("/").tenant(&format!("junk-{i}"))).unwrap();
    }
    let vip = Request::get("/").tenant("vip");
    let mut n = admitted(&vms, &vip, 30);
    assert_eq!(n, 30);
    // Both workers give their unspent lease tokens back (as on a tick; a config push
    // settles them the same way), then drain the bucket.
    for vm in &vms {
        assert!(vm.configure(config).unwrap());
    }
    n += admitted(&vms, &vip, 200);
    assert_eq!(n, 100, "leases neither leaked nor lost tokens");
}
