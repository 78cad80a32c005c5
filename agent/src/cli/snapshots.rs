use std::process::ExitCode;

use anyhow::Result;
use blockvault_catalog::SnapshotState;
use clap::Args;
use serde_json::json;

use super::{load_config, GlobalArgs};
use crate::config::Source;
use crate::context::Ctx;
use crate::logging::printable;
use crate::source::rbd::{connect, expand_images, SNAP_PREFIX};

#[derive(Args, Debug)]
pub struct SnapshotsArgs {
    /// Only this image (a configured RBD image name).
    pub image: Option<String>,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

/// Per RBD image: every snapshot on the cluster, and what the catalog says
/// of it: `held` (blockvault's base snapshot), `foreign` (not blockvault's:
/// never touched), `unknown` (named like blockvault's but not in this
/// catalog: left alone), and catalog rows whose snapshot is `missing`;
/// per image `held_bytes` (what blockvault's snapshots hold on the
/// cluster, see [`crate::release`]), `in_trash` and `removal_blocked`.
/// With no IMAGE, catalog images that are in the RBD trash are listed too
/// (a glob no longer matches them).
pub fn run(g: &GlobalArgs, a: SnapshotsArgs) -> Result<ExitCode> {
    let cfg = load_config(g)?;
    let images: Vec<_> = expand_images(&cfg)?
        .into_iter()
        .filter(|i| matches!(i.source, Source::Rbd { snap: None, .. }))
        .filter(|i| a.image.as_ref().is_none_or(|n| &i.name == n))
        .collect();
    if let Some(n) = &a.image {
        if images.is_empty() {
            anyhow::bail!("'{n}' is not a configured RBD image");
        }
    }
    let ctx = Ctx::open(cfg)?;
    let cluster = if images.is_empty() { None } else { Some(connect(&ctx.cfg)?) };
    let mut out = Vec::new();
    let mut targets: Vec<(String, Source)> = images.iter().map(|i| (i.name.clone(), i.source.clone())).collect();
    if let (None, Some(c)) = (&a.image, &cluster) {
        // catalog images in the trash, which a glob entry no longer lists
        for (name, spec) in crate::release::trashed_images(&ctx, c)? {
            if !targets.iter().any(|(n, _)| n == &name) {
                if let Ok(src) = Source::parse(&spec) {
                    targets.push((name, src));
                }
            }
        }
    }
    for (name, source) in &targets {
        let img = Target { name, source };
        let Source::Rbd { pool, namespace, image, .. } = &img.source else { continue };
        let ioctx = cluster.as_ref().unwrap().ioctx(pool, namespace.as_deref())?;
        let rows = match ctx.catalog.image(&img.name)? {
            Some(r) => ctx.catalog.snapshots(r.id)?,
            None => Vec::new(),
        };
        let kept: Vec<String> = rows.iter().filter(|r| r.state != SnapshotState::Removed).map(|r| r.name.clone()).collect();
        // an image moved to the trash is no longer in the pool's directory:
        // found by id, if blockvault's snapshot holds it there
        let mut in_trash = false;
        let head = match ioctx.open(image, None) {
            Ok(h) => h,
            Err(e) if e.is_not_found() => {
                let trashed = ioctx.trash_list()?.into_iter().find(|(_, n)| n == image);
                match trashed {
                    Some((id, n)) => {
                        in_trash = true;
                        ioctx.open_by_id_rw(&id, &n)?
                    }
                    None => {
                        out.push(json!({"image": img.name, "source": img.source.to_string(), "missing": true, "snapshots": []}));
                        continue;
                    }
                }
            }
            Err(e) => return Err(e.into()),
        };
        let held = crate::release::held_bytes(&head, &kept)?;
        let mut snaps = Vec::new();
        let on_cluster = head.snaps()?;
        for s in &on_cluster {
            let row = rows.iter().find(|r| r.name == s.name && r.state != SnapshotState::Removed);
            let state = match row {
                Some(_) => "held",
                None if s.name.starts_with(SNAP_PREFIX) => "unknown",
                None => "foreign",
            };
            snaps.push(json!({
                "name": s.name, "id": s.id, "size": s.size, "state": state,
                "backup": row.and_then(|r| r.backup_id).map(|b| b.0),
            }));
        }
        for r in rows.iter().filter(|r| r.state == SnapshotState::Present) {
            if !on_cluster.iter().any(|s| s.name == r.name) {
                snaps.push(json!({"name": r.name, "state": "missing", "backup": r.backup_id.map(|b| b.0)}));
            }
        }
        let holds = held.is_some();
        out.push(json!({
            "image": img.name, "source": img.source.to_string(), "snapshots": snaps,
            // RADOS copies an object on its first write after a snapshot:
            // what blockvault's oldest kept snapshot holds (0 without one)
            "held_bytes": held.as_ref().map_or(0, |h| h.1),
            "in_trash": in_trash,
            // `rbd rm` and `rbd trash purge` refuse an image with snapshots
            "removal_blocked": holds,
        }));
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for i in &out {
            // snapshot names come from the cluster: anyone may have made them
            println!("{} ({})", printable(i["image"].as_str().unwrap()), printable(i["source"].as_str().unwrap()));
            if i["missing"].as_bool() == Some(true) {
                println!("  (no such RBD image, nor one in the trash)");
                continue;
            }
            if let Some(b) = i["held_bytes"].as_u64().filter(|_| i["removal_blocked"].as_bool() == Some(true)) {
                println!("  held by blockvault's snapshot: {b} bytes written since it (copied on write by RADOS)");
            }
            if i["in_trash"].as_bool() == Some(true) && i["removal_blocked"].as_bool() == Some(true) {
                println!(
                    "  IN THE RBD TRASH: blockvault's snapshot blocks its purge; `blockvault release {}` (or the next run) frees it",
                    printable(i["image"].as_str().unwrap())
                );
            }
            for s in i["snapshots"].as_array().unwrap() {
                println!(
                    "  {:<40} {:<8} {}",
                    printable(s["name"].as_str().unwrap()),
                    s["state"].as_str().unwrap(),
                    s["backup"].as_u64().map(|b| format!("backup {b}")).unwrap_or_default()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One image `snapshots` reports on.
struct Target<'a> {
    name: &'a String,
    source: &'a Source,
}
