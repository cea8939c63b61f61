//! vloop harness.
