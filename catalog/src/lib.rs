#![forbid(unsafe_code)]
//! # blockvault-catalog
//!
//! The SQLite catalog: images, RBD snapshots, backups with their parent
//! chains and state, and per-backup stats. It is an index over the store,
//! never the only copy of anything needed to restore: `rebuild` recreates it
//! from the store's manifests.
//!
//! A backup row goes `running` → `committed` (after its chunks, block map
//! and manifest are durable in the store) or `running` → `failed`.
//! The catalog never opens chunks.

mod error;
mod schema;

use std::path::{Path, PathBuf};
use std::time::Duration;

use blockvault_store::{BackupId, BackupStats, Manifest};
use rusqlite::{params, Connection, OptionalExtension, Row};

pub use error::{Error, Result};

/// Schema version this build writes.
pub const SCHEMA_VERSION: i64 = schema::MIGRATIONS.len() as i64;

/// The `error` of a backup row cancelled by the operator or a daemon stop
/// (see [`Catalog::cancel_backup`]).
pub const CANCELLED: &str = "cancelled (SIGTERM, SIGINT or daemon stop): nothing of it is committed";

/// State of a backup row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackupState {
    Running,
    Committed,
    Failed,
}

impl BackupState {
    fn as_str(self) -> &'static str {
        match self {
            BackupState::Running => "running",
            BackupState::Committed => "committed",
            BackupState::Failed => "failed",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        match s {
            "running" => Some(BackupState::Running),
            "committed" => Some(BackupState::Committed),
            "failed" => Some(BackupState::Failed),
            _ => None,
        }
    }
}

/// What the last verify said about a backup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerifyState {
    Unverified,
    Ok,
    Invalid,
}

impl VerifyState {
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyState::Unverified => "unverified",
            VerifyState::Ok => "ok",
            VerifyState::Invalid => "invalid",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        match s {
            "unverified" => Some(VerifyState::Unverified),
            "ok" => Some(VerifyState::Ok),
            "invalid" => Some(VerifyState::Invalid),
            _ => None,
        }
    }
}

/// A text column that must hold one of an enum's values: anything else is
/// an error (a damaged or foreign catalog), never silently another state.
fn enum_col<T>(r: &Row<'_>, idx: usize, what: &str, parse: fn(&str) -> Option<T>) -> rusqlite::Result<T> {
    let v: String = r.get(idx)?;
    parse(&v).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            idx,
            rusqlite::types::Type::Text,
            format!("unknown {what} '{v}' (run `blockvault catalog rebuild` to recreate the catalog from the store)")
                .into(),
        )
    })
}

/// One image row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRow {
    pub id: i64,
    pub name: String,
    pub source: String,
    pub block_size: u32,
    pub created: String,
}

/// One backup row, with its image's name and its stats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupRow {
    pub id: BackupId,
    pub image_id: i64,
    pub image: String,
    pub parent: Option<BackupId>,
    pub state: BackupState,
    pub created: String,
    pub finished: Option<String>,
    pub image_size: u64,
    pub block_size: u32,
    pub snapshot: Option<String>,
    pub error: Option<String>,
    pub verify_state: VerifyState,
    pub protected: bool,
    pub pid: Option<u32>,
    pub stats: Option<BackupStats>,
}

/// State of a blockvault-created RBD snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotState {
    /// Recorded before `rbd snap create`; may or may not exist on the cluster.
    Intent,
    /// Exists on the cluster.
    Present,
    /// Deleted from the cluster (demoted).
    Removed,
}

impl SnapshotState {
    fn as_str(self) -> &'static str {
        match self {
            SnapshotState::Intent => "intent",
            SnapshotState::Present => "present",
            SnapshotState::Removed => "removed",
        }
    }
    fn parse(s: &str) -> Self {
        match s {
            "intent" => SnapshotState::Intent,
            "present" => SnapshotState::Present,
            _ => SnapshotState::Removed,
        }
    }
}

/// One snapshot row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRow {
    pub id: i64,
    pub image_id: i64,
    pub name: String,
    pub backup_id: Option<BackupId>,
    pub state: SnapshotState,
    pub created: String,
}

/// The catalog handle. One per process; not shared across threads.
pub struct Catalog {
    conn: Connection,
    path: PathBuf,
}

const BACKUP_COLS: &str = "b.id, b.image_id, i.name, b.parent_id, b.state, b.created, b.finished, \
     b.image_size, b.block_size, b.snapshot_name, b.error, b.verify_state, b.protected, b.pid, \
     s.read_bytes, s.read_blocks, s.zero_blocks, s.inherited_blocks, s.dedup_blocks, s.new_chunks, \
     s.new_bytes, s.new_plain_bytes, s.full_read, s.duration_ms, s.patched_blocks";
const BACKUP_FROM: &str =
    "FROM backups b JOIN images i ON i.id = b.image_id LEFT JOIN backup_stats s ON s.backup_id = b.id";

