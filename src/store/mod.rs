//! Buckets (and service grants) in Envoy shared data. The host is reached through
//! [`SharedStore`], so the same code runs against Envoy, the wasm test host, and the
//! in-memory [`fake`] of the unit tests.
//!
//! - [`record`]: the byte layouts (one codec), the owner hash, the key names.
//! - [`slots`]: the bounded slot table, reserved keys, debit and give-back.
//! - here: the compare-and-swap retry loop, [`retry`], which every read-modify-write uses.

pub mod record;
pub mod slots;

pub use record::{hash128, Key, Namespace, Record};
pub use slots::{
    candidates, debit, debit_named, give_back, Debit, Extra, Home, Location, Outcome, SlotTable, SlotUse, Unspent,
    Withdrawal,
};

/// The cas used to create a key. Envoy creates a missing key whatever cas is passed, but a
/// *nonzero* cas makes the write fail if another worker created the key in the meantime
/// (cas 0 would overwrite that worker's debit).
pub const CREATE_CAS: u32 = u32::MAX;
/// CAS attempts per request before `on_store_error` applies.
pub const MAX_CAS_ATTEMPTS: u32 = 16;

/// The host could not read shared data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GetError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetError {
    CasMismatch,
    Failed,
}

/// The shared-data calls the debit loop needs, with Envoy's semantics: a missing key reads
/// as `Ok(None)`; `set` with a stale nonzero cas on an existing key is `CasMismatch`.
pub trait SharedStore {
    fn get(&mut self, key: &str) -> Result<Option<(Vec<u8>, u32)>, GetError>;
    fn set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError>;
}

/// How one read-decide-write attempt ended.
pub enum Attempt<T> {
    Done(T),
    /// A CAS mismatch: another worker wrote in between; read again.
    Conflict,
    /// The host failed (or there is nothing to do).
    Failed,
}

/// The compare-and-swap retry loop, the only one: runs `attempt` until it is done or fails,
/// at most [`MAX_CAS_ATTEMPTS`] times, adding each conflict to `conflicts`. `None`: it
/// failed, or conflicted every time.
pub fn retry<T>(conflicts: &mut u32, mut attempt: impl FnMut() -> Attempt<T>) -> Option<T> {
    for _ in 0..MAX_CAS_ATTEMPTS {
        match attempt() {
            Attempt::Done(t) => return Some(t),
            Attempt::Conflict => *conflicts += 1,
            Attempt::Failed => return None,
        }
    }
    None
}

/// Writes `value` under `key` if its cas is still `cas`.
pub fn swap(store: &mut impl SharedStore, key: &str, value: &[u8], cas: u32) -> Attempt<()> {
    match store.set(key, value, cas) {
        Ok(()) => Attempt::Done(()),
        Err(SetError::CasMismatch) => Attempt::Conflict,
        Err(SetError::Failed) => Attempt::Failed,
    }
}

/// An in-memory store with Envoy's semantics, for unit tests of this module and others.
#[cfg(test)]
pub mod fake {
    use super::{GetError, SetError, SharedStore};
    use std::collections::BTreeMap;

    #[derive(Default)]
    pub struct FakeStore {
        pub data: BTreeMap<String, (Vec<u8>, u32)>,
        pub next_cas: u32,
        /// Fail this many upcoming `set`s with `CasMismatch`.
        pub conflicts: u32,
        pub fail_sets: bool,
        pub fail_gets: bool,
        pub gets: u32,
    }

    impl FakeStore {
        fn bump(&mut self) -> u32 {
            self.next_cas = self.next_cas.wrapping_add(1).max(1);
            self.next_cas
        }
    }

    impl SharedStore for FakeStore {
        fn get(&mut self, key: &str) -> Result<Option<(Vec<u8>, u32)>, GetError> {
            self.gets += 1;
            if self.fail_gets {
                return Err(GetError);
            }
            Ok(self.data.get(key).cloned())
        }

        fn set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
            if self.fail_sets {
                return Err(SetError::Failed);
            }
            if self.conflicts > 0 {
                self.conflicts -= 1;
                let c = self.bump();
                if let Some(entry) = self.data.get_mut(key) {
                    entry.1 = c;
                }
                return Err(SetError::CasMismatch);
            }
            let current = self.data.get(key).map(|e| e.1);
            if let Some(current) = current {
                if cas != 0 && cas != current {
                    return Err(SetError::CasMismatch);
                }
            }
            let c = self.bump();
            self.data.insert(key.to_string(), (value.to_vec(), c));
            Ok(())
        }
    }
}
