#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| redirector::fuzzing::api_request(data));
