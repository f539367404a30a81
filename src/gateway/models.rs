//! `GET /v1/models` and the check every other route makes first: the models the pool serves,
//! from its service discovery (every worker's `info` endpoint), remembered for `--models-ttl-secs`.
//! A model no worker serves is a 404 before anything is published (with `--serve-models`
//! consumers, its job would wait for nobody); no worker at all is a 503. A stale list is refreshed
//! in the background while requests go on with it (a discovery round takes half a second); a
//! model missing from it is looked up again at once (a worker that just started), and that
//! request waits — at most one such lookup a second.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Client;
use axum::response::Response;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use super::error::ApiError;
use super::openai;
use crate::pool::{self, verb, WorkerInfo};

/// A served model: its kinds and how many workers serve it.
#[derive(Debug, Clone, PartialEq)]
pub struct Served {
    pub kinds: Vec<String>,
    pub workers: usize,
}

/// What discovery last found.
struct Seen {
    at: Instant,
    workers: usize,
    models: BTreeMap<String, Served>,
}

pub struct Models {
    client: Client,
    prefix: String,
    ttl: Duration,
    seen: std::sync::Mutex<Option<Arc<Seen>>>,
    /// Held by the one lookup under way.
    lookup: Arc<Mutex<()>>,
}

/// The shortest time between two lookups.
const MIN_LOOKUP_GAP: Duration = Duration::from_secs(1);

impl Models {
    pub fn new(client: Client, prefix: String, ttl: Duration) -> Arc<Models> {
        Arc::new(Models { client, prefix, ttl, seen: std::sync::Mutex::new(None), lookup: Arc::new(Mutex::new(())) })
    }

    fn last(&self) -> Option<Arc<Seen>> {
        self.seen.lock().expect("seen").clone()
    }

    async fn refresh(&self) -> Result<Arc<Seen>, ApiError> {
        let seen = Arc::new(self.look_up().await?);
        *self.seen.lock().expect("seen") = Some(seen.clone());
        Ok(seen)
    }

    async fn look_up(&self) -> Result<Seen, ApiError> {
        let instances = pool::discover(&self.client, &self.prefix, None, pool::DISCOVERY_WINDOW).await.map_err(ApiError::bus)?;
        let empty = json!({});
        let infos = futures::future::join_all(instances.iter().map(|i| pool::call::<WorkerInfo>(&self.client, i.subject(verb::INFO), &empty, pool::CALL_TIMEOUT))).await;
        let mut models: BTreeMap<String, Served> = BTreeMap::new();
        let mut workers = 0;
        // A worker that stopped between discovery and the call is left out.
        for info in infos.into_iter().flatten() {
            workers += 1;
            for m in info.models {
                let served = models.entry(m.name).or_insert_with(|| Served { kinds: m.kinds.clone(), workers: 0 });
                served.workers += 1;
            }
        }
        Ok(Seen { at: Instant::now(), workers, models })
    }

    /// The served models. Older than the TTL: refreshed in the background, and used meanwhile.
    /// With `fresh`, or before the first lookup, this waits for a lookup unless the last one is
    /// under a second old.
    async fn current(self: &Arc<Self>, fresh: bool) -> Result<Arc<Seen>, ApiError> {
        let max_age = if fresh { MIN_LOOKUP_GAP } else { self.ttl };
        match self.last() {
            Some(seen) if seen.at.elapsed() < max_age => return Ok(seen),
            Some(seen) if !fresh => {
                if let Ok(running) = self.lookup.clone().try_lock_owned() {
                    let me = self.clone();
                    tokio::spawn(async move {
                        let _running = running;
                        if let Err(e) = me.refresh().await {
                            tracing::warn!(error = %e.message, "models lookup");
                        }
                    });
                }
                return Ok(seen);
            }
            _ => {}
        }
        let _running = self.lookup.lock().await;
        match self.last() {
            // Another request's lookup ended while this one waited.
            Some(seen) if seen.at.elapsed() < MIN_LOOKUP_GAP => Ok(seen),
            _ => self.refresh().await,
        }
    }

    /// Ok when some worker serves `model`.
    pub async fn require(self: &Arc<Self>, model: &str) -> Result<(), ApiError> {
        if self.current(false).await?.models.contains_key(model) {
            return Ok(());
        }
        let seen = self.current(true).await?;
        match (seen.workers, seen.models.contains_key(model)) {
            (_, true) => Ok(()),
            (0, _) => Err(ApiError::no_worker(format!("no worker of the pool (prefix {}) answers service discovery", self.prefix))),
            _ => Err(ApiError::unknown_model(model)),
        }
    }

    /// `GET /v1/models`.
    pub async fn list(self: &Arc<Self>) -> Result<Response, ApiError> {
        let seen = self.current(false).await?;
        let data: Vec<Value> = seen
            .models
            .iter()
            .map(|(name, s)| json!({"id": name, "object": "model", "created": 0, "owned_by": "jetbatch", "kinds": s.kinds, "workers": s.workers}))
            .collect();
        Ok(openai::json_response(json!({"object": "list", "data": data})))
    }
}
