//! "One worker must not spoil the pool": which models the other workers of this pool (same prefix
//! and consumer) serve, learned from their service endpoints, so that a job for a model this
//! worker lacks is handed back for them instead of answered `unknown_model`. `unknown_model`
//! stays the answer for models no worker of the pool serves.
//!
//! Handing a job back costs one of its deliveries (`max_deliver`), and an idle worker always has
//! a pull waiting, so this worker pauses its pulls after such a hand-back (longer when it keeps
//! getting them back, see [`Backoff`]), and the last delivery is answered with an error that says
//! what happened instead of handed back (see `results::decide`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::Client;
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use crate::bus::PullGate;
use crate::job::{ErrorCode, JobError};
use crate::pool::{self, verb, WorkerInfo};

/// The delay of a hand-back: longer than a pull request's expiry (1 s), so the pull this worker
/// had open when it handed the job back has ended before the job is offered again.
pub(crate) const HANDOFF_DELAY: Duration = Duration::from_secs(2);
/// The first pause of this worker's pulls after a hand-back: past the job's redelivery, so the
/// workers that serve its model get it first.
const FIRST_PAUSE: Duration = Duration::from_secs(4);
/// The longest pause, when the jobs keep coming back (the other workers are busy).
const MAX_PAUSE: Duration = Duration::from_secs(30);
/// A job for a model missing from the view looks again if the view is at least this old.
const STALE: Duration = Duration::from_secs(2);
/// How long discovery collects answers inside the worker.
const WINDOW: Duration = Duration::from_millis(250);

/// The other workers of the pool and what they serve.
pub(crate) struct Peers {
    client: Client,
    prefix: String,
    consumer: String,
    me: String,
    view: Mutex<View>,
    /// One look at a time; a job that waits for a look in progress uses its result.
    looking: tokio::sync::Mutex<()>,
    backoff: Mutex<Backoff>,
    pub gate: PullGate,
}

#[derive(Default)]
struct View {
    at: Option<Instant>,
    /// Model → the workers that serve it.
    models: BTreeMap<String, BTreeSet<String>>,
}

impl Peers {
    pub fn new(client: Client, prefix: String, consumer: String, me: String) -> Peers {
        Peers {
            client,
            prefix,
            consumer,
            me,
            view: Mutex::default(),
            looking: tokio::sync::Mutex::new(()),
            backoff: Mutex::default(),
            gate: PullGate::default(),
        }
    }

    /// The other workers that serve `model`; looks again first when the view lacks it and is stale.
    pub async fn serving(&self, model: &str) -> Vec<String> {
        let fresh = |v: &View| v.at.is_some_and(|at| at.elapsed() < STALE);
        let known = |v: &View| v.models.get(model).map(|w| w.iter().cloned().collect::<Vec<_>>());
        {
            let view = self.view.lock().expect("view lock");
            if let Some(workers) = known(&view).filter(|w| !w.is_empty()) {
                return workers;
            }
            if fresh(&view) {
                return Vec::new();
            }
        }
        let _looking = self.looking.lock().await;
        if !fresh(&self.view.lock().expect("view lock")) {
            self.look().await;
        }
        known(&self.view.lock().expect("view lock")).unwrap_or_default()
    }

    /// Asks every worker of the pool for its models and replaces the view.
    async fn look(&self) {
        let instances = match pool::discover(&self.client, &self.prefix, Some(&self.consumer), WINDOW).await {
            Ok(found) => found,
            Err(e) => {
                warn!(error = %e, "pool discovery failed; keeping the last view");
                return;
            }
        };
        let calls = instances.iter().filter(|i| i.worker() != self.me).map(|i| async move {
            (i.worker().to_string(), pool::call::<WorkerInfo>(&self.client, i.subject(verb::INFO), &serde_json::json!({}), WINDOW * 4).await)
        });
        let mut models: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (worker, info) in futures::future::join_all(calls).await {
            match info {
                Ok(info) => {
                    for m in info.models {
                        models.entry(m.name).or_default().insert(worker.clone());
                    }
                }
                // A worker stopping (or too busy to answer) is left out until the next look.
                Err(e) => debug!(%worker, error = %e, "pool member did not answer info"),
            }
        }
        let mut view = self.view.lock().expect("view lock");
        if view.models != models {
            info!(models = ?models, "models served by the other workers of the pool");
        }
        *view = View { at: Some(Instant::now()), models };
    }

    /// Looks at the pool every `every` until shutdown.
    pub async fn watch(&self, every: Duration, mut shutdown: broadcast::Receiver<()>) {
        let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
        loop {
            tokio::select! {
                _ = shutdown.recv() => return,
                _ = tick.tick() => {}
            }
            let _looking = self.looking.lock().await;
            self.look().await;
        }
    }

    /// A job was handed back for the other workers: pause this worker's pulls.
    pub fn handed_back(&self) {
        let pause = self.backoff.lock().expect("backoff lock").on_handoff(Instant::now());
        if let Some(until) = pause {
            self.gate.pause_until(until);
        }
    }
}

/// The error answer of a job for `model` that this worker lacks while `serving` do: final only
/// on its last delivery, handed back before.
pub(crate) fn elsewhere_error(model: &str, serving: &[String], max_deliver: i64) -> JobError {
    JobError::new(
        ErrorCode::ModelError,
        format!(
            "model: '{model}' is served by other workers of this pool ({}), not by this one; the job came back to workers lacking it until its deliveries ran out (max_deliver {max_deliver}); publish it again",
            serving.join(", ")
        ),
    )
}

/// The pause of the pulls after hand-backs: [`FIRST_PAUSE`]; doubled (up to [`MAX_PAUSE`]) when a
/// job is handed back again soon after the last pause ended; none while a pause is in force (the
/// jobs of the pull that was open).
#[derive(Default)]
struct Backoff {
    until: Option<Instant>,
    pause: Duration,
}

impl Backoff {
    fn on_handoff(&mut self, now: Instant) -> Option<Instant> {
        self.pause = match self.until {
            Some(until) if now < until => return None,
            Some(until) if now < until + self.pause => (self.pause * 2).min(MAX_PAUSE),
            _ => FIRST_PAUSE,
        };
        let until = now + self.pause;
        self.until = Some(until);
        Some(until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_while_jobs_keep_coming_back_and_reset_after_a_quiet_spell() {
        let mut b = Backoff::default();
        let t0 = Instant::now();
        assert_eq!(b.on_handoff(t0), Some(t0 + FIRST_PAUSE));
        assert_eq!(b.on_handoff(t0 + Duration::from_secs(1)), None, "during a pause: the open pull's jobs");
        let t1 = t0 + FIRST_PAUSE + Duration::from_secs(1);
        assert_eq!(b.on_handoff(t1), Some(t1 + FIRST_PAUSE * 2));
        let mut t = t1 + FIRST_PAUSE * 2;
        for _ in 0..5 {
            t += Duration::from_millis(10);
            let until = b.on_handoff(t).unwrap();
            t = until;
        }
        assert_eq!(b.pause, MAX_PAUSE);
        let quiet = t + MAX_PAUSE * 2;
        assert_eq!(b.on_handoff(quiet), Some(quiet + FIRST_PAUSE));
    }

    #[test]
    fn the_last_delivery_answer_names_the_workers_and_the_limit() {
        let e = elsewhere_error("mlp", &["w1".into(), "w2".into()], 5);
        assert_eq!(e.code, ErrorCode::ModelError);
        assert!(e.message.contains("'mlp'") && e.message.contains("(w1, w2)") && e.message.contains("max_deliver 5"), "{}", e.message);
    }
}
