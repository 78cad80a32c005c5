//! The agent's configuration file (TOML).
//!
//! Every table denies unknown keys, so a typo is an error that names the key
//! instead of a setting silently ignored. Values are checked at load time
//! (block sizes, sources, cron schedules), never when a job fires.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer};

use crate::retention::RetentionPolicy;

/// Default path of the config file.
pub const DEFAULT_CONFIG: &str = "/etc/blockvault/config.toml";

/// Where the catalog of a store that is not a directory goes by default.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/blockvault";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    pub store: StoreConfig,
    #[serde(default)]
    pub catalog: CatalogConfig,
    #[serde(default)]
    pub ceph: CephConfig,
    #[serde(default)]
    pub defaults: Defaults,
    #[serde(default, rename = "image")]
    pub images: Vec<ImageConfig>,
    /// `[[group]]`: images backed up together at one point in time.
    #[serde(default, rename = "group")]
    pub groups: Vec<GroupConfig>,
    #[serde(default)]
    pub daemon: DaemonConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(skip)]
    pub path: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct StoreConfig {
    /// Directory of the chunk store. Exactly one of `path` and `url`.
    pub path: Option<PathBuf>,
    /// Where the store is when it is not a local directory:
    /// `rados:POOL[/NAMESPACE]` or `s3:http(s)://HOST[:PORT]/BUCKET[/PREFIX]`
    /// (see `blockvault_store::url`).
    pub url: Option<blockvault_store::StoreUrl>,
    /// The cluster of a `rados:` store; when the table is absent, `[ceph]`
    /// (the backup cluster is often not the source cluster, so the table
    /// replaces `[ceph]` as a whole, it does not merge with it).
    pub ceph: Option<CephConfig>,
    /// Lease of a lock held in a shared store (RADOS): a holder renews it
    /// every third of this; one killed loses the lock this long after its
    /// last renewal, and only then may others take it. Default 30s.
    #[serde(default = "default_lock_lease")]
    pub lock_lease: Duration,
    /// zstd level for new chunks (0 stores them uncompressed).
    #[serde(default = "default_level")]
    pub compression_level: i32,
    /// Hash + compress worker threads; 0 means one per core.
    #[serde(default)]
    pub workers: usize,
    /// Parallel source reads; unset: 2 for files and block devices, 4 to
    /// 16 for RBD (about 32 MiB in flight).
    #[serde(default)]
    pub readers: Option<usize>,
    /// `gc` keeps unreferenced chunks younger than this (`"24h"`, `"30m"`,
    /// or seconds), e.g. the new chunks of an interrupted backup, for its
    /// retry to reuse. Safety against running backups does not depend on it.
    #[serde(default = "default_gc_grace")]
    pub gc_grace: Duration,
    /// Key file of an encrypted store (`init --encrypt` writes it; every
    /// command needs it). Absolute.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

fn default_lock_lease() -> Duration {
    Duration(std::time::Duration::from_secs(30))
}

fn default_gc_grace() -> Duration {
    Duration(blockvault_store::gc::DEFAULT_GRACE)
}

fn default_level() -> i32 {
    3
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CatalogConfig {
    /// SQLite file; defaults to `catalog.sqlite` inside the store directory.
    pub path: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CephConfig {
    /// ceph.conf; defaults to `$CEPH_CONF`, then `/etc/ceph/ceph.conf`.
    pub conf: Option<PathBuf>,
    /// Client id without the `client.` prefix; defaults to `admin`.
    pub client_id: Option<String>,
    /// Keyring; defaults to what the conf file says.
    pub keyring: Option<PathBuf>,
    /// Seconds before an unreachable cluster is given up on (default 30).
    pub timeout: Option<u32>,
}

/// Settings every image inherits unless it sets its own.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Defaults {
    pub block_size: Option<BlockSize>,
    #[serde(alias = "keep_snapshots")]
    pub keep_snapshots: Option<u32>,
    pub retention: Option<RetentionPolicy>,
    pub schedule: Option<String>,
    /// Apply the retention policy after every successful backup made by
    /// `run` or the daemon (default false: only `blockvault prune` prunes).
    pub prune_after_backup: Option<bool>,
    /// Notification hook (see `crate::notify`): a shell command run when a
    /// backup of an image fails (not when it is cancelled).
    pub on_failure: Option<String>,
    /// How long the `on-failure` command may run before it is killed (default 60s).
    pub on_failure_timeout: Option<Duration>,
    // --- snapshot hooks, read throttling, trash release (issue 16); see `impl ImageConfig` below
    pub pre_snapshot: Option<String>,
    pub post_snapshot: Option<String>,
    pub hook_timeout: Option<Duration>,
    pub read_bandwidth: Option<Bandwidth>,
    pub read_iops: Option<u32>,
    pub release_trashed: Option<bool>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ImageConfig {
    pub name: String,
    pub source: Source,
    pub block_size: Option<BlockSize>,
    #[serde(alias = "keep_snapshots")]
    pub keep_snapshots: Option<u32>,
    pub retention: Option<RetentionPolicy>,
    pub schedule: Option<String>,
    pub prune_after_backup: Option<bool>,
    /// `on-failure` of this image (overrides `[defaults] on-failure`).
    pub on_failure: Option<String>,
    /// Labels given to every backup `run`, the daemon or `backup` makes of
    /// this image (a `--label` of the same key wins).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    // --- snapshot hooks, read throttling, trash release (issue 16)
    /// Shell command run before the snapshot (`/bin/sh -c`).
    pub pre_snapshot: Option<String>,
    /// Shell command run right after the snapshot, exactly once whenever
    /// the pre hook ran.
    pub post_snapshot: Option<String>,
    /// Each hook's time limit (default 30s); its process group is killed then.
    pub hook_timeout: Option<Duration>,
    /// Bytes per second a backup reads from its source (`"200M"`).
    pub read_bandwidth: Option<Bandwidth>,
    /// Reads per second a backup issues to its source.
    pub read_iops: Option<u32>,
    /// `run` and the daemon drop blockvault's snapshots of an image found
    /// in the RBD trash, so that it can be purged (default true).
    pub release_trashed: Option<bool>,
}

/// `[[group]]`: images whose backups are one set, taken at one point in
/// time: one pre-snapshot hook, a snapshot of every image, one
/// post-snapshot hook, then each image's backup. The group's schedule and
/// retention apply to whole sets (the images' own schedule and retention
/// are not used for the backups the group makes, nor are their hooks: the
/// group's hooks run once around all the snapshots).
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GroupConfig {
    pub name: String,
    /// Names of configured `[[image]]`s (not glob entries).
    pub images: Vec<String>,
    /// Run with `/bin/sh -c` before the snapshots (e.g. freeze the VM's
    /// filesystems); a failure fails the whole set, no snapshot is taken.
    pub pre_snapshot: Option<String>,
    /// Run once after the snapshots whenever the pre hook ran.
    pub post_snapshot: Option<String>,
    /// Per hook (default 30s).
    pub hook_timeout: Option<Duration>,
    pub schedule: Option<String>,
    pub retention: Option<RetentionPolicy>,
    pub prune_after_backup: Option<bool>,
}

impl GroupConfig {
    pub fn schedule(&self, defaults: &Defaults) -> Option<String> {
        self.schedule.clone().or_else(|| defaults.schedule.clone())
    }
    pub fn retention(&self, defaults: &Defaults) -> Option<RetentionPolicy> {
        self.retention.clone().or_else(|| defaults.retention.clone())
    }
    pub fn prune_after_backup(&self, defaults: &Defaults) -> bool {
        self.prune_after_backup.or(defaults.prune_after_backup).unwrap_or(false)
    }
    pub fn hook_timeout(&self) -> std::time::Duration {
        self.hook_timeout.map_or(std::time::Duration::from_secs(30), |d| d.0)
    }
}

/// `[daemon]`: how `blockvault daemon` runs the schedules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct DaemonConfig {
    /// Each scheduled run starts after a random delay of up to this much
    /// (`"90s"`, `"5m"`, `"1h"`, or seconds), so that images sharing a
    /// schedule do not all start at once. Default 0.
    pub random_delay: Duration,
    /// Backups running at the same time, over all images (default 2). An
    /// image never runs twice at once whatever this says.
    pub max_concurrent: usize,
    // Scheduled maintenance (`crate::maintenance`):
    /// Cron schedule of a verify of every committed backup (none by default).
    pub verify_schedule: Option<String>,
    /// Percent (0 to 100) of the referenced chunks read and decoded in full
    /// by each scheduled verify, picked at random (default 0: existence only).
    pub verify_deep_percent: Option<f64>,
    /// Cron schedule of a gc (none by default).
    pub gc_schedule: Option<String>,
    /// Shell command run when a scheduled verify or gc fails (default: `[defaults] on-failure`).
    pub on_failure: Option<String>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            random_delay: Duration(std::time::Duration::ZERO),
            max_concurrent: 2,
            verify_schedule: None,
            verify_deep_percent: None,
            gc_schedule: None,
            on_failure: None,
        }
    }
}

