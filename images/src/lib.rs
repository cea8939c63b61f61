//! vloop-images: create, build, copy and inspect disk images.
//!
//! Every builder is reproducible: the same tree and timestamp give the same bytes.

pub mod copy;
pub mod create;
pub mod ext2;
pub mod info;
pub mod iso;
pub mod size;
pub mod tree;
