//! `sift enrich`: one lookup through the configured enrichment client, or
//! the local stand-in server that follows the same API.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::enrich::{AnswerStore, EnrichRequest, Enricher, StoreSummary};
use super::standin::{self, StandInOptions};
use crate::dbusa::person::NETWORKS;

/// `sift enrich`.
#[derive(Debug, Subcommand)]
pub enum EnrichCommand {
    /// Serve the local stand-in of the enrichment API from a file of canned answers, until Ctrl-C.
    Standin(StandinArgs),
    /// Look one profile up through the configured client (`[enrich]`) and print the answer as JSON.
    Lookup(LookupArgs),
    /// What enrichment cost: answers stored, calls paid, and how many lookups were answered without one.
    Stats(StatsArgs),
}

/// `sift enrich stats`.
#[derive(Debug, Clone, Args)]
pub struct StatsArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `sift enrich standin`.
#[derive(Debug, Clone, Args)]
pub struct StandinArgs {
    /// Address to listen on (port 0 picks a free one).
    #[arg(
        long,
        env = "SIFT_ENRICH_STANDIN_LISTEN",
        default_value = "127.0.0.1:8089"
    )]
    pub listen: SocketAddr,
    /// Canned answers, JSON lines (e.g. `enrichment.jsonl` from `sift dbusa generate`).
    #[arg(long, env = "SIFT_ENRICH_STANDIN_ANSWERS")]
    pub answers: PathBuf,
    /// The API key clients must send (`Authorization: Bearer KEY`).
    #[arg(
        long,
        env = "SIFT_ENRICH_STANDIN_KEY",
        default_value = "standin-key",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub api_key: String,
    /// Answer 429 beyond this many requests per minute (0 = no limit).
    #[arg(long, default_value_t = 0)]
    pub rate_per_minute: u32,
    /// `Retry-After` seconds sent with 429 answers.
    #[arg(long, default_value_t = 1)]
    pub retry_after: u64,
}

/// `sift enrich lookup`.
#[derive(Debug, Clone, Args)]
pub struct LookupArgs {
    /// The profile's network.
    #[arg(long, value_parser = NETWORKS)]
    pub network: String,
    /// The handle on that network.
    #[arg(long)]
    pub handle: String,
    /// An email known for the profile.
    #[arg(long)]
    pub email: Option<String>,
    /// A phone known for the profile (E.164, e.g. +16515550101).
    #[arg(long)]
    pub phone: Option<String>,
}

/// Runs `sift enrich`.
pub async fn main(config: crate::config::Config, command: EnrichCommand) -> crate::Result<()> {
    match command {
        EnrichCommand::Standin(a) => {
            let answers = crate::dbusa::person::read_answers(&a.answers)?;
            let server = standin::start(
                a.listen,
                a.api_key,
                answers,
                StandInOptions {
                    rate_per_minute: a.rate_per_minute,
                    retry_after_secs: a.retry_after,
                },
            )
            .await?;
            println!(
                "enrichment stand-in at {} with {} answers from {}",
                server.url(),
                server.answers(),
                a.answers.display()
            );
            println!(
                "point sift at it with SIFT__ENRICH__URL={} and SIFT__ENRICH__API_KEY set to its key; Ctrl-C stops it",
                server.url()
            );
            crate::daemon::shutdown_signal().await;
            let (total, statuses) = (server.requests(), server.statuses());
            server.stop().await;
            let served: Vec<String> = statuses.iter().map(|(s, n)| format!("{s}: {n}")).collect();
            println!("served {total} requests ({})", served.join(", "));
            Ok(())
        }
        EnrichCommand::Lookup(a) => {
            let cache = crate::backends::open_cache(&config).await?;
            let store = AnswerStore::open(crate::backends::open_table(&config).await?).await?;
            let enricher = Enricher::new(&config.enrich, cache)?
                .ok_or_else(|| {
                    crate::Error::Invalid(
                        "enrichment is off: set enrich.api_key (best as SIFT__ENRICH__API_KEY) and enrich.url"
                            .into(),
                    )
                })?
                .with_store(store);
            let request = EnrichRequest {
                network: a.network,
                handle: a.handle,
                email: a.email,
                phone: a.phone,
            };
            let answer = enricher.enrich(&request).await;
            if let Err(e) = enricher.flush_stats(super::enrich::instance()).await {
                tracing::warn!(error = %e, "Could not write the enrichment counters.");
            }
            let (enrichment, source) = answer?;
            let out = serde_json::json!({
                "network": request.network,
                "handle": request.handle,
                "source": source,
                "enrichment": enrichment,
            });
            let text = serde_json::to_string_pretty(&out)
                .map_err(|e| crate::Error::Invalid(format!("cannot print the answer: {e}")))?;
            println!("{text}");
            eprintln!(
                "answered from the {}",
                match source {
                    super::enrich::EnrichSource::Cache => "cache (nothing paid)",
                    super::enrich::EnrichSource::Stored => "stored answer (nothing paid)",
                    super::enrich::EnrichSource::Api => "API",
                }
            );
            Ok(())
        }
        EnrichCommand::Stats(a) => {
            let store = AnswerStore::open(crate::backends::open_table(&config).await?).await?;
            let summary = store.summary().await?;
            if a.json {
                let text = serde_json::to_string_pretty(&serde_json::json!({
                    "summary": summary,
                    "hit_rate": summary.counted.hit_rate(),
                }))
                .map_err(|e| crate::Error::Invalid(format!("cannot print the stats: {e}")))?;
                println!("{text}");
            } else {
                print!("{}", stats_text(&summary));
            }
            Ok(())
        }
    }
}

/// `sift enrich stats` as text.
fn stats_text(s: &StoreSummary) -> String {
    let c = &s.counted;
    let rate = c
        .hit_rate()
        .map_or("n/a (no lookups counted)".to_owned(), |r| {
            format!("{:.1}%", r * 100.0)
        });
    let mut out = format!(
        "answers stored      {} ({} found, {} not found)\n\
         calls they took     {}\n",
        s.found + s.not_found,
        s.found,
        s.not_found,
        s.stored_calls
    );
    if s.unreadable > 0 {
        out += &format!("unreadable rows     {}\n", s.unreadable);
    }
    out += &format!(
        "counted by {} matcher run(s):\n\
         \x20 lookups           {}\n\
         \x20 calls paid        {}\n\
         \x20 from the cache    {}\n\
         \x20 from the table    {}\n\
         \x20 joined in flight  {}\n\
         \x20 failed            {}\n\
         \x20 hit rate          {rate}\n",
        s.instances, c.lookups, c.calls, c.cache_hits, c.stored_hits, c.joined, c.failed
    );
    out
}
