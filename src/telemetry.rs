//! Logging setup: `tracing` to stderr, verbosity from `RUST_LOG` (default
//! `info`), as text for people or JSON lines for collectors.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber; later calls do nothing.
pub fn init(format: LogFormat) {
    // lopdf logs every problem of a hostile PDF at warn/error; the extractor
    // already turns them into one per-document error, so they are quiet by
    // default (RUST_LOG=lopdf=warn brings them back).
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,lopdf=off,html5ever=off"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
