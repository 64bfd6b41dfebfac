//! Session trace recording that never slows the traffic it records.
//!
//! A component that sees user traffic (the api, the router) calls [`TraceRecorder::record`] on
//! its data path. That call only stamps the time and offers the event to a bounded buffer: when
//! the buffer is full (the disk is slow or hung) the event is dropped and counted, never waited
//! for. A background thread takes events from the buffer, replaces every id by an opaque keyed
//! hash (HMAC-SHA256 with the operator's key, so a trace names no user, session or backend
//! and cannot be joined with other data without the key), writes them as a session trace
//! (`docs/trace-format.md`) and starts a new file when the current one reaches its size limit.
//! A failed write (disk full) drops and counts the lines of that write. Payloads never reach
//! the recorder: events carry sizes only. A dropped `connect` would leave its connection's later
//! events pointing at a connection the trace never opened (an invalid trace), so the writer
//! drops and counts those too.

pub mod config;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use spawner_core::trace::{TraceEvent, TraceEventKind, TraceHeader};
use tokio::time::Instant;

pub use config::{TraceArgsError, TraceRecordArgs};

/// Default capacity of the buffer between the data path and the writer, in events.
pub const DEFAULT_BUFFER_EVENTS: usize = 65_536;
/// Default size at which a trace file is closed and the next one started.
pub const DEFAULT_ROTATE_BYTES: u64 = 64 * 1024 * 1024;
/// Bytes of opaque id kept from the HMAC (hex-encoded: 24 characters). 96 bits: ids of
/// billions of sessions stay distinct.
const OPAQUE_ID_BYTES: usize = 12;
/// The writer writes at most this much per system call.
const BATCH_BYTES: usize = 64 * 1024;

/// What to record and where.
#[derive(Clone)]
pub struct RecorderConfig {
    /// The first file; later ones are numbered before the extension (`api.jsonl`,
    /// `api.1.jsonl`, `api.2.jsonl`, ...).
    pub path: PathBuf,
    /// The operator's key for the opaque ids (must not be empty).
    pub key: Vec<u8>,
    /// The header's `source`: `api`, `router` ...
    pub source: String,
    /// The header's `started_at` (RFC 3339), from the component's clock.
    pub started_at: String,
    /// Events the buffer holds before new ones are dropped.
    pub buffer_events: usize,
    /// Size at which a file is closed and the next one started; 0: never.
    pub rotate_bytes: u64,
    /// Files kept (the oldest are removed); 0: all.
    pub keep_files: usize,
}

impl std::fmt::Debug for RecorderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs.
        f.debug_struct("RecorderConfig")
            .field("path", &self.path)
            .field("source", &self.source)
            .field("started_at", &self.started_at)
            .field("buffer_events", &self.buffer_events)
            .field("rotate_bytes", &self.rotate_bytes)
            .field("keep_files", &self.keep_files)
            .finish_non_exhaustive()
    }
}

