//! Where a store is: a directory, a RADOS pool (and namespace), or an S3
//! bucket (and key prefix), written as one string in the agent's config
//! (`[store] url`) and in `store copy --to`.
//!
//! ```text
//! /var/lib/blockvault/store                     a directory (also `dir:/PATH`)
//! rados:POOL                                    a RADOS pool, default namespace
//! rados:POOL/NAMESPACE                          a namespace in a RADOS pool
//! s3:http://HOST:PORT/BUCKET                    an S3 bucket (path-style addressing)
//! s3:https://HOST/BUCKET/PREFIX/PARTS           objects under a key prefix
//! ```
//!
//! [`StoreUrl`]'s `Display` writes the form [`StoreUrl::parse`] reads, so a
//! URL survives a round trip (messages, catalog file names derived from it).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// A parsed store location. See the module docs for the syntax.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StoreUrl {
    /// A store directory (absolute path).
    Dir(PathBuf),
    /// A RADOS pool; `namespace` `None` is the pool's default namespace.
    Rados { pool: String, namespace: Option<String> },
    /// An S3 bucket at `endpoint` (`http://HOST:PORT` or `https://HOST`,
    /// no trailing slash); `prefix` (no leading or trailing slash) is the
    /// key prefix every object of the store is under.
    S3 { endpoint: String, bucket: String, prefix: Option<String> },
}

/// Why a store URL does not parse; the message quotes it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("store url '{url}': {reason}")]
pub struct UrlError {
    pub url: String,
    pub reason: String,
}

fn err(url: &str, reason: impl Into<String>) -> UrlError {
    UrlError { url: url.to_string(), reason: reason.into() }
}

/// A RADOS pool or namespace name, or an S3 bucket name: no slash, no NUL,
/// nothing a shell or a message would mangle.
fn check_name(url: &str, what: &str, name: &str) -> Result<(), UrlError> {
    if name.is_empty() {
        return Err(err(url, format!("the {what} is empty")));
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(err(url, format!("the {what} '{name}' contains a control or space character")));
    }
    Ok(())
}

impl StoreUrl {
    /// Parses a store URL (see the module docs).
    ///
    /// # Errors
    /// A [`UrlError`] naming the URL and what is wrong with it.
    pub fn parse(s: &str) -> Result<StoreUrl, UrlError> {
        if let Some(rest) = s.strip_prefix("rados:") {
            let rest = rest.strip_prefix("//").unwrap_or(rest);
            let (pool, ns) = match rest.split_once('/') {
                Some((p, n)) => (p, Some(n)),
                None => (rest, None),
            };
            check_name(s, "pool", pool)?;
            if let Some(ns) = ns {
                if ns.contains('/') {
                    return Err(err(s, "expected rados:POOL or rados:POOL/NAMESPACE"));
                }
                check_name(s, "namespace", ns)?;
            }
            return Ok(StoreUrl::Rados { pool: pool.into(), namespace: ns.map(Into::into) });
        }
        if let Some(rest) = s.strip_prefix("s3:") {
            let bad = || err(s, "expected s3:http://HOST[:PORT]/BUCKET[/PREFIX] or s3:https://...");
            let (scheme, after) = if let Some(a) = rest.strip_prefix("http://") {
                ("http", a)
            } else if let Some(a) = rest.strip_prefix("https://") {
                ("https", a)
            } else {
                return Err(bad());
            };
            let (host, path) = after.split_once('/').ok_or_else(bad)?;
            if host.is_empty() || host.contains(['@', '?', '#']) {
                return Err(err(s, "the host is empty or holds credentials or a query (give keys in the environment)"));
            }
            let path = path.trim_end_matches('/');
            let (bucket, prefix) = match path.split_once('/') {
                Some((b, p)) => (b, Some(p)),
                None => (path, None),
            };
            check_name(s, "bucket", bucket)?;
            if bucket.contains(['?', '#']) {
                return Err(bad());
            }
            if let Some(p) = prefix {
                if p.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
                    return Err(err(s, format!("the key prefix '{p}' has an empty, '.' or '..' part")));
                }
                check_name(s, "key prefix", p)?;
            }
            return Ok(StoreUrl::S3 {
                endpoint: format!("{scheme}://{host}"),
                bucket: bucket.into(),
                prefix: prefix.map(Into::into),
            });
        }
        let path = s.strip_prefix("dir:").unwrap_or(s);
        if path.starts_with('/') {
            return Ok(StoreUrl::Dir(PathBuf::from(path)));
        }
        if let Some((scheme, _)) = s.split_once(':') {
            return Err(err(s, format!("unknown kind '{scheme}:' (expected an absolute path, rados: or s3:)")));
        }
        Err(err(s, "a directory must be an absolute path"))
    }

    /// The store directory, for a [`StoreUrl::Dir`].
    pub fn dir(&self) -> Option<&std::path::Path> {
        match self {
            StoreUrl::Dir(p) => Some(p),
            _ => None,
        }
    }

    /// The kind, for messages: `directory`, `RADOS` or `S3`.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreUrl::Dir(_) => "directory",
            StoreUrl::Rados { .. } => "RADOS",
            StoreUrl::S3 { .. } => "S3",
        }
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Dir(p) => write!(f, "{}", p.display()),
            StoreUrl::Rados { pool, namespace: None } => write!(f, "rados:{pool}"),
            StoreUrl::Rados { pool, namespace: Some(ns) } => write!(f, "rados:{pool}/{ns}"),
            StoreUrl::S3 { endpoint, bucket, prefix: None } => write!(f, "s3:{endpoint}/{bucket}"),
            StoreUrl::S3 { endpoint, bucket, prefix: Some(p) } => write!(f, "s3:{endpoint}/{bucket}/{p}"),
        }
    }
}

