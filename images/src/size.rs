//! size (to be written).
