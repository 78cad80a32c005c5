//! Raw access to librados and librbd, loaded at run time.
//!
//! All of blockvault's `unsafe` code for Ceph lives in this module. The
//! libraries are opened with `dlopen` (via `libloading`) on first use and
//! never unloaded, so the binary builds and runs on machines without Ceph;
//! only RBD operations fail there, with an error naming the missing library
//! and its Debian package.
//!
//! The `extern "C"` signatures are written by hand from Ceph 16 (Pacific)'s
//! `rados/librados.h` and `rbd/librbd.h`; every symbol used exists since
//! Ceph 14 (Nautilus).
//!
//! The handle types here own their C handle and close it on drop, and each
//! keeps its parent alive: an [`Image`] holds an `Arc` of its [`IoCtx`], an
//! `IoCtx` one of its [`Rados`]. Configuration setters exist only on the
//! unconnected [`RadosConfig`], so a connected handle cannot be reconfigured.
//! Errors are returned as a positive [`Errno`]; `super` (rbd.rs) adds the
//! operation and object names.
#![deny(unsafe_op_in_unsafe_fn)]

use std::any::Any;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::fmt;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use libloading::Library;

/// Linux errno values used here (Ceph runs on Linux only).
pub const ENOENT: i32 = 2;
pub const EEXIST: i32 = 17;
pub const EIO: i32 = 5;
pub const EINVAL: i32 = 22;
pub const ERANGE: i32 = 34;
pub const ENAMETOOLONG: i32 = 36;
pub const ETIMEDOUT: i32 = 110;
pub const ECANCELED: i32 = 125;

/// Largest byte count passed to one librbd read/write/discard call: librbd
/// returns the byte count as an `int` internally.
const MAX_IO: usize = 1 << 30;
/// Largest length one `rbd_discard` call accepts here (librbd: `INT_MAX`).
pub const MAX_DISCARD: u64 = 1 << 30;

/// A positive errno value returned (negated) by librados or librbd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

fn check(r: c_int) -> Result<c_int, Errno> {
    if r < 0 {
        Err(Errno(-r))
    } else {
        Ok(r)
    }
}

fn check_size(r: isize) -> Result<usize, Errno> {
    if r < 0 {
        Err(Errno(i32::try_from(-r).unwrap_or(EIO)))
    } else {
        Ok(r.unsigned_abs())
    }
}

// ---------------------------------------------------------------------------
// C types (librados.h / librbd.h)

type RadosT = *mut c_void;
type IoCtxT = *mut c_void;
type ImageT = *mut c_void;
type ImageOptionsT = *mut c_void;
type WriteOpT = *mut c_void;
type ListCtxT = *mut c_void;
/// `time_t` on the 64-bit Linux targets Ceph supports.
type TimeT = i64;
/// `int (*cb)(uint64_t, size_t, int, void *)` of `rbd_diff_iterate2`.
type DiffCallback = extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;

/// `rbd_image_spec_t`
#[repr(C)]
struct RbdImageSpec {
    id: *mut c_char,
    name: *mut c_char,
}

/// `rbd_trash_image_info_t`
#[repr(C)]
struct RbdTrashImageInfo {
    id: *mut c_char,
    name: *mut c_char,
    /// `rbd_trash_image_source_t` (an enum: an int)
    source: c_int,
    deletion_time: TimeT,
    deferment_end_time: TimeT,
}

/// `rbd_snap_info_t`
#[repr(C)]
struct RbdSnapInfo {
    id: u64,
    size: u64,
    name: *const c_char,
}

/// `rbd_linked_image_spec_t` (laid out for C: not every field is read).
#[repr(C)]
#[allow(dead_code)]
struct RbdLinkedImageSpec {
    pool_id: i64,
    pool_name: *mut c_char,
    pool_namespace: *mut c_char,
    image_id: *mut c_char,
    image_name: *mut c_char,
    trash: bool,
}

/// `rbd_snap_spec_t` (`namespace_type` is the C enum, an int; not read).
#[repr(C)]
#[allow(dead_code)]
struct RbdSnapSpec {
    id: u64,
    namespace_type: c_int,
    name: *mut c_char,
}

/// The parent of a clone: `rbd_get_parent`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentSpec {
    pub pool: String,
    /// Empty for the default namespace.
    pub namespace: String,
    pub image: String,
    pub snap: String,
    pub snap_id: u64,
    /// The parent image is in the trash.
    pub trash: bool,
}

/// `rbd_image_info_t` (`RBD_MAX_BLOCK_NAME_SIZE` 24, `RBD_MAX_IMAGE_NAME_SIZE` 96)
#[repr(C)]
struct RbdImageInfo {
    size: u64,
    obj_size: u64,
    num_objs: u64,
    order: c_int,
    block_name_prefix: [c_char; 24],
    parent_pool: i64,
    parent_name: [c_char; 96],
}

/// `struct timeval` on 64-bit Linux.
#[repr(C)]
struct TimeVal {
    tv_sec: i64,
    tv_usec: i64,
}

/// `LIBRADOS_LOCK_FLAG_MUST_RENEW`: extend a lock this (client, cookie)
/// holds; fails with ENOENT when it is no longer held (expired, broken).
const LIBRADOS_LOCK_FLAG_MUST_RENEW: u8 = 1 << 1;

/// `EBUSY`: a lock is held by someone else.
pub const EBUSY: i32 = 16;

/// `LIBRADOS_CREATE_EXCLUSIVE` of `rados_write_op_create`.
const LIBRADOS_CREATE_EXCLUSIVE: c_int = 1;

/// `RBD_LOCK_MODE_EXCLUSIVE` (`rbd_lock_mode_t`).
pub const RBD_LOCK_MODE_EXCLUSIVE: c_int = 0;

/// `RBD_IMAGE_OPTION_*`
const RBD_IMAGE_OPTION_FORMAT: c_int = 0;
const RBD_IMAGE_OPTION_FEATURES: c_int = 1;
const RBD_IMAGE_OPTION_ORDER: c_int = 2;
const RBD_IMAGE_OPTION_STRIPE_UNIT: c_int = 3;
const RBD_IMAGE_OPTION_STRIPE_COUNT: c_int = 4;
const RBD_IMAGE_OPTION_CLONE_FORMAT: c_int = 12;

// ---------------------------------------------------------------------------
// Loading

