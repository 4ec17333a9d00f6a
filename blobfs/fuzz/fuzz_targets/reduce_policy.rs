//! Fuzzes the text form of a reduce policy (an xattr value: untrusted). A
//! policy that parses must print canonically and parse back to itself.
#![no_main]

use blobfs::reduce::ReducePolicy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(p) = text.parse::<ReducePolicy>() {
        let canonical = p.to_string();
        assert_eq!(canonical.parse::<ReducePolicy>().unwrap(), p, "{text:?} -> {canonical:?}");
    }
});
