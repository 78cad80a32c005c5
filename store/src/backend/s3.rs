//! The S3 backend: the store as objects in a bucket, under an optional
//! prefix, on any S3 service (radosgw, MinIO, AWS). Requests are signed by
//! `rusty-s3` (AWS Signature V4, path-style URLs) and sent by `ureq`.
//!
//! Keys are the directory layout's relative paths under the prefix:
//! `PREFIX/blockvault-store.json`, `PREFIX/chunks/<4 hex>/<64 hex>`,
//! `PREFIX/backups/<id>.json`, ..., `PREFIX/locks/<name>/...` (leases, see
//! [`super::lease`]), `PREFIX/quarantine/<64 hex>.bad` (chunks verify
//! found corrupt).
//!
//! What the store's promises rest on here:
//! * an S3 PUT is atomic: an object is visible whole or not at all, so a
//!   chunk is visible only once complete, a failed (torn) upload leaves
//!   nothing, and there are no temp objects;
//! * chunks and claims are written with `If-None-Match: *`, a conditional
//!   put that the service refuses with `412` when the key exists: chunks
//!   are never overwritten and [`Backend::create_object`] is exclusive
//!   across hosts. radosgw (checked on 16.2 by the test suite:
//!   `s3_conditional_put_is_exclusive`) and AWS S3 (since 2024) honour it;
//! * after a PUT returns, every GET, HEAD and listing sees it.
//!
//! Credentials come from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, or
//! from the `[PROFILE]` (`AWS_PROFILE`, default `default`) of the shared
//! credentials file (`AWS_SHARED_CREDENTIALS_FILE`, default
//! `~/.aws/credentials`). They are never logged or put in a message; the
//! presigned URLs that carry a signature are never shown either (errors
//! name `s3:ENDPOINT/BUCKET/PREFIX/KEY`). The region is `AWS_REGION`
//! (`AWS_DEFAULT_REGION`), default `us-east-1`, which radosgw accepts.
//!
//! Requests that may be repeated (all but a conditional create) are retried
//! on transport errors and 5xx answers, three times within ~2 s; each
//! request has a timeout, so a store that went away fails a backup within
//! a bounded time, with the object and the cause in the message.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

use super::lease::{LeaseRecord, Leases};
use super::{Backend, ChunkEntry, LockMode, StoreLock};
use crate::error::{Error, Result};
use crate::ChunkId;

/// How long a presigned request stays valid: only for its own sending.
const SIGN_FOR: Duration = Duration::from_secs(600);
/// Keys asked for per listing request (the S3 maximum).
const LIST_PAGE: usize = 1000;
/// Connect timeout of every request.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound on one request, a 4 MiB chunk on a slow link included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Back-off before each retry of a repeatable request.
const RETRY_DELAYS: [Duration; 3] = [Duration::from_millis(200), Duration::from_millis(500), Duration::from_millis(1200)];

/// Where an S3 store is: `ENDPOINT/BUCKET[/PREFIX]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Location {
    /// `http://host:port` or `https://host[/path]`.
    pub endpoint: String,
    pub bucket: String,
    /// Key prefix without slashes at either end, possibly empty.
    pub prefix: String,
}

