//! iso (to be written).
