//! Restoring a backup to an RBD image (`rbd:POOL[/NS]/IMAGE`).

use std::io;

use anyhow::{bail, Context, Result};
use blockvault_store::{Manifest, RbdInfo};

use super::{restore_map, RestoreOptions, RestoreTarget};
use crate::context::Ctx;
use crate::pipeline::Progress;
use crate::rbd::{self, Image};
use crate::source::rbd::{connect, open_pool};

struct RbdTarget {
    image: Image,
    fresh: bool,
    object_size: u64,
}

impl RestoreTarget for RbdTarget {
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.image.write_at(offset, data).map_err(io::Error::other)
    }
    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.fresh || len == 0 {
            return Ok(());
        }
        // A discard of whole objects removes them (reads as zeros); a partial
        // discard may be skipped by librbd (rbd_skip_partial_discard), so
        // partial ranges are written as zeros.
        let os = self.object_size;
        let (start, end) = (offset, offset + len);
        let a = start.div_ceil(os) * os;
        let b = end / os * os;
        if a < b {
            self.image.discard(a, b - a).map_err(io::Error::other)?;
            self.write_zeros(start, a - start)?;
            self.write_zeros(b, end - b)
        } else {
            self.write_zeros(start, len)
        }
    }
}

impl RbdTarget {
    fn write_zeros(&self, off: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let z = vec![0u8; len.min(4 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(z.len() as u64) as usize;
            self.image.write_at(off + done, &z[..n]).map_err(io::Error::other)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// Restores a backup to `rbd:POOL[/NS]/IMAGE`: creates the image (size,
/// features and object size from the backup) and writes only its non-zero
/// blocks; an existing image is refused unless `force`, and then blocks that
/// are zero in the backup are discarded or zeroed.
///
/// # Errors
/// Cluster, store or chunk errors, naming the object.
pub fn restore(
    ctx: &Ctx,
    m: &Manifest,
    (pool, ns, name): (&str, Option<&str>, &str),
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<()> {
    let force = opts.force;
    let to = match ns {
        Some(ns) => format!("rbd:{pool}/{ns}/{name}"),
        None => format!("rbd:{pool}/{name}"),
    };
    let map = ctx.store.read_blockmap(m)?;
    let cluster = connect(&ctx.cfg)?;
    let ioctx = open_pool(&cluster, pool, ns)?;
    let exists = ioctx.list_images()?.iter().any(|n| n == name);
    let info = m.rbd.clone().unwrap_or(RbdInfo { features: rbd::FEATURES_DEFAULT, object_size: 4 << 20 });
    if exists && !force {
        bail!("RBD image {to} already exists (use --force to overwrite it)");
    }
    if !exists {
        let order = info.object_size.trailing_zeros() as u8;
        ioctx
            .create_image(name, m.image_size, Some(order), info.features)
            .with_context(|| format!("creating RBD image {to}"))?;
    }
    let image = ioctx.open_rw(name).with_context(|| format!("opening RBD image {to}"))?;
    if exists && image.size()? != m.image_size {
        image.resize(m.image_size).with_context(|| format!("resizing {to}"))?;
    }
    let object_size = image.object_size()?;
    let target = RbdTarget { image, fresh: !exists, object_size };
    restore_map(&ctx.store, m, &map, &target, opts, progress)
        .with_context(|| format!("restoring backup {} of image '{}' to {to}", m.id, m.image))?;
    target.image.flush().with_context(|| format!("flushing {to}"))?;
    Ok(())
}


/// How a `restore --clone` went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloneOutcome {
    /// The image is a clone of the backup's snapshot (flattened if asked).
    Cloned { parent: String },
    /// No clone was made: the backup's snapshot is not on the cluster (or
    /// never was), for this reason. Nothing was created.
    NoSnapshot(String),
}

/// Restores `m` to `rbd:POOL[/NS]/IMAGE` as a format-2 clone of the backup's
/// RBD snapshot, when that snapshot is still on the cluster: ready at
/// once, whatever the size; reads fall through to the snapshot until
/// `flatten` copies the data in (then the clone no longer needs it).
///
/// The snapshot is recognised by the source image and name in the
/// manifest, and must have the backup's size.
///
/// # Errors
/// An existing target image (a clone is always a new image); cluster errors.
pub fn restore_clone(ctx: &Ctx, m: &Manifest, (pool, ns, name): (&str, Option<&str>, &str), flatten: bool) -> Result<CloneOutcome> {
    let to = match ns {
        Some(ns) => format!("rbd:{pool}/{ns}/{name}"),
        None => format!("rbd:{pool}/{name}"),
    };
    let Ok(crate::config::Source::Rbd { pool: spool, namespace: sns, image: simg, .. }) = crate::config::Source::parse(&m.source) else {
        return Ok(CloneOutcome::NoSnapshot(format!(
            "backup {} is of {}, not of an RBD image: there is no snapshot to clone",
            m.id, m.source
        )));
    };
    let Some(snap) = &m.snapshot else {
        return Ok(CloneOutcome::NoSnapshot(format!("backup {} records no RBD snapshot", m.id)));
    };
    let parent = match &sns {
        Some(ns) => format!("{spool}/{ns}/{simg}@{snap}"),
        None => format!("{spool}/{simg}@{snap}"),
    };
    let cluster = connect(&ctx.cfg)?;
    let gone = |why: &str| {
        CloneOutcome::NoSnapshot(format!(
            "the snapshot {parent} of backup {} {why} (blockvault keeps only the newest `keep-snapshots` \
             snapshots of an image; `blockvault snapshots` lists them)",
            m.id
        ))
    };
    let pioctx = match cluster.ioctx(&spool, sns.as_deref()) {
        Ok(i) => i,
        Err(e) if e.is_not_found() => return Ok(gone("is gone: its pool does not exist")),
        Err(e) => return Err(e).with_context(|| format!("opening the pool of {parent}")),
    };
    let pimage = match pioctx.open(&simg, Some(snap)) {
        Ok(i) => i,
        Err(e) if e.is_not_found() => return Ok(gone("is gone from the cluster")),
        Err(e) => return Err(e).with_context(|| format!("opening {parent}")),
    };
    let psize = pimage.size()?;
    if psize != m.image_size {
        return Ok(gone(&format!("on the cluster has {psize} bytes where the backup has {}: not the same snapshot", m.image_size)));
    }
    let features = pimage.features()?;
    let order = pimage.object_size()?.trailing_zeros() as u8;
    drop(pimage);
    let ioctx = open_pool(&cluster, pool, ns)?;
    if ioctx.list_images()?.iter().any(|n| n == name) {
        bail!("RBD image {to} already exists: --clone makes a new image (remove it first, or restore without --clone)");
    }
    ioctx
        .clone_image(&pioctx, &simg, snap, name, Some(order), features)
        .with_context(|| format!("cloning {parent} to {to}"))?;
    if flatten {
        let image = ioctx.open_rw(name).with_context(|| format!("opening {to}"))?;
        image.flatten().with_context(|| format!("flattening {to} (the clone exists, still with its parent)"))?;
    }
    Ok(CloneOutcome::Cloned { parent })
}
