//! info (to be written).
