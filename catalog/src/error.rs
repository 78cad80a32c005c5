//! Errors of the catalog crate.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("catalog {path}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("catalog {path}: schema version {found} is newer than this build understands ({supported})")]
    TooNew { path: PathBuf, found: i64, supported: i64 },
    #[error("catalog {path} belongs to store {catalog_store}, not to store {store} (use `catalog rebuild` to make a catalog for this store)")]
    WrongStore { path: PathBuf, catalog_store: String, store: String },
    #[error("image '{name}' is not in the catalog")]
    NoSuchImage { name: String },
    #[error("backup {id} does not exist{}", image.as_ref().map(|i| format!(" for image '{i}'")).unwrap_or_default())]
    NoSuchBackup { id: u64, image: Option<String> },
    #[error("{path}: {op} failed")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
