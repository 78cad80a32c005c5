use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use blockvault_catalog::Catalog;
use blockvault_store::{InitOptions, NewKey};
use clap::Args;

use super::{load_config, GlobalArgs};

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Encrypt the new store: writes a new key to `[store] key-file`
    /// (mode 0600, never over an existing file); every later command needs it.
    #[arg(long)]
    pub encrypt: bool,
    /// Also protect the key with a passphrase (BLOCKVAULT_PASSPHRASE, or asked).
    #[arg(long, requires = "encrypt")]
    pub passphrase: bool,
}

pub fn run(g: &GlobalArgs, a: InitArgs) -> Result<ExitCode> {
    let cfg = load_config(g)?;
    let block_size = cfg.defaults.block_size.map(|b| b.0).unwrap_or(blockvault_store::format::DEFAULT_BLOCK_SIZE);
    let opts = InitOptions { default_block_size: block_size };
    let url = cfg.store_url();
    let pass = if a.encrypt && a.passphrase {
        Some(crate::keys::new(crate::keys::PASSPHRASE_ENV, "passphrase for the new key")?)
    } else {
        None
    };
    let new_key = if a.encrypt {
        let Some(key_file) = cfg.store.key_file.as_deref() else {
            bail!("init --encrypt: set [store] key-file in {} to where the new key is to be written", cfg.path.display());
        };
        Some(NewKey { key_file, passphrase: pass.as_deref().map(|p| p.as_str()) })
    } else {
        None
    };
    let (store, created) = crate::context::init_store(&cfg, &opts, new_key.as_ref())?;
    match (created, &new_key) {
        (false, _) => println!("store {url} already initialised (uuid {})", store.meta().uuid),
        (true, None) => println!("initialised store {url} (uuid {})", store.meta().uuid),
        (true, Some(k)) => {
            println!("initialised encrypted store {url} (uuid {})", store.meta().uuid);
            println!(
                "key file {} (slot {}): without it{} no backup can be restored; keep a copy off this host (`blockvault key export --paper`)",
                k.key_file.display(),
                store.key_slots()[0].id,
                if a.passphrase { " and its passphrase" } else { "" }
            );
        }
    }
    // the default catalog of a store that is not a directory is in /var/lib/blockvault
    if let Some(parent) = cfg.catalog_path().parent().filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let cat_path = cfg.catalog_path();
    let cat = Catalog::open(&cat_path).with_context(|| format!("creating catalog {}", cat_path.display()))?;
    cat.bind_store(&store.meta().uuid)?;
    println!("catalog {}", cat_path.display());
    Ok(ExitCode::SUCCESS)
}
