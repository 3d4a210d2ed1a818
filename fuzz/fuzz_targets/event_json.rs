//! libFuzzer entry point; the checks live in `dispatchd_fuzz::event_json` so stable builds test them too.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dispatchd_fuzz::event_json(data));
