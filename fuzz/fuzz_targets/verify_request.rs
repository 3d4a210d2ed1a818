//! libFuzzer entry point; the checks live in `dispatchd_fuzz::verify_request` so stable builds test them too.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dispatchd_fuzz::verify_request(data));
