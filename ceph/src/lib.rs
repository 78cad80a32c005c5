//! Ceph RBD access: a small safe API over librados and librbd.
//!
//! The libraries are not linked at build time: [`Cluster::connect`] loads
//! `librados.so.2` and `librbd.so.1` on first use, so blockvault builds and
//! runs without Ceph installed; only RBD operations then fail, naming the
//! missing library and the Debian package to install (`librados2`,
//! `librbd1`). All unsafe code is in the `ffi` submodule.
//!
//! Handles close themselves on drop and keep what they depend on alive: an
//! [`Image`] holds its pool's [`IoCtx`], which holds the [`Cluster`]
//! connection. `Cluster`, `IoCtx` and `Image` are `Send + Sync`: one image
//! may be read from several threads at once.
//!
//! Every error is an [`RbdError`] naming the operation, the object
//! (`pool/image@snap`, a pool, a config file…) and the cause, e.g.
//! `rbd open rbd/vm1: No such file or directory (errno 2); the image does not exist`.
//!
//! The tests in this crate run against the cluster named by `CEPH_CONF`, or
//! start a throwaway one with `tests/ceph/start-cluster.sh` when it is unset.

#[allow(unsafe_code)]
mod ffi;
mod keyring;
mod object;

pub use object::{Locker, ObjectStat};
pub use ffi::ParentSpec;

/// Largest payload of one object read or write.
pub const MAX_OBJECT_IO: usize = ffi::MAX_OBJECT_IO;

use std::ffi::CString;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

/// RBD image feature bits (`RBD_FEATURE_*` in `rbd/features.h`).
pub const FEATURE_LAYERING: u64 = 1 << 0;
pub const FEATURE_STRIPINGV2: u64 = 1 << 1;
pub const FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;
/// Needs [`FEATURE_EXCLUSIVE_LOCK`].
pub const FEATURE_OBJECT_MAP: u64 = 1 << 3;
/// Needs [`FEATURE_OBJECT_MAP`]; makes `diff_iterate` with `whole_object` fast.
pub const FEATURE_FAST_DIFF: u64 = 1 << 4;
pub const FEATURE_DEEP_FLATTEN: u64 = 1 << 5;
pub const FEATURE_JOURNALING: u64 = 1 << 6;
pub const FEATURE_DATA_POOL: u64 = 1 << 7;
/// What `rbd create` uses by default: layering, exclusive-lock, object-map,
/// fast-diff, deep-flatten.
pub const FEATURES_DEFAULT: u64 = FEATURE_LAYERING
    | FEATURE_EXCLUSIVE_LOCK
    | FEATURE_OBJECT_MAP
    | FEATURE_FAST_DIFF
    | FEATURE_DEEP_FLATTEN;

/// Image flags (`RBD_FLAG_*` in `rbd/librbd.h`): the object map must be
/// rebuilt (`rbd object-map rebuild`) before it can be trusted.
pub const FLAG_OBJECT_MAP_INVALID: u64 = 1 << 0;
/// The fast-diff data is invalid: `diff_iterate` falls back to listing objects.
pub const FLAG_FAST_DIFF_INVALID: u64 = 1 << 1;

/// Default for [`CephOptions::timeout_secs`].
pub const DEFAULT_TIMEOUT_SECS: u32 = 30;

const ETIMEDOUT: i32 = 110;

/// How to reach the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CephOptions {
    /// The ceph.conf; `None`: `$CEPH_CONF`, then `/etc/ceph/ceph.conf`.
    pub conf: Option<PathBuf>,
    /// The cephx client id, e.g. `admin` (a `client.` prefix is accepted too).
    pub client_id: String,
    /// The keyring; `None`: whatever ceph.conf says, else Ceph's default search.
    pub keyring: Option<PathBuf>,
    /// Bound, in seconds, on connecting (`client_mount_timeout`) and on each
    /// monitor and OSD operation (`rados_mon_op_timeout`,
    /// `rados_osd_op_timeout`), so a dead or unreachable cluster fails
    /// instead of hanging. 0 keeps Ceph's defaults (connect gives up after
    /// 300 s, operations wait forever).
    pub timeout_secs: u32,
}

impl Default for CephOptions {
    fn default() -> Self {
        CephOptions {
            conf: None,
            client_id: "admin".into(),
            keyring: None,
            timeout_secs: DEFAULT_TIMEOUT_SECS,
        }
    }
}

/// The operation an [`RbdError`] comes from; displayed like the `rbd`/`rados`
/// command that does the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    ReadConf,
    SetConf,
    Connect,
    Fsid,
    OpenPool,
    ListImages,
    CreateImage,
    RemoveImage,
    OpenImage,
    Info,
    ListSnaps,
    CreateSnap,
    RemoveSnap,
    Diff,
    Read,
    Write,
    Discard,
    Resize,
    Flush,
    Version,
    LockOwners,
    BreakLock,
    WriteObject,
    CreateObject,
    ReadObject,
    StatObject,
    RemoveObject,
    ListObjects,
    Clone,
    Flatten,
    TouchObject,
    Lock,
    Unlock,
    ListLockers,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::ReadConf => "rados read config",
            Op::SetConf => "rados set config",
            Op::Connect => "rados connect",
            Op::Fsid => "rados fsid",
            Op::OpenPool => "rados open pool",
            Op::ListImages => "rbd ls",
            Op::CreateImage => "rbd create",
            Op::RemoveImage => "rbd rm",
            Op::OpenImage => "rbd open",
            Op::Info => "rbd info",
            Op::ListSnaps => "rbd snap ls",
            Op::CreateSnap => "rbd snap create",
            Op::RemoveSnap => "rbd snap rm",
            Op::Diff => "rbd diff",
            Op::Read => "rbd read",
            Op::Write => "rbd write",
            Op::Discard => "rbd discard",
            Op::Resize => "rbd resize",
            Op::Flush => "rbd flush",
            Op::Version => "librbd version",
            Op::LockOwners => "rbd lock owners",
            Op::BreakLock => "rbd lock break",
            Op::WriteObject => "rados put",
            Op::CreateObject => "rados create",
            Op::ReadObject => "rados get",
            Op::StatObject => "rados stat",
            Op::RemoveObject => "rados rm",
            Op::ListObjects => "rados ls",
            Op::Clone => "rbd clone",
            Op::Flatten => "rbd flatten",
            Op::TouchObject => "rados setxattr",
            Op::Lock => "rados lock get",
            Op::Unlock => "rados lock release",
            Op::ListLockers => "rados lock info",
        })
    }
}