/// `[metrics]`: the Prometheus text file for node_exporter's textfile collector.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MetricsConfig {
    /// Absolute path of the `.prom` file; no metrics are written when unset.
    pub path: Option<PathBuf>,
}

/// A duration, written as seconds (`300`) or with a unit (`"90s"`, `"5m"`, `"2h"`, `"1d"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Duration(pub std::time::Duration);

/// A number written bare (`300`) or as a string that `parse` reads (`"5m"`).
fn number_or_string<'de, D: Deserializer<'de>>(d: D, parse: fn(&str) -> Result<u64, String>) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        N(u64),
        S(String),
    }
    match Raw::deserialize(d)? {
        Raw::N(n) => Ok(n),
        Raw::S(s) => parse(&s).map_err(serde::de::Error::custom),
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let secs = number_or_string(d, parse_duration)?;
        Ok(Duration(std::time::Duration::from_secs(secs)))
    }
}

/// Parses `300`, `300s`, `5m`, `2h`, `1d` into seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a duration (try \"90s\", \"5m\", \"1h\")"))?;
    let mult = match unit.trim() {
        "" | "s" | "sec" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("'{s}': unknown unit '{unit}' (use s, m, h or d)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("'{s}' is too large"))
}

/// A block size, written as bytes (`65536`) or with a binary suffix (`"64K"`, `"4MiB"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize(pub u32);

impl<'de> Deserialize<'de> for BlockSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = number_or_string(d, parse_size)?;
        let bs = u32::try_from(n).map_err(|_| serde::de::Error::custom(format!("{n} is too large")))?;
        blockvault_store::format::check_block_size(bs).map_err(serde::de::Error::custom)?;
        Ok(BlockSize(bs))
    }
}