impl RecorderConfig {
    pub fn new(
        path: impl Into<PathBuf>,
        key: impl Into<Vec<u8>>,
        source: impl Into<String>,
        started_at: impl Into<String>,
    ) -> Self {
        Self {
            path: path.into(),
            key: key.into(),
            source: source.into(),
            started_at: started_at.into(),
            buffer_events: DEFAULT_BUFFER_EVENTS,
            rotate_bytes: DEFAULT_ROTATE_BYTES,
            keep_files: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RecorderError {
    #[error("the trace key must not be empty: ids are hashed with it")]
    EmptyKey,
    #[error("the trace buffer must hold at least one event")]
    NoBuffer,
    #[error("cannot open the trace file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the trace writer thread: {0}")]
    Thread(std::io::Error),
}

/// Counts of what happened to recorded events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecorderStats {
    /// Events taken into the buffer.
    pub accepted: u64,
    /// Events dropped because the buffer was full (or the writer had stopped).
    pub dropped_full: u64,
    /// Events dropped because writing them failed (disk full, I/O error).
    pub dropped_io: u64,
    /// Messages and disconnects dropped because their connection's `connect` was dropped (or
    /// the connection was opened twice).
    pub dropped_unopened: u64,
    /// Events written to a file.
    pub written: u64,
    /// Files opened.
    pub files: u64,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    dropped_full: AtomicU64,
    dropped_io: AtomicU64,
    dropped_unopened: AtomicU64,
    written: AtomicU64,
    files: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> RecorderStats {
        RecorderStats {
            accepted: self.accepted.load(Ordering::Relaxed),
            dropped_full: self.dropped_full.load(Ordering::Relaxed),
            dropped_io: self.dropped_io.load(Ordering::Relaxed),
            dropped_unopened: self.dropped_unopened.load(Ordering::Relaxed),
            written: self.written.load(Ordering::Relaxed),
            files: self.files.load(Ordering::Relaxed),
        }
    }
}

/// An event as the data path hands it over: raw ids, hashed by the writer.
struct RawEvent {
    t_ms: u64,
    session: String,
    key: String,
    kind: TraceEventKind,
}

enum Message {
    Event(RawEvent),
    Stop,
}

/// The data path's handle: cheap to clone, never blocks.
#[derive(Clone)]
pub struct TraceRecorder {
    sender: SyncSender<Message>,
    start: Instant,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for TraceRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceRecorder")
            .field("stats", &self.stats())
            .finish()
    }
}

/// Owns the writer thread: [`RecorderHandle::finish`] writes what is buffered and stops it.
pub struct RecorderHandle {
    sender: SyncSender<Message>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
}

impl TraceRecorder {
    /// Opens the first file (so a bad path is reported at once) and starts the writer thread.
    /// Event times count from now, on tokio's clock (simulated time in tests and the
    /// simulator).
    pub fn start(config: RecorderConfig) -> Result<(Self, RecorderHandle), RecorderError> {
        if config.key.is_empty() {
            return Err(RecorderError::EmptyKey);
        }
        if config.buffer_events == 0 {
            return Err(RecorderError::NoBuffer);
        }
        let file = open(&config.path)?;
        let counters = Arc::new(Counters::default());
        counters.files.store(1, Ordering::Relaxed);
        let (sender, receiver) = sync_channel(config.buffer_events);
        let writer = Writer::new(config, file, counters.clone());
        let thread = std::thread::Builder::new()
            .name("trace-writer".into())
            .spawn(move || writer.run(receiver))
            .map_err(RecorderError::Thread)?;
        let recorder = Self {
            sender: sender.clone(),
            start: Instant::now(),
            counters: counters.clone(),
        };
        let handle = RecorderHandle {
            sender,
            thread: Some(thread),
            counters,
        };
        Ok((recorder, handle))
    }

    /// Records `kind` for `session` and backend `key` (raw ids: the writer hashes them, with
    /// the connection id in `kind`). Never blocks: when the buffer is full the event is dropped
    /// and counted.
    pub fn record(&self, session: &str, key: &str, kind: TraceEventKind) {
        let event = RawEvent {
            t_ms: self.start.elapsed().as_millis() as u64,
            session: session.to_string(),
            key: key.to_string(),
            kind,
        };
        match self.sender.try_send(Message::Event(event)) {
            Ok(()) => {
                self.counters.accepted.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.counters.dropped_full.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn stats(&self) -> RecorderStats {
        self.counters.snapshot()
    }
}

impl std::fmt::Debug for RecorderHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecorderHandle")
            .field("stats", &self.stats())
            .finish()
    }
}

impl RecorderHandle {
    /// Writes every buffered event, closes the file and stops the writer. Blocks until then
    /// (call it from a blocking context); events recorded afterwards are dropped and counted.
    pub fn finish(mut self) -> RecorderStats {
        self.stop();
        self.counters.snapshot()
    }

    pub fn stats(&self) -> RecorderStats {
        self.counters.snapshot()
    }

    fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.sender.send(Message::Stop);
            let _ = thread.join();
        }
    }
}

impl Drop for RecorderHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The opaque id of `id` under `key`: the first 96 bits of HMAC-SHA256, in hex.
pub fn opaque_id(key: &[u8], id: &str) -> String {
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(key) else {
        // HMAC accepts keys of any length; unreachable, but no panic on the data path.
        return String::new();
    };
    mac.update(id.as_bytes());
    let digest = mac.finalize().into_bytes();
    let mut hex = String::with_capacity(OPAQUE_ID_BYTES * 2);
    for byte in &digest[..OPAQUE_ID_BYTES] {
        hex.push(char::from_digit(u32::from(byte >> 4), 16).unwrap_or('0'));
        hex.push(char::from_digit(u32::from(byte & 0xf), 16).unwrap_or('0'));
    }
    hex
}