/// The function table, filled from the two libraries. The `Library` values
/// are kept (in a static, never dropped) so the pointers stay valid.
struct Api {
    _rados_lib: Library,
    _rbd_lib: Library,
    rados_create: unsafe extern "C" fn(*mut RadosT, *const c_char) -> c_int,
    rados_conf_read_file: unsafe extern "C" fn(RadosT, *const c_char) -> c_int,
    rados_conf_parse_env: unsafe extern "C" fn(RadosT, *const c_char) -> c_int,
    rados_conf_set: unsafe extern "C" fn(RadosT, *const c_char, *const c_char) -> c_int,
    rados_conf_get: unsafe extern "C" fn(RadosT, *const c_char, *mut c_char, usize) -> c_int,
    rados_connect: unsafe extern "C" fn(RadosT) -> c_int,
    rados_shutdown: unsafe extern "C" fn(RadosT),
    rados_cluster_fsid: unsafe extern "C" fn(RadosT, *mut c_char, usize) -> c_int,
    rados_ioctx_create: unsafe extern "C" fn(RadosT, *const c_char, *mut IoCtxT) -> c_int,
    rados_ioctx_destroy: unsafe extern "C" fn(IoCtxT),
    rados_ioctx_set_namespace: unsafe extern "C" fn(IoCtxT, *const c_char),
    rados_get_instance_id: unsafe extern "C" fn(RadosT) -> u64,
    rados_getaddrs: unsafe extern "C" fn(RadosT, *mut *mut c_char) -> c_int,
    rados_buffer_free: unsafe extern "C" fn(*mut c_char),
    rados_write_full: unsafe extern "C" fn(IoCtxT, *const c_char, *const c_char, usize) -> c_int,
    rados_read: unsafe extern "C" fn(IoCtxT, *const c_char, *mut c_char, usize, u64) -> c_int,
    rados_stat: unsafe extern "C" fn(IoCtxT, *const c_char, *mut u64, *mut TimeT) -> c_int,
    rados_remove: unsafe extern "C" fn(IoCtxT, *const c_char) -> c_int,
    rados_create_write_op: unsafe extern "C" fn() -> WriteOpT,
    rados_release_write_op: unsafe extern "C" fn(WriteOpT),
    rados_write_op_create: unsafe extern "C" fn(WriteOpT, c_int, *const c_char),
    rados_write_op_write_full: unsafe extern "C" fn(WriteOpT, *const c_char, usize),
    rados_write_op_operate:
        unsafe extern "C" fn(WriteOpT, IoCtxT, *const c_char, *mut TimeT, c_int) -> c_int,
    rados_nobjects_list_open: unsafe extern "C" fn(IoCtxT, *mut ListCtxT) -> c_int,
    rados_nobjects_list_next: unsafe extern "C" fn(
        ListCtxT,
        *mut *const c_char,
        *mut *const c_char,
        *mut *const c_char,
    ) -> c_int,
    rados_nobjects_list_close: unsafe extern "C" fn(ListCtxT),
    rados_write_op_assert_exists: unsafe extern "C" fn(WriteOpT),
    rados_write_op_setxattr: unsafe extern "C" fn(WriteOpT, *const c_char, *const c_char, usize),
    rados_lock_exclusive: unsafe extern "C" fn(
        IoCtxT,
        *const c_char,
        *const c_char,
        *const c_char,
        *const c_char,
        *mut TimeVal,
        u8,
    ) -> c_int,
    rados_lock_shared: unsafe extern "C" fn(
        IoCtxT,
        *const c_char,
        *const c_char,
        *const c_char,
        *const c_char,
        *const c_char,
        *mut TimeVal,
        u8,
    ) -> c_int,
    rados_unlock: unsafe extern "C" fn(IoCtxT, *const c_char, *const c_char, *const c_char) -> c_int,
    rados_list_lockers: unsafe extern "C" fn(
        IoCtxT,
        *const c_char,
        *const c_char,
        *mut c_int,
        *mut c_char,
        *mut usize,
        *mut c_char,
        *mut usize,
        *mut c_char,
        *mut usize,
        *mut c_char,
        *mut usize,
    ) -> isize,
    rbd_version: unsafe extern "C" fn(*mut c_int, *mut c_int, *mut c_int),
    rbd_list2: unsafe extern "C" fn(IoCtxT, *mut RbdImageSpec, *mut usize) -> c_int,
    rbd_image_spec_list_cleanup: unsafe extern "C" fn(*mut RbdImageSpec, usize),
    rbd_image_options_create: unsafe extern "C" fn(*mut ImageOptionsT),
    rbd_image_options_destroy: unsafe extern "C" fn(ImageOptionsT),
    rbd_image_options_set_uint64: unsafe extern "C" fn(ImageOptionsT, c_int, u64) -> c_int,
    rbd_create4: unsafe extern "C" fn(IoCtxT, *const c_char, u64, ImageOptionsT) -> c_int,
    rbd_remove: unsafe extern "C" fn(IoCtxT, *const c_char) -> c_int,
    rbd_open: unsafe extern "C" fn(IoCtxT, *const c_char, *mut ImageT, *const c_char) -> c_int,
    rbd_open_read_only:
        unsafe extern "C" fn(IoCtxT, *const c_char, *mut ImageT, *const c_char) -> c_int,
    rbd_close: unsafe extern "C" fn(ImageT) -> c_int,
    rbd_stat: unsafe extern "C" fn(ImageT, *mut RbdImageInfo, usize) -> c_int,
    rbd_get_size: unsafe extern "C" fn(ImageT, *mut u64) -> c_int,
    rbd_get_features: unsafe extern "C" fn(ImageT, *mut u64) -> c_int,
    rbd_get_flags: unsafe extern "C" fn(ImageT, *mut u64) -> c_int,
    rbd_get_id: unsafe extern "C" fn(ImageT, *mut c_char, usize) -> c_int,
    rbd_snap_list: unsafe extern "C" fn(ImageT, *mut RbdSnapInfo, *mut c_int) -> c_int,
    rbd_snap_list_end: unsafe extern "C" fn(*mut RbdSnapInfo),
    rbd_snap_create: unsafe extern "C" fn(ImageT, *const c_char) -> c_int,
    rbd_snap_remove: unsafe extern "C" fn(ImageT, *const c_char) -> c_int,
    rbd_diff_iterate2: unsafe extern "C" fn(
        ImageT,
        *const c_char,
        u64,
        u64,
        u8,
        u8,
        DiffCallback,
        *mut c_void,
    ) -> c_int,
    rbd_read2: unsafe extern "C" fn(ImageT, u64, usize, *mut c_char, c_int) -> isize,
    rbd_write2: unsafe extern "C" fn(ImageT, u64, usize, *const c_char, c_int) -> isize,
    rbd_discard: unsafe extern "C" fn(ImageT, u64, u64) -> c_int,
    rbd_resize: unsafe extern "C" fn(ImageT, u64) -> c_int,
    rbd_flush: unsafe extern "C" fn(ImageT) -> c_int,
    rbd_lock_get_owners: unsafe extern "C" fn(ImageT, *mut c_int, *mut *mut c_char, *mut usize) -> c_int,
    rbd_lock_get_owners_cleanup: unsafe extern "C" fn(*mut *mut c_char, usize),
    rbd_lock_break: unsafe extern "C" fn(ImageT, c_int, *const c_char) -> c_int,
    rbd_clone3: unsafe extern "C" fn(
        IoCtxT,
        *const c_char,
        *const c_char,
        IoCtxT,
        *const c_char,
        ImageOptionsT,
    ) -> c_int,
    rbd_flatten: unsafe extern "C" fn(ImageT) -> c_int,
    rbd_get_parent: unsafe extern "C" fn(ImageT, *mut RbdLinkedImageSpec, *mut RbdSnapSpec) -> c_int,
    rbd_linked_image_spec_cleanup: unsafe extern "C" fn(*mut RbdLinkedImageSpec),
    rbd_snap_spec_cleanup: unsafe extern "C" fn(*mut RbdSnapSpec),
    rbd_get_overlap: unsafe extern "C" fn(ImageT, *mut u64) -> c_int,
    rbd_trash_list: unsafe extern "C" fn(IoCtxT, *mut RbdTrashImageInfo, *mut usize) -> c_int,
    rbd_trash_list_cleanup: unsafe extern "C" fn(*mut RbdTrashImageInfo, usize),
    rbd_open_by_id: unsafe extern "C" fn(IoCtxT, *const c_char, *mut ImageT, *const c_char) -> c_int,
}

/// Why librados/librbd could not be used at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadError {
    /// The shared object, e.g. `librbd.so.1`.
    pub library: &'static str,
    /// The Debian package that provides it.
    pub package: &'static str,
    /// The missing symbol, when the library loaded but is too old.
    pub symbol: Option<&'static str>,
    /// The dynamic loader's message.
    pub detail: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.symbol {
            None => write!(
                f,
                "cannot load {} (install the Debian package {}): {}",
                self.library, self.package, self.detail
            ),
            Some(sym) => write!(
                f,
                "{} has no {} (too old: blockvault needs Ceph 14 or newer; upgrade the package {}): {}",
                self.library, sym, self.package, self.detail
            ),
        }
    }
}

const RADOS_LIB: &str = "librados.so.2";
const RADOS_PKG: &str = "librados2";
const RBD_LIB: &str = "librbd.so.1";
const RBD_PKG: &str = "librbd1";

fn open_library(library: &'static str, package: &'static str) -> Result<Library, LoadError> {
    // SAFETY: librados/librbd's initialisers only set up C++ statics and are
    // safe to run on any thread; the library is never unloaded (see `api`).
    unsafe { Library::new(library) }.map_err(|e| LoadError {
        library,
        package,
        symbol: None,
        detail: e.to_string(),
    })
}

