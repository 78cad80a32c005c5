use std::process::ExitCode;

use anyhow::Result;
use blockvault_catalog::BackupRow;
use clap::Args;
use serde_json::json;

use super::{load_config, GlobalArgs};
use crate::context::Ctx;
use crate::logging::printable;

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only this image; or a group (`[[group]]`): its sets.
    pub image: Option<String>,
    /// JSON output: an array of backups (of a group: an array of sets).
    #[arg(long)]
    pub json: bool,
    /// Only backups with this label, KEY=VALUE (repeatable: all must match).
    #[arg(long, value_name = "KEY=VALUE")]
    pub label: Vec<String>,
}

/// The JSON form of a backup. Only fields the store also records, so a
/// catalog rebuilt from the store lists the same.
pub fn backup_json(b: &BackupRow) -> serde_json::Value {
    let s = b.stats.clone().unwrap_or_default();
    json!({
        "id": b.id.0,
        "image": b.image,
        "parent": b.parent.map(|p| p.0),
        "created": b.created,
        "finished": b.finished,
        "size": b.image_size,
        "block_size": b.block_size,
        "snapshot": b.snapshot,
        "new_bytes": s.new_bytes,
        "new_chunks": s.new_chunks,
        "new_plain_bytes": s.new_plain_bytes,
        "read_bytes": s.read_bytes,
        "zero_blocks": s.zero_blocks,
        "dedup_blocks": s.dedup_blocks,
        "inherited_blocks": s.inherited_blocks,
        "patched_blocks": s.patched_blocks,
        "full_read": s.full_read,
        "duration_ms": s.duration_ms,
        "protected": b.protected,
        // what the last verify (or a failed parent check) said, recorded in
        // the store as backups/<id>.verify: "ok", "invalid" or "unverified"
        "verify_state": b.verify_state.as_str(),
        "valid": b.verify_state != blockvault_catalog::VerifyState::Invalid,
    })
}

