//! `blockvault key`: the key slots of an encrypted store.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use blockvault_store::crypto::KeyFile;
use blockvault_store::NewKey;
use clap::Subcommand;

use super::{load_config, GlobalArgs};
use crate::keys;

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// The store's key slots (the configured key file's is marked).
    List,
    /// Write a new key file that opens the store too (a recovery host's, a paper key's).
    Add {
        /// Where to write it (mode 0600; never over an existing file).
        #[arg(long)]
        key_file: PathBuf,
        /// Also protect it with a passphrase (BLOCKVAULT_NEW_PASSPHRASE, or asked).
        #[arg(long)]
        passphrase: bool,
    },
    /// Remove a key slot: its key file no longer opens the store.
    Remove {
        /// The slot's id (`key list`).
        #[arg(required_unless_present = "key_file", conflicts_with = "key_file")]
        slot: Option<String>,
        /// Or: the slot of this key file.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Change (or set, or with --none remove) the passphrase of a key file's slot.
    Passwd {
        /// The key file (default: [store] key-file). It is not changed.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// No passphrase from now on: the key file alone opens the store.
        #[arg(long)]
        none: bool,
    },
    /// Print a key file for a safe. Typed back into a file (mode 0600), the text is the key file.
    Export {
        /// The key file (default: [store] key-file).
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Framed for printing, with how to restore from it.
        #[arg(long)]
        paper: bool,
    },
}

pub fn run(g: &GlobalArgs, c: KeyCommand) -> Result<ExitCode> {
    let cfg = load_config(g)?;
    let mut store = crate::context::open_store(&cfg)?;
    if !store.is_encrypted() {
        bail!("store {} is not encrypted: it has no keys", cfg.store_url());
    }
    let configured = cfg.store.key_file.clone().expect("an encrypted store opened, so a key file is configured");
    match c {
        KeyCommand::List => {
            let mine = KeyFile::read(&configured)?.slot();
            for s in store.key_slots() {
                let pass = if s.passphrase.is_some() { "key file + passphrase" } else { "key file" };
                let me = if s.id == mine { format!("  <- {}", configured.display()) } else { String::new() };
                println!("{}  created {}  {pass}{me}", s.id, s.created);
            }
        }
        KeyCommand::Add { key_file, passphrase } => {
            if !key_file.is_absolute() {
                bail!("--key-file {}: give an absolute path", key_file.display());
            }
            let pass = if passphrase { Some(keys::new(keys::NEW_PASSPHRASE_ENV, "passphrase for the new key")?) } else { None };
            let slot = store
                .add_key(&NewKey { key_file: &key_file, passphrase: pass.as_deref().map(|p| p.as_str()) })
                .with_context(|| format!("adding a key slot to store {}", cfg.store_url()))?;
            println!("added key slot {slot}: key file {}", key_file.display());
        }
        KeyCommand::Remove { slot, key_file } => {
            let id = match (slot, key_file) {
                (Some(s), _) => s,
                (None, Some(k)) => KeyFile::read(&k)?.slot(),
                (None, None) => unreachable!("clap requires one"),
            };
            store.remove_key(&id).with_context(|| format!("removing key slot {id} of store {}", cfg.store_url()))?;
            println!("removed key slot {id}: its key file no longer opens the store");
        }
        KeyCommand::Passwd { key_file, none } => {
            let path = key_file.unwrap_or(configured);
            let kf = KeyFile::read(&path)?;
            let pass = if none { None } else { Some(keys::new(keys::NEW_PASSPHRASE_ENV, "new passphrase")?) };
            store
                .change_passphrase(&kf, pass.as_deref().map(|p| p.as_str()))
                .with_context(|| format!("changing the passphrase of key slot {} of store {}", kf.slot(), cfg.store_url()))?;
            println!(
                "key slot {} ({}) {}",
                kf.slot(),
                path.display(),
                if none { "now opens with the key file alone" } else { "has a new passphrase; the old one no longer opens it" }
            );
        }
        KeyCommand::Export { key_file, paper } => {
            let path = key_file.unwrap_or(configured);
            let kf = KeyFile::read(&path)?;
            let slot = store.key_slots().iter().find(|s| s.id == kf.slot()).map(|s| s.passphrase.is_some());
            let Some(has_pass) = slot else {
                bail!("key file {}: the store has no key slot {} for it (removed?)", path.display(), kf.slot());
            };
            if paper {
                println!("================ blockvault paper key ================");
                println!("store    {}", cfg.store_url());
                println!("printed  {}", chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
                if has_pass {
                    println!("NOTE     this slot also needs its passphrase");
                }
                println!("To restore: type the lines below into a file, chmod 600 it, and");
                println!("set [store] key-file to it. Dashes and case in the key do not matter;");
                println!("the check line catches a typo.");
                println!("------------------------------------------------------");
            }
            print!("{}", kf.to_text().as_str());
            if paper {
                println!("======================================================");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
