//! `blockvault man --out DIR` (hidden): writes the man pages, generated from
//! this command line by clap_mangen: `blockvault.1` and one page per
//! subcommand (`blockvault-backup.1`, `blockvault-catalog-rebuild.1`, ...).
//! packaging/check.sh runs it to ship them in the .deb.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory};

use super::Cli;

#[derive(Args, Debug)]
pub struct ManArgs {
    /// Directory to write the pages to (created if missing).
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
}

/// Writes every page into `dir`; returns their paths, `blockvault.1` first.
///
/// # Errors
/// The directory or a page cannot be written.
pub fn write_pages(dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir).with_context(|| format!("writing man pages to {}", dir.display()))?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("blockvault") && n.ends_with(".1")))
        .collect();
    pages.sort_by_key(|p| (p.file_name() != Some("blockvault.1".as_ref()), p.clone()));
    Ok(pages)
}

pub fn run(a: ManArgs) -> Result<ExitCode> {
    for p in write_pages(&a.out)? {
        println!("{}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pages build (CI runs this) and describe the real command line.
    #[test]
    fn man_pages_render() {
        let dir = tempfile::tempdir().unwrap();
        let pages = write_pages(dir.path()).unwrap();
        assert_eq!(pages[0].file_name().unwrap(), "blockvault.1");
        let main = std::fs::read_to_string(&pages[0]).unwrap();
        assert!(main.starts_with(".ie") || main.contains(".TH blockvault 1"), "{}", &main[..200.min(main.len())]);
        assert!(main.contains(".TH blockvault 1"), "no title line");
        for sub in ["backup", "restore", "verify", "stats", "forget"] {
            assert!(main.contains(sub), "blockvault.1 does not name `{sub}`");
            assert!(dir.path().join(format!("blockvault-{sub}.1")).exists(), "no page for `{sub}`");
        }
        // hidden: not a page of its own
        assert!(!dir.path().join("blockvault-man.1").exists());
        let backup = std::fs::read_to_string(dir.path().join("blockvault-backup.1")).unwrap();
        assert!(backup.contains("\\-\\-label") || backup.contains("--label"), "blockvault-backup.1 lacks --label");
    }
}
