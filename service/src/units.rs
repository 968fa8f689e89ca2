//! The bucket representation the Lua script uses, and a Rust model of the script's math.
//!
//! Redis Lua numbers are doubles: integers are exact only below 2^53. The filter's ticks
//! (ns * 2^32, src/bucket.rs) reach 2^95, so the script uses a coarser unit and keeps every
//! number it computes below 2^53:
//!
//! - time unit `U` = 2^-10 microsecond (~0.98 ns). Redis `TIME` gives whole microseconds;
//!   multiplying by 2^10 is exact in binary floating point.
//! - a bucket's state is its *debt* `D` in U (how long until it is full again; the filter's
//!   `t_full - now`), the Redis time `T` in microseconds when it was written, and the
//!   interval `I` it was written with. `D <= tau = capacity * interval <= 2^53` is checked
//!   at config time, and `T` (~2^50.6 us in 2026) stays below 2^53 until the year 2255.
//! - the interval is the filter's `Limit::interval` rounded *up* to whole U, so the service
//!   can only be stricter than the filter, by at most 1 U per token (relative 1e-6 at 1000
//!   tokens/s).
//!
//! Otherwise the math is src/bucket.rs's `debit`: base = debt now, next = base + cost *
//! interval, admit when next <= tau; a limit change keeps the tokens already spent (as
//! `bucket::rescale`); a clock going backwards refills nothing.

use tenant_ratelimit::bucket::{Limit, TICKS_PER_NS};

/// Lua numbers are exact integers up to here.
pub const MAX_EXACT: u64 = 1 << 53;
/// U per microsecond.
pub const UNITS_PER_US: u64 = 1 << 10;
/// Filter ticks (ns * 2^32) per U.
const TICKS_PER_UNIT: u128 = 1000 * TICKS_PER_NS / UNITS_PER_US as u128;

/// A bucket's limit in the script's units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketLimit {
    pub capacity: u64,
    /// U per token.
    pub interval: u64,
}

impl BucketLimit {
    pub fn tau(&self) -> u64 {
        self.capacity.saturating_mul(self.interval)
    }
}

/// Converts the filter's limit; `Err` says why it does not fit the exact range.
pub fn limit_units(limit: &Limit) -> Result<BucketLimit, String> {
    let interval = limit.interval.div_ceil(TICKS_PER_UNIT).max(1);
    let tau = interval.saturating_mul(u128::from(limit.capacity));
    if tau > u128::from(MAX_EXACT) {
        let days = tau / (u128::from(UNITS_PER_US) * 1_000_000 * 86_400);
        let max_days = MAX_EXACT / (UNITS_PER_US * 1_000_000 * 86_400);
        return Err(format!(
            "an empty bucket takes {days} days to refill (capacity / refill_rate); the service keeps buckets exact up \
             to {max_days} days: raise refill_rate or lower capacity"
        ));
    }
    // tau <= 2^53 so both fit in u64.
    Ok(BucketLimit { capacity: limit.capacity, interval: interval as u64 })
}

#[cfg(test)] // part of the model of gcra.lua
/// The stored state of one bucket (the Redis value: D, T and I, packed by gcra.lua).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    pub debt: u64,
    pub written_us: u64,
    pub interval: u64,
}

#[cfg(test)] // part of the model of gcra.lua
/// One debit's outcome, as the script returns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub allowed: bool,
    /// Whole tokens left (after the debit when allowed).
    pub remaining: u64,
    /// U until the bucket is full again.
    pub reset: u64,
    /// U until this cost could be admitted (0 when allowed).
    pub retry: u64,
    /// The state to write when allowed.
    pub debt_after: u64,
}

#[cfg(test)] // part of the model of gcra.lua
/// The debt at `now_us` of a stored state, carried to `limit` (the script's `debt_now`).
pub fn debt_now(limit: &BucketLimit, state: Option<State>, now_us: u64) -> u64 {
    let Some(s) = state else { return 0 };
    let elapsed = now_us.saturating_sub(s.written_us).saturating_mul(UNITS_PER_US);
    let d = s.debt.saturating_sub(elapsed);
    if s.interval != limit.interval && d > 0 && s.interval > 0 {
        let spent = d.div_ceil(s.interval).min(limit.capacity);
        return spent * limit.interval;
    }
    // Same rate, smaller capacity: the debt never exceeds the new capacity.
    d.min(limit.tau())
}

#[cfg(test)] // part of the model of gcra.lua
/// The script's decision for one bucket.
pub fn debit(limit: &BucketLimit, debt: u64, cost: u64) -> Outcome {
    let tau = limit.tau();
    let interval = limit.interval.max(1);
    let next = debt.saturating_add(cost.saturating_mul(interval));
    if next <= tau {
        Outcome { allowed: true, remaining: (tau - next) / interval, reset: next, retry: 0, debt_after: next }
    } else {
        Outcome {
            allowed: false,
            remaining: tau.saturating_sub(debt) / interval,
            reset: debt,
            retry: next - tau,
            debt_after: debt,
        }
    }
}

