#![no_main]
use cairn_store::format::trace::Trace;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = Trace::decode(data, "fuzz") {
        // Whatever decodes re-encodes to something that decodes to the same trace.
        assert_eq!(Trace::decode(&t.encode(), "fuzz").ok(), Some(t));
    }
});