/// The path of file number `index` of a recording at `path`.
pub fn segment_path(path: &Path, index: u64) -> PathBuf {
    if index == 0 {
        return path.to_path_buf();
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}.{index}.{}", ext.to_string_lossy()),
        None => format!("{stem}.{index}"),
    };
    path.with_file_name(name)
}

fn open(path: &Path) -> Result<File, RecorderError> {
    OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .map_err(|source| RecorderError::Open {
            path: path.to_path_buf(),
            source,
        })
}

/// The background writer's state.
struct Writer {
    config: RecorderConfig,
    counters: Arc<Counters>,
    /// The open file (none after a failed rotation: retried at the next batch).
    file: Option<File>,
    index: u64,
    /// Bytes written to the current file.
    bytes: u64,
    header_written: bool,
    /// Lines of the batch being built, and their count.
    batch: Vec<u8>,
    batch_events: u64,
    last_t: u64,
    reported_drops: u64,
    /// Connections whose `connect` was taken (raw ids), and those opened in the batch being
    /// built (forgotten again if the batch cannot be written).
    open: std::collections::HashSet<String>,
    opened_in_batch: Vec<String>,
}

impl Writer {
    fn new(config: RecorderConfig, file: File, counters: Arc<Counters>) -> Self {
        Self {
            config,
            counters,
            file: Some(file),
            index: 0,
            bytes: 0,
            header_written: false,
            batch: Vec::with_capacity(BATCH_BYTES),
            batch_events: 0,
            last_t: 0,
            reported_drops: 0,
            open: Default::default(),
            opened_in_batch: Vec::new(),
        }
    }

