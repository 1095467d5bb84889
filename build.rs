//! The migrations are embedded at compile time (`db::migrate`): rebuild when one is
//! added or changed, not only when a Rust file changes.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