impl Api {
    fn load() -> Result<Api, LoadError> {
        let rados = open_library(RADOS_LIB, RADOS_PKG)?;
        let rbd = open_library(RBD_LIB, RBD_PKG)?;
        // Looks a symbol up; the field it is assigned to gives its type,
        // which must match the C declaration (checked by hand against the
        // Ceph 16 headers).
        macro_rules! sym {
            ($lib:ident, $libname:expr, $pkg:expr, $name:ident) => {{
                let name = concat!(stringify!($name), "\0");
                // SAFETY: the type is the one declared in librados.h/librbd.h;
                // the pointer is only used while the library stays loaded,
                // which is forever (the `Library` lives in this `Api`, which
                // lives in a static).
                match unsafe { $lib.get(name.as_bytes()) } {
                    Ok(s) => *s,
                    Err(e) => {
                        return Err(LoadError {
                            library: $libname,
                            package: $pkg,
                            symbol: Some(stringify!($name)),
                            detail: e.to_string(),
                        })
                    }
                }
            }};
        }
        macro_rules! rados {
            ($name:ident) => {
                sym!(rados, RADOS_LIB, RADOS_PKG, $name)
            };
        }
        macro_rules! rbd {
            ($name:ident) => {
                sym!(rbd, RBD_LIB, RBD_PKG, $name)
            };
        }
        Ok(Api {
            rados_create: rados!(rados_create),
            rados_conf_read_file: rados!(rados_conf_read_file),
            rados_conf_parse_env: rados!(rados_conf_parse_env),
            rados_conf_set: rados!(rados_conf_set),
            rados_conf_get: rados!(rados_conf_get),
            rados_connect: rados!(rados_connect),
            rados_shutdown: rados!(rados_shutdown),
            rados_cluster_fsid: rados!(rados_cluster_fsid),
            rados_ioctx_create: rados!(rados_ioctx_create),
            rados_ioctx_destroy: rados!(rados_ioctx_destroy),
            rados_ioctx_set_namespace: rados!(rados_ioctx_set_namespace),
            rados_get_instance_id: rados!(rados_get_instance_id),
            rados_getaddrs: rados!(rados_getaddrs),
            rados_buffer_free: rados!(rados_buffer_free),
            rados_write_full: rados!(rados_write_full),
            rados_read: rados!(rados_read),
            rados_stat: rados!(rados_stat),
            rados_remove: rados!(rados_remove),
            rados_create_write_op: rados!(rados_create_write_op),
            rados_release_write_op: rados!(rados_release_write_op),
            rados_write_op_create: rados!(rados_write_op_create),
            rados_write_op_write_full: rados!(rados_write_op_write_full),
            rados_write_op_operate: rados!(rados_write_op_operate),
            rados_nobjects_list_open: rados!(rados_nobjects_list_open),
            rados_nobjects_list_next: rados!(rados_nobjects_list_next),
            rados_nobjects_list_close: rados!(rados_nobjects_list_close),
            rados_write_op_assert_exists: rados!(rados_write_op_assert_exists),
            rados_write_op_setxattr: rados!(rados_write_op_setxattr),
            rados_lock_exclusive: rados!(rados_lock_exclusive),
            rados_lock_shared: rados!(rados_lock_shared),
            rados_unlock: rados!(rados_unlock),
            rados_list_lockers: rados!(rados_list_lockers),
            rbd_version: rbd!(rbd_version),
            rbd_list2: rbd!(rbd_list2),
            rbd_image_spec_list_cleanup: rbd!(rbd_image_spec_list_cleanup),
            rbd_image_options_create: rbd!(rbd_image_options_create),
            rbd_image_options_destroy: rbd!(rbd_image_options_destroy),
            rbd_image_options_set_uint64: rbd!(rbd_image_options_set_uint64),
            rbd_create4: rbd!(rbd_create4),
            rbd_remove: rbd!(rbd_remove),
            rbd_open: rbd!(rbd_open),
            rbd_open_read_only: rbd!(rbd_open_read_only),
            rbd_close: rbd!(rbd_close),
            rbd_stat: rbd!(rbd_stat),
            rbd_get_size: rbd!(rbd_get_size),
            rbd_get_features: rbd!(rbd_get_features),
            rbd_get_flags: rbd!(rbd_get_flags),
            rbd_get_id: rbd!(rbd_get_id),
            rbd_snap_list: rbd!(rbd_snap_list),
            rbd_snap_list_end: rbd!(rbd_snap_list_end),
            rbd_snap_create: rbd!(rbd_snap_create),
            rbd_snap_remove: rbd!(rbd_snap_remove),
            rbd_diff_iterate2: rbd!(rbd_diff_iterate2),
            rbd_read2: rbd!(rbd_read2),
            rbd_write2: rbd!(rbd_write2),
            rbd_discard: rbd!(rbd_discard),
            rbd_resize: rbd!(rbd_resize),
            rbd_flush: rbd!(rbd_flush),
            rbd_lock_get_owners: rbd!(rbd_lock_get_owners),
            rbd_lock_get_owners_cleanup: rbd!(rbd_lock_get_owners_cleanup),
            rbd_lock_break: rbd!(rbd_lock_break),
            rbd_clone3: rbd!(rbd_clone3),
            rbd_flatten: rbd!(rbd_flatten),
            rbd_get_parent: rbd!(rbd_get_parent),
            rbd_linked_image_spec_cleanup: rbd!(rbd_linked_image_spec_cleanup),
            rbd_snap_spec_cleanup: rbd!(rbd_snap_spec_cleanup),
            rbd_get_overlap: rbd!(rbd_get_overlap),
            rbd_trash_list: rbd!(rbd_trash_list),
            rbd_trash_list_cleanup: rbd!(rbd_trash_list_cleanup),
            rbd_open_by_id: rbd!(rbd_open_by_id),
            _rados_lib: rados,
            _rbd_lib: rbd,
        })
    }
}

/// Loads both libraries on first call; later calls return the same result.
fn api() -> Result<&'static Api, LoadError> {
    static API: OnceLock<Result<Api, LoadError>> = OnceLock::new();
    API.get_or_init(Api::load).as_ref().map_err(Clone::clone)
}

/// librbd's version triple (1.16.0 for Ceph 16), loading the libraries if needed.
pub fn librbd_version() -> Result<(i32, i32, i32), LoadError> {
    let api = api()?;
    let (mut major, mut minor, mut extra) = (0, 0, 0);
    // SAFETY: three valid out-pointers.
    unsafe { (api.rbd_version)(&mut major, &mut minor, &mut extra) };
    Ok((major, minor, extra))
}