/// Why an operation failed.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Cause {
    /// librados/librbd returned `-errno`.
    Errno(i32),
    /// The libraries could not be loaded.
    Library(ffi::LoadError),
    /// Refused before calling Ceph.
    Invalid(String),
}

/// A failed librados/librbd operation: which operation, on what, and why.
///
/// Displays as `OP OBJECT: CAUSE`, e.g.
/// `rados open pool nopool: No such file or directory (errno 2); the pool does not exist`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct RbdError {
    op: Op,
    object: String,
    cause: Cause,
}

impl RbdError {
    fn errno(op: Op, object: impl Into<String>, errno: ffi::Errno) -> RbdError {
        RbdError {
            op,
            object: object.into(),
            cause: Cause::Errno(errno.0),
        }
    }

    fn invalid(op: Op, object: impl Into<String>, why: impl Into<String>) -> RbdError {
        RbdError {
            op,
            object: object.into(),
            cause: Cause::Invalid(why.into()),
        }
    }

    /// The failed operation.
    pub fn op(&self) -> Op {
        self.op
    }

    /// What it was applied to: `pool/image@snap`, a pool, a config file…
    pub fn object(&self) -> &str {
        &self.object
    }

    /// The (positive) errno librados/librbd returned, if the failure came from them.
    pub fn errno_value(&self) -> Option<i32> {
        match self.cause {
            Cause::Errno(e) => Some(e),
            _ => None,
        }
    }

    /// The operation timed out (ETIMEDOUT): the cluster did not answer
    /// within `CephOptions::timeout_secs`.
    pub fn is_timeout(&self) -> bool {
        self.errno_value() == Some(ETIMEDOUT)
    }

    /// The pool, image or snapshot does not exist (ENOENT).
    pub fn is_not_found(&self) -> bool {
        self.errno_value() == Some(ffi::ENOENT)
    }

    /// Whether librados/librbd could not be loaded at all.
    pub fn is_library_missing(&self) -> bool {
        matches!(self.cause, Cause::Library(_))
    }

    /// A few words on what an errno usually means for this operation.
    fn hint(&self) -> Option<&'static str> {
        let Cause::Errno(e) = self.cause else {
            return None;
        };
        Some(match (self.op, e) {
            (Op::OpenPool, 2) => "the pool does not exist",
            (Op::OpenImage, 2) if self.object.contains('@') => {
                "the image or snapshot does not exist"
            }
            (Op::OpenImage | Op::RemoveImage, 2) => "the image does not exist",
            (Op::RemoveSnap | Op::Diff, 2) => "the snapshot does not exist",
            (Op::ReadConf, 2) => "the file does not exist",
            (Op::Connect, 2) => {
                "no keyring or key for this client (set keyring in ceph.conf or pass one)"
            }
            (Op::Connect, 1 | 13) => {
                "authentication refused (wrong client id or key, or no mon caps? a backup user needs \
                 mon 'profile rbd' osd 'profile rbd pool=POOL')"
            }
            (Op::Connect, ETIMEDOUT) => {
                "no monitor answered in time (is the cluster up? is mon_host in ceph.conf right?)"
            }
            (_, ETIMEDOUT) => "the cluster did not answer in time",
            (_, 1 | 13) => {
                "the cephx user lacks the caps for this; a backup user needs \
                 mon 'profile rbd' osd 'profile rbd pool=POOL' (ceph auth caps client.ID ...)"
            }
            (Op::CreateImage | Op::Clone, 17) => "an image of that name exists",
            (Op::Clone, 2) => "the parent image or snapshot does not exist",
            (Op::CreateObject, 17) => "the object exists",
            (Op::ReadObject | Op::StatObject | Op::RemoveObject, 2) => "the object does not exist",
            (Op::CreateSnap, 17) => "a snapshot of that name exists",
            (Op::RemoveImage, 39) => "the image still has snapshots",
            (Op::RemoveImage, 16) => "the image is open by a client",
            (Op::RemoveSnap, 16) => "the snapshot is protected or has clones",
            (_, 30) => "the image is open read-only",
            (_, 108) => "this client was blocklisted by the cluster",
            _ => return None,
        })
    }
}

impl fmt::Display for RbdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: ", self.op, self.object)?;
        match &self.cause {
            Cause::Errno(e) => {
                let text = std::io::Error::from_raw_os_error(*e).to_string();
                let suffix = format!(" (os error {e})");
                write!(
                    f,
                    "{} (errno {e})",
                    text.strip_suffix(&suffix).unwrap_or(&text)
                )?;
                if let Some(hint) = self.hint() {
                    write!(f, "; {hint}")?;
                }
                Ok(())
            }
            Cause::Library(l) => write!(f, "{l}"),
            Cause::Invalid(why) => f.write_str(why),
        }
    }
}

/// Result of this module's operations.
pub type Result<T, E = RbdError> = std::result::Result<T, E>;

fn c_string(op: Op, object: &str, what: &str, s: &str) -> Result<CString> {
    CString::new(s)
        .map_err(|_| RbdError::invalid(op, object, format!("the {what} contains a NUL byte")))
}

/// librbd's version, e.g. `(1, 16, 0)` for Ceph 16; loads the libraries.
pub fn librbd_version() -> Result<(i32, i32, i32)> {
    ffi::librbd_version().map_err(|l| RbdError {
        op: Op::Version,
        object: "librbd".into(),
        cause: Cause::Library(l),
    })
}

