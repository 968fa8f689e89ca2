#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! Virtual time: slow rates refill exactly over hours, a clock going backwards creates no
//! tokens, and a long idle refills to exactly the capacity.

mod host;
use host::{Request, Vm, World, SEC};

/// Sends up to `n` requests for `tenant` now; returns how many were admitted.
fn burst(vm: &Vm, tenant: &str, n: usize) -> usize {
    let r = Request::get("/").tenant(tenant);
    (0..n).filter(|_| vm.request(&r).unwrap().allowed()).count()
}

#[test]
fn hours_at_a_hundredth_of_a_token_per_second_refill_exactly() {
    let world = World::new();
    let vm = Vm::configured(&world, r#"{"capacity":1000,"refill_rate":0.01}"#);
    assert_eq!(burst(&vm, "slow", 1000), 1000);
    assert_eq!(burst(&vm, "slow", 5), 0);
    // One token per 100 s: after 10 h minus a second, 359; the 360th arrives at 10 h.
    world.advance_ns((10 * 3600 - 1) * SEC as i64);
    assert_eq!(burst(&vm, "slow", 400), 359);
    world.advance_ns(SEC as i64);
    assert_eq!(burst(&vm, "slow", 400), 1);
    // Fractional refill accrues across many short steps (the seed's Go bucket lost it).
    let mut admitted = 0;
    for _ in 0..(3 * 3600) {
        world.advance_ns(SEC as i64);
        admitted += burst(&vm, "slow", 1);
    }
    assert_eq!(admitted, 108); // 3 h at 0.01/s
}

#[test]
fn a_slow_rate_with_capacity_one_is_never_starved() {
    let world = World::new();
    let vm = Vm::configured(&world, r#"{"capacity":1,"refill_rate":"36/h"}"#); // one per 100 s
    let mut admitted = 0;
    for _ in 0..(2 * 3600 / 7) {
        admitted += burst(&vm, "t", 1);
        world.advance_ns(7 * SEC as i64);
    }
    // 7194 s of asking every 7 s: the first token, then one per 100 s lost by at most 7 s each.
    assert!((67..=72).contains(&admitted), "{admitted}");
}

#[test]
fn clock_jumping_backwards_creates_no_tokens() {
    let world = World::new();
    let vm = Vm::configured(&world, r#"{"capacity":5,"refill_rate":1}"#);
    assert_eq!(burst(&vm, "t", 10), 5);
    world.advance_ns(-3600 * SEC as i64);
    assert_eq!(burst(&vm, "t", 10), 0, "going back an hour");
    world.advance_ns(3600 * SEC as i64 - 1);
    assert_eq!(burst(&vm, "t", 10), 0, "back to just before the spend");
    world.advance_ns(1 + 2 * SEC as i64);
    assert_eq!(burst(&vm, "t", 10), 2, "two seconds after the spend, two tokens");
    // A backwards jump right after a refill takes nothing away that was granted, adds nothing.
    world.advance_ns(-10 * SEC as i64);
    assert_eq!(burst(&vm, "t", 10), 0);
}

#[test]
fn long_idle_refills_to_exactly_capacity() {
    let world = World::new();
    let vm = Vm::configured(&world, r#"{"capacity":7,"refill_rate":3,"tenants":{"vip":{"capacity":50}}}"#);
    assert_eq!(burst(&vm, "t", 100), 7);
    assert_eq!(burst(&vm, "vip", 100), 50);
    world.advance_ns(30 * 24 * 3600 * SEC as i64);
    assert_eq!(burst(&vm, "t", 100), 7);
    assert_eq!(burst(&vm, "vip", 100), 50);
    let r = vm.request(&Request::get("/").tenant("t")).unwrap();
    assert_eq!(r.local_reply.unwrap().header("retry-after"), Some("1"));
}

/// The module's only clock is the host's (proxy_get_current_time_nanoseconds, served from
/// the virtual clock): a token comes back exactly when virtual time crosses its refill
/// instant, not a nanosecond before, however long the test itself takes.
#[test]
fn the_filter_reads_the_virtual_clock() {
    let world = World::new();
    world.set_time_ns(5 * SEC);
    let vm = Vm::configured(&world, r#"{"capacity":1,"refill_rate":1}"#);
    assert_eq!(burst(&vm, "t", 3), 1);
    world.set_time_ns(6 * SEC - 1);
    assert_eq!(burst(&vm, "t", 3), 0);
    world.set_time_ns(6 * SEC);
    assert_eq!(burst(&vm, "t", 3), 1);
}