/// Parses `123`, `64K`, `64KiB`, `4M`, `4MiB`, `1G` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        "t" | "tib" | "tb" => 1 << 40,
        _ => return Err(format!("'{s}': unknown unit '{unit}'")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("'{s}' is too large"))
}

/// A read rate in bytes per second, written as bytes (`1048576`) or with a
/// binary suffix (`"200M"`, `"1G"`), meaning per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bandwidth(pub u64);

impl<'de> Deserialize<'de> for Bandwidth {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = number_or_string(d, |s| parse_size(s.trim().trim_end_matches("/s")))?;
        if n == 0 {
            return Err(serde::de::Error::custom("must be more than 0 bytes per second"));
        }
        Ok(Bandwidth(n))
    }
}

/// Where an image is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A raw image file or block device.
    File(PathBuf),
    /// An RBD image; `image` may be a glob (`*`, `?`) selecting many images.
    /// With `snap` (`rbd:POOL/IMAGE@SNAP`), that fixed snapshot is the
    /// source: backed up once, no snapshot created or removed by us.
    Rbd { pool: String, namespace: Option<String>, image: String, snap: Option<String> },
}

impl Source {
    pub fn parse(s: &str) -> Result<Source, String> {
        if let Some(p) = s.strip_prefix("file:") {
            if p.is_empty() {
                return Err(format!("'{s}': empty path"));
            }
            if !p.starts_with('/') {
                return Err(format!("'{s}': the path must be absolute"));
            }
            return Ok(Source::File(PathBuf::from(p)));
        }
        if let Some(r) = s.strip_prefix("rbd:") {
            let (r, snap) = match r.split_once('@') {
                Some((_, "")) => return Err(format!("'{s}': empty snapshot name after '@'")),
                Some((r, snap)) => (r, Some(snap.to_string())),
                None => (r, None),
            };
            let parts: Vec<&str> = r.split('/').collect();
            let bad = || format!("'{s}': expected rbd:POOL/IMAGE[@SNAP] or rbd:POOL/NAMESPACE/IMAGE[@SNAP]");
            let src = match parts.as_slice() {
                [pool, image] if !pool.is_empty() && !image.is_empty() => {
                    Source::Rbd { pool: pool.to_string(), namespace: None, image: image.to_string(), snap }
                }
                [pool, ns, image] if !pool.is_empty() && !ns.is_empty() && !image.is_empty() => Source::Rbd {
                    pool: pool.to_string(),
                    namespace: Some(ns.to_string()),
                    image: image.to_string(),
                    snap,
                },
                _ => return Err(bad()),
            };
            if src.is_glob() && src.fixed_snapshot().is_some() {
                return Err(format!("'{s}': a fixed snapshot source names one image, not a glob"));
            }
            return Ok(src);
        }
        Err(format!("'{s}': unknown source kind (expected file:/PATH or rbd:POOL/IMAGE)"))
    }

    pub fn is_glob(&self) -> bool {
        matches!(self, Source::Rbd { image, .. } if image.contains(['*', '?', '[']))
    }

    /// The snapshot of an `rbd:POOL/IMAGE@SNAP` source.
    pub fn fixed_snapshot(&self) -> Option<&str> {
        match self {
            Source::Rbd { snap, .. } => snap.as_deref(),
            Source::File(_) => None,
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(p) => write!(f, "file:{}", p.display()),
            Source::Rbd { pool, namespace: None, image, snap } => {
                write!(f, "rbd:{pool}/{image}")?;
                snap.as_ref().map_or(Ok(()), |s| write!(f, "@{s}"))
            }
            Source::Rbd { pool, namespace: Some(ns), image, snap } => {
                write!(f, "rbd:{pool}/{ns}/{image}")?;
                snap.as_ref().map_or(Ok(()), |s| write!(f, "@{s}"))
            }
        }
    }
}

