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
/// catalog: left alone), and catalog rows whose snapshot is `missing`.
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
    for img in &images {
        let Source::Rbd { pool, namespace, image, .. } = &img.source else { continue };
        let ioctx = cluster.as_ref().unwrap().ioctx(pool, namespace.as_deref())?;
        let head = ioctx.open(image, None)?;
        let rows = match ctx.catalog.image(&img.name)? {
            Some(r) => ctx.catalog.snapshots(r.id)?,
            None => Vec::new(),
        };
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
        out.push(json!({"image": img.name, "source": img.source.to_string(), "snapshots": snaps}));
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for i in &out {
            // snapshot names come from the cluster: anyone may have made them
            println!("{} ({})", printable(i["image"].as_str().unwrap()), printable(i["source"].as_str().unwrap()));
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
