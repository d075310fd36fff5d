//! The admin endpoint: `/metrics` and `/healthz` (served by `ztna-metrics-http` on a thread
//! of its own). Healthy means every worker is running and the relay is not draining.

use prometheus_client::registry::Registry;

use crate::shared::Shared;

impl ztna_metrics_http::Source for Shared {
    fn registry(&self) -> &Registry {
        &self.metrics.registry
    }

    fn healthy(&self) -> bool {
        Shared::healthy(self)
    }
}
