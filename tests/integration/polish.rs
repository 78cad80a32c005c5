//! Issue 14, part 2 (operator polish): stats, labels and notes, the
//! failure hook, stale verify marks, scheduled verify and gc in the daemon.
//! File sources only: no Ceph needed.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockvault_store::{BackupId, ChunkId, Store};
use serde_json::{json, Value};

use crate::common::*;

const BS: usize = 64 << 10;
const DEFAULTS: &str = "[defaults]\nblock-size = \"64K\"\n";
const WAIT: Duration = Duration::from_secs(180);

fn src(p: &Path) -> String {
    format!("file:{}", p.display())
}

fn json_of(env: &Env, args: &[&str]) -> (bool, Value, String) {
    let o = env.run(args);
    let v = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!("{args:?}: not JSON ({e}): {}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
    });
    (o.status.success(), v, String::from_utf8_lossy(&o.stderr).into_owned())
}

fn chunk_path(env: &Env, id: &ChunkId) -> std::path::PathBuf {
    env.store().join("chunks").join(&id.to_hex()[..4]).join(id.to_hex())
}

fn chunk_size(env: &Env, id: &ChunkId) -> u64 {
    fs::metadata(chunk_path(env, id)).unwrap().len()
}

fn chunks_of(env: &Env, id: u64) -> BTreeSet<ChunkId> {
    let s = Store::open(&env.store()).unwrap();
    let m = s.read_manifest(BackupId(id)).unwrap();
    s.read_blockmap(&m).unwrap().block_chunk_ids().copied().collect()
}

/// The index chunks of a backup's block map (64 KiB blocks: format 3).
fn index_of(env: &Env, id: u64) -> BTreeSet<ChunkId> {
    let s = Store::open(&env.store()).unwrap();
    let m = s.read_manifest(BackupId(id)).unwrap();
    s.read_blockmap(&m).unwrap().index_chunks().iter().copied().collect()
}