fn backup_from_row(r: &Row<'_>) -> rusqlite::Result<BackupRow> {
    let stats = match r.get::<_, Option<i64>>(14)? {
        None => None,
        Some(read_bytes) => Some(BackupStats {
            read_bytes: read_bytes as u64,
            read_blocks: r.get::<_, i64>(15)? as u64,
            zero_blocks: r.get::<_, i64>(16)? as u64,
            inherited_blocks: r.get::<_, i64>(17)? as u64,
            dedup_blocks: r.get::<_, i64>(18)? as u64,
            new_chunks: r.get::<_, i64>(19)? as u64,
            new_bytes: r.get::<_, i64>(20)? as u64,
            new_plain_bytes: r.get::<_, i64>(21)? as u64,
            full_read: r.get::<_, i64>(22)? != 0,
            duration_ms: r.get::<_, i64>(23)? as u64,
            patched_blocks: r.get::<_, i64>(24)? as u64,
        }),
    };
    Ok(BackupRow {
        id: BackupId(r.get::<_, i64>(0)? as u64),
        image_id: r.get(1)?,
        image: r.get(2)?,
        parent: r.get::<_, Option<i64>>(3)?.map(|p| BackupId(p as u64)),
        state: enum_col(r, 4, "backup state", BackupState::parse)?,
        created: r.get(5)?,
        finished: r.get(6)?,
        image_size: r.get::<_, i64>(7)? as u64,
        block_size: r.get::<_, i64>(8)? as u32,
        snapshot: r.get(9)?,
        error: r.get(10)?,
        verify_state: enum_col(r, 11, "verify state", VerifyState::parse)?,
        protected: r.get::<_, i64>(12)? != 0,
        pid: r.get::<_, Option<i64>>(13)?.map(|p| p as u32),
        stats,
    })
}

fn image_from_row(r: &Row<'_>) -> rusqlite::Result<ImageRow> {
    Ok(ImageRow {
        id: r.get(0)?,
        name: r.get(1)?,
        source: r.get(2)?,
        block_size: r.get::<_, i64>(3)? as u32,
        created: r.get(4)?,
    })
}

fn snapshot_from_row(r: &Row<'_>) -> rusqlite::Result<SnapshotRow> {
    Ok(SnapshotRow {
        id: r.get(0)?,
        image_id: r.get(1)?,
        name: r.get(2)?,
        backup_id: r.get::<_, Option<i64>>(3)?.map(|b| BackupId(b as u64)),
        state: SnapshotState::parse(&r.get::<_, String>(4)?),
        created: r.get(5)?,
    })
}

/// Puts the catalog in the rollback-journal mode TRUNCATE (see
/// [`Catalog::open`]).
fn switch_journal_mode(conn: &Connection, path: &Path) -> Result<()> {
    match conn.pragma_update_and_check(None, "journal_mode", "TRUNCATE", |r| r.get::<_, String>(0)) {
        Ok(mode) if mode.eq_ignore_ascii_case("truncate") => Ok(()),
        Ok(mode) => {
            tracing::warn!(catalog = %path.display(), mode = %mode, "catalog stays in journal mode {mode} while another process has it open");
            Ok(())
        }
        Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::DatabaseBusy => {
            tracing::warn!(catalog = %path.display(), "catalog stays in WAL mode while another process has it open");
            Ok(())
        }
        Err(source) => Err(Error::Sqlite { path: path.to_path_buf(), source }),
    }
}

/// Current UTC time as stored in the catalog and manifests.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Makes the catalog file private whatever the umask: created here mode
/// 0600 when missing (SQLite gives its -wal and -shm files the mode of the
/// database file), tightened to 0600 when an older build left it readable
/// by others. It names every image, snapshot and backup.
fn make_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if path.as_os_str() == ":memory:" {
        return Ok(());
    }
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => return Err(Error::Io { op: "create", path: path.to_path_buf(), source }),
    }
    for ext in ["", "-wal", "-shm"] {
        let p = std::path::PathBuf::from(format!("{}{ext}", path.display()));
        if let Ok(md) = std::fs::symlink_metadata(&p) {
            if md.is_file() && md.permissions().mode() & 0o077 != 0 {
                // best effort: a read-only catalog (or another owner's) is still usable
                let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(md.permissions().mode() & 0o7700));
            }
        }
    }
    Ok(())
}

impl Catalog {
    fn err(&self, source: rusqlite::Error) -> Error {
        Error::Sqlite { path: self.path.clone(), source }
    }

