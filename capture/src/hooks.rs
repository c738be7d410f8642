//! Named pause points for deterministic race tests: a test installs a callback at a point
//! (the copier between reading and writing a chunk, a write between entering the gate and
//! writing the source...) and holds the thread there while it provokes the race. Built
//! only with the `test-hooks` feature (which the engine's tests turn on); without it a
//! point compiles to nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

/// What a hook learns: the point's name and the byte offset it is at (0 where none).
pub type Hook = Arc<dyn Fn(&str, u64) + Send + Sync>;

#[derive(Default)]
pub struct Hooks {
    enabled: AtomicBool,
    installed: Mutex<HashMap<&'static str, Hook>>,
}

impl Hooks {
    #[cfg(feature = "test-hooks")]
    pub fn set(&self, point: &'static str, hook: Hook) {
        self.installed.lock().insert(point, hook);
        self.enabled.store(true, Ordering::SeqCst);
    }

    #[cfg(feature = "test-hooks")]
    pub fn clear(&self) {
        self.installed.lock().clear();
        self.enabled.store(false, Ordering::SeqCst);
    }

    #[inline]
    pub fn fire(&self, point: &'static str, offset: u64) {
        if cfg!(feature = "test-hooks") && self.enabled.load(Ordering::Relaxed) {
            let hook = self.installed.lock().get(point).cloned();
            if let Some(hook) = hook {
                hook(point, offset);
            }
        }
    }
}
