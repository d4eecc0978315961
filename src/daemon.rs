//! What every daemon shares: waiting for SIGINT/SIGTERM, and serving
//! `/metrics` and `/healthz` where the configuration says.

use std::net::SocketAddr;

use crate::config::Config;
use crate::metrics::{self, Health};

/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("Shutting down: finishing in-flight work.");
}

/// Serves `/metrics` and `/healthz` on `telemetry.metrics_addr` unless it is
/// empty; returns the bound address.
pub async fn serve_metrics(config: &Config, health: Health) -> crate::Result<Option<SocketAddr>> {
    let addr = &config.telemetry.metrics_addr;
    if addr.is_empty() {
        return Ok(None);
    }
    let bound = metrics::serve(addr, health).await.map_err(|e| {
        crate::Error::io(
            format!("serving /metrics on {addr} (telemetry.metrics_addr)"),
            e,
        )
    })?;
    Ok(Some(bound))
}
