//! RADOS object operations on an [`IoCtx`]: what a store backend on a
//! RADOS pool needs (put, put-if-absent, get, stat, remove, list).

use crate::{c_string, ffi, IoCtx, Op, RbdError, Result};

pub use ffi::Locker;

/// What [`IoCtx::stat_object`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectStat {
    /// Bytes.
    pub size: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
}

impl IoCtx {
    fn object_spec(&self, oid: &str) -> String {
        format!("{}/{oid}", self.prefix)
    }

    fn oid(&self, op: Op, oid: &str) -> Result<(String, std::ffi::CString)> {
        let spec = self.object_spec(oid);
        let c = c_string(op, &spec, "object name", oid)?;
        Ok((spec, c))
    }

    fn too_large(op: Op, spec: String, len: usize) -> RbdError {
        RbdError::invalid(
            op,
            spec,
            format!("{len} bytes is more than one librados call takes ({} bytes)", ffi::MAX_OBJECT_IO),
        )
    }

    /// Writes `data` as the whole content of object `oid`, creating or
    /// replacing it.
    pub fn write_full(&self, oid: &str, data: &[u8]) -> Result<()> {
        let (spec, c) = self.oid(Op::WriteObject, oid)?;
        if data.len() > ffi::MAX_OBJECT_IO {
            return Err(Self::too_large(Op::WriteObject, spec, data.len()));
        }
        self.raw.write_full(&c, data).map_err(|e| RbdError::errno(Op::WriteObject, spec, e))
    }

    /// Creates object `oid` with content `data` unless it exists, in one
    /// atomic OSD operation: `Ok(true)` when this call created it,
    /// `Ok(false)` when it existed (and was left alone). Nobody ever sees
    /// the object partly written.
    pub fn create_exclusive(&self, oid: &str, data: &[u8]) -> Result<bool> {
        let (spec, c) = self.oid(Op::CreateObject, oid)?;
        if data.len() > ffi::MAX_OBJECT_IO {
            return Err(Self::too_large(Op::CreateObject, spec, data.len()));
        }
        match self.raw.create_exclusive(&c, data) {
            Ok(()) => Ok(true),
            Err(e) if e.0 == ffi::EEXIST => Ok(false),
            Err(e) => Err(RbdError::errno(Op::CreateObject, spec, e)),
        }
    }

    /// Size and modification time of object `oid` (ENOENT: [`RbdError::is_not_found`]).
    pub fn stat_object(&self, oid: &str) -> Result<ObjectStat> {
        let (spec, c) = self.oid(Op::StatObject, oid)?;
        let (size, mtime) = self.raw.stat_object(&c).map_err(|e| RbdError::errno(Op::StatObject, spec, e))?;
        Ok(ObjectStat { size, mtime })
    }