pub fn run(g: &GlobalArgs, a: ListArgs) -> Result<ExitCode> {
    let cfg = load_config(g)?;
    let ctx = Ctx::open(cfg)?;
    let group = match &a.image {
        Some(name) if ctx.catalog.image(name)?.is_none() && crate::group::is_group(&ctx, name)? => Some(name.clone()),
        _ => None,
    };
    if let (Some(name), None) = (&a.image, &group) {
        if ctx.catalog.image(name)?.is_none() && ctx.cfg.image(name).is_err() {
            anyhow::bail!("image '{name}' is neither configured nor in the catalog");
        }
    }
    // the store is the truth: list what only the store holds, report what it lacks
    let rec = crate::rebuild::reconcile(&ctx.store, &ctx.catalog).unwrap_or_else(|e| {
        tracing::warn!(error = %format!("{e:#}"), "could not reconcile the catalog with the store; listing the catalog as it is");
        Default::default()
    });
    for id in &rec.missing {
        eprintln!("warning: backup {id} is in the catalog but its manifest is not in the store: it cannot be restored");
    }
    for (id, why) in &rec.unreadable {
        eprintln!("warning: backup {id} in the store cannot be read ({why}); `blockvault forget @{id}` removes it");
    }
    if let Some(grp) = &group {
        let sets = ctx.catalog.sets(Some(grp))?;
        if a.json {
            let v: Vec<_> = sets.iter().map(set_json).collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            print_sets(&sets);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let want: Vec<(String, String)> = a.label.iter().map(|l| crate::annotate::parse_label(l)).collect::<Result<_>>()?;
    let mut rows = Vec::new();
    let mut anns = Vec::new();
    for r in ctx.catalog.committed_backups(a.image.as_deref())? {
        // labels and notes live in the store (backups/<id>.labels)
        let ann = ctx.store.annotations(r.id).unwrap_or_else(|e| {
            eprintln!("warning: backup {}: labels unreadable: {e}", r.id);
            Default::default()
        });
        if crate::annotate::matches(&ann, &want) {
            rows.push(r);
            anns.push(ann);
        }
    }
    if a.json {
        // streamed, one row's JSON value at a time: the same document as
        // `to_string_pretty` of them all, without holding it (100,000 rows
        // took 394 MiB that way)
        use serde::Serializer as _;
        use std::io::Write as _;
        let out = std::io::stdout().lock();
        let mut w = std::io::BufWriter::new(out);
        let mut ser = serde_json::Serializer::pretty(&mut w);
        ser.collect_seq(rows.iter().zip(&anns).map(|(r, ann)| {
            let mut v = backup_json(r);
            v["labels"] = json!(ann.labels);
            v["note"] = json!(ann.note);
            v
        }))?;
        writeln!(w)?;
        w.flush()?;
        return Ok(ExitCode::SUCCESS);
    }
    // the RBD snapshots blockvault still holds: a backup's snapshot that
    // was demoted or deleted is shown as gone
    let mut held = std::collections::HashSet::new();
    let mut seen = std::collections::HashSet::new();
    for b in &rows {
        if b.snapshot.is_some() && seen.insert(b.image_id) {
            for sn in ctx.catalog.snapshots(b.image_id)? {
                if sn.state == blockvault_catalog::SnapshotState::Present {
                    held.insert(sn.name);
                }
            }
        }
    }
    println!(
        "{:>6}  {:<20} {:<21} {:>12} {:>12} {:>6}  {:<4} {:<10} {:<24} {}",
        "ID", "IMAGE", "CREATED", "SIZE", "NEW", "PARENT", "PROT", "VERIFY", "SNAPSHOT", "LABELS"
    );
    for (b, ann) in rows.iter().zip(&anns) {
        let s = b.stats.clone().unwrap_or_default();
        let snap = match b.snapshot.as_deref() {
            None => "-".to_string(),
            Some(n) if held.contains(n) => printable(n).into_owned(),
            Some(n) => format!("(gone) {}", printable(n)),
        };
        println!(
            "{:>6}  {:<20} {:<21} {:>12} {:>12} {:>6}  {:<4} {:<10} {:<24} {}",
            b.id.0,
            printable(&b.image),
            printable(&b.created),
            human(b.image_size),
            human(s.new_bytes),
            b.parent.map(|p| p.0.to_string()).unwrap_or_else(|| "-".into()),
            if b.protected { "yes" } else { "-" },
            b.verify_state.as_str(),
            snap,
            printable(&crate::annotate::labels_cell(ann))
        );
        if let Some(n) = &ann.note {
            println!("{:>6}  note: {}", "", printable(n));
        }
    }
    if a.image.is_none() {
        let sets = ctx.catalog.sets(None)?;
        if !sets.is_empty() {
            println!();
            print_sets(&sets);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The JSON form of a set.
pub fn set_json(s: &blockvault_catalog::SetRow) -> serde_json::Value {
    json!({
        "group": s.group,
        "set": s.id.0,
        "created": s.created(),
        "complete": s.is_complete(),
        "images": s.images,
        "missing": s.missing(),
        "backups": s.members.iter().map(|m| json!({"image": m.image, "id": m.id.0, "snapshot": m.snapshot, "size": m.image_size})).collect::<Vec<_>>(),
    })
}

fn print_sets(sets: &[blockvault_catalog::SetRow]) {
    println!("{:<28} {:<21} {:<10} BACKUPS", "SET", "CREATED", "STATE");
    for s in sets {
        let members: Vec<String> = s.members.iter().map(|m| format!("{}@{}", printable(&m.image), m.id.0)).collect();
        let state = if s.is_complete() { "complete".to_string() } else { format!("incomplete (no {})", s.missing().join(", ")) };
        println!("{:<28} {:<21} {:<10} {}", format!("{}@{}", printable(&s.group), s.id.0), printable(s.created()), state, members.join(" "));
    }
}

pub fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}
