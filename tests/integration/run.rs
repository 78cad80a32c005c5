//! `blockvault run`: every image is tried, the exit status reports any
//! failure, pruning follows a backup when configured, and the metrics file
//! describes every image.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use crate::common::*;

/// The sample value of `metric{image="image"}`, if present.
fn sample(text: &str, metric: &str, image: &str) -> Option<f64> {
    let prefix = format!("{metric}{{image=\"{image}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).map(|v| v.parse().unwrap())
}

#[test]
fn one_broken_image_fails_the_run_but_not_the_others() {
    let env = Env::new(&[], "");
    let good = env.path("good.img");
    write_random(&good, 0, 2 << 20, &mut rng(51));
    let prom_dir = env.path("textfile");
    fs::create_dir(&prom_dir).unwrap();
    let prom = prom_dir.join("blockvault.prom");
    // "broken" comes first: the run must go on to "good"
    env.write_config(
        &[("broken", &format!("file:{}", env.path("missing.img").display())), ("good", &format!("file:{}", good.display()))],
        "",
        &format!(
            "[defaults]\nblock-size = \"64K\"\nretention = {{ keep-last = 1 }}\nprune-after-backup = true\n\
             [metrics]\npath = \"{}\"\n",
            prom.display()
        ),
    );
    env.ok(&["init"]);

    let o = env.run(&["run", "--all"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "run with a broken image succeeded: {stderr}");
    assert!(stderr.contains("1 of 2 images failed: broken"), "{stderr}");
    let list = env.list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["image"], "good");

    let text = fs::read_to_string(&prom).unwrap();
    assert_eq!(fs::metadata(&prom).unwrap().permissions().mode() & 0o777, 0o644);
    for family in [
        "blockvault_last_success_timestamp_seconds",
        "blockvault_last_run_success",
        "blockvault_last_run_duration_seconds",
        "blockvault_last_backup_read_bytes",
        "blockvault_last_backup_written_bytes",
        "blockvault_last_backup_new_chunks",
        "blockvault_backup_failures_total",
        "blockvault_rbd_snapshots",
    ] {
        assert!(text.contains(&format!("# HELP {family} ")), "no HELP for {family}:\n{text}");
        assert!(text.contains(&format!("# TYPE {family} ")), "no TYPE for {family}:\n{text}");
    }
    assert_eq!(sample(&text, "blockvault_last_run_success", "good"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "blockvault_last_run_success", "broken"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "blockvault_backup_failures_total", "broken"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "blockvault_backup_failures_total", "good"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "blockvault_last_success_timestamp_seconds", "broken"), Some(0.0), "{text}");
    assert!(sample(&text, "blockvault_last_success_timestamp_seconds", "good").unwrap() > 1.6e9, "{text}");
    assert_eq!(sample(&text, "blockvault_last_backup_read_bytes", "good"), Some((2 << 20) as f64), "{text}");
    assert_eq!(sample(&text, "blockvault_last_backup_new_chunks", "good"), Some(32.0), "{text}");
    assert!(sample(&text, "blockvault_last_backup_written_bytes", "good").unwrap() > 0.0, "{text}");
    assert_eq!(sample(&text, "blockvault_rbd_snapshots", "good"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "blockvault_last_backup_read_bytes", "broken"), None, "{text}");
    let leftovers: Vec<_> = fs::read_dir(&prom_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "temp files left beside the metrics file: {leftovers:?}");

    // the good image alone: success; prune-after-backup keeps only the newest
    let out = env.ok(&["run", "good"]);
    assert!(out.contains("1 pruned"), "{out}");
    let list = env.list();
    assert_eq!(list.len(), 1);
    let restored = env.restore("good");
    assert_same(&good, &restored);

    // a failure of "broken" counts up; a fixed "broken" reports success
    env.fails(&["run", "broken"]);
    let text = fs::read_to_string(&prom).unwrap();
    assert_eq!(sample(&text, "blockvault_backup_failures_total", "broken"), Some(2.0), "{text}");
    fs::copy(&good, env.path("missing.img")).unwrap();
    env.ok(&["run", "broken"]);
    let text = fs::read_to_string(&prom).unwrap();
    assert_eq!(sample(&text, "blockvault_last_run_success", "broken"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "blockvault_backup_failures_total", "broken"), Some(2.0), "{text}");
    assert_eq!(sample(&text, "blockvault_last_run_success", "good"), Some(1.0), "{text}");

    // unknown names are refused before any work
    let e = env.fails(&["run", "good", "nope"]);
    assert!(e.contains("nope"), "{e}");
}