impl FromStr for StoreUrl {
    type Err = UrlError;
    fn from_str(s: &str) -> Result<StoreUrl, UrlError> {
        StoreUrl::parse(s)
    }
}

impl<'de> serde::Deserialize<'de> for StoreUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        StoreUrl::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> StoreUrl {
        StoreUrl::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn forms_parse_and_print_back() {
        for s in [
            "/var/lib/blockvault/store",
            "rados:backup",
            "rados:backup/host-a",
            "s3:http://127.0.0.1:7480/bv",
            "s3:https://s3.example.com/bucket/site/a",
        ] {
            assert_eq!(p(s).to_string(), s, "{s}");
            assert_eq!(p(&p(s).to_string()), p(s));
        }
        assert_eq!(p("dir:/s"), StoreUrl::Dir("/s".into()));
        assert_eq!(p("rados:rbd"), StoreUrl::Rados { pool: "rbd".into(), namespace: None });
        assert_eq!(p("rados:rbd/ns"), StoreUrl::Rados { pool: "rbd".into(), namespace: Some("ns".into()) });
        assert_eq!(
            p("s3:http://h:9000/b/x/y/"),
            StoreUrl::S3 { endpoint: "http://h:9000".into(), bucket: "b".into(), prefix: Some("x/y".into()) }
        );
        assert_eq!(p("s3:http://h/b"), StoreUrl::S3 { endpoint: "http://h".into(), bucket: "b".into(), prefix: None });
        assert_eq!(p("/s").dir(), Some(std::path::Path::new("/s")));
        assert_eq!(p("rados:x").dir(), None);
    }

    #[test]
    fn bad_forms_are_refused_with_the_reason() {
        for (s, why) in [
            ("rados:", "pool is empty"),
            ("rados:/ns", "pool is empty"),
            ("rados:p/", "namespace is empty"),
            ("rados:p/a/b", "rados:POOL/NAMESPACE"),
            ("rados:p q", "space"),
            ("s3:ftp://h/b", "expected s3:"),
            ("s3:http://h", "expected s3:"),
            ("s3:http:///b", "host is empty"),
            ("s3:http://key:secret@h/b", "credentials"),
            ("s3:http://h/", "bucket is empty"),
            ("s3:http://h/b/../c", "'..'"),
            ("s3:http://h/b//c", "empty"),
            ("nfs:/x", "unknown kind 'nfs:'"),
            ("relative/dir", "absolute path"),
            ("", "absolute path"),
        ] {
            let e = StoreUrl::parse(s).expect_err(s).to_string();
            assert!(e.contains(why), "{s}: {e}");
            assert!(e.contains(&format!("'{s}'")), "{s}: {e}");
        }
    }
}
