//! `blockvault stats`: what the store holds and what each image costs.
//!
//! Computed from the store (every committed backup's block map, and the
//! chunk listing with each chunk's stored size), with the backups' images
//! and times from the catalog. Under the shared store lock, so gc does not
//! sweep while the chunks are counted.
//!
//! Definitions (per store, and per image over that image's backups):
//! * logical bytes: the bytes of every non-hole block of every backup (what
//!   restoring them all would write, holes and all-zero blocks left out);
//! * referenced chunks: distinct chunks the backups use, with their
//!   plaintext bytes and stored bytes (compressed, maybe sealed, with headers);
//! * dedup ratio = logical / referenced plaintext; compression ratio =
//!   referenced plaintext / referenced stored;
//! * index chunks: the chunks an indexed (format 2 or 3) block map keeps its
//!   entries in; referenced, stored, but no image data, so they are counted
//!   apart and left out of the ratios and of the per-image figures;
//! * per image, `unique` is the stored bytes of chunks no other image's
//!   backups use (what forgetting every backup of the image and a gc would
//!   free), `shared` the stored bytes of its chunks other images use too.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::Result;
use blockvault_store::ChunkId;
use serde::Serialize;
use tracing::warn;

use crate::context::Ctx;

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ImageStats {
    pub image: String,
    pub backups: u64,
    /// Size of the image in its newest backup.
    pub size: u64,
    pub logical_bytes: u64,
    pub chunks: u64,
    pub plain_bytes: u64,
    pub stored_bytes: u64,
    pub unique_stored_bytes: u64,
    pub shared_stored_bytes: u64,
    pub dedup_ratio: f64,
    pub compression_ratio: f64,
    pub oldest: Option<String>,
    pub newest: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct StoreStats {
    pub store: String,
    pub images: u64,
    pub backups: u64,
    /// Every chunk object in the store, referenced or not.
    pub chunks: u64,
    pub stored_bytes: u64,
    pub referenced_chunks: u64,
    pub referenced_plain_bytes: u64,
    pub referenced_stored_bytes: u64,
    /// Index chunks of the backups' block maps (in `chunks`, not in
    /// `referenced_chunks`), and their stored bytes.
    pub index_chunks: u64,
    pub index_stored_bytes: u64,
    /// Chunks no backup references (gc frees them after the grace period).
    pub unreferenced_chunks: u64,
    pub unreferenced_bytes: u64,
    /// Chunks backups reference that the store lacks (run `verify`).
    pub missing_chunks: u64,
    pub logical_bytes: u64,
    pub dedup_ratio: f64,
    pub compression_ratio: f64,
    /// Backups whose manifest or block map did not read (left out).
    pub unreadable_backups: Vec<u64>,
    pub oldest: Option<String>,
    pub newest: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    #[serde(flatten)]
    pub store: StoreStats,
    pub per_image: Vec<ImageStats>,
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Whether one image's backups use a chunk, or several images'.
#[derive(Clone, Copy)]
enum Users {
    One,
    Many,
}

/// Gathers the figures; `images` (empty: all) selects the images listed
/// per image; the store's figures always cover every backup.
///
/// # Errors
/// Store or catalog errors (a backup that does not read is left out and named).
pub fn gather(ctx: &Ctx, images: &[String]) -> Result<Stats> {
    let _lock = ctx.store.lock_shared_for_reading()?;
    let rows = ctx.catalog.committed_backups(None)?;
    let mut by_image: BTreeMap<String, Vec<&blockvault_catalog::BackupRow>> = BTreeMap::new();
    for r in &rows {
        by_image.entry(r.image.clone()).or_default().push(r);
    }
    for n in images {
        if !by_image.contains_key(n) {
            crate::lookup::known_image(ctx, n)?;
        }
    }
    let stored: HashMap<ChunkId, u64> = ctx.store.list_chunks()?.into_iter().map(|(id, size, _)| (id, size)).collect();

    let mut st = StoreStats { store: ctx.store.root().display().to_string(), ..Default::default() };
    let mut users: HashMap<ChunkId, (u32, Users)> = HashMap::new();
    let mut per: Vec<ImageStats> = Vec::new();
    let mut own_sets: Vec<HashSet<ChunkId>> = Vec::new();
    let mut index: HashSet<ChunkId> = HashSet::new();
    for (name, rows) in &by_image {
        let mut is = ImageStats { image: name.clone(), ..Default::default() };
        let mut mine: HashSet<ChunkId> = HashSet::new();
        for r in rows {
            let map = match ctx.store.read_manifest(r.id).and_then(|m| ctx.store.read_blockmap(&m)) {
                Ok(map) => map,
                Err(e) => {
                    warn!(backup = r.id.0, error = %e, "stats: backup does not read; left out");
                    st.unreadable_backups.push(r.id.0);
                    continue;
                }
            };
            index.extend(map.index_chunks().iter().copied());
            is.backups += 1;
            is.size = r.image_size; // rows are in id order: the newest last
            is.oldest = is.oldest.clone().or_else(|| Some(r.created.clone()));
            is.newest = Some(r.created.clone());
            for (b, e) in map.entries().iter().enumerate() {
                let Some(id) = e else { continue };
                let len = map.block_range(b).1 as u32;
                is.logical_bytes += u64::from(len);
                if mine.insert(*id) {
                    users
                        .entry(*id)
                        .and_modify(|(_, u)| *u = Users::Many)
                        .or_insert((len, Users::One));
                }
            }
        }
        per.push(is);
        own_sets.push(mine);
    }
    for (is, mine) in per.iter_mut().zip(&own_sets) {
        for id in mine {
            let (len, u) = users[id];
            is.chunks += 1;
            is.plain_bytes += u64::from(len);
            let s = stored.get(id).copied().unwrap_or(0);
            is.stored_bytes += s;
            match u {
                Users::One => is.unique_stored_bytes += s,
                Users::Many => is.shared_stored_bytes += s,
            }
        }
        is.dedup_ratio = ratio(is.logical_bytes, is.plain_bytes);
        is.compression_ratio = ratio(is.plain_bytes, is.stored_bytes);
        st.logical_bytes += is.logical_bytes;
        st.backups += is.backups;
        if is.backups > 0 {
            st.images += 1;
        }
        if is.oldest.is_some() && (st.oldest.is_none() || is.oldest < st.oldest) {
            st.oldest = is.oldest.clone();
        }
        if is.newest > st.newest {
            st.newest = is.newest.clone();
        }
    }
    st.chunks = stored.len() as u64;
    st.stored_bytes = stored.values().sum();
    for (id, (len, _)) in &users {
        match stored.get(id) {
            Some(s) => {
                st.referenced_chunks += 1;
                st.referenced_plain_bytes += u64::from(*len);
                st.referenced_stored_bytes += s;
            }
            None => st.missing_chunks += 1,
        }
    }
    for id in &index {
        match stored.get(id) {
            Some(s) => {
                st.index_chunks += 1;
                st.index_stored_bytes += s;
            }
            None => st.missing_chunks += 1,
        }
    }
    for (id, s) in &stored {
        if !users.contains_key(id) && !index.contains(id) {
            st.unreferenced_chunks += 1;
            st.unreferenced_bytes += s;
        }
    }
    st.dedup_ratio = ratio(st.logical_bytes, st.referenced_plain_bytes);
    st.compression_ratio = ratio(st.referenced_plain_bytes, st.referenced_stored_bytes);
    st.unreadable_backups.sort_unstable();
    if !images.is_empty() {
        per.retain(|p| images.contains(&p.image));
    }
    Ok(Stats { store: st, per_image: per })
}
