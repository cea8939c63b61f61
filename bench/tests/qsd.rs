//! The client against qemu-storage-daemon, the reference backend.

mod common;
#[macro_use]
#[path = "common/suite.rs"]
mod suite;

tests_against!("qsd");
