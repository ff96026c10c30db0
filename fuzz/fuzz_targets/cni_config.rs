#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| redirector::fuzzing::cni_config(data));