    /// Opens (creating if needed) the catalog at `path` and migrates it.
    ///
    /// # Errors
    /// `Sqlite` when it cannot be opened, `TooNew` for a newer schema.
    pub fn open(path: &Path) -> Result<Catalog> {
        let sq = |source| Error::Sqlite { path: path.to_path_buf(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|source| Error::Io { op: "create directory", path: dir.to_path_buf(), source })?;
        }
        make_private(path)?;
        let conn = Connection::open(path).map_err(sq)?;
        conn.busy_timeout(Duration::from_secs(30)).map_err(sq)?;
        // Not WAL: its index (-shm) is mmap'd, and on a full filesystem a
        // write to a page of it that has no block yet kills the process
        // with SIGBUS instead of returning an error. A rollback journal
        // (TRUNCATE: the file is kept, emptied after each transaction)
        // fails with SQLITE_FULL instead; several processes still share
        // the catalog, writers waiting on the busy timeout. An existing WAL
        // catalog is switched here; while another process that opened it
        // in WAL mode still has it open the switch waits (busy timeout)
        // and, failing that, this process stays in WAL mode for now.
        switch_journal_mode(&conn, path)?;
        // FULL: a committed backup row survives power loss, not just a crash.
        conn.pragma_update(None, "synchronous", "FULL").map_err(sq)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(sq)?;
        let mut cat = Catalog { conn, path: path.to_path_buf() };
        cat.migrate()?;
        Ok(cat)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` in a savepoint: all of it or nothing, inside or outside a
    /// [`Catalog::with_write_lock`] transaction.
    fn in_savepoint<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        self.conn.execute_batch("SAVEPOINT bv_step").map_err(|e| self.err(e))?;
        match f(&self.conn) {
            Ok(v) => {
                self.conn.execute_batch("RELEASE bv_step").map_err(|e| self.err(e))?;
                Ok(v)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK TO bv_step; RELEASE bv_step");
                Err(self.err(e))
            }
        }
    }

    /// Runs `f` inside one IMMEDIATE transaction: the catalog's write lock
    /// is taken first, so every other writer waits (busy timeout) until it
    /// commits, and what `f` reads stays true while it runs. Commits when
    /// `f` succeeds, rolls back when it fails. The catalog's own
    /// multi-statement methods nest inside it (savepoints).
    ///
    /// # Errors
    /// `f`'s error, or `Sqlite` from BEGIN or COMMIT.
    pub fn with_write_lock<T, E: From<Error>>(&self, f: impl FnOnce(&Catalog) -> Result<T, E>) -> Result<T, E> {
        self.conn.execute_batch("BEGIN IMMEDIATE").map_err(|e| self.err(e))?;
        match f(self) {
            Ok(v) => match self.conn.execute_batch("COMMIT") {
                Ok(()) => Ok(v),
                Err(e) => {
                    let _ = self.conn.execute_batch("ROLLBACK");
                    Err(self.err(e).into())
                }
            },
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// Binds the catalog to `store_uuid` whatever it was bound to before
    /// (catalog rebuild). When it was bound to another store, every image,
    /// backup and snapshot row is dropped: they describe that store.
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn rebind_store(&self, store_uuid: &str) -> Result<()> {
        let cur: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'store_uuid'", [], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))?;
        if cur.as_deref() == Some(store_uuid) {
            return Ok(());
        }
        if cur.is_some() {
            self.conn
                .execute_batch("DELETE FROM backup_stats; DELETE FROM backups; DELETE FROM snapshots; DELETE FROM images;")
                .map_err(|e| self.err(e))?;
        }
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES ('store_uuid', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [store_uuid],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Deletes every backup row that is not `running` (catalog rebuild:
    /// the committed ones are imported again from the store; running ones
    /// belong to backups in progress, which commit them).
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn delete_finished_backups(&self) -> Result<u64> {
        let n = self
            .conn
            .execute("DELETE FROM backups WHERE state != 'running'", [])
            .map_err(|e| self.err(e))?;
        Ok(n as u64)
    }

    /// Every backup row's id and state, ascending.
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn backup_states(&self) -> Result<Vec<(BackupId, BackupState)>> {
        let mut st = self.conn.prepare("SELECT id, state FROM backups ORDER BY id").map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| Ok((BackupId(r.get::<_, i64>(0)? as u64), enum_col(r, 1, "backup state", BackupState::parse)?)))
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(|e| self.err(e))
    }

    fn migrate(&mut self) -> Result<()> {
        let version: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        if version > SCHEMA_VERSION {
            return Err(Error::TooNew { path: self.path.clone(), found: version, supported: SCHEMA_VERSION });
        }
        for (i, step) in schema::MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = self.conn.transaction().map_err(|e| Error::Sqlite { path: self.path.clone(), source: e })?;
            tx.execute_batch(step).map_err(|e| Error::Sqlite { path: self.path.clone(), source: e })?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .map_err(|e| Error::Sqlite { path: self.path.clone(), source: e })?;
            tx.commit().map_err(|e| Error::Sqlite { path: self.path.clone(), source: e })?;
        }
        Ok(())
    }

    /// Ties the catalog to a store, or checks that it is tied to this one.
    ///
    /// # Errors
    /// `WrongStore` when the catalog was made for another store.
    pub fn bind_store(&self, store_uuid: &str) -> Result<()> {
        let cur: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'store_uuid'", [], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))?;
        match cur {
            Some(u) if u == store_uuid => Ok(()),
            Some(u) => Err(Error::WrongStore { path: self.path.clone(), catalog_store: u, store: store_uuid.into() }),
            None => {
                self.conn
                    .execute("INSERT INTO meta (key, value) VALUES ('store_uuid', ?1)", [store_uuid])
                    .map_err(|e| self.err(e))?;
                Ok(())
            }
        }
    }

    /// Folds the WAL into the main database file.
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn checkpoint(&self) -> Result<()> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(|e| self.err(e))
    }

    // ---- images ------------------------------------------------------

    /// Looks an image up by name.
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn image(&self, name: &str) -> Result<Option<ImageRow>> {
        self.conn
            .query_row("SELECT id, name, source, block_size, created FROM images WHERE name = ?1", [name], image_from_row)
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Every image, by name.
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn images(&self) -> Result<Vec<ImageRow>> {
        let mut st = self
            .conn
            .prepare("SELECT id, name, source, block_size, created FROM images ORDER BY name")
            .map_err(|e| self.err(e))?;
        let rows = st.query_map([], image_from_row).map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(|e| self.err(e))
    }

    /// Returns the image, creating it with `source` and `block_size` when
    /// new. An existing image keeps its block size; its source is updated.
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn ensure_image(&self, name: &str, source: &str, block_size: u32) -> Result<ImageRow> {
        if let Some(img) = self.image(name)? {
            if img.source != source {
                self.conn
                    .execute("UPDATE images SET source = ?1 WHERE id = ?2", params![source, img.id])
                    .map_err(|e| self.err(e))?;
            }
            return Ok(ImageRow { source: source.into(), ..img });
        }
        self.conn
            .execute(
                "INSERT INTO images (name, source, block_size, created) VALUES (?1, ?2, ?3, ?4)",
                params![name, source, block_size as i64, now_rfc3339()],
            )
            .map_err(|e| self.err(e))?;
        Ok(self.image(name)?.expect("just inserted"))
    }

    // ---- backups -----------------------------------------------------

    /// Records a new running backup and returns its id. `min_id` lets the
    /// caller skip ids that the store already holds.
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn begin_backup(
        &self,
        image_id: i64,
        parent: Option<BackupId>,
        block_size: u32,
        created: &str,
        min_id: u64,
    ) -> Result<BackupId> {
        // One statement, so the id is picked under the write lock: backups of
        // different images run in parallel processes, and a read of the
        // highest id followed by a separate insert let two of them pick the
        // same id.
        self.conn
            .execute(
                "INSERT INTO backups (id, image_id, parent_id, state, created, block_size, pid)
                 VALUES (MAX((SELECT COALESCE(MAX(id), 0) FROM backups),
                             COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'backups'), 0),
                             ?1 - 1) + 1,
                         ?2, ?3, 'running', ?4, ?5, ?6)",
                params![min_id as i64, image_id, parent.map(|p| p.0 as i64), created, block_size as i64, std::process::id()],
            )
            .map_err(|e| self.err(e))?;
        Ok(BackupId(self.conn.last_insert_rowid() as u64))
    }

    /// Records a new running backup under `id`, an id the store allocated
    /// ([`blockvault_store::Store::claim_backup_id`]): unique across every
    /// agent of a shared store, so the catalog never picks one itself.
    ///
    /// # Errors
    /// `Sqlite`, also when the catalog already has a row `id`.
    pub fn begin_backup_as(
        &self,
        id: BackupId,
        image_id: i64,
        parent: Option<BackupId>,
        block_size: u32,
        created: &str,
    ) -> Result<BackupId> {
        self.conn
            .execute(
                "INSERT INTO backups (id, image_id, parent_id, state, created, block_size, pid)
                 VALUES (?1, ?2, ?3, 'running', ?4, ?5, ?6)",
                params![id.0 as i64, image_id, parent.map(|p| p.0 as i64), created, block_size as i64, std::process::id()],
            )
            .map_err(|e| self.err(e))?;
        Ok(id)
    }

    /// Marks a backup committed, with the figures from its manifest. Called
    /// only after the manifest is durable in the store.
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn commit_backup(&self, m: &Manifest) -> Result<()> {
        self.in_savepoint(|tx| {
            tx.execute(
                "UPDATE backups SET state = 'committed', finished = ?2, image_size = ?3, block_size = ?4,
                 snapshot_name = ?5, parent_id = ?6, error = NULL WHERE id = ?1",
                params![
                    m.id.0 as i64,
                    m.finished,
                    m.image_size as i64,
                    m.block_size as i64,
                    m.snapshot,
                    m.parent.map(|p| p.0 as i64)
                ],
            )?;
            insert_stats(tx, m.id, &m.stats)?;
            insert_set_member(tx, m)?;
            Ok(())
        })
    }

    /// Marks a backup failed, recording why.
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn fail_backup(&self, id: BackupId, error: &str) -> Result<()> {
        self.conn
            .execute(
                "UPDATE backups SET state = 'failed', finished = ?2, error = ?3 WHERE id = ?1 AND state = 'running'",
                params![id.0 as i64, now_rfc3339(), error],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Marks a running backup failed because the operator (SIGTERM, Ctrl-C)
    /// or a daemon stop cancelled it: the row keeps [`CANCELLED`] as its
    /// error, and [`Catalog::latest_run`] and [`Catalog::count_failures`]
    /// leave it out (a cancel is not a failure to alert on).
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn cancel_backup(&self, id: BackupId) -> Result<()> {
        self.fail_backup(id, CANCELLED)
    }

    /// The newest finished backup of an image that was not cancelled: what
    /// its last run did.
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn latest_run(&self, image_id: i64) -> Result<Option<BackupRow>> {
        Ok(self
            .query_backups(
                "WHERE b.image_id = ?1 AND b.state != 'running' AND (b.error IS NULL OR b.error != ?2) ORDER BY b.id DESC LIMIT 1",
                &[&image_id, &CANCELLED],
            )?
            .pop())
    }

    /// Failed backups of an image, cancelled ones not counted.
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn count_failures(&self, image_id: i64) -> Result<u64> {
        let n: i64 = self
            .conn
            .query_row(
                "SELECT COUNT(*) FROM backups WHERE image_id = ?1 AND state = 'failed' AND (error IS NULL OR error != ?2)",
                params![image_id, CANCELLED],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))?;
        Ok(n as u64)
    }

    /// Removes a backup row (prune).
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn delete_backup(&self, id: BackupId) -> Result<()> {
        self.conn
            .execute("DELETE FROM backups WHERE id = ?1", [id.0 as i64])
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Sets a backup's verify state (`ok` or `invalid`).
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn set_verify_state(&self, id: BackupId, state: VerifyState) -> Result<()> {
        self.conn
            .execute("UPDATE backups SET verify_state = ?2 WHERE id = ?1", params![id.0 as i64, state.as_str()])
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Protects or unprotects a backup from pruning.
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn set_protected(&self, id: BackupId, protected: bool) -> Result<()> {
        self.conn
            .execute("UPDATE backups SET protected = ?2 WHERE id = ?1", params![id.0 as i64, protected as i64])
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn query_backups(&self, filter: &str, p: &[&dyn rusqlite::ToSql]) -> Result<Vec<BackupRow>> {
        let sql = format!("SELECT {BACKUP_COLS} {BACKUP_FROM} {filter}");
        let mut st = self.conn.prepare(&sql).map_err(|e| self.err(e))?;
        let rows = st.query_map(p, backup_from_row).map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(|e| self.err(e))
    }

    /// One backup by id, in any state.
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn backup(&self, id: BackupId) -> Result<Option<BackupRow>> {
        Ok(self.query_backups("WHERE b.id = ?1", &[&(id.0 as i64)])?.pop())
    }

    /// Committed backups, of one image or of all, oldest first.
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn committed_backups(&self, image: Option<&str>) -> Result<Vec<BackupRow>> {
        match image {
            Some(name) => self.query_backups(
                "WHERE b.state = 'committed' AND i.name = ?1 ORDER BY b.id",
                &[&name],
            ),
            None => self.query_backups("WHERE b.state = 'committed' ORDER BY b.id", &[]),
        }
    }

    /// Every backup of an image in the given state, oldest first.
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn backups_in_state(&self, image_id: i64, state: BackupState) -> Result<Vec<BackupRow>> {
        self.query_backups(
            "WHERE b.image_id = ?1 AND b.state = ?2 ORDER BY b.id",
            &[&image_id, &state.as_str()],
        )
    }

    /// The newest committed backup of an image that is not marked invalid.
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn latest_valid_backup(&self, image_id: i64) -> Result<Option<BackupRow>> {
        Ok(self
            .query_backups(
                "WHERE b.image_id = ?1 AND b.state = 'committed' AND b.verify_state != 'invalid'
                 ORDER BY b.id DESC LIMIT 1",
                &[&image_id],
            )?
            .pop())
    }

    /// Highest backup id the catalog has ever handed out.
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn max_backup_id(&self) -> Result<u64> {
        let a: i64 = self
            .conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM backups", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        let b: i64 = self
            .conn
            .query_row("SELECT COALESCE(seq, 0) FROM sqlite_sequence WHERE name = 'backups'", [], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))?
            .unwrap_or(0);
        Ok(a.max(b) as u64)
    }

    /// Inserts a committed backup from its manifest (catalog rebuild).
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn import_manifest(&self, m: &Manifest) -> Result<()> {
        let img = self.ensure_image(&m.image, &m.source, m.block_size)?;
        self.in_savepoint(|tx| {
            tx.execute(
                "INSERT INTO backups (id, image_id, parent_id, state, created, finished, image_size, block_size, snapshot_name)
                 VALUES (?1, ?2, ?3, 'committed', ?4, ?5, ?6, ?7, ?8)",
                params![
                    m.id.0 as i64,
                    img.id,
                    m.parent.map(|p| p.0 as i64),
                    m.created,
                    m.finished,
                    m.image_size as i64,
                    m.block_size as i64,
                    m.snapshot
                ],
            )?;
            insert_stats(tx, m.id, &m.stats)?;
            insert_set_member(tx, m)?;
            Ok(())
        })
    }

    /// Number of backup rows, any state.
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn backup_count(&self) -> Result<u64> {
        let n: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM backups", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        Ok(n as u64)
    }

    /// The newest backup of an image that has finished, committed or
    /// failed (for metrics: the outcome of the last run).
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn latest_finished_backup(&self, image_id: i64) -> Result<Option<BackupRow>> {
        Ok(self
            .query_backups(
                "WHERE b.image_id = ?1 AND b.state != 'running' ORDER BY b.id DESC LIMIT 1",
                &[&image_id],
            )?
            .pop())
    }

    /// Number of backups of an image in the given state.
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn count_backups(&self, image_id: i64, state: BackupState) -> Result<u64> {
        let n: i64 = self
            .conn
            .query_row(
                "SELECT COUNT(*) FROM backups WHERE image_id = ?1 AND state = ?2",
                params![image_id, state.as_str()],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))?;
        Ok(n as u64)
    }

    // ---- agent state -------------------------------------------------

    /// A value the agent keeps in the `meta` table under `key` (which must
    /// not be `store_uuid`). Agent state is not in the store: a rebuilt
    /// catalog starts without it.
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn agent_state(&self, key: &str) -> Result<Option<String>> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [format!("agent:{key}")], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Sets an agent state value (see [`Catalog::agent_state`]).
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn set_agent_state(&self, key: &str, value: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![format!("agent:{key}"), value],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    // ---- snapshots ---------------------------------------------------

    /// Records the intent to create an RBD snapshot, before creating it, so
    /// that a crash between the two is found and cleaned up by the next run.
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn snapshot_intent(&self, image_id: i64, name: &str, backup: BackupId) -> Result<i64> {
        self.conn
            .execute(
                "INSERT INTO snapshots (image_id, name, backup_id, state, created) VALUES (?1, ?2, ?3, 'intent', ?4)",
                params![image_id, name, backup.0 as i64, now_rfc3339()],
            )
            .map_err(|e| self.err(e))?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Sets a snapshot's state.
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn set_snapshot_state(&self, id: i64, state: SnapshotState) -> Result<()> {
        let removed = (state == SnapshotState::Removed).then(now_rfc3339);
        self.conn
            .execute(
                "UPDATE snapshots SET state = ?2, removed = COALESCE(?3, removed) WHERE id = ?1",
                params![id, state.as_str(), removed],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Snapshots of an image (all states), oldest first.
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn snapshots(&self, image_id: i64) -> Result<Vec<SnapshotRow>> {
        let mut st = self
            .conn
            .prepare(
                "SELECT id, image_id, name, backup_id, state, created FROM snapshots WHERE image_id = ?1 ORDER BY id",
            )
            .map_err(|e| self.err(e))?;
        let rows = st.query_map([image_id], snapshot_from_row).map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(|e| self.err(e))
    }
}

/// Records the set a manifest names, if any (same transaction as its row).
fn insert_set_member(tx: &rusqlite::Connection, m: &Manifest) -> rusqlite::Result<usize> {
    let Some(set) = &m.set else { return Ok(0) };
    tx.execute(
        "INSERT OR REPLACE INTO set_members (backup_id, grp, set_id, images) VALUES (?1, ?2, ?3, ?4)",
        params![m.id.0 as i64, set.group, set.id.0 as i64, set.images.join("\n")],
    )
}

/// One set: the committed backups of a group's images, taken between one
/// pre-snapshot and one post-snapshot hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetRow {
    pub group: String,
    /// The set id (the first backup id allocated for it).
    pub id: BackupId,
    /// The group's images when the set was taken, in its order.
    pub images: Vec<String>,
    /// The committed backups of the set, in the order of `images`.
    pub members: Vec<BackupRow>,
}

impl SetRow {
    /// True when every image of the set has a committed backup in it.
    pub fn is_complete(&self) -> bool {
        self.images.iter().all(|i| self.members.iter().any(|m| &m.image == i))
    }

    /// When the set was taken: the earliest start of its backups.
    pub fn created(&self) -> &str {
        self.members.iter().map(|m| m.created.as_str()).min().unwrap_or("")
    }

    /// The images of the set that have no committed backup in it.
    pub fn missing(&self) -> Vec<&str> {
        self.images.iter().filter(|i| !self.members.iter().any(|m| &&m.image == i)).map(String::as_str).collect()
    }
}

impl Catalog {
    /// The sets with at least one committed backup, of one group or of
    /// all, oldest first.
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn sets(&self, group: Option<&str>) -> Result<Vec<SetRow>> {
        let mut st = self
            .conn
            .prepare(
                "SELECT s.backup_id, s.grp, s.set_id, s.images FROM set_members s JOIN backups b ON b.id = s.backup_id
                 WHERE b.state = 'committed' AND (?1 IS NULL OR s.grp = ?1) ORDER BY s.set_id, s.backup_id",
            )
            .map_err(|e| self.err(e))?;
        let rows: Vec<(i64, String, i64, String)> = st
            .query_map([group], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .map_err(|e| self.err(e))?
            .collect::<rusqlite::Result<_>>()
            .map_err(|e| self.err(e))?;
        let mut out: Vec<SetRow> = Vec::new();
        for (backup, grp, set_id, images) in rows {
            let Some(row) = self.backup(BackupId(backup as u64))? else { continue };
            let id = BackupId(set_id as u64);
            if !out.last().is_some_and(|s| s.id == id && s.group == grp) {
                let images = images.split('\n').filter(|s| !s.is_empty()).map(String::from).collect();
                out.push(SetRow { group: grp, id, images, members: Vec::new() });
            }
            out.last_mut().expect("pushed above").members.push(row);
        }
        for s in &mut out {
            let order = s.images.clone();
            s.members.sort_by_key(|m| order.iter().position(|i| i == &m.image).unwrap_or(usize::MAX));
        }
        Ok(out)
    }

    /// The set (group, set id) a backup belongs to.
    ///
    /// # Errors
    /// `Sqlite`.
    pub fn set_of(&self, backup: BackupId) -> Result<Option<(String, BackupId)>> {
        self.conn
            .query_row("SELECT grp, set_id FROM set_members WHERE backup_id = ?1", [backup.0 as i64], |r| {
                Ok((r.get::<_, String>(0)?, BackupId(r.get::<_, i64>(1)? as u64)))
            })
            .optional()
            .map_err(|e| self.err(e))
    }
}

fn insert_stats(tx: &rusqlite::Connection, id: BackupId, s: &BackupStats) -> rusqlite::Result<usize> {
    tx.execute(
        "INSERT OR REPLACE INTO backup_stats (backup_id, read_bytes, read_blocks, zero_blocks, inherited_blocks,
         dedup_blocks, new_chunks, new_bytes, new_plain_bytes, full_read, duration_ms, patched_blocks)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        params![
            id.0 as i64,
            s.read_bytes as i64,
            s.read_blocks as i64,
            s.zero_blocks as i64,
            s.inherited_blocks as i64,
            s.dedup_blocks as i64,
            s.new_chunks as i64,
            s.new_bytes as i64,
            s.new_plain_bytes as i64,
            s.full_read as i64,
            s.duration_ms as i64,
            s.patched_blocks as i64
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(id: u64, image: &str, parent: Option<u64>) -> Manifest {
        Manifest {
            format: 1,
            set: None,
            id: BackupId(id),
            image: image.into(),
            source: format!("file:/{image}"),
            created: "2026-11-21T10:00:00Z".into(),
            finished: "2026-11-21T10:00:05Z".into(),
            parent: parent.map(BackupId),
            image_size: 1 << 20,
            block_size: 65536,
            blockmap_blake3: String::new(),
            snapshot: None,
            stats: BackupStats { new_bytes: 42, ..Default::default() },
            rbd: None,
        }
    }

    #[test]
    fn lifecycle_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.sqlite");
        let c = Catalog::open(&p).unwrap();
        c.bind_store("u1").unwrap();
        let img = c.ensure_image("vm", "file:/vm", 65536).unwrap();
        let id = c.begin_backup(img.id, None, 65536, "2026-11-21T10:00:00Z", 0).unwrap();
        assert_eq!(c.backups_in_state(img.id, BackupState::Running).unwrap().len(), 1);
        assert!(c.committed_backups(None).unwrap().is_empty());
        let mut m = manifest(id.0, "vm", None);
        m.source = "file:/vm".into();
        c.commit_backup(&m).unwrap();
        let id2 = c.begin_backup(img.id, Some(id), 65536, "2026-11-21T11:00:00Z", 0).unwrap();
        c.fail_backup(id2, "boom").unwrap();
        drop(c);
        let c = Catalog::open(&p).unwrap();
        assert!(matches!(c.bind_store("u2"), Err(Error::WrongStore { .. })));
        let list = c.committed_backups(Some("vm")).unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].stats.as_ref().unwrap().new_bytes, 42);
        assert_eq!(c.backup(id2).unwrap().unwrap().state, BackupState::Failed);
        assert_eq!(c.backup(id2).unwrap().unwrap().error.as_deref(), Some("boom"));
        // ids are never reused, even after a delete
        c.delete_backup(id2).unwrap();
        assert_eq!(c.max_backup_id().unwrap(), id2.0);
        let id3 = c.begin_backup(img.id, Some(id), 65536, "x", 0).unwrap();
        assert!(id3.0 > id2.0);
        let id4 = c.begin_backup(img.id, Some(id), 65536, "x", 100).unwrap();
        assert_eq!(id4.0, 100);
    }

    #[test]
    fn import_and_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("c.sqlite")).unwrap();
        c.import_manifest(&manifest(7, "a", None)).unwrap();
        c.import_manifest(&manifest(9, "a", Some(7))).unwrap();
        let l = c.committed_backups(Some("a")).unwrap();
        assert_eq!(l.iter().map(|b| b.id.0).collect::<Vec<_>>(), vec![7, 9]);
        assert_eq!(l[1].parent, Some(BackupId(7)));
        let img = c.image("a").unwrap().unwrap();
        let s = c.snapshot_intent(img.id, "blockvault-x", BackupId(9)).unwrap();
        c.set_snapshot_state(s, SnapshotState::Present).unwrap();
        let snaps = c.snapshots(img.id).unwrap();
        assert_eq!(snaps[0].state, SnapshotState::Present);
        assert_eq!(c.schema_version_for_test(), SCHEMA_VERSION);
    }

    #[test]
    fn agent_state_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("c.sqlite")).unwrap();
        c.bind_store("u").unwrap();
        assert_eq!(c.agent_state("x").unwrap(), None);
        c.set_agent_state("x", "1").unwrap();
        c.set_agent_state("x", "2").unwrap();
        assert_eq!(c.agent_state("x").unwrap().as_deref(), Some("2"));
        // agent keys never clash with the store binding
        c.set_agent_state("store_uuid", "v").unwrap();
        c.bind_store("u").unwrap();
        let img = c.ensure_image("vm", "file:/vm", 65536).unwrap();
        assert!(c.latest_finished_backup(img.id).unwrap().is_none());
        let a = c.begin_backup(img.id, None, 65536, "t", 0).unwrap();
        c.commit_backup(&manifest(a.0, "vm", None)).unwrap();
        let b = c.begin_backup(img.id, None, 65536, "t", 0).unwrap();
        c.fail_backup(b, "boom").unwrap();
        c.begin_backup(img.id, None, 65536, "t", 0).unwrap();
        assert_eq!(c.latest_finished_backup(img.id).unwrap().unwrap().id, b);
        assert_eq!(c.count_backups(img.id, BackupState::Failed).unwrap(), 1);
        assert_eq!(c.count_backups(img.id, BackupState::Committed).unwrap(), 1);
        assert_eq!(c.count_backups(img.id, BackupState::Running).unwrap(), 1);
    }

    /// Backups of different images begin in parallel processes; every one
    /// must get its own id.
    #[test]
    fn concurrent_begins_get_distinct_ids() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.sqlite");
        let c = Catalog::open(&p).unwrap();
        let img = c.ensure_image("vm", "file:/vm", 65536).unwrap();
        drop(c);
        let ids: Vec<u64> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        let c = Catalog::open(&p).unwrap();
                        (0..50).map(|_| c.begin_backup(img.id, None, 65536, "t", 0).unwrap().0).collect::<Vec<_>>()
                    })
                })
                .collect();
            workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
        });
        let distinct: std::collections::BTreeSet<u64> = ids.iter().copied().collect();
        assert_eq!((ids.len(), distinct.len()), (200, 200));
        assert_eq!(*distinct.last().unwrap(), 200);
    }

    /// A state this build does not know (a damaged catalog, or one a newer
    /// build wrote) is an error naming it, never read as `failed`.
    #[test]
    fn unknown_backup_state_is_an_error_not_failed() {
        // the error and its causes, as the CLI prints them
        fn chain(e: &dyn std::error::Error) -> String {
            let mut s = e.to_string();
            let mut cur = e.source();
            while let Some(c) = cur {
                s.push_str(&format!(": {c}"));
                cur = c.source();
            }
            s
        }
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("c.sqlite")).unwrap();
        let img = c.ensure_image("vm", "file:/vm", 65536).unwrap();
        let id = c.begin_backup(img.id, None, 65536, "t", 0).unwrap();
        c.commit_backup(&manifest(id.0, "vm", None)).unwrap();
        c.set_verify_state(id, VerifyState::Invalid).unwrap();
        assert_eq!(c.backup(id).unwrap().unwrap().verify_state, VerifyState::Invalid);
        c.conn.execute_batch("PRAGMA ignore_check_constraints = ON; UPDATE backups SET state = 'archived'").unwrap();
        let e = chain(&c.backup(id).unwrap_err());
        assert!(e.contains("unknown backup state 'archived'") && e.contains("catalog rebuild"), "{e}");
        assert!(c.backup_states().is_err());
        c.conn.execute_batch("UPDATE backups SET state = 'committed', verify_state = 'maybe'").unwrap();
        let e = chain(&c.committed_backups(None).unwrap_err());
        assert!(e.contains("unknown verify state 'maybe'"), "{e}");
    }

    /// A failed closure under the write lock rolls everything back,
    /// savepoints of the catalog's own methods included.
    #[test]
    fn write_lock_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("c.sqlite")).unwrap();
        let r: Result<()> = c.with_write_lock(|c| {
            c.import_manifest(&manifest(5, "vm", None))?;
            Err(Error::NoSuchImage { name: "x".into() })
        });
        assert!(r.is_err());
        assert!(c.backup(BackupId(5)).unwrap().is_none());
        c.with_write_lock(|c| c.import_manifest(&manifest(5, "vm", None))).unwrap();
        assert!(c.backup(BackupId(5)).unwrap().is_some());
    }

    #[test]
    fn sets_from_commits_and_imports() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("c.sqlite")).unwrap();
        let set = |id: u64| blockvault_store::SetRef { group: "vm".into(), id: BackupId(id), images: vec!["a".into(), "b".into()] };
        let member = |id: u64, image: &str, set_id: u64| Manifest { format: 2, set: Some(set(set_id)), ..manifest(id, image, None) };
        // set 10: both images committed (one by commit, one by import)
        let a = c.ensure_image("a", "file:/a", 65536).unwrap();
        c.begin_backup_as(BackupId(10), a.id, None, 65536, "2026-11-21T10:00:00Z").unwrap();
        c.commit_backup(&member(10, "a", 10)).unwrap();
        c.import_manifest(&member(11, "b", 10)).unwrap();
        // set 12: b's backup failed, only a committed
        c.import_manifest(&member(12, "a", 12)).unwrap();
        c.import_manifest(&manifest(14, "a", None)).unwrap();
        let sets = c.sets(Some("vm")).unwrap();
        assert_eq!(sets.len(), 2);
        assert!(sets[0].is_complete());
        assert_eq!(sets[0].members.iter().map(|m| m.id.0).collect::<Vec<_>>(), [10, 11]);
        assert!(!sets[1].is_complete());
        assert_eq!(sets[1].missing(), ["b"]);
        assert_eq!(c.set_of(BackupId(11)).unwrap(), Some(("vm".to_string(), BackupId(10))));
        assert_eq!(c.set_of(BackupId(14)).unwrap(), None);
        assert!(c.sets(Some("other")).unwrap().is_empty());
        c.delete_backup(BackupId(11)).unwrap();
        assert!(!c.sets(None).unwrap()[0].is_complete());
    }

    impl Catalog {
        fn schema_version_for_test(&self) -> i64 {
            self.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap()
        }
    }
}
