//! What every connection of one sidecar shares.

use std::sync::Arc;

use spawner_proxy::Upstream;

use crate::SidecarConfig;
use crate::drain::Tasks;
use crate::monitor::Monitor;

/// State shared by every connection of one sidecar.
pub(crate) struct Shared<C> {
    pub config: SidecarConfig,
    /// The application: `config.upstream` and the connector dialling it.
    pub upstream: Upstream<C>,
    pub monitor: Arc<Monitor>,
    pub tasks: Arc<Tasks>,
}
