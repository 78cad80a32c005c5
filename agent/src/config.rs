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

#[derive(Debug, Deserialize)]
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
    #[serde(skip)]
    pub path: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct StoreConfig {
    /// Directory of the chunk store.
    pub path: PathBuf,
    /// zstd level for new chunks (0 stores them uncompressed).
    #[serde(default = "default_level")]
    pub compression_level: i32,
    /// Hash + compress worker threads; 0 means one per core.
    #[serde(default)]
    pub workers: usize,
    /// Parallel source reads.
    #[serde(default = "default_readers")]
    pub readers: usize,
}

fn default_level() -> i32 {
    3
}
fn default_readers() -> usize {
    2
}

#[derive(Debug, Default, Deserialize)]
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
}

/// A block size, written as bytes (`65536`) or with a binary suffix (`"64K"`, `"4MiB"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize(pub u32);

impl<'de> Deserialize<'de> for BlockSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        let n = match Raw::deserialize(d)? {
            Raw::N(n) => n,
            Raw::S(s) => parse_size(&s).map_err(serde::de::Error::custom)?,
        };
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

/// Where an image is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A raw image file or block device.
    File(PathBuf),
    /// An RBD image; `image` may be a glob (`*`, `?`) selecting many images.
    Rbd { pool: String, namespace: Option<String>, image: String },
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
            let parts: Vec<&str> = r.split('/').collect();
            let bad = || format!("'{s}': expected rbd:POOL/IMAGE or rbd:POOL/NAMESPACE/IMAGE");
            return match parts.as_slice() {
                [pool, image] if !pool.is_empty() && !image.is_empty() => {
                    Ok(Source::Rbd { pool: pool.to_string(), namespace: None, image: image.to_string() })
                }
                [pool, ns, image] if !pool.is_empty() && !ns.is_empty() && !image.is_empty() => Ok(Source::Rbd {
                    pool: pool.to_string(),
                    namespace: Some(ns.to_string()),
                    image: image.to_string(),
                }),
                _ => Err(bad()),
            };
        }
        Err(format!("'{s}': unknown source kind (expected file:/PATH or rbd:POOL/IMAGE)"))
    }

    pub fn is_glob(&self) -> bool {
        matches!(self, Source::Rbd { image, .. } if image.contains(['*', '?', '[']))
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(p) => write!(f, "file:{}", p.display()),
            Source::Rbd { pool, namespace: None, image } => write!(f, "rbd:{pool}/{image}"),
            Source::Rbd { pool, namespace: Some(ns), image } => write!(f, "rbd:{pool}/{ns}/{image}"),
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
    if name.is_empty() || name.len() > 200 {
        return Err("must be 1 to 200 characters".into());
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:+".contains(c)) || name.starts_with('.') {
        return Err(format!("'{name}' may only use letters, digits and - _ . : + (and not start with '.')"));
    }
    Ok(())
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
        if !self.store.path.is_absolute() {
            bail!("store.path: '{}' must be an absolute path", self.store.path.display());
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
        let mut seen = std::collections::HashSet::new();
        for (i, img) in self.images.iter().enumerate() {
            check_image_name(&img.name).map_err(|e| anyhow::anyhow!("image[{i}].name: {e}"))?;
            if !seen.insert(&img.name) {
                bail!("image[{i}].name: '{}' is defined twice", img.name);
            }
            if img.source.is_glob() && !img.name.contains("{image}") {
                bail!(
                    "image[{i}].name: '{}' selects several RBD images by glob, so its name must contain {{image}}",
                    img.name
                );
            }
            if let Some(s) = &img.schedule {
                crate::schedule::parse(s).map_err(|e| anyhow::anyhow!("image[{i}] ({}).schedule: {e}", img.name))?;
            }
        }
        Ok(())
    }

    pub fn catalog_path(&self) -> PathBuf {
        self.catalog.path.clone().unwrap_or_else(|| self.store.path.join("catalog.sqlite"))
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
    fn sources() {
        assert_eq!(Source::parse("file:/x").unwrap(), Source::File("/x".into()));
        assert_eq!(
            Source::parse("rbd:p/ns/i").unwrap(),
            Source::Rbd { pool: "p".into(), namespace: Some("ns".into()), image: "i".into() }
        );
        assert!(Source::parse("rbd:p").is_err());
        assert!(Source::parse("file:x").is_err());
        assert_eq!(Source::parse("rbd:p/i").unwrap().to_string(), "rbd:p/i");
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("4MiB").unwrap(), 4 << 20);
    }
}
