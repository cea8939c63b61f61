//! vloop backend.
