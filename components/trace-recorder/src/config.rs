//! Command-line arguments of recording, shared by the components that record (each with an
//! environment fallback).

use std::path::PathBuf;

use crate::{
    DEFAULT_BUFFER_EVENTS, DEFAULT_ROTATE_BYTES, RecorderConfig, RecorderError, RecorderHandle,
    TraceRecorder,
};

#[derive(clap::Args, Clone, Debug, Default)]
pub struct TraceRecordArgs {
    /// Record a session trace to this file (docs/traces.md): ids hashed with --trace-key, sizes
    /// only, never bodies or payloads.
    #[arg(long, env = "SPAWNER_RECORD_TRACE")]
    pub record_trace: Option<PathBuf>,
    /// Key of the opaque ids in recorded traces (HMAC-SHA256); required with --record-trace.
    /// Replicas whose traces are merged need the same key.
    #[arg(long, env = "SPAWNER_TRACE_KEY", hide_env_values = true)]
    pub trace_key: Option<String>,
    /// Size at which a trace file is closed and the next one (`NAME.1.jsonl` ...) started; 0:
    /// never.
    #[arg(long, env = "SPAWNER_TRACE_ROTATE_BYTES", default_value_t = DEFAULT_ROTATE_BYTES)]
    pub trace_rotate_bytes: u64,
    /// Trace files kept (the oldest are removed); 0: all.
    #[arg(long, env = "SPAWNER_TRACE_KEEP_FILES", default_value_t = 0)]
    pub trace_keep_files: usize,
    /// Events buffered for the writer before new ones are dropped (and counted).
    #[arg(long, env = "SPAWNER_TRACE_BUFFER_EVENTS", default_value_t = DEFAULT_BUFFER_EVENTS)]
    pub trace_buffer_events: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceArgsError {
    #[error("--record-trace needs --trace-key (SPAWNER_TRACE_KEY): the key of the opaque ids")]
    NoKey,
    #[error(transparent)]
    Recorder(#[from] RecorderError),
}

impl TraceRecordArgs {
    /// The recorder configuration, or `None` when not recording.
    pub fn config(
        &self,
        source: &str,
        started_at: &str,
    ) -> Result<Option<RecorderConfig>, TraceArgsError> {
        let Some(path) = &self.record_trace else {
            return Ok(None);
        };
        let key = self.trace_key.as_deref().ok_or(TraceArgsError::NoKey)?;
        let mut config = RecorderConfig::new(path, key.as_bytes(), source, started_at);
        config.rotate_bytes = self.trace_rotate_bytes;
        config.keep_files = self.trace_keep_files;
        config.buffer_events = self.trace_buffer_events;
        Ok(Some(config))
    }

    /// Starts recording when asked to.
    pub fn start(
        &self,
        source: &str,
        started_at: &str,
    ) -> Result<Option<(TraceRecorder, RecorderHandle)>, TraceArgsError> {
        match self.config(source, started_at)? {
            Some(config) => Ok(Some(TraceRecorder::start(config)?)),
            None => Ok(None),
        }
    }
}
