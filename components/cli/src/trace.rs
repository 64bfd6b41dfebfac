//! Session traces in the command line: recording from the components (`--record-trace`) and
//! `spawner trace merge`.

use anyhow::Context;
use spawner_trace_recorder::{RecorderHandle, TraceRecordArgs, TraceRecorder};

/// A running recorder and the handle that finishes it, when one was asked for.
pub type Recording = Option<(TraceRecorder, RecorderHandle)>;

/// Starts the recorder `args` ask for, stamped with `now` as the trace's start.
pub fn start_recording(
    args: &TraceRecordArgs,
    source: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<Recording> {
    let started_at = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let recording = args
        .start(source, &started_at)
        .context("starting the trace recorder")?;
    if let Some(path) = &args.record_trace {
        tracing::info!(path = %path.display(), source, "recording a session trace");
    }
    Ok(recording)
}

/// Writes what is buffered, closes the trace and logs what was recorded and dropped.
pub async fn finish_recording(recording: Recording) {
    let Some((_, handle)) = recording else {
        return;
    };
    match tokio::task::spawn_blocking(move || handle.finish()).await {
        Ok(stats) => tracing::info!(
            written = stats.written,
            dropped_full = stats.dropped_full,
            dropped_io = stats.dropped_io,
            dropped_unopened = stats.dropped_unopened,
            files = stats.files,
            "session trace closed"
        ),
        Err(e) => tracing::warn!(error = %e, "the trace writer did not finish"),
    }
}

/// `spawner trace …`
#[derive(Debug, clap::Args)]
pub struct TraceArgs {
    #[command(subcommand)]
    pub command: TraceCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum TraceCommand {
    /// Merge trace files (replicas' recordings, rotated files) into one trace ordered by time.
    Merge(MergeArgs),
}

#[derive(Debug, clap::Args)]
pub struct MergeArgs {
    /// Trace files to merge.
    #[arg(required = true)]
    pub files: Vec<std::path::PathBuf>,
    /// Write the merged trace here (default: standard output).
    #[arg(long, short)]
    pub output: Option<std::path::PathBuf>,
}

pub async fn run(args: TraceArgs, out: &mut (dyn std::io::Write + Send)) -> anyhow::Result<()> {
    match args.command {
        TraceCommand::Merge(args) => {
            let inputs = args
                .files
                .iter()
                .map(|path| {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    Ok((path.display().to_string(), text))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let merged = merge(&inputs)?;
            match &args.output {
                Some(path) => {
                    let file = std::fs::File::create(path)
                        .with_context(|| format!("creating {}", path.display()))?;
                    let mut writer = std::io::BufWriter::new(file);
                    merged.write(&mut writer)?;
                    std::io::Write::flush(&mut writer)?;
                }
                None => merged.write(&mut *out)?,
            }
            Ok(())
        }
    }
}

/// Why files could not be merged: the file and line at fault.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct MergeError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

/// Merges traces (name, text) into one: each file's times are shifted by how much later than
/// the earliest its recording started, events are ordered by time (ties in input order), and
/// the result must be one valid trace. A malformed file, an event found in two files (a file
/// given twice, files that overlap) or a connection opened in two places is refused, naming
/// the file and line.
pub fn merge(inputs: &[(String, String)]) -> Result<spawner_core::trace::Trace, MergeError> {
    use spawner_core::trace::{EventChecker, Trace, TraceHeader, parse_event, parse_header};
    let error = |file: &str, line: usize, message: String| MergeError {
        file: file.to_string(),
        line,
        message,
    };
    struct Parsed {
        start_ms: i64,
        header: TraceHeader,
        events: Vec<(usize, spawner_core::trace::TraceEvent)>,
    }
    let mut files = Vec::new();
    for (name, text) in inputs {
        let mut lines = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty());
        let Some((i, first)) = lines.next() else {
            return Err(error(
                name,
                1,
                "empty: the first line must be a header".into(),
            ));
        };
        let header = parse_header(first).map_err(|e| error(name, i + 1, e))?;
        let start_ms = chrono::DateTime::parse_from_rfc3339(&header.started_at)
            .map_err(|e| {
                error(
                    name,
                    i + 1,
                    format!(
                        "started_at {:?} is not an RFC 3339 time: {e}",
                        header.started_at
                    ),
                )
            })?
            .timestamp_millis();
        let mut events = Vec::new();
        let mut last = 0;
        for (i, line) in lines {
            let event = parse_event(line).map_err(|e| error(name, i + 1, e))?;
            if event.t_ms < last {
                return Err(error(
                    name,
                    i + 1,
                    format!("t_ms {} goes back in time (previous {last})", event.t_ms),
                ));
            }
            last = event.t_ms;
            events.push((i + 1, event));
        }
        files.push(Parsed {
            start_ms,
            header,
            events,
        });
    }
    let earliest = files.iter().map(|f| f.start_ms).min().unwrap_or(0);
    let mut all = Vec::new();
    for (index, file) in files.iter().enumerate() {
        let shift = (file.start_ms - earliest) as u64;
        for (line, event) in &file.events {
            let mut event = event.clone();
            event.t_ms += shift;
            all.push((event.t_ms, index, *line, event));
        }
    }
    all.sort_by_key(|(t, index, line, _)| (*t, *index, *line));
    let mut checker = EventChecker::default();
    let mut seen: std::collections::HashMap<String, (usize, usize)> = Default::default();
    let mut events = Vec::with_capacity(all.len());
    for (_, index, line, event) in all {
        let name = &inputs[index].0;
        let identity = serde_json::to_string(&event).unwrap_or_default();
        if let Some((other, other_line)) = seen.insert(identity, (index, line))
            && other != index
        {
            return Err(error(
                name,
                line,
                format!(
                    "overlaps {}:{other_line}: the same event is in both files",
                    inputs[other].0
                ),
            ));
        }
        checker
            .check(&event)
            .map_err(|e| error(name, line, format!("{e} (after merging)")))?;
        events.push(event);
    }
    let mut sources: Vec<&str> = files.iter().map(|f| f.header.source.as_str()).collect();
    sources.dedup();
    let started_at = chrono::DateTime::from_timestamp_millis(earliest)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default();
    Ok(Trace {
        header: TraceHeader::new(sources.join("+"), started_at),
        events,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, started_at: &str, events: &[&str]) -> (String, String) {
        let mut text = format!(
            r#"{{"format":"spawner-trace","version":1,"source":"api","started_at":"{started_at}"}}"#
        );
        for event in events {
            text.push('\n');
            text.push_str(event);
        }
        (name.to_string(), text)
    }

    #[test]
    fn merges_replicas_on_one_timeline() {
        let a = file(
            "a.jsonl",
            "2026-12-05T10:00:00Z",
            &[
                r#"{"t_ms":0,"session":"s1","key":"k1","type":"spawn"}"#,
                r#"{"t_ms":1500,"session":"s1","key":"k1","type":"connect","conn":"c1"}"#,
                r#"{"t_ms":9000,"session":"s1","key":"k1","type":"disconnect","conn":"c1"}"#,
            ],
        );
        // Started a second later: its times shift by 1000.
        let b = file(
            "b.jsonl",
            "2026-12-05T10:00:01Z",
            &[
                r#"{"t_ms":0,"session":"s2","key":"k1","type":"spawn"}"#,
                r#"{"t_ms":500,"session":"s2","key":"k1","type":"connect","conn":"c2","extra":1}"#,
            ],
        );
        let merged = merge(&[a, b]).expect("merges");
        let order: Vec<(u64, &str)> = merged
            .events
            .iter()
            .map(|e| (e.t_ms, e.session.as_str()))
            .collect();
        assert_eq!(
            order,
            [
                (0, "s1"),
                (1000, "s2"),
                (1500, "s1"),
                (1500, "s2"),
                (9000, "s1")
            ]
        );
        assert_eq!(merged.header.started_at, "2026-12-05T10:00:00.000Z");
        assert_eq!(merged.header.source, "api");
        let mut out = Vec::new();
        merged.write(&mut out).expect("write");
        spawner_core::trace::Trace::read(&out[..]).expect("the merged trace is valid");
    }

    #[test]
    fn refuses_malformed_and_overlapping_input_naming_file_and_line() {
        let good = file(
            "good.jsonl",
            "2026-12-05T10:00:00Z",
            &[
                r#"{"t_ms":0,"session":"s1","key":"k1","type":"spawn"}"#,
                r#"{"t_ms":5,"session":"s1","key":"k1","type":"spawn"}"#,
            ],
        );
        let cases = [
            (
                file("bad.jsonl", "2026-12-05T10:00:00Z", &["{\"t_ms\":"]),
                "bad.jsonl:2: ",
            ),
            (
                file(
                    "back.jsonl",
                    "2026-12-05T10:00:00Z",
                    &[
                        r#"{"t_ms":9,"session":"s","key":"k","type":"spawn"}"#,
                        r#"{"t_ms":3,"session":"s","key":"k","type":"spawn"}"#,
                    ],
                ),
                "back.jsonl:3: t_ms 3 goes back",
            ),
            (
                file("when.jsonl", "yesterday", &[]),
                "when.jsonl:1: started_at",
            ),
            (
                ("empty.jsonl".into(), String::new()),
                "empty.jsonl:1: empty",
            ),
            (
                ("copy.jsonl".into(), good.1.clone()),
                "copy.jsonl:2: overlaps good.jsonl:2",
            ),
            (
                file(
                    "stray.jsonl",
                    "2026-12-05T10:00:00Z",
                    &[r#"{"t_ms":1,"session":"s","key":"k","type":"disconnect","conn":"x"}"#],
                ),
                "stray.jsonl:2: disconnect of connection \"x\" that is not open",
            ),
        ];
        for (input, expected) in cases {
            let error = merge(&[good.clone(), input])
                .expect_err(expected)
                .to_string();
            assert!(error.starts_with(expected), "{error} (expected {expected})");
        }
    }
}