impl<'de> Deserialize<'de> for Source {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Source::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Image names become file names (locks) and CLI arguments (`NAME@ID`).
fn check_image_name(name: &str) -> Result<(), String> {
    blockvault_store::manifest::check_image_name(name)
}

impl Config {
    /// Loads and checks a config file.
    ///
    /// # Errors
    /// A message naming the file and the bad key or value.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        Config::parse(&text, path)
    }

    /// Parses and checks config text; `path` names it in errors.
    ///
    /// # Errors
    /// A message naming the file and the bad key or value.
    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let mut cfg: Config =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("config {}: {}", path.display(), e.to_string().trim_end()))?;
        cfg.path = path.to_path_buf();
        cfg.validate().with_context(|| format!("config {}", path.display()))?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        match (&self.store.path, &self.store.url) {
            (Some(p), None) if !p.is_absolute() => bail!("store.path: '{}' must be an absolute path", p.display()),
            (Some(_), None) => {}
            (None, Some(_)) => {}
            (Some(_), Some(_)) => bail!("store: set either path (a directory) or url (rados:, s3:), not both"),
            (None, None) => bail!("store: missing path (a directory) or url (rados:POOL, s3:http://HOST/BUCKET)"),
        }
        if self.store.ceph.is_some() && !matches!(self.store.url, Some(blockvault_store::StoreUrl::Rados { .. })) {
            bail!("store.ceph: only a rados: store url uses it");
        }
        if self.store.lock_lease.0 < std::time::Duration::from_secs(2) {
            bail!("store.lock-lease: must be at least 2s");
        }
        if let Some(p) = &self.store.key_file {
            if !p.is_absolute() || p.file_name().is_none() {
                bail!("store.key-file: '{}' must be an absolute file path", p.display());
            }
        }
        if !(0..=22).contains(&self.store.compression_level) {
            bail!("store.compression-level: {} is not in 0..=22", self.store.compression_level);
        }
        if let Some(p) = &self.catalog.path {
            if !p.is_absolute() {
                bail!("catalog.path: '{}' must be an absolute path", p.display());
            }
        }
        if let Some(s) = &self.defaults.schedule {
            crate::schedule::parse(s).map_err(|e| anyhow::anyhow!("defaults.schedule: {e}"))?;
        }
        let m = &self.daemon;
        for (key, s) in [("verify-schedule", &m.verify_schedule), ("gc-schedule", &m.gc_schedule)] {
            if let Some(s) = s {
                crate::schedule::parse(s).map_err(|e| anyhow::anyhow!("daemon.{key}: {e}"))?;
            }
        }
        if let Some(p) = m.verify_deep_percent {
            if !(0.0..=100.0).contains(&p) {
                bail!("daemon.verify-deep-percent: {p} is not between 0 and 100");
            }
        }
        if self.daemon.max_concurrent == 0 {
            bail!("daemon.max-concurrent: must be at least 1");
        }
        if let Some(p) = &self.metrics.path {
            if !p.is_absolute() || p.file_name().is_none() {
                bail!("metrics.path: '{}' must be an absolute file path", p.display());
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, img) in self.images.iter().enumerate() {
            // a glob entry names its images by replacing `{image}`
            check_image_name(&img.name.replace("{image}", "x")).map_err(|e| anyhow::anyhow!("image[{i}].name: {e}"))?;
            if !seen.insert(&img.name) {
                bail!("image[{i}].name: '{}' is defined twice", img.name);
            }
            if img.source.is_glob() && !img.name.contains("{image}") {
                bail!(
                    "image[{i}].name: '{}' selects several RBD images by glob, so its name must contain {{image}}",
                    img.name
                );
            }
            for k in img.labels.keys() {
                crate::annotate::check_key(k).map_err(|e| anyhow::anyhow!("image[{i}] ({}).labels: {e}", img.name))?;
            }
            if let Some(s) = &img.schedule {
                crate::schedule::parse(s).map_err(|e| anyhow::anyhow!("image[{i}] ({}).schedule: {e}", img.name))?;
            }
            check_hygiene(&format!("image[{i}] ({})", img.name), &img.pre_snapshot, &img.post_snapshot, img.hook_timeout, img.read_iops)?;
        }
        let mut in_group = std::collections::HashMap::new();
        for (i, g) in self.groups.iter().enumerate() {
            check_image_name(&g.name).map_err(|e| anyhow::anyhow!("group[{i}].name: {e}"))?;
            if self.images.iter().any(|img| img.name == g.name || img.matches_name(&g.name)) || !seen.insert(&g.name) {
                bail!("group[{i}].name: '{}' is already the name of an image or group", g.name);
            }
            if g.images.is_empty() {
                bail!("group[{i}] ({}).images: names no image", g.name);
            }
            for n in &g.images {
                let Some(img) = self.images.iter().find(|img| &img.name == n) else {
                    bail!("group[{i}] ({}).images: '{n}' is not a configured [[image]] name (glob entries cannot be members)", g.name);
                };
                if img.source.is_glob() {
                    bail!("group[{i}] ({}).images: '{n}' is a glob entry; a group names single images", g.name);
                }
                if img.source.fixed_snapshot().is_some() {
                    bail!("group[{i}] ({}).images: '{n}' is a fixed snapshot; a group snapshots its images", g.name);
                }
                if let Some(other) = in_group.insert(n.clone(), g.name.clone()) {
                    bail!("group[{i}] ({}).images: '{n}' is already in group '{other}'", g.name);
                }
            }
            if let Some(s) = &g.schedule {
                crate::schedule::parse(s).map_err(|e| anyhow::anyhow!("group[{i}] ({}).schedule: {e}", g.name))?;
            }
        }
        let d = &self.defaults;
        check_hygiene("defaults", &d.pre_snapshot, &d.post_snapshot, d.hook_timeout, d.read_iops)?;
        Ok(())
    }

    /// Where the store is: `[store] url`, or `[store] path` as a directory.
    pub fn store_url(&self) -> blockvault_store::StoreUrl {
        match (&self.store.url, &self.store.path) {
            (Some(u), _) => u.clone(),
            (None, Some(p)) => blockvault_store::StoreUrl::Dir(p.clone()),
            (None, None) => unreachable!("validated at load: store has a path or a url"),
        }
    }

    /// The Ceph cluster of a `rados:` store: `[store.ceph]`, else `[ceph]`.
    pub fn store_ceph(&self) -> &CephConfig {
        self.store.ceph.as_ref().unwrap_or(&self.ceph)
    }

    /// `[catalog] path`; by default `catalog.sqlite` in the store directory,
    /// and for a store that is not a directory
    /// `/var/lib/blockvault/catalog-<16 hex of blake3(url)>.sqlite` (one
    /// catalog per store a host uses).
    pub fn catalog_path(&self) -> PathBuf {
        if let Some(p) = &self.catalog.path {
            return p.clone();
        }
        match self.store_url() {
            blockvault_store::StoreUrl::Dir(d) => d.join("catalog.sqlite"),
            url => {
                let h = blake3::hash(url.to_string().as_bytes()).to_hex();
                PathBuf::from(format!("{DEFAULT_STATE_DIR}/catalog-{}.sqlite", &h[..16]))
            }
        }
    }

    pub fn workers(&self) -> usize {
        if self.store.workers > 0 {
            self.store.workers
        } else {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
        }
    }

    /// The configured image called `name`.
    ///
    /// # Errors
    /// When no image has that name.
    pub fn image(&self, name: &str) -> Result<&ImageConfig> {
        self.images.iter().find(|i| i.name == name).with_context(|| {
            let names: Vec<&str> = self.images.iter().map(|i| i.name.as_str()).collect();
            format!(
                "image '{name}' is not in config {} (configured: {})",
                self.path.display(),
                if names.is_empty() { "none".to_string() } else { names.join(", ") }
            )
        })
    }
}

