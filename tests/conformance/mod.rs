//! One conformance suite per backend trait. Each is a function over `&dyn
//! Trait` that asserts only behaviour every implementation must have, so the
//! same suite runs on the embedded backends and on the real services. Names
//! it creates carry a per-run suffix, so reruns against a persistent server
//! do not collide.

#![allow(dead_code)]

pub mod cache;
pub mod log;
pub mod objects;
pub mod search;
pub mod table;

/// A suffix unique to this process and moment.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{prefix}-{}-{:x}-{}",
        std::process::id(),
        nanos,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `f` until it returns Some or `secs` pass.
pub async fn eventually<T, F, Fut>(secs: u64, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
