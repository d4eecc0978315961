//! What every daemon shares: waiting for SIGINT/SIGTERM, and serving
//! `/metrics` and `/healthz` where the configuration says.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

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

/// Serves `/metrics`, `/healthz` and `/readyz` on `telemetry.metrics_addr`
/// unless it is empty; returns the bound address.
pub async fn serve_probes(
    config: &Config,
    health: Health,
    ready: Health,
) -> crate::Result<Option<SocketAddr>> {
    let addr = &config.telemetry.metrics_addr;
    if addr.is_empty() {
        return Ok(None);
    }
    let bound = metrics::serve_probes(addr, health, ready)
        .await
        .map_err(|e| {
            crate::Error::io(
                format!("serving /metrics on {addr} (telemetry.metrics_addr)"),
                e,
            )
        })?;
    Ok(Some(bound))
}

/// When a consumer stage's `run` returns: once its group has caught up with
/// the end its input topic had at the start (`--once`), when a stop signal
/// resolves (the daemon's SIGTERM), or whichever comes first. The work in
/// hand is finished and committed before it returns either way.
pub struct Until {
    /// Return once caught up.
    pub(crate) caught_up: bool,
    /// Return when this resolves.
    pub(crate) stop: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl Until {
    /// Once the group has consumed everything its topic held at the start.
    pub fn caught_up() -> Self {
        Until {
            caught_up: true,
            stop: None,
        }
    }

    /// When `stop` resolves.
    pub fn stopped_by(stop: impl Future<Output = ()> + Send + 'static) -> Self {
        Until {
            caught_up: false,
            stop: Some(Box::pin(stop)),
        }
    }

    /// Also when `stop` resolves, if that is earlier.
    pub fn or_stopped_by(self, stop: impl Future<Output = ()> + Send + 'static) -> Self {
        Until {
            stop: Some(Box::pin(stop)),
            ..self
        }
    }
}