impl S3Location {
    /// Parses `http://HOST:PORT/BUCKET[/PREFIX...]` (the part after `s3:`
    /// of a store URL).
    ///
    /// # Errors
    /// `InvalidSetting` naming what is wrong.
    pub fn parse(s: &str) -> Result<S3Location> {
        // never echo a URL with credentials in it
        let shown = match s.split_once('@') {
            Some((_, host)) if s.contains("://") => format!("{}://<credentials>@{host}", s.split("://").next().unwrap_or("")),
            _ => s.to_owned(),
        };
        let bad = |reason: &str| Error::InvalidSetting { key: "store.url", reason: format!("s3:{shown}: {reason}") };
        let url = url::Url::parse(s).map_err(|e| bad(&e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad("the endpoint must be http:// or https://"));
        }
        if url.host_str().is_none() {
            return Err(bad("no host"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad("credentials do not belong in the URL: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"));
        }
        let path = url.path().trim_matches('/');
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket (s3:http://HOST:PORT/BUCKET[/PREFIX])"));
        }
        let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
        if bucket.len() < 3 || bucket.len() > 63 || !bucket.chars().all(ok) {
            return Err(bad("a bucket name is 3-63 characters of a-z, 0-9, '-' and '.'"));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|p| p == "." || p == "..") || prefix.contains("//") {
            return Err(bad("the prefix must not contain '.', '..' or empty parts"));
        }
        let mut endpoint = format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default());
        if let Some(p) = url.port() {
            endpoint.push_str(&format!(":{p}"));
        }
        Ok(S3Location { endpoint, bucket: bucket.to_owned(), prefix: prefix.to_owned() })
    }
}

impl std::fmt::Display for S3Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3:{}/{}", self.endpoint, self.bucket)?;
        if !self.prefix.is_empty() {
            write!(f, "/{}", self.prefix)?;
        }
        Ok(())
    }
}

/// S3 access keys. `Debug` shows only the key id.
#[derive(Clone)]
pub struct S3Credentials {
    pub access_key: String,
    pub secret_key: String,
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3Credentials({}, <secret>)", self.access_key)
    }
}

impl S3Credentials {
    /// From the environment or the shared credentials file (module docs).
    ///
    /// # Errors
    /// `InvalidSetting` when neither has them (naming where it looked).
    pub fn from_env() -> Result<S3Credentials> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if let (Some(a), Some(s)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            return Ok(S3Credentials { access_key: a, secret_key: s });
        }
        let file = env("AWS_SHARED_CREDENTIALS_FILE")
            .map(PathBuf::from)
            .or_else(|| env("HOME").map(|h| Path::new(&h).join(".aws/credentials")));
        let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
        if let Some(f) = &file {
            if let Ok(text) = std::fs::read_to_string(f) {
                if let Some(c) = Self::from_ini(&text, &profile) {
                    return Ok(c);
                }
            }
        }
        Err(Error::InvalidSetting {
            key: "store.url",
            reason: format!(
                "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or put \
                 aws_access_key_id and aws_secret_access_key under [{profile}] in {}",
                file.map(|f| f.display().to_string()).unwrap_or_else(|| "~/.aws/credentials".into())
            ),
        })
    }

    /// The two keys of `[profile]` in a credentials file.
    fn from_ini(text: &str, profile: &str) -> Option<S3Credentials> {
        let (mut section, mut a, mut s) = (String::new(), None, None);
        for line in text.lines().map(str::trim) {
            if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.trim().to_owned();
                continue;
            }
            if section != profile {
                continue;
            }
            if let Some((k, v)) = line.split_once('=') {
                match k.trim() {
                    "aws_access_key_id" => a = Some(v.trim().to_owned()),
                    "aws_secret_access_key" => s = Some(v.trim().to_owned()),
                    _ => {}
                }
            }
        }
        Some(S3Credentials { access_key: a?, secret_key: s? })
    }
}

/// A store in an S3 bucket. Cheap to clone (the handle is shared with
/// lease renewal threads).
#[derive(Clone)]
pub struct S3Backend {
    inner: Arc<Inner>,
}

struct Inner {
    location: PathBuf,
    loc: S3Location,
    bucket: Bucket,
    creds: Credentials,
    agent: ureq::Agent,
    lease: Duration,
}

/// Settings of an S3 store handle.
#[derive(Clone, Debug)]
pub struct S3Options {
    /// Lease of a lock held in the store (see [`super::lease`]).
    pub lease: Duration,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options { lease: super::lease::DEFAULT_LEASE }
    }
}

/// One answer: status, headers we use, body.
struct Answer {
    status: u16,
    last_modified: Option<String>,
    body: Vec<u8>,
}

