//! Errors of the catalog crate.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("catalog {path}{}", rebuild_hint(source))]
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

/// Whether a SQLite error means the catalog file itself is damaged.
fn is_corrupt(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if matches!(f.code, rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase))
}

fn rebuild_hint(e: &rusqlite::Error) -> &'static str {
    if is_corrupt(e) {
        " (damaged: `blockvault catalog rebuild` recreates it from the store)"
    } else {
        ""
    }
}

impl Error {
    /// True when the catalog file is damaged (not a database, or corrupt):
    /// only a rebuild from the store helps.
    pub fn is_corrupt(&self) -> bool {
        matches!(self, Error::Sqlite { source, .. } if is_corrupt(source))
    }
}