impl ImageConfig {
    pub fn block_size(&self, defaults: &Defaults) -> Option<u32> {
        self.block_size.or(defaults.block_size).map(|b| b.0)
    }
    pub fn keep_snapshots(&self, defaults: &Defaults) -> u32 {
        self.keep_snapshots.or(defaults.keep_snapshots).unwrap_or(1).max(1)
    }
    pub fn retention(&self, defaults: &Defaults) -> Option<RetentionPolicy> {
        self.retention.clone().or_else(|| defaults.retention.clone())
    }
    pub fn schedule(&self, defaults: &Defaults) -> Option<String> {
        self.schedule.clone().or_else(|| defaults.schedule.clone())
    }
    pub fn prune_after_backup(&self, defaults: &Defaults) -> bool {
        self.prune_after_backup.or(defaults.prune_after_backup).unwrap_or(false)
    }
    pub fn on_failure(&self, defaults: &Defaults) -> Option<String> {
        self.on_failure.clone().or_else(|| defaults.on_failure.clone())
    }
    /// True when this entry's name is `name`, or when it is a glob entry
    /// whose name template (`{image}` standing for any RBD image name)
    /// matches `name`.
    pub fn matches_name(&self, name: &str) -> bool {
        if self.name == name {
            return true;
        }
        if !self.name.contains("{image}") {
            return false;
        }
        let parts: Vec<&str> = self.name.split("{image}").collect();
        let (first, last) = (parts[0], parts[parts.len() - 1]);
        if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
            return false;
        }
        // every `{image}` matches a non-empty run; middle parts in order
        let mut rest = &name[first.len()..name.len() - last.len()];
        for mid in &parts[1..parts.len() - 1] {
            match rest.get(1..).and_then(|r| r.find(mid)) {
                Some(at) => rest = &rest[1 + at + mid.len()..],
                None => return false,
            }
        }
        !rest.is_empty()
    }
}

