//! copy (to be written).
