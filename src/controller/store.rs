//! The cluster as the watchers last saw it, shared between the watcher tasks
//! (which write it) and the sync thread (which snapshots it).
//!
//! Every critical section is short: a watcher applies one event; the sync
//! thread clones the inventory, whose objects are shared, and translates the
//! clone outside the lock. So a sync never holds up the watchers.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::inventory::Inventory;
use crate::source::watch::{ObjectKind, Sink, Trigger};

/// News for the sync thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// Something changed.
    Changed,
    /// Every initial list is complete.
    Ready,
    /// Stop after the current sync.
    Stop,
}

/// At most this many trigger times wait for a sync; beyond it the latency
/// metric loses samples rather than memory growing while syncs fail.
const MAX_PENDING_TRIGGERS: usize = 10_000;

/// What the sync thread takes for one sync.
#[derive(Debug)]
pub struct Snapshot {
    pub inventory: Inventory,
    /// `endpoints.kubernetes.io/last-change-trigger-time` of the slice changes
    /// this snapshot includes.
    pub triggers: Vec<Trigger>,
}

#[derive(Default)]
struct Inner {
    inventory: Inventory,
    listed: [bool; 3],
    ready: bool,
    triggers: Vec<Trigger>,
}

/// Told of changes, with the lock released (health, metrics).
pub trait Hooks: Send + Sync + 'static {
    fn changed(&self, kind: ObjectKind);
    fn node_eligible(&self, eligible: bool);
}

pub struct Store {
    inner: Mutex<Inner>,
    wake: Mutex<Sender<Wake>>,
    hooks: Arc<dyn Hooks>,
}

fn index(kind: ObjectKind) -> usize {
    match kind {
        ObjectKind::Service => 0,
        ObjectKind::EndpointSlice => 1,
        ObjectKind::Node => 2,
    }
}

impl Store {
    pub fn new(wake: Sender<Wake>, hooks: Arc<dyn Hooks>) -> Self {
        Store {
            inner: Mutex::new(Inner::default()),
            wake: Mutex::new(wake),
            hooks,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while applying one event leaves a usable inventory.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn send(&self, wake: Wake) {
        // The sync thread is gone only when kproxy stops.
        let _ = self
            .wake
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(wake);
    }

    /// Asks the sync thread to stop.
    pub fn stop(&self) {
        self.send(Wake::Stop);
    }

    /// The inventory as of now, and the trigger times it covers.
    pub fn snapshot(&self) -> Snapshot {
        let mut inner = self.lock();
        Snapshot {
            inventory: inner.inventory.clone(),
            triggers: std::mem::take(&mut inner.triggers),
        }
    }

    /// Gives back the trigger times of a sync that failed, for the next one.
    pub fn requeue_triggers(&self, mut triggers: Vec<Trigger>) {
        let mut inner = self.lock();
        triggers.append(&mut inner.triggers);
        triggers.truncate(MAX_PENDING_TRIGGERS);
        inner.triggers = triggers;
    }

    #[cfg(test)]
    fn is_ready(&self) -> bool {
        self.lock().ready
    }

    fn changed(&self, kind: ObjectKind) {
        self.hooks.changed(kind);
        self.send(Wake::Changed);
    }
}

impl Sink for Store {
    fn change(
        &self,
        kind: ObjectKind,
        trigger: Option<Trigger>,
        apply: &mut dyn FnMut(&mut Inventory) -> bool,
    ) {
        let changed = {
            let mut inner = self.lock();
            let changed = apply(&mut inner.inventory);
            if changed
                && let Some(t) = trigger
                && inner.triggers.len() < MAX_PENDING_TRIGGERS
            {
                inner.triggers.push(t);
            }
            changed
        };
        if changed {
            self.changed(kind);
        }
    }

    fn listed(&self, kind: ObjectKind, apply: &mut dyn FnMut(&mut Inventory) -> bool) {
        let (changed, now_ready) = {
            let mut inner = self.lock();
            let changed = apply(&mut inner.inventory);
            inner.listed[index(kind)] = true;
            let now_ready = !inner.ready && inner.listed.iter().all(|l| *l);
            inner.ready |= now_ready;
            (changed, now_ready)
        };
        if changed {
            self.changed(kind);
        }
        if now_ready {
            self.send(Wake::Ready);
        }
    }

    fn node_eligible(&self, eligible: bool) {
        self.hooks.node_eligible(eligible);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::testutil;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    #[derive(Default)]
    struct Counter(AtomicUsize);

    impl Hooks for Counter {
        fn changed(&self, _: ObjectKind) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        fn node_eligible(&self, _: bool) {}
    }

    fn store() -> (Store, mpsc::Receiver<Wake>, Arc<Counter>) {
        let (tx, rx) = mpsc::channel();
        let hooks = Arc::new(Counter::default());
        let store = Store::new(tx, hooks.clone());
        (store, rx, hooks)
    }

    #[test]
    fn ready_once_every_kind_is_listed() {
        let (store, rx, _) = store();
        store.listed(ObjectKind::Service, &mut |_| false);
        store.listed(ObjectKind::EndpointSlice, &mut |_| false);
        assert!(!store.is_ready());
        assert!(rx.try_recv().is_err());
        store.listed(ObjectKind::Node, &mut |_| false);
        assert!(store.is_ready());
        assert_eq!(rx.try_recv(), Ok(Wake::Ready));
        // A relist later is not a second "ready".
        store.listed(ObjectKind::Node, &mut |_| false);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn only_real_changes_wake_the_sync_thread() {
        let (store, rx, hooks) = store();
        let svc = testutil::service("spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}");
        store.change(ObjectKind::Service, None, &mut |inv| inv.add_service(&svc));
        assert_eq!(rx.try_recv(), Ok(Wake::Changed));
        store.change(ObjectKind::Service, None, &mut |inv| inv.add_service(&svc));
        assert!(rx.try_recv().is_err());
        assert_eq!(hooks.0.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn trigger_times_ride_with_the_snapshot_and_come_back_on_failure() {
        let (store, _rx, _) = store();
        let t = Trigger {
            family: kproxy_model::IpFamily::V4,
            time: std::time::SystemTime::UNIX_EPOCH,
        };
        store.change(ObjectKind::EndpointSlice, Some(t), &mut |_| true);
        store.change(ObjectKind::EndpointSlice, Some(t), &mut |_| false);
        let snap = store.snapshot();
        assert_eq!(snap.triggers, [t]);
        assert!(store.snapshot().triggers.is_empty());
        store.requeue_triggers(snap.triggers);
        assert_eq!(store.snapshot().triggers.len(), 1);
    }
}
