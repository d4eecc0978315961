//! `sift dbusa load`: the consumer database CSV into the search index.
