//! Config parsing (`Config::parse`). Properties of an accepted config: the
//! checks of `validate` hold (absolute paths, compression level, unique
//! and valid image names, block sizes allowed); every source prints as text
//! that parses back to it; every image is found by its own name. Durations
//! and sizes that parse print back to the same number. Errors name the file.
#![no_main]

use std::collections::HashSet;
use std::path::Path;

use blockvault::config::{parse_duration, parse_size, Config, Source};
use blockvault_store::format::check_block_size;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(n) = parse_duration(text) {
        assert_eq!(parse_duration(&n.to_string()), Ok(n));
    }
    if let Ok(n) = parse_size(text) {
        assert_eq!(parse_size(&n.to_string()), Ok(n));
    }
    if let Ok(s) = Source::parse(text) {
        assert_eq!(Source::parse(&s.to_string()), Ok(s));
    }

    let path = Path::new("/fuzz/config.toml");
    let cfg = match Config::parse(text, path) {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("{e:#}");
            assert!(msg.contains("/fuzz/config.toml"), "error does not name the file: {msg}");
            return;
        }
    };
    // exactly one of [store] path and url, and a path is absolute
    assert!(cfg.store.path.is_some() != cfg.store.url.is_some(), "store needs exactly one of path and url");
    if let Some(p) = &cfg.store.path {
        assert!(p.is_absolute());
    }
    assert!((0..=22).contains(&cfg.store.compression_level));
    assert!(cfg.catalog_path().is_absolute());
    assert!(cfg.daemon.max_concurrent >= 1);
    if let Some(bs) = cfg.defaults.block_size {
        assert!(check_block_size(bs.0).is_ok());
    }
    let mut names = HashSet::new();
    for img in &cfg.images {
        assert!(names.insert(img.name.clone()), "image {} accepted twice", img.name);
        assert!(!img.name.is_empty() && !img.name.starts_with('.') && !img.name.contains('/'));
        assert_eq!(Source::parse(&img.source.to_string()).as_ref(), Ok(&img.source));
        assert!(img.matches_name(&img.name));
        if !img.name.contains("{image}") {
            assert_eq!(cfg.image(&img.name).map(|i| i.name.clone()).ok(), Some(img.name.clone()));
        }
        if let Some(bs) = img.block_size(&cfg.defaults) {
            assert!(check_block_size(bs).is_ok());
        }
    }
});
