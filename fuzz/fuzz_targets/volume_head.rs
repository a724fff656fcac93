#![no_main]
use cairn_store::format::volume::Head;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A volume head: never panic, and what decodes re-encodes to itself.
    if let Ok(h) = Head::decode(data, "volumes/fuzz") {
        assert_eq!(Head::decode(&h.encode(), "volumes/fuzz").ok(), Some(h));
    }
});
