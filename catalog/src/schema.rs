//! Schema and forward migrations. Append only: never edit a released step.
//! The schema version lives in `PRAGMA user_version`.

/// Migration steps; step `i` moves the schema from version `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // 0 -> 1
    r#"
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE images (
        id         INTEGER PRIMARY KEY,
        name       TEXT NOT NULL UNIQUE,
        source     TEXT NOT NULL,
        block_size INTEGER NOT NULL,
        created    TEXT NOT NULL
    );
    -- parent_id is informational (no foreign key): every block map is
    -- complete, so removing a parent never breaks a child.
    CREATE TABLE backups (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        image_id      INTEGER NOT NULL REFERENCES images(id),
        parent_id     INTEGER,
        state         TEXT NOT NULL CHECK (state IN ('running', 'committed', 'failed')),
        created       TEXT NOT NULL,
        finished      TEXT,
        image_size    INTEGER NOT NULL DEFAULT 0,
        block_size    INTEGER NOT NULL,
        snapshot_name TEXT,
        error         TEXT,
        verify_state  TEXT NOT NULL DEFAULT 'unverified'
                      CHECK (verify_state IN ('unverified', 'ok', 'invalid')),
        protected     INTEGER NOT NULL DEFAULT 0,
        pid           INTEGER
    );
    CREATE INDEX backups_image ON backups(image_id, state);
    CREATE TABLE backup_stats (
        backup_id        INTEGER PRIMARY KEY REFERENCES backups(id) ON DELETE CASCADE,
        read_bytes       INTEGER NOT NULL,
        read_blocks      INTEGER NOT NULL,
        zero_blocks      INTEGER NOT NULL,
        inherited_blocks INTEGER NOT NULL,
        dedup_blocks     INTEGER NOT NULL,
        new_chunks       INTEGER NOT NULL,
        new_bytes        INTEGER NOT NULL,
        new_plain_bytes  INTEGER NOT NULL,
        full_read        INTEGER NOT NULL,
        duration_ms      INTEGER NOT NULL
    );
    -- RBD snapshots blockvault created (or intends to create).
    CREATE TABLE snapshots (
        id        INTEGER PRIMARY KEY,
        image_id  INTEGER NOT NULL REFERENCES images(id),
        name      TEXT NOT NULL,
        backup_id INTEGER,
        state     TEXT NOT NULL CHECK (state IN ('intent', 'present', 'removed')),
        created   TEXT NOT NULL,
        removed   TEXT,
        UNIQUE (image_id, name)
    );
    "#,
    // 1 -> 2
    r#"
    ALTER TABLE backup_stats ADD COLUMN patched_blocks INTEGER NOT NULL DEFAULT 0;
    "#,
    // 2 -> 3: sets (a `[[group]]` backed up at one point in time); a
    // backup's membership, as its manifest records it (`images` is the
    // group's image names, newline-separated)
    r#"
    CREATE TABLE set_members (
        backup_id INTEGER PRIMARY KEY REFERENCES backups(id) ON DELETE CASCADE,
        grp       TEXT NOT NULL,
        set_id    INTEGER NOT NULL,
        images    TEXT NOT NULL
    );
    CREATE INDEX set_members_set ON set_members(grp, set_id);
    "#,
];
