//! The gateway's Prometheus series on `GET /metrics`: requests, latency and requests in flight, by
//! route (the four routes and `other`) and HTTP status — bounded label sets.

use prometheus::{exponential_buckets, Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

pub struct GatewayMetrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    in_flight: IntGaugeVec,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(Opts::new("jetbatch_gateway_requests_total", "HTTP requests answered, by route and status"), &["route", "status"]).expect("metric");
        // 1 ms to ~33 min: a request waits for its jobs, which may queue.
        let buckets = exponential_buckets(0.001, 2.0, 22).expect("buckets");
        let latency = HistogramVec::new(HistogramOpts::new("jetbatch_gateway_request_seconds", "Time to a request's response headers, by route").buckets(buckets), &["route"]).expect("metric");
        let in_flight = IntGaugeVec::new(Opts::new("jetbatch_gateway_in_flight", "Requests being handled, by route"), &["route"]).expect("metric");
        for c in [Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>, Box::new(latency.clone()), Box::new(in_flight.clone())] {
            registry.register(c).expect("unique metric names");
        }
        GatewayMetrics { registry, requests, latency, in_flight }
    }
}

impl GatewayMetrics {
    /// Counts a request of `route` in flight until the guard is dropped.
    pub fn start(&self, route: &'static str) -> InFlight<'_> {
        self.in_flight.with_label_values(&[route]).inc();
        InFlight { metrics: self, route, started: std::time::Instant::now() }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding");
        String::from_utf8(buf).expect("prometheus text is utf-8")
    }
}

/// A request being handled.
pub struct InFlight<'a> {
    metrics: &'a GatewayMetrics,
    route: &'static str,
    started: std::time::Instant,
}

impl InFlight<'_> {
    /// The request is answered with `status`.
    pub fn done(&self, status: u16) {
        self.metrics.requests.with_label_values(&[self.route, &status.to_string()]).inc();
        self.metrics.latency.with_label_values(&[self.route]).observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.metrics.in_flight.with_label_values(&[self.route]).dec();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn requests_are_counted_by_route_and_status() {
        let m = super::GatewayMetrics::default();
        {
            let r = m.start("completions");
            assert!(m.render().contains("jetbatch_gateway_in_flight{route=\"completions\"} 1"));
            r.done(400);
        }
        let text = m.render();
        assert!(text.contains("jetbatch_gateway_requests_total{route=\"completions\",status=\"400\"} 1"), "{text}");
        assert!(text.contains("jetbatch_gateway_in_flight{route=\"completions\"} 0"), "{text}");
    }
}
