//! `sift dbusa`: the consumer database identity matching searches.
//!
//! - `generate`: a synthetic database drawn from census name frequencies
//!   and the ZIP code list, with a ground-truth file of social profiles
//!   ([`generate`]); the test and benchmark data. Production loads the
//!   client's real file, which has the same columns.
//!
//! The reference data it draws from is in [`reference`].

pub mod generate;
pub mod index;
pub mod load;
pub mod names;
pub mod reference;

use std::path::PathBuf;

use clap::{Args, Subcommand};

/// `sift dbusa`.
#[derive(Debug, Subcommand)]
pub enum DbusaCommand {
    /// Write a synthetic consumer database (CSV) and social profiles with their truth (JSON lines).
    Generate(GenerateArgs),
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
    /// Output directory (dbusa.csv, profiles.jsonl).
    #[arg(long, default_value = "dbusa")]
    pub out: PathBuf,
}

/// Runs `sift dbusa`.
pub fn main(command: DbusaCommand) -> crate::Result<()> {
    match command {
        DbusaCommand::Generate(a) => {
            let started = std::time::Instant::now();
            let g = generate::generate(
                &generate::Spec {
                    rows: a.rows,
                    seed: a.seed,
                    profiles: a.profiles,
                    outsiders: a.outsiders,
                },
                &a.out,
            )?;
            println!(
                "wrote {} people to {} and {} profiles to {} in {:.1} s",
                g.rows,
                g.database.display(),
                g.profile_count,
                g.profiles.display(),
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
    }
}