/// Issue 14 item 15: `stats` on a store whose content is known block by
/// block: two images sharing 8 chunks, one backed up twice unchanged.
#[test]
fn stats_match_a_store_of_known_content() {
    let env = Env::new(&[], "");
    let (a, b) = (env.path("a.img"), env.path("b.img"));
    let mut r = rng(1415);
    write_random(&a, 0, 16 * BS, &mut r); // A0..A15
    // b: A0..A7, then 4 blocks of its own, then 4 holes
    let data = fs::read(&a).unwrap();
    fs::write(&b, &data[..8 * BS]).unwrap();
    write_random(&b, 8 * BS as u64, 4 * BS, &mut r);
    fs::OpenOptions::new().write(true).open(&b).unwrap().set_len(16 * BS as u64).unwrap();
    env.write_config(&[("a", &src(&a)), ("b", &src(&b))], "", DEFAULTS);
    env.ok(&["init"]);
    env.ok(&["backup", "a"]);
    env.ok(&["backup", "a"]);
    env.ok(&["backup", "b"]);
    let list = env.list();
    let (ca, cb) = (chunks_of(&env, crate::common::num(&list[0], "id")), chunks_of(&env, crate::common::num(&list[2], "id")));
    assert_eq!((ca.len(), cb.len()), (16, 12));
    let shared: BTreeSet<ChunkId> = ca.intersection(&cb).copied().collect();
    assert_eq!(shared.len(), 8);

    let (ok, v, err) = json_of(&env, &["stats", "--json"]);
    assert!(ok, "{err}");
    let all: u64 = env.chunk_files().iter().map(|p| fs::metadata(p).unwrap().len()).sum();
    let sum = |s: &BTreeSet<ChunkId>| s.iter().map(|c| chunk_size(&env, c)).sum::<u64>();
    let bs = BS as u64;
    // one index chunk per map of 16 blocks; a's two maps are the same
    let (ia, ib) = (index_of(&env, crate::common::num(&list[0], "id")), index_of(&env, crate::common::num(&list[2], "id")));
    assert_eq!((ia.len(), ib.len()), (1, 1));
    assert_eq!(ia, index_of(&env, crate::common::num(&list[1], "id")));
    let index_bytes = sum(&ia) + sum(&ib);
    assert_eq!(num(&v, "backups"), 3, "{v}");
    assert_eq!(num(&v, "images"), 2);
    assert_eq!(num(&v, "chunks"), 22);
    assert_eq!(num(&v, "referenced_chunks"), 20);
    assert_eq!(num(&v, "index_chunks"), 2);
    assert_eq!(num(&v, "index_stored_bytes"), index_bytes);
    assert_eq!(num(&v, "unreferenced_chunks"), 0);
    assert_eq!(num(&v, "missing_chunks"), 0);
    assert_eq!(num(&v, "stored_bytes"), all);
    assert_eq!(num(&v, "referenced_plain_bytes"), 20 * bs);
    assert_eq!(num(&v, "logical_bytes"), (2 * 16 + 12) * bs);
    assert!((v["dedup_ratio"].as_f64().unwrap() - 44.0 / 20.0).abs() < 1e-9, "{v}");
    let compr = v["compression_ratio"].as_f64().unwrap();
    assert!((compr - (20 * bs) as f64 / (all - index_bytes) as f64).abs() < 1e-9, "{v}");
    assert!(v["oldest"].as_str().unwrap() <= v["newest"].as_str().unwrap());

    let per = v["per_image"].as_array().unwrap();
    assert_eq!(per.len(), 2);
    let (pa, pb) = (&per[0], &per[1]);
    assert_eq!((pa["image"].as_str(), pb["image"].as_str()), (Some("a"), Some("b")));
    assert_eq!((num(pa, "backups"), num(pb, "backups")), (2, 1));
    assert_eq!((num(pa, "size"), num(pb, "size")), (16 * bs, 16 * bs));
    assert_eq!((num(pa, "logical_bytes"), num(pb, "logical_bytes")), (32 * bs, 12 * bs));
    assert_eq!((num(pa, "chunks"), num(pb, "chunks")), (16, 12));
    assert_eq!((num(pa, "plain_bytes"), num(pb, "plain_bytes")), (16 * bs, 12 * bs));
    assert!((pa["dedup_ratio"].as_f64().unwrap() - 2.0).abs() < 1e-9);
    assert!((pb["dedup_ratio"].as_f64().unwrap() - 1.0).abs() < 1e-9);
    assert_eq!(num(pa, "stored_bytes"), sum(&ca));
    assert_eq!(num(pa, "shared_stored_bytes"), sum(&shared));
    assert_eq!(num(pa, "unique_stored_bytes"), sum(&ca) - sum(&shared));
    assert_eq!(num(pb, "shared_stored_bytes"), sum(&shared));
    assert_eq!(num(pb, "unique_stored_bytes"), sum(&cb) - sum(&shared));
    assert_eq!(pa["oldest"], list[0]["created"]);
    assert_eq!(pa["newest"], list[1]["created"]);

    // forgetting b leaves its 4 own chunks and its index chunk unreferenced
    let idb = num(&list[2], "id");
    env.ok(&["forget", &format!("b@{idb}")]);
    let (_, v, _) = json_of(&env, &["stats", "--json", "a"]);
    assert_eq!(num(&v, "unreferenced_chunks"), 5);
    assert_eq!(num(&v, "unreferenced_bytes"), sum(&cb) - sum(&shared) + sum(&ib));
    assert_eq!(v["per_image"].as_array().unwrap().len(), 1);
    assert_eq!(num(&v["per_image"][0], "unique_stored_bytes"), sum(&ca), "a alone: every chunk is its own");
    // the text form names the figures
    let out = env.ok(&["stats"]);
    assert!(out.contains("dedup 2.00x"), "{out}");
    assert!(out.contains("5 chunks") && out.contains("gc frees them"), "{out}");
    env.fails(&["stats", "nosuch"]);
}

