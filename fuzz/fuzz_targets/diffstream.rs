//! The `rbd diff` stream reader (`blockvault::diffstream`), as
//! `import-diff` runs it on untrusted streams. Properties:
//! * any input is parsed or refused with an error, never a panic, and no
//!   allocation follows a length read from the stream;
//! * a stream that parses, written again by `DiffWriter` (same version,
//!   names, size, records and data), parses to the same header, records
//!   and data.
#![no_main]

use blockvault::diffstream::{DiffReader, DiffWriter, Record};
use libfuzzer_sys::fuzz_target;

type Parsed = (blockvault::diffstream::Header, Vec<(Record, Vec<u8>)>);

fn parse(bytes: &[u8]) -> Option<Parsed> {
    let mut r = DiffReader::new(bytes).ok()?;
    let mut out = Vec::new();
    while let Some(rec) = r.next().ok()? {
        let data = match rec {
            // a write's data is in the input, or the stream is truncated:
            // never allocate more than the input holds
            Record::Write { len, .. } if len <= bytes.len() as u64 => {
                let mut d = vec![0u8; len as usize];
                r.read_data(&mut d).ok()?;
                d
            }
            Record::Write { .. } => {
                assert!(r.next().is_err(), "a write record longer than the input parsed");
                return None;
            }
            Record::Zero { .. } => Vec::new(),
        };
        out.push((rec, data));
    }
    Some((r.header().clone(), out))
}

fuzz_target!(|bytes: &[u8]| {
    let Some((h, recs)) = parse(bytes) else { return };
    let mut w = DiffWriter::new(Vec::new(), h.version, h.from.as_deref(), h.to.as_deref(), h.size).unwrap();
    for (rec, data) in &recs {
        match *rec {
            Record::Write { offset, .. } => w.write(offset, data).unwrap(),
            Record::Zero { offset, len } => w.zero(offset, len).unwrap(),
        }
    }
    let again = w.finish().unwrap();
    let (h2, recs2) = parse(&again).expect("a re-written stream does not parse");
    assert_eq!(h, h2);
    assert_eq!(recs, recs2);
});
