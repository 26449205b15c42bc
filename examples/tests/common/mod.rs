//! What the tests that run the examples as child processes share.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Where cargo put example `name`: `target/<profile>/examples/`, beside the
/// `target/<profile>/deps/` the test runs from. Refuses a binary older than
/// its own `<name>.rs` or any of the other files it is built from, `shared`
/// (paths in this package): a filtered run, such as `--test pairs`, does not
/// rebuild examples.
pub(crate) fn example_binary(name: &str, shared: &[&str]) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test runs from target/<profile>/deps/");
    let bin = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "the {name} example is not built at {}: run `cargo test -p writethrough-examples` \
         (which builds the examples) or `cargo build -p writethrough-examples --example {name}` \
         first",
        bin.display()
    );
    let modified = |p: &Path| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH)
    };
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let own = format!("{name}.rs");
    for src in std::iter::once(own.as_str()).chain(shared.iter().copied()) {
        assert!(
            modified(&bin) >= modified(&dir.join(src)),
            "{} is older than {src}: rebuild it with `cargo build -p writethrough-examples \
             --example {name}` (or run the whole `cargo test -p writethrough-examples`)",
            bin.display()
        );
    }
    bin
}