/// Copies a C string owned by librados/librbd (not freed here).
///
/// # Safety
/// `p` is null or points to a NUL-terminated string valid for this call.
unsafe fn string_from(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: per the contract above.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn opt_ptr(s: Option<&CStr>) -> *const c_char {
    s.map_or(ptr::null(), CStr::as_ptr)
}

// ---------------------------------------------------------------------------
// Cluster handles

/// An owned `rados_t`, shut down on drop.
struct RawRados {
    api: &'static Api,
    h: NonNull<c_void>,
}

// SAFETY: a rados_t is not tied to the thread that created it.
unsafe impl Send for RawRados {}

impl Drop for RawRados {
    fn drop(&mut self) {
        // SAFETY: h came from rados_create and is shut down exactly once;
        // every IoCtx (and through it every Image) holds an Arc of the
        // connected Rados, so none outlives this.
        unsafe { (self.api.rados_shutdown)(self.h.as_ptr()) };
    }
}

/// A cluster handle that is not connected yet: configuration can be read
/// and changed, then [`RadosConfig::connect`] turns it into a [`Rados`].
/// Dropping it releases the handle.
pub struct RadosConfig {
    raw: RawRados,
}

/// Failure of [`RadosConfig::create`].
#[derive(Clone, Debug)]
pub enum CreateError {
    /// The libraries could not be loaded.
    Load(LoadError),
    /// `rados_create` failed.
    Errno(Errno),
}

impl RadosConfig {
    /// `rados_create(id)`: a handle for the client `client.<id>`.
    pub fn create(id: &CStr) -> Result<RadosConfig, CreateError> {
        let api = api().map_err(CreateError::Load)?;
        let mut h: RadosT = ptr::null_mut();
        // SAFETY: valid out-pointer and NUL-terminated id.
        let r = unsafe { (api.rados_create)(&mut h, id.as_ptr()) };
        check(r).map_err(CreateError::Errno)?;
        let h = NonNull::new(h).ok_or(CreateError::Errno(Errno(EIO)))?;
        Ok(RadosConfig {
            raw: RawRados { api, h },
        })
    }

    /// `rados_conf_read_file`: `None` searches Ceph's default locations.
    pub fn read_file(&mut self, path: Option<&CStr>) -> Result<(), Errno> {
        // SAFETY: live unconnected handle; path is null or NUL-terminated.
        check(unsafe { (self.raw.api.rados_conf_read_file)(self.raw.h.as_ptr(), opt_ptr(path)) })
            .map(drop)
    }

    /// `rados_conf_parse_env(NULL)`: applies `CEPH_ARGS`.
    pub fn parse_env(&mut self) -> Result<(), Errno> {
        // SAFETY: live unconnected handle; null selects CEPH_ARGS.
        check(unsafe { (self.raw.api.rados_conf_parse_env)(self.raw.h.as_ptr(), ptr::null()) })
            .map(drop)
    }

    /// `rados_conf_get(option)`: the option's current value.
    pub fn get(&self, option: &CStr) -> Result<String, Errno> {
        let mut len = 256;
        loop {
            let mut buf = vec![0 as c_char; len];
            // SAFETY: live handle; buf writable for len bytes.
            let r = unsafe {
                (self.raw.api.rados_conf_get)(self.raw.h.as_ptr(), option.as_ptr(), buf.as_mut_ptr(), len)
            };
            if r == -ENAMETOOLONG && len < 1 << 16 {
                len *= 4;
                continue;
            }
            check(r)?;
            buf[len - 1] = 0;
            // SAFETY: NUL-terminated buffer.
            return Ok(unsafe { string_from(buf.as_ptr()) });
        }
    }

    /// `rados_conf_set(option, value)`.
    pub fn set(&mut self, option: &CStr, value: &CStr) -> Result<(), Errno> {
        // SAFETY: live unconnected handle; NUL-terminated strings.
        check(unsafe {
            (self.raw.api.rados_conf_set)(self.raw.h.as_ptr(), option.as_ptr(), value.as_ptr())
        })
        .map(drop)
    }

    /// `rados_connect`. On failure the handle is shut down.
    pub fn connect(self) -> Result<Rados, Errno> {
        // SAFETY: live handle, connected at most once (self is consumed).
        check(unsafe { (self.raw.api.rados_connect)(self.raw.h.as_ptr()) })?;
        Ok(Rados {
            raw: self.raw,
            timed_out: AtomicBool::new(false),
        })
    }
}

/// A connected cluster handle.
pub struct Rados {
    raw: RawRados,
    /// An operation through this connection returned ETIMEDOUT: the
    /// cluster (an OSD, a monitor) does not answer. From then on handles
    /// are closed on a background thread instead of blocking their owner
    /// for another timeout each (see `Drop for Image`).
    timed_out: AtomicBool,
}

// SAFETY: a connected rados_t may be used from several threads at once
// (librados is thread-safe; configuration cannot be changed through `Rados`).
unsafe impl Sync for Rados {}

impl Rados {
    /// Whether an operation through this connection timed out.
    pub fn has_timed_out(&self) -> bool {
        self.timed_out.load(Ordering::Relaxed)
    }

    fn note(&self, e: Errno) -> Errno {
        if e.0 == ETIMEDOUT {
            self.timed_out.store(true, Ordering::Relaxed);
        }
        e
    }
    /// `rados_cluster_fsid`.
    pub fn fsid(&self) -> Result<String, Errno> {
        let mut buf = [0 as c_char; 64];
        // SAFETY: connected handle; buf is writable for its length (≥ 37 as required).
        check(unsafe {
            (self.raw.api.rados_cluster_fsid)(self.raw.h.as_ptr(), buf.as_mut_ptr(), buf.len())
        })?;
        // make sure it is terminated whatever librados wrote
        buf[buf.len() - 1] = 0;
        // SAFETY: NUL-terminated buffer.
        Ok(unsafe { string_from(buf.as_ptr()) })
    }

    /// `rados_get_instance_id`: the global id of this client; it is
    /// `client.<id>` in lock owners, `rbd status` and the blocklist.
    pub fn instance_id(&self) -> u64 {
        // SAFETY: connected handle.
        unsafe { (self.raw.api.rados_get_instance_id)(self.raw.h.as_ptr()) }
    }

    /// `rados_getaddrs`: this client's addresses, e.g.
    /// `[v2:127.0.0.1:0/3262212345]`; lock owners are named by the address.
    pub fn addrs(&self) -> Result<String, Errno> {
        let mut p: *mut c_char = ptr::null_mut();
        // SAFETY: connected handle, valid out-pointer.
        check(unsafe { (self.raw.api.rados_getaddrs)(self.raw.h.as_ptr(), &mut p) })?;
        // SAFETY: on success p is a NUL-terminated string librados allocated.
        let s = unsafe { string_from(p) };
        if !p.is_null() {
            // SAFETY: freed once, with the function librados documents for it.
            unsafe { (self.raw.api.rados_buffer_free)(p) };
        }
        Ok(s)
    }

    /// `rados_ioctx_create(pool)` then, with `namespace`, `rados_ioctx_set_namespace`.
    pub fn ioctx(self: &Arc<Self>, pool: &CStr, namespace: Option<&CStr>) -> Result<IoCtx, Errno> {
        let api = self.raw.api;
        let mut h: IoCtxT = ptr::null_mut();
        // SAFETY: connected handle, NUL-terminated pool name, valid out-pointer.
        check(unsafe { (api.rados_ioctx_create)(self.raw.h.as_ptr(), pool.as_ptr(), &mut h) })?;
        let h = NonNull::new(h).ok_or(Errno(EIO))?;
        let ioctx = IoCtx {
            api,
            h,
            _rados: Arc::clone(self),
        };
        if let Some(ns) = namespace {
            // SAFETY: fresh ioctx not yet shared with any other thread.
            unsafe { (api.rados_ioctx_set_namespace)(ioctx.h.as_ptr(), ns.as_ptr()) };
        }
        Ok(ioctx)
    }
}

/// An owned `rados_ioctx_t` (a pool, optionally a namespace in it),
/// destroyed on drop; keeps its cluster connected.
pub struct IoCtx {
    api: &'static Api,
    h: NonNull<c_void>,
    _rados: Arc<Rados>,
}

// SAFETY: I/O through an ioctx is thread-safe in librados; the only
// non-thread-safe calls (namespace, snapshot read context) are made once in
// `Rados::ioctx` before the IoCtx is shared, and never again.
unsafe impl Send for IoCtx {}
// SAFETY: as above.
unsafe impl Sync for IoCtx {}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: h came from rados_ioctx_create and is destroyed once; every
        // Image opened through it holds an Arc of this IoCtx.
        unsafe { (self.api.rados_ioctx_destroy)(self.h.as_ptr()) };
    }
}

/// RAII for `rbd_image_options_t`.
struct ImageOptions {
    api: &'static Api,
    h: ImageOptionsT,
}

impl ImageOptions {
    fn new(api: &'static Api) -> ImageOptions {
        let mut h: ImageOptionsT = ptr::null_mut();
        // SAFETY: valid out-pointer.
        unsafe { (api.rbd_image_options_create)(&mut h) };
        ImageOptions { api, h }
    }

    fn set(&mut self, opt: c_int, value: u64) -> Result<(), Errno> {
        // SAFETY: live options handle.
        check(unsafe { (self.api.rbd_image_options_set_uint64)(self.h, opt, value) }).map(drop)
    }
}

impl Drop for ImageOptions {
    fn drop(&mut self) {
        // SAFETY: created by rbd_image_options_create, destroyed once.
        unsafe { (self.api.rbd_image_options_destroy)(self.h) };
    }
}

impl IoCtx {
    /// `rbd_list2`: the names of the images in the pool/namespace.
    pub fn list_images(&self) -> Result<Vec<String>, Errno> {
        let mut cap: usize = 64;
        loop {
            let mut specs: Vec<RbdImageSpec> = Vec::with_capacity(cap);
            let mut n = cap;
            // SAFETY: specs has room for `n` entries; librbd writes at most n.
            let r = unsafe { (self.api.rbd_list2)(self.h.as_ptr(), specs.as_mut_ptr(), &mut n) };
            if r == -ERANGE && n > cap {
                cap = n + 16; // images may be created meanwhile
                continue;
            }
            self.check(r)?;
            let n = n.min(cap);
            // SAFETY: on success librbd filled the first n entries.
            unsafe { specs.set_len(n) };
            // SAFETY: the names are NUL-terminated strings owned by librbd.
            let names = specs
                .iter()
                .map(|s| unsafe { string_from(s.name) })
                .collect();
            // SAFETY: frees exactly the n entries librbd allocated, once.
            unsafe { (self.api.rbd_image_spec_list_cleanup)(specs.as_mut_ptr(), n) };
            return Ok(names);
        }
    }

