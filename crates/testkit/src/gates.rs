//! Engine hooks that pause operations at chosen points, to force the
//! interleavings of the race tests deterministically.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use tokio::sync::Semaphore;
use writethrough_core::backend::async_trait;
use writethrough_core::{HookPoint, Hooks};

/// Hooks for [`writethrough_core::EngineBuilder::hooks`]: each [`Gate`]
/// pauses the first operation(s) that reach its point for its key.
#[derive(Default)]
pub struct Gates {
    gates: Mutex<Vec<Arc<GateInner>>>,
}

struct GateInner {
    point: HookPoint,
    key: String,
    to_pause: AtomicUsize,
    arrived: Semaphore,
    reached: AtomicUsize,
    release: Semaphore,
}

/// One pause point; see [`Gates::pause`].
#[derive(Clone)]
pub struct Gate(Arc<GateInner>);

impl Gates {
    /// New, with no gate.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Pauses the next `count` operations that reach `point` for `key`.
    pub fn pause(&self, point: HookPoint, key: &str, count: usize) -> Gate {
        let g = Arc::new(GateInner {
            point,
            key: key.to_owned(),
            to_pause: AtomicUsize::new(count),
            arrived: Semaphore::new(0),
            reached: AtomicUsize::new(0),
            release: Semaphore::new(0),
        });
        self.gates.lock().push(g.clone());
        Gate(g)
    }

    /// Counts, without pausing, every operation that reaches `point` for `key`.
    pub fn count(&self, point: HookPoint, key: &str) -> Gate {
        self.pause(point, key, 0)
    }
}

impl Gate {
    /// Waits until an operation is paused here (or, for a counting gate,
    /// has passed here).
    pub async fn arrived(&self) {
        self.0
            .arrived
            .acquire()
            .await
            .expect("the semaphore is never closed")
            .forget();
    }

    /// As [`Gate::arrived`], but gives up after `limit`: `false` if no
    /// operation came (a scenario whose precondition did not hold).
    pub async fn arrived_within(&self, limit: std::time::Duration) -> bool {
        tokio::time::timeout(limit, self.arrived()).await.is_ok()
    }

    /// Lets every paused operation go on, and any later one pass.
    pub fn release(&self) {
        self.0.to_pause.store(0, Ordering::SeqCst);
        self.0.release.add_permits(Semaphore::MAX_PERMITS / 2);
    }

    /// How many operations reached this point.
    pub fn reached(&self) -> usize {
        self.0.reached.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Hooks for Gates {
    async fn at(&self, point: HookPoint, key: &str) {
        let gates: Vec<Arc<GateInner>> = self
            .gates
            .lock()
            .iter()
            .filter(|g| g.point == point && g.key == key)
            .cloned()
            .collect();
        for g in gates {
            g.reached.fetch_add(1, Ordering::SeqCst);
            let pause = g
                .to_pause
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            g.arrived.add_permits(1);
            if pause {
                g.release
                    .acquire()
                    .await
                    .expect("the semaphore is never closed")
                    .forget();
            }
        }
    }
}
