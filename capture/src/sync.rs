//! The synchronization primitives of the gate and the range lock, behind one name so that
//! the `shuttle` feature can swap in shuttle's (a randomized scheduler that explores
//! thread interleavings) for the concurrency tests. The normal build uses parking_lot,
//! std's atomics and arc-swap, with no cost from this indirection.

#[cfg(not(feature = "shuttle"))]
mod imp {
    pub use parking_lot::{Condvar, Mutex};
    pub use std::sync::atomic::{AtomicU64, AtomicUsize};

    pub type SwapOption<T> = arc_swap::ArcSwapOption<T>;

    pub fn yield_now() {
        std::thread::yield_now();
    }

    pub fn pause() {
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}

#[cfg(feature = "shuttle")]
mod imp {
    //! Shuttle's primitives with the parking_lot-style interface the code uses.
    use std::ops::{Deref, DerefMut};
    use std::sync::Arc;

    pub use shuttle::sync::atomic::{AtomicU64, AtomicUsize};

    #[derive(Debug, Default)]
    pub struct Mutex<T>(shuttle::sync::Mutex<T>);

    pub struct MutexGuard<'a, T>(Option<shuttle::sync::MutexGuard<'a, T>>);

    impl<T> Mutex<T> {
        pub fn new(value: T) -> Mutex<T> {
            Mutex(shuttle::sync::Mutex::new(value))
        }

        pub fn lock(&self) -> MutexGuard<'_, T> {
            MutexGuard(Some(self.0.lock().expect("not poisoned")))
        }
    }

    impl<T> Deref for MutexGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            self.0.as_ref().expect("held")
        }
    }

    impl<T> DerefMut for MutexGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            self.0.as_mut().expect("held")
        }
    }

    #[derive(Debug, Default)]
    pub struct Condvar(shuttle::sync::Condvar);

    impl Condvar {
        pub fn wait<T>(&self, guard: &mut MutexGuard<'_, T>) {
            let inner = guard.0.take().expect("held");
            guard.0 = Some(self.0.wait(inner).expect("not poisoned"));
        }

        pub fn notify_all(&self) {
            self.0.notify_all();
        }
    }

    /// arc-swap's `ArcSwapOption`, as a mutex (shuttle cannot see inside arc-swap).
    pub struct SwapOption<T>(shuttle::sync::Mutex<Option<Arc<T>>>);

    impl<T> SwapOption<T> {
        pub const fn const_empty() -> SwapOption<T> {
            SwapOption(shuttle::sync::Mutex::new(None))
        }

        pub fn load_full(&self) -> Option<Arc<T>> {
            self.0.lock().expect("not poisoned").clone()
        }

        pub fn swap(&self, next: Option<Arc<T>>) -> Option<Arc<T>> {
            std::mem::replace(&mut *self.0.lock().expect("not poisoned"), next)
        }
    }

    pub fn yield_now() {
        shuttle::thread::yield_now();
    }

    pub fn pause() {
        shuttle::thread::yield_now();
    }
}

pub use imp::*;
