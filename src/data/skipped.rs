//! A file left out of a batch or a dataset pass, and why.

use std::path::PathBuf;

/// An image that could not be used, and why.
#[derive(Debug, Clone)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}
