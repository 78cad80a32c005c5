//! Where passphrases come from: `BLOCKVAULT_PASSPHRASE` (or a file named
//! by `BLOCKVAULT_PASSPHRASE_FILE`, e.g. a systemd credential), else a
//! prompt on the terminal. A new passphrase (`key add --passphrase`,
//! `key passwd`) comes from `BLOCKVAULT_NEW_PASSPHRASE`, else a prompt
//! asked twice; `init --encrypt --passphrase` takes the store's first one
//! from `BLOCKVAULT_PASSPHRASE`, else the prompt.

use std::io::IsTerminal;
use std::path::Path;

use anyhow::{bail, Context, Result};
use zeroize::Zeroizing;

pub const PASSPHRASE_ENV: &str = "BLOCKVAULT_PASSPHRASE";
pub const PASSPHRASE_FILE_ENV: &str = "BLOCKVAULT_PASSPHRASE_FILE";
pub const NEW_PASSPHRASE_ENV: &str = "BLOCKVAULT_NEW_PASSPHRASE";

fn from_env(var: &str) -> Option<Zeroizing<String>> {
    std::env::var(var).ok().map(Zeroizing::new)
}

fn from_file() -> std::result::Result<Option<Zeroizing<String>>, String> {
    let Some(p) = std::env::var_os(PASSPHRASE_FILE_ENV) else { return Ok(None) };
    let text = Zeroizing::new(
        std::fs::read_to_string(&p).map_err(|e| format!("{PASSPHRASE_FILE_ENV}={}: {e}", Path::new(&p).display()))?,
    );
    Ok(Some(Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_string())))
}

/// The passphrase of the key slot of `key_file`, asked only when the slot
/// has one (the store calls this while unlocking).
pub fn existing(key_file: &Path) -> impl Fn() -> std::result::Result<Zeroizing<String>, String> + '_ {
    move || {
        if let Some(p) = from_env(PASSPHRASE_ENV) {
            return Ok(p);
        }
        if let Some(p) = from_file()? {
            return Ok(p);
        }
        if !std::io::stdin().is_terminal() {
            return Err(format!("set {PASSPHRASE_ENV} (or {PASSPHRASE_FILE_ENV}), or run on a terminal to be asked"));
        }
        rpassword::prompt_password(format!("passphrase for key file {}: ", key_file.display()))
            .map(Zeroizing::new)
            .map_err(|e| format!("reading the passphrase from the terminal: {e}"))
    }
}

/// A new passphrase: from `env`, else asked twice on the terminal.
///
/// # Errors
/// No terminal and no variable, the two entries differ, or it is empty.
pub fn new(env: &str, what: &str) -> Result<Zeroizing<String>> {
    let p = match from_env(env) {
        Some(p) => p,
        None => {
            if !std::io::stdin().is_terminal() {
                bail!("{what}: set {env}, or run on a terminal to be asked");
            }
            let a = Zeroizing::new(rpassword::prompt_password(format!("{what}: ")).context("reading the passphrase")?);
            let b = Zeroizing::new(rpassword::prompt_password(format!("{what} (again): ")).context("reading the passphrase")?);
            if *a != *b {
                bail!("the two passphrases differ");
            }
            a
        }
    };
    if p.is_empty() {
        bail!("{what}: an empty passphrase protects nothing (leave the passphrase out instead)");
    }
    Ok(p)
}
