//! `GET /v1/models` and the check every other route makes first: the models the pool serves,
//! from its service discovery (every worker's `info` endpoint), remembered for `--models-ttl-secs`.
//! A model no worker serves is a 404 before anything is published (with `--serve-models`
//! consumers, its job would wait for nobody); no worker at all is a 503. A model missing from what
//! was remembered is looked up again at once (a worker that just started), at most once a second.

use std::collections::BTreeMap;
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
    seen: Mutex<Option<Seen>>,
}

/// The shortest time between two lookups.
const MIN_LOOKUP_GAP: Duration = Duration::from_secs(1);

impl Models {
    pub fn new(client: Client, prefix: String, ttl: Duration) -> Models {
        Models { client, prefix, ttl, seen: Mutex::new(None) }
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

    /// The served models, looked up again when older than the TTL, or than a second when `fresh`.
    async fn current(&self, fresh: bool) -> Result<(usize, BTreeMap<String, Served>), ApiError> {
        let mut seen = self.seen.lock().await;
        let max_age = if fresh { MIN_LOOKUP_GAP } else { self.ttl };
        if seen.as_ref().is_none_or(|s| s.at.elapsed() >= max_age) {
            *seen = Some(self.look_up().await?);
        }
        let s = seen.as_ref().expect("looked up");
        Ok((s.workers, s.models.clone()))
    }

    /// Ok when some worker serves `model`.
    pub async fn require(&self, model: &str) -> Result<(), ApiError> {
        let (_, models) = self.current(false).await?;
        if models.contains_key(model) {
            return Ok(());
        }
        let (workers, models) = self.current(true).await?;
        match (workers, models.contains_key(model)) {
            (_, true) => Ok(()),
            (0, _) => Err(ApiError::no_worker(format!("no worker of the pool (prefix {}) answers service discovery", self.prefix))),
            _ => Err(ApiError::unknown_model(model)),
        }
    }

    /// `GET /v1/models`.
    pub async fn list(&self) -> Result<Response, ApiError> {
        let (_, models) = self.current(false).await?;
        let data: Vec<Value> = models
            .iter()
            .map(|(name, s)| json!({"id": name, "object": "model", "created": 0, "owned_by": "jetbatch", "kinds": s.kinds, "workers": s.workers}))
            .collect();
        Ok(openai::json_response(json!({"object": "list", "data": data})))
    }
}
