//! Tests that cannot run: a missing tool, an unbuilt binary, a kernel without io_uring. On a
//! developer's machine such a test reports itself as skipped and returns; in CI (`CI=true`, as
//! GitHub Actions and `.ci/run` set it) a test that cannot run fails, so a green run means every
//! test ran.

/// Whether this run is a CI run (`CI` set to `true` or `1`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Report that the calling test cannot run because of `reason`: panics under CI, otherwise
/// prints `SKIPPED: reason` on stderr so the caller can return.
#[track_caller]
pub fn skip(reason: &str) {
    if in_ci() {
        panic!("this test cannot run in CI: {reason}");
    }
    eprintln!("SKIPPED: {reason}");
}