/// A connection to a Ceph cluster; shut down when the last handle derived
/// from it is dropped.
pub struct Cluster {
    rados: Arc<ffi::Rados>,
    /// `client.ID (conf PATH)`, for error messages.
    who: String,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("client", &self.who)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Connects as `client.<client_id>`, configured from the ceph.conf
    /// (`opts.conf`, else `$CEPH_CONF`, else `/etc/ceph/ceph.conf`), then
    /// `$CEPH_ARGS`, then `opts`. With `opts.timeout_secs > 0` an unreachable
    /// cluster fails within about that time.
    pub fn connect(opts: &CephOptions) -> Result<Arc<Cluster>> {
        let id = opts
            .client_id
            .strip_prefix("client.")
            .unwrap_or(&opts.client_id);
        let (conf, defaulted) = match &opts.conf {
            Some(p) => (p.clone(), false),
            None => match std::env::var_os("CEPH_CONF").filter(|v| !v.is_empty()) {
                Some(p) => (PathBuf::from(p), false),
                None => (PathBuf::from("/etc/ceph/ceph.conf"), true),
            },
        };
        let who = format!("client.{id} (conf {})", conf.display());
        if id.is_empty() {
            return Err(RbdError::invalid(
                Op::Connect,
                who,
                "the client id is empty",
            ));
        }
        let c_id = c_string(Op::Connect, &who, "client id", id)?;
        let mut cfg = ffi::RadosConfig::create(&c_id).map_err(|e| match e {
            ffi::CreateError::Load(l) => RbdError {
                op: Op::Connect,
                object: who.clone(),
                cause: Cause::Library(l),
            },
            ffi::CreateError::Errno(e) => RbdError::errno(Op::Connect, who.clone(), e),
        })?;

        let conf_str = conf.to_string_lossy();
        let c_conf = c_string(Op::ReadConf, &conf_str, "path", &conf_str)?;
        cfg.read_file(Some(&c_conf)).map_err(|e| {
            let object = if defaulted {
                format!("{conf_str} (the default: no conf given and CEPH_CONF unset)")
            } else {
                conf_str.to_string()
            };
            RbdError::errno(Op::ReadConf, object, e)
        })?;
        cfg.parse_env()
            .map_err(|e| RbdError::errno(Op::ReadConf, "$CEPH_ARGS", e))?;

        // librados writes its errors to stderr by default (and a test
        // cluster's conf says err_to_stderr = true); some of them quote
        // secrets, e.g. the key value of a malformed keyring. Errors reach
        // the operator as this crate's errors instead; a log_file in
        // ceph.conf still gets Ceph's own log.
        let mut settings: Vec<(&str, String)> = vec![
            ("log_to_stderr", "false".into()),
            ("err_to_stderr", "false".into()),
        ];
        if let Some(k) = &opts.keyring {
            settings.push(("keyring", k.to_string_lossy().into_owned()));
        }
        if opts.timeout_secs > 0 {
            let t = opts.timeout_secs.to_string();
            settings.push(("client_mount_timeout", t.clone()));
            settings.push(("rados_mon_op_timeout", t.clone()));
            settings.push(("rados_osd_op_timeout", t));
        }
        for (key, value) in settings {
            let object = format!("{key}={value}");
            let k = c_string(Op::SetConf, &object, "option", key)?;
            let v = c_string(Op::SetConf, &object, "value", &value)?;
            cfg.set(&k, &v)
                .map_err(|e| RbdError::errno(Op::SetConf, object.clone(), e))?;
        }

        // the keyring files librados will try, to explain a refused connect
        let keyrings = cfg.get(c"keyring").unwrap_or_default();
        let rados = cfg.connect().map_err(|e| {
            match keyring::check_all(&keyrings, id) {
                Some(why) => RbdError::invalid(Op::Connect, who.clone(), format!("{why} (errno {})", e.0)),
                None => RbdError::errno(Op::Connect, who.clone(), e),
            }
        })?;
        Ok(Arc::new(Cluster {
            rados: Arc::new(rados),
            who,
        }))
    }

    /// This client's global id (`client.<id>` in `rbd status` and the blocklist).
    pub fn instance_id(&self) -> u64 {
        self.rados.instance_id()
    }

    /// The cluster's fsid (a UUID), which identifies it across renames and moves.
    pub fn fsid(&self) -> Result<String> {
        self.rados
            .fsid()
            .map_err(|e| RbdError::errno(Op::Fsid, self.who.clone(), e))
    }

    /// Opens `pool` (and `namespace` in it; `None` or `""` is the default
    /// namespace). A missing pool is an ENOENT error naming it.
    pub fn ioctx(self: &Arc<Self>, pool: &str, namespace: Option<&str>) -> Result<IoCtx> {
        let namespace = namespace.filter(|n| !n.is_empty());
        let object = match namespace {
            Some(ns) => format!("{pool}/{ns}"),
            None => pool.to_string(),
        };
        let c_pool = c_string(Op::OpenPool, &object, "pool name", pool)?;
        let c_ns = namespace
            .map(|ns| c_string(Op::OpenPool, &object, "namespace", ns))
            .transpose()?;
        let raw = self
            .rados
            .ioctx(&c_pool, c_ns.as_deref())
            .map_err(|e| RbdError::errno(Op::OpenPool, object.clone(), e))?;
        Ok(IoCtx {
            raw: Arc::new(raw),
            prefix: object,
        })
    }
}

/// A pool (and namespace) of a connected cluster: lists, creates, removes
/// and opens images. Cheap to clone; keeps the cluster connected.
#[derive(Clone)]
pub struct IoCtx {
    raw: Arc<ffi::IoCtx>,
    /// `pool` or `pool/namespace`
    prefix: String,
}

