//! `sift match`: social profiles to people in the consumer database.
//!
//! - [`enrich`]: the FullContact Person Enrich v3 client, with a client-side
//!   rate limit and a cache, called first for profiles without a usable name
//!   or location; [`standin`] is a local server that follows the same API,
//!   for tests and benchmarks.

pub mod enrich;
pub mod standin;
