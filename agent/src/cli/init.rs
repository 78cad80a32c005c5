use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use blockvault_catalog::Catalog;
use blockvault_store::{InitOptions, NewKey, Store};
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
    let exists = match blockvault_store::read_meta(&blockvault_store::backend::dir::DirBackend::new(&cfg.store.path)) {
        Ok(_) => true,
        Err(blockvault_store::Error::NotAStore { .. }) => false,
        Err(e) => return Err(e).with_context(|| format!("opening store {}", cfg.store.path.display())),
    };
    let store = if exists {
        let s = crate::context::open_store(&cfg)?;
        if a.encrypt && !s.is_encrypted() {
            bail!("store {} already exists unencrypted: encryption is chosen when a store is made", cfg.store.path.display());
        }
        println!("store {} already initialised (uuid {})", cfg.store.path.display(), s.meta().uuid);
        s
    } else if a.encrypt {
        let Some(key_file) = cfg.store.key_file.as_deref() else {
            bail!("init --encrypt: set [store] key-file in {} to where the new key is to be written", cfg.path.display());
        };
        let pass = if a.passphrase {
            Some(crate::keys::new(crate::keys::PASSPHRASE_ENV, "passphrase for the new key")?)
        } else {
            None
        };
        let s = Store::init_encrypted(&cfg.store.path, &opts, &NewKey { key_file, passphrase: pass.as_deref().map(|p| p.as_str()) })
            .with_context(|| format!("initialising encrypted store {}", cfg.store.path.display()))?;
        println!("initialised encrypted store {} (uuid {})", cfg.store.path.display(), s.meta().uuid);
        println!(
            "key file {} (slot {}): without it{} no backup can be restored; keep a copy off this host (`blockvault key export --paper`)",
            key_file.display(),
            s.key_slots()[0].id,
            if a.passphrase { " and its passphrase" } else { "" }
        );
        s
    } else {
        let s = Store::init(&cfg.store.path, &opts).with_context(|| format!("initialising store {}", cfg.store.path.display()))?;
        println!("initialised store {} (uuid {})", cfg.store.path.display(), s.meta().uuid);
        s
    };
    let cat_path = cfg.catalog_path();
    let cat = Catalog::open(&cat_path).with_context(|| format!("creating catalog {}", cat_path.display()))?;
    cat.bind_store(&store.meta().uuid)?;
    println!("catalog {}", cat_path.display());
    Ok(ExitCode::SUCCESS)
}