/// Issue 14 item 17: labels and a note on backups, from the command line
/// and the image's config, shown and filtered by `list`, changed by
/// `label`/`note`, kept across `catalog rebuild`, removed by `forget`.
#[test]
fn labels_and_notes_are_kept_in_the_store() {
    let env = Env::new(&[], "");
    let a = env.path("a.img");
    write_random(&a, 0, 4 * BS, &mut rng(17));
    let cfg = format!(
        "[store]\npath = \"{}\"\n[catalog]\npath = \"{}\"\n{DEFAULTS}\n[[image]]\nname = \"a\"\nsource = \"{}\"\nlabels = {{ owner = \"ops\" }}\n",
        env.store().display(),
        env.catalog().display(),
        src(&a)
    );
    fs::write(&env.config, cfg).unwrap();
    env.ok(&["init"]);
    env.ok(&["backup", "a", "--label", "env=prod", "--label", "owner=dba", "--note", "before the upgrade"]);
    env.ok(&["run", "a"]);
    assert!(env.fails(&["backup", "a", "--label", "bad key=x"]).contains("label key"));
    let list = env.list();
    let (id1, id2) = (num(&list[0], "id"), num(&list[1], "id"));
    assert_eq!(list[0]["labels"], json!({"env": "prod", "owner": "dba"}));
    assert_eq!(list[0]["note"], "before the upgrade");
    assert_eq!(list[1]["labels"], json!({"owner": "ops"}), "the configured labels of a scheduled backup");
    assert_eq!(list[1]["note"], Value::Null);

    let only: Vec<Value> = serde_json::from_str(&env.ok(&["list", "--json", "--label", "env=prod"])).unwrap();
    assert_eq!(only.iter().map(|b| num(b, "id")).collect::<Vec<_>>(), vec![id1]);
    let none: Vec<Value> = serde_json::from_str(&env.ok(&["list", "--json", "--label", "env=prod", "--label", "owner=ops"])).unwrap();
    assert!(none.is_empty());
    let text = env.ok(&["list"]);
    assert!(text.contains("env=prod,owner=dba") && text.contains("note: before the upgrade"), "{text}");

    env.ok(&["label", &format!("a@{id2}"), "env=test", "--remove", "owner"]);
    env.ok(&["note", &format!("a@{id2}"), "restored fine on 2026-12-01"]);
    env.ok(&["note", &format!("a@{id1}"), ""]);
    env.fails(&["label", "a", "x=y"]);

    // the catalog is rebuilt from the store alone: same labels and notes
    fs::remove_file(env.catalog()).unwrap();
    env.ok(&["catalog", "rebuild"]);
    let list = env.list();
    assert_eq!(list[0]["labels"], json!({"env": "prod", "owner": "dba"}));
    assert_eq!(list[0]["note"], Value::Null);
    assert_eq!(list[1]["labels"], json!({"env": "test"}));
    assert_eq!(list[1]["note"], "restored fine on 2026-12-01");

    env.ok(&["forget", &format!("a@{id1}")]);
    assert!(!env.store().join("backups").join(format!("{id1:012}.labels")).exists(), "forget left the labels");
    assert!(env.store().join("backups").join(format!("{id2:012}.labels")).exists());
}

/// Issue 14 item 16: a failing backup runs `on-failure` once, with the
/// image, the job and the error in its environment; `run` and `backup`
/// alike; an image's hook overrides `[defaults]`.
#[test]
fn a_failing_backup_runs_the_hook_once() {
    let env = Env::new(&[], "");
    let calls = env.path("calls");
    let hook = format!("printf '%s|%s|%s\\n' \"$BLOCKVAULT_JOB\" \"$BLOCKVAULT_IMAGE\" \"$BLOCKVAULT_ERROR\" >> {}", calls.display());
    let (gone, ok) = (env.path("gone.img"), env.path("ok.img"));
    write_random(&ok, 0, 2 * BS, &mut rng(16));
    let cfg = format!(
        "[store]\npath = \"{}\"\n[catalog]\npath = \"{}\"\n[defaults]\nblock-size = \"64K\"\non-failure = '''{hook}'''\n\
         [[image]]\nname = \"gone\"\nsource = \"{}\"\n[[image]]\nname = \"fine\"\nsource = \"{}\"\n\
         [[image]]\nname = \"own\"\nsource = \"{}\"\non-failure = 'echo own >> {}'\n",
        env.store().display(),
        env.catalog().display(),
        src(&gone),
        src(&ok),
        src(&gone),
        calls.display()
    );
    fs::write(&env.config, cfg).unwrap();
    env.ok(&["init"]);
    env.ok(&["backup", "fine"]);
    assert!(!calls.exists(), "the hook ran for a backup that worked");
    env.fails(&["backup", "gone"]);
    let lines: Vec<String> = fs::read_to_string(&calls).unwrap().lines().map(String::from).collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let f: Vec<&str> = lines[0].splitn(3, '|').collect();
    assert_eq!(&f[..2], &["backup", "gone"]);
    assert!(f[2].contains("gone.img"), "the error does not name the source: {}", f[2]);

    fs::remove_file(&calls).unwrap();
    env.fails(&["run", "--all"]);
    let mut lines: Vec<String> = fs::read_to_string(&calls).unwrap().lines().map(String::from).collect();
    lines.sort();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].starts_with("backup|gone|"), "{lines:?}");
    assert_eq!(lines[1], "own");
}