impl fmt::Debug for IoCtx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoCtx")
            .field("pool", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl IoCtx {
    /// The global id of this connection (`client.<id>` in lock owners).
    pub fn instance_id(&self) -> u64 {
        self.raw.instance_id()
    }

    /// Whether an operation through this connection timed out (the cluster
    /// stopped answering). Handles of such a connection close on a
    /// background thread when dropped, so dropping them does not wait for
    /// the cluster again.
    pub fn has_timed_out(&self) -> bool {
        self.raw.has_timed_out()
    }

    /// The addresses of this connection, e.g. `[v2:127.0.0.1:0/3262212345]`:
    /// [`Image::lock_owners`] names an owner by one of them (`127.0.0.1:0/3262212345`).
    pub fn client_addrs(&self) -> Result<String> {
        self.raw
            .client_addrs()
            .map_err(|e| RbdError::errno(Op::Connect, format!("client addresses of {}", self.prefix), e))
    }

    /// `pool` or `pool/namespace`.
    pub fn spec(&self) -> &str {
        &self.prefix
    }

    fn image_spec(&self, name: &str, snap: Option<&str>) -> String {
        match snap {
            Some(s) => format!("{}/{name}@{s}", self.prefix),
            None => format!("{}/{name}", self.prefix),
        }
    }

    /// The names of the images in the pool/namespace (unsorted).
    pub fn list_images(&self) -> Result<Vec<String>> {
        self.raw
            .list_images()
            .map_err(|e| RbdError::errno(Op::ListImages, self.prefix.clone(), e))
    }

    /// The images in the pool's (namespace's) RBD trash, as `(id, name)`.
    pub fn trash_list(&self) -> Result<Vec<(String, String)>> {
        self.raw
            .trash_list()
            .map_err(|e| RbdError::errno(Op::ListImages, format!("{} (trash)", self.prefix), e))
    }

    /// Opens the head of the image with id `id` for reading and writing;
    /// `name` is only for messages. Works for an image in the trash.
    pub fn open_by_id_rw(&self, id: &str, name: &str) -> Result<Image> {
        let spec = self.image_spec(name, None);
        let c_id = c_string(Op::OpenImage, &spec, "image id", id)?;
        let raw = self
            .raw
            .open_image_by_id(&c_id)
            .map_err(|e| RbdError::errno(Op::OpenImage, spec.clone(), e))?;
        Ok(Image { raw, ioctx: self.clone(), name: name.to_string(), spec, read_only: false })
    }

    /// Creates a format-2 image of `size` bytes with `features` (e.g.
    /// [`FEATURES_DEFAULT`]) and objects of `2^order` bytes (`None`: the
    /// cluster default, normally 22 = 4 MiB).
    pub fn create_image(
        &self,
        name: &str,
        size: u64,
        order: Option<u8>,
        features: u64,
    ) -> Result<()> {
        self.create(name, size, order, features, None)
    }

    /// Like [`IoCtx::create_image`], with fancy striping: `stripe_count`
    /// objects are filled round-robin, `stripe_unit` bytes at a time.
    pub fn create_image_striped(
        &self,
        name: &str,
        size: u64,
        order: Option<u8>,
        features: u64,
        stripe_unit: u64,
        stripe_count: u64,
    ) -> Result<()> {
        self.create(
            name,
            size,
            order,
            features | FEATURE_STRIPINGV2,
            Some((stripe_unit, stripe_count)),
        )
    }

    fn create(
        &self,
        name: &str,
        size: u64,
        order: Option<u8>,
        features: u64,
        stripe: Option<(u64, u64)>,
    ) -> Result<()> {
        let spec = self.image_spec(name, None);
        let c_name = c_string(Op::CreateImage, &spec, "image name", name)?;
        self.raw
            .create_image(&c_name, size, order, features, stripe)
            .map_err(|e| RbdError::errno(Op::CreateImage, spec, e))
    }

    /// Creates image `name` in this pool as a clone (format 2: the
    /// snapshot need not be protected) of `parent@snap` in `parent_pool`,
    /// with `features` and objects of `2^order` bytes (`None`: the parent's).
    /// Ready at once whatever the size: reads fall through to the parent
    /// until [`Image::flatten`].
    pub fn clone_image(
        &self,
        parent_pool: &IoCtx,
        parent: &str,
        snap: &str,
        name: &str,
        order: Option<u8>,
        features: u64,
    ) -> Result<()> {
        let spec = format!("{} from {}", self.image_spec(name, None), parent_pool.image_spec(parent, Some(snap)));
        let c_parent = c_string(Op::Clone, &spec, "image name", parent)?;
        let c_snap = c_string(Op::Clone, &spec, "snapshot name", snap)?;
        let c_name = c_string(Op::Clone, &spec, "image name", name)?;
        self.raw
            .clone_image(&parent_pool.raw, &c_parent, &c_snap, &c_name, order, features)
            .map_err(|e| RbdError::errno(Op::Clone, spec, e))
    }

    /// Removes an image (it must have no snapshots and not be open).
    pub fn remove_image(&self, name: &str) -> Result<()> {
        let spec = self.image_spec(name, None);
        let c_name = c_string(Op::RemoveImage, &spec, "image name", name)?;
        self.raw
            .remove_image(&c_name)
            .map_err(|e| RbdError::errno(Op::RemoveImage, spec, e))
    }

    /// Opens an image read-only, at snapshot `snap` or at the head.
    pub fn open(&self, name: &str, snap: Option<&str>) -> Result<Image> {
        self.open_image(name, snap, true)
    }

    /// Opens an image's head for reading and writing.
    pub fn open_rw(&self, name: &str) -> Result<Image> {
        self.open_image(name, None, false)
    }

    fn open_image(&self, name: &str, snap: Option<&str>, read_only: bool) -> Result<Image> {
        let spec = self.image_spec(name, snap);
        let c_name = c_string(Op::OpenImage, &spec, "image name", name)?;
        let c_snap = snap
            .map(|s| c_string(Op::OpenImage, &spec, "snapshot name", s))
            .transpose()?;
        let raw = self
            .raw
            .open_image(&c_name, c_snap.as_deref(), read_only)
            .map_err(|e| RbdError::errno(Op::OpenImage, spec.clone(), e))?;
        Ok(Image {
            raw,
            ioctx: self.clone(),
            name: name.to_string(),
            spec,
            read_only,
        })
    }
}

/// A snapshot of an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapInfo {
    /// The snapshot id; ids grow with creation time.
    pub id: u64,
    pub name: String,
    /// The image size when the snapshot was taken.
    pub size: u64,
}

/// An open image, at a snapshot (read-only) or at the head. Closed on drop;
/// call [`Image::flush`] first to see write errors. `Sync`: several threads
/// may read (and write) one image at once.
pub struct Image {
    raw: ffi::Image,
    ioctx: IoCtx,
    name: String,
    /// `pool[/ns]/name[@snap]`
    spec: String,
    read_only: bool,
}

impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Image")
            .field("spec", &self.spec)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl Image {
    /// `pool[/namespace]/name[@snap]`, as the `rbd` tool writes it.
    pub fn spec(&self) -> &str {
        &self.spec
    }

    /// The image name (without pool or snapshot).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the image was opened read-only ([`IoCtx::open`]).
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn err(&self, op: Op, e: ffi::Errno) -> RbdError {
        RbdError::errno(op, self.spec.clone(), e)
    }

    fn snap_spec(&self, snap: &str) -> String {
        format!("{}/{}@{snap}", self.ioctx.prefix, self.name)
    }

    /// Size in bytes (of the snapshot, if opened at one).
    pub fn size(&self) -> Result<u64> {
        self.raw.size().map_err(|e| self.err(Op::Info, e))
    }

    /// Bytes per RADOS object (4 MiB by default).
    pub fn object_size(&self) -> Result<u64> {
        self.raw
            .stat()
            .map(|s| s.obj_size)
            .map_err(|e| self.err(Op::Info, e))
    }

    /// Feature bits ([`FEATURE_OBJECT_MAP`], [`FEATURE_FAST_DIFF`]…).
    pub fn features(&self) -> Result<u64> {
        self.raw.features().map_err(|e| self.err(Op::Info, e))
    }

    /// Flags ([`FLAG_OBJECT_MAP_INVALID`], [`FLAG_FAST_DIFF_INVALID`]) of the
    /// open snapshot or head.
    pub fn flags(&self) -> Result<u64> {
        self.raw.flags().map_err(|e| self.err(Op::Info, e))
    }

    /// The image's internal id: unlike its name, it changes when an image is
    /// deleted and re-created.
    pub fn id(&self) -> Result<String> {
        self.raw.id().map_err(|e| self.err(Op::Info, e))
    }

    /// All snapshots, oldest first.
    pub fn snaps(&self) -> Result<Vec<SnapInfo>> {
        let mut snaps: Vec<SnapInfo> = self
            .raw
            .snaps()
            .map_err(|e| self.err(Op::ListSnaps, e))?
            .into_iter()
            .map(|s| SnapInfo {
                id: s.id,
                name: s.name,
                size: s.size,
            })
            .collect();
        snaps.sort_by_key(|s| s.id);
        Ok(snaps)
    }

    /// Creates snapshot `name` of the head (the image must be opened with
    /// [`IoCtx::open_rw`]).
    pub fn create_snap(&self, name: &str) -> Result<()> {
        let spec = self.snap_spec(name);
        let c = c_string(Op::CreateSnap, &spec, "snapshot name", name)?;
        self.raw
            .snap_create(&c)
            .map_err(|e| RbdError::errno(Op::CreateSnap, spec, e))
    }

    /// Removes snapshot `name` (the image must be opened with [`IoCtx::open_rw`]).
    pub fn remove_snap(&self, name: &str) -> Result<()> {
        let spec = self.snap_spec(name);
        let c = c_string(Op::RemoveSnap, &spec, "snapshot name", name)?;
        self.raw
            .snap_remove(&c)
            .map_err(|e| RbdError::errno(Op::RemoveSnap, spec, e))
    }

    /// Reports the extents of `[offset, offset + len)` that changed between
    /// snapshot `from_snap` (`None`: the image's creation, i.e. everything
    /// allocated) and the open snapshot/head: `cb(offset, len, exists)`,
    /// where `exists == false` means the extent is now a hole (discarded or
    /// beyond a shrink) and reads as zeros. Extents come in increasing
    /// offset order; `cb` returns `false` to stop early (still `Ok`).
    /// Parent (clone) data is included.
    ///
    /// With `whole_object` the extents are whole objects, and with fast-diff
    /// enabled and valid the object map answers without listing objects.
    /// Without it, extents are exact only inside objects that already
    /// existed at `from_snap`; elsewhere they run from the object start to
    /// its last written byte. A panic in `cb` stops the iteration and is
    /// re-raised here.
    pub fn diff_iterate<F>(
        &self,
        from_snap: Option<&str>,
        offset: u64,
        len: u64,
        whole_object: bool,
        cb: F,
    ) -> Result<()>
    where
        F: FnMut(u64, u64, bool) -> bool + Send,
    {
        let object = match from_snap {
            Some(s) => format!("{} from @{s}", self.spec),
            None => self.spec.clone(),
        };
        let c_from = from_snap
            .map(|s| c_string(Op::Diff, &object, "snapshot name", s))
            .transpose()?;
        self.raw
            .diff_iterate(c_from.as_deref(), offset, len, true, whole_object, cb)
            .map_err(|e| RbdError::errno(Op::Diff, object, e))
    }

    /// What a clone itself wrote, without its parent's data: the extents
    /// of `[offset, offset + len)` in objects that exist in this image
    /// (`rbd_diff_iterate2` with no from-snapshot and `include_parent`
    /// off), as `cb(offset, len, exists)`. An object of a clone that
    /// exists hides the parent entirely within it, so with `whole_object`
    /// every reported extent is whole objects, to be read from this image;
    /// everything else reads through to the parent snapshot (up to the
    /// overlap).
    pub fn own_extents<F>(&self, offset: u64, len: u64, whole_object: bool, cb: F) -> Result<()>
    where
        F: FnMut(u64, u64, bool) -> bool + Send,
    {
        self.raw
            .diff_iterate(None, offset, len, false, whole_object, cb)
            .map_err(|e| RbdError::errno(Op::Diff, format!("{} (without parent)", self.spec), e))
    }

    /// The parent snapshot of a clone; `None` for an image that is not one.
    pub fn parent(&self) -> Result<Option<ParentSpec>> {
        self.raw.parent().map_err(|e| self.err(Op::Info, e))
    }

    /// Bytes of a clone that read through to its parent (0 for an image
    /// that is not a clone).
    pub fn overlap(&self) -> Result<u64> {
        self.raw.overlap().map_err(|e| self.err(Op::Info, e))
    }

    fn range(&self, off: u64, len: usize) -> String {
        format!("{} at {off}+{len}", self.spec)
    }

    /// Fills `buf` from offset `off`. Reading past the end of the image is
    /// an error.
    pub fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let n = self.raw.read(pos, &mut buf[done..]).map_err(|e| {
                if e.0 == ffi::EINVAL && self.size().is_ok_and(|size| pos >= size) {
                    self.past_end(off, buf.len())
                } else {
                    RbdError::errno(Op::Read, self.range(off, buf.len()), e)
                }
            })?;
            if n == 0 {
                return Err(self.past_end(off, buf.len()));
            }
            done += n;
        }
        Ok(())
    }

    fn past_end(&self, off: u64, len: usize) -> RbdError {
        let size = self
            .size()
            .map_or_else(|_| "?".to_string(), |s| s.to_string());
        RbdError::invalid(
            Op::Read,
            self.range(off, len),
            format!("reads past the end of the image ({size} bytes)"),
        )
    }

    /// Writes all of `buf` at offset `off` (head opened with [`IoCtx::open_rw`]).
    pub fn write_at(&self, off: u64, buf: &[u8]) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let n = self
                .raw
                .write(off + done as u64, &buf[done..])
                .map_err(|e| RbdError::errno(Op::Write, self.range(off, buf.len()), e))?;
            if n == 0 {
                return Err(RbdError::invalid(
                    Op::Write,
                    self.range(off, buf.len()),
                    "librbd wrote 0 bytes",
                ));
            }
            done += n;
        }
        Ok(())
    }

    /// Discards `[off, off + len)`: whole objects are removed (reported by
    /// `diff_iterate` as `exists == false`), partial ones zeroed.
    pub fn discard(&self, off: u64, len: u64) -> Result<()> {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ffi::MAX_DISCARD);
            self.raw.discard(off + done, n).map_err(|e| {
                RbdError::errno(Op::Discard, format!("{} at {off}+{len}", self.spec), e)
            })?;
            done += n;
        }
        Ok(())
    }

    /// Copies a clone's parent data into it and detaches it from its parent
    /// snapshot (takes as long as copying the data).
    pub fn flatten(&self) -> Result<()> {
        self.raw.flatten().map_err(|e| self.err(Op::Flatten, e))
    }

    /// Grows or shrinks the image to `size` bytes.
    pub fn resize(&self, size: u64) -> Result<()> {
        self.raw
            .resize(size)
            .map_err(|e| RbdError::errno(Op::Resize, format!("{} to {size}", self.spec), e))
    }

    /// Whether an operation through this image's connection timed out
    /// (see [`IoCtx::has_timed_out`]).
    pub fn has_timed_out(&self) -> bool {
        self.ioctx.has_timed_out()
    }

    /// The pool (and namespace) this image was opened through.
    pub fn ioctx(&self) -> &IoCtx {
        &self.ioctx
    }

    /// The clients holding the image's exclusive lock, by address
    /// (`127.0.0.1:0/3262212345`, see [`IoCtx::client_addrs`]);
    /// empty when nobody does. EINVAL when the image has no exclusive-lock feature.
    pub fn lock_owners(&self) -> Result<Vec<String>> {
        self.raw.lock_owners().map_err(|e| self.err(Op::LockOwners, e))
    }

    /// Breaks the exclusive lock held by `owner` (as [`Image::lock_owners`]
    /// names it). librbd blocklists the owner first, so a still running
    /// owner can no longer write: call this only for an owner known to be
    /// dead.
    pub fn break_lock(&self, owner: &str) -> Result<()> {
        let object = format!("{} owner {owner}", self.spec);
        let c = c_string(Op::BreakLock, &object, "owner", owner)?;
        self.raw.lock_break(&c).map_err(|e| RbdError::errno(Op::BreakLock, object, e))
    }

    /// Waits until every write made through this handle is durable.
    pub fn flush(&self) -> Result<()> {
        self.raw.flush().map_err(|e| self.err(Op::Flush, e))
    }
}

