//! The enrichment API client (FullContact Person Enrich v3).
