//! What the typed API refuses at compile time: a key of the wrong type, a
//! field the derive cannot map to a column, and a struct with no key.
//! Each case in `tests/ui` must fail to compile with the message beside it.

#[test]
fn the_typed_api_refuses_what_would_fail_at_run_time() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
