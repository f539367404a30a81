//! A pause on this worker's pulls. A worker that handed a job back for another worker of its pool
//! (a model it lacks) stops asking for jobs for a moment: an idle worker always has a pull
//! waiting, so it would otherwise take the same job again as soon as it is redelivered, and every
//! delivery counts toward the consumer's `max_deliver`.

use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Clone, Default)]
pub struct PullGate(Arc<Mutex<Option<Instant>>>);

impl PullGate {
    /// No pull starts before `until` (a later pause already set stands).
    pub fn pause_until(&self, until: Instant) {
        let mut paused = self.0.lock().expect("gate lock");
        *paused = Some(paused.map_or(until, |u| u.max(until)));
    }

    /// Whether a pause is in force now.
    pub fn is_paused(&self) -> bool {
        self.0.lock().expect("gate lock").is_some_and(|u| u > Instant::now())
    }

    /// Returns once no pause is in force.
    pub async fn wait(&self) {
        loop {
            let until = *self.0.lock().expect("gate lock");
            match until {
                Some(u) if u > Instant::now() => tokio::time::sleep_until(u.into()).await,
                _ => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_pause_holds_until_its_end_and_the_later_end_wins() {
        let gate = PullGate::default();
        let start = Instant::now();
        gate.wait().await;
        assert!(start.elapsed() < Duration::from_millis(50), "open when never paused");
        gate.pause_until(start + Duration::from_millis(200));
        gate.pause_until(start + Duration::from_millis(100));
        assert!(gate.is_paused());
        gate.wait().await;
        assert!(start.elapsed() >= Duration::from_millis(200));
        assert!(!gate.is_paused());
    }
}
