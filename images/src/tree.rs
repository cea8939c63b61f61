//! tree (to be written).
