//! The supervisor: runs the tasks of the committed snapshot. Tasks are keyed by [`TaskKey`]; a reload
//! starts the new keys, stops the keys that went, and replaces a task whose version changed (the new one
//! starts once the old one has stopped, so that, say, a consumer's partitions move over with their
//! committed offsets). At shutdown every task stops at once under one deadline, work before flushes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::task::JoinSet;

use crate::kernel::task::{Running, TaskCx, TaskKey, TaskSpec, Wave};

/// How long a task replaced or removed by a reload may take to stop.
pub const RELOAD_STOP: Duration = Duration::from_secs(15);

struct Entry {
    version: u64,
    wave: Wave,
    /// `None` while it starts after its predecessor, or when it could not start.
    running: Arc<Mutex<Option<Box<dyn Running>>>>,
}

#[derive(Default)]
pub struct Supervisor {
    tasks: Mutex<BTreeMap<TaskKey, Entry>>,
    /// Stops and hand-overs in progress: shutdown waits for them too.
    pending: Mutex<JoinSet<()>>,
    /// Set by shutdown: a hand-over in progress does not start its successor any more.
    stopping: Arc<AtomicBool>,
}

impl Supervisor {
    /// Makes the running tasks those of `specs`. Needs a Tokio runtime.
    pub fn reconcile(&self, specs: Vec<TaskSpec>, cx: &TaskCx) {
        let Ok(mut tasks) = self.tasks.lock() else { return };
        let Ok(mut pending) = self.pending.lock() else { return };
        let mut wanted: BTreeMap<TaskKey, TaskSpec> = BTreeMap::new();
        for spec in specs {
            if wanted.contains_key(&spec.key) {
                tracing::warn!(task = %spec.key, "two tasks of one snapshot have the same key; keeping the first");
                continue;
            }
            wanted.insert(spec.key.clone(), spec);
        }
        let gone: Vec<TaskKey> = tasks.keys().filter(|k| !wanted.contains_key(*k)).cloned().collect();
        for key in gone {
            if let Some(entry) = tasks.remove(&key) {
                tracing::info!(task = %key, "stopping a task the configuration no longer has");
                cx.metrics.tasks.with_label_values(&[key.component, key.kind, "stopped"]).inc();
                let running = entry.running;
                pending.spawn(async move { stop(take(&running), Instant::now() + RELOAD_STOP).await });
            }
        }
        for (key, spec) in wanted {
            match tasks.get(&key) {
                Some(entry) if entry.version == spec.version => continue,
                Some(entry) => {
                    // Replaced: the successor starts once its predecessor has stopped.
                    tracing::info!(task = %key, "replacing a task whose configuration changed");
                    cx.metrics.tasks.with_label_values(&[key.component, key.kind, "replaced"]).inc();
                    let before = take(&entry.running);
                    let slot = Arc::new(Mutex::new(None));
                    let (cx, into, stopping) = (cx.clone(), slot.clone(), self.stopping.clone());
                    pending.spawn(async move {
                        stop(before, Instant::now() + RELOAD_STOP).await;
                        // Under the slot's lock, so that shutdown either sees the successor or it never starts.
                        if let Ok(mut into) = into.lock()
                            && !stopping.load(Ordering::SeqCst)
                        {
                            *into = start(spec.key.clone(), spec.start, &cx);
                        }
                    });
                    tasks.insert(key, Entry { version: spec.version, wave: spec.wave, running: slot });
                }
                None => {
                    let running = start(key.clone(), spec.start, cx);
                    tasks.insert(
                        key,
                        Entry { version: spec.version, wave: spec.wave, running: Arc::new(Mutex::new(running)) },
                    );
                }
            }
        }
        // Forget what finished.
        while pending.try_join_next().is_some() {}
    }

    /// Stops every task by `deadline`: consumers and relays first, in parallel, then what they publish
    /// through.
    pub async fn shutdown(&self, deadline: Instant) {
        self.stopping.store(true, Ordering::SeqCst);
        let (work, flush) = {
            let Ok(mut tasks) = self.tasks.lock() else { return };
            let all = std::mem::take(&mut *tasks);
            let mut work = Vec::new();
            let mut flush = Vec::new();
            for (_, entry) in all {
                match entry.wave {
                    Wave::Work => work.push(entry.running),
                    Wave::Flush => flush.push(entry.running),
                }
            }
            (work, flush)
        };
        let pending = self.pending.lock().map(|mut p| std::mem::take(&mut *p)).unwrap_or_default();
        let all = async move {
            // A hand-over in progress finishes stopping its predecessor; then whatever started is stopped.
            let work = async {
                futures::future::join_all(work.iter().map(|r| stop(take(r), deadline))).await;
                pending.join_all().await;
                futures::future::join_all(work.iter().map(|r| stop(take(r), deadline))).await;
            };
            work.await;
            futures::future::join_all(flush.iter().map(|r| stop(take(r), deadline))).await;
        };
        if tokio::time::timeout_at(deadline.into(), all).await.is_err() {
            tracing::warn!("some tasks did not stop before the shutdown deadline");
        }
    }

    /// The keys of the running tasks (for `/status` and tests).
    pub fn keys(&self) -> Vec<TaskKey> {
        self.tasks.lock().map(|t| t.keys().cloned().collect()).unwrap_or_default()
    }
}

fn take(slot: &Arc<Mutex<Option<Box<dyn Running>>>>) -> Option<Box<dyn Running>> {
    slot.lock().ok().and_then(|mut s| s.take())
}