impl S3Backend {
    /// A handle on the store at `loc`; nothing is sent yet.
    ///
    /// # Errors
    /// `InvalidSetting` when the endpoint does not make a bucket URL.
    pub fn new(loc: S3Location, creds: S3Credentials, opts: &S3Options) -> Result<S3Backend> {
        let region = std::env::var("AWS_REGION")
            .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
            .ok()
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| "us-east-1".into());
        let endpoint = url::Url::parse(&loc.endpoint)
            .map_err(|e| Error::InvalidSetting { key: "store.url", reason: format!("{loc}: {e}") })?;
        let bucket = Bucket::new(endpoint, UrlStyle::Path, loc.bucket.clone(), region)
            .map_err(|e| Error::InvalidSetting { key: "store.url", reason: format!("{loc}: {e}") })?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_global(Some(REQUEST_TIMEOUT))
            .max_idle_connections_per_host(64)
            .build()
            .into();
        let creds = Credentials::new(creds.access_key, creds.secret_key);
        Ok(S3Backend { inner: Arc::new(Inner { location: PathBuf::from(loc.to_string()), loc, bucket, creds, agent, lease: opts.lease }) })
    }

    /// [`S3Backend::new`] with [`S3Credentials::from_env`].
    ///
    /// # Errors
    /// As those two.
    pub fn from_env(loc: S3Location, opts: &S3Options) -> Result<S3Backend> {
        S3Backend::new(loc, S3Credentials::from_env()?, opts)
    }

    /// Where the store is.
    pub fn s3_location(&self) -> &S3Location {
        &self.inner.loc
    }

    /// Creates the bucket unless it exists (`blockvault init`).
    ///
    /// # Errors
    /// `Io` naming the bucket and the service's answer.
    pub fn create_bucket(&self) -> Result<()> {
        let i = &self.inner;
        let what = PathBuf::from(format!("s3:{}/{}", i.loc.endpoint, i.loc.bucket));
        let head = i.bucket.head_bucket(Some(&i.creds)).sign(SIGN_FOR);
        let a = self.send("head bucket", &what, "HEAD", head, &[], &[], true)?;
        match a.status {
            200 => return Ok(()),
            404 => {}
            s => return Err(http_error("head bucket", &what, s, &a.body)),
        }
        let url = i.bucket.create_bucket(&i.creds).sign(SIGN_FOR);
        let a = self.send("create bucket", &what, "PUT", url, &[], &[], true)?;
        match a.status {
            200 => Ok(()),
            // created by a racing init, or ours already (radosgw answers 409 BucketAlreadyOwnedByYou... or 200)
            409 if String::from_utf8_lossy(&a.body).contains("BucketAlreadyOwnedByYou") => Ok(()),
            s => Err(http_error("create bucket", &what, s, &a.body)),
        }
    }

    fn key(&self, rel: &str) -> String {
        if self.inner.loc.prefix.is_empty() {
            rel.to_owned()
        } else {
            format!("{}/{rel}", self.inner.loc.prefix)
        }
    }

    fn chunk_rel(id: &ChunkId) -> String {
        let h = id.to_hex();
        format!("chunks/{}/{h}", &h[..4])
    }

    /// Sends one request, retrying a repeatable one on transport errors and
    /// 5xx. `headers` must be the ones signed into `url`.
    #[allow(clippy::too_many_arguments)]
    fn send(
        &self,
        op: &'static str,
        what: &Path,
        method: &str,
        url: url::Url,
        headers: &[(&str, &str)],
        body: &[u8],
        repeatable: bool,
    ) -> Result<Answer> {
        let mut attempt = 0;
        loop {
            let res = self.send_once(method, &url, headers, body);
            let retry = match &res {
                Ok(a) => a.status >= 500,
                Err(_) => true,
            };
            if !retry || !repeatable || attempt >= RETRY_DELAYS.len() {
                return match res {
                    Ok(a) => Ok(a),
                    Err(e) => Err(Error::io(op, what, e)),
                };
            }
            std::thread::sleep(RETRY_DELAYS[attempt]);
            attempt += 1;
        }
    }

    fn send_once(&self, method: &str, url: &url::Url, headers: &[(&str, &str)], body: &[u8]) -> std::io::Result<Answer> {
        let agent = &self.inner.agent;
        let u = url.as_str();
        let res = match method {
            "GET" => with_headers(agent.get(u), headers).call(),
            "HEAD" => with_headers(agent.head(u), headers).call(),
            "DELETE" => with_headers(agent.delete(u), headers).call(),
            "PUT" => with_headers(agent.put(u), headers).send(body),
            "POST" => with_headers(agent.post(u), headers).send(body),
            _ => unreachable!("method {method}"),
        };
        let mut resp = res.map_err(transport_error)?;
        let status = resp.status().as_u16();
        let last_modified =
            resp.headers().get("last-modified").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let mut body = Vec::new();
        if method != "HEAD" {
            // bounded: chunks are at most MAX_CHUNK_OBJECT_LEN + 1 bytes
            // (asked for with a Range), listings and errors are small
            let cap = crate::format::MAX_CHUNK_OBJECT_LEN + 64 * 1024;
            resp.body_mut()
                .with_config()
                .limit(u64::MAX)
                .reader()
                .take(cap)
                .read_to_end(&mut body)
                .map_err(|e| std::io::Error::other(format!("reading the answer: {e}")))?;
        }
        Ok(Answer { status, last_modified, body })
    }

    fn get(&self, rel: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        let i = &self.inner;
        let key = self.key(rel);
        let range = format!("bytes=0-{limit}");
        let mut a = i.bucket.get_object(Some(&i.creds), &key);
        a.headers_mut().insert("range", range.clone());
        let url = a.sign(SIGN_FOR);
        let what = self.object_name(rel);
        let ans = self.send("get", &what, "GET", url, &[("range", &range)], &[], true)?;
        match ans.status {
            200 | 206 => {
                let mut b = ans.body;
                b.truncate(usize::try_from(limit.saturating_add(1)).unwrap_or(usize::MAX));
                Ok(Some(b))
            }
            // an empty object: the range is not satisfiable
            416 => Ok(Some(Vec::new())),
            404 => Ok(None),
            s => Err(http_error("get", &what, s, &ans.body)),
        }
    }

    fn head(&self, rel: &str) -> Result<Option<Option<SystemTime>>> {
        let i = &self.inner;
        let url = i.bucket.head_object(Some(&i.creds), &self.key(rel)).sign(SIGN_FOR);
        let what = self.object_name(rel);
        let a = self.send("head", &what, "HEAD", url, &[], &[], true)?;
        match a.status {
            200 => Ok(Some(a.last_modified.as_deref().and_then(parse_http_date))),
            404 => Ok(None),
            s => Err(http_error("head", &what, s, &a.body)),
        }
    }

    /// PUT; with `exclusive`, `If-None-Match: *`, and false when the key
    /// existed.
    fn put(&self, rel: &str, bytes: &[u8], exclusive: bool) -> Result<bool> {
        let i = &self.inner;
        let key = self.key(rel);
        let mut a = i.bucket.put_object(Some(&i.creds), &key);
        if exclusive {
            a.headers_mut().insert("if-none-match", "*");
        }
        let url = a.sign(SIGN_FOR);
        let what = self.object_name(rel);
        let headers: &[(&str, &str)] = if exclusive { &[("if-none-match", "*")] } else { &[] };
        // A conditional create is not repeated blindly: if the first one
        // reached the store, the second says 412 although we wrote it.
        // Chunks are the same bytes under the same id either way, so for
        // them the caller's answer stays right; claims check their token
        // (see `lease`).
        let a = self.send("put", &what, "PUT", url, headers, bytes, !exclusive || rel.starts_with("chunks/"))?;
        match a.status {
            200 => Ok(true),
            412 if exclusive => Ok(false),
            // radosgw answers a racing conditional create with 409
            409 if exclusive && String::from_utf8_lossy(&a.body).contains("ConcurrentModification") => Ok(false),
            s => Err(http_error("put", &what, s, &a.body)),
        }
    }

    fn delete(&self, rel: &str) -> Result<()> {
        let i = &self.inner;
        let url = i.bucket.delete_object(Some(&i.creds), &self.key(rel)).sign(SIGN_FOR);
        let what = self.object_name(rel);
        let a = self.send("delete", &what, "DELETE", url, &[], &[], true)?;
        match a.status {
            200 | 204 | 404 => Ok(()),
            s => Err(http_error("delete", &what, s, &a.body)),
        }
    }

    /// Server-side copy of `from` to `to` (`to` may equal `from`: a touch).
    fn copy(&self, from: &str, to: &str) -> Result<()> {
        let i = &self.inner;
        let src = format!("/{}/{}", i.loc.bucket, self.key(from));
        let to_key = self.key(to);
        let mut a = i.bucket.put_object(Some(&i.creds), &to_key);
        a.headers_mut().insert("x-amz-copy-source", src.clone());
        a.headers_mut().insert("x-amz-metadata-directive", "REPLACE");
        let url = a.sign(SIGN_FOR);
        let what = self.object_name(to);
        let headers = [("x-amz-copy-source", src.as_str()), ("x-amz-metadata-directive", "REPLACE")];
        let a = self.send("copy", &what, "PUT", url, &headers, &[], true)?;
        match a.status {
            // a copy can fail after its 200 status line: the error is in the body
            200 if !String::from_utf8_lossy(&a.body).contains("<Error>") => Ok(()),
            404 => Err(Error::io("copy", what, std::io::ErrorKind::NotFound.into())),
            s => Err(http_error("copy", &what, s, &a.body)),
        }
    }

    /// (key below the prefix, size, last modified) of every object under `rel`.
    fn list(&self, rel: &str) -> Result<Vec<(String, u64, Option<SystemTime>)>> {
        let i = &self.inner;
        let full = self.key(rel);
        let strip = self.key("");
        let what = self.object_name(rel);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut a = i.bucket.list_objects_v2(Some(&i.creds));
            a.with_prefix(full.clone());
            a.with_max_keys(LIST_PAGE);
            if let Some(t) = &token {
                a.with_continuation_token(t.clone());
            }
            let url = a.sign(SIGN_FOR);
            let ans = self.send("list", &what, "GET", url, &[], &[], true)?;
            if ans.status != 200 {
                return Err(http_error("list", &what, ans.status, &ans.body));
            }
            let text = String::from_utf8_lossy(&ans.body);
            let page = rusty_s3::actions::ListObjectsV2::parse_response(&text).map_err(|e| Error::CorruptFile {
                path: what.clone(),
                reason: format!("listing answer does not parse: {e}"),
            })?;
            for c in page.contents {
                let k = c.key.strip_prefix(&strip).unwrap_or(&c.key).to_owned();
                let t = c.last_modified.as_deref().and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok()).map(SystemTime::from);
                out.push((k, c.size.unwrap_or(0), t));
            }
            match page.next_continuation_token {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => break,
            }
        }
        Ok(out)
    }

    fn leases(&self) -> Leases<S3Backend> {
        Leases::new(Arc::new(self.clone()), self.inner.lease)
    }

    /// Who holds lock `name`, for a message; `None` when it is free.
    ///
    /// # Errors
    /// `Io`.
    pub fn lease_holder(&self, name: &str) -> Result<Option<LeaseRecord>> {
        self.leases().holder(name)
    }
}

