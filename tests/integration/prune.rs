//! Retention on a real store: `prune` removes what the policy does not
//! keep, the kept backups still restore bit-identically, protection holds
//! (also across a catalog rebuild), and `--dry-run` removes nothing.

use std::fs;

use crate::common::*;

const SIZE: u64 = 4 << 20;

fn ids(env: &Env) -> Vec<u64> {
    env.list().iter().map(|b| num(b, "id")).collect()
}

fn prune_json(env: &Env, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["prune", "--json"];
    a.extend_from_slice(args);
    let v: serde_json::Value = serde_json::from_str(&env.ok(&a)).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    v[0].clone()
}

/// (id, action, reason) of every backup in a `prune --json` image object.
fn decisions(v: &serde_json::Value) -> Vec<(u64, String, String)> {
    v["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                num(b, "id"),
                b["action"].as_str().unwrap().to_string(),
                b["reason"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[test]
fn keep_last_with_protection_and_dry_run() {
    let env = Env::new(&[], "");
    let img = env.path("img");
    let src = format!("file:{}", img.display());
    env.write_config(
        &[("img", &src)],
        "",
        "[defaults]\nblock-size = \"64K\"\nretention = { keep-last = 2 }\n",
    );
    env.ok(&["init"]);
    let mut r = rng(41);
    write_random(&img, 0, SIZE as usize, &mut r);
    let mut refs = Vec::new();
    for round in 0..5 {
        if round > 0 {
            random_changes(&img, SIZE, 5, &mut r);
        }
        env.ok(&["backup", "img"]);
        let reference = env.path(&format!("ref-{round}"));
        fs::copy(&img, &reference).unwrap();
        refs.push(reference);
    }
    let all = ids(&env);
    assert_eq!(all.len(), 5);
    let by_id = |id: u64| refs[all.iter().position(|&x| x == id).unwrap()].clone();

    // protect the second oldest; protection needs IMAGE@ID of a real backup
    let protected = all[1];
    env.ok(&["protect", &format!("img@{protected}")]);
    env.fails(&["protect", "img"]);
    env.fails(&["protect", "img@999"]);
    env.fails(&["protect", &format!("other@{protected}")]);
    assert!(env.store().join(format!("backups/{protected:012}.protected")).exists());

    // dry run: the plan, and nothing removed
    let plan = prune_json(&env, &["--dry-run"]);
    assert_eq!(plan["dry_run"], true);
    assert_eq!(plan["policy"], "keep-last=2");
    let d = decisions(&plan);
    let want: Vec<(u64, &str, &str)> = vec![
        (all[4], "keep", "keep-last 1/2"),
        (all[3], "keep", "keep-last 2/2"),
        (all[2], "remove", ""),
        (all[1], "keep", "protected"),
        (all[0], "remove", ""),
    ];
    let got: Vec<(u64, &str, &str)> = d.iter().map(|(i, a, r)| (*i, a.as_str(), r.as_str())).collect();
    assert_eq!(got, want);
    assert_eq!(ids(&env), all, "--dry-run removed something");
    let text = env.ok(&["prune", "--dry-run", "img"]);
    assert!(text.contains("keep-last 1/2") && text.contains("protected") && text.contains("remove"), "{text}");
    assert!(text.contains("dry run"), "{text}");

    // the real prune removes the 2 unprotected old ones (3 oldest minus the protected one)
    let text = env.ok(&["prune"]);
    assert!(text.contains("removed 2 backups"), "{text}");
    let left = ids(&env);
    assert_eq!(left, vec![all[1], all[3], all[4]]);
    for gone in [all[0], all[2]] {
        assert!(!env.store().join(format!("backups/{gone:012}.json")).exists());
        assert!(!env.store().join(format!("backups/{gone:012}.blockmap")).exists());
        env.fails(&["restore", &format!("img@{gone}"), "--to", env.path("x").to_str().unwrap()]);
    }
    // the kept ones restore bit-identically (chunks stay until gc anyway,
    // and every block map is complete, so no later backup depends on a removed one)
    for id in &left {
        let out = env.restore(&format!("img@{id}"));
        assert_same(&by_id(*id), &out);
        fs::remove_file(out).unwrap();
    }

    // protection survives a catalog rebuild from the store
    fs::remove_file(env.catalog()).unwrap();
    env.ok(&["catalog", "rebuild"]);
    let list = env.list();
    let prot: Vec<u64> = list.iter().filter(|b| b["protected"] == true).map(|b| num(b, "id")).collect();
    assert_eq!(prot, vec![protected]);
    let plan = prune_json(&env, &["img"]);
    assert_eq!(plan["removed"], 0, "{plan}");
    assert_eq!(ids(&env), left);

    // unprotected, it goes
    env.ok(&["unprotect", &format!("img@{protected}")]);
    assert!(!env.store().join(format!("backups/{protected:012}.protected")).exists());
    let plan = prune_json(&env, &[]);
    assert_eq!(plan["removed"], 1, "{plan}");
    assert_eq!(ids(&env), vec![all[3], all[4]]);
}

#[test]
fn no_policy_keeps_everything_and_unknown_image_fails() {
    let env = Env::new(&[], "");
    let img = env.path("img");
    write_random(&img, 0, 1 << 20, &mut rng(42));
    env.write_config(&[("img", &format!("file:{}", img.display()))], "", "");
    env.ok(&["init"]);
    env.ok(&["backup", "img"]);
    env.ok(&["backup", "img"]);
    let plan = prune_json(&env, &[]);
    assert_eq!(plan["policy"], "keep all");
    assert!(decisions(&plan).iter().all(|(_, a, r)| a == "keep" && r == "no policy: keep all"), "{plan}");
    assert_eq!(ids(&env).len(), 2);
    let e = env.fails(&["prune", "nope"]);
    assert!(e.contains("nope"), "{e}");
}
