//! Explains a refused connect caused by a malformed keyring, without ever
//! showing the key (librados' own message quotes it; see `Cluster::connect`).

use std::path::Path;

/// The first problem found in the keyring files librados searches
/// (`keyring` option: a list separated by commas, semicolons or spaces),
/// for client `client.<id>`; `None` when every existing one looks well formed.
pub(crate) fn check_all(keyrings: &str, id: &str) -> Option<String> {
    keyrings
        .split([',', ';', ' ', '\t'])
        .filter(|p| !p.is_empty())
        .map(Path::new)
        .filter(|p| p.is_file())
        .find_map(|p| check(p, id))
}

/// A problem with one keyring file, naming the file and the section.
fn check(path: &Path, id: &str) -> Option<String> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) => return Some(format!("cannot read the keyring {}: {e}", path.display())),
    };
    let text = String::from_utf8_lossy(&text);
    let mut section = String::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_string();
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if key.trim() != "key" {
            continue;
        }
        // Ceph accepts a value in quotes
        let value = value.trim().trim_matches('"');
        if !is_ceph_key(value) {
            let which = if section == format!("client.{id}") {
                format!("the key of [{section}]")
            } else {
                format!("the key of [{section}] (line {})", n + 1)
            };
            return Some(format!(
                "the keyring {} is malformed: {which} is not a valid base64 cephx key (the value is not shown)",
                path.display()
            ));
        }
    }
    None
}

/// A cephx secret as keyrings hold it: base64 (with padding) of at least
/// the 12-byte header Ceph's `CryptoKey` decodes (type, creation time, length).
fn is_ceph_key(v: &str) -> bool {
    let b = v.as_bytes();
    if b.len() < 16 || b.len() % 4 != 0 {
        return false;
    }
    let pad = b.iter().rev().take_while(|&&c| c == b'=').count();
    pad <= 2
        && b[..b.len() - pad]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked_without_showing_them() {
        assert!(is_ceph_key("AQBnVg9rUj0WORAAJKlo7rBq7smBi3B+m2QioA=="));
        assert!(!is_ceph_key("AQBnVg9rUj0WORAAJKlo7rBq7smBi3B+m2QioA==garbage"));
        assert!(!is_ceph_key("notbase64!!secretvalue"));
        assert!(!is_ceph_key(""));
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good");
        std::fs::write(&good, "[client.admin]\n\tkey = AQBnVg9rUj0WORAAJKlo7rBq7smBi3B+m2QioA==\n\tcaps mon = \"allow *\"\n").unwrap();
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "[client.admin]\n\tkey = s3cr3t-not-base64\n").unwrap();
        assert_eq!(check_all(&good.display().to_string(), "admin"), None);
        let list = format!("/nonexistent/keyring,{} {}", good.display(), bad.display());
        let why = check_all(&list, "admin").unwrap();
        assert!(why.contains(&bad.display().to_string()) && why.contains("malformed") && why.contains("[client.admin]"), "{why}");
        assert!(!why.contains("s3cr3t"), "{why}");
    }
}