fn with_headers<B>(mut r: ureq::RequestBuilder<B>, headers: &[(&str, &str)]) -> ureq::RequestBuilder<B> {
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r
}

/// A transport error as an `io::Error`, without the URL (it carries a
/// signature).
fn transport_error(e: ureq::Error) -> std::io::Error {
    match e {
        ureq::Error::Io(io) => io,
        ureq::Error::Timeout(t) => std::io::Error::new(std::io::ErrorKind::TimedOut, format!("timed out ({t})")),
        ureq::Error::HostNotFound => std::io::Error::new(std::io::ErrorKind::NotFound, "host not found"),
        ureq::Error::ConnectionFailed => std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection failed"),
        other => std::io::Error::other(other.to_string()),
    }
}

/// An error answer as `Io`: status, S3 error code and message.
fn http_error(op: &'static str, what: &Path, status: u16, body: &[u8]) -> Error {
    let text = String::from_utf8_lossy(body);
    let tag = |t: &str| {
        let open = format!("<{t}>");
        let start = text.find(&open)? + open.len();
        let end = text[start..].find("</")? + start;
        Some(text[start..end].to_owned())
    };
    let mut msg = format!("S3 answered HTTP {status}");
    if let Some(code) = tag("Code") {
        msg.push_str(&format!(" {code}"));
    }
    if let Some(m) = tag("Message").filter(|m| !m.is_empty()) {
        msg.push_str(&format!(": {m}"));
    }
    let kind = match status {
        403 => std::io::ErrorKind::PermissionDenied,
        404 => std::io::ErrorKind::NotFound,
        _ => std::io::ErrorKind::Other,
    };
    Error::io(op, what, std::io::Error::new(kind, msg))
}