    /// `rbd_trash_list`: `(id, name)` of every image in the pool's
    /// (namespace's) trash.
    pub fn trash_list(&self) -> Result<Vec<(String, String)>, Errno> {
        let mut cap: usize = 16;
        loop {
            let mut entries: Vec<RbdTrashImageInfo> = Vec::with_capacity(cap);
            let mut n = cap;
            // SAFETY: entries has room for `n` entries; librbd writes at most n.
            let r = unsafe { (self.api.rbd_trash_list)(self.h.as_ptr(), entries.as_mut_ptr(), &mut n) };
            if r == -ERANGE && n > cap {
                cap = n + 8; // images may be trashed meanwhile
                continue;
            }
            self.check(r)?;
            let n = n.min(cap);
            // SAFETY: on success librbd filled the first n entries.
            unsafe { entries.set_len(n) };
            // SAFETY: id and name are NUL-terminated strings owned by librbd.
            let out = entries.iter().map(|e| unsafe { (string_from(e.id), string_from(e.name)) }).collect();
            // SAFETY: frees exactly the n entries librbd allocated, once.
            unsafe { (self.api.rbd_trash_list_cleanup)(entries.as_mut_ptr(), n) };
            return Ok(out);
        }
    }

    /// `rbd_open_by_id` of the head, read-write (also works for an image
    /// in the trash, which has no name in the directory any more).
    pub fn open_image_by_id(self: &Arc<Self>, id: &CStr) -> Result<Image, Errno> {
        let mut h: ImageT = ptr::null_mut();
        // SAFETY: live ioctx, NUL-terminated id, null snapshot (the head), valid out-pointer.
        self.check(unsafe { (self.api.rbd_open_by_id)(self.h.as_ptr(), id.as_ptr(), &mut h, ptr::null()) })?;
        let h = NonNull::new(h).ok_or(Errno(EIO))?;
        Ok(Image { api: self.api, h, _ioctx: Arc::clone(self) })
    }

    /// `rbd_create4`: a format-2 image with the given features, object size
    /// order (`None`: the cluster default) and optional fancy striping
    /// `(stripe_unit, stripe_count)`.
    pub fn create_image(
        &self,
        name: &CStr,
        size: u64,
        order: Option<u8>,
        features: u64,
        stripe: Option<(u64, u64)>,
    ) -> Result<(), Errno> {
        let mut opts = ImageOptions::new(self.api);
        opts.set(RBD_IMAGE_OPTION_FORMAT, 2)?;
        opts.set(RBD_IMAGE_OPTION_FEATURES, features)?;
        if let Some(order) = order {
            opts.set(RBD_IMAGE_OPTION_ORDER, u64::from(order))?;
        }
        if let Some((unit, count)) = stripe {
            opts.set(RBD_IMAGE_OPTION_STRIPE_UNIT, unit)?;
            opts.set(RBD_IMAGE_OPTION_STRIPE_COUNT, count)?;
        }
        // SAFETY: live ioctx and options, NUL-terminated name.
        self.check(unsafe { (self.api.rbd_create4)(self.h.as_ptr(), name.as_ptr(), size, opts.h) })
            .map(drop)
    }

    /// `rbd_clone3`: image `name` of this pool, a clone (format 2, so the
    /// snapshot needs no protection) of `parent@snap` in `parent_ioctx`,
    /// with the given features and object size order (`None`: the parent's).
    pub fn clone_image(
        &self,
        parent_ioctx: &IoCtx,
        parent: &CStr,
        snap: &CStr,
        name: &CStr,
        order: Option<u8>,
        features: u64,
    ) -> Result<(), Errno> {
        let mut opts = ImageOptions::new(self.api);
        opts.set(RBD_IMAGE_OPTION_FORMAT, 2)?;
        opts.set(RBD_IMAGE_OPTION_CLONE_FORMAT, 2)?;
        opts.set(RBD_IMAGE_OPTION_FEATURES, features)?;
        if let Some(order) = order {
            opts.set(RBD_IMAGE_OPTION_ORDER, u64::from(order))?;
        }
        // SAFETY: two live ioctxs, NUL-terminated strings, live options.
        self.check(unsafe {
            (self.api.rbd_clone3)(
                parent_ioctx.h.as_ptr(),
                parent.as_ptr(),
                snap.as_ptr(),
                self.h.as_ptr(),
                name.as_ptr(),
                opts.h,
            )
        })
        .map(drop)
    }

    /// `rbd_remove` (fails with ENOTEMPTY while the image has snapshots).
    pub fn remove_image(&self, name: &CStr) -> Result<(), Errno> {
        // SAFETY: live ioctx, NUL-terminated name.
        self.check(unsafe { (self.api.rbd_remove)(self.h.as_ptr(), name.as_ptr()) }).map(drop)
    }

    /// `rbd_open` (`read_only` false) or `rbd_open_read_only`, at `snap` or the head.
    pub fn open_image(
        self: &Arc<Self>,
        name: &CStr,
        snap: Option<&CStr>,
        read_only: bool,
    ) -> Result<Image, Errno> {
        let open = if read_only {
            self.api.rbd_open_read_only
        } else {
            self.api.rbd_open
        };
        let mut h: ImageT = ptr::null_mut();
        // SAFETY: live ioctx, NUL-terminated strings (snap may be null), valid out-pointer.
        self.check(unsafe { open(self.h.as_ptr(), name.as_ptr(), &mut h, opt_ptr(snap)) })?;
        let h = NonNull::new(h).ok_or(Errno(EIO))?;
        Ok(Image {
            api: self.api,
            h,
            _ioctx: Arc::clone(self),
        })
    }
}


/// RAII for `rados_write_op_t`.
struct WriteOp {
    api: &'static Api,
    h: NonNull<c_void>,
}

impl Drop for WriteOp {
    fn drop(&mut self) {
        // SAFETY: created by rados_create_write_op, released once.
        unsafe { (self.api.rados_release_write_op)(self.h.as_ptr()) };
    }
}

/// RAII for `rados_list_ctx_t`.
struct ListCtx {
    api: &'static Api,
    h: NonNull<c_void>,
}

impl Drop for ListCtx {
    fn drop(&mut self) {
        // SAFETY: opened by rados_nobjects_list_open, closed once.
        unsafe { (self.api.rados_nobjects_list_close)(self.h.as_ptr()) };
    }
}

/// Largest object payload passed to one librados call (librados returns
/// byte counts as an `int`; Ceph's default `osd_max_object_size` is 128 MiB).
pub const MAX_OBJECT_IO: usize = 1 << 30;

impl IoCtx {
    fn check(&self, r: c_int) -> Result<c_int, Errno> {
        check(r).map_err(|e| self._rados.note(e))
    }

    /// Whether an operation through this ioctx's connection timed out.
    pub fn has_timed_out(&self) -> bool {
        self._rados.has_timed_out()
    }
}

/// RADOS object operations (what a store backend needs).
impl IoCtx {
    /// The global id of the client this ioctx belongs to.
    pub fn instance_id(&self) -> u64 {
        self._rados.instance_id()
    }

    /// The addresses of the client this ioctx belongs to.
    pub fn client_addrs(&self) -> Result<String, Errno> {
        self._rados.addrs()
    }

    /// `rados_write_full`: replaces the object's whole content (creates it).
    pub fn write_full(&self, oid: &CStr, data: &[u8]) -> Result<(), Errno> {
        if data.len() > MAX_OBJECT_IO {
            return Err(Errno(EINVAL));
        }
        // SAFETY: live ioctx, NUL-terminated oid, data readable for its length
        // (librados copies it before returning: synchronous call).
        self.check(unsafe {
            (self.api.rados_write_full)(self.h.as_ptr(), oid.as_ptr(), data.as_ptr().cast(), data.len())
        })
        .map(drop)
    }

