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

/// The address of a real service under test, from its variable (e.g.
/// `SIFT_TEST_KAFKA`). Unset: the test prints that it is skipped and returns
/// None, unless `SIFT_TEST_REQUIRE_SERVICES` is set (as the test command sets
/// it), where a missing variable fails the test instead of skipping it.
pub fn service_addr(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Some(v.trim().to_string()),
        _ => {
            assert!(
                std::env::var_os("SIFT_TEST_REQUIRE_SERVICES").is_none(),
                "{var} is unset but SIFT_TEST_REQUIRE_SERVICES demands every real backend; \
                 start them with scripts/services.sh up and export scripts/services.sh env"
            );
            eprintln!("SKIPPED: {var} is unset, so this real-backend test did not run");
            None
        }
    }
}

/// Runs `scripts/services.sh VERB NAME` (fault tests stop and start one
/// service in the middle of a run) and fails if the script does.
pub fn services(verb: &str, name: &str) -> anyhow::Result<()> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/services.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .args([verb, name])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "services.sh {verb} {name} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