impl Config {
    /// The configured group called `name`.
    pub fn group(&self, name: &str) -> Option<&GroupConfig> {
        self.groups.iter().find(|g| g.name == name)
    }

    /// The group a configured image belongs to.
    pub fn group_of(&self, image: &str) -> Option<&GroupConfig> {
        self.groups.iter().find(|g| g.images.iter().any(|i| i == image))
    }

    /// The config entry an image of the catalog belongs to: the entry of
    /// that name, else a glob entry whose name template matches it.
    pub fn entry_for(&self, name: &str) -> Option<&ImageConfig> {
        self.images.iter().find(|i| i.name == name).or_else(|| self.images.iter().find(|i| i.matches_name(name)))
    }
}

/// Checks the hook and throttle keys of one table (issue 16).
fn check_hygiene(
    table: &str,
    pre: &Option<String>,
    post: &Option<String>,
    timeout: Option<Duration>,
    iops: Option<u32>,
) -> Result<()> {
    for (key, cmd) in [("pre-snapshot", pre), ("post-snapshot", post)] {
        if cmd.as_ref().is_some_and(|c| c.trim().is_empty()) {
            bail!("{table}.{key}: empty command");
        }
    }
    if timeout.is_some_and(|t| t.0.is_zero()) {
        bail!("{table}.hook-timeout: must be at least 1s");
    }
    if iops == Some(0) {
        bail!("{table}.read-iops: must be at least 1");
    }
    Ok(())
}