    /// One write operation that creates the object exclusively and writes
    /// its whole content: atomic on the OSD, so the object either does not
    /// exist (EEXIST when it already did) or exists with all of `data`.
    pub fn create_exclusive(&self, oid: &CStr, data: &[u8]) -> Result<(), Errno> {
        if data.len() > MAX_OBJECT_IO {
            return Err(Errno(EINVAL));
        }
        // SAFETY: no arguments.
        let h = unsafe { (self.api.rados_create_write_op)() };
        let op = WriteOp {
            api: self.api,
            h: NonNull::new(h).ok_or(Errno(EIO))?,
        };
        // SAFETY: live op; the category argument is unused (null allowed);
        // data stays borrowed until operate returns, which is when librados
        // is done with it.
        unsafe {
            (self.api.rados_write_op_create)(op.h.as_ptr(), LIBRADOS_CREATE_EXCLUSIVE, ptr::null());
            (self.api.rados_write_op_write_full)(op.h.as_ptr(), data.as_ptr().cast(), data.len());
        }
        // SAFETY: live op and ioctx, NUL-terminated oid, null mtime (now).
        self.check(unsafe {
            (self.api.rados_write_op_operate)(op.h.as_ptr(), self.h.as_ptr(), oid.as_ptr(), ptr::null_mut(), 0)
        })
        .map(drop)
    }

    /// One `rados_read` of up to `buf.len()` bytes (at most 1 GiB) at `offset`:
    /// the number of bytes read, fewer at the object's end.
    pub fn read_object(&self, oid: &CStr, offset: u64, buf: &mut [u8]) -> Result<usize, Errno> {
        let len = buf.len().min(MAX_OBJECT_IO);
        // SAFETY: live ioctx, NUL-terminated oid, buf writable for len bytes.
        let n = self.check(unsafe {
            (self.api.rados_read)(self.h.as_ptr(), oid.as_ptr(), buf.as_mut_ptr().cast(), len, offset)
        })?;
        Ok(usize::try_from(n).unwrap_or(0).min(len))
    }

    /// `rados_stat`: the object's size and modification time (seconds since the epoch).
    pub fn stat_object(&self, oid: &CStr) -> Result<(u64, i64), Errno> {
        let (mut size, mut mtime) = (0u64, 0 as TimeT);
        // SAFETY: live ioctx, NUL-terminated oid, valid out-pointers.
        self.check(unsafe { (self.api.rados_stat)(self.h.as_ptr(), oid.as_ptr(), &mut size, &mut mtime) })?;
        Ok((size, mtime))
    }

    /// `rados_remove`.
    pub fn remove_object(&self, oid: &CStr) -> Result<(), Errno> {
        // SAFETY: live ioctx, NUL-terminated oid.
        self.check(unsafe { (self.api.rados_remove)(self.h.as_ptr(), oid.as_ptr()) }).map(drop)
    }

    /// Lists the names of the objects of the ioctx's namespace, calling
    /// `f(name)` for each until it returns false.
    pub fn list_objects(&self, mut f: impl FnMut(String) -> bool) -> Result<(), Errno> {
        let mut h: ListCtxT = ptr::null_mut();
        // SAFETY: live ioctx, valid out-pointer.
        self.check(unsafe { (self.api.rados_nobjects_list_open)(self.h.as_ptr(), &mut h) })?;
        let list = ListCtx {
            api: self.api,
            h: NonNull::new(h).ok_or(Errno(EIO))?,
        };
        loop {
            let mut entry: *const c_char = ptr::null();
            // SAFETY: live list context; key and namespace may be null (not wanted).
            let r = unsafe {
                (self.api.rados_nobjects_list_next)(list.h.as_ptr(), &mut entry, ptr::null_mut(), ptr::null_mut())
            };
            if r == -ENOENT {
                return Ok(());
            }
            self.check(r)?;
            // SAFETY: entry is a NUL-terminated string owned by the list
            // context, valid until the next call; copied here.
            let name = unsafe { string_from(entry) };
            if !f(name) {
                return Ok(());
            }
        }
    }
}

/// One holder of an advisory lock on an object (`rados_list_lockers`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Locker {
    /// `client.<global id>`
    pub client: String,
    pub cookie: String,
    /// The client's address.
    pub addr: String,
}

/// Advisory locks (cls_lock) and the metadata touch of store objects.
impl IoCtx {
    /// Sets xattr `name` of an existing object in one write operation
    /// (ENOENT when it does not exist): the OSD stamps the object's mtime.
    pub fn touch_object(&self, oid: &CStr, name: &CStr, value: &[u8]) -> Result<(), Errno> {
        // SAFETY: no arguments.
        let h = unsafe { (self.api.rados_create_write_op)() };
        let op = WriteOp {
            api: self.api,
            h: NonNull::new(h).ok_or(Errno(EIO))?,
        };
        // SAFETY: live op; name NUL-terminated, value borrowed until operate returns.
        unsafe {
            (self.api.rados_write_op_assert_exists)(op.h.as_ptr());
            (self.api.rados_write_op_setxattr)(op.h.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len());
        }
        // SAFETY: live op and ioctx, NUL-terminated oid, null mtime (now).
        self.check(unsafe {
            (self.api.rados_write_op_operate)(op.h.as_ptr(), self.h.as_ptr(), oid.as_ptr(), ptr::null_mut(), 0)
        })
        .map(drop)
    }

    /// `rados_lock_exclusive` / `rados_lock_shared` (tag "") of lock `name`
    /// on `oid` for `duration_ms` (the OSD's clock expires it), or with
    /// `renew` extends one this (client, cookie) holds (ENOENT when it was
    /// lost). EBUSY when someone else holds it.
    pub fn lock(
        &self,
        oid: &CStr,
        name: &CStr,
        cookie: &CStr,
        desc: &CStr,
        exclusive: bool,
        duration_ms: u64,
        renew: bool,
    ) -> Result<(), Errno> {
        let mut tv = TimeVal {
            tv_sec: (duration_ms / 1000) as i64,
            tv_usec: ((duration_ms % 1000) * 1000) as i64,
        };
        let flags = if renew { LIBRADOS_LOCK_FLAG_MUST_RENEW } else { 0 };
        // SAFETY: live ioctx, NUL-terminated strings, tv valid for the call.
        let r = unsafe {
            if exclusive {
                (self.api.rados_lock_exclusive)(
                    self.h.as_ptr(),
                    oid.as_ptr(),
                    name.as_ptr(),
                    cookie.as_ptr(),
                    desc.as_ptr(),
                    &mut tv,
                    flags,
                )
            } else {
                (self.api.rados_lock_shared)(
                    self.h.as_ptr(),
                    oid.as_ptr(),
                    name.as_ptr(),
                    cookie.as_ptr(),
                    c"".as_ptr(),
                    desc.as_ptr(),
                    &mut tv,
                    flags,
                )
            }
        };
        self.check(r).map(drop)
    }

    /// `rados_unlock`: ENOENT when this (client, cookie) does not hold it.
    pub fn unlock(&self, oid: &CStr, name: &CStr, cookie: &CStr) -> Result<(), Errno> {
        // SAFETY: live ioctx, NUL-terminated strings.
        self.check(unsafe { (self.api.rados_unlock)(self.h.as_ptr(), oid.as_ptr(), name.as_ptr(), cookie.as_ptr()) })
            .map(drop)
    }

    /// `rados_list_lockers`: whether the lock is exclusive, and its holders
    /// (expired holders are not listed once the OSD has dropped them).
    pub fn lockers(&self, oid: &CStr, name: &CStr) -> Result<(bool, Vec<Locker>), Errno> {
        let mut cap = 1024usize;
        loop {
            let (mut tag, mut clients, mut cookies, mut addrs) =
                (vec![0u8; cap], vec![0u8; cap], vec![0u8; cap], vec![0u8; cap]);
            let (mut tl, mut cl, mut kl, mut al) = (cap, cap, cap, cap);
            let mut exclusive: c_int = 0;
            // SAFETY: live ioctx, NUL-terminated strings, each buffer
            // writable for the length passed with it.
            let r = unsafe {
                (self.api.rados_list_lockers)(
                    self.h.as_ptr(),
                    oid.as_ptr(),
                    name.as_ptr(),
                    &mut exclusive,
                    tag.as_mut_ptr().cast(),
                    &mut tl,
                    clients.as_mut_ptr().cast(),
                    &mut cl,
                    cookies.as_mut_ptr().cast(),
                    &mut kl,
                    addrs.as_mut_ptr().cast(),
                    &mut al,
                )
            };
            if r == -(ERANGE as isize) && cap < (1 << 24) {
                cap = cap.max(tl).max(cl).max(kl).max(al).max(cap * 2);
                continue;
            }
            if r == -(ENOENT as isize) {
                return Ok((false, Vec::new()));
            }
            let n = check_size(r).map_err(|e| self._rados.note(e))?;
            let split = |b: &[u8], len: usize| -> Vec<String> {
                b[..len.min(b.len())]
                    .split(|c| *c == 0)
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect()
            };
            let (c, k, a) = (split(&clients, cl), split(&cookies, kl), split(&addrs, al));
            let lockers = (0..n)
                .map(|i| Locker {
                    client: c.get(i).cloned().unwrap_or_default(),
                    cookie: k.get(i).cloned().unwrap_or_default(),
                    addr: a.get(i).cloned().unwrap_or_default(),
                })
                .collect();
            return Ok((exclusive != 0, lockers));
        }
    }
}

