//! Naming backups: `IMAGE` (the latest committed backup, or every one) and
//! `IMAGE@ID`, resolved against the config and the catalog in one place, so
//! every command that takes a backup finds it, and fails to, the same way.
//! A failure is a typed [`Error`] naming the image and the backup.

use std::fmt;
use std::str::FromStr;

use blockvault_catalog::{BackupRow, BackupState};
use blockvault_store::BackupId;

use crate::context::Ctx;
use crate::error::Error;

/// `IMAGE` or `IMAGE@ID`, as a user writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupRef {
    /// The image name; empty in `@ID` (a backup no catalog row names).
    pub image: String,
    pub id: Option<BackupId>,
}

impl BackupRef {
    /// Splits `IMAGE[@ID]` at the last `@`.
    ///
    /// # Errors
    /// [`Error::BadBackupRef`] when what follows `@` is not a number.
    pub fn parse(s: &str) -> Result<BackupRef, Error> {
        match s.rsplit_once('@') {
            None => Ok(BackupRef { image: s.to_string(), id: None }),
            Some((image, id)) => {
                let id = id.parse::<u64>().map_err(|_| Error::BadBackupRef { spec: s.to_string() })?;
                Ok(BackupRef { image: image.to_string(), id: Some(BackupId(id)) })
            }
        }
    }
}

impl FromStr for BackupRef {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        BackupRef::parse(s)
    }
}

impl fmt::Display for BackupRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.id {
            Some(id) => write!(f, "{}@{id}", self.image),
            None => f.write_str(&self.image),
        }
    }
}

/// Checks that the config or the catalog knows `image`.
///
/// # Errors
/// [`Error::ImageNotFound`], or a catalog error.
pub fn known_image(ctx: &Ctx, image: &str) -> Result<(), Error> {
    if ctx.catalog.image(image)?.is_none() && ctx.cfg.image(image).is_err() {
        return Err(Error::ImageNotFound { image: image.to_string() });
    }
    Ok(())
}

/// The catalog row of backup `id`, which must belong to `image` and be
/// committed.
///
/// # Errors
/// [`Error::BackupNotFound`] (also for a backup of another image),
/// [`Error::NotCommitted`], or a catalog error.
pub fn committed_by_id(ctx: &Ctx, image: &str, id: BackupId) -> Result<BackupRow, Error> {
    match ctx.catalog.backup(id)? {
        Some(r) if r.image == image && r.state == BackupState::Committed => Ok(r),
        Some(r) if r.image == image => Err(Error::NotCommitted { image: image.to_string(), id, state: r.state }),
        _ => Err(Error::BackupNotFound { image: image.to_string(), id }),
    }
}

/// The backup `r` names: `IMAGE@ID` that backup, `IMAGE` the latest
/// committed one.
///
/// # Errors
/// As [`committed_by_id`]; [`Error::NoCommittedBackup`] for an `IMAGE`
/// without one.
pub fn committed_backup(ctx: &Ctx, r: &BackupRef) -> Result<BackupRow, Error> {
    match r.id {
        Some(id) => committed_by_id(ctx, &r.image, id),
        None => ctx
            .catalog
            .committed_backups(Some(&r.image))?
            .pop()
            .ok_or_else(|| Error::NoCommittedBackup { image: r.image.clone() }),
    }
}

/// The backups `r` names for commands that take many: none given, every
/// committed backup; `IMAGE` every committed backup of a known image
/// (possibly none); `IMAGE@ID` that one.
///
/// # Errors
/// [`Error::ImageNotFound`], as [`committed_by_id`], or a catalog error.
pub fn committed_backups(ctx: &Ctx, r: Option<&BackupRef>) -> Result<Vec<BackupRow>, Error> {
    let Some(r) = r else { return Ok(ctx.catalog.committed_backups(None)?) };
    known_image(ctx, &r.image)?;
    match r.id {
        None => Ok(ctx.catalog.committed_backups(Some(&r.image))?),
        Some(id) => Ok(vec![committed_by_id(ctx, &r.image, id)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_refs_split_at_the_last_at() {
        assert_eq!(BackupRef::parse("vm").unwrap(), BackupRef { image: "vm".into(), id: None });
        assert_eq!(BackupRef::parse("a@b@12").unwrap(), BackupRef { image: "a@b".into(), id: Some(BackupId(12)) });
        assert_eq!(BackupRef::parse("@7").unwrap(), BackupRef { image: String::new(), id: Some(BackupId(7)) });
        assert_eq!(BackupRef::parse("vm@3").unwrap().to_string(), "vm@3");
        let e = BackupRef::parse("vm@x").unwrap_err();
        assert!(matches!(&e, Error::BadBackupRef { spec } if spec == "vm@x"), "{e}");
        assert_eq!(e.to_string(), "'vm@x': the backup id after '@' must be a number");
    }
}
