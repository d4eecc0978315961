//! `sift dbusa`: the consumer database identity matching searches.
//!
//! - `generate`: a synthetic database drawn from census name frequencies
//!   and the ZIP code list, with a ground-truth file of social profiles
//!   ([`generate`]); the test and benchmark data. Production loads the
//!   client's real file, which has the same columns.
//! - `load`: such a file into the search index, in parallel bulk requests,
//!   resumable after a crash ([`load`]).
//!
//! The reference data it draws from is in [`reference`](mod@reference).

pub mod generate;
pub mod index;
pub mod load;
pub mod names;
pub mod person;
pub mod reference;

use std::path::PathBuf;

use clap::{Args, Subcommand};

/// `sift dbusa`.
#[derive(Debug, Subcommand)]
pub enum DbusaCommand {
    /// Write a synthetic consumer database (CSV) and social profiles with their truth (JSON lines).
    Generate(GenerateArgs),
    /// Load a consumer database CSV into the search index (resumes an unfinished load of the same file).
    Load(load::LoadArgs),
}

/// `sift dbusa generate`.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// People in the database.
    #[arg(long, default_value_t = 100_000)]
    pub rows: u64,
    /// Seed: the same seed gives the same files, byte for byte.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Profiles of people in the database (each with a labelled corruption).
    #[arg(long, default_value_t = 5_000)]
    pub profiles: u64,
    /// Profiles of people who are not in the database.
    #[arg(long, default_value_t = 1_000)]
    pub outsiders: u64,
    /// Profiles of people who are not in the database but live with someone
    /// who is (same surname and address, another first name).
    #[arg(long, default_value_t = 0)]
    pub housemates: u64,
    /// Draw the profiles from the first this many rows (0 = all): the same
    /// seed and value give the same profiles at every --rows, for measuring
    /// how accuracy changes as the database grows.
    #[arg(long, default_value_t = 0)]
    pub profile_rows: u64,
    /// Output directory (dbusa.csv, profiles.jsonl, enrichment.jsonl).
    #[arg(long, default_value = "dbusa")]
    pub out: PathBuf,
}

/// Runs `sift dbusa`.
pub async fn main(config: crate::config::Config, command: DbusaCommand) -> crate::Result<()> {
    match command {
        DbusaCommand::Load(args) => {
            let options = load::LoadOptions::new(&config, &args);
            // A file that cannot be loaded is reported before the search cluster is contacted.
            load::check_header(&options.file)?;
            let search = crate::backends::open_search(&config).await?;
            let summary = load::load(search, &options).await?;
            print_load_summary(&summary, args.json)
        }
        DbusaCommand::Generate(a) => {
            let started = std::time::Instant::now();
            let g = generate::generate(
                &generate::Spec {
                    rows: a.rows,
                    seed: a.seed,
                    profiles: a.profiles,
                    outsiders: a.outsiders,
                    housemates: a.housemates,
                    profile_rows: a.profile_rows,
                },
                &a.out,
            )?;
            println!(
                "wrote {} people to {}, {} profiles to {} and {} enrichment answers to {} in {:.1} s",
                g.rows,
                g.database.display(),
                g.profile_count,
                g.profiles.display(),
                g.answer_count,
                g.enrichment.display(),
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
    }
}

/// Prints what `sift dbusa load` did, as text or JSON.
fn print_load_summary(s: &load::LoadSummary, json: bool) -> crate::Result<()> {
    if json {
        let text = serde_json::to_string_pretty(s)
            .map_err(|e| crate::Error::Invalid(format!("cannot encode the summary: {e}")))?;
        println!("{text}");
        return Ok(());
    }
    if s.already_loaded {
        println!(
            "{}: already loaded; --from-scratch to reload (index `{}`: {} rows loaded, {} \
             documents)",
            s.file.display(),
            s.index,
            s.rows_total,
            s.index_count
        );
        return Ok(());
    }
    println!(
        "loaded {} into index `{}` in {:.1} s",
        s.file.display(),
        s.index,
        s.seconds
    );
    if s.resumed {
        println!(
            "  resumed at         byte {} (line {})",
            s.resumed_at_byte, s.resumed_at_line
        );
    }
    if let Some(reason) = &s.started_over {
        println!("  started over       {reason}");
    }
    println!(
        "  rows loaded        {} this run, {} in all",
        s.rows_loaded, s.rows_total
    );
    println!("  rows/s             {:.0}", s.rows_per_sec);
    println!(
        "  rejected           {} this run, {} in all (listed in {})",
        s.rejected,
        s.rejected_total,
        s.rejects_file.display()
    );
    println!("  index count        {}", s.index_count);
    println!(
        "  bulk requests      {} rows each, {} in flight",
        s.bulk_docs, s.workers
    );
    Ok(())
}