    fn run(mut self, receiver: Receiver<Message>) {
        self.ensure_header();
        // Ends when every sender is gone or on Stop, after writing what was received.
        'outer: while let Ok(message) = receiver.recv() {
            let mut next = Some(message);
            while let Some(message) = next.take() {
                match message {
                    Message::Stop => {
                        while let Ok(Message::Event(event)) = receiver.try_recv() {
                            self.add(event);
                            if self.batch.len() >= BATCH_BYTES {
                                self.write_batch();
                            }
                        }
                        break 'outer;
                    }
                    Message::Event(event) => self.add(event),
                }
                if self.batch.len() >= BATCH_BYTES {
                    break;
                }
                next = receiver.try_recv().ok();
            }
            self.write_batch();
            self.report_drops();
        }
        self.write_batch();
        self.report_drops();
    }

    /// Whether `kind` fits the connections the trace has opened (and notes what it opens and
    /// closes).
    fn fits_open_connections(&mut self, kind: &TraceEventKind) -> bool {
        match kind {
            TraceEventKind::Spawn => true,
            TraceEventKind::Connect { conn } => {
                let fresh = self.open.insert(conn.clone());
                if fresh {
                    self.opened_in_batch.push(conn.clone());
                }
                fresh
            }
            TraceEventKind::Message { conn, .. } => self.open.contains(conn),
            TraceEventKind::Disconnect { conn, .. } => self.open.remove(conn),
        }
    }

    fn add(&mut self, event: RawEvent) {
        if !self.fits_open_connections(&event.kind) {
            self.counters
                .dropped_unopened
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        let key = &self.config.key;
        let hash_conn = |conn: &str| opaque_id(key, conn);
        let kind = match event.kind {
            TraceEventKind::Spawn => TraceEventKind::Spawn,
            TraceEventKind::Connect { conn } => TraceEventKind::Connect {
                conn: hash_conn(&conn),
            },
            TraceEventKind::Message { conn, bytes } => TraceEventKind::Message {
                conn: hash_conn(&conn),
                bytes,
            },
            TraceEventKind::Disconnect { conn, clean } => TraceEventKind::Disconnect {
                conn: hash_conn(&conn),
                clean,
            },
        };
        // Events stamped on different threads can arrive slightly out of order; a trace's
        // times never decrease, so a late one takes its predecessor's time.
        self.last_t = self.last_t.max(event.t_ms);
        let line = TraceEvent {
            t_ms: self.last_t,
            session: opaque_id(key, &event.session),
            key: opaque_id(key, &event.key),
            kind,
        };
        if serde_json::to_writer(&mut self.batch, &line).is_ok() {
            self.batch.push(b'\n');
            self.batch_events += 1;
        } else {
            self.counters.dropped_io.fetch_add(1, Ordering::Relaxed);
        }
        // A file ends at the first line that reaches the limit.
        let limit = self.config.rotate_bytes;
        if limit > 0 && self.bytes + self.batch.len() as u64 >= limit {
            self.write_batch();
        }
    }

    /// Writes the batch (after the file's header if it has none yet); on failure its events
    /// are dropped and counted, and the file is cut back to its last whole line.
    fn write_batch(&mut self) {
        if self.batch_events == 0 {
            return;
        }
        let events = std::mem::take(&mut self.batch_events);
        let mut batch = std::mem::take(&mut self.batch);
        let written = self.ensure_header() && self.write(&batch);
        batch.clear();
        self.batch = batch;
        let opened = std::mem::take(&mut self.opened_in_batch);
        if written {
            self.counters.written.fetch_add(events, Ordering::Relaxed);
        } else {
            // Their connects are not in the file: their later events must not be either.
            for conn in opened {
                self.open.remove(&conn);
            }
            self.counters
                .dropped_io
                .fetch_add(events, Ordering::Relaxed);
        }
        if self.config.rotate_bytes > 0 && self.bytes >= self.config.rotate_bytes {
            self.rotate();
        }
    }

    fn ensure_header(&mut self) -> bool {
        if self.file.is_none() {
            self.rotate();
        }
        if self.header_written {
            return true;
        }
        let header = TraceHeader::new(&self.config.source, &self.config.started_at);
        let Ok(mut line) = serde_json::to_vec(&header) else {
            return false;
        };
        line.push(b'\n');
        self.header_written = self.write(&line);
        self.header_written
    }

    fn write(&mut self, bytes: &[u8]) -> bool {
        let Some(file) = self.file.as_mut() else {
            return false;
        };
        match file.write_all(bytes) {
            Ok(()) => {
                self.bytes += bytes.len() as u64;
                true
            }
            Err(error) => {
                tracing::debug!(%error, "trace write failed");
                // A partial line would make the file unreadable: cut it off (a no-op where
                // the file cannot be cut, e.g. a device).
                use std::io::Seek;
                let _ = file.set_len(self.bytes);
                let _ = file.seek(std::io::SeekFrom::Start(self.bytes));
                false
            }
        }
    }

    /// Closes the current file and opens the next one.
    fn rotate(&mut self) {
        self.file = None;
        let index = self.index + 1;
        let path = segment_path(&self.config.path, index);
        match open(&path) {
            Ok(file) => {
                self.file = Some(file);
                self.index = index;
                self.bytes = 0;
                self.header_written = false;
                self.counters.files.fetch_add(1, Ordering::Relaxed);
                // Every file is a trace of its own, even one that stays empty.
                self.ensure_header();
                let keep = self.config.keep_files as u64;
                if keep > 0 && index >= keep {
                    let _ = std::fs::remove_file(segment_path(&self.config.path, index - keep));
                }
            }
            Err(error) => tracing::warn!(%error, "cannot start the next trace file"),
        }
    }

    /// Logs drops from the writer, never from the data path: at the first, then each time
    /// the count doubles.
    fn report_drops(&mut self) {
        let stats = self.counters.snapshot();
        let dropped = stats.dropped_full + stats.dropped_io + stats.dropped_unopened;
        if dropped > 0 && dropped >= self.reported_drops.saturating_mul(2).max(1) {
            tracing::warn!(
                dropped_full = stats.dropped_full,
                dropped_io = stats.dropped_io,
                dropped_unopened = stats.dropped_unopened,
                "trace events dropped (buffer full or write failed); traffic is not affected"
            );
            self.reported_drops = dropped;
        }
    }
}

#[cfg(test)]
mod tests;