/// Snapshot hooks, read throttling and trash release (issue 16): each
/// image's own key, else `[defaults]`.
impl ImageConfig {
    pub fn hooks(&self, defaults: &Defaults) -> crate::hook::Hooks {
        crate::hook::Hooks {
            pre: self.pre_snapshot.clone().or_else(|| defaults.pre_snapshot.clone()),
            post: self.post_snapshot.clone().or_else(|| defaults.post_snapshot.clone()),
            timeout: self.hook_timeout.or(defaults.hook_timeout).map_or(crate::hook::DEFAULT_TIMEOUT, |d| d.0),
        }
    }
    pub fn throttle(&self, defaults: &Defaults) -> crate::throttle::Limits {
        crate::throttle::Limits {
            bytes_per_sec: self.read_bandwidth.or(defaults.read_bandwidth).map(|b| b.0),
            ops_per_sec: self.read_iops.or(defaults.read_iops),
        }
    }
    pub fn release_trashed(&self, defaults: &Defaults) -> bool {
        self.release_trashed.or(defaults.release_trashed).unwrap_or(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Config> {
        Config::parse(t, Path::new("/t.toml"))
    }

    #[test]
    fn the_shipped_example_parses() {
        let text = include_str!("../../config.example.toml");
        let cfg = parse(text).unwrap();
        assert!(!cfg.images.is_empty());
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = parse("[store]\npath = \"/s\"\ncompresion-level = 3\n").unwrap_err();
        assert!(format!("{e:#}").contains("compresion-level"), "{e:#}");
        let e = parse("[store]\npath = \"/s\"\n[[image]]\nname = \"a\"\nsource = \"file:/a\"\nbogus = 1\n").unwrap_err();
        assert!(format!("{e:#}").contains("bogus"), "{e:#}");
    }

    #[test]
    fn bad_values_are_named() {
        let e = parse("[store]\npath = \"/s\"\n[[image]]\nname = \"a\"\nsource = \"nfs:/a\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("unknown source kind"), "{e:#}");
        let e = parse("[store]\npath = \"/s\"\n[[image]]\nname = \"a\"\nsource = \"file:/a\"\nblock-size = \"3M\"\n")
            .unwrap_err();
        assert!(format!("{e:#}").contains("power of two"), "{e:#}");
        let e = parse("[store]\npath = \"rel\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("store.path"), "{e:#}");
        let e = parse("[store]\npath = \"/s\"\n[[image]]\nname = \"a/b\"\nsource = \"file:/a\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("image[0].name"), "{e:#}");
    }

    #[test]
    fn daemon_metrics_and_prune_keys() {
        let c = parse(
            "[store]\npath = \"/s\"\n[daemon]\nrandom-delay = \"5m\"\nmax-concurrent = 3\n\
             [metrics]\npath = \"/m/bv.prom\"\n[defaults]\nprune-after-backup = true\n\
             [[image]]\nname = \"a\"\nsource = \"file:/a\"\nprune-after-backup = false\n\
             [[image]]\nname = \"b\"\nsource = \"file:/b\"\n",
        )
        .unwrap();
        assert_eq!(c.daemon.random_delay.0.as_secs(), 300);
        assert_eq!(c.daemon.max_concurrent, 3);
        assert_eq!(c.metrics.path.as_deref(), Some(Path::new("/m/bv.prom")));
        assert!(!c.images[0].prune_after_backup(&c.defaults));
        assert!(c.images[1].prune_after_backup(&c.defaults));
        let d = parse("[store]\npath = \"/s\"\n").unwrap();
        assert_eq!(d.daemon.max_concurrent, 2);
        assert!(d.daemon.random_delay.0.is_zero());
        assert!(d.metrics.path.is_none());
        assert_eq!(parse_duration("90").unwrap(), 90);
        assert_eq!(parse_duration("2h").unwrap(), 7200);
        assert!(parse_duration("5 parsecs").is_err());
        let e = parse("[store]\npath = \"/s\"\n[daemon]\nmax-concurrent = 0\n").unwrap_err();
        assert!(format!("{e:#}").contains("max-concurrent"), "{e:#}");
        let e = parse("[store]\npath = \"/s\"\n[metrics]\npath = \"m.prom\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("metrics.path"), "{e:#}");
    }

    #[test]
    fn glob_entries_match_catalog_names() {
        let c = parse(
            "[store]\npath = \"/s\"\n[[image]]\nname = \"vm-{image}\"\nsource = \"rbd:p/*\"\n\
             [[image]]\nname = \"disk\"\nsource = \"file:/d\"\n",
        )
        .unwrap();
        assert_eq!(c.entry_for("vm-101").unwrap().name, "vm-{image}");
        assert_eq!(c.entry_for("disk").unwrap().name, "disk");
        assert!(c.entry_for("vm-").is_none());
        assert!(c.entry_for("other").is_none());
    }

    #[test]
    fn groups() {
        let base = "[store]\npath = \"/s\"\n[[image]]\nname = \"a\"\nsource = \"rbd:p/a\"\n\
                    [[image]]\nname = \"b\"\nsource = \"rbd:p/b\"\n[[image]]\nname = \"g-{image}\"\nsource = \"rbd:p/g*\"\n";
        let c = parse(&format!(
            "{base}[[group]]\nname = \"vm\"\nimages = [\"a\", \"b\"]\npre-snapshot = \"true\"\nhook-timeout = \"5s\"\nschedule = \"0 * * * * *\"\n"
        ))
        .unwrap();
        let g = c.group("vm").unwrap();
        assert_eq!(g.images, ["a", "b"]);
        assert_eq!(g.hook_timeout().as_secs(), 5);
        assert_eq!(c.group_of("b").unwrap().name, "vm");
        for (t, why) in [
            ("[[group]]\nname = \"vm\"\nimages = [\"a\", \"zz\"]\n", "'zz' is not a configured"),
            ("[[group]]\nname = \"vm\"\nimages = [\"g-{image}\"]\n", "glob"),
            ("[[group]]\nname = \"a\"\nimages = [\"b\"]\n", "already the name"),
            ("[[group]]\nname = \"vm\"\nimages = []\n", "names no image"),
            ("[[group]]\nname = \"x\"\nimages = [\"a\"]\n[[group]]\nname = \"y\"\nimages = [\"a\"]\n", "already in group"),
            ("[[group]]\nname = \"vm\"\nimages = [\"a\"]\nbogus = 1\n", "bogus"),
        ] {
            let e = parse(&format!("{base}{t}")).unwrap_err();
            assert!(format!("{e:#}").contains(why), "{t}: {e:#}");
        }
    }

    #[test]
    fn hook_and_throttle_keys() {
        let c = parse(
            "[store]\npath = \"/s\"\n[defaults]\npre-snapshot = \"fsfreeze -f /m\"\npost-snapshot = \"fsfreeze -u /m\"\n\
             read-bandwidth = \"200M\"\nrelease-trashed = false\n\
             [[image]]\nname = \"a\"\nsource = \"file:/a\"\nhook-timeout = \"5s\"\nread-iops = 50\nread-bandwidth = 1000\n\
             [[image]]\nname = \"b\"\nsource = \"file:/b\"\npre-snapshot = \"true\"\nrelease-trashed = true\n",
        )
        .unwrap();
        let (a, b) = (&c.images[0], &c.images[1]);
        let ha = a.hooks(&c.defaults);
        assert_eq!(ha.pre.as_deref(), Some("fsfreeze -f /m"));
        assert_eq!(ha.post.as_deref(), Some("fsfreeze -u /m"));
        assert_eq!(ha.timeout.as_secs(), 5);
        let hb = b.hooks(&c.defaults);
        assert_eq!(hb.pre.as_deref(), Some("true"));
        assert_eq!(hb.timeout, crate::hook::DEFAULT_TIMEOUT);
        assert_eq!(a.throttle(&c.defaults).bytes_per_sec, Some(1000));
        assert_eq!(a.throttle(&c.defaults).ops_per_sec, Some(50));
        assert_eq!(b.throttle(&c.defaults).bytes_per_sec, Some(200 << 20));
        assert_eq!(b.throttle(&c.defaults).ops_per_sec, None);
        assert!(!a.release_trashed(&c.defaults));
        assert!(b.release_trashed(&c.defaults));
        let d = parse("[store]\npath = \"/s\"\n[[image]]\nname = \"a\"\nsource = \"file:/a\"\n").unwrap();
        assert!(d.images[0].hooks(&d.defaults).is_empty());
        assert!(d.images[0].release_trashed(&d.defaults));
        for (t, why) in [
            ("[defaults]\npre-snapshot = \" \"\n", "defaults.pre-snapshot"),
            ("[defaults]\nhook-timeout = 0\n", "hook-timeout"),
            ("[defaults]\nread-iops = 0\n", "read-iops"),
            ("[defaults]\nread-bandwidth = 0\n", "read-bandwidth"),
            ("[defaults]\nread-bandwidth = \"fast\"\n", "read-bandwidth"),
        ] {
            let e = parse(&format!("[store]\npath = \"/s\"\n{t}")).unwrap_err();
            assert!(format!("{e:#}").contains(why), "{t}: {e:#}");
        }
    }

    #[test]
    fn gc_grace() {
        let c = parse("[store]\npath = \"/s\"\ngc-grace = \"30m\"\n").unwrap();
        assert_eq!(c.store.gc_grace.0.as_secs(), 1800);
        let c = parse("[store]\npath = \"/s\"\ngc-grace = 0\n").unwrap();
        assert!(c.store.gc_grace.0.is_zero());
        let c = parse("[store]\npath = \"/s\"\n").unwrap();
        assert_eq!(c.store.gc_grace.0.as_secs(), 24 * 3600);
        let e = parse("[store]\npath = \"/s\"\ngc-grace = \"1 fortnight\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("gc-grace"), "{e:#}");
    }

    #[test]
    fn store_path_or_url() {
        let c = parse("[store]\nurl = \"rados:backup/ns\"\n[catalog]\npath = \"/c.sqlite\"\n").unwrap();
        assert_eq!(c.store_url().to_string(), "rados:backup/ns");
        assert_eq!(c.catalog_path(), Path::new("/c.sqlite"));
        let c = parse("[store]\nurl = \"rados:backup\"\nlock-lease = \"5s\"\n[store.ceph]\nconf = \"/b/ceph.conf\"\n[ceph]\nconf = \"/a/ceph.conf\"\n").unwrap();
        assert_eq!(c.store_ceph().conf.as_deref(), Some(Path::new("/b/ceph.conf")));
        assert_eq!(c.store.lock_lease.0.as_secs(), 5);
        let p = c.catalog_path();
        assert!(p.starts_with(DEFAULT_STATE_DIR) && p.to_string_lossy().ends_with(".sqlite"), "{}", p.display());
        assert_ne!(p, parse("[store]\nurl = \"rados:other\"\n").unwrap().catalog_path());
        let c = parse("[store]\nurl = \"rados:backup\"\n[ceph]\nclient-id = \"bv\"\n").unwrap();
        assert_eq!(c.store_ceph().client_id.as_deref(), Some("bv"));
        let c = parse("[store]\npath = \"/s\"\n").unwrap();
        assert_eq!(c.store_url().to_string(), "/s");
        assert_eq!(c.catalog_path(), Path::new("/s/catalog.sqlite"));
        assert_eq!(c.store.lock_lease.0.as_secs(), 30);
        for (t, why) in [
            ("[store]\npath = \"/s\"\nurl = \"rados:p\"\n", "not both"),
            ("[store]\nworkers = 1\n", "missing path"),
            ("[store]\nurl = \"rados:\"\n", "pool is empty"),
            ("[store]\nurl = \"ftp://x\"\n", "unknown kind"),
            ("[store]\npath = \"/s\"\n[store.ceph]\nconf = \"/c\"\n", "store.ceph"),
            ("[store]\nurl = \"rados:p\"\nlock-lease = 1\n", "lock-lease"),
        ] {
            let e = parse(t).unwrap_err();
            assert!(format!("{e:#}").contains(why), "{t}: {e:#}");
        }
    }

    #[test]
    fn sources() {
        assert_eq!(Source::parse("file:/x").unwrap(), Source::File("/x".into()));
        assert_eq!(
            Source::parse("rbd:p/ns/i").unwrap(),
            Source::Rbd { pool: "p".into(), namespace: Some("ns".into()), image: "i".into(), snap: None }
        );
        let s = Source::parse("rbd:p/golden@base").unwrap();
        assert_eq!(s.fixed_snapshot(), Some("base"));
        assert_eq!(s.to_string(), "rbd:p/golden@base");
        assert!(Source::parse("rbd:p/golden@").is_err());
        assert!(Source::parse("rbd:p/vm-*@s").is_err());
        assert!(Source::parse("rbd:p").is_err());
        assert!(Source::parse("file:x").is_err());
        assert_eq!(Source::parse("rbd:p/i").unwrap().to_string(), "rbd:p/i");
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("4MiB").unwrap(), 4 << 20);
    }
}
