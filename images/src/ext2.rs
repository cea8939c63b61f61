//! ext2 (to be written).
