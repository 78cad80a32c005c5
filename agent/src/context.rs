//! Opening the store and catalog named by the config.

use anyhow::{bail, Context, Result};
use blockvault_catalog::Catalog;
use blockvault_store::{Backend, InitOptions, NewKey, Store, StoreUrl, Unlock};
use tracing::warn;

use crate::config::Config;

/// The store and catalog of one config.
pub struct Ctx {
    pub cfg: Config,
    pub store: Store,
    pub catalog: Catalog,
    /// The catalog lives in memory, built from the store, because its file
    /// cannot be written (read-only filesystem): nothing recorded in it
    /// outlives the process.
    pub catalog_in_memory: bool,
}

impl Ctx {
    /// Opens the store and catalog; a catalog that is empty while the store
    /// holds backups (deleted or lost) is rebuilt from the store first.
    /// A catalog on a read-only filesystem (a read-only store's own
    /// catalog, present or not) is replaced by one built in memory from
    /// the store, with a warning: list, restore and verify then work, and
    /// what verify finds is reported but not recorded.
    ///
    /// # Errors
    /// When the store is not initialised or either cannot be opened.
    pub fn open(cfg: Config) -> Result<Ctx> {
        let store = open_store(&cfg)?;
        let cat_path = cfg.catalog_path();
        if on_read_only_fs(&cat_path) {
            warn!(
                catalog = %cat_path.display(),
                "catalog is on a read-only filesystem: using a catalog built in memory from the store (nothing is recorded)"
            );
            let catalog = crate::rebuild::rebuild_in_memory(&store)?;
            return Ok(Ctx { cfg, store, catalog, catalog_in_memory: true });
        }
        let catalog_existed = cat_path.exists();
        let mut catalog = Catalog::open(&cat_path).with_context(|| format!("opening catalog {}", cat_path.display()))?;
        if !catalog_existed || catalog.backup_count()? == 0 {
            let ids = store.list_backups()?;
            if !ids.is_empty() {
                warn!(
                    catalog = %cat_path.display(),
                    backups = ids.len(),
                    "catalog is empty but the store holds backups: rebuilding the catalog from the store"
                );
                let r = crate::rebuild::rebuild(&store, &mut catalog)?;
                for (id, why) in &r.unreadable {
                    warn!(backup = id.0, "backup {} in the store could not be imported: {why}", id.0);
                }
            }
        }
        catalog.bind_store(&store.meta().uuid)?;
        Ok(Ctx { cfg, store, catalog, catalog_in_memory: false })
    }
}

/// True when `path` (or, while it does not exist, its nearest existing
/// ancestor) is on a filesystem mounted read-only.
fn on_read_only_fs(path: &std::path::Path) -> bool {
    let mut p = path;
    loop {
        match rustix::fs::statvfs(p) {
            Ok(s) => return s.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY),
            Err(_) => match p.parent() {
                Some(up) if !up.as_os_str().is_empty() => p = up,
                _ => return false,
            },
        }
    }
}

/// The backend of a store that is not a directory (`[store] url`).
///
/// # Errors
/// When the store's cluster or service cannot be reached, or the kind is
/// not built into this binary.
pub fn remote_backend(cfg: &Config, url: &StoreUrl) -> Result<Box<dyn Backend>> {
    match url {
        StoreUrl::Dir(p) => Ok(Box::new(blockvault_store::backend::dir::DirBackend::new(p))),
        StoreUrl::Rados { pool, namespace } => {
            let c = cfg.store_ceph();
            let opts = crate::rbd::CephOptions {
                conf: c.conf.clone(),
                client_id: c.client_id.clone().unwrap_or_else(|| "admin".into()),
                keyring: c.keyring.clone(),
                timeout_secs: c.timeout.unwrap_or(crate::rbd::DEFAULT_TIMEOUT_SECS),
            };
            let ropts = blockvault_store::backend::rados::RadosOptions { lease: cfg.store.lock_lease.0 };
            let b = blockvault_store::backend::rados::RadosBackend::connect(&opts, pool, namespace.as_deref(), &ropts)
                .with_context(|| format!("opening store {url}"))?;
            Ok(Box::new(b))
        }
        StoreUrl::S3 { .. } => Ok(Box::new(s3_backend(cfg, url)?)),
    }
}