fn stop(running: Option<Box<dyn Running>>, deadline: Instant) -> BoxFuture<'static, ()> {
    match running {
        Some(running) => running.stop(deadline),
        None => Box::pin(async {}),
    }
}

fn start(key: TaskKey, start: crate::kernel::task::Start, cx: &TaskCx) -> Option<Box<dyn Running>> {
    match start(cx) {
        Ok(running) => {
            cx.metrics.tasks.with_label_values(&[key.component, key.kind, "started"]).inc();
            Some(running)
        }
        Err(error) => {
            tracing::error!(task = %key, %error, "a task could not start");
            cx.metrics.tasks.with_label_values(&[key.component, key.kind, "failed"]).inc();
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::health::Health;
    use crate::kernel::metrics::Metrics;
    use crate::kernel::ports::Loopback;

    /// Records starts and stops; stopping takes `takes`.
    struct Probe {
        name: &'static str,
        log: Arc<Mutex<Vec<String>>>,
        takes: Duration,
    }

    impl Running for Probe {
        fn stop(self: Box<Self>, _deadline: Instant) -> BoxFuture<'static, ()> {
            Box::pin(async move {
                tokio::time::sleep(self.takes).await;
                self.log.lock().unwrap().push(format!("stopped {}", self.name));
            })
        }
    }

    fn spec(name: &'static str, version: u64, log: &Arc<Mutex<Vec<String>>>, takes: Duration) -> TaskSpec {
        let log = log.clone();
        TaskSpec::new(TaskKey::new("test", "probe", name), version, move |_| {
            log.lock().unwrap().push(format!("started {name} v{version}"));
            Ok(Box::new(Probe { name, log, takes }) as Box<dyn Running>)
        })
    }

    fn cx() -> TaskCx {
        TaskCx {
            health: Health::default(),
            metrics: Metrics::new().unwrap(),
            loopback: Loopback::default(),
            first: true,
        }
    }

    #[tokio::test]
    async fn reloads_keep_equal_versions_replace_changed_ones_after_they_stopped_and_stop_the_rest() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let supervisor = Supervisor::default();
        let cx = cx();
        let slow = Duration::from_millis(200);
        supervisor.reconcile(vec![spec("a", 1, &log, slow), spec("b", 1, &log, slow), spec("c", 1, &log, slow)], &cx);
        supervisor.reconcile(vec![spec("a", 1, &log, slow), spec("b", 2, &log, slow)], &cx);
        let waited = Instant::now();
        while !log.lock().unwrap().contains(&"started b v2".to_string()) {
            assert!(waited.elapsed() < Duration::from_secs(5), "b v2 never started: {:?}", log.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
        let seen = log.lock().unwrap().clone();
        assert_eq!(seen.iter().filter(|l| l.starts_with("started a")).count(), 1, "{seen:?}");
        let stopped_b = seen.iter().position(|l| l == "stopped b").unwrap();
        let started_b2 = seen.iter().position(|l| l == "started b v2").unwrap();
        assert!(stopped_b < started_b2, "the successor starts after its predecessor stopped: {seen:?}");
        assert!(seen.contains(&"stopped c".to_string()), "{seen:?}");
        assert_eq!(seen.iter().filter(|l| l.starts_with("stopped")).count(), 4, "a, b (v1 and v2), c: {seen:?}");
    }

    #[tokio::test]
    async fn a_hand_over_in_progress_at_shutdown_does_not_start_the_successor() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let supervisor = Supervisor::default();
        let cx = cx();
        supervisor.reconcile(vec![spec("b", 1, &log, Duration::from_millis(200))], &cx);
        supervisor.reconcile(vec![spec("b", 2, &log, Duration::ZERO)], &cx);
        supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(log.lock().unwrap().clone(), ["started b v1", "stopped b"]);
    }

    #[tokio::test]
    async fn shutdown_stops_tasks_in_parallel_under_one_deadline() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let supervisor = Supervisor::default();
        let specs = (0..5u64)
            .map(|i| {
                let name: &'static str = ["t0", "t1", "t2", "t3", "t4"][i as usize];
                spec(name, 1, &log, Duration::from_millis(300))
            })
            .collect();
        supervisor.reconcile(specs, &cx());
        let started = Instant::now();
        supervisor.shutdown(Instant::now() + Duration::from_secs(10)).await;
        // One after another would take 1.5 s.
        assert!(started.elapsed() < Duration::from_millis(1200), "took {:?}", started.elapsed());
        assert_eq!(log.lock().unwrap().iter().filter(|l| l.starts_with("stopped")).count(), 5);

        // A task that does not stop in time is given up at the deadline.
        let stuck = Supervisor::default();
        stuck.reconcile(vec![spec("stuck", 1, &log, Duration::from_secs(60))], &cx());
        let started = Instant::now();
        stuck.shutdown(Instant::now() + Duration::from_millis(300)).await;
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn a_task_that_cannot_start_is_counted_and_the_others_run() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let supervisor = Supervisor::default();
        let cx = cx();
        let failing = TaskSpec::new(TaskKey::new("test", "probe", "broken"), 1, |_| Err("no".to_string()));
        supervisor.reconcile(vec![failing, spec("ok", 1, &log, Duration::ZERO)], &cx);
        assert_eq!(supervisor.keys().len(), 2);
        assert_eq!(cx.metrics.tasks.with_label_values(&["test", "probe", "failed"]).get(), 1);
        assert_eq!(log.lock().unwrap().clone(), ["started ok v1"]);
    }
}