    /// Reads `buf.len()` bytes of object `oid` from `offset`; returns how
    /// many there were (fewer at the object's end).
    pub fn read_object_at(&self, oid: &str, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let (spec, c) = self.oid(Op::ReadObject, oid)?;
        let mut done = 0;
        while done < buf.len() {
            let n = self
                .raw
                .read_object(&c, offset + done as u64, &mut buf[done..])
                .map_err(|e| RbdError::errno(Op::ReadObject, format!("{spec} at {offset}+{}", buf.len()), e))?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }

    /// One read of up to `buf.len()` bytes of object `oid` at `offset`
    /// (one round trip): how many there were, fewer at the object's end.
    pub fn read_object_once(&self, oid: &str, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let (spec, c) = self.oid(Op::ReadObject, oid)?;
        self.raw
            .read_object(&c, offset, buf)
            .map_err(|e| RbdError::errno(Op::ReadObject, format!("{spec} at {offset}+{}", buf.len()), e))
    }

    /// The whole content of object `oid`. `limit` bounds the size accepted
    /// (a larger object is an error, checked before allocating).
    pub fn read_object(&self, oid: &str, limit: u64) -> Result<Vec<u8>> {
        let st = self.stat_object(oid)?;
        if st.size > limit || st.size > ffi::MAX_OBJECT_IO as u64 {
            return Err(RbdError::invalid(
                Op::ReadObject,
                self.object_spec(oid),
                format!("the object has {} bytes, more than the {limit} allowed", st.size),
            ));
        }
        let mut buf = vec![0u8; st.size as usize];
        let n = self.read_object_at(oid, 0, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Removes object `oid` (ENOENT: [`RbdError::is_not_found`]).
    pub fn remove_object(&self, oid: &str) -> Result<()> {
        let (spec, c) = self.oid(Op::RemoveObject, oid)?;
        self.raw.remove_object(&c).map_err(|e| RbdError::errno(Op::RemoveObject, spec, e))
    }

    /// The names of the objects in the pool (and namespace), unsorted.
    pub fn list_objects(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        self.raw
            .list_objects(|name| {
                out.push(name);
                true
            })
            .map_err(|e| RbdError::errno(Op::ListObjects, self.prefix.clone(), e))?;
        Ok(out)
    }

    /// Stamps object `oid`'s modification time with the OSD's now (a
    /// one-byte xattr write); ENOENT when it does not exist.
    pub fn touch_object(&self, oid: &str) -> Result<()> {
        let (spec, c) = self.oid(Op::TouchObject, oid)?;
        self.raw
            .touch_object(&c, c"blockvault.touched", b"1")
            .map_err(|e| RbdError::errno(Op::TouchObject, spec, e))
    }

    /// Takes (or with `renew` extends) the advisory lock `name` on object
    /// `oid` for `duration` (expired by the OSD's clock, so clock skew
    /// between clients does not matter), shared or exclusive, as
    /// (this client, `cookie`). `Ok(false)` when someone else holds it
    /// (EBUSY, or EEXIST for this very cookie). A renew of a lock no longer
    /// held is an error (ENOENT: it expired or was broken).
    pub fn lock(
        &self,
        oid: &str,
        name: &str,
        cookie: &str,
        exclusive: bool,
        duration: std::time::Duration,
        renew: bool,
    ) -> Result<bool> {
        let (spec, c) = self.oid(Op::Lock, oid)?;
        let n = c_string(Op::Lock, &spec, "lock name", name)?;
        let k = c_string(Op::Lock, &spec, "lock cookie", cookie)?;
        let ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX).max(1);
        match self.raw.lock(&c, &n, &k, c"blockvault", exclusive, ms, renew) {
            Ok(()) => Ok(true),
            Err(e) if !renew && (e.0 == ffi::EBUSY || e.0 == ffi::EEXIST) => Ok(false),
            Err(e) => Err(RbdError::errno(Op::Lock, format!("{spec} lock {name}"), e)),
        }
    }

    /// Releases lock `name` held as (this client, `cookie`); a lock no
    /// longer held (expired) is not an error.
    pub fn unlock(&self, oid: &str, name: &str, cookie: &str) -> Result<()> {
        let (spec, c) = self.oid(Op::Unlock, oid)?;
        let n = c_string(Op::Unlock, &spec, "lock name", name)?;
        let k = c_string(Op::Unlock, &spec, "lock cookie", cookie)?;
        match self.raw.unlock(&c, &n, &k) {
            Ok(()) => Ok(()),
            Err(e) if e.0 == ffi::ENOENT => Ok(()),
            Err(e) => Err(RbdError::errno(Op::Unlock, format!("{spec} lock {name}"), e)),
        }
    }

    /// The holders of lock `name` on `oid`, and whether it is exclusive.
    pub fn lockers(&self, oid: &str, name: &str) -> Result<(bool, Vec<Locker>)> {
        let (spec, c) = self.oid(Op::ListLockers, oid)?;
        let n = c_string(Op::ListLockers, &spec, "lock name", name)?;
        self.raw.lockers(&c, &n).map_err(|e| RbdError::errno(Op::ListLockers, format!("{spec} lock {name}"), e))
    }
}