/// The backend of an `s3:` store; keys from the environment or the AWS
/// credentials file (see `blockvault_store::backend::s3`).
///
/// # Errors
/// When the URL is not an S3 one or no credentials are found.
pub fn s3_backend(cfg: &Config, url: &StoreUrl) -> Result<blockvault_store::backend::s3::S3Backend> {
    use blockvault_store::backend::s3::{S3Backend, S3Location, S3Options};
    let StoreUrl::S3 { endpoint, bucket, prefix } = url else { bail!("store {url} is not an S3 store") };
    let loc = S3Location { endpoint: endpoint.clone(), bucket: bucket.clone(), prefix: prefix.clone().unwrap_or_default() };
    let opts = S3Options { lease: cfg.store.lock_lease.0 };
    S3Backend::from_env(loc, &opts).with_context(|| format!("opening store {url}"))
}

/// Creates what a store at `url` needs before its first object can be
/// written: an S3 bucket (when missing). Nothing for other kinds.
///
/// # Errors
/// When the bucket cannot be created.
pub fn prepare_store(cfg: &Config, url: &StoreUrl) -> Result<()> {
    if let StoreUrl::S3 { .. } = url {
        s3_backend(cfg, url)?.create_bucket().with_context(|| format!("creating the bucket of store {url}"))?;
    }
    Ok(())
}

/// Opens the configured store with an error that says what to do.
///
/// # Errors
/// When the store is missing or unreadable.
pub fn open_store(cfg: &Config) -> Result<Store> {
    let url = cfg.store_url();
    let key_file = cfg.store.key_file.as_deref();
    let pass = crate::keys::existing(key_file.unwrap_or(std::path::Path::new("")));
    let unlock = Unlock { key_file, passphrase: &pass };
    let opened = match &url {
        StoreUrl::Dir(p) => Store::open_unlocked(p, &unlock),
        _ => Store::with_backend_unlocked(remote_backend(cfg, &url)?, &unlock),
    };
    match opened {
        Ok(s) => {
            if let (false, Some(k)) = (s.is_encrypted(), key_file) {
                warn!(key_file = %k.display(), "the store is not encrypted: [store] key-file is not used");
            }
            Ok(s)
        }
        Err(blockvault_store::Error::KeyRequired { .. }) => bail!(
            "store {url} is encrypted: set [store] key-file in {} to one of its key files",
            cfg.path.display()
        ),
        Err(blockvault_store::Error::NotAStore { .. }) => bail!(
            "no blockvault store at {url} (run `blockvault --config {} init` first)",
            cfg.path.display()
        ),
        Err(e) => Err(e).with_context(|| format!("opening store {url}")),
    }
}

/// Opens the configured store, creating it first when it does not exist
/// (`blockvault init`): a directory, the objects of a RADOS pool or
/// namespace, or an S3 bucket's; encrypted with `new_key` when given.
/// Returns the store and whether it was created now.
///
/// # Errors
/// When the store cannot be reached, read or created; when `new_key` is
/// given for a store that already exists unencrypted.
pub fn init_store(cfg: &Config, opts: &InitOptions, new_key: Option<&NewKey<'_>>) -> Result<(Store, bool)> {
    let url = cfg.store_url();
    prepare_store(cfg, &url)?;
    let exists = match blockvault_store::read_meta(&*remote_backend(cfg, &url)?) {
        Ok(_) => true,
        Err(blockvault_store::Error::NotAStore { .. }) => false,
        Err(e) => return Err(e).with_context(|| format!("opening store {url}")),
    };
    if exists {
        let s = open_store(cfg)?;
        if new_key.is_some() && !s.is_encrypted() {
            bail!("store {url} already exists unencrypted: encryption is chosen when a store is made");
        }
        return Ok((s, false));
    }
    let s = match (&url, new_key) {
        (StoreUrl::Dir(p), None) => Store::init(p, opts),
        (StoreUrl::Dir(p), Some(k)) => Store::init_encrypted(p, opts, k),
        (_, None) => Store::init_with_backend(remote_backend(cfg, &url)?, opts),
        (_, Some(k)) => Store::init_encrypted_with_backend(remote_backend(cfg, &url)?, opts, k),
    }
    .with_context(|| format!("initialising store {url}"))?;
    Ok((s, true))
}