#[cfg(test)] // part of the model of gcra.lua
/// What a refund may give back: the part of a debit of `cost` made at `debit_us` that cannot
/// have refilled by `now_us` (so a refund never restores a token the bucket would not have
/// had without the debit; see docs/service.md "Atomicity").
pub fn refundable(limit: &BucketLimit, cost: u64, debit_us: u64, now_us: u64) -> u64 {
    let elapsed = now_us.saturating_sub(debit_us).saturating_mul(UNITS_PER_US);
    cost.saturating_mul(limit.interval).saturating_sub(elapsed)
}

/// U to whole seconds, rounded up.
pub fn units_to_seconds_ceil(u: u64) -> u64 {
    u.div_ceil(UNITS_PER_US * 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tenant_ratelimit::bucket;

    const T0_US: u64 = 1_790_000_000 * 1_000_000;

    fn lim(capacity: u64, rate: f64) -> (Limit, BucketLimit) {
        let l = Limit::new(capacity, rate).unwrap();
        (l, limit_units(&l).unwrap())
    }

    /// Runs the model like the script: one state, requests at microsecond times.
    fn run(limit: &BucketLimit, times_us: &[u64], cost: u64) -> u64 {
        let mut state = None;
        let mut n = 0;
        for &t in times_us {
            let o = debit(limit, debt_now(limit, state, t), cost);
            if o.allowed {
                n += 1;
                state = Some(State { debt: o.debt_after, written_us: t, interval: limit.interval });
            }
        }
        n
    }

    fn run_filter(limit: &Limit, times_us: &[u64], cost: u64) -> u64 {
        let mut t_full = 0u128;
        let mut n = 0;
        for &t in times_us {
            let v = bucket::debit(limit, t_full, t * 1000, cost);
            if v.allowed {
                n += 1;
                t_full = v.t_full;
            }
        }
        n
    }

    #[test]
    fn a_smaller_capacity_at_the_same_rate_clamps_the_debt() {
        let (_, big) = lim(100, 1.0);
        let (_, small) = lim(2, 1.0);
        let spent = debit(&big, 0, 100);
        assert!(spent.allowed);
        let state = Some(State { debt: spent.debt_after, written_us: T0_US, interval: big.interval });
        assert_eq!(debt_now(&small, state, T0_US), small.tau());
    }

    #[test]
    fn gcra_not_a_window() {
        // Capacity 3 at 1/s: the burst, then exactly one more per second.
        let (_, l) = lim(3, 1.0);
        let mut state = None;
        let mut admitted_at = vec![];
        for ms in (0..5000u64).step_by(50) {
            let t = T0_US + ms * 1000;
            let o = debit(&l, debt_now(&l, state, t), 1);
            if o.allowed {
                admitted_at.push(ms);
                state = Some(State { debt: o.debt_after, written_us: t, interval: l.interval });
            }
        }
        assert_eq!(admitted_at, vec![0, 50, 100, 1000, 2000, 3000, 4000]);
    }

    #[test]
    fn exact_limits_fit_and_slow_ones_are_refused() {
        assert_eq!(lim(3, 1.0).1, BucketLimit { capacity: 3, interval: 1_024_000_000 });
        assert!(limit_units(&Limit::new(1000, 1.0 / 86_400.0).unwrap()).is_err());
        // 101 days of refill is the bound.
        assert!(limit_units(&Limit::new(100, 100.0 / (100.0 * 86_400.0)).unwrap()).is_ok());
    }

    #[test]
    fn limit_change_keeps_spent_tokens() {
        let (_, old) = lim(10, 1.0);
        let (_, new) = lim(4, 2.0);
        // 6 tokens spent; the new, smaller bucket owes at most its capacity.
        let s = State { debt: 6 * old.interval, written_us: T0_US, interval: old.interval };
        assert_eq!(debt_now(&new, Some(s), T0_US), 4 * new.interval);
        let (_, bigger) = lim(100, 2.0);
        assert_eq!(debt_now(&bigger, Some(s), T0_US), 6 * bigger.interval);
        // A clock that went backwards refills nothing.
        assert_eq!(debt_now(&old, Some(s), T0_US - 5_000_000), 6 * old.interval);
    }

    #[test]
    fn refund_never_restores_refilled_tokens() {
        let (_, l) = lim(3, 1.0);
        assert_eq!(refundable(&l, 2, T0_US, T0_US), 2 * l.interval);
        assert_eq!(refundable(&l, 2, T0_US, T0_US + 500_000), 2 * l.interval - l.interval / 2);
        assert_eq!(refundable(&l, 2, T0_US, T0_US + 3_000_000), 0);
    }

    proptest! {
        /// With a rate whose interval is a whole number of U, the script admits exactly what
        /// the filter's bucket admits; with any rate, never more.
        #[test]
        fn matches_the_filter(gaps in prop::collection::vec(0u64..400_000, 1..200), cap in 1u64..20, cost in 1u64..4,
                              rate_idx in 0usize..6) {
            let rate = [1.0, 0.5, 1000.0, 3.0, 7.3, 0.01][rate_idx];
            let (fl, sl) = lim(cap, rate);
            let mut t = T0_US;
            let times: Vec<u64> = gaps.iter().map(|g| { t += g; t }).collect();
            let service = run(&sl, &times, cost);
            let filter = run_filter(&fl, &times, cost);
            if rate_idx < 3 {
                prop_assert_eq!(service, filter);
            } else {
                prop_assert!(service <= filter);
            }
        }
    }
}
