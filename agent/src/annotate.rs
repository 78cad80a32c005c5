//! Labels (`k=v`) and a note on backups, kept in the store beside the
//! manifest (`backups/<id>.labels`, see the store's `annotations` module),
//! so a catalog rebuilt from the store has them: `list` reads them from the
//! store. Given by `backup --label --note`, by an image's `labels = {...}`
//! for every backup of it, and changed later by `label` and `note`.
//!
//! They are written right after the backup commits: a crash between the
//! two leaves a committed backup without its labels (never a label without
//! a backup).

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use blockvault_store::{Annotations, BackupId};

use crate::context::Ctx;

/// Longest label key, label value, and note.
const MAX_KEY: usize = 64;
const MAX_VALUE: usize = 256;
const MAX_NOTE: usize = 4096;

/// A label key: 1 to 64 of `A-Za-z0-9._-`, not starting with `-`.
///
/// # Errors
/// Says what is wrong with it.
pub fn check_key(k: &str) -> Result<(), String> {
    if k.is_empty() || k.len() > MAX_KEY {
        return Err(format!("label key '{k}' must be 1 to {MAX_KEY} characters"));
    }
    if k.starts_with('-') || !k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return Err(format!("label key '{k}' may hold only letters, digits, '.', '_' and '-' (not first)"));
    }
    Ok(())
}

fn check_text(what: &str, v: &str, max: usize) -> Result<()> {
    if v.len() > max {
        bail!("{what} is {} bytes; at most {max}", v.len());
    }
    if v.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        bail!("{what} holds control characters");
    }
    Ok(())
}

/// Parses `KEY=VALUE` (the value may be empty).
///
/// # Errors
/// No `=`, or a bad key or value.
pub fn parse_label(s: &str) -> Result<(String, String)> {
    let Some((k, v)) = s.split_once('=') else { bail!("label '{s}': write it as KEY=VALUE") };
    check_key(k).map_err(anyhow::Error::msg)?;
    check_text(&format!("the value of label '{k}'"), v, MAX_VALUE)?;
    if v.contains('\n') {
        bail!("the value of label '{k}' holds a newline");
    }
    Ok((k.to_string(), v.to_string()))
}

/// Checks a note.
///
/// # Errors
/// Too long or with control characters.
pub fn check_note(n: &str) -> Result<()> {
    check_text("the note", n, MAX_NOTE)
}

/// What a new backup of `img` is annotated with: the image's configured
/// labels, then the `--label`s (a key given both ways takes the flag's
/// value), and the note.
pub fn for_backup(img: &crate::config::ImageConfig, labels: &[(String, String)], note: Option<&str>) -> Annotations {
    let mut l: BTreeMap<String, String> = img.labels.clone();
    l.extend(labels.iter().cloned());
    Annotations { labels: l, note: note.map(str::to_string) }
}

/// Records `a` on a committed backup (nothing when empty).
///
/// # Errors
/// A failed store write.
pub fn record(ctx: &Ctx, id: BackupId, a: &Annotations) -> Result<()> {
    if a.is_empty() {
        return Ok(());
    }
    ctx.store.set_annotations(id, a).with_context(|| format!("recording the labels and note of backup {id} in the store"))
}

/// True when `a` carries every `k=v` of `want`.
pub fn matches(a: &Annotations, want: &[(String, String)]) -> bool {
    want.iter().all(|(k, v)| a.labels.get(k) == Some(v))
}

/// `k=v,k2=v2` for a table cell; `-` for none.
pub fn labels_cell(a: &Annotations) -> String {
    if a.labels.is_empty() {
        return "-".into();
    }
    a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse() {
        assert_eq!(parse_label("env=prod").unwrap(), ("env".into(), "prod".into()));
        assert_eq!(parse_label("a=").unwrap(), ("a".into(), String::new()));
        assert_eq!(parse_label("k=a=b").unwrap().1, "a=b");
        assert!(parse_label("noequals").is_err());
        assert!(parse_label("=v").is_err());
        assert!(parse_label("sp ace=v").is_err());
        assert!(parse_label("-k=v").is_err());
        assert!(parse_label("k=a\nb").is_err());
        assert!(check_note("line\nline").is_ok());
        assert!(check_note("bell\u{7}").is_err());
    }

    #[test]
    fn filter() {
        let a = Annotations { labels: [("env".to_string(), "prod".to_string())].into(), note: None };
        assert!(matches(&a, &[]));
        assert!(matches(&a, &[("env".into(), "prod".into())]));
        assert!(!matches(&a, &[("env".into(), "test".into())]));
        assert!(!matches(&Annotations::default(), &[("env".into(), "prod".into())]));
    }
}