#[cfg(test)]
mod tests {
    //! These run against the cluster named by `CEPH_CONF`, else one started
    //! for this test process (see `cluster_opts`).
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant};

    const MIB: u64 = 1 << 20;

    fn shown(p: &std::path::Path) -> String {
        p.display().to_string()
    }
    const POOL: &str = "rbd";

    /// `$CEPH_CONF`, else a cluster started for this test process.
    fn cluster_opts() -> CephOptions {
        CephOptions { conf: Some(blockvault_tests::ceph_conf()), ..CephOptions::default() }
    }

    fn connect() -> Arc<Cluster> {
        Cluster::connect(&cluster_opts()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn unique(tag: &str) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        format!(
            "bvtest-{tag}-{}-{nanos}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// A test image, removed with its snapshots on drop.
    struct TestImage {
        ioctx: IoCtx,
        name: String,
    }

    impl TestImage {
        fn create(tag: &str, size: u64, features: u64) -> TestImage {
            let ioctx = connect()
                .ioctx(POOL, None)
                .unwrap_or_else(|e| panic!("{e}"));
            let name = unique(tag);
            ioctx
                .create_image(&name, size, Some(22), features)
                .unwrap_or_else(|e| panic!("{e}"));
            TestImage { ioctx, name }
        }
    }

    impl Drop for TestImage {
        fn drop(&mut self) {
            if let Ok(img) = self.ioctx.open_rw(&self.name) {
                for s in img.snaps().unwrap_or_default() {
                    let _ = img.remove_snap(&s.name);
                }
            }
            if let Err(e) = self.ioctx.remove_image(&self.name) {
                eprintln!("cleanup: {e}");
            }
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    fn extents(img: &Image, from: Option<&str>, whole_object: bool) -> Vec<(u64, u64, bool)> {
        let mut v = Vec::new();
        let size = img.size().unwrap();
        img.diff_iterate(from, 0, size, whole_object, |o, l, e| {
            v.push((o, l, e));
            true
        })
        .unwrap_or_else(|e| panic!("{e}"));
        v
    }

    #[test]
    fn connect_reports_fsid_and_lists_images() {
        let cluster = connect();
        let fsid = cluster.fsid().unwrap();
        assert_eq!(fsid.len(), 36, "{fsid}");
        let ioctx = cluster.ioctx(POOL, None).unwrap();
        ioctx.list_images().unwrap();
        let (major, minor, _) = librbd_version().unwrap();
        assert!(major >= 1 && minor >= 12, "librbd {major}.{minor}");
    }

    #[test]
    fn missing_pool_is_a_clear_error() {
        let err = connect().ioctx("bv-no-such-pool", None).unwrap_err();
        assert!(err.is_not_found(), "{err:?}");
        assert_eq!(err.op(), Op::OpenPool);
        assert_eq!(
            err.to_string(),
            "rados open pool bv-no-such-pool: No such file or directory (errno 2); the pool does not exist"
        );
    }

    #[test]
    fn missing_image_and_snapshot_are_clear_errors() {
        let ioctx = connect().ioctx(POOL, None).unwrap();
        let err = ioctx.open("bv-no-such-image", None).unwrap_err();
        assert!(err.is_not_found());
        assert_eq!(
            err.to_string(),
            "rbd open rbd/bv-no-such-image: No such file or directory (errno 2); the image does not exist"
        );
        let t = TestImage::create("nosnap", 4 * MIB, FEATURE_LAYERING);
        let err = t.ioctx.open(&t.name, Some("nope")).unwrap_err();
        assert!(err.is_not_found());
        assert!(
            err.to_string()
                .starts_with(&format!("rbd open rbd/{}@nope: No such file", t.name)),
            "{err}"
        );
        let err = ioctx.remove_image("bv-no-such-image").unwrap_err();
        assert!(
            err.to_string().contains("rbd rm rbd/bv-no-such-image"),
            "{err}"
        );
    }

    #[test]
    fn write_read_snapshots_and_diffs() {
        let features =
            FEATURE_LAYERING | FEATURE_EXCLUSIVE_LOCK | FEATURE_OBJECT_MAP | FEATURE_FAST_DIFF;
        let t = TestImage::create("diff", 64 * MIB, features);
        assert!(t.ioctx.list_images().unwrap().contains(&t.name));

        let img = t.ioctx.open_rw(&t.name).unwrap();
        assert_eq!(img.size().unwrap(), 64 * MIB);
        assert_eq!(img.object_size().unwrap(), 4 * MIB);
        assert_eq!(img.features().unwrap() & features, features);
        assert_eq!(
            img.flags().unwrap() & (FLAG_OBJECT_MAP_INVALID | FLAG_FAST_DIFF_INVALID),
            0
        );
        assert!(!img.id().unwrap().is_empty());

        // s1: data in object 0 ([0, 1 MiB)) and object 1 ([4 MiB, 4 MiB + 64 KiB))
        let a = pattern(MIB as usize, 1);
        let b = pattern(64 << 10, 2);
        img.write_at(0, &a).unwrap();
        img.write_at(4 * MIB, &b).unwrap();
        let mut back = vec![0u8; a.len()];
        img.read_at(0, &mut back).unwrap();
        assert!(back == a, "read back differs");
        img.create_snap("s1").unwrap();

        // s2: 8 KiB rewritten inside object 1, which existed at s1
        let c = pattern(8192, 3);
        img.write_at(4 * MIB + 12288, &c).unwrap();
        img.flush().unwrap();
        img.create_snap("s2").unwrap();

        let s2 = t.ioctx.open(&t.name, Some("s2")).unwrap();
        assert!(s2.is_read_only());
        assert_eq!(s2.spec(), format!("rbd/{}@s2", t.name));
        assert_eq!(
            extents(&s2, Some("s1"), false),
            vec![(4 * MIB + 12288, 8192, true)]
        );
        assert_eq!(
            extents(&s2, Some("s1"), true),
            vec![(4 * MIB, 4 * MIB, true)]
        );
        // from the beginning: object 0 up to its last byte, object 1 likewise
        assert_eq!(
            extents(&s2, None, false),
            vec![(0, MIB, true), (4 * MIB, 64 << 10, true)]
        );

        // the snapshots read their own contents
        let s1 = t.ioctx.open(&t.name, Some("s1")).unwrap();
        let mut buf = vec![0u8; 8192];
        s1.read_at(4 * MIB + 12288, &mut buf).unwrap();
        assert!(buf[..] == b[12288..12288 + 8192]);
        s2.read_at(4 * MIB + 12288, &mut buf).unwrap();
        assert!(buf == c);

        let snaps = img.snaps().unwrap();
        let names: Vec<_> = snaps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["s1", "s2"]);
        assert!(snaps[0].id < snaps[1].id);
        assert!(snaps.iter().all(|s| s.size == 64 * MIB));

        // s3: object 0 discarded entirely -> reported as a hole
        img.discard(0, 4 * MIB).unwrap();
        img.create_snap("s3").unwrap();
        let s3 = t.ioctx.open(&t.name, Some("s3")).unwrap();
        let d = extents(&s3, Some("s2"), false);
        assert!(
            !d.is_empty() && d.iter().all(|&(o, l, e)| !e && o + l <= 4 * MIB),
            "{d:?}"
        );
        assert_eq!(d[0].0, 0);
        assert_eq!(extents(&s3, Some("s2"), true), vec![(0, 4 * MIB, false)]);
        let mut zeros = vec![1u8; MIB as usize];
        s3.read_at(0, &mut zeros).unwrap();
        assert!(zeros.iter().all(|&x| x == 0));
        let err = s3.write_at(0, b"x").unwrap_err();
        assert!(err.to_string().contains("Read-only file system"), "{err}");

        drop((s1, s2, s3));
        img.remove_snap("s1").unwrap();
        let names: Vec<_> = img.snaps().unwrap().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["s2", "s3"]);
        let err = img.remove_snap("s1").unwrap_err();
        assert!(
            err.is_not_found()
                && err
                    .to_string()
                    .contains(&format!("rbd snap rm rbd/{}@s1", t.name)),
            "{err}"
        );
    }

    #[test]
    fn diff_callback_can_stop_and_panics_propagate() {
        let t = TestImage::create("cb", 16 * MIB, FEATURE_LAYERING);
        let img = t.ioctx.open_rw(&t.name).unwrap();
        for i in 0..4 {
            img.write_at(i * 4 * MIB, &[7u8; 4096]).unwrap();
        }
        let mut calls = 0;
        img.diff_iterate(None, 0, 16 * MIB, false, |_, _, _| {
            calls += 1;
            false
        })
        .unwrap();
        assert_eq!(calls, 1);

        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            img.diff_iterate(None, 0, 16 * MIB, false, |_, _, _| {
                panic!("boom in callback")
            })
        }));
        let payload = r.expect_err("the panic must reach the caller");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"boom in callback"));
        // the image is still usable
        assert_eq!(extents(&img, None, false).len(), 4);
        let err = img
            .diff_iterate(Some("nope"), 0, 16 * MIB, false, |_, _, _| true)
            .unwrap_err();
        assert!(err.is_not_found(), "{err}");
    }

    #[test]
    fn reads_past_the_end_fail_and_resize_works() {
        let t = TestImage::create("end", 4 * MIB, FEATURE_LAYERING);
        let img = t.ioctx.open_rw(&t.name).unwrap();
        let mut buf = vec![0u8; 8192];
        img.read_at(4 * MIB - 8192, &mut buf).unwrap();
        let err = img.read_at(4 * MIB - 4096, &mut buf).unwrap_err();
        assert!(
            err.to_string()
                .contains("past the end of the image (4194304 bytes)"),
            "{err}"
        );
        let err = img.read_at(8 * MIB, &mut buf).unwrap_err();
        assert!(err.to_string().contains("past the end"), "{err}");
        img.resize(8 * MIB).unwrap();
        assert_eq!(img.size().unwrap(), 8 * MIB);
        img.read_at(8 * MIB - 8192, &mut buf).unwrap();
        img.read_at(0, &mut []).unwrap();
    }

    #[test]
    fn one_image_is_read_from_several_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Cluster>();
        assert_send_sync::<IoCtx>();
        assert_send_sync::<Image>();

        let t = TestImage::create("mt", 32 * MIB, FEATURE_LAYERING);
        let data = pattern(32 * MIB as usize, 9);
        {
            let img = t.ioctx.open_rw(&t.name).unwrap();
            img.write_at(0, &data).unwrap();
            img.create_snap("s").unwrap();
        }
        let img = t.ioctx.open(&t.name, Some("s")).unwrap();
        std::thread::scope(|s| {
            for th in 0..4u64 {
                let (img, data) = (&img, &data);
                s.spawn(move || {
                    let mut buf = vec![0u8; 256 << 10];
                    for i in (th..128).step_by(4) {
                        let off = i * (256 << 10);
                        img.read_at(off, &mut buf).unwrap();
                        assert!(
                            buf[..] == data[off as usize..off as usize + buf.len()],
                            "block {i}"
                        );
                    }
                });
            }
        });
    }

    #[test]
    fn striped_images_read_back_and_diff() {
        let ioctx = connect().ioctx(POOL, None).unwrap();
        let name = unique("striped");
        let features =
            FEATURE_LAYERING | FEATURE_EXCLUSIVE_LOCK | FEATURE_OBJECT_MAP | FEATURE_FAST_DIFF;
        ioctx
            .create_image_striped(&name, 64 * MIB, Some(22), features, 64 << 10, 8)
            .unwrap_or_else(|e| panic!("{e}"));
        let t = TestImage { ioctx, name };
        let img = t.ioctx.open_rw(&t.name).unwrap();
        assert_ne!(img.features().unwrap() & FEATURE_STRIPINGV2, 0);
        let data = pattern(3 * MIB as usize + 4096, 5);
        img.write_at(MIB + 512, &data).unwrap();
        img.create_snap("s1").unwrap();
        img.write_at(20 * MIB, &[9u8; 4096]).unwrap();
        img.create_snap("s2").unwrap();
        let s2 = t.ioctx.open(&t.name, Some("s2")).unwrap();
        let mut back = vec![0u8; data.len()];
        s2.read_at(MIB + 512, &mut back).unwrap();
        assert!(back == data, "striped read back differs");
        // Only object 0 (stripe units 0, 8, 16… of 64 KiB) changed. librbd
        // reports the 4 KiB written plus the object's growth since s1: its
        // range from the old end of object 0 up to the new write.
        let su = 64 << 10;
        let d = extents(&s2, Some("s1"), false);
        for &(o, l, exists) in &d {
            assert!(
                exists && (o / su) % 8 == 0 && o + l <= (o / su + 1) * su,
                "{o}+{l} in {d:?}"
            );
        }
        assert!(d.contains(&(20 * MIB, 4096, true)), "{d:?}");
        assert!(d.iter().all(|&(o, _, _)| o > MIB), "{d:?}");
        drop(s2);
    }

    #[test]
    fn dead_cluster_fails_within_the_timeout() {
        // a mon address nobody listens on: bind a port, then free it
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let keyring = dir.path().join("keyring");
        // a well-formed key of a cluster that does not exist
        std::fs::write(
            &keyring,
            "[client.admin]\n\tkey = AQCe8gFrKhLNJRAANcK3APJZ66HwR6KkRanonw==\n",
        )
        .unwrap();
        let conf = dir.path().join("ceph.conf");
        std::fs::write(
            &conf,
            format!("[global]\nmon_host = [v2:127.0.0.1:{port}]\nauth_client_required = cephx\nlog_file = /dev/null\n"),
        )
        .unwrap();
        let opts = CephOptions {
            conf: Some(conf.clone()),
            keyring: Some(keyring),
            timeout_secs: 3,
            ..CephOptions::default()
        };
        let t0 = Instant::now();
        let err = Cluster::connect(&opts).unwrap_err();
        let took = t0.elapsed();
        assert!(took < Duration::from_secs(10), "took {took:?}: {err}");
        assert_eq!(err.op(), Op::Connect);
        assert_eq!(err.errno_value(), Some(ETIMEDOUT), "{err}");
        assert!(err.to_string().contains(&shown(&conf)), "{err}");
        assert!(err.to_string().contains("no monitor answered"), "{err}");
    }

    #[test]
    fn rados_objects_put_create_exclusive_get_stat_list_remove() {
        let cluster = connect();
        let ns = unique("objs");
        let io = cluster.ioctx(POOL, Some(&ns)).unwrap();
        assert_eq!(io.list_objects().unwrap(), Vec::<String>::new());
        let data = pattern(3 * MIB as usize + 17, 4);
        // put-if-absent: created once, then refused without touching it
        assert!(io.create_exclusive("chunk-a", &data).unwrap());
        assert!(!io.create_exclusive("chunk-a", b"other").unwrap());
        assert!(io.read_object("chunk-a", 8 * MIB).unwrap() == data);
        let st = io.stat_object("chunk-a").unwrap();
        assert_eq!(st.size, data.len() as u64);
        assert!(st.mtime > 1_700_000_000, "{st:?}");
        // a bounded read refuses a larger object before allocating
        let err = io.read_object("chunk-a", 1024).unwrap_err();
        assert!(err.to_string().contains("more than the 1024 allowed"), "{err}");
        let mut part = vec![0u8; 100];
        assert_eq!(io.read_object_at("chunk-a", data.len() as u64 - 40, &mut part).unwrap(), 40);
        assert!(part[..40] == data[data.len() - 40..]);
        // write_full replaces
        io.write_full("meta", b"v1 and more").unwrap();
        io.write_full("meta", b"v2").unwrap();
        assert_eq!(io.read_object("meta", 100).unwrap(), b"v2");
        let mut names = io.list_objects().unwrap();
        names.sort();
        assert_eq!(names, ["chunk-a", "meta"]);
        // another namespace does not see them
        let other = cluster.ioctx(POOL, Some(&unique("objs-other"))).unwrap();
        assert!(other.list_objects().unwrap().is_empty());
        assert!(other.stat_object("meta").unwrap_err().is_not_found());
        io.remove_object("chunk-a").unwrap();
        let err = io.remove_object("chunk-a").unwrap_err();
        assert!(err.is_not_found(), "{err}");
        assert_eq!(
            err.to_string(),
            format!("rados rm rbd/{ns}/chunk-a: No such file or directory (errno 2); the object does not exist")
        );
        let err = io.read_object("chunk-a", 10).unwrap_err();
        assert!(err.is_not_found() && err.to_string().starts_with("rados stat"), "{err}");
        io.remove_object("meta").unwrap();
        assert!(io.list_objects().unwrap().is_empty());
    }

    #[test]
    fn exclusive_lock_owner_is_reported() {
        let t = TestImage::create("lock", 8 * MIB, FEATURE_LAYERING | FEATURE_EXCLUSIVE_LOCK);
        let img = t.ioctx.open_rw(&t.name).unwrap();
        assert_eq!(img.lock_owners().unwrap(), Vec::<String>::new());
        // a write takes the lock
        img.write_at(0, b"locked").unwrap();
        let owners = img.lock_owners().unwrap();
        let me = t.ioctx.client_addrs().unwrap();
        assert!(owners.len() == 1 && me.contains(&owners[0]), "owners {owners:?}, this client {me}");
        assert!(t.ioctx.instance_id() > 0);
    }

    #[test]
    fn missing_conf_file_is_named() {
        let opts = CephOptions {
            conf: Some("/nonexistent/bv/ceph.conf".into()),
            ..CephOptions::default()
        };
        let err = Cluster::connect(&opts).unwrap_err();
        assert_eq!(
            err.to_string(),
            "rados read config /nonexistent/bv/ceph.conf: No such file or directory (errno 2); the file does not exist"
        );
    }
}
