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

