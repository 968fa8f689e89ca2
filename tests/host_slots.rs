#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! The slot table bounds shared data: with `max_tenants` 50 and thousands of tenants, at
//! most 50 slot keys (+1 for `overflow`) exist, and the `live_slots` gauge equals the key count.

mod host;
use host::{Cluster, Request, Rng, Scheduler, Step, Vm, World, SEC};

fn slot_keys(world: &World) -> (usize, usize) {
    let data = world.shared_data();
    let overflow = data.keys().filter(|k| k.ends_with("/overflow")).count();
    (data.len() - overflow, overflow)
}

#[test]
fn thousands_of_tenants_use_at_most_max_tenants_keys() {
    let world = World::new();
    let vm = Vm::configured(&world, r#"{"capacity":2,"refill_rate":0.01,"max_tenants":50}"#);
    let mut admitted = 0;
    for i in 0..3000 {
        admitted += u32::from(vm.request(&Request::get("/").tenant(&format!("tenant-{i}"))).unwrap().allowed());
    }
    let (slots, overflow) = slot_keys(&world);
    assert!(slots <= 50, "{slots} slot keys");
    assert!(overflow <= 1);
    assert_eq!(world.metric("tenant_ratelimit.live_slots"), world.key_count() as i64, "gauge = key count");
    // 50 tenants got a slot; the rest shared the overflow bucket (capacity 2): never unlimited.
    assert!(admitted <= 50 * 2 + 2, "{admitted}");
    assert!(world.counter("tenant_ratelimit.overflow_used") > 2000);
    // Full buckets are reclaimed later, still within the bound.
    world.advance_ns(1000 * SEC as i64);
    for i in 3000..4000 {
        vm.request(&Request::get("/").tenant(&format!("tenant-{i}"))).unwrap();
    }
    let (slots, _) = slot_keys(&world);
    assert!(slots <= 50);
    assert!(world.counter("tenant_ratelimit.slots_reclaimed") > 0);
    assert_eq!(world.metric("tenant_ratelimit.live_slots"), world.key_count() as i64);
}

#[test]
fn the_bound_and_the_gauge_hold_across_interleaved_workers() {
    let config = r#"{"capacity":1,"refill_rate":1,"max_tenants":50,"overflow":"deny"}"#;
    let cluster = Cluster::new(4, config);
    let mut rng = Rng::new(99);
    let mut steps = Vec::new();
    for _ in 0..40 {
        for _ in 0..60 {
            steps.push(Step::Request(Request::get("/").tenant(&format!("t{}", rng.below(5000)))));
        }
        steps.push(Step::AdvanceNs(rng.below(3 * SEC)));
    }
    cluster.run(&steps, Scheduler::new(5)).unwrap();
    let world = &cluster.world;
    let (slots, overflow) = slot_keys(world);
    assert!(slots <= 50, "{slots}");
    assert_eq!(overflow, 0);
    assert_eq!(world.metric("tenant_ratelimit.live_slots"), world.key_count() as i64);
    assert!(world.counter("tenant_ratelimit.overflow_denied") > 0);
}
