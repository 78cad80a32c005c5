//! Bad input gets a clear error naming the problem, a non-zero exit, and
//! writes nothing.

use std::fs;
use std::process::Command;

use crate::common::*;

fn store_snapshot(env: &Env) -> Vec<String> {
    let mut out = Vec::new();
    for e in walk(&env.store()) {
        let md = fs::metadata(&e).unwrap();
        out.push(format!("{} {}", e.display(), md.len()));
    }
    out.sort();
    out
}

fn walk(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v = Vec::new();
    if let Ok(rd) = fs::read_dir(p) {
        for e in rd {
            let e = e.unwrap().path();
            if e.is_dir() {
                v.extend(walk(&e));
            } else if !e.to_string_lossy().contains("catalog.sqlite") && !e.to_string_lossy().ends_with(".lock") {
                v.push(e);
            }
        }
    }
    v
}

fn ready_env() -> (Env, std::path::PathBuf) {
    let env = Env::new(&[], "");
    let img = env.path("img");
    write_random(&img, 0, 1 << 20, &mut rng(9));
    env.write_config(&[("img", &format!("file:{}", img.display()))], "", "");
    env.ok(&["init"]);
    env.ok(&["backup", "img"]);
    (env, img)
}

#[test]
fn unknown_config_key() {
    let (env, img) = ready_env();
    let before = store_snapshot(&env);
    fs::write(
        &env.config,
        format!(
            "[store]\npath = \"{}\"\ncompresion-level = 5\n[[image]]\nname = \"img\"\nsource = \"file:{}\"\n",
            env.store().display(),
            img.display()
        ),
    )
    .unwrap();
    let err = env.fails(&["backup", "img"]);
    assert!(err.contains("compresion-level"), "{err}");
    assert!(err.contains(&env.config.display().to_string()), "config file not named: {err}");
    assert_eq!(before, store_snapshot(&env));

    fs::write(
        &env.config,
        format!("[store]\npath = \"{}\"\n[[image]]\nname = \"img\"\nsource = \"file:{}\"\nkeep-lats = 3\n", env.store().display(), img.display()),
    )
    .unwrap();
    let err = env.fails(&["list"]);
    assert!(err.contains("keep-lats"), "{err}");
}

#[test]
fn missing_source_file() {
    let (env, img) = ready_env();
    let before = store_snapshot(&env);
    let list_before = env.ok(&["list", "--json"]);
    fs::remove_file(&img).unwrap();
    let err = env.fails(&["backup", "img"]);
    assert!(err.contains(&img.display().to_string()), "{err}");
    assert!(err.contains("No such file"), "{err}");
    assert_eq!(before, store_snapshot(&env));
    assert_eq!(list_before, env.ok(&["list", "--json"]));
}

#[test]
fn unknown_image_and_missing_store() {
    let (env, _img) = ready_env();
    let err = env.fails(&["backup", "nope"]);
    assert!(err.contains("image 'nope' is not in config"), "{err}");
    let env2 = Env::new(&[("x", "file:/dev/null")], "");
    let err = env2.fails(&["backup", "x"]);
    assert!(err.contains("no blockvault store at") && err.contains("init"), "{err}");
    assert!(!env2.store().exists(), "a failed backup created the store");
}

#[test]
fn backup_id_that_does_not_exist() {
    let (env, _img) = ready_env();
    let to = env.path("out");
    let err = env.fails(&["restore", "img@99", "--to", to.to_str().unwrap()]);
    assert!(err.contains("backup 99 does not exist for image 'img'"), "{err}");
    assert!(!to.exists());
    let err = env.fails(&["restore", "img@x", "--to", to.to_str().unwrap()]);
    assert!(err.contains("must be a number"), "{err}");
    let err = env.fails(&["restore", "other", "--to", to.to_str().unwrap()]);
    assert!(err.contains("'other' has no committed backup"), "{err}");
    assert!(!to.exists());
}

#[test]
fn restore_refuses_an_existing_target() {
    let (env, img) = ready_env();
    let to = env.path("out");
    fs::write(&to, b"precious").unwrap();
    let err = env.fails(&["restore", "img", "--to", to.to_str().unwrap()]);
    assert!(err.contains("already exists") && err.contains("--force"), "{err}");
    assert_eq!(fs::read(&to).unwrap(), b"precious");
    env.ok(&["restore", "img", "--to", to.to_str().unwrap(), "--force"]);
    assert_same(&img, &to);
}

/// An unwritable store (immutable directory: root ignores permission bits)
/// fails with an error naming the path, and changes nothing.
#[test]
fn unwritable_store() {
    let (env, img) = ready_env();
    write_random(&img, 0, 1 << 20, &mut rng(10));
    let list_before = env.ok(&["list", "--json"]);
    let before = store_snapshot(&env);
    let st = Command::new("chattr").arg("-R").arg("+i").arg(env.store()).status().unwrap();
    assert!(st.success(), "chattr +i failed");
    let o = env.run(&["backup", "img"]);
    Command::new("chattr").arg("-R").arg("-i").arg(env.store()).status().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&env.store().display().to_string()), "store path not named: {err}");
    assert!(err.contains("Operation not permitted"), "cause not named: {err}");
    assert_eq!(before, store_snapshot(&env));
    assert_eq!(list_before, env.ok(&["list", "--json"]));

    // init where the store path cannot be created
    let f = env.path("file");
    fs::write(&f, b"x").unwrap();
    fs::write(&env.config, format!("[store]\npath = \"{}/store\"\n", f.display())).unwrap();
    let err = env.fails(&["init"]);
    assert!(err.contains(&f.display().to_string()) && err.contains("Not a directory"), "{err}");
}
