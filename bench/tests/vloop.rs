//! The client against the vloop-blk binary.

mod common;
#[macro_use]
#[path = "common/suite.rs"]
mod suite;

tests_against!("vloop");
