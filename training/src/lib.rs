//! Training of sift's category classifier: data loading, the training loop,
//! evaluation and checkpoints. Filled in by the model work.
