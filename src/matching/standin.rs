//! A local stand-in for the enrichment API, following its request and response format.
