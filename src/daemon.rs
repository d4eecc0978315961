//! What every daemon shares: waiting for SIGINT/SIGTERM, its health
//! ([`StageHealth`]), and serving `/metrics` and `/healthz` where the
//! configuration says.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

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

/// Backend failures in a row from which a daemon is unhealthy.
pub const UNHEALTHY_AFTER: u32 = 5;

/// How a daemon is doing, as `/healthz` tells it; every daemon keeps one,
/// as a `static` its retries reach:
///
/// - backend failures in a row: every [`crate::stage::Backoff`] wait adds
///   one, a step that goes through sets them back to 0
///   ([`recovered`](Self::recovered)); unhealthy from [`UNHEALTHY_AFTER`];
/// - a run that ended with an error ([`failed`](Self::failed));
/// - where a stall limit is set, the last time the daemon moved
///   ([`beat`](Self::beat)): unhealthy once it has not moved for longer.
pub struct StageHealth {
    failures: AtomicU32,
    failed: AtomicBool,
    beat_ms: AtomicI64,
    stall: Option<Duration>,
}

impl StageHealth {
    /// Healthy until backend calls keep failing or the run fails.
    pub const fn new() -> Self {
        StageHealth {
            failures: AtomicU32::new(0),
            failed: AtomicBool::new(false),
            beat_ms: AtomicI64::new(0),
            stall: None,
        }
    }

    /// Also unhealthy once it has not moved for longer than `stall`.
    pub const fn with_stall(stall: Duration) -> Self {
        StageHealth {
            stall: Some(stall),
            ..StageHealth::new()
        }
    }

    /// A backend call failed (again).
    pub fn fail(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// A step went through: failures in a row start again from 0.
    pub fn recovered(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    /// The daemon moved.
    pub fn beat(&self) {
        self.beat_ms.store(crate::now_ms(), Ordering::Relaxed);
    }

    /// The run ended with an error.
    pub fn failed(&self) {
        self.failed.store(true, Ordering::Relaxed);
    }

    /// A new run starts: nothing has failed and nothing has moved yet.
    pub fn reset(&self) {
        self.failures.store(0, Ordering::Relaxed);
        self.failed.store(false, Ordering::Relaxed);
        self.beat_ms.store(0, Ordering::Relaxed);
    }

    /// Whether `/healthz` says healthy.
    pub fn healthy(&self) -> bool {
        let moved = match self.stall {
            None => true,
            Some(stall) => {
                let beat = self.beat_ms.load(Ordering::Relaxed);
                beat == 0 || crate::now_ms() - beat <= stall.as_millis() as i64
            }
        };
        self.failures.load(Ordering::Relaxed) < UNHEALTHY_AFTER
            && !self.failed.load(Ordering::Relaxed)
            && moved
    }

    /// The `/healthz` probe over this health.
    pub fn probe(&'static self) -> Health {
        Arc::new(move || self.healthy())
    }
}

impl Default for StageHealth {
    fn default() -> Self {
        StageHealth::new()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unhealthy_after_failures_in_a_row_until_a_step_goes_through() {
        let h = StageHealth::new();
        for _ in 1..UNHEALTHY_AFTER {
            h.fail();
        }
        assert!(h.healthy());
        h.fail();
        assert!(!h.healthy());
        h.recovered();
        assert!(h.healthy());
        h.failed();
        assert!(!h.healthy(), "a failed run stays unhealthy");
        h.reset();
        assert!(h.healthy());
    }

    #[test]
    fn a_stall_limit_needs_a_recent_beat() {
        // A limit wide enough that a loaded machine never takes it between
        // a beat and the check right after.
        let h = StageHealth::with_stall(Duration::from_secs(1));
        assert!(h.healthy(), "nothing has moved yet: not a stall");
        h.beat();
        assert!(h.healthy());
        std::thread::sleep(Duration::from_millis(1_200));
        assert!(!h.healthy());
        h.beat();
        assert!(h.healthy());
        assert!(StageHealth::new().healthy(), "no limit: no stall");
    }
}
