//! Candle model definitions for sift's category classifier: configuration
//! and modules only, no I/O. Filled in by the model work.