// ---------------------------------------------------------------------------
// Images

/// An open `rbd_image_t`, closed on drop; keeps its IoCtx alive.
pub struct Image {
    api: &'static Api,
    h: NonNull<c_void>,
    _ioctx: Arc<IoCtx>,
}

// SAFETY: librbd image handles are internally locked: reads, writes,
// discards, flushes, stat, snapshot create/remove/list and diff iteration may
// run concurrently from several threads on one handle. The only call that is
// not safe concurrently, rbd_close, needs `&mut self` (Drop).
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl Drop for Image {
    fn drop(&mut self) {
        if self._ioctx._rados.has_timed_out() {
            // rbd_close would wait for the unresponsive cluster (releasing
            // the exclusive lock, unwatching the header: each op another
            // `rados_osd_op_timeout`). Close on a thread of its own, which
            // keeps the ioctx and connection alive until it is done.
            let closing = Closing {
                api: self.api,
                h: self.h,
                _ioctx: Arc::clone(&self._ioctx),
            };
            // When no thread can be started, the closure is dropped unused
            // and `Closing::drop` closes the handle here instead.
            let _ = std::thread::Builder::new()
                .name("rbd-close".into())
                .spawn(move || drop(closing));
            return;
        }
        // SAFETY: h came from rbd_open*, is closed exactly once, no borrow of
        // self is left; the IoCtx is still alive (held by self._ioctx).
        let r = unsafe { (self.api.rbd_close)(self.h.as_ptr()) };
        if r < 0 {
            tracing::warn!(errno = -r, "rbd_close failed");
        }
    }
}

/// An image handle being closed after a timeout (see `Drop for Image`).
struct Closing {
    api: &'static Api,
    h: NonNull<c_void>,
    _ioctx: Arc<IoCtx>,
}

// SAFETY: the handle is no longer used by anyone but this value (its Image
// was dropped), and librbd handles may be closed from any thread.
unsafe impl Send for Closing {}

impl Drop for Closing {
    fn drop(&mut self) {
        // SAFETY: h came from rbd_open*; the Image it came from did not
        // close it and is gone, so this is the only close; the IoCtx is
        // alive (held by self._ioctx).
        let r = unsafe { (self.api.rbd_close)(self.h.as_ptr()) };
        if r < 0 {
            tracing::debug!(errno = -r, "rbd_close after a timeout failed");
        }
    }
}

/// What [`Image::stat`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub size: u64,
    pub obj_size: u64,
    pub num_objs: u64,
    pub order: i32,
}

/// A snapshot as `rbd_snap_list` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snap {
    pub id: u64,
    pub name: String,
    pub size: u64,
}

/// The state the diff trampoline shares with `Image::diff_iterate`.
struct DiffState<F> {
    cb: F,
    /// The callback returned false.
    stopped: bool,
    /// The callback panicked; re-raised on the calling thread.
    panic: Option<Box<dyn Any + Send>>,
}

/// Returned to librbd to stop the iteration (librbd stops on a negative value).
const DIFF_ABORT: c_int = -ECANCELED;

/// The `extern "C"` callback handed to `rbd_diff_iterate2`. It never
/// unwinds: a panic of the Rust callback is caught, stored, and the
/// iteration aborted. Calls are serialised by the mutex, so even a librbd
/// that called back from several threads could not run `F` concurrently.
extern "C" fn diff_trampoline<F>(off: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int
where
    F: FnMut(u64, u64, bool) -> bool + Send,
{
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: arg is the `&Mutex<DiffState<F>>` that `Image::diff_iterate`
        // passed to rbd_diff_iterate2; it lives on that call's stack until
        // rbd_diff_iterate2 returns, and librbd only calls back before that.
        let state = unsafe { &*(arg as *const Mutex<DiffState<F>>) };
        let Ok(mut guard) = state.lock() else {
            return DIFF_ABORT;
        };
        let st = &mut *guard;
        if st.stopped || st.panic.is_some() {
            return DIFF_ABORT;
        }
        match catch_unwind(AssertUnwindSafe(|| (st.cb)(off, len as u64, exists != 0))) {
            Ok(true) => 0,
            Ok(false) => {
                st.stopped = true;
                DIFF_ABORT
            }
            Err(payload) => {
                st.panic = Some(payload);
                DIFF_ABORT
            }
        }
    }));
    outcome.unwrap_or(DIFF_ABORT)
}

impl Image {
    fn check(&self, r: c_int) -> Result<c_int, Errno> {
        check(r).map_err(|e| self._ioctx._rados.note(e))
    }

    fn check_size(&self, r: isize) -> Result<usize, Errno> {
        check_size(r).map_err(|e| self._ioctx._rados.note(e))
    }

    /// `rbd_stat`.
    pub fn stat(&self) -> Result<Stat, Errno> {
        let mut info = RbdImageInfo {
            size: 0,
            obj_size: 0,
            num_objs: 0,
            order: 0,
            block_name_prefix: [0; 24],
            parent_pool: 0,
            parent_name: [0; 96],
        };
        // SAFETY: open image, info is a correctly laid out rbd_image_info_t of the given size.
        self.check(unsafe {
            (self.api.rbd_stat)(
                self.h.as_ptr(),
                &mut info,
                std::mem::size_of::<RbdImageInfo>(),
            )
        })?;
        Ok(Stat {
            size: info.size,
            obj_size: info.obj_size,
            num_objs: info.num_objs,
            order: info.order,
        })
    }

    fn get_u64(&self, f: unsafe extern "C" fn(ImageT, *mut u64) -> c_int) -> Result<u64, Errno> {
        let mut v = 0u64;
        // SAFETY: f is one of rbd_get_size/features/flags: open image, valid out-pointer.
        self.check(unsafe { f(self.h.as_ptr(), &mut v) })?;
        Ok(v)
    }

    /// `rbd_get_size`: the size of the open snapshot, or of the head.
    pub fn size(&self) -> Result<u64, Errno> {
        self.get_u64(self.api.rbd_get_size)
    }

    /// `rbd_get_features`.
    pub fn features(&self) -> Result<u64, Errno> {
        self.get_u64(self.api.rbd_get_features)
    }

    /// `rbd_get_parent`: the parent snapshot of a clone, `None` for an
    /// image that is not one (ENOENT).
    pub fn parent(&self) -> Result<Option<ParentSpec>, Errno> {
        let mut img = RbdLinkedImageSpec {
            pool_id: 0,
            pool_name: std::ptr::null_mut(),
            pool_namespace: std::ptr::null_mut(),
            image_id: std::ptr::null_mut(),
            image_name: std::ptr::null_mut(),
            trash: false,
        };
        let mut snap = RbdSnapSpec { id: 0, namespace_type: 0, name: std::ptr::null_mut() };
        // SAFETY: open image; both out-structs are correctly laid out and
        // librbd fills their strings (freed below by the cleanup calls).
        let r = unsafe { (self.api.rbd_get_parent)(self.h.as_ptr(), &mut img, &mut snap) };
        if r == -ENOENT {
            return Ok(None);
        }
        self.check(r)?;
        let text = |p: *mut c_char| if p.is_null() { String::new() } else {
            // SAFETY: a NUL-terminated string librbd allocated.
            unsafe { string_from(p) }
        };
        let out = ParentSpec {
            pool: text(img.pool_name),
            namespace: text(img.pool_namespace),
            image: text(img.image_name),
            snap: text(snap.name),
            snap_id: snap.id,
            trash: img.trash,
        };
        // SAFETY: each filled struct is cleaned up once.
        unsafe {
            (self.api.rbd_linked_image_spec_cleanup)(&mut img);
            (self.api.rbd_snap_spec_cleanup)(&mut snap);
        }
        Ok(Some(out))
    }

