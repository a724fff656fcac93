#![no_main]
use cairn_store::format::lease::{GcState, Lease};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Both GC protocol objects: never panic, and what decodes re-encodes to itself.
    if let Ok(l) = Lease::decode(data, "fuzz") {
        assert_eq!(Lease::decode(&l.encode(), "fuzz").ok(), Some(l));
    }
    if let Ok(s) = GcState::decode(data) {
        assert_eq!(GcState::decode(&s.encode()).ok(), Some(s));
    }
});