/// Issue 14 item 7: marks from an earlier verify. A missing chunk that a
/// later backup rewrote is cleared by a plain verify; a corrupt one needs
/// `--deep`, and a plain verify says so instead of "0 problems".
#[test]
fn stale_invalid_marks_are_cleared_or_explained() {
    let env = Env::new(&[], "");
    let a = env.path("a.img");
    write_random(&a, 0, 8 * BS, &mut rng(7));
    env.write_config(&[("a", &src(&a))], "", DEFAULTS);
    env.ok(&["init"]);
    env.ok(&["backup", "a"]);
    let id1 = num(&env.list()[0], "id");
    let block0 = ChunkId::of(&fs::read(&a).unwrap()[..BS]);
    let p0 = chunk_path(&env, &block0);

    // a missing chunk: plain verify finds it and marks the backup
    let kept = fs::read(&p0).unwrap();
    fs::remove_file(&p0).unwrap();
    let (ok, v, _) = json_of(&env, &["verify", "--json"]);
    assert!(!ok);
    assert_eq!(v["findings"][0]["kind"], "chunk_missing", "{v}");
    assert_eq!(env.list()[0]["verify_state"], "invalid");
    // the next backup reads block 0 again and rewrites the chunk
    env.ok(&["backup", "a"]);
    assert!(p0.exists());
    assert_eq!(fs::read(&p0).unwrap(), kept);
    let o = env.run(&["verify"]);
    assert!(o.status.success(), "a plain verify did not clear a healed missing chunk: {}", String::from_utf8_lossy(&o.stderr));
    assert!(env.list().iter().all(|b| b["verify_state"] == "ok"), "{:?}", env.list());

    // a corrupt chunk: --deep finds it, moves it aside, marks every backup
    let mut bytes = fs::read(&p0).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0x40;
    fs::write(&p0, &bytes).unwrap();
    let (ok, v, _) = json_of(&env, &["verify", "--deep", "--json"]);
    assert!(!ok);
    assert_eq!(v["findings"][0]["kind"], "chunk_corrupt", "{v}");
    env.ok(&["backup", "a"]); // writes a good copy again
    let o = env.run(&["verify"]);
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(!o.status.success(), "stale corrupt marks vanished without a deep check");
    assert!(err.contains("`blockvault verify --deep`"), "no word of what to run: {err}");
    assert!(err.contains(&id1.to_string()), "{err}");
    assert!(!err.contains("verify found 0 problems"), "{err}");
    assert!(out.contains("0 problems found"), "{out}");
    let (ok, v, _) = json_of(&env, &["verify", "--json"]);
    assert!(!ok);
    assert_eq!(v["stale_invalid"][0][0], json!(id1), "{v}");
    assert_eq!(v["stale_invalid"][0][1], "deep", "{v}");
    // a sampled deep share is not a deep verify: it clears nothing either
    let (ok, v, _) = json_of(&env, &["verify", "--deep-percent", "100", "--json"]);
    assert!(!ok, "{v}");
    assert_eq!(num(&v, "deep_sampled"), num(&v, "chunks"));
    env.ok(&["verify", "--deep"]);
    assert!(env.list().iter().all(|b| b["verify_state"] == "ok"));
    env.ok(&["verify"]);
}