fn parse_http_date(s: &str) -> Option<SystemTime> {
    chrono::DateTime::parse_from_rfc2822(s).ok().map(SystemTime::from)
}

fn chunk_of_key(k: &str) -> Option<ChunkId> {
    let name = k.strip_prefix("chunks/")?.split('/').nth(1)?;
    if name.len() != 64 {
        return None;
    }
    name.parse().ok()
}

impl Backend for S3Backend {
    fn location(&self) -> &Path {
        &self.inner.location
    }

    fn object_name(&self, key: &str) -> PathBuf {
        PathBuf::from(format!("{}/{key}", self.inner.location.display()))
    }

    fn chunk_exists(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.head(&Self::chunk_rel(id))?.is_some())
    }

    fn put_chunk(&self, id: &ChunkId, bytes: &[u8]) -> Result<bool> {
        self.put(&Self::chunk_rel(id), bytes, true)
    }

    fn sync(&self) -> Result<()> {
        // every acknowledged PUT is durable and visible
        Ok(())
    }

    fn discard_pending(&self) {}

    fn get_chunk(&self, id: &ChunkId, out: &mut Vec<u8>) -> Result<()> {
        match self.get(&Self::chunk_rel(id), crate::format::MAX_CHUNK_OBJECT_LEN)? {
            Some(b) => {
                *out = b;
                Ok(())
            }
            None => Err(Error::ChunkMissing { id: *id }),
        }
    }

    fn list_chunks(&self) -> Result<Vec<ChunkEntry>> {
        Ok(self
            .list("chunks/")?
            .into_iter()
            .filter_map(|(k, size, t)| Some((chunk_of_key(&k)?, size, t.unwrap_or(SystemTime::UNIX_EPOCH))))
            .collect())
    }

    fn delete_chunk(&self, id: &ChunkId) -> Result<()> {
        self.delete(&Self::chunk_rel(id))
    }

    fn touch_chunk(&self, id: &ChunkId) -> Result<()> {
        let rel = Self::chunk_rel(id);
        match self.copy(&rel, &rel) {
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Err(Error::ChunkMissing { id: *id })
            }
            r => r,
        }
    }

    fn chunk_modified(&self, id: &ChunkId) -> Result<Option<SystemTime>> {
        Ok(self.head(&Self::chunk_rel(id))?.map(|t| t.unwrap_or(SystemTime::UNIX_EPOCH)))
    }

    fn quarantine_chunk(&self, id: &ChunkId) -> Result<Option<PathBuf>> {
        let rel = Self::chunk_rel(id);
        let bad = format!("quarantine/{}.bad", id.to_hex());
        match self.copy(&rel, &bad) {
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            r => r?,
        }
        self.delete(&rel)?;
        Ok(Some(self.object_name(&bad)))
    }

    fn get_object(&self, key: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        self.get(key, limit)
    }

    fn object_exists(&self, key: &str) -> Result<bool> {
        Ok(self.head(key)?.is_some())
    }

    fn put_object(&self, key: &str, bytes: &[u8]) -> Result<()> {
        self.put(key, bytes, false).map(|_| ())
    }

    fn create_object(&self, key: &str, bytes: &[u8]) -> Result<bool> {
        self.put(key, bytes, true)
    }

    fn delete_object(&self, key: &str) -> Result<bool> {
        if self.head(key)?.is_none() {
            return Ok(false);
        }
        self.delete(key)?;
        Ok(true)
    }

    fn list_objects(&self, prefix: &str) -> Result<Vec<String>> {
        let mut v: Vec<String> = self
            .list(prefix)?
            .into_iter()
            .filter_map(|(k, _, _)| k.strip_prefix(prefix).map(str::to_owned))
            .collect();
        v.sort();
        Ok(v)
    }

    fn remove_temp_files(&self) -> Result<usize> {
        // S3 puts are atomic: no write leaves a temp object
        Ok(0)
    }

    fn lock(&self, name: &str, mode: LockMode, wait: bool) -> Result<Option<StoreLock>> {
        self.leases().lock(name, mode, wait)
    }

    fn lock_holder(&self, name: &str) -> Result<Option<String>> {
        Ok(self.lease_holder(name)?.map(|r| r.describe()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse() {
        let l = S3Location::parse("http://127.0.0.1:7480/bv-store").unwrap();
        assert_eq!((l.endpoint.as_str(), l.bucket.as_str(), l.prefix.as_str()), ("http://127.0.0.1:7480", "bv-store", ""));
        assert_eq!(l.to_string(), "s3:http://127.0.0.1:7480/bv-store");
        let l = S3Location::parse("https://s3.example.com/bucket/site/a/").unwrap();
        assert_eq!((l.bucket.as_str(), l.prefix.as_str()), ("bucket", "site/a"));
        assert_eq!(l.to_string(), "s3:https://s3.example.com/bucket/site/a");
        for bad in [
            "ftp://h/b",
            "http://h/",
            "http://h/Bucket",
            "http://h/b",
            "http://key:secret@h/bucket",
            "http://h/bucket/../x",
            "http://h/bucket/a//b",
        ] {
            let e = S3Location::parse(bad).unwrap_err().to_string();
            assert!(e.contains("store.url") && !e.contains("secret"), "{bad}: {e}");
        }
    }

    #[test]
    fn credentials_file_profiles() {
        let ini = "[default]\naws_access_key_id = A1\naws_secret_access_key=S1\n\n[other]\naws_access_key_id=A2\n";
        let c = S3Credentials::from_ini(ini, "default").unwrap();
        assert_eq!((c.access_key.as_str(), c.secret_key.as_str()), ("A1", "S1"));
        assert!(S3Credentials::from_ini(ini, "other").is_none(), "a profile without a secret has no credentials");
        assert!(!format!("{c:?}").contains("S1"), "Debug never shows the secret");
    }

    #[test]
    fn chunk_keys() {
        let id = ChunkId::of(b"x");
        let k = S3Backend::chunk_rel(&id);
        assert_eq!(chunk_of_key(&k), Some(id));
        assert_eq!(chunk_of_key(&format!("{k}.bad")), None);
    }
}
