//! Manifest parsing. Properties: a parsed manifest serialises to JSON that
//! parses back to the same manifest (compact and pretty, as the store
//! writes it); what is parsed has the supported format version; anything
//! larger than the format's limit is refused; errors name the file.
#![no_main]

use std::path::Path;

use blockvault_store::format::MAX_MANIFEST_LEN;
use blockvault_store::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("backups/000000000007.json");
    match Manifest::parse(path, data) {
        Ok(m) => {
            assert!(data.len() as u64 <= MAX_MANIFEST_LEN);
            assert_eq!(m.format, Manifest::version_for(m.set.as_ref()));
            for json in [serde_json::to_vec(&m).unwrap(), serde_json::to_vec_pretty(&m).unwrap()] {
                let again = Manifest::parse(path, &json).expect("a serialised manifest parses");
                assert_eq!(again, m, "manifest changed in a JSON round trip");
            }
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("000000000007.json"), "error does not name the file: {msg}");
        }
    }
});