/// Issue 14 item 14: the daemon runs `verify-schedule` (with a deep share)
/// and `gc-schedule` and reports both in the metrics; a verify that finds a
/// problem runs `[daemon] on-failure` with BLOCKVAULT_JOB=verify.
#[test]
fn the_daemon_runs_scheduled_verify_and_gc() {
    let env = Env::new(&[], "");
    let (a, b) = (env.path("a.img"), env.path("b.img"));
    let mut r = rng(14);
    write_random(&a, 0, 8 * BS, &mut r);
    write_random(&b, 0, 8 * BS, &mut r);
    let (prom, calls) = (env.path("bv.prom"), env.path("calls"));
    let cfg = |verify_hook: bool| {
        format!(
            "[store]\npath = \"{}\"\ngc-grace = 0\n[catalog]\npath = \"{}\"\n{DEFAULTS}\n[metrics]\npath = \"{}\"\n\
             [daemon]\nverify-schedule = \"*/2 * * * * *\"\nverify-deep-percent = 50\ngc-schedule = \"*/3 * * * * *\"\n{}\n\
             [[image]]\nname = \"a\"\nsource = \"{}\"\n[[image]]\nname = \"b\"\nsource = \"{}\"\n",
            env.store().display(),
            env.catalog().display(),
            prom.display(),
            if verify_hook { format!("on-failure = 'echo \"$BLOCKVAULT_JOB|$BLOCKVAULT_IMAGE\" >> {}'", calls.display()) } else { String::new() },
            src(&a),
            src(&b)
        )
    };
    fs::write(&env.config, cfg(true)).unwrap();
    env.ok(&["init"]);
    env.ok(&["backup", "a"]);
    env.ok(&["backup", "b"]);
    // b's chunks become garbage, a chunk of a goes missing
    let list = env.list();
    // gc frees b's block chunks and its map's index chunk
    let idb = num(&list[1], "id");
    let freed: u64 = chunks_of(&env, idb).union(&index_of(&env, idb)).map(|c| chunk_size(&env, c)).sum();
    env.ok(&["forget", "b", "--all"]);
    let lost = *chunks_of(&env, num(&list[0], "id")).iter().next().unwrap();
    fs::remove_file(chunk_path(&env, &lost)).unwrap();

    let mut child = env.cmd(&["daemon"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let (err, l) = (child.stderr.take().unwrap(), log.clone());
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let mut g = l.lock().unwrap();
            g.push_str(&line);
            g.push('\n');
        }
    });
    let metric = |name: &str| -> Option<f64> {
        let t = fs::read_to_string(&prom).ok()?;
        t.lines().find_map(|l| l.strip_prefix(&format!("{name} "))?.parse().ok())
    };
    let t = Instant::now();
    while metric("blockvault_verify_last_run_timestamp_seconds").is_none() || metric("blockvault_gc_last_run_timestamp_seconds").is_none() {
        assert!(t.elapsed() < WAIT, "no maintenance metrics; log:\n{}", log.lock().unwrap());
        assert!(child.try_wait().unwrap().is_none(), "daemon exited; log:\n{}", log.lock().unwrap());
        std::thread::sleep(Duration::from_millis(200));
    }
    // the hook of the failed verify
    while !fs::read_to_string(&calls).unwrap_or_default().contains("verify|") {
        assert!(t.elapsed() < WAIT, "the verify hook did not run; log:\n{}", log.lock().unwrap());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap().success());
    let st = child.wait().unwrap();
    let log = log.lock().unwrap().clone();
    assert!(st.success(), "{log}");

    assert_eq!(metric("blockvault_verify_last_run_success"), Some(0.0), "{log}");
    assert!(metric("blockvault_verify_problems").unwrap() >= 1.0);
    assert!(metric("blockvault_verify_last_success_timestamp_seconds").is_none(), "a verify that never passed has a success time");
    assert!(metric("blockvault_verify_deep_chunks").unwrap() >= 1.0, "no chunk read in full at 50%");
    assert_eq!(metric("blockvault_gc_last_run_success"), Some(1.0), "{log}");
    assert!(metric("blockvault_gc_last_success_timestamp_seconds").is_some());
    assert_eq!(metric("blockvault_gc_freed_bytes_total"), Some(freed as f64), "{log}");
    for l in fs::read_to_string(&calls).unwrap().lines() {
        assert_eq!(l, "verify|", "the hook ran for something else: {l}");
    }
    assert!(log.contains("scheduled maintenance done"), "{log}");
}