    /// `rbd_get_overlap`: bytes of a clone that read through to its parent.
    pub fn overlap(&self) -> Result<u64, Errno> {
        self.get_u64(self.api.rbd_get_overlap)
    }

    /// `rbd_get_flags` (for the open snapshot or head).
    pub fn flags(&self) -> Result<u64, Errno> {
        self.get_u64(self.api.rbd_get_flags)
    }

    /// `rbd_get_id`: the image's internal id (stable across renames).
    pub fn id(&self) -> Result<String, Errno> {
        let mut len = 64;
        loop {
            let mut buf = vec![0 as c_char; len];
            // SAFETY: open image, buf writable for len bytes.
            let r = unsafe { (self.api.rbd_get_id)(self.h.as_ptr(), buf.as_mut_ptr(), len) };
            if r == -ERANGE && len < 1 << 16 {
                len *= 4;
                continue;
            }
            self.check(r)?;
            buf[len - 1] = 0;
            // SAFETY: NUL-terminated buffer.
            return Ok(unsafe { string_from(buf.as_ptr()) });
        }
    }

    /// `rbd_snap_list`: all snapshots, oldest first.
    pub fn snaps(&self) -> Result<Vec<Snap>, Errno> {
        let mut cap: c_int = 16;
        loop {
            let mut infos: Vec<RbdSnapInfo> = Vec::with_capacity(cap as usize);
            let mut max = cap;
            // SAFETY: infos has room for `max` entries; librbd writes at most that many.
            let r =
                unsafe { (self.api.rbd_snap_list)(self.h.as_ptr(), infos.as_mut_ptr(), &mut max) };
            if r == -ERANGE && max > cap {
                cap = max + 8; // snapshots may be created meanwhile
                continue;
            }
            let n = self.check(r)? as usize;
            if n >= cap as usize {
                return Err(Errno(EIO)); // no room for the terminator: cannot happen
            }
            // SAFETY: librbd zeroed all `cap` entries and filled the first n
            // plus a terminator (name NULL).
            unsafe { infos.set_len(n + 1) };
            let snaps = infos[..n]
                .iter()
                // SAFETY: names are NUL-terminated strings owned by librbd.
                .map(|s| Snap {
                    id: s.id,
                    size: s.size,
                    name: unsafe { string_from(s.name) },
                })
                .collect();
            // SAFETY: frees the names of this list (up to the terminator), once.
            unsafe { (self.api.rbd_snap_list_end)(infos.as_mut_ptr()) };
            return Ok(snaps);
        }
    }

    /// `rbd_snap_create`.
    pub fn snap_create(&self, name: &CStr) -> Result<(), Errno> {
        // SAFETY: open image, NUL-terminated name.
        self.check(unsafe { (self.api.rbd_snap_create)(self.h.as_ptr(), name.as_ptr()) }).map(drop)
    }

    /// `rbd_snap_remove`.
    pub fn snap_remove(&self, name: &CStr) -> Result<(), Errno> {
        // SAFETY: open image, NUL-terminated name.
        self.check(unsafe { (self.api.rbd_snap_remove)(self.h.as_ptr(), name.as_ptr()) }).map(drop)
    }

    /// `rbd_diff_iterate2`. `cb(offset, len, exists)` returns whether to go
    /// on; returning false ends the iteration early with `Ok`. A panic in
    /// `cb` aborts the iteration and is re-raised here.
    pub fn diff_iterate<F>(
        &self,
        from_snap: Option<&CStr>,
        offset: u64,
        len: u64,
        include_parent: bool,
        whole_object: bool,
        cb: F,
    ) -> Result<(), Errno>
    where
        F: FnMut(u64, u64, bool) -> bool + Send,
    {
        let state = Mutex::new(DiffState {
            cb,
            stopped: false,
            panic: None,
        });
        let arg = &state as *const Mutex<DiffState<F>> as *mut c_void;
        // SAFETY: open image; from_snap is null or NUL-terminated; the
        // trampoline matches librbd's callback type and `arg` points to
        // `state`, which outlives the call.
        let r = unsafe {
            (self.api.rbd_diff_iterate2)(
                self.h.as_ptr(),
                opt_ptr(from_snap),
                offset,
                len,
                u8::from(include_parent),
                u8::from(whole_object),
                diff_trampoline::<F>,
                arg,
            )
        };
        let st = state
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(payload) = st.panic {
            resume_unwind(payload);
        }
        if st.stopped {
            return Ok(());
        }
        self.check(r).map(drop)
    }

    /// One `rbd_read2` call of at most 1 GiB: the number of bytes read
    /// (fewer than asked at the end of the image).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<usize, Errno> {
        let len = buf.len().min(MAX_IO);
        // SAFETY: open image; buf is writable for len bytes.
        self.check_size(unsafe {
            (self.api.rbd_read2)(self.h.as_ptr(), offset, len, buf.as_mut_ptr().cast(), 0)
        })
    }

    /// One `rbd_write2` call of at most 1 GiB: the number of bytes written.
    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<usize, Errno> {
        let len = buf.len().min(MAX_IO);
        // SAFETY: open image; buf is readable for len bytes and librbd copies
        // it before returning (synchronous call).
        self.check_size(unsafe {
            (self.api.rbd_write2)(self.h.as_ptr(), offset, len, buf.as_ptr().cast(), 0)
        })
    }

    /// One `rbd_discard` call; `len` must be at most [`MAX_DISCARD`]
    /// (librbd refuses more than `INT_MAX`).
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), Errno> {
        if len > MAX_DISCARD {
            return Err(Errno(EINVAL));
        }
        // SAFETY: open image.
        self.check(unsafe { (self.api.rbd_discard)(self.h.as_ptr(), offset, len) }).map(drop)
    }

    /// `rbd_resize`.
    pub fn resize(&self, size: u64) -> Result<(), Errno> {
        // SAFETY: open image.
        self.check(unsafe { (self.api.rbd_resize)(self.h.as_ptr(), size) }).map(drop)
    }

    /// `rbd_lock_get_owners`: the clients holding the image's exclusive
    /// lock (`client.<id>`), empty when nobody holds it.
    pub fn lock_owners(&self) -> Result<Vec<String>, Errno> {
        let mut cap: usize = 4;
        loop {
            let mut owners: Vec<*mut c_char> = vec![ptr::null_mut(); cap];
            let mut n = cap;
            let mut mode: c_int = 0;
            // SAFETY: open image; owners has room for n pointers, which
            // librbd fills with strdup'ed strings.
            let r = unsafe {
                (self.api.rbd_lock_get_owners)(self.h.as_ptr(), &mut mode, owners.as_mut_ptr(), &mut n)
            };
            if r == -ENOENT {
                return Ok(Vec::new());
            }
            if r == -ERANGE && n > cap {
                cap = n + 2;
                continue;
            }
            self.check(r)?;
            let n = n.min(cap);
            // SAFETY: librbd filled the first n entries with NUL-terminated strings.
            let names = owners[..n].iter().map(|&p| unsafe { string_from(p) }).collect();
            // SAFETY: frees exactly the n strings librbd allocated, once.
            unsafe { (self.api.rbd_lock_get_owners_cleanup)(owners.as_mut_ptr(), n) };
            return Ok(names);
        }
    }

    /// `rbd_lock_break(RBD_LOCK_MODE_EXCLUSIVE, owner)`: librbd blocklists
    /// the owner first (`rbd_blocklist_on_break_lock`, on by default), so it
    /// cannot write to the image afterwards even if it is still alive.
    pub fn lock_break(&self, owner: &CStr) -> Result<(), Errno> {
        // SAFETY: open image, NUL-terminated owner.
        self.check(unsafe { (self.api.rbd_lock_break)(self.h.as_ptr(), RBD_LOCK_MODE_EXCLUSIVE, owner.as_ptr()) })
            .map(drop)
    }

    /// `rbd_flatten`: copies the parent's data into this clone and
    /// detaches it from the parent snapshot.
    pub fn flatten(&self) -> Result<(), Errno> {
        // SAFETY: open image.
        self.check(unsafe { (self.api.rbd_flatten)(self.h.as_ptr()) }).map(drop)
    }

    /// `rbd_flush`.
    pub fn flush(&self) -> Result<(), Errno> {
        // SAFETY: open image.
        self.check(unsafe { (self.api.rbd_flush)(self.h.as_ptr()) }).map(drop)
    }
}
